//! One task per client connection: read CONNECT, authenticate, open the client's session on the
//! engine, then relay packets both ways, checking every PUBLISH and SUBSCRIBE against the ACL.
//! The two directions run as independent pumps, so neither side can stall the other, and
//! whatever goes wrong on this connection ends this connection only.

use super::auth::Identity;
use super::codec::{self, kind, Announce, Frame, FrameError, Goodbye, Proto, Refusal, SubDenied, SubResult};
use super::engine::escape_client_id;
use super::metrics::Metrics;
use super::{topics, Incoming, Shared};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// The largest packet the engine may send us (the MQTT maximum).
const ENGINE_MAX_PACKET: usize = 268_435_455;
/// Keep-alive the engine gets for a client that asked for none (the engine refuses 0).
const ENGINE_KEEPALIVE_FOR_ZERO: u16 = 600;
/// MQTT 5 topic aliases a client may set: bounds what aliases cost.
const TOPIC_ALIAS_MAX: u16 = 32;
/// How long a write to the engine may take before the connection is given up.
const ENGINE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-listener facts a connection needs.
#[derive(Clone, Debug)]
pub struct ListenerInfo {
    pub name: String,
    /// The listener's `bind` as configured (ACL rules can name it).
    pub bind: String,
    pub anonymous: bool,
}

/// The engine's name for a client: user and client id, each escaped, joined by `:`. Clients of
/// different users never share a session, and no engine id of a client can equal the
/// gateway's own internal ids (which hold no `:`).
pub fn engine_client_id(username: Option<&str>, client_id: &str) -> String {
    let esc = |s: &str| escape_client_id(s).replace(':', "%3A");
    format!("{}:{}", esc(username.unwrap_or("")), esc(client_id))
}

/// `$share/G/F` as the engine gets it: the engine keys shared groups by name alone, so the
/// filter is folded into the name to keep groups of different filters (and users) apart.
fn engine_filter(f: &str) -> String {
    match f.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
        Some((group, filter)) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            filter.hash(&mut h);
            format!("$share/{group}.{:08x}/{filter}", h.finish() as u32)
        }
        None => f.to_string(),
    }
}

/// How a connection ended.
enum End {
    /// The client closed the socket without DISCONNECT.
    ClientClosed,
    /// Read or write failure, keep-alive timeout, a client that stopped reading.
    ClientGone(String),
    Disconnected,
    /// MQTT 5 DISCONNECT 0x04: close, and let the will go.
    DisconnectWithWill,
    Protocol(&'static str),
    EngineClosed(String),
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
            End::EngineClosed(why) => write!(f, "{why}"),
            End::Shutdown => write!(f, "gateway shutting down"),
        }
    }
}

impl End {
    /// Did the client's side end the connection abnormally (so its will is published)?
    fn fires_will(&self) -> bool {
        matches!(
            self,
            End::ClientClosed | End::ClientGone(_) | End::DisconnectWithWill | End::Protocol(_)
        )
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
    prelogin: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut crd, mut cwr) = tokio::io::split(stream);
    let max = shared.limits.max_packet_size.0 as usize;
    let mut cbuf = BytesMut::with_capacity(4096);

