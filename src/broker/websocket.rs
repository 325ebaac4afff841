//! MQTT over WebSocket: the server handshake and the byte stream the connection reads and writes.
//!
//! tungstenite (through async-tungstenite) owns the WebSocket protocol: framing, masking,
//! fragments, the close handshake and the pong it owes for every ping. [`WsBytes`] turns its
//! messages into the plain byte stream `connection` frames MQTT from, and bounds what a peer can
//! make this side hold or do, whatever it sends and however slowly it reads:
//!
//! - **Stack:** messages are taken in a loop, never by recursion, and at most
//!   [`MESSAGES_PER_POLL`] per poll before the task yields, so a flood of control frames neither
//!   overflows the stack nor starves the other tasks of the runtime.
//! - **Memory:** a frame or message over the broker's `max_packet_size` (plus a little for the
//!   MQTT header) is refused by tungstenite. It reserves a frame's declared length when the
//!   header arrives, so a connection may hold up to that much, as a TCP client's partly sent
//!   packet does. Writes go out as messages of at most [`CHUNK`] bytes into a write buffer
//!   capped a little above that ([`config`]), so pongs to a peer that never reads cannot pile up.
//! - **A peer that does not read is dropped:** after [`MAX_UNANSWERED_PINGS`] pings in a row
//!   while not a byte could be written to it, the stream fails ([`Violation::PingsUnread`]).
//!   A peer that reads slowly is the writer's to judge (its write timeout).
//! - **Text frames** end the connection: MQTT over WebSocket is binary only [MQTT-6.0.0-1].
//!
//! Every such end is counted in `Metrics::websocket_violations`. Both halves of a split
//! [`WsBytes`] must be polled by one task (as `connection` does): tungstenite keeps one waker for
//! writing, and the read side flushes pongs with its own.

use super::metrics::Metrics;
use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::error::ProtocolError;
use async_tungstenite::tungstenite::handshake::server::{Request, Response};
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_util::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// WebSocket messages taken in one poll before the task yields to others.
pub const MESSAGES_PER_POLL: usize = 64;
/// Pings in a row whose pongs could not be written out before the peer counts as not reading.
pub const MAX_UNANSWERED_PINGS: u32 = 256;
/// tungstenite's read buffer per connection (its default is 128 KiB).
const READ_BUFFER: usize = 4 * 1024;
/// The most bytes one binary message carries toward the client: MQTT over WebSocket is a byte
/// stream, and a packet may span messages.
pub const CHUNK: usize = 16 * 1024;
/// Room in the write buffer beside one chunk: frame headers, a pong, a close.
const WRITE_SLACK: usize = 16 * 1024;

/// Why a WebSocket peer was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A text frame: MQTT over WebSocket is binary only.
    Text,
    /// Pings kept coming while the pongs for them could not be written: the peer does not read.
    PingsUnread,
    /// tungstenite refused the framing: an unmasked or reserved frame, a bad close, a frame or
    /// message over the size limit, a broken fragment sequence.
    Protocol,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Violation::Text => "a WebSocket text frame (MQTT over WebSocket is binary only)",
            Violation::PingsUnread => "WebSocket pings kept coming while the pongs were not read",
            Violation::Protocol => "a WebSocket protocol error",
        })
    }
}

/// The WebSocket limits for a broker whose packets are at most `max_packet` bytes.
pub fn config(max_packet: usize) -> WebSocketConfig {
    // An MQTT packet's fixed header is at most 5 bytes beyond `max_packet_size`'s count.
    let max = max_packet + 64;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Each chunk is sent at once; the buffer holds one chunk and what waits beside it.
        .write_buffer_size(0)
        .max_write_buffer_size(CHUNK + WRITE_SLACK)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// The MQTT WebSocket subprotocol to answer, of those a client offers (`Sec-WebSocket-Protocol`).
pub fn mqtt_subprotocol(offered: &str) -> Option<&str> {
    offered
        .split(',')
        .map(str::trim)
        .find(|p| *p == "mqtt" || *p == "mqttv3.1")
}

/// Answers the HTTP upgrade on `stream` (the `ws` and `wss` listeners), picking the `mqtt`
/// subprotocol when the client offers it.
pub async fn accept<S>(stream: S, max_packet: usize, metrics: Arc<Metrics>) -> Result<WsBytes<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's error type is tungstenite's (large) HTTP response; it is never built here.
    #[allow(clippy::result_large_err)]
    let pick = |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(p) = mqtt_subprotocol(offered) {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_str(p).expect("ascii"));
        }
        Ok(resp)
    };
    let written = Arc::new(AtomicU64::new(0));
    let counted = Counted {
        inner: stream,
        written: written.clone(),
    };
    let ws = async_tungstenite::tokio::accept_hdr_async_with_config(counted, pick, Some(config(max_packet))).await?;
    Ok(WsBytes::new(ws, written, metrics))
}

