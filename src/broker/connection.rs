//! One task per client connection: read CONNECT, authenticate, attach the client's session,
//! then run two halves side by side: the reader (packets from the client: access checks,
//! routing, acks) and the writer (the session's queue and the reader's replies to the socket).
//! Neither half waits for the other except through a bounded channel, and whatever goes wrong
//! on this connection ends this connection only.

use super::auth::Identity;
use super::codec::{self, AckCode, Frame, FrameError, Goodbye, In, OutPublish, Proto, Refusal, SubCode};
use super::metrics::Metrics;
use super::router::message::{now_ms, Message};
use super::router::session::{Delivery, DropReason, Session, SubOpts};
use super::router::{Target, NEVER};
use super::{topics, Right, Shared};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// MQTT 5 topic aliases a client may set: bounds what aliases cost.
const TOPIC_ALIAS_MAX: u16 = 32;
/// Topic aliases the broker uses toward a client at most, whatever it allows.
const OUR_ALIAS_MAX: u16 = 64;
/// The longest keep-alive the broker accepts; MQTT 5 clients asking more are told this one.
const MAX_KEEP_ALIVE: u16 = 3600;
/// How long the writer gets to write what the reader left when the reader ends.
const WRITER_DRAIN: Duration = Duration::from_secs(2);
/// Deliveries the writer takes from the session per round.
const TAKE_BATCH: usize = 256;

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

