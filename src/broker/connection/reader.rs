//! Client to broker: frames off the socket, each handed to its packet's handler in order; acks
//! go to the writer once whatever must be durable first (bridge spools, persistent sessions)
//! has committed. While the queues hold the memory budget, PUBLISHes (and what follows them)
//! are held back, and past [`HOLD_MAX`] the socket is not read (TCP pushes back).

use super::handlers::{on_packet, ReadState, Step};
use super::{Ctx, End, Out};
use crate::broker::codec::{self, AckCode, Frame, FrameError, Goodbye, Proto};
use crate::broker::metrics::Metrics;
use bytes::BytesMut;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Why a connection ends when a durable copy of its publish failed (it is not acknowledged:
/// the client publishes it again on its next connection).
const STORE_FAILED: &str = "a bridge spool or the session store could not store a message";

/// Bytes of packets a reader holds back at most while the budget is full before it stops
/// reading the socket.
const HOLD_MAX: usize = 64 * 1024;

/// Durable copies one round of the reader waits for at most before it acknowledges them.
const GATHER_MAX: usize = 1024;

/// What one round of the reader gathers before it hands acks over.
#[derive(Default)]
struct Batch {
    acks: Vec<Ack>,
    waits: Vec<oneshot::Receiver<()>>,
}

/// A reply waiting to go out. A PUBLISH's ack says which of the batch's waits are its own
/// (those before `waits_end` and after the previous PUBLISH's): it goes out only if all of
/// them fired.
struct Ack {
    bytes: bytes::Bytes,
    publish: Option<PublishAck>,
}

struct PublishAck {
    qos: u8,
    pkid: u16,
    waits_end: usize,
}

/// The reader half of one connection.
struct Reader<'a, R> {
    ctx: &'a Ctx,
    crd: R,
    cbuf: BytesMut,
    tx: mpsc::Sender<Out>,
    st: ReadState,
    /// Packets held back while the queues hold the memory budget: PUBLISHes, and whatever came
    /// after one (order matters for those). Acks of our deliveries are never held: they are
    /// what frees the budget.
    held: VecDeque<Frame>,
    held_bytes: usize,
}

/// Runs the reader until the connection ends; returns how.
pub(super) async fn reader<R: AsyncRead + Unpin>(ctx: &Ctx, crd: R, cbuf: BytesMut, tx: mpsc::Sender<Out>) -> End {
    let mut r = Reader {
        ctx,
        crd,
        cbuf,
        tx,
        st: ReadState::default(),
        held: VecDeque::new(),
        held_bytes: 0,
    };
    loop {
        if let Err(end) = r.round().await {
            return end;
        }
        if r.held_bytes > HOLD_MAX {
            // Enough held: stop reading this client (TCP pushes back) until the budget frees.
            ctx.shared.router.wait_for_budget().await;
            continue;
        }
        if let Err(end) = r.read().await {
            return end;
        }
    }
}

