//! One task per client connection: log in (`login`: CONNECT, authentication, the session
//! attached, CONNACK), then run two halves side by side: the reader (`reader`: frames off the
//! socket, each to its packet's handler in `handlers/`, acks once the durable copies are kept)
//! and the writer (`writer`: the session's queue and the reader's replies to the socket).
//! Neither half waits for the other except through a bounded channel, and whatever goes wrong
//! on this connection ends this connection only.

mod handlers;
mod login;
mod reader;
mod writer;

use super::auth::Identity;
use super::codec::{self, Goodbye, Proto};
use super::metrics::Metrics;
use super::router::message::Message;
use super::router::session::{Delivery, DropReason, Session};
use super::router::Target;
use super::{admission, Right, Shared};
pub use login::before_login;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// MQTT 5 topic aliases a client may set: bounds what aliases cost.
const TOPIC_ALIAS_MAX: u16 = 32;
/// Topic aliases the broker uses toward a client at most, whatever it allows.
const OUR_ALIAS_MAX: u16 = 64;
/// How long the writer gets to write what the reader left when the reader ends.
const WRITER_DRAIN: Duration = Duration::from_secs(2);

/// Per-listener facts a connection needs.
#[derive(Clone, Debug)]
pub struct ListenerInfo {
    pub name: String,
    /// The listener's `bind` as configured (ACL rules can name it).
    pub bind: String,
    pub anonymous: bool,
}

/// The session key of a client: user and client id. Clients of different users never share a
/// session, and no client's key can equal the gateway's own (which start with `$`).
pub fn session_key(username: Option<&str>, client_id: &str) -> String {
    let u = username
        .unwrap_or("")
        .replace('%', "%25")
        .replace(':', "%3A")
        .replace('$', "%24");
    format!("{u}:{client_id}")
}

/// How a connection ended.
enum End {
    /// The client closed the socket without DISCONNECT.
    ClientClosed,
    /// Read or write failure, keep-alive timeout, a client that stopped reading.
    ClientGone(String),
    Disconnected,
    /// MQTT 5 DISCONNECT with a reason other than 0x00 (0x04 or an error): the will goes.
    DisconnectWithWill,
    Protocol(&'static str),
    TakenOver,
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => write!(f, "client closed the connection"),
            End::ClientGone(why) => write!(f, "client gone: {why}"),
            End::Disconnected => write!(f, "client disconnected"),
            End::DisconnectWithWill => write!(f, "client disconnected with its will"),
            End::Protocol(why) => write!(f, "closed by the gateway: {why}"),
            End::TakenOver => write!(f, "session taken over by a new connection"),
            End::Shutdown => write!(f, "gateway shutting down"),
        }
    }
}

impl End {
    /// Did the connection end without a normal DISCONNECT (so the will is published)?
    fn fires_will(&self) -> bool {
        !matches!(self, End::Disconnected)
    }
}

/// Serves one client from its first byte to its close. `deadline` bounds everything before
/// CONNACK (handshakes included, which the caller ran under the same deadline); `prelogin`
/// is held until then.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    listener: ListenerInfo,
    shared: Arc<Shared>,
    deadline: Instant,
    stop: CancellationToken,
    prelogin: admission::PreLogin,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut crd, mut cwr) = tokio::io::split(stream);
    let door = login::Door {
        peer,
        listener: &listener,
        shared: &shared,
        deadline,
    };
    let Some(logged_in) = login::login(&door, &mut crd, &mut cwr, prelogin).await else {
        return;
    };
    let login::LoggedIn {
        ctx,
        will,
        conn,
        cbuf,
        _slot: slot,
    } = logged_in;
    let (tx, rx) = mpsc::channel(64);
    // A panic on this connection (a bug) ends this connection only: it is caught here, counted,
    // and the session is let go as for any other end.
    let halves = async {
        let r = reader::reader(&ctx, crd, cbuf, tx);
        let w = writer::writer(&ctx, cwr, rx, stop, (conn.kick.clone(), conn.taken_over.clone()));
        tokio::pin!(r, w);
        tokio::select! {
            end = &mut r => {
                // The reader's last words (acks, a DISCONNECT with its reason) are in the channel,
                // which the reader closed on return: the writer writes them, then closes.
                let _ = timeout(WRITER_DRAIN, &mut w).await;
                end
            }
            end = &mut w => end,
        }
    };
    let end = match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(halves)).await {
        Ok(end) => end,
        Err(_) => {
            Metrics::inc(&shared.metrics.session_panics);
            log::error!(
                "client {:?}: internal error (a panic); connection closed",
                ctx.id.client_id
            );
            End::Protocol("internal error")
        }
    };
    let user = ctx.id.username.clone().unwrap_or_default();
    shared.registry.unregister(&user, conn.id);
    shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    let will = will.filter(|_| end.fires_will());
    shared.detach(&ctx.session, ctx.gen, will);
    drop(slot);
    match &end {
        End::Protocol(_) | End::ClientGone(_) => {
            log::info!("{peer} on {}: client {:?}: {end}", listener.name, ctx.id.client_id)
        }
        _ => log::debug!("{peer} on {}: client {:?}: {end}", listener.name, ctx.id.client_id),
    }
}

/// What both halves of one connection share.
struct Ctx {
    peer: SocketAddr,
    proto: Proto,
    id: Identity,
    /// The keep-alive in force, seconds (0: none).
    keep_alive: u16,
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// This connection's generation of the session: only it may take from the queue.
    gen: u64,
    /// The client's Receive Maximum: QoS 1/2 deliveries in flight toward it at most.
    receive_max: usize,
    /// The client's Maximum Packet Size (0: no limit but the protocol's).
    max_packet: usize,
    /// Topic aliases the broker may use toward this client.
    alias_max: u16,
    /// MQTT 5: a session expiry of 0 at CONNECT may not be raised at DISCONNECT.
    zero_expiry_at_connect: bool,
}

impl Ctx {
    /// Why a delivery may not be written to this client now, if it may not: larger than its
    /// Maximum Packet Size, or a topic it may no longer read (it may have waited in the queue
    /// across an ACL reload or the end of a grant).
    fn check(&self, d: &Delivery) -> Option<DropReason> {
        let size = codec::publish_size(self.proto, &d.msg, d.qos) + 8 * d.sub_ids.len();
        if self.max_packet != 0 && size > self.max_packet {
            return Some(DropReason::TooLarge);
        }
        (!self.shared.access.allows(&self.id, &d.msg.topic, Right::Read)).then_some(DropReason::Denied)
    }

    /// The session store, when this session is kept in it and this connection still holds it
    /// (after a clean start replaced the session, its rows belong to the new one).
    fn store(&self) -> Option<&super::router::store::SessionStore> {
        self.shared
            .router
            .store
            .as_ref()
            .filter(|_| self.session.persisted.load(Ordering::Relaxed) && self.session.lock().gen == self.gen)
    }
}

/// What the reader hands the writer.
enum Out {
    Bytes(bytes::Bytes),
    /// A SUBACK, then the retained messages its subscriptions get, in that order.
    SubAck(bytes::Bytes, Vec<(Target, Arc<Message>)>),
    /// Send the goodbye (MQTT 5), close, and end the connection so.
    Close(Goodbye, End),
}