    let first = match timeout_at(deadline, read_connect(&mut crd, &mut cbuf, max)).await {
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
    let Ok(_session) = shared.sessions_allowed.clone().try_acquire_owned() else {
        refuse!(Refusal::ServerBusy, "max_connections reached".into());
    };

    // Authentication: argon2 is slow on purpose, so only a few run at once.
    let policy = shared.policy.load_full();
    let device = connect
        .username
        .as_ref()
        .is_some_and(|u| !policy.has_user(u) && shared.device_login(u, "").is_some());
    match (&connect.username, &connect.password) {
        (Some(user), pass) if device => {
            // A device from the keystore: a random password, compared in constant time.
            if shared.device_login(user, pass.as_deref().unwrap_or("")) != Some(true) {
                refuse!(Refusal::BadCredentials, format!("wrong password for device {user:?}"));
            }
        }
        (Some(user), pass) => {
            let ok = match timeout_at(deadline, shared.auth_slots.acquire()).await {
                Ok(Ok(_slot)) => {
                    let (p, u, pw) = (policy.clone(), user.clone(), pass.clone().unwrap_or_default());
                    tokio::task::spawn_blocking(move || p.verify_password(&u, &pw))
                        .await
                        .unwrap_or(false)
                }
                _ => false,
            };
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
        (id.clone(), Some(id))
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
        if !topics::valid_topic(&w.topic) || !shared.may_publish(&id, &w.topic) {
            refuse!(Refusal::NotAuthorized, format!("will topic {:?} not allowed", w.topic));
        }
    }
    drop(policy);

    // The client's session on the engine.
    let engine_addr = if proto == Proto::V5 {
        shared.engine.v5
    } else {
        shared.engine.v4
    };
    let engine_ka = if connect.keep_alive == 0 {
        ENGINE_KEEPALIVE_FOR_ZERO
    } else {
        connect.keep_alive
    };
    let engine_id = engine_client_id(id.username.as_deref(), &id.client_id);
    let announce = Announce {
        receive_max: shared.limits.max_inflight,
        max_packet: shared.limits.max_packet_size.0 as u32,
        topic_alias_max: TOPIC_ALIAS_MAX,
        assigned_id,
    };
    // A kept session whose subscriptions are no longer all allowed (a grant ended, an ACL
    // changed) is not resumed: the engine would deliver what the client may no longer read.
    // One connection at a time per client id: an older one is closed by the front door, and
    // gone, before the engine hears of the new one (under the engine's own takeover, a quick
    // reconnect was sometimes refused instead).
    let slot = shared.takeover_slot(&engine_id);
    let turn = slot.lock().await;
    shared.take_over(&engine_id).await;
    let stale = !connect.clean && {
        let subs = shared.subscriptions.lock().expect("subscriptions lock");
        subs.get(&engine_id)
            .is_some_and(|held| held.iter().any(|f| !shared.may_subscribe(&id, f)))
    };
    if stale {
        shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&engine_id);
        log::info!(
            "client {:?}: its kept session held subscriptions no longer allowed; starting a clean one",
            id.client_id
        );
    }
    let engine_connect = connect.for_engine(&engine_id, &shared.engine.user, &shared.engine.secret, engine_ka, stale);
    // Even with the older connection gone, the engine's router may not have processed its
    // disconnect yet and closes the new session without a CONNACK (seen under load with
    // back-to-back reconnects): try again briefly before refusing the client.
    let mut attempt = 0;
    let (engine, ebuf, connack) = loop {
        match open_engine_session(engine_addr, engine_connect.clone(), proto, &announce).await {
            Ok((s, buf, Some(ack))) => break (s, buf, ack),
            Ok((_, _, None)) if attempt < 3 && Instant::now() + Duration::from_millis(200) < deadline => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Ok((_, _, None)) => refuse!(Refusal::NotAuthorized, "the engine refused the session".into()),
            Err(e) => refuse!(Refusal::ServerUnavailable, format!("engine unavailable: {e}")),
        }
    };
    // Revoking a device, or a newer connection with this client id, closes this one through
    // this token.
    let registered = (
        id.username.clone().unwrap_or_default(),
        shared.register(&id, &engine_id),
    );
    let kick = registered.1 .1.clone();
    let taken_over = registered.1 .2.clone();
    drop(turn);
    // A device revoked or rotated while this one was logging in was kicked before it was
    // registered: check its login again now that any later kick will reach it.
    if device && shared.device_login(&registered.0, connect.password.as_deref().unwrap_or("")) != Some(true) {
        shared.unregister(&registered.0, registered.1 .0);
        refuse!(Refusal::NotAuthorized, "device revoked while logging in".into());
    }
    if timeout_at(deadline, cwr.write_all(&connack))
        .await
        .map_or(true, |r| r.is_err())
    {
        shared.unregister(&registered.0, registered.1 .0);
        return;
    }
    drop(prelogin);
    if connect.clean {
        shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&engine_id);
    }
    Metrics::inc(&shared.metrics.connections);
    Metrics::inc(&shared.metrics.connections_total);
    log::debug!(
        "{peer} on {}: client {:?} connected ({proto:?}, user {:?})",
        listener.name,
        id.client_id,
        id.username
    );

