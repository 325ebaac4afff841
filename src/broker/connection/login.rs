//! From the first byte to CONNACK: read the CONNECT under the connect deadline, authenticate
//! (users, device logins, back-off, a few password checks at once), settle the client id, the
//! will, the session's terms, attach the session and answer. A refusal is answered with the
//! CONNACK code of the client's protocol, counted and recorded as a security event.

use super::{Ctx, ListenerInfo, OUR_ALIAS_MAX, TOPIC_ALIAS_MAX};
use crate::broker::admission::PreLogin;
use crate::broker::auth::{Identity, Policy};
use crate::broker::codec::{self, Frame, FrameError, Proto, Refusal};
use crate::broker::metrics::Metrics;
use crate::broker::registry::Registered;
use crate::broker::{router, topics, Right, Shared};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// The longest keep-alive the broker accepts; MQTT 5 clients asking more are told this one.
const MAX_KEEP_ALIVE: u16 = 3600;
/// How long a login waits for a slot of `max_connections` before it is refused (server busy):
/// long enough for a crowd's own previous connections to finish closing.
const SESSION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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

/// Where one login happens: the socket's peer, its listener and the deadline.
pub(super) struct Door<'a> {
    pub peer: SocketAddr,
    pub listener: &'a ListenerInfo,
    pub shared: &'a Arc<Shared>,
    pub deadline: Instant,
}

/// A client that got its CONNACK.
pub(super) struct LoggedIn {
    pub ctx: Ctx,
    pub will: Option<codec::Will>,
    pub conn: Registered,
    /// Bytes the client sent after its CONNECT.
    pub cbuf: BytesMut,
    /// Its slot of `max_connections`, held while it is connected.
    pub _slot: OwnedSemaphorePermit,
}

/// Reads the CONNECT and logs the client in; `None` when it was refused or went away (the
/// refusal already answered).
pub(super) async fn login<R, W>(door: &Door<'_>, crd: &mut R, cwr: &mut W, prelogin: PreLogin) -> Option<LoggedIn>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (shared, peer, name) = (door.shared, door.peer, &door.listener.name);
    let max = shared.limits.max_packet_size.0 as usize;
    let mut cbuf = BytesMut::with_capacity(1024);
    let first = match before_login(door.deadline, &prelogin.evict, read_connect(crd, &mut cbuf, max)).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) | Err(_) => {
            Metrics::inc(&shared.metrics.handshakes_failed);
            log::debug!("{peer} on {name}: closed or timed out before CONNECT");
            return None;
        }
        Ok(Err(e)) => {
            count_bad(&shared.metrics, &e);
            log::info!("{peer} on {name}: {e} before CONNECT; closing");
            return None;
        }
    };
    let connect = match check_connect(&first) {
        Ok(c) => c,
        Err((proto, refusal, why)) => {
            Metrics::inc(&shared.metrics.connects_refused);
            shared.events.login_refused(peer, "", None, &why);
            log::info!("{peer} on {name}: refused: {why}");
            if let Some(proto) = proto {
                let _ = cwr.write_all(&codec::connack_refusal(proto, refusal)).await;
            }
            return None;
        }
    };
    match admit(door, &connect, &prelogin, cwr).await {
        Ok(mut logged_in) => {
            drop(prelogin);
            logged_in.cbuf = cbuf;
            Some(logged_in)
        }
        // The CONNACK could not be written: the client is gone, nothing to answer.
        Err(None) => None,
        Err(Some((refusal, why))) => {
            Metrics::inc(&shared.metrics.connects_refused);
            shared.events.connect_refused(peer, &connect, &why);
            log::info!("{peer} on {name}: client {:?} refused: {why}", connect.client_id);
            let ack = codec::connack_refusal(connect.proto, refusal);
            let _ = timeout_at(door.deadline, cwr.write_all(&ack)).await;
            None
        }
    }
}

type Refused = (Refusal, String);

/// Why `admit` let a client in not: a refusal to answer, or `None` when it is gone.
type NotAdmitted = Option<Refused>;