/// Runs a step before login under the connect deadline; fails early if the socket is evicted
/// for a newer one (see `admission`).
pub async fn before_login<F: std::future::Future>(
    deadline: Instant,
    evict: &CancellationToken,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::select! {
        r = timeout_at(deadline, f) => r,
        // An eviction reads as a deadline: the socket is closed the same way.
        _ = evict.cancelled() => timeout_at(Instant::now(), std::future::pending::<F::Output>()).await,
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
    prelogin: super::admission::PreLogin,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut crd, mut cwr) = tokio::io::split(stream);
    let max = shared.limits.max_packet_size.0 as usize;
    let mut cbuf = BytesMut::with_capacity(1024);

    let first = match before_login(deadline, &prelogin.evict, read_connect(&mut crd, &mut cbuf, max)).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) | Err(_) => {
            Metrics::inc(&shared.metrics.handshakes_failed);
            log::debug!("{peer} on {}: closed or timed out before CONNECT", listener.name);
            return;
        }
        Ok(Err(e)) => {
            count_bad(&shared.metrics, &e);
            log::info!("{peer} on {}: {e} before CONNECT; closing", listener.name);
            return;
        }
    };
    let connect = match check_connect(&first) {
        Ok(c) => c,
        Err((proto, refusal, why)) => {
            Metrics::inc(&shared.metrics.connects_refused);
            shared.events.login_refused(peer, "", None, &why);
            log::info!("{peer} on {}: refused: {why}", listener.name);
            if let Some(proto) = proto {
                let _ = cwr.write_all(&codec::connack_refusal(proto, refusal)).await;
            }
            return;
        }
    };
    let proto = connect.proto;
    let shown_id = format!("{:?}", connect.client_id);
    let refuse = |refusal: Refusal, why: String| {
        Metrics::inc(&shared.metrics.connects_refused);
        shared.events.connect_refused(peer, &connect, &why);
        log::info!("{peer} on {}: client {shown_id} refused: {why}", listener.name);
        codec::connack_refusal(proto, refusal)
    };
    macro_rules! refuse {
        ($r:expr, $why:expr) => {{
            let ack = refuse($r, $why);
            let _ = timeout_at(deadline, cwr.write_all(&ack)).await;
            return;
        }};
    }

    if connect.auth_method.is_some() {
        refuse!(
            Refusal::BadAuthMethod,
            "MQTT 5 enhanced authentication is not offered".into()
        );
    }
    let Some(_slot) = shared.admission.session() else {
        refuse!(Refusal::ServerBusy, "max_connections reached".into());
    };

    // Authentication: argon2 is slow on purpose, so only a few run at once.
    let policy = shared.access.policy();
    let device = connect
        .username
        .as_ref()
        .is_some_and(|u| !policy.has_user(u) && shared.access.device_login(u, "").is_some());
    // Back-off after failed logins, per user and (off loopback) per source address: refused
    // at once, without a password check.
    let source = (!peer.ip().is_loopback()).then(|| peer.ip().to_string());
    if let Some(user) = &connect.username {
        if let Some(left) = shared.admission.login_backoff(source.as_deref(), Some(user)) {
            Metrics::inc(&shared.metrics.logins_throttled);
            refuse!(
                Refusal::BadCredentials,
                format!("too many failed logins as {user:?} or from this address; next try in {left:.1?}")
            );
        }
    }
    // A password check on the blocking pool, a few at once (argon2 is slow on purpose). An
    // unknown user and a device's wrong password cost the same as a wrong password (no timing
    // tells which names exist).
    // Waiting for a slot counts as logging in: an evicted socket (see `admission`) stops waiting
    // and gives its pre-login slot back at once.
    let slow_check = |user: String, pass: String| {
        let (policy, shared, evict) = (policy.clone(), shared.clone(), prelogin.evict.clone());
        async move {
            match before_login(deadline, &evict, shared.admission.password_check()).await {
                Ok(Some(_slot)) => {
                    Metrics::inc(&shared.metrics.password_checks);
                    tokio::task::spawn_blocking(move || {
                        let ok = policy.verify_password(&user, &pass);
                        crate::system::memory::trim();
                        ok
                    })
                    .await
                    .unwrap_or(false)
                }
                _ => false,
            }
        }
    };
    match (&connect.username, &connect.password) {
        (Some(user), pass) if device => {
            // A device from the keystore: a random password, compared in constant time.
            if shared.access.device_login(user, pass.as_deref().unwrap_or("")) != Some(true) {
                slow_check(String::new(), pass.clone().unwrap_or_default()).await;
                shared.admission.login_result(source.as_deref(), Some(user), false);
                refuse!(Refusal::BadCredentials, format!("wrong password for device {user:?}"));
            }
            shared.admission.login_result(source.as_deref(), Some(user), true);
        }
        (Some(user), pass) => {
            let ok = slow_check(user.clone(), pass.clone().unwrap_or_default()).await;
            shared.admission.login_result(source.as_deref(), Some(user), ok);
            if !ok {
                refuse!(
                    Refusal::BadCredentials,
                    format!("wrong password or unknown user {user:?}")
                );
            }
        }
        (None, _) if !listener.anonymous => {
            refuse!(
                Refusal::NotAuthorized,
                "anonymous clients are not allowed on this listener".into()
            );
        }
        (None, _) => {}
    }
    // A client without an id gets one (and is told it, in MQTT 5).
    let (client_id, assigned_id) = if connect.client_id.is_empty() {
        if !connect.clean {
            refuse!(Refusal::BadClientId, "an empty client id needs a clean session".into());
        }
        let id = format!("outpost-{:016x}", rand::random::<u64>());
        (id.clone(), (proto == Proto::V5).then_some(id))
    } else {
        (connect.client_id.clone(), None)
    };
    let id = Identity {
        username: connect.username.clone(),
        client_id,
        listener: listener.bind.clone(),
        device,
    };
    if id.client_id.len() > shared.limits.max_client_id_len
        || !policy.client_id_allowed(id.username.as_deref(), &id.client_id)
    {
        refuse!(Refusal::BadClientId, "client id not allowed".into());
    }
    if let Some(w) = &connect.will {
        if !topics::valid_topic(&w.topic) || !shared.access.allows(&id, &w.topic, Right::Publish) {
            refuse!(Refusal::NotAuthorized, format!("will topic {:?} not allowed", w.topic));
        }
    }
    drop(policy);

    // How long the session outlives this connection: MQTT 5 says; 3.1.1 clean sessions end
    // with it, kept ones last `persistent_session_expiry`.
    let max_expiry = shared.sessions_cfg.max_session_expiry;
    let (expiry, told_expiry) = match connect.session_expiry {
        Some(e) if e > max_expiry => (max_expiry, Some(max_expiry)),
        Some(e) => (e, None),
        None if connect.clean => (0, None),
        None => (shared.sessions_cfg.persistent_session_expiry, None),
    };
    let keep_alive = match connect.keep_alive {
        k if k > MAX_KEEP_ALIVE => MAX_KEEP_ALIVE,
        k => k,
    };
    let key = session_key(id.username.as_deref(), &id.client_id);
    // Revoking a device, the end of a login, or a newer connection with this client id closes
    // this one through this token.
    let super::registry::Registered {
        id: conn_id,
        kick,
        taken_over,
    } = shared.registry.register(&id);
    let user = id.username.clone().unwrap_or_default();
    // A device revoked or rotated while this one was logging in was kicked before it was
    // registered: check its login again now that any later kick will reach it.
    if device
        && shared
            .access
            .device_login(&user, connect.password.as_deref().unwrap_or(""))
            != Some(true)
    {
        shared.registry.unregister(&user, conn_id);
        refuse!(Refusal::NotAuthorized, "device revoked while logging in".into());
    }
    // MQTT 5 clients say how many deliveries they take in flight; 3.1.1 clients cannot, and get
    // the broker's own limit (as Mosquitto's max_inflight_messages).
    let window = match proto {
        Proto::V5 => connect.receive_max.max(1) as usize,
        Proto::V4 => shared.limits.max_inflight.max(1) as usize,
    };
    let req = super::router::AttachReq {
        key,
        identity: id.clone(),
        clean: connect.clean,
        expiry,
        internal: false,
        window,
    };
    let attached = shared.attach(req, kick.clone(), taken_over.clone());
    let announce = codec::Announce {
        receive_max: shared.limits.max_inflight,
        max_packet: shared.limits.max_packet_size.0 as u32,
        topic_alias_max: TOPIC_ALIAS_MAX,
        assigned_id,
        session_expiry: told_expiry,
        server_keep_alive: (connect.keep_alive != keep_alive).then_some(keep_alive),
    };
    let connack = codec::connack_ok(proto, attached.present, &announce);
    if timeout_at(deadline, cwr.write_all(&connack))
        .await
        .map_or(true, |r| r.is_err())
    {
        shared.registry.unregister(&user, conn_id);
        shared.detach(&attached.session, attached.gen, connect.will.clone());
        return;
    }
    drop(prelogin);
    Metrics::inc(&shared.metrics.connections);
    Metrics::inc(&shared.metrics.connections_total);
    log::debug!(
        "{peer} on {}: client {:?} connected ({proto:?}, user {:?}, session present {})",
        listener.name,
        id.client_id,
        id.username,
        attached.present
    );

    let ctx = Ctx {
        peer,
        proto,
        id,
        keep_alive,
        shared: shared.clone(),
        session: attached.session.clone(),
        gen: attached.gen,
        receive_max: window,
        max_packet: connect.max_packet as usize,
        alias_max: connect.topic_alias_max.min(OUR_ALIAS_MAX),
        zero_expiry_at_connect: connect.session_expiry == Some(0),
    };
    let (tx, rx) = mpsc::channel(64);
    // A panic on this connection (a bug) ends this connection only: it is caught here, counted,
    // and the session is let go as for any other end.
    let halves = async {
        let r = reader(&ctx, crd, cbuf, tx);
        let w = writer(&ctx, cwr, rx, stop, (kick, taken_over));
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
    shared.registry.unregister(&user, conn_id);
    shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    let will = connect.will.clone().filter(|_| end.fires_will());
    shared.detach(&ctx.session, ctx.gen, will);
    match &end {
        End::Protocol(_) | End::ClientGone(_) => {
            log::info!("{peer} on {}: client {:?}: {end}", listener.name, ctx.id.client_id)
        }
        _ => log::debug!("{peer} on {}: client {:?}: {end}", listener.name, ctx.id.client_id),
    }
}

