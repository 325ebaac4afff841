//! Broker to client: resend what was in flight, then write the reader's replies and the
//! session's deliveries, within the client's Receive Maximum and Maximum Packet Size, with
//! topic aliases toward MQTT 5 clients that allow them. A client that does not read for 1.5
//! times its keep-alive (at least 30 s) is given up.

use super::{Ctx, End, Out};
use crate::broker::codec::{self, Goodbye, OutPublish, Proto};
use crate::broker::metrics::Metrics;
use crate::broker::router::session::{Delivery, Taken};
use crate::system::clock::now_ms;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Deliveries the writer takes from the session per round, and the bytes they may cost (one
/// delivery at least): a round is written before the next is taken, so what one connection
/// holds outside its session's queue stays near this.
const TAKE_BATCH: usize = 256;
const TAKE_BYTES: usize = 256 * 1024;

/// Why the writer stops: the goodbye to send first (MQTT 5), and how the connection ended.
type Closing = (Option<Goodbye>, End);

/// The writer half of one connection.
struct Writer<'a, W> {
    ctx: &'a Ctx,
    cwr: W,
    out: BytesMut,
    /// Topic aliases this connection set toward the client.
    aliases: HashMap<Arc<str>, u16>,
    /// How long a client may go without reading (a write that does not finish) or, while
    /// messages wait behind its full window, without acknowledging.
    write_timeout: Duration,
    /// The session's delivered count when it last moved, and when that was.
    progress: (u64, tokio::time::Instant),
    /// Bytes of QoS 0 (and dropped) deliveries taken but not yet written: they go back to the
    /// budget once the write is done, so what sits in this connection's buffer is counted.
    unreleased: usize,
}

/// Runs the writer until the connection ends; returns how.
pub(super) async fn writer<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    cwr: W,
    mut rx: mpsc::Receiver<Out>,
    stop: CancellationToken,
    (kick, taken_over): (CancellationToken, Arc<AtomicBool>),
) -> End {
    let mut w = Writer {
        ctx,
        cwr,
        out: BytesMut::new(),
        aliases: HashMap::new(),
        write_timeout: Duration::from_secs((ctx.keep_alive as u64 * 3 / 2).max(30)),
        progress: (0, tokio::time::Instant::now()),
        unreleased: 0,
    };
    if !w.resume() {
        return End::TakenOver;
    }
    // The first round takes without waiting: a resumed session may hold queued messages that
    // no wake-up announces (restored from the store, or queued while it was away).
    let mut first = true;
    loop {
        let mut closing = None;
        if w.out.is_empty() && !std::mem::take(&mut first) {
            closing = w.wait(&mut rx, &stop, &kick, &taken_over).await;
        }
        while closing.is_none() {
            match rx.try_recv() {
                Ok(o) => closing = w.take_out(o),
                Err(mpsc::error::TryRecvError::Empty) => break,
                // The reader is gone: write what it left, nothing more.
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closing = Some((None, End::ClientGone("reader ended".into())))
                }
            }
        }
        if let Some((why, end)) = closing {
            return w.close(why, end).await;
        }
        // Deliveries, as many as the window allows, in rounds so one write stays bounded.
        match ctx
            .session
            .take_bytes(ctx.gen, ctx.receive_max, (TAKE_BATCH, TAKE_BYTES), |d| ctx.check(d))
        {
            // A newer connection holds the session (tell this client why it is closed), or the
            // session ended under a closing connection (DISCONNECT with expiry 0).
            None if taken_over.load(Ordering::Relaxed) => {
                return w.close(Some(Goodbye::SessionTakenOver), End::TakenOver).await
            }
            None => return w.close(None, End::Disconnected).await,
            Some(t) => w.deliver(t),
        }
        Metrics::add(&ctx.shared.metrics.bytes_out, w.out.len() as u64);
        if let Err(e) = w.flush().await {
            return End::ClientGone(format!("write: {e}"));
        }
    }
}

impl<W> Drop for Writer<'_, W> {
    /// A writer dropped mid-write (the connection's task ended) gives back what it held.
    fn drop(&mut self) {
        self.ctx.shared.router.release(std::mem::take(&mut self.unreleased));
    }
}