/// Everything after a well-formed CONNECT: checks, attach, CONNACK.
async fn admit<W: AsyncWrite + Unpin>(
    door: &Door<'_>,
    connect: &codec::Connect,
    prelogin: &PreLogin,
    cwr: &mut W,
) -> Result<LoggedIn, NotAdmitted> {
    let shared = door.shared;
    if connect.auth_method.is_some() {
        return Err(Some((
            Refusal::BadAuthMethod,
            "MQTT 5 enhanced authentication is not offered".into(),
        )));
    }
    let busy = || Some((Refusal::ServerBusy, "max_connections reached".to_string()));
    // Waiting for a slot is bounded by the deadline and SESSION_WAIT, so a client over the
    // limit hears why soon.
    let until = door.deadline.min(Instant::now() + SESSION_WAIT);
    let slot = match before_login(until, &prelogin.evict, shared.admission.session()).await {
        Ok(Some(slot)) => slot,
        _ => return Err(busy()),
    };
    let policy = shared.access.policy();
    let device = authenticate(door, connect, &policy, prelogin).await.map_err(Some)?;
    let id = identify(door, connect, &policy, device).map_err(Some)?;
    drop(policy);
    // Revoking a device, the end of a login, or a newer connection with this client id closes
    // this one through this token.
    let conn = shared.registry.register(&id.0);
    let user = id.0.username.clone().unwrap_or_default();
    // A device revoked or rotated while this one was logging in was kicked before it was
    // registered: check its login again now that any later kick will reach it.
    let password = connect.password.as_deref().unwrap_or("");
    if device && shared.access.device_login(&user, password) != Some(true) {
        shared.registry.unregister(&user, conn.id);
        return Err(Some((Refusal::NotAuthorized, "device revoked while logging in".into())));
    }
    let Some(ctx) = attach(door, connect, id, &conn, cwr).await else {
        shared.registry.unregister(&user, conn.id);
        return Err(None);
    };
    Metrics::inc(&shared.metrics.connections);
    Metrics::inc(&shared.metrics.connections_total);
    Ok(LoggedIn {
        ctx,
        will: connect.will.clone(),
        conn,
        cbuf: BytesMut::new(),
        _slot: slot,
    })
}

/// Checks the credentials; returns whether the login is a device's.
async fn authenticate(
    door: &Door<'_>,
    connect: &codec::Connect,
    policy: &Arc<Policy>,
    prelogin: &PreLogin,
) -> Result<bool, Refused> {
    let (shared, peer) = (door.shared, door.peer);
    let device = connect
        .username
        .as_ref()
        .is_some_and(|u| !policy.has_user(u) && shared.access.device_login(u, "").is_some());
    // Back-off after failed logins, per source address and user together: refused at once,
    // without a password check.
    let source = peer.ip();
    let Some(user) = &connect.username else {
        if !door.listener.anonymous {
            return Err((
                Refusal::NotAuthorized,
                "anonymous clients are not allowed on this listener".into(),
            ));
        }
        return Ok(false);
    };
    if let Some(left) = shared.admission.login_backoff(source, user) {
        Metrics::inc(&shared.metrics.logins_throttled);
        return Err((
            Refusal::BadCredentials,
            format!("too many failed logins as {user:?} or from this address; next try in {left:.1?}"),
        ));
    }
    let pass = connect.password.clone().unwrap_or_default();
    if device {
        // A device from the keystore: a random password, compared in constant time. A wrong
        // one costs a password check all the same (no timing tells which names exist).
        let ok = shared.access.device_login(user, &pass) == Some(true);
        if !ok {
            let _ = password_check(door, policy, String::new(), pass, prelogin).await;
        }
        shared.admission.login_result(source, user, ok);
        return match ok {
            true => Ok(true),
            false => Err((Refusal::BadCredentials, format!("wrong password for device {user:?}"))),
        };
    }
    // No check could be made (the socket was evicted, or its deadline came first): the
    // server is busy, the password is not wrong, and no failure counts against it.
    let Some(ok) = password_check(door, policy, user.clone(), pass, prelogin).await else {
        return Err((Refusal::ServerBusy, "no password check could be made in time".into()));
    };
    shared.admission.login_result(source, user, ok);
    match ok {
        true => Ok(false),
        false => Err((
            Refusal::BadCredentials,
            format!("wrong password or unknown user {user:?}"),
        )),
    }
}

/// A password check on the blocking pool, a few at once (argon2 is slow on purpose). An
/// unknown user costs the same as a wrong password. Waiting for a slot counts as logging in:
/// an evicted socket (see `admission`) stops waiting and gives its pre-login slot back at once.
/// `None` when no check was made (evicted, or the deadline came first).
async fn password_check(
    door: &Door<'_>,
    policy: &Arc<Policy>,
    user: String,
    pass: String,
    prelogin: &PreLogin,
) -> Option<bool> {
    let shared = door.shared;
    let Ok(Some(_slot)) = before_login(
        door.deadline,
        &prelogin.evict,
        shared.admission.password_check(door.peer.ip()),
    )
    .await
    else {
        return None;
    };
    Metrics::inc(&shared.metrics.password_checks);
    let policy = policy.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let ok = policy.verify_password(&user, &pass);
        crate::system::memory::trim();
        ok
    })
    .await;
    Some(checked.unwrap_or(false))
}