impl<R: AsyncRead + Unpin> Reader<'_, R> {
    /// Handles what is buffered (and what the client has already sent besides, while durable
    /// copies are to be waited for), then hands the round's acks over.
    async fn round(&mut self) -> Result<(), End> {
        let mut b = Batch::default();
        self.st.unacked = 0;
        loop {
            self.take_frames(&mut b).await?;
            self.release_held(&mut b).await?;
            // Durable copies to wait for: first take in what the client has already sent, so
            // one spool commit covers its whole window (a read holds only a few 1 KiB
            // publishes, and each wait is a commit).
            if b.waits.is_empty() || !self.held.is_empty() || b.waits.len() >= GATHER_MAX {
                break;
            }
            match ready_now(self.crd.read_buf(&mut self.cbuf)).await {
                None => break,
                Some(Ok(0)) => {
                    flush_acks(self.ctx, &self.tx, &mut b).await;
                    return Err(End::ClientClosed);
                }
                Some(Ok(n)) => Metrics::add(&self.ctx.shared.metrics.bytes_in, n as u64),
                Some(Err(e)) => return Err(End::ClientGone(format!("read: {e}"))),
            }
        }
        if !flush_acks(self.ctx, &self.tx, &mut b).await {
            return Err(End::ClientGone(STORE_FAILED.into()));
        }
        Ok(())
    }

    /// Cuts and handles every whole frame in the buffer, holding back what must wait for the
    /// budget.
    async fn take_frames(&mut self, b: &mut Batch) -> Result<(), End> {
        let router = &self.ctx.shared.router;
        let max = self.ctx.shared.limits.max_packet_size.0 as usize;
        loop {
            let frame = match codec::next_frame(&mut self.cbuf, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    super::login::count_bad(&self.ctx.shared.metrics, &e);
                    let why = match e {
                        FrameError::TooLarge(_) => Goodbye::PacketTooLarge,
                        FrameError::Malformed(_) => Goodbye::Malformed,
                    };
                    let _ = self.tx.send(Out::Close(why, End::Protocol("bad packet"))).await;
                    return Err(End::Protocol("bad packet"));
                }
            };
            let ack_of_ours = matches!(
                frame.kind,
                codec::kind::PUBACK | codec::kind::PUBREC | codec::kind::PUBCOMP | codec::kind::PINGREQ
            );
            let publish_held = frame.kind == codec::kind::PUBLISH && router.over_budget();
            if !ack_of_ours && (!self.held.is_empty() || publish_held) {
                self.held_bytes += frame.bytes.len();
                self.held.push_back(frame);
                continue;
            }
            self.handle(frame, b).await?;
        }
    }

    /// Handles the held-back packets the budget now lets through, in order.
    async fn release_held(&mut self, b: &mut Batch) -> Result<(), End> {
        let router = &self.ctx.shared.router;
        while let Some(f) = self.held.front() {
            if f.kind == codec::kind::PUBLISH && router.over_budget() {
                break;
            }
            let f = self.held.pop_front().expect("front exists");
            self.held_bytes -= f.bytes.len();
            self.handle(f, b).await?;
        }
        Ok(())
    }

    /// Reads more from the client (or wakes when the budget frees for held packets), within
    /// 1.5 times its keep-alive [MQTT-3.1.2-24].
    async fn read(&mut self) -> Result<(), End> {
        let ctx = self.ctx;
        let idle = (ctx.keep_alive > 0).then(|| Duration::from_millis(ctx.keep_alive as u64 * 1500));
        let held = !self.held.is_empty();
        let read = async {
            tokio::select! {
                r = self.crd.read_buf(&mut self.cbuf) => Some(r),
                _ = ctx.shared.router.budget_freed(), if held => None,
            }
        };
        let n = match idle {
            Some(d) if !held => match timeout(d, read).await {
                Ok(r) => r,
                Err(_) => {
                    let end = || End::ClientGone("keep-alive timeout".into());
                    let _ = self.tx.send(Out::Close(Goodbye::KeepAliveTimeout, end())).await;
                    return Err(end());
                }
            },
            _ => read.await,
        };
        match n {
            None => Ok(()),
            Some(Ok(0)) => Err(End::ClientClosed),
            Some(Ok(n)) => {
                Metrics::add(&ctx.shared.metrics.bytes_in, n as u64);
                Ok(())
            }
            Some(Err(e)) => Err(End::ClientGone(format!("read: {e}"))),
        }
    }

    /// Handles one packet; an `Err` ends the connection.
    async fn handle(&mut self, frame: Frame, b: &mut Batch) -> Result<(), End> {
        let step = on_packet(self.ctx, &mut self.st, &frame, &mut b.waits);
        match step {
            Step::Reply(r) => {
                b.acks.push(Ack {
                    bytes: r,
                    publish: None,
                });
                return Ok(());
            }
            Step::Accepted { qos, pkid } => {
                let bytes = codec::publish_ack(self.ctx.proto, qos, pkid, AckCode::Success);
                let waits_end = b.waits.len();
                let publish = Some(PublishAck { qos, pkid, waits_end });
                b.acks.push(Ack { bytes, publish });
                return Ok(());
            }
            Step::Nothing => return Ok(()),
            _ => {}
        }
        // Whatever comes next goes out after the acks of what came before it.
        if !flush_acks(self.ctx, &self.tx, b).await {
            // A normal DISCONNECT stays one (its will is discarded); anything else ends here.
            return Err(match step {
                Step::End(End::Disconnected) => End::Disconnected,
                _ => End::ClientGone(STORE_FAILED.into()),
            });
        }
        match step {
            Step::SubAck(r, retained) => match self.tx.send(Out::SubAck(r, retained)).await {
                Ok(()) => Ok(()),
                Err(_) => Err(End::ClientGone("writer ended".into())),
            },
            Step::Close(why, what) => {
                let _ = self.tx.send(Out::Close(why, End::Protocol(what))).await;
                Err(End::Protocol(what))
            }
            Step::End(end) => Err(end),
            Step::Reply(_) | Step::Accepted { .. } | Step::Nothing => Ok(()),
        }
    }
}

/// The output of `f` if it is ready without waiting; `None` (and `f` dropped) if not.
async fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// Waits for the durable copies, then hands the acks to the writer. A PUBLISH whose copies
/// could not all be kept (a full disk) is not acknowledged: an MQTT 5 client is told so
/// (PUBACK or PUBREC 0x97, quota exceeded), and the batch goes on; for a 3.1.1 client, which
/// has no such ack, false is returned and the connection ends (it will publish again).
async fn flush_acks(ctx: &Ctx, tx: &mpsc::Sender<Out>, b: &mut Batch) -> bool {
    let mut kept = Vec::with_capacity(b.waits.len());
    for w in b.waits.drain(..) {
        kept.push(w.await.is_ok());
    }
    let mut from = 0;
    for a in b.acks.drain(..) {
        let bytes = match a.publish {
            Some(p) if !kept[from..p.waits_end].iter().all(|k| *k) => {
                from = p.waits_end;
                Metrics::inc(&ctx.shared.metrics.publishes_not_kept);
                if ctx.proto == Proto::V4 {
                    return false;
                }
                if p.qos == 2 {
                    // The exchange ends with this PUBREC: no PUBREL follows.
                    ctx.session.lock().incoming_qos2.remove(&p.pkid);
                }
                codec::publish_ack(ctx.proto, p.qos, p.pkid, AckCode::QuotaExceeded)
            }
            Some(p) => {
                from = p.waits_end;
                a.bytes
            }
            None => a.bytes,
        };
        if tx.send(Out::Bytes(bytes)).await.is_err() {
            return false;
        }
    }
    true
}