/// A stream whose upgrade was answered elsewhere (the dashboard's `/mqtt`), as the server side.
pub async fn upgraded<S>(stream: S, max_packet: usize, metrics: Arc<Metrics>) -> WsBytes<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let written = Arc::new(AtomicU64::new(0));
    let counted = Counted {
        inner: stream,
        written: written.clone(),
    };
    let ws = WebSocketStream::from_raw_socket(TokioAdapter::new(counted), Role::Server, Some(config(max_packet))).await;
    WsBytes::new(ws, written, metrics)
}

/// The binary messages of a WebSocket as one byte stream; each write is one binary message.
pub struct WsBytes<S> {
    ws: WebSocketStream<TokioAdapter<Counted<S>>>,
    /// What is left of the last binary message after a short read.
    pending: Bytes,
    /// Pings in a row that found the socket full and not a byte written since the last one.
    unanswered: u32,
    /// Bytes written to the socket so far (by tungstenite), and the count at the last ping.
    written: Arc<AtomicU64>,
    written_at_ping: u64,
    metrics: Arc<Metrics>,
}

impl<S> WsBytes<S> {
    fn new(ws: WebSocketStream<TokioAdapter<Counted<S>>>, written: Arc<AtomicU64>, metrics: Arc<Metrics>) -> Self {
        WsBytes {
            ws,
            pending: Bytes::new(),
            unanswered: 0,
            written,
            written_at_ping: 0,
            metrics,
        }
    }

    fn violation(&self, v: Violation) -> io::Error {
        Metrics::inc(&self.metrics.websocket_violations);
        io::Error::new(io::ErrorKind::InvalidData, v.to_string())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsBytes<S> {
    /// After a ping: push its pong out. A peer that never reads fills the socket, and nothing
    /// goes out any more; after [`MAX_UNANSWERED_PINGS`] pings of those it is cut off. A slow
    /// reader takes some bytes between pings and is not.
    fn answer_ping(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let pending = match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(e)) => return Err(self.io_error(e)),
            Poll::Pending => true,
        };
        let written = self.written.load(Ordering::Relaxed);
        let moved = written != self.written_at_ping;
        self.written_at_ping = written;
        if pending && !moved {
            self.unanswered += 1;
        } else {
            self.unanswered = 0;
        }
        if self.unanswered > MAX_UNANSWERED_PINGS {
            return Err(self.violation(Violation::PingsUnread));
        }
        Ok(())
    }

    fn io_error(&self, e: WsError) -> io::Error {
        match e {
            WsError::Io(e) => e,
            WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
            // The peer went away without a close handshake: common, and no attack.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => io::ErrorKind::UnexpectedEof.into(),
            // Our own writes are chunked to fit: never the peer's doing.
            WsError::WriteBufferFull(_) => io::Error::other("WebSocket write buffer full"),
            other => {
                Metrics::inc(&self.metrics.websocket_violations);
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {other}", Violation::Protocol))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        for _ in 0..MESSAGES_PER_POLL {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let msg = match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // The close handshake is done, or the socket ended: end of stream.
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(this.io_error(e))),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Binary(b) => this.pending = b,
                Message::Ping(_) => this.answer_ping(cx)?,
                // tungstenite queued the reply to a Close; the next poll ends the stream.
                Message::Pong(_) | Message::Close(_) => {}
                Message::Text(_) => return Poll::Ready(Err(this.violation(Violation::Text))),
                Message::Frame(_) => return Poll::Ready(Err(this.violation(Violation::Protocol))),
            }
        }
        // Many messages without a byte of MQTT: let the other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    /// Sends at most [`CHUNK`] bytes as one binary message, once everything before it (a pong
    /// included) is out of the write buffer.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = ready!(Pin::new(&mut this.ws).poll_flush(cx)) {
            return Poll::Ready(Err(this.io_error(e)));
        }
        let n = buf.len().min(CHUNK);
        match Pin::new(&mut this.ws).start_send(Message::binary(buf[..n].to_vec())) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(this.io_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.ws).poll_flush(cx).map_err(|e| this.io_error(e))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.ws).poll_close(cx).map_err(|e| this.io_error(e))
    }
}

