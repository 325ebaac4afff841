//! What `/mqtt` checks before the broker's front door sees a WebSocket client:
//!
//! - **Origin.** A browser sends `Origin` with every WebSocket; a page from another site must not
//!   reach the broker through the operator's browser. Allowed: no `Origin` (not a browser), the
//!   dashboard's own origin (the `Host` it was reached at, when that host is an IP address or
//!   `localhost`: a DNS name could be re-pointed at this port by another site), and the
//!   configured `dashboard.origins`.
//! - **Anonymous.** Unless `dashboard.anonymous` is set, a CONNECT without a user name is refused
//!   here, with the CONNACK code of its protocol version, before the front door would apply the
//!   loopback default. The CONNECT is read from the first WebSocket frames and replayed, byte for
//!   byte, to the front door when it passes.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Is a WebSocket from `origin` to this port allowed?
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, tls: bool, extra: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if extra.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let own = format!("{}://{host}", if tls { "https" } else { "http" });
    own.eq_ignore_ascii_case(origin) && host_is_literal(host)
}

/// `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`: names no other site can point here.
fn host_is_literal(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// What the first MQTT packet on a WebSocket said.
#[derive(Debug, PartialEq)]
pub enum First {
    /// A CONNECT with a user name, or something the front door will refuse itself.
    PassOn,
    /// A CONNECT without a user name, of this protocol level (4 = 3.1.1, 5 = MQTT 5).
    Anonymous(u8),
}

/// Reads the client's first WebSocket data frames until a whole MQTT packet is there (at most
/// `limit` bytes); returns what it is and every byte read, to replay.
pub async fn read_first<S: AsyncRead + Unpin>(s: &mut S, limit: usize) -> std::io::Result<(First, Vec<u8>)> {
    let mut raw = vec![];
    let mut mqtt = vec![];
    loop {
        // Frame header: 2 bytes, then 0/2/8 bytes of length, then the 4-byte mask.
        let start = raw.len();
        read_n(s, &mut raw, 2).await?;
        let (op, masked, len7) = (raw[start] & 0x0f, raw[start + 1] & 0x80 != 0, raw[start + 1] & 0x7f);
        let len = match len7 {
            126 => {
                read_n(s, &mut raw, 2).await?;
                u16::from_be_bytes([raw[start + 2], raw[start + 3]]) as usize
            }
            127 => {
                read_n(s, &mut raw, 8).await?;
                let b: [u8; 8] = raw[start + 2..start + 10].try_into().expect("8 bytes");
                usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX)
            }
            n => n as usize,
        };
        if len > limit || raw.len() + len > limit + 64 {
            return Ok((First::PassOn, raw));
        }
        let mut key = [0u8; 4];
        if masked {
            let at = raw.len();
            read_n(s, &mut raw, 4).await?;
            key.copy_from_slice(&raw[at..at + 4]);
        }
        let at = raw.len();
        read_n(s, &mut raw, len).await?;
        if op == 0 || op == 1 || op == 2 {
            mqtt.extend(raw[at..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else if op == 8 {
            return Ok((First::PassOn, raw));
        }
        if let Some(first) = complete_connect(&mqtt) {
            return Ok((first, raw));
        }
    }
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, into: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
    let at = into.len();
    into.resize(at + n, 0);
    s.read_exact(&mut into[at..]).await.map(|_| ())
}

/// `Some` once `b` holds one whole MQTT packet.
fn complete_connect(b: &[u8]) -> Option<First> {
    let first = *b.first()?;
    let (mut len, mut mul, mut i) = (0usize, 1usize, 1);
    loop {
        let d = *b.get(i)?;
        len += (d & 0x7f) as usize * mul;
        mul *= 128;
        i += 1;
        if d & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Some(First::PassOn);
        }
    }
    let body = b.get(i..i + len)?;
    if first != 0x10 || body.len() < 2 {
        return Some(First::PassOn);
    }
    let name_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    let (Some(&level), Some(&flags)) = (body.get(2 + name_len), body.get(3 + name_len)) else {
        return Some(First::PassOn);
    };
    if flags & 0x80 == 0 {
        Some(First::Anonymous(level))
    } else {
        Some(First::PassOn)
    }
}

/// Sends the refusal a client of `level` understands, then a WebSocket close.
pub async fn refuse_anonymous<S: AsyncWrite + Unpin>(s: &mut S, level: u8) {
    // 3.1.1: 0x05 not authorized; MQTT 5: 0x87 not authorized, no properties.
    let connack: &[u8] = if level == 5 {
        &[0x20, 3, 0, 0x87, 0]
    } else {
        &[0x20, 2, 0, 5]
    };
    let mut frame = vec![0x82, connack.len() as u8];
    frame.extend_from_slice(connack);
    // Close, 1008 (policy violation).
    frame.extend_from_slice(&[0x88, 2, 0x03, 0xf0]);
    let _ = s.write_all(&frame).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// A stream that first gives back bytes already read from it.
pub struct Replay<S> {
    pub head: Vec<u8>,
    pub pos: usize,
    pub inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.head[pos..pos + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = vec![];
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_own_literal_hosts_and_listed_ones_only() {
        let none: &[String] = &[];
        assert!(origin_allowed(None, Some("127.0.0.1:8080"), false, none));
        assert!(origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            false,
            none
        ));
        assert!(origin_allowed(
            Some("http://localhost:8080"),
            Some("localhost:8080"),
            false,
            none
        ));
        assert!(origin_allowed(
            Some("http://[::1]:8080"),
            Some("[::1]:8080"),
            false,
            none
        ));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("127.0.0.1:8080"),
            false,
            none
        ));
        // DNS rebinding: evil.example pointed at 127.0.0.1, same-origin by name.
        assert!(!origin_allowed(
            Some("http://evil.example:8080"),
            Some("evil.example:8080"),
            false,
            none
        ));
        assert!(!origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            true,
            none
        ));
        let listed = vec!["https://ops.example".to_string()];
        assert!(origin_allowed(
            Some("https://ops.example"),
            Some("gw.example"),
            false,
            &listed
        ));
        assert!(!origin_allowed(Some("null"), Some("127.0.0.1:8080"), false, &listed));
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut f = vec![0x82, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    #[tokio::test]
    async fn a_connect_split_over_frames_is_read_and_replayed_whole() {
        // MQTT 3.1.1 CONNECT, clean session, no user name, client id "a".
        let connect = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 1, b'a'];
        let mut wire = frame(&connect[..5]);
        wire.extend(frame(&connect[5..]));
        let (first, raw) = read_first(&mut &wire[..], 4096).await.unwrap();
        assert_eq!(first, First::Anonymous(4));
        assert_eq!(raw, wire);
        let mut with_user = connect.to_vec();
        with_user[9] = 0x82;
        let (first, _) = read_first(&mut &frame(&with_user)[..], 4096).await.unwrap();
        assert_eq!(first, First::PassOn);
    }
}
