//! A simulated WeMo plug for the tests: real HTTP on loopback with the recorded replies and
//! quirks of real firmware (see the reference), an SSDP responder, and knobs for delays, errors,
//! malformed replies and port changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Normal,
    /// Never answer (accept, then sit on the socket).
    Hang,
    Http500,
    /// Answer GetInsightParams with this body instead.
    Body(String),
}

pub struct SimState {
    pub on: bool,
    pub power_mw: u64,
    pub mode: Mode,
    pub port: u16,
    /// SOAP actions received, in order.
    pub actions: Vec<String>,
}

pub struct SimPlug {
    pub state: Arc<Mutex<SimState>>,
    pub udn: String,
    pub ssdp: std::net::SocketAddr,
    server: Mutex<tokio::task::JoinHandle<()>>,
    name: String,
    ip: String,
}

const ENVELOPE: &str = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\n";
const END: &str = "\r\n</s:Body> </s:Envelope>";

fn setup_xml(name: &str, udn: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<root xmlns=\"urn:Belkin:device-1-0\"><specVersion><major>1</major><minor>0</minor></specVersion><device>\
<deviceType>urn:Belkin:device:insight:1</deviceType><friendlyName>{name}</friendlyName><manufacturer>Belkin International Inc.</manufacturer>\
<modelName>Insight</modelName><UDN>{udn}</UDN><firmwareVersion>WeMo_WW_2.00.11408.PVT-OWRT-Insight</firmwareVersion><serviceList>\
<service><serviceType>urn:Belkin:service:basicevent:1</serviceType><serviceId>urn:Belkin:serviceId:basicevent1</serviceId><controlURL>/upnp/control/basicevent1</controlURL><eventSubURL>/upnp/event/basicevent1</eventSubURL><SCPDURL>/eventservice.xml</SCPDURL></service>\
<service><serviceType>urn:Belkin:service:insight:1</serviceType><serviceId>urn:Belkin:serviceId:insight1</serviceId><controlURL>/upnp/control/insight1</controlURL><eventSubURL>/upnp/event/insight1</eventSubURL><SCPDURL>/insightservice.xml</SCPDURL></service>\
</serviceList></device></root>"
    )
}

impl SimPlug {
    pub async fn start(name: &str, serial: &str, power_mw: u64) -> SimPlug {
        SimPlug::start_on("127.0.0.1", name, serial, power_mw).await
    }