/// The client's identity (an id assigned when it sent none), checked against the client-id
/// rules and its will; with the id to tell an MQTT 5 client it was assigned.
fn identify(
    door: &Door<'_>,
    connect: &codec::Connect,
    policy: &Policy,
    device: bool,
) -> Result<(Identity, Option<String>), Refused> {
    let shared = door.shared;
    let (client_id, assigned_id) = if connect.client_id.is_empty() {
        if !connect.clean {
            return Err((Refusal::BadClientId, "an empty client id needs a clean session".into()));
        }
        let id = format!("outpost-{:016x}", rand::random::<u64>());
        (id.clone(), (connect.proto == Proto::V5).then_some(id))
    } else {
        (connect.client_id.clone(), None)
    };
    let id = Identity {
        username: connect.username.clone(),
        client_id,
        listener: door.listener.bind.clone(),
        device,
    };
    if id.client_id.len() > shared.limits.max_client_id_len
        || !policy.client_id_allowed(id.username.as_deref(), &id.client_id)
    {
        return Err((Refusal::BadClientId, "client id not allowed".into()));
    }
    if let Some(w) = &connect.will {
        if !topics::valid_topic(&w.topic) || !shared.access.allows(&id, &w.topic, Right::Publish) {
            return Err((Refusal::NotAuthorized, format!("will topic {:?} not allowed", w.topic)));
        }
    }
    Ok((id, assigned_id))
}

/// Settles the session's terms, attaches it and writes the CONNACK; `None` when the CONNACK
/// could not be written (the session is let go again).
async fn attach<W: AsyncWrite + Unpin>(
    door: &Door<'_>,
    connect: &codec::Connect,
    (id, assigned_id): (Identity, Option<String>),
    conn: &Registered,
    cwr: &mut W,
) -> Option<Ctx> {
    let shared = door.shared;
    // How long the session outlives this connection: MQTT 5 says; 3.1.1 clean sessions end
    // with it, kept ones last `persistent_session_expiry`.
    let max_expiry = shared.sessions_cfg.max_session_expiry;
    let (expiry, told_expiry) = match connect.session_expiry {
        Some(e) if e > max_expiry => (max_expiry, Some(max_expiry)),
        Some(e) => (e, None),
        None if connect.clean => (0, None),
        None => (shared.sessions_cfg.persistent_session_expiry, None),
    };
    let keep_alive = connect.keep_alive.min(MAX_KEEP_ALIVE);
    // MQTT 5 clients say how many deliveries they take in flight; 3.1.1 clients cannot, and get
    // the broker's own limit (as Mosquitto's max_inflight_messages).
    let window = match connect.proto {
        Proto::V5 => connect.receive_max.max(1) as usize,
        Proto::V4 => shared.limits.max_inflight.max(1) as usize,
    };
    let req = router::AttachReq {
        key: super::session_key(id.username.as_deref(), &id.client_id),
        identity: id.clone(),
        clean: connect.clean,
        expiry,
        internal: false,
        window,
    };
    let attached = shared.attach(req, conn.kick.clone(), conn.taken_over.clone());
    let announce = codec::Announce {
        receive_max: shared.limits.max_inflight,
        max_packet: shared.limits.max_packet_size.0 as u32,
        topic_alias_max: TOPIC_ALIAS_MAX,
        assigned_id,
        session_expiry: told_expiry,
        server_keep_alive: (connect.keep_alive != keep_alive).then_some(keep_alive),
    };
    let connack = codec::connack_ok(connect.proto, attached.present, &announce);
    if timeout_at(door.deadline, cwr.write_all(&connack))
        .await
        .map_or(true, |r| r.is_err())
    {
        shared.detach(&attached.session, attached.gen, connect.will.clone());
        return None;
    }
    log::debug!(
        "{} on {}: client {:?} connected ({:?}, user {:?}, session present {})",
        door.peer,
        door.listener.name,
        id.client_id,
        connect.proto,
        id.username,
        attached.present
    );
    Some(Ctx {
        peer: door.peer,
        proto: connect.proto,
        id,
        keep_alive,
        shared: shared.clone(),
        session: attached.session,
        gen: attached.gen,
        receive_max: window,
        max_packet: connect.max_packet as usize,
        alias_max: connect.topic_alias_max.min(OUR_ALIAS_MAX),
        zero_expiry_at_connect: connect.session_expiry == Some(0),
    })
}

pub(super) fn count_bad(m: &Metrics, e: &FrameError) {
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