/// The socket under tungstenite, counting the bytes written to it: progress a reader shows.
struct Counted<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One masked client frame (RFC 6455 §5.2).
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut f = vec![(fin as u8) << 7 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                f.push(0x80 | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        f.extend(key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    /// The server side over an in-memory pipe of `room` bytes each way; the client's end is raw.
    async fn pair(room: usize) -> (WsBytes<tokio::io::DuplexStream>, tokio::io::DuplexStream, Arc<Metrics>) {
        let (client, server) = tokio::io::duplex(room);
        let metrics = Arc::new(Metrics::default());
        (upgraded(server, 1024, metrics.clone()).await, client, metrics)
    }

    /// Reads to the end or the first error, as the connection's reader would.
    async fn read_all(ws: &mut WsBytes<tokio::io::DuplexStream>) -> (Vec<u8>, Option<io::Error>) {
        let mut out = vec![];
        let mut buf = [0u8; 97];
        loop {
            match ws.read(&mut buf).await {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn a_ping_flood_from_a_peer_that_never_reads_ends_its_stream_only() {
        // Issue 29, point 1: 125-byte pings, 50 per write, pongs never read. The old adapter
        // recursed once per control frame and overflowed the stack.
        let (mut ws, mut client, metrics) = pair(64 * 1024).await;
        let ping = frame(true, 0x9, &[0xa5; 125]);
        let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 50).collect();
        let flood = tokio::spawn(async move {
            for _ in 0..2000 {
                if client.write_all(&burst).await.is_err() {
                    return;
                }
            }
            // Keep the pipe open: the server must end it, not the end of the input.
            std::future::pending::<()>().await
        });
        let (data, err) = tokio::time::timeout(std::time::Duration::from_secs(20), read_all(&mut ws))
            .await
            .expect("the flood did not end the stream");
        flood.abort();
        assert!(
            data.is_empty(),
            "ping payloads must never reach MQTT: {} bytes",
            data.len()
        );
        let err = err.expect("a peer that never reads its pongs is cut off");
        assert_eq!(err.to_string(), Violation::PingsUnread.to_string());
        assert_eq!(Metrics::get(&metrics.websocket_violations), 1);
    }

    #[tokio::test]
    async fn pings_from_a_peer_that_reads_are_answered_and_data_flows() {
        let (mut ws, client, _) = pair(4096).await;
        let (mut rd, mut wr) = tokio::io::split(client);
        // The client reads everything the server sends (its pongs) while it pings a lot.
        let reader = tokio::spawn(async move {
            let mut n = 0usize;
            let mut buf = [0u8; 4096];
            while let Ok(k) = rd.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k;
            }
            n
        });
        let mut wire = vec![];
        for i in 0..5000u32 {
            wire.extend(frame(true, 0x9, &i.to_be_bytes()));
        }
        wire.extend(frame(true, 0x2, b"mqtt bytes"));
        wire.extend(frame(true, 0x8, &[0x03, 0xe8]));
        let writer = tokio::spawn(async move { wr.write_all(&wire).await.map(|_| wr) });
        let (data, err) = read_all(&mut ws).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(data, b"mqtt bytes");
        drop(ws);
        let _wr = writer.await.unwrap().unwrap();
        let pongs = reader.await.unwrap();
        // Each pong is 6 bytes (2 header + 4 payload); tungstenite may answer only the latest of
        // pings that came in together, so at least one came back, and the close reply.
        assert!(pongs >= 6 + 4, "no pong came back ({pongs} bytes)");
    }

    #[tokio::test]
    async fn text_frames_and_oversized_frames_close_the_stream_and_are_counted() {
        for (wire, want) in [
            (frame(true, 0x1, b"hello"), Violation::Text.to_string()),
            (frame(true, 0x2, &[0u8; 4096]), Violation::Protocol.to_string()),
            // Unmasked client frame.
            (vec![0x82, 0x01, 0x00], Violation::Protocol.to_string()),
        ] {
            let (mut ws, mut client, metrics) = pair(64 * 1024).await;
            client.write_all(&wire).await.unwrap();
            let (data, err) = read_all(&mut ws).await;
            assert!(data.is_empty());
            let err = err.expect("refused");
            assert!(err.to_string().starts_with(&want), "{err} is not {want}");
            assert_eq!(Metrics::get(&metrics.websocket_violations), 1);
        }
    }

    #[tokio::test]
    async fn writes_are_binary_messages() {
        let (mut ws, mut client, _) = pair(64 * 1024).await;
        ws.write_all(&[0x20, 2, 0, 0]).await.unwrap();
        ws.flush().await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x82, 4, 0x20, 2, 0, 0]);
    }

    #[tokio::test]
    async fn a_write_larger_than_the_write_buffer_goes_out_whole_in_chunks() {
        // The attack review's D1: a batch of deliveries over the write buffer's cap was refused
        // (and counted as the peer's fault).
        let (mut ws, mut client, metrics) = pair(1 << 20).await;
        let big: Vec<u8> = (0..300 * 1024u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            ws.write_all(&sent).await.unwrap();
            ws.flush().await.unwrap();
            ws
        });
        // Server frames: 0x82, then a 16- or 64-bit length, then the payload.
        let mut got = vec![];
        while got.len() < big.len() {
            let mut h = [0u8; 2];
            client.read_exact(&mut h).await.unwrap();
            assert_eq!(h[0], 0x82, "a binary message");
            let len = match h[1] {
                126 => client.read_u16().await.unwrap() as usize,
                127 => client.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            assert!(len <= CHUNK);
            let mut p = vec![0u8; len];
            client.read_exact(&mut p).await.unwrap();
            got.extend(p);
        }
        writer.await.unwrap();
        assert!(got == big, "the bytes arrived changed");
        assert_eq!(Metrics::get(&metrics.websocket_violations), 0);
    }

    #[tokio::test]
    async fn a_slow_reader_that_pings_is_not_taken_for_one_that_never_reads() {
        // The attack review's D3: deliveries backed up behind a slow reader made every ping
        // count as unanswered.
        let (ws, client, metrics) = pair(8 * 1024).await;
        let (mut srd, mut swr) = tokio::io::split(ws);
        let (mut crd, mut cwr) = tokio::io::split(client);
        let pinger = tokio::spawn(async move {
            for i in 0..1000u32 {
                let five: Vec<u8> = (0..5)
                    .flat_map(|k| frame(true, 0x9, &(i * 5 + k).to_be_bytes()))
                    .collect();
                if cwr.write_all(&five).await.is_err() {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Some(cwr)
        });
        // The server side reads (and so answers pings) while it writes 512 KiB, both halves in
        // one task as a connection runs them.
        let server = tokio::spawn(async move {
            let reader = async {
                let mut b = [0u8; 64];
                loop {
                    match srd.read(&mut b).await {
                        Ok(0) => return,
                        Ok(_) => continue,
                        Err(e) => panic!("the server's read failed: {e}"),
                    }
                }
            };
            let data = vec![1u8; 512 << 10];
            let writer = swr.write_all(&data);
            tokio::select! {
                _ = reader => panic!("the reader ended first"),
                w = writer => w,
            }
        });
        // The client reads slowly: 1 KiB every millisecond or so, for half a second and more.
        let mut n = 0usize;
        let mut b = vec![0u8; 1024];
        while n < 512 << 10 {
            match crd.read(&mut b).await.unwrap() {
                0 => break,
                k => n += k,
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let _ = pinger.await;
        assert_eq!(
            Metrics::get(&metrics.websocket_violations),
            0,
            "a slow reader was cut off"
        );
        server.await.unwrap().unwrap();
        assert_eq!(
            Metrics::get(&metrics.websocket_violations),
            0,
            "a slow reader was cut off"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Data(Vec<u8>),
        Fragmented(Vec<u8>, usize),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Op::Data),
            (proptest::collection::vec(any::<u8>(), 2..300), 1usize..8).prop_map(|(d, k)| Op::Fragmented(d, k)),
            proptest::collection::vec(any::<u8>(), 0..126).prop_map(Op::Ping),
            proptest::collection::vec(any::<u8>(), 0..126).prop_map(Op::Pong),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever mix of data, fragments and control frames a client sends, the bytes read
        /// are exactly its binary payloads, in order.
        #[test]
        fn the_byte_stream_is_the_binary_payloads_in_order(ops in proptest::collection::vec(op(), 0..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut ws, client, _) = pair(1 << 20).await;
                let (_rd, mut wr) = tokio::io::split(client);
                let mut wire = vec![];
                let mut want: Vec<u8> = vec![];
                for op in &ops {
                    match op {
                        Op::Data(d) => { wire.extend(frame(true, 0x2, d)); want.extend(d); }
                        Op::Fragmented(d, k) => {
                            let parts: Vec<&[u8]> = d.chunks(d.len().div_ceil(*k)).collect();
                            for (i, p) in parts.iter().enumerate() {
                                let opcode = if i == 0 { 0x2 } else { 0x0 };
                                wire.extend(frame(i + 1 == parts.len(), opcode, p));
                            }
                            want.extend(d);
                        }
                        Op::Ping(d) => wire.extend(frame(true, 0x9, d)),
                        Op::Pong(d) => wire.extend(frame(true, 0xa, d)),
                    }
                }
                wire.extend(frame(true, 0x8, &[0x03, 0xe8]));
                wr.write_all(&wire).await.unwrap();
                let (data, err) = read_all(&mut ws).await;
                prop_assert!(err.is_none(), "{:?}", err);
                prop_assert_eq!(data, want);
                Ok(())
            })?;
        }
    }

    /// A mutation fuzzer over client frame sequences (cut, bit-flipped, spliced, lengths and
    /// opcodes rewritten): no panic, an end in bounded time, and never more bytes out than in.
    /// The normal run tries a few thousand; `OUTPOST_FUZZ_CASES=N` runs N (`.ci/test --fuzz`).
    #[test]
    fn mutated_frames_never_panic_or_hang_the_websocket_layer() {
        use rand::{Rng, SeedableRng};
        let cases: u64 = std::env::var("OUTPOST_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3_000);
        let corpus: Vec<Vec<u8>> = vec![
            frame(true, 0x2, &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0]),
            frame(false, 0x2, b"part"),
            frame(true, 0x0, b"end"),
            frame(true, 0x9, &[1; 125]),
            frame(true, 0xa, b"pong"),
            frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e']),
            frame(true, 0x1, b"text"),
            frame(true, 0x2, &[7; 300]),
            frame(true, 0x2, &[]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(cases ^ 0x7773);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut ended_clean, mut cut, mut refused) = (0u64, 0u64, 0u64);
        for _ in 0..cases {
            let mut input = vec![];
            for _ in 0..rng.random_range(1..6) {
                let mut f = corpus[rng.random_range(0..corpus.len())].clone();
                for _ in 0..rng.random_range(0..4) {
                    let n = f.len();
                    match rng.random_range(0..5) {
                        0 => f[rng.random_range(0..n)] ^= 1 << rng.random_range(0..8),
                        1 => f.truncate(rng.random_range(1..=n)),
                        2 => f[0] = rng.random(),
                        3 if n > 1 => f[1] = rng.random(),
                        _ => f.insert(rng.random_range(0..=n), rng.random()),
                    }
                }
                input.extend(f);
            }
            if rng.random_bool(0.3) {
                input.extend(frame(true, 0x8, &[0x03, 0xe8]));
            }
            let (data, err, violations) = rt.block_on(async {
                let (mut ws, mut client, metrics) = pair(1 << 16).await;
                client.write_all(&input).await.unwrap();
                // End of input, the way back still open for pongs and the close reply.
                client.shutdown().await.unwrap();
                let (data, err) = tokio::time::timeout(std::time::Duration::from_secs(5), read_all(&mut ws))
                    .await
                    .expect("the websocket layer hung on a finite input");
                (data, err, Metrics::get(&metrics.websocket_violations))
            });
            assert!(data.len() <= input.len(), "more bytes out than in");
            match err {
                None => ended_clean += 1,
                Some(e) if e.kind() == io::ErrorKind::UnexpectedEof => cut += 1,
                Some(_) => {
                    assert_eq!(violations, 1, "a refusal is counted once");
                    refused += 1
                }
            }
        }
        eprintln!(
            "websocket fuzz: {cases} inputs: {ended_clean} closed cleanly, {cut} cut short, {refused} refused; no panic"
        );
        assert!(refused > 0 && ended_clean > 0 && cut > 0);
    }
}