    let ctx = Ctx {
        proto,
        id,
        engine_id,
        keep_alive: connect.keep_alive,
        shared: shared.clone(),
        flow: Mutex::new(Flow::default()),
    };
    let end = relay(&ctx, crd, cbuf, cwr, engine, ebuf, stop, (kick, taken_over)).await;
    shared.unregister(&registered.0, registered.1 .0);
    shared
        .metrics
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if connect.clean {
        shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&ctx.engine_id);
    }
    // The engine publishes the will itself; the retained store and the bridges get their copy here.
    if let Some(w) = connect.will.as_ref().filter(|w| end.fires_will() && !w.delayed) {
        let m = Incoming {
            topic: &w.topic,
            payload: &w.payload,
            qos: w.qos,
            retain: w.retain,
            origin: None,
        };
        shared.ingress(&m, false, &mut vec![]);
    }
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

/// Opens the session on the engine and waits for its CONNACK, whatever happens to the client
/// meanwhile: closing before the engine has written its CONNACK is what poisons rumqttd.
async fn open_engine_session(
    addr: SocketAddr,
    connect: Bytes,
    proto: Proto,
    announce: &Announce,
) -> anyhow::Result<(TcpStream, BytesMut, Option<Bytes>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let frame = timeout(Duration::from_secs(10), read_frame(&mut s, &mut buf, ENGINE_MAX_PACKET))
        .await
        .map_err(|_| anyhow::anyhow!("no CONNACK from the engine in 10s"))??
        .ok_or_else(|| anyhow::anyhow!("engine closed the session before CONNACK"))?;
    let (ok, ack) = codec::engine_connack(proto, &frame, announce)?;
    Ok((s, buf, ok.then_some(ack)))
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
    read_frame(r, buf, max).await
}

/// Reads until one whole frame is buffered. `None` on a clean close.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, FrameError> {
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

/// What one connection shares between its two pumps.
struct Ctx {
    proto: Proto,
    id: Identity,
    engine_id: String,
    /// The client's keep-alive in seconds (0: none).
    keep_alive: u16,
    shared: Arc<Shared>,
    flow: Mutex<Flow>,
}

/// State that packets in one direction set and packets in the other consume.
#[derive(Default)]
struct Flow {
    /// SUBSCRIBEs awaiting the engine's SUBACK: the filters and what the ACL decided for each.
    pending_subs: HashMap<u16, (Vec<String>, Vec<SubResult>)>,
    /// QoS 1/2 publishes from the client the engine has not yet acknowledged.
    inflight: u32,
    /// PINGREQs from the client still to be answered (the rest are the front door's own).
    client_pings: u32,
    /// A DISCONNECT went to the engine: its close is the normal end.
    disconnecting: bool,
}

/// What the client-to-engine pump hands the client writer.
enum Out {
    Bytes(Bytes),
    /// Send the goodbye (MQTT 5), close, and end the connection so.
    Close(Goodbye, End),
}

#[allow(clippy::too_many_arguments)]
async fn relay<R, W>(
    ctx: &Ctx,
    crd: R,
    cbuf: BytesMut,
    cwr: W,
    engine: TcpStream,
    ebuf: BytesMut,
    stop: CancellationToken,
    kick: (CancellationToken, Arc<std::sync::atomic::AtomicBool>),
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (erd, ewr) = engine.into_split();
    let (tx, rx) = mpsc::channel(256);
    tokio::select! {
        end = up(ctx, crd, cbuf, ewr, tx) => end,
        end = down(ctx, erd, ebuf, cwr, rx, stop, kick) => end,
    }
}