    /// A plug whose HTTP port is on loopback address `ip`: every sim is on 127.0.0.1 otherwise,
    /// and a real plug is alone at its address.
    pub async fn start_on(ip: &str, name: &str, serial: &str, power_mw: u64) -> SimPlug {
        let udn = format!("uuid:Insight-1_0-{serial}");
        let state = Arc::new(Mutex::new(SimState {
            on: true,
            power_mw,
            mode: Mode::Normal,
            port: 0,
            actions: vec![],
        }));
        let server = Mutex::new(Self::serve(ip, state.clone(), name.to_string(), udn.clone()).await);
        let ssdp_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ssdp = ssdp_sock.local_addr().unwrap();
        {
            let (state, udn) = (state.clone(), udn.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok((n, from)) = ssdp_sock.recv_from(&mut buf).await {
                    if !String::from_utf8_lossy(&buf[..n]).starts_with("M-SEARCH") {
                        continue;
                    }
                    let port = state.lock().unwrap().port;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=86400\r\nEXT:\r\nLOCATION: http://127.0.0.1:{port}/setup.xml\r\nOPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\nSERVER: Unspecified, UPnP/1.0, Unspecified\r\nX-User-Agent: redsonic\r\nST: urn:Belkin:service:basicevent:1\r\nUSN: {udn}::urn:Belkin:service:basicevent:1\r\n\r\n"
                    );
                    let _ = ssdp_sock.send_to(reply.as_bytes(), from).await;
                }
            });
        }
        SimPlug {
            state,
            udn,
            ssdp,
            server,
            name: name.to_string(),
            ip: ip.to_string(),
        }
    }

    async fn serve(ip: &str, state: Arc<Mutex<SimState>>, name: String, udn: String) -> tokio::task::JoinHandle<()> {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        state.lock().unwrap().port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (state, name, udn) = (state.clone(), name.clone(), udn.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    // Read the request head and its body.
                    let (head, body) = loop {
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_string();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            while buf.len() < i + 4 + len {
                                match sock.read(&mut tmp).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                                }
                            }
                            break (head, String::from_utf8_lossy(&buf[i + 4..i + 4 + len]).to_string());
                        }
                    };
                    let mode = state.lock().unwrap().mode.clone();
                    if mode == Mode::Hang {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let (status, reply) = if mode == Mode::Http500 {
                        ("500 Internal Server Error", String::new())
                    } else {
                        Self::answer(&state, &head, &body, &name, &udn, &mode)
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nCONTENT-LENGTH: {}\r\nCONTENT-TYPE: text/xml; charset=\"utf-8\"\r\nEXT:\r\nSERVER: Unspecified, UPnP/1.0, Unspecified\r\nX-User-Agent: redsonic\r\nCONNECTION: close\r\n\r\n{reply}",
                        reply.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        })
    }

    fn answer(
        state: &Mutex<SimState>,
        head: &str,
        body: &str,
        name: &str,
        udn: &str,
        mode: &Mode,
    ) -> (&'static str, String) {
        let first = head.lines().next().unwrap_or("");
        if first.starts_with("GET /setup.xml") {
            return ("200 OK", setup_xml(name, udn));
        }
        let action = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("soapaction:")
                    .then(|| l.split_once(':').unwrap().1.trim().trim_matches('"').to_string())
            })
            .unwrap_or_default();
        let mut s = state.lock().unwrap();
        s.actions.push(action.clone());
        let code = |s: &SimState| {
            if !s.on {
                0
            } else if s.power_mw < 8000 {
                8
            } else {
                1
            }
        };
        let fields10 = |s: &SimState| {
            format!(
                "{}|1611530424|231|300|183183|1209600|8|{}|1164707|99830512",
                code(s),
                s.power_mw
            )
        };
        match action.rsplit('#').next().unwrap_or("") {
            "GetBinaryState" => ("200 OK", format!("{ENVELOPE}<u:GetBinaryStateResponse xmlns:u=\"urn:Belkin:service:basicevent:1\">\r\n<BinaryState>{}</BinaryState>\r\n</u:GetBinaryStateResponse>{END}", code(&s))),
            "SetBinaryState" => {
                let want = body.contains("<BinaryState>1</BinaryState>");
                let v = if want == s.on {
                    "Error".to_string()
                } else {
                    s.on = want;
                    fields10(&s)
                };
                ("200 OK", format!("{ENVELOPE}<u:SetBinaryStateResponse xmlns:u=\"urn:Belkin:service:basicevent:1\">\r\n<BinaryState>{v}</BinaryState>\r\n<CountdownEndTime>0</CountdownEndTime>\r\n<deviceCurrentTime>1611389017</deviceCurrentTime>\r\n</u:SetBinaryStateResponse>{END}"))
            }
            "GetInsightParams" => {
                if let Mode::Body(b) = mode {
                    return ("200 OK", b.clone());
                }
                let power = if s.on { s.power_mw } else { 0 };
                ("200 OK", format!("{ENVELOPE}<u:GetInsightParamsResponse xmlns:u=\"urn:Belkin:service:metainfo:1\">\r\n<InsightParams>{}|1611532924|231|300|183183|1209600|8|{power}|1164707|99830512.000000|8000</InsightParams>\r\n</u:GetInsightParamsResponse>{END}", code(&s)))
            }
            _ => ("500 Internal Server Error", String::new()),
        }
    }

    pub fn port(&self) -> u16 {
        self.state.lock().unwrap().port
    }

    /// Closes the HTTP port and opens another (plugs do this after reboots).
    pub async fn move_port(&self) {
        self.server.lock().unwrap().abort();
        let h = Self::serve(&self.ip, self.state.clone(), self.name.clone(), self.udn.clone()).await;
        *self.server.lock().unwrap() = h;
    }

    pub fn set(&self, f: impl FnOnce(&mut SimState)) {
        f(&mut self.state.lock().unwrap());
    }
}