fn count_bad(m: &Metrics, e: &FrameError) {
    match e {
        FrameError::TooLarge(_) => Metrics::inc(&m.oversized_packets),
        FrameError::Malformed(_) => Metrics::inc(&m.malformed_packets),
    }
}

/// Decodes and checks the first packet; a refusal says which CONNACK to send, if any.
fn check_connect(first: &Frame) -> Result<codec::Connect, (Option<Proto>, Refusal, String)> {
    match codec::protocol_level(first) {
        Some((name, 4)) if name == "MQTT" => {}
        Some((name, 5)) if name == "MQTT" => {}
        Some((name, level)) if name == "MQTT" || name == "MQIsdp" => {
            return Err((
                Some(Proto::V4),
                Refusal::UnsupportedVersion,
                format!("protocol {name} level {level} is not supported (use MQTT 3.1.1 or 5)"),
            ))
        }
        _ => {
            return Err((
                None,
                Refusal::Malformed,
                "CONNECT without the MQTT protocol name".into(),
            ))
        }
    }
    codec::decode_connect(first).map_err(|e| {
        let proto = match codec::protocol_level(first) {
            Some((_, 5)) => Some(Proto::V5),
            _ => None,
        };
        (proto, Refusal::Malformed, e.to_string())
    })
}

/// Reads the client's first packet, refusing at its first byte if it is not a CONNECT
/// (rather than waiting for a garbage length to fill).
async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, FrameError> {
    while buf.is_empty() {
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
    if buf[0] != 0x10 {
        return Err(FrameError::Malformed(format!(
            "first byte {:#04x} is not a CONNECT",
            buf[0]
        )));
    }
    loop {
        if let Some(f) = codec::next_frame(buf, max)? {
            return Ok(Some(f));
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
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

/// Tells PUBACK from PUBCOMP where both are handled alike.
enum PacketKind {
    Comp,
    Other,
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

/// Client to broker: frames off the socket, each handled in order; acks go to the writer once
/// whatever must be durable first (bridge spools, persistent sessions) has committed.
async fn reader<R: AsyncRead + Unpin>(ctx: &Ctx, mut crd: R, mut cbuf: BytesMut, tx: mpsc::Sender<Out>) -> End {
    let shared = &ctx.shared;
    let router = &shared.router;
    let m = &shared.metrics;
    let max = shared.limits.max_packet_size.0 as usize;
    // A client silent for 1.5 times its keep-alive is gone [MQTT-3.1.2-24].
    let idle = (ctx.keep_alive > 0).then(|| Duration::from_millis(ctx.keep_alive as u64 * 1500));
    let mut st = ReadState::default();
    // Packets held back while the queues hold the memory budget: PUBLISHes, and whatever came
    // after one (order matters for those). Acks of our deliveries are never held: they are
    // what frees the budget.
    let mut held: std::collections::VecDeque<Frame> = std::collections::VecDeque::new();
    let mut held_bytes = 0usize;
    loop {
        let mut b = Batch::default();
        st.unacked = 0;
        'gather: loop {
            loop {
                let frame = match codec::next_frame(&mut cbuf, max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        count_bad(m, &e);
                        let why = match e {
                            FrameError::TooLarge(_) => Goodbye::PacketTooLarge,
                            FrameError::Malformed(_) => Goodbye::Malformed,
                        };
                        let _ = tx.send(Out::Close(why, End::Protocol("bad packet"))).await;
                        return End::Protocol("bad packet");
                    }
                };
                let ack_of_ours = matches!(
                    frame.kind,
                    codec::kind::PUBACK | codec::kind::PUBREC | codec::kind::PUBCOMP | codec::kind::PINGREQ
                );
                if !ack_of_ours && (!held.is_empty() || (frame.kind == codec::kind::PUBLISH && router.over_budget())) {
                    held_bytes += frame.bytes.len();
                    held.push_back(frame);
                    continue;
                }
                if let Some(end) = handle(ctx, &mut st, frame, &mut b, &tx).await {
                    return end;
                }
            }
            while let Some(f) = held.front() {
                if f.kind == codec::kind::PUBLISH && router.over_budget() {
                    break;
                }
                let f = held.pop_front().expect("front exists");
                held_bytes -= f.bytes.len();
                if let Some(end) = handle(ctx, &mut st, f, &mut b, &tx).await {
                    return end;
                }
            }
            // Durable copies to wait for: first take in what the client has already sent, so one
            // spool commit covers its whole window (a read holds only a few 1 KiB publishes, and
            // each wait is a commit).
            if !b.waits.is_empty() && held.is_empty() && b.waits.len() < GATHER_MAX {
                if let Some(r) = ready_now(crd.read_buf(&mut cbuf)).await {
                    match r {
                        Ok(0) => {
                            flush_acks(&tx, &mut b.acks, &mut b.waits).await;
                            return End::ClientClosed;
                        }
                        Ok(n) => {
                            Metrics::add(&m.bytes_in, n as u64);
                            continue 'gather;
                        }
                        Err(e) => return End::ClientGone(format!("read: {e}")),
                    }
                }
            }
            break;
        }
        if !flush_acks(&tx, &mut b.acks, &mut b.waits).await {
            return End::ClientGone(STORE_FAILED.into());
        }
        if held_bytes > HOLD_MAX {
            // Enough held: stop reading this client (TCP pushes back) until the budget frees.
            router.wait_for_budget().await;
            continue;
        }
        let read = async {
            tokio::select! {
                r = crd.read_buf(&mut cbuf) => Some(r),
                _ = router.budget_freed(), if !held.is_empty() => None,
            }
        };
        let n = match idle {
            Some(d) if held.is_empty() => match timeout(d, read).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = tx
                        .send(Out::Close(
                            Goodbye::KeepAliveTimeout,
                            End::ClientGone("keep-alive timeout".into()),
                        ))
                        .await;
                    return End::ClientGone("keep-alive timeout".into());
                }
            },
            _ => read.await,
        };
        match n {
            None => {}
            Some(Ok(0)) => return End::ClientClosed,
            Some(Ok(n)) => Metrics::add(&m.bytes_in, n as u64),
            Some(Err(e)) => return End::ClientGone(format!("read: {e}")),
        }
    }
}

/// Why a connection ends when a durable copy of its publish failed (it is not acknowledged:
/// the client publishes it again on its next connection).
const STORE_FAILED: &str = "a bridge spool or the session store could not store a message";

/// Bytes of packets a reader holds back at most while the budget is full before it stops
/// reading the socket.
const HOLD_MAX: usize = 64 * 1024;

/// Durable copies one round of the reader waits for at most before it acknowledges them.
const GATHER_MAX: usize = 1024;

/// The output of `f` if it is ready without waiting; `None` (and `f` dropped) if not.
async fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// What one round of the reader gathers before it hands acks over.
#[derive(Default)]
struct Batch {
    acks: Vec<bytes::Bytes>,
    waits: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// Handles one packet; `Some` ends the connection.
async fn handle(ctx: &Ctx, st: &mut ReadState, frame: Frame, b: &mut Batch, tx: &mpsc::Sender<Out>) -> Option<End> {
    let step = on_packet(ctx, st, &frame, &mut b.waits);
    if let Step::Reply(r) = step {
        b.acks.push(r);
        return None;
    }
    if matches!(step, Step::Nothing) {
        return None;
    }
    // Whatever comes next goes out after the acks of what came before it.
    if !flush_acks(tx, &mut b.acks, &mut b.waits).await {
        // A normal DISCONNECT stays one (its will is discarded); anything else ends here.
        return Some(match step {
            Step::End(End::Disconnected) => End::Disconnected,
            _ => End::ClientGone(STORE_FAILED.into()),
        });
    }
    match step {
        Step::SubAck(r, retained) => {
            if tx.send(Out::SubAck(r, retained)).await.is_err() {
                return Some(End::ClientGone("writer ended".into()));
            }
            None
        }
        Step::Close(why, what) => {
            let _ = tx.send(Out::Close(why, End::Protocol(what))).await;
            Some(End::Protocol(what))
        }
        Step::End(end) => Some(end),
        Step::Reply(_) | Step::Nothing => None,
    }
}

/// Waits for the durable copies, then hands the acks to the writer. False when a copy failed
/// (the acks are not sent: the client will publish again).
async fn flush_acks(
    tx: &mpsc::Sender<Out>,
    acks: &mut Vec<bytes::Bytes>,
    waits: &mut Vec<tokio::sync::oneshot::Receiver<()>>,
) -> bool {
    let mut ok = true;
    for w in waits.drain(..) {
        ok &= w.await.is_ok();
    }
    if !ok {
        acks.clear();
        return false;
    }
    for a in acks.drain(..) {
        if tx.send(Out::Bytes(a)).await.is_err() {
            return false;
        }
    }
    true
}

/// State only the reader uses.
#[derive(Default)]
struct ReadState {
    /// MQTT 5 topic aliases the client set.
    aliases: HashMap<u16, String>,
    /// QoS 1/2 publishes of this batch whose acks wait for it to end (Receive Maximum).
    unacked: usize,
}

/// What one client packet leads to.
enum Step {
    Reply(bytes::Bytes),
    SubAck(bytes::Bytes, Vec<(Target, Arc<Message>)>),
    Nothing,
    Close(Goodbye, &'static str),
    End(End),
}

fn on_packet(
    ctx: &Ctx,
    st: &mut ReadState,
    frame: &Frame,
    waits: &mut Vec<tokio::sync::oneshot::Receiver<()>>,
) -> Step {
    let shared = &ctx.shared;
    let m = &shared.metrics;
    let proto = ctx.proto;
    let packet_kind = if frame.kind == codec::kind::PUBCOMP {
        PacketKind::Comp
    } else {
        PacketKind::Other
    };
    let packet = match codec::decode(proto, frame) {
        Ok(p) => p,
        Err(e) => {
            Metrics::inc(&m.malformed_packets);
            log::debug!("client {:?}: {e}", ctx.id.client_id);
            return Step::Close(Goodbye::Malformed, "malformed or forbidden packet");
        }
    };
    match packet {
        In::Publish(p) => {
            Metrics::inc(&m.publishes_in);
            let topic = match (p.alias, p.topic.is_empty()) {
                (Some(a), _) if a == 0 || a > TOPIC_ALIAS_MAX => {
                    Metrics::inc(&m.malformed_packets);
                    return Step::Close(Goodbye::TopicAliasInvalid, "topic alias out of range");
                }
                (Some(a), false) => {
                    st.aliases.insert(a, p.topic.clone());
                    p.topic.clone()
                }
                (Some(a), true) => match st.aliases.get(&a) {
                    Some(t) => t.clone(),
                    None => {
                        Metrics::inc(&m.malformed_packets);
                        return Step::Close(Goodbye::TopicAliasInvalid, "unknown topic alias");
                    }
                },
                (None, _) => p.topic.clone(),
            };
            if !topics::valid_topic(&topic) {
                Metrics::inc(&m.malformed_packets);
                return Step::Close(Goodbye::TopicNameInvalid, "PUBLISH to an invalid topic name");
            }
            if p.qos > 0 {
                st.unacked += 1;
                let qos2_open = if p.qos == 2 {
                    ctx.session.lock().incoming_qos2.len()
                } else {
                    0
                };
                if st.unacked.max(qos2_open) > shared.limits.max_inflight as usize {
                    Metrics::inc(&m.inflight_exceeded);
                    return Step::Close(Goodbye::ReceiveMaximumExceeded, "too many unacknowledged publishes");
                }
            }
            if !shared.access.allows(&ctx.id, &topic, Right::Publish) {
                Metrics::inc(&m.publish_denied);
                shared.events.publish_denied(ctx.peer, &ctx.id, &topic);
                log::debug!("client {:?}: publish to {topic:?} denied", ctx.id.client_id);
                return match p.qos {
                    0 => Step::Nothing,
                    q => Step::Reply(codec::publish_ack(proto, q, p.pkid, AckCode::NotAuthorized)),
                };
            }
            // A QoS 2 PUBLISH resent before its PUBREL is acknowledged again, not routed again.
            if p.qos == 2 {
                if !ctx.session.lock().incoming_qos2.insert(p.pkid) {
                    return Step::Reply(codec::publish_ack(proto, 2, p.pkid, AckCode::Success));
                }
                if let Some(store) = ctx.store() {
                    store.qos2_in(&ctx.session.key, p.pkid, true);
                }
            }
            let msg = Arc::new(Message {
                topic: Arc::from(topic.as_str()),
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                props: p.props,
                expires_ms: p.expiry.map(|e| now_ms() + e as i64 * 1000),
                origin: None,
                from: ctx.session.id,
            });
            shared.ingress(&msg, p.qos > 0, waits);
            match p.qos {
                0 => Step::Nothing,
                q => Step::Reply(codec::publish_ack(proto, q, p.pkid, AckCode::Success)),
            }
        }
        In::PubAck(pkid) | In::PubComp(pkid) => {
            if let Some((freed, id)) = ctx
                .session
                .acked(ctx.gen, pkid, matches!(packet_kind, PacketKind::Comp))
            {
                shared.router.release(freed);
                shared.router.done(id);
            }
            Step::Nothing
        }
        In::PubRec(pkid) => {
            // PUBREL either way: for an unknown id it tells the client to let it go too.
            if let (Some(id), Some(store)) = (ctx.session.received(ctx.gen, pkid), ctx.store()) {
                if id != 0 {
                    store.released(id);
                }
            }
            Step::Reply(codec::pubrel(pkid))
        }
        In::PubRel(pkid) => {
            let found = ctx.session.lock().incoming_qos2.remove(&pkid);
            if let (true, Some(store)) = (found, ctx.store()) {
                store.qos2_in(&ctx.session.key, pkid, false);
            }
            Step::Reply(codec::pubcomp(proto, pkid, found))
        }
        In::Subscribe { pkid, filters, id } => {
            let mut codes = Vec::with_capacity(filters.len());
            let mut retained = vec![];
            for f in filters {
                let (group, inner) = super::router::split_share(&f.filter);
                let valid = topics::strip_share(&f.filter).is_some_and(topics::valid_filter)
                    && group.is_none_or(|g| !g.is_empty() && !g.contains(['+', '#']));
                if !valid {
                    codes.push(SubCode::InvalidFilter);
                    continue;
                }
                if group.is_some() && f.no_local {
                    // A protocol error [MQTT-3.8.3-4]: the connection is closed.
                    Metrics::inc(&m.malformed_packets);
                    return Step::Close(Goodbye::ProtocolError, "No Local on a shared subscription");
                }
                if !shared.access.allows(&ctx.id, &f.filter, Right::Subscribe) {
                    Metrics::inc(&m.subscribe_denied);
                    shared.events.subscribe_denied(ctx.peer, &ctx.id, &f.filter);
                    log::debug!("client {:?}: subscribe to {:?} denied", ctx.id.client_id, f.filter);
                    codes.push(SubCode::NotAuthorized);
                    continue;
                }
                let qos = f.qos.min(2);
                let opts = SubOpts {
                    qos,
                    no_local: f.no_local,
                    retain_as_published: f.retain_as_published,
                    id,
                };
                let _ = inner;
                let (_, msgs) = shared
                    .router
                    .subscribe(&ctx.session, &f.filter, opts, f.retain_handling);
                for msg in msgs {
                    if !shared.access.allows(&ctx.id, &msg.topic, Right::Read) {
                        shared.router.dropped_denied.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    retained.push((
                        Target {
                            session: ctx.session.clone(),
                            qos: qos.min(msg.qos),
                            retain: true,
                            sub_ids: id.into_iter().collect(),
                            share: None,
                        },
                        msg,
                    ));
                }
                codes.push(SubCode::Granted(qos));
            }
            Step::SubAck(codec::suback(proto, pkid, &codes), retained)
        }
        In::Unsubscribe { pkid, filters } => {
            let held: Vec<bool> = filters
                .iter()
                .map(|f| shared.router.unsubscribe(&ctx.session, f))
                .collect();
            Step::Reply(codec::unsuback(proto, pkid, &held))
        }
        In::PingReq => Step::Reply(bytes::Bytes::from_static(&codec::PINGRESP)),
        In::Disconnect { reason, session_expiry } => {
            if let Some(e) = session_expiry {
                if ctx.zero_expiry_at_connect && e != 0 {
                    Metrics::inc(&m.malformed_packets);
                    return Step::Close(Goodbye::ProtocolError, "session expiry raised from 0 at DISCONNECT");
                }
                ctx.session.lock().expiry = e.min(shared.sessions_cfg.max_session_expiry);
            }
            // Only a normal disconnection (0x00) discards the will [MQTT-3.1.2-10]; 0x04 asks
            // for it, and any error reason leaves it to be published.
            if reason != 0x00 {
                return Step::End(End::DisconnectWithWill);
            }
            // A session that ends here is ended before the socket closes, so a client that
            // reconnects at once cannot find it still there.
            if ctx.session.lock().expiry == 0 {
                shared.detach(&ctx.session, ctx.gen, None);
            }
            Step::End(End::Disconnected)
        }
    }
}

/// Broker to client: resend what was in flight, then write the reader's replies and the
/// session's deliveries, within the client's Receive Maximum and Maximum Packet Size.
async fn writer<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    mut cwr: W,
    mut rx: mpsc::Receiver<Out>,
    stop: CancellationToken,
    (kick, taken_over): (CancellationToken, Arc<AtomicBool>),
) -> End {
    let shared = &ctx.shared;
    let m = &shared.metrics;
    // A client that does not read for this long is given up.
    let write_timeout = Duration::from_secs((ctx.keep_alive as u64 * 3 / 2).max(30));
    let mut out = BytesMut::new();
    let mut aliases: HashMap<Arc<str>, u16> = HashMap::new();
    let now = now_ms();
    let Some(resume) = ctx.session.resume(ctx.gen, ctx.receive_max, |d| ctx.check(d)) else {
        return End::TakenOver;
    };
    shared.router.release(resume.freed);
    for id in resume.dropped_ids {
        shared.router.done(id);
    }
    for f in resume.resend {
        if f.released {
            out.extend_from_slice(&codec::pubrel(f.pkid));
        } else {
            encode(ctx, &f.d, f.pkid, true, &mut aliases, now, &mut out);
        }
    }
    // The first round takes without waiting: a resumed session may hold queued messages that
    // no wake-up announces (restored from the store, or queued while it was away).
    let mut first = true;
    loop {
        let mut closing = None;
        if out.is_empty() && !std::mem::take(&mut first) {
            tokio::select! {
                // The reader's replies first: once it is gone, nothing more is taken to write.
                biased;
                o = rx.recv() => match o {
                    Some(o) => closing = take_out(ctx, o, &mut out),
                    None => closing = Some((None, End::ClientGone("reader ended".into()))),
                },
                _ = ctx.session.notify.notified() => {}
                _ = stop.cancelled() => closing = Some((Some(Goodbye::ShuttingDown), End::Shutdown)),
                _ = kick.cancelled() => closing = Some(if taken_over.load(Ordering::Relaxed) {
                    (Some(Goodbye::SessionTakenOver), End::TakenOver)
                } else {
                    (Some(Goodbye::NotAuthorized), End::Protocol("credentials revoked or access ended"))
                }),
            }
        }
        while closing.is_none() {
            match rx.try_recv() {
                Ok(o) => closing = take_out(ctx, o, &mut out),
                Err(mpsc::error::TryRecvError::Empty) => break,
                // The reader is gone: write what it left, nothing more.
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closing = Some((None, End::ClientGone("reader ended".into())))
                }
            }
        }
        if let Some((why, end)) = closing {
            if let Some(d) = why.and_then(|w| codec::disconnect(ctx.proto, w)) {
                out.extend_from_slice(&d);
            }
            let _ = flush(&mut cwr, &mut out, write_timeout).await;
            let _ = timeout(Duration::from_secs(1), cwr.shutdown()).await;
            return end;
        }
        // Deliveries, as many as the window allows, in rounds so one write stays bounded.
        let now = now_ms();
        match ctx.session.take(ctx.gen, ctx.receive_max, TAKE_BATCH, |d| ctx.check(d)) {
            None => {
                // A newer connection holds the session (tell this client why it is closed), or
                // the session ended under a closing connection (DISCONNECT with expiry 0).
                if taken_over.load(Ordering::Relaxed) {
                    if let Some(d) = codec::disconnect(ctx.proto, Goodbye::SessionTakenOver) {
                        out.extend_from_slice(&d);
                    }
                }
                let _ = flush(&mut cwr, &mut out, write_timeout).await;
                let _ = timeout(Duration::from_secs(1), cwr.shutdown()).await;
                return if taken_over.load(Ordering::Relaxed) {
                    End::TakenOver
                } else {
                    End::Disconnected
                };
            }
            Some(t) => {
                shared.router.release(t.freed);
                if t.too_large > 0 {
                    shared
                        .router
                        .dropped_too_large
                        .fetch_add(t.too_large, Ordering::Relaxed);
                }
                if t.expired > 0 {
                    shared.router.dropped_expired.fetch_add(t.expired, Ordering::Relaxed);
                }
                if t.denied > 0 {
                    shared.router.dropped_denied.fetch_add(t.denied, Ordering::Relaxed);
                }
                let more = t.out.len() + t.again.len() == TAKE_BATCH;
                for (pkid, d) in &t.again {
                    encode(ctx, d, *pkid, true, &mut aliases, now, &mut out);
                }
                for id in &t.dropped_ids {
                    shared.router.done(*id);
                }
                if let Some(store) = ctx.store() {
                    for (pkid, d) in t.out.iter().filter(|(_, d)| d.store_id != 0) {
                        store.sent(d.store_id, *pkid);
                    }
                }
                for (pkid, d) in &t.out {
                    encode(ctx, d, *pkid, false, &mut aliases, now, &mut out);
                    if d.qos == 0 {
                        ctx.session.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Metrics::add(&m.publishes_out, (t.out.len() + t.again.len()) as u64);
                if more {
                    // Come back for the rest without waiting for a wake-up.
                    ctx.session.notify.notify_one();
                }
            }
        }
        Metrics::add(&m.bytes_out, out.len() as u64);
        if let Err(e) = flush(&mut cwr, &mut out, write_timeout).await {
            return End::ClientGone(format!("write: {e}"));
        }
    }
}

/// Handles one message from the reader; returns a closing if it asks for one.
fn take_out(ctx: &Ctx, o: Out, out: &mut BytesMut) -> Option<(Option<Goodbye>, End)> {
    match o {
        Out::Bytes(b) => {
            out.extend_from_slice(&b);
            None
        }
        Out::SubAck(b, retained) => {
            out.extend_from_slice(&b);
            for (t, msg) in retained {
                ctx.shared.router.push(&t, &msg, true, None);
            }
            None
        }
        Out::Close(why, end) => Some((Some(why), end)),
    }
}

/// Appends one delivery as a PUBLISH, with a topic alias where the client allows them.
fn encode(
    ctx: &Ctx,
    d: &Delivery,
    pkid: u16,
    dup: bool,
    aliases: &mut HashMap<Arc<str>, u16>,
    now: i64,
    out: &mut BytesMut,
) {
    let alias = if ctx.alias_max > 0 && ctx.proto == Proto::V5 {
        match aliases.get(&d.msg.topic) {
            Some(a) => Some((*a, false)),
            None if (aliases.len() as u16) < ctx.alias_max => {
                let a = aliases.len() as u16 + 1;
                aliases.insert(d.msg.topic.clone(), a);
                Some((a, true))
            }
            None => None,
        }
    } else {
        None
    };
    codec::encode_publish(
        ctx.proto,
        &OutPublish {
            msg: &d.msg,
            qos: d.qos,
            pkid,
            dup,
            retain: d.retain,
            sub_ids: &d.sub_ids,
            alias,
            expiry_left: d.msg.expiry_left(now),
        },
        out,
    );
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut, limit: Duration) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let res = timeout(limit, async {
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

#[allow(dead_code)]
const _: u32 = NEVER;