/// Client to engine: read, check, forward; answers the client through `tx`.
async fn up<R: AsyncRead + Unpin>(
    ctx: &Ctx,
    mut crd: R,
    mut cbuf: BytesMut,
    mut ewr: OwnedWriteHalf,
    tx: mpsc::Sender<Out>,
) -> End {
    let m = &ctx.shared.metrics;
    let max = ctx.shared.limits.max_packet_size.0 as usize;
    // MQTT: no packet from the client for 1.5 x keep-alive means it is gone.
    let client_silence = (ctx.keep_alive > 0).then(|| Duration::from_millis(ctx.keep_alive as u64 * 1500));
    let engine_ka = if ctx.keep_alive == 0 {
        ENGINE_KEEPALIVE_FOR_ZERO
    } else {
        ctx.keep_alive
    };
    // Packets the front door answers itself never reach the engine: ping it on the client's
    // behalf so it does not time the client out.
    let ping_every = Duration::from_secs((engine_ka as u64 / 2).max(1));
    let mut last_engine_write = Instant::now();
    let mut st = UpState::default();
    let mut ready = !cbuf.is_empty();
    let mut last_heard = Instant::now();
    loop {
        if !ready {
            let read = async {
                match client_silence {
                    Some(t) => timeout_at(last_heard + t, crd.read_buf(&mut cbuf)).await.ok(),
                    None => Some(crd.read_buf(&mut cbuf).await),
                }
            };
            tokio::select! {
                r = read => match r {
                    None => return close(&tx, Goodbye::KeepAliveTimeout, End::ClientGone("keep-alive timed out".into())).await,
                    Some(Ok(0)) => return End::ClientClosed,
                    Some(Err(e)) => return End::ClientGone(format!("read: {e}")),
                    Some(Ok(n)) => {
                        Metrics::add(&m.bytes_in, n as u64);
                        last_heard = Instant::now();
                    }
                },
                _ = tokio::time::sleep_until(last_engine_write + ping_every) => {
                    if timeout(ENGINE_WRITE_TIMEOUT, ewr.write_all(&codec::PINGREQ)).await.map_or(true, |r| r.is_err()) {
                        return End::EngineClosed("engine write failed".into());
                    }
                    last_engine_write = Instant::now();
                    continue;
                }
            }
        }
        ready = false;
        let mut to_engine = BytesMut::new();
        let mut after_write: Vec<Bytes> = vec![];
        let mut finish: Option<End> = None;
        loop {
            let frame = match codec::next_frame(&mut cbuf, max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    count_bad(m, &e);
                    let why = if matches!(e, FrameError::TooLarge(_)) {
                        Goodbye::PacketTooLarge
                    } else {
                        Goodbye::Malformed
                    };
                    let _ = write_engine(&mut ewr, &mut to_engine, &mut st.durable).await;
                    return close(
                        &tx,
                        why,
                        End::Protocol(if why == Goodbye::PacketTooLarge {
                            "packet too large"
                        } else {
                            "malformed packet"
                        }),
                    )
                    .await;
                }
            };
            match on_client_packet(ctx, &mut st, frame) {
                Step::Forward(b) => to_engine.extend_from_slice(&b),
                Step::Reply(b) => {
                    if tx.send(Out::Bytes(b)).await.is_err() {
                        return End::ClientGone("writer ended".into());
                    }
                }
                Step::ForwardThenReply(f, r) => {
                    to_engine.extend_from_slice(&f);
                    after_write.push(r);
                }
                Step::Nothing => {}
                Step::Disconnect(forward) => {
                    match forward {
                        Some(b) => {
                            to_engine.extend_from_slice(&b);
                            ctx.flow.lock().expect("flow lock").disconnecting = true;
                            finish = Some(End::Disconnected);
                        }
                        None => finish = Some(End::DisconnectWithWill),
                    }
                    break;
                }
                Step::Close(why, reason) => {
                    let _ = write_engine(&mut ewr, &mut to_engine, &mut st.durable).await;
                    return close(&tx, why, End::Protocol(reason)).await;
                }
            }
        }
        if let Err(e) = write_engine(&mut ewr, &mut to_engine, &mut st.durable).await {
            return End::EngineClosed(format!("not forwarded: {e}"));
        }
        last_engine_write = Instant::now();
        for r in after_write {
            if tx.send(Out::Bytes(r)).await.is_err() {
                return End::ClientGone("writer ended".into());
            }
        }
        match finish {
            // The engine closes once it has the DISCONNECT; the other pump sees that.
            Some(End::Disconnected) => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                return End::Disconnected;
            }
            Some(end) => return end,
            None => {}
        }
    }
}

/// Hands a goodbye to the client writer, which ends the connection.
async fn close(tx: &mpsc::Sender<Out>, why: Goodbye, end: End) -> End {
    match tx.send(Out::Close(why, end)).await {
        Ok(()) => std::future::pending().await,
        Err(mpsc::error::SendError(Out::Close(_, end))) => end,
        Err(_) => End::ClientGone("writer ended".into()),
    }
}

