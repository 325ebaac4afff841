//! SSDP discovery of WeMo plugs: M-SEARCH for the Belkin basic event service, to the multicast
//! group and/or to unicast targets, and the LOCATION/USN of whatever answers.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

pub const MULTICAST: &str = "239.255.255.250:1900";

/// The M-SEARCH pywemo sends, byte for byte.
pub const M_SEARCH: &str = "M-SEARCH * HTTP/1.1\r\nST: urn:Belkin:service:basicevent:1\r\nMX: 1\r\nMAN: \"ssdp:discover\"\r\nHOST: 239.255.255.250:1900\r\n\r\n";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub location: String,
    pub udn: String,
}

/// Reads LOCATION and USN from an SSDP reply; the UDN is the USN before `::`.
pub fn parse_reply(text: &str) -> Option<Found> {
    let mut lines = text.split("\r\n");
    if !lines.next()?.starts_with("HTTP/1.1 200") {
        return None;
    }
    let mut location = None;
    let mut usn = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        match k.trim().to_ascii_lowercase().as_str() {
            "location" => location = Some(v.trim().to_string()),
            "usn" => usn = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let udn = usn?.split("::").next()?.to_string();
    let location = location?;
    (location.starts_with("http://") && udn.starts_with("uuid:")).then_some(Found { location, udn })
}

/// Sends M-SEARCH to every target and collects distinct answers for `wait`.
pub async fn search(targets: &[SocketAddr], wait: Duration) -> Vec<Found> {
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0").await else {
        return vec![];
    };
    for t in targets {
        if let Err(e) = sock.send_to(M_SEARCH.as_bytes(), t).await {
            log::debug!("SSDP to {t}: {e}");
        }
    }
    let mut found: Vec<Found> = vec![];
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
        if let Some(f) = parse_reply(&String::from_utf8_lossy(&buf[..n])) {
            if !found.contains(&f) {
                found.push(f);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_a_real_reply() {
        let r = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=86400\r\nEXT:\r\nLOCATION: http://192.168.5.190:49153/setup.xml\r\nSERVER: Unspecified, UPnP/1.0, Unspecified\r\nST: urn:Belkin:service:basicevent:1\r\nUSN: uuid:Socket-1_0-221517K0101769::urn:Belkin:service:basicevent:1\r\n\r\n";
        assert_eq!(
            parse_reply(r),
            Some(Found {
                location: "http://192.168.5.190:49153/setup.xml".into(),
                udn: "uuid:Socket-1_0-221517K0101769".into()
            })
        );
        assert_eq!(parse_reply("NOTIFY * HTTP/1.1\r\n\r\n"), None);
    }

    proptest! {
        #[test]
        fn any_datagram_is_safe(s in "(?s).{0,400}") {
            let _ = parse_reply(&s);
        }
    }
}