impl<W: AsyncWrite + Unpin> Writer<'_, W> {
    /// Takes the session's inflight deliveries to resend first (DUP, or PUBREL); false when a
    /// newer connection holds the session already.
    fn resume(&mut self) -> bool {
        let ctx = self.ctx;
        let Some(resume) = ctx.session.resume(ctx.gen, ctx.receive_max, |d| ctx.check(d)) else {
            return false;
        };
        ctx.shared.router.release(resume.freed);
        for id in resume.dropped_ids {
            ctx.shared.router.done(id);
        }
        let now = now_ms();
        for f in resume.resend {
            if f.released {
                self.out.extend_from_slice(&codec::pubrel(f.pkid));
            } else {
                self.encode(&f.d, f.pkid, true, now);
            }
        }
        true
    }

    /// Waits for something to write: the reader's replies first, then the session's wake-up;
    /// returns a closing when the gateway stops, the login ends or the session is taken over.
    async fn wait(
        &mut self,
        rx: &mut mpsc::Receiver<Out>,
        stop: &CancellationToken,
        kick: &CancellationToken,
        taken_over: &AtomicBool,
    ) -> Option<Closing> {
        let session = &self.ctx.session;
        let delivered = session.delivered.load(Ordering::Relaxed);
        if delivered != self.progress.0 {
            self.progress = (delivered, tokio::time::Instant::now());
        }
        // Messages wait behind a window the client never frees: it is given up as one that
        // does not read, and its session keeps what waits (or ends, if clean).
        let blocked = {
            let st = session.lock();
            !st.queue.is_empty() && st.inflight.len() >= self.ctx.receive_max
        };
        let stuck_at = self.progress.1 + self.write_timeout;
        tokio::select! {
            // The reader's replies first: once it is gone, nothing more is taken to write.
            biased;
            o = rx.recv() => match o {
                Some(o) => self.take_out(o),
                None => Some((None, End::ClientGone("reader ended".into()))),
            },
            _ = self.ctx.session.notify.notified() => None,
            _ = tokio::time::sleep_until(stuck_at), if blocked => {
                let why = format!("no acknowledgement in {:?} while messages wait", self.write_timeout);
                Some((None, End::ClientGone(why)))
            }
            _ = stop.cancelled() => Some((Some(Goodbye::ShuttingDown), End::Shutdown)),
            _ = kick.cancelled() => Some(if taken_over.load(Ordering::Relaxed) {
                (Some(Goodbye::SessionTakenOver), End::TakenOver)
            } else {
                (Some(Goodbye::NotAuthorized), End::Protocol("credentials revoked or access ended"))
            }),
        }
    }

    /// Handles one message from the reader; returns a closing if it asks for one.
    fn take_out(&mut self, o: Out) -> Option<Closing> {
        match o {
            Out::Bytes(b) => {
                self.out.extend_from_slice(&b);
                None
            }
            Out::SubAck(b, retained) => {
                self.out.extend_from_slice(&b);
                for (t, msg) in retained {
                    self.ctx.shared.router.push(&t, &msg, true, None);
                }
                None
            }
            Out::Close(why, end) => Some((Some(why), end)),
        }
    }

    /// Encodes one round of deliveries taken from the session and counts what was dropped.
    fn deliver(&mut self, t: Taken) {
        let ctx = self.ctx;
        let router = &ctx.shared.router;
        self.unreleased += t.freed;
        router.dropped_too_large.fetch_add(t.too_large, Ordering::Relaxed);
        router.dropped_expired.fetch_add(t.expired, Ordering::Relaxed);
        router.dropped_denied.fetch_add(t.denied, Ordering::Relaxed);
        let more = t.out.len() + t.again.len() == TAKE_BATCH || t.bytes >= TAKE_BYTES;
        let now = now_ms();
        for (pkid, d) in &t.again {
            self.encode(d, *pkid, true, now);
        }
        for id in &t.dropped_ids {
            router.done(*id);
        }
        if let Some(store) = ctx.store() {
            for (pkid, d) in t.out.iter().filter(|(_, d)| d.store_id != 0) {
                store.sent(d.store_id, *pkid);
            }
        }
        for (pkid, d) in &t.out {
            self.encode(d, *pkid, false, now);
            if d.qos == 0 {
                ctx.session.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        Metrics::add(&ctx.shared.metrics.publishes_out, (t.out.len() + t.again.len()) as u64);
        if more {
            // Come back for the rest without waiting for a wake-up.
            ctx.session.notify.notify_one();
        }
    }

    /// Appends one delivery as a PUBLISH, with a topic alias where the client allows them.
    fn encode(&mut self, d: &Delivery, pkid: u16, dup: bool, now: i64) {
        let ctx = self.ctx;
        let alias = if ctx.alias_max > 0 && ctx.proto == Proto::V5 {
            match self.aliases.get(&d.msg.topic) {
                Some(a) => Some((*a, false)),
                None if (self.aliases.len() as u16) < ctx.alias_max => {
                    let a = self.aliases.len() as u16 + 1;
                    self.aliases.insert(d.msg.topic.clone(), a);
                    Some((a, true))
                }
                None => None,
            }
        } else {
            None
        };
        let p = OutPublish {
            msg: &d.msg,
            qos: d.qos,
            pkid,
            dup,
            retain: d.retain,
            sub_ids: &d.sub_ids,
            alias,
            expiry_left: d.msg.expiry_left(now),
        };
        codec::encode_publish(ctx.proto, &p, &mut self.out);
    }

    /// Writes the goodbye (if the protocol has one) and what is left, then closes.
    async fn close(&mut self, why: Option<Goodbye>, end: End) -> End {
        if let Some(d) = why.and_then(|w| codec::disconnect(self.ctx.proto, w)) {
            self.out.extend_from_slice(&d);
        }
        let _ = self.flush().await;
        let _ = timeout(Duration::from_secs(1), self.cwr.shutdown()).await;
        end
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let r = self.write_out().await;
        // Written, or given up on (the connection ends): either way no longer held here.
        self.ctx.shared.router.release(std::mem::take(&mut self.unreleased));
        r
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let (w, buf) = (&mut self.cwr, &mut self.out);
        let res = timeout(self.write_timeout, async {
            w.write_all(buf).await?;
            w.flush().await
        })
        .await;
        buf.clear();
        match res {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client did not read")),
        }
    }
}
