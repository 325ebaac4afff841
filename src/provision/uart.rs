//! Provisioning over a serial line shared with the device's log output: one text line per
//! message, `#OP1:<base64>*<crc32 hex>\n`, everything else on the line ignored. Base64 is the
//! standard alphabet with `=` padding (RFC 4648 section 4); the CRC is CRC-32/ISO-HDLC (zlib's)
//! of the base64 characters, as exactly 8 lower-case hex digits; a `\r` before the `\n` is
//! accepted. (The 1 in `#OP1:` is the framing's version, not the protocol's.)

use super::protocol::{ProvError, Transport, MAX_MESSAGE, REFUSED};
use base64::Engine as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER: &str = "#OP1:";
/// Longest line kept, counted from its first byte to its `\n` included; longer ones are noise.
pub const MAX_LINE: usize = 4096;
/// A line that stops arriving for this long is dropped.
pub const INTER_BYTE: Duration = Duration::from_millis(500);

pub fn encode_line(msg: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(msg);
    format!("{HEADER}{b64}*{:08x}\n", crc32fast::hash(b64.as_bytes()))
}

/// The message in a line, if the line is a frame and intact.
pub fn parse_line(line: &str) -> Option<Vec<u8>> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let rest = line.strip_suffix('\r').unwrap_or(line).strip_prefix(HEADER)?;
    let (b64, crc) = rest.rsplit_once('*')?;
    let lower_hex = crc.len() == 8 && crc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !lower_hex || u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(b64.as_bytes()) {
        return None;
    }
    let msg = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (msg.len() <= MAX_MESSAGE).then_some(msg)
}

pub struct Uart<S> {
    io: S,
    buf: Vec<u8>,
    last_byte: Instant,
    /// Frames (lines with the header) this link dropped as damaged.
    refused: u64,
}

impl<S> Uart<S> {
    pub fn new(io: S) -> Uart<S> {
        Uart {
            io,
            buf: vec![],
            last_byte: Instant::now(),
            refused: 0,
        }
    }

    /// A whole frame from the buffered lines, if there is one; other lines are dropped.
    fn take_frame(&mut self) -> Option<Vec<u8>> {
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            match text.find(HEADER).map(|i| parse_line(&text[i..])) {
                Some(Some(m)) if line.len() <= MAX_LINE => return Some(m),
                // A frame header with a bad CRC or body, or too long: line noise, counted.
                Some(_) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    self.refused += 1;
                }
                None => {}
            }
        }
        if self.buf.len() > MAX_LINE {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            self.refused += 1;
            self.buf.clear();
        }
        None
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for Uart<S> {
    async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
        self.io
            .write_all(encode_line(msg).as_bytes())
            .await
            .map_err(|e| ProvError::Link(e.to_string()))?;
        self.io.flush().await.map_err(|e| ProvError::Link(e.to_string()))
    }

    fn refused(&self) -> u64 {
        self.refused
    }

    async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
        let end = Instant::now() + within;
        let mut tmp = [0u8; 512];
        loop {
            if let Some(m) = self.take_frame() {
                return Ok(m);
            }
            let now = Instant::now();
            if now >= end {
                return Err(ProvError::Timeout);
            }
            // A partial line that stopped arriving is dropped.
            if !self.buf.is_empty() && now.duration_since(self.last_byte) > INTER_BYTE {
                self.buf.clear();
            }
            let wait = (end - now).min(INTER_BYTE);
            match tokio::time::timeout(wait, self.io.read(&mut tmp)).await {
                Ok(Ok(0)) => return Err(ProvError::Link("the serial line closed".into())),
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    self.last_byte = Instant::now();
                }
                Ok(Err(e)) => return Err(ProvError::Link(e.to_string())),
                Err(_) => {}
            }
        }
    }
}

/// Opens a serial port, with errors that say what to do.
pub fn open(port: &str, baud: u32) -> Result<Uart<tokio_serial::SerialStream>, ProvError> {
    use tokio_serial::SerialPortBuilderExt;
    let s = tokio_serial::new(port, baud)
        .timeout(Duration::from_millis(100))
        .open_native_async()
        .map_err(|e| {
            let text = e.to_string();
            ProvError::Link(match e.kind() {
                tokio_serial::ErrorKind::NoDevice => format!("{port}: no such serial port ({text})"),
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::NotFound) => format!("{port}: no such serial port"),
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
                    format!(
                        "{port}: permission denied (add the user to `dialout`, or `snap connect outpost:serial-port`)"
                    )
                }
                _ if text.contains("busy") => format!("{port}: busy (another program has it open)"),
                _ => format!("{port}: {text}"),
            })
        })?;
    Ok(Uart::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_noise_is_refused() {
        let l = encode_line(b"\x01\x00hello");
        assert!(l.starts_with("#OP1:") && l.ends_with('\n'));
        assert_eq!(parse_line(&l).unwrap(), b"\x01\x00hello");
        let mut bad = l.clone().into_bytes();
        bad[7] ^= 1;
        assert_eq!(parse_line(&String::from_utf8_lossy(&bad)), None);
        assert_eq!(parse_line("I (1234) wifi: connected\n"), None);
        // CRLF is accepted; upper-case hex, other base64 flavours and missing padding are not.
        assert_eq!(parse_line(&l.replace('\n', "\r\n")).unwrap(), b"\x01\x00hello");
        let (body, crc) = l.trim_end().rsplit_once('*').unwrap();
        if crc.bytes().any(|b| b.is_ascii_lowercase()) {
            assert_eq!(parse_line(&format!("{body}*{}\n", crc.to_uppercase())), None);
        }
        // CRC-32/ISO-HDLC: the check value of "123456789" is cbf43926.
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf43926);
        let unpadded = "#OP1:AQBoZWxsbw"; // the same message without its `==`
        let crc = crc32fast::hash(b"AQBoZWxsbw");
        assert_eq!(parse_line(&format!("{unpadded}*{crc:08x}\n")), None);
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode([0xfb, 0xff]);
        let crc = crc32fast::hash(url_safe.as_bytes());
        assert_eq!(parse_line(&format!("{HEADER}{url_safe}*{crc:08x}\n")), None);
    }

    proptest! {
        #[test]
        fn any_line_parses_or_not_without_panic(s in "(?s).{0,300}") {
            let _ = parse_line(&s);
            let _ = parse_line(&format!("{HEADER}{s}"));
        }

        #[test]
        fn any_message_survives_framing(m in prop::collection::vec(any::<u8>(), 0..MAX_MESSAGE)) {
            prop_assert_eq!(parse_line(&encode_line(&m)).unwrap(), m);
        }
    }
}