/// Waits for the durable copies, then writes to the engine.
async fn write_engine(
    ewr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    durable: &mut Vec<tokio::sync::oneshot::Receiver<()>>,
) -> std::io::Result<()> {
    for w in durable.drain(..) {
        // A copy that could not be written: the publishes are not forwarded, so never acked.
        if w.await.is_err() {
            return Err(std::io::Error::other("a bridge spool could not store a message"));
        }
    }
    if buf.is_empty() {
        return Ok(());
    }
    match timeout(ENGINE_WRITE_TIMEOUT, ewr.write_all(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "engine did not read")),
    }?;
    buf.clear();
    Ok(())
}

/// Engine to client: forward, answer for the front door, and write what the other pump sends.
async fn down<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    mut erd: OwnedReadHalf,
    mut ebuf: BytesMut,
    mut cwr: W,
    mut rx: mpsc::Receiver<Out>,
    stop: CancellationToken,
    (kick, taken_over): (CancellationToken, Arc<std::sync::atomic::AtomicBool>),
) -> End {
    let m = &ctx.shared.metrics;
    // A client that does not read for this long is given up.
    let write_timeout = Duration::from_secs((ctx.keep_alive as u64 * 3 / 2).max(30));
    let mut ready = !ebuf.is_empty();
    let mut to_client = BytesMut::new();
    loop {
        let mut closing = None;
        if !ready {
            tokio::select! {
                r = erd.read_buf(&mut ebuf) => match r {
                    Ok(0) | Err(_) => {
                        let _ = flush_client(&mut cwr, &mut to_client, write_timeout).await;
                        return if ctx.flow.lock().expect("flow lock").disconnecting {
                            End::Disconnected
                        } else {
                            End::EngineClosed("engine closed the session".into())
                        };
                    }
                    Ok(_) => {
                        // rumqttd leaves Nagle on; acking at once keeps its next write from waiting.
                        let _ = socket2::SockRef::from(erd.as_ref()).set_tcp_quickack(true);
                        ready = true;
                    }
                },
                out = rx.recv() => match out {
                    Some(Out::Bytes(b)) => to_client.extend_from_slice(&b),
                    Some(Out::Close(why, end)) => closing = Some((why, end)),
                    None => return End::ClientGone("reader ended".into()),
                },
                _ = stop.cancelled() => closing = Some((Goodbye::ShuttingDown, End::Shutdown)),
                _ = kick.cancelled() => closing = Some(if taken_over.load(std::sync::atomic::Ordering::Relaxed) {
                    (Goodbye::SessionTakenOver, End::Protocol("session taken over by a new connection"))
                } else {
                    (Goodbye::NotAuthorized, End::Protocol("credentials revoked or access ended"))
                }),
            }
        }
        while closing.is_none() {
            match rx.try_recv() {
                Ok(Out::Bytes(b)) => to_client.extend_from_slice(&b),
                Ok(Out::Close(why, end)) => closing = Some((why, end)),
                Err(_) => break,
            }
        }
        if let Some((why, end)) = closing {
            if let Some(d) = codec::disconnect(ctx.proto, why) {
                to_client.extend_from_slice(&d);
            }
            let _ = flush_client(&mut cwr, &mut to_client, write_timeout).await;
            let _ = timeout(Duration::from_secs(1), cwr.shutdown()).await;
            return end;
        }
        if ready {
            ready = false;
            loop {
                let frame = match codec::next_frame(&mut ebuf, ENGINE_MAX_PACKET) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return End::EngineClosed(format!("engine sent a bad packet: {e}")),
                };
                let publish = frame.kind == kind::PUBLISH;
                match on_engine_packet(ctx, frame) {
                    Ok(Some(b)) => {
                        if publish {
                            Metrics::inc(&m.publishes_out);
                        }
                        to_client.extend_from_slice(&b)
                    }
                    Ok(None) => {}
                    Err(why) => {
                        if let Some(d) = codec::disconnect(ctx.proto, Goodbye::ProtocolError) {
                            to_client.extend_from_slice(&d);
                        }
                        let _ = flush_client(&mut cwr, &mut to_client, write_timeout).await;
                        return End::EngineClosed(why.into());
                    }
                }
            }
        }
        Metrics::add(&m.bytes_out, to_client.len() as u64);
        if let Err(e) = flush_client(&mut cwr, &mut to_client, write_timeout).await {
            return End::ClientGone(format!("write: {e}"));
        }
    }
}

