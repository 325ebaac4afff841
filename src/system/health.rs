//! `outpost health`: is the gateway really serving? Its first listener answers an MQTT CONNECT
//! (any CONNACK will do: a refusal is an answer), and every bridge's spool opens.

use crate::config::{Config, ListenerProtocol};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub fn check(cfg: &Config) -> Result<(), Vec<String>> {
    let mut problems = vec![];
    match cfg
        .broker
        .listeners
        .iter()
        .find(|l| l.protocol == ListenerProtocol::Mqtt)
    {
        Some(l) => {
            let mut addr = l.bind.0;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            if let Err(e) = mqtt_answers(addr) {
                problems.push(format!("broker on {addr}: {e}"));
            }
        }
        None => {
            // Only TLS/WebSocket listeners: the port must at least accept.
            for l in &cfg.broker.listeners {
                if let Err(e) = TcpStream::connect_timeout(&l.bind.0, Duration::from_secs(2)) {
                    problems.push(format!("listener {}: {e}", l.bind.0));
                }
            }
        }
    }
    for b in &cfg.bridges {
        let path = cfg.gateway.data_dir.join("bridges").join(format!("{}.db", b.name));
        let ok = rusqlite::Connection::open(&path)
            .and_then(|db| db.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)));
        match ok {
            Ok(s) if s == "ok" => {}
            Ok(s) => problems.push(format!("bridge {} spool {}: {s}", b.name, path.display())),
            Err(e) => problems.push(format!("bridge {} spool {}: {e}", b.name, path.display())),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn mqtt_answers(addr: std::net::SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut c = rumqttc::mqttbytes::v4::Connect::new("outpost-health");
    c.keep_alive = 10;
    let mut b = bytes::BytesMut::new();
    c.write(&mut b).map_err(|e| e.to_string())?;
    s.write_all(&b).map_err(|e| e.to_string())?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).map_err(|e| format!("no CONNACK: {e}"))?;
    if ack[0] != 0x20 {
        return Err(format!("answered {:#04x}, not CONNACK", ack[0]));
    }
    let _ = s.write_all(&[0xe0, 0]);
    Ok(())
}