async fn flush_client<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut, limit: Duration) -> std::io::Result<()> {
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

/// State only the client-to-engine pump uses.
#[derive(Default)]
struct UpState {
    /// MQTT 5 topic aliases the client set, to know the topic of an alias-only PUBLISH.
    aliases: HashMap<u16, String>,
    /// Refused QoS 2 publishes: their PUBREL is answered here, not by the engine.
    denied_qos2: HashSet<u16>,
    /// Copies (bridge spools) that must be on disk before the engine, and so the publisher's
    /// ack, sees the publishes read so far.
    durable: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// What one client packet leads to.
enum Step {
    Forward(Bytes),
    Reply(Bytes),
    ForwardThenReply(Bytes, Bytes),
    Nothing,
    Close(Goodbye, &'static str),
    /// DISCONNECT: forward it (normal), or not (MQTT 5 "with will": the engine would drop the will).
    Disconnect(Option<Bytes>),
}

/// Decides what a packet from the client does.
fn on_client_packet(ctx: &Ctx, st: &mut UpState, frame: Frame) -> Step {
    let m = &ctx.shared.metrics;
    let proto = ctx.proto;
    match frame.kind {
        kind::PUBLISH => {
            let Ok(p) = codec::decode_publish(proto, &frame) else {
                Metrics::inc(&m.malformed_packets);
                return Step::Close(Goodbye::Malformed, "malformed PUBLISH");
            };
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
            if !ctx.shared.may_publish(&ctx.id, &topic) {
                Metrics::inc(&m.publish_denied);
                log::debug!("client {:?}: publish to {topic:?} denied", ctx.id.client_id);
                return match p.qos {
                    0 => Step::Nothing,
                    q => {
                        if q == 2 {
                            st.denied_qos2.insert(p.pkid);
                        }
                        Step::Reply(codec::denied_publish_ack(proto, q, p.pkid))
                    }
                };
            }
            if p.qos > 0 {
                let mut flow = ctx.flow.lock().expect("flow lock");
                flow.inflight += 1;
                if flow.inflight > ctx.shared.limits.max_inflight as u32 {
                    Metrics::inc(&m.inflight_exceeded);
                    return Step::Close(Goodbye::ReceiveMaximumExceeded, "too many unacknowledged publishes");
                }
            }
            let msg = Incoming {
                topic: &topic,
                payload: &p.payload,
                qos: p.qos,
                retain: p.retain,
                origin: None,
            };
            ctx.shared.ingress(&msg, p.qos > 0, &mut st.durable);
            Step::Forward(frame.bytes)
        }
        kind::SUBSCRIBE => {
            let Ok(s) = codec::decode_subscribe(proto, &frame) else {
                Metrics::inc(&m.malformed_packets);
                return Step::Close(Goodbye::Malformed, "malformed SUBSCRIBE");
            };
            let plan: Vec<SubResult> = s
                .filters
                .iter()
                .map(|f| {
                    if !topics::strip_share(f).is_some_and(topics::valid_filter) {
                        SubResult::Denied(SubDenied::InvalidFilter)
                    } else if (f.starts_with('$') && !f.starts_with("$share/")) || !ctx.shared.may_subscribe(&ctx.id, f)
                    {
                        // The engine has no `$` topics and disconnects clients asking for
                        // them; such filters are refused here in SUBACK instead.
                        Metrics::inc(&m.subscribe_denied);
                        log::debug!("client {:?}: subscribe to {f:?} denied", ctx.id.client_id);
                        SubResult::Denied(SubDenied::NotAuthorized)
                    } else {
                        SubResult::FromEngine
                    }
                })
                .collect();
            let keep: Vec<(usize, String)> = plan
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, SubResult::FromEngine))
                .map(|(i, _)| (i, engine_filter(&s.filters[i])))
                .collect();
            if keep.is_empty() {
                return match codec::merge_suback(proto, s.pkid, &plan, None) {
                    Ok((ack, _)) => Step::Reply(ack),
                    Err(_) => Step::Close(Goodbye::ProtocolError, "cannot answer SUBSCRIBE"),
                };
            }
            {
                let mut subs = ctx.shared.subscriptions.lock().expect("subscriptions lock");
                let held = subs.entry(ctx.engine_id.clone()).or_default();
                for (i, _) in &keep {
                    held.insert(s.filters[*i].clone());
                }
            }
            let renamed = keep.iter().any(|(i, name)| *name != s.filters[*i]);
            let out = if keep.len() == plan.len() && !renamed {
                frame.bytes
            } else {
                s.subset(&keep)
            };
            ctx.flow
                .lock()
                .expect("flow lock")
                .pending_subs
                .insert(s.pkid, (s.filters, plan));
            Step::Forward(out)
        }
        kind::UNSUBSCRIBE => {
            let Ok((pkid, filters)) = codec::decode_unsubscribe(proto, &frame) else {
                Metrics::inc(&m.malformed_packets);
                return Step::Close(Goodbye::Malformed, "malformed UNSUBSCRIBE");
            };
            let held: Vec<bool> = {
                let mut subs = ctx.shared.subscriptions.lock().expect("subscriptions lock");
                let set = subs.entry(ctx.engine_id.clone()).or_default();
                filters.iter().map(|f| set.remove(f)).collect()
            };
            // The engine answers one UNSUBACK per filter it held and none for others: the front
            // door answers once, itself, and drops the engine's.
            let reply = codec::unsuback(proto, pkid, &held);
            let known: Vec<String> = filters
                .iter()
                .zip(&held)
                .filter(|(_, h)| **h)
                .map(|(f, _)| engine_filter(f))
                .collect();
            if known.is_empty() {
                return Step::Reply(reply);
            }
            // The ack goes out once the engine has the UNSUBSCRIBE.
            Step::ForwardThenReply(codec::unsubscribe(proto, pkid, known), reply)
        }
        kind::PUBREL => match codec::pubrel_pkid(&frame) {
            Ok(pkid) if st.denied_qos2.remove(&pkid) => Step::Reply(codec::pubcomp(proto, pkid)),
            Ok(pkid) => Step::Forward(codec::pubrel(pkid)),
            Err(_) => Step::Close(Goodbye::Malformed, "malformed PUBREL"),
        },
        kind::PINGREQ => {
            ctx.flow.lock().expect("flow lock").client_pings += 1;
            Step::Forward(frame.bytes)
        }
        kind::DISCONNECT if proto == Proto::V5 && codec::disconnect_reason(&frame) == 0x04 => Step::Disconnect(None),
        kind::DISCONNECT => Step::Disconnect(Some(frame.bytes)),
        kind::PUBACK | kind::PUBREC | kind::PUBCOMP => Step::Forward(frame.bytes),
        kind::CONNECT => {
            Metrics::inc(&m.malformed_packets);
            Step::Close(Goodbye::ProtocolError, "second CONNECT")
        }
        _ => {
            Metrics::inc(&m.malformed_packets);
            Step::Close(Goodbye::ProtocolError, "packet type a client may not send")
        }
    }
}

/// Decides what a packet from the engine does: `Ok(None)` swallows it, `Err` ends the connection.
fn on_engine_packet(ctx: &Ctx, frame: Frame) -> Result<Option<Bytes>, &'static str> {
    let mut flow = ctx.flow.lock().expect("flow lock");
    match frame.kind {
        kind::PUBACK | kind::PUBCOMP => {
            flow.inflight = flow.inflight.saturating_sub(1);
            Ok(Some(frame.bytes))
        }
        kind::SUBACK => {
            let pkid = codec::ack_pkid(&frame).ok_or("engine sent a short SUBACK")?;
            let Some((_, plan)) = flow.pending_subs.remove(&pkid) else {
                return Ok(Some(frame.bytes));
            };
            let (ack, _) =
                codec::merge_suback(ctx.proto, pkid, &plan, Some(&frame)).map_err(|_| "engine sent a bad SUBACK")?;
            Ok(Some(ack))
        }
        // The front door answered the UNSUBSCRIBE itself.
        kind::UNSUBACK => Ok(None),
        kind::PINGRESP if flow.client_pings > 0 => {
            flow.client_pings -= 1;
            Ok(Some(frame.bytes))
        }
        kind::PINGRESP => Ok(None),
        _ => Ok(Some(frame.bytes)),
    }
}
