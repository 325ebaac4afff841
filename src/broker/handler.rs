//! One task per client connection: read CONNECT, authenticate, open the client's session on the
//! engine, then relay packets both ways, checking every PUBLISH and SUBSCRIBE against the ACL.
//! Whatever goes wrong on this connection ends this connection only.

use super::auth::Identity;
use super::codec::{self, kind, Frame, FrameError, Goodbye, Proto, Refusal, SubDenied, SubResult};
use super::engine::escape_client_id;
use super::metrics::Metrics;
use super::retained::Retained;
use super::{topics, Shared};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// The largest packet the engine may send us (the MQTT maximum).
const ENGINE_MAX_PACKET: usize = 268_435_455;
/// Keep-alive the engine gets for a client that asked for none (the engine refuses 0); the
/// front door pings the engine at half of it on the client's behalf.
const ENGINE_KEEPALIVE_FOR_ZERO: u16 = 600;

/// Per-listener facts a connection needs.
#[derive(Clone, Debug)]
pub struct ListenerInfo {
    pub name: String,
    pub anonymous: bool,
}

/// Serves one client from its first byte to its close. `deadline` bounds everything before
/// CONNACK (handshakes included, which the caller started under the same deadline).
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    listener: ListenerInfo,
    shared: Arc<Shared>,
    deadline: Instant,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut crd, mut cwr) = tokio::io::split(stream);
    let max = shared.limits.max_packet_size.0 as usize;
    let mut cbuf = BytesMut::with_capacity(4096);

    // CONNECT, within the deadline.
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
    let client_id = connect.client_id.clone();
    let refuse = |refusal: Refusal, why: String| {
        Metrics::inc(&shared.metrics.connects_refused);
        log::info!("{peer} on {}: client `{client_id}` refused: {why}", listener.name);
        codec::connack_refusal(proto, refusal)
    };

    let Ok(_permit) = shared.sessions_allowed.clone().try_acquire_owned() else {
        let ack = refuse(Refusal::ServerBusy, "max_connections reached".into());
        let _ = cwr.write_all(&ack).await;
        return;
    };

    // Authentication.
    let policy = shared.policy.load_full();
    match (&connect.username, &connect.password) {
        (Some(user), pass) => {
            let (p, u, pw) = (policy.clone(), user.clone(), pass.clone().unwrap_or_default());
            let ok = tokio::task::spawn_blocking(move || p.verify_password(&u, &pw))
                .await
                .unwrap_or(false);
            if !ok {
                let ack = refuse(
                    Refusal::BadCredentials,
                    format!("wrong password or unknown user `{user}`"),
                );
                let _ = cwr.write_all(&ack).await;
                return;
            }
        }
        (None, _) if !listener.anonymous => {
            let ack = refuse(
                Refusal::NotAuthorized,
                "anonymous clients are not allowed on this listener".into(),
            );
            let _ = cwr.write_all(&ack).await;
            return;
        }
        (None, _) => {}
    }
    let id = Identity {
        username: connect.username.clone(),
        client_id: connect.client_id.clone(),
    };
    if connect.client_id.len() > shared.limits.max_client_id_len
        || !policy.client_id_allowed(id.username.as_deref(), &connect.client_id)
        || (connect.client_id.is_empty() && !connect.clean)
    {
        let ack = refuse(Refusal::BadClientId, "client id not allowed".into());
        let _ = cwr.write_all(&ack).await;
        return;
    }
    if let Some(w) = &connect.will_topic {
        if !topics::valid_topic(w) || !policy.may_publish(&id, w) {
            let ack = refuse(Refusal::NotAuthorized, format!("will topic `{w}` not allowed"));
            let _ = cwr.write_all(&ack).await;
            return;
        }
    }
    drop(policy);

    // The client's session on the engine.
    let engine_addr = if proto == Proto::V5 {
        shared.engine.v5
    } else {
        shared.engine.v4
    };
    let keep_alive = if connect.keep_alive == 0 {
        ENGINE_KEEPALIVE_FOR_ZERO
    } else {
        connect.keep_alive
    };
    let engine_id = escape_client_id(&connect.client_id);
    let opened = open_engine_session(
        &shared,
        engine_addr,
        connect.for_engine(&engine_id, &shared.engine.user, &shared.engine.secret, keep_alive),
        proto,
    )
    .await;
    let (engine, ebuf, connack) = match opened {
        Ok((s, buf, Some(ack))) => (s, buf, ack),
        Ok((_, _, None)) => {
            let ack = refuse(Refusal::NotAuthorized, "the engine refused the session".into());
            let _ = cwr.write_all(&ack).await;
            return;
        }
        Err(e) => {
            let ack = refuse(Refusal::ServerUnavailable, format!("engine unavailable: {e}"));
            let _ = cwr.write_all(&ack).await;
            return;
        }
    };
    if cwr.write_all(&connack).await.is_err() {
        return;
    }
    if connect.clean {
        shared
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .remove(&connect.client_id);
    }
    Metrics::inc(&shared.metrics.connections);
    Metrics::inc(&shared.metrics.connections_total);
    log::debug!(
        "{peer} on {}: client `{}` connected ({proto:?}, user {:?})",
        listener.name,
        connect.client_id,
        id.username
    );

    let mut relay = Relay {
        proto,
        id,
        shared: shared.clone(),
        aliases: HashMap::new(),
        pending_subs: HashMap::new(),
        denied_qos2: HashSet::new(),
        inflight: 0,
        client_pings: 0,
    };
    let end = relay
        .run(crd, cwr, cbuf, engine, ebuf, connect.keep_alive == 0, stop)
        .await;
    shared
        .metrics
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    log::debug!(
        "{peer} on {}: client `{}` closed: {end}",
        listener.name,
        relay.id.client_id
    );
}

fn count_bad(m: &Metrics, e: &FrameError) {
    match e {
        FrameError::TooLarge(_) => Metrics::inc(&m.oversized_packets),
        FrameError::Malformed(_) => Metrics::inc(&m.malformed_packets),
    }
}

/// Decodes and checks the first packet; a refusal says which CONNACK to send, if any.
fn check_connect(first: &Frame) -> Result<codec::Connect, (Option<Proto>, Refusal, String)> {
    if first.kind != kind::CONNECT {
        return Err((None, Refusal::Malformed, "first packet is not CONNECT".into()));
    }
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
    shared: &Shared,
    addr: SocketAddr,
    connect: Bytes,
    proto: Proto,
) -> anyhow::Result<(TcpStream, BytesMut, Option<Bytes>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s, &mut buf, ENGINE_MAX_PACKET))
        .await
        .map_err(|_| anyhow::anyhow!("no CONNACK from the engine in 10s"))??
        .ok_or_else(|| anyhow::anyhow!("engine closed the session before CONNACK"))?;
    let (ok, ack) = codec::engine_connack(
        proto,
        &frame,
        shared.limits.max_inflight,
        shared.limits.max_packet_size.0 as u32,
    )?;
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

/// The relay's state for one connected client.
struct Relay {
    proto: Proto,
    id: Identity,
    shared: Arc<Shared>,
    /// MQTT 5 topic aliases the client set, to know the topic of an alias-only PUBLISH.
    aliases: HashMap<u16, String>,
    /// SUBSCRIBEs awaiting the engine's SUBACK: the filters and what the ACL decided for each.
    pending_subs: HashMap<u16, (Vec<String>, Vec<SubResult>)>,
    /// QoS 2 publishes refused (3.1.1): their PUBREL is answered here, not by the engine.
    denied_qos2: HashSet<u16>,
    /// QoS 1/2 publishes from the client the engine has not yet acknowledged.
    inflight: u32,
    /// PINGREQs from the client still to be answered (the rest are the front door's own).
    client_pings: u32,
}

/// What one client packet leads to.
enum Step {
    Forward(Bytes),
    Reply(Bytes),
    Nothing,
    Close(Goodbye, &'static str),
    Disconnect(Bytes),
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    async fn run<R, W>(
        &mut self,
        mut crd: R,
        mut cwr: W,
        mut cbuf: BytesMut,
        engine: TcpStream,
        mut ebuf: BytesMut,
        ping_engine: bool,
        stop: CancellationToken,
    ) -> String
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (mut erd, mut ewr) = engine.into_split();
        let max = self.shared.limits.max_packet_size.0 as usize;
        let mut ping = tokio::time::interval(Duration::from_secs(ENGINE_KEEPALIVE_FOR_ZERO as u64 / 2));
        ping.tick().await;
        let mut to_engine = BytesMut::new();
        let mut to_client = BytesMut::new();
        // Frames already buffered behind the CONNECT / CONNACK are handled first.
        let mut client_ready = !cbuf.is_empty();
        let mut engine_ready = !ebuf.is_empty();
        loop {
            if !client_ready && !engine_ready {
                tokio::select! {
                    r = crd.read_buf(&mut cbuf) => match r {
                        Ok(0) => return "client closed the connection".into(),
                        Err(e) => return format!("client read error: {e}"),
                        Ok(n) => { Metrics::add(&self.shared.metrics.bytes_in, n as u64); client_ready = true; }
                    },
                    r = erd.read_buf(&mut ebuf) => match r {
                        Ok(0) => return "engine closed the session".into(),
                        Err(e) => return format!("engine read error: {e}"),
                        Ok(_) => {
                            // rumqttd leaves Nagle on; acking at once keeps its next write from waiting.
                            let _ = socket2::SockRef::from(erd.as_ref()).set_tcp_quickack(true);
                            engine_ready = true;
                        }
                    },
                    _ = ping.tick(), if ping_engine => {
                        if ewr.write_all(&codec::PINGREQ).await.is_err() { return "engine write error".into(); }
                    }
                    _ = stop.cancelled() => {
                        if let Some(d) = codec::disconnect(self.proto, Goodbye::ShuttingDown) { let _ = cwr.write_all(&d).await; }
                        let _ = cwr.shutdown().await;
                        return "gateway shutting down".into();
                    }
                }
            }
            if client_ready {
                client_ready = false;
                loop {
                    let frame = match codec::next_frame(&mut cbuf, max) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            count_bad(&self.shared.metrics, &e);
                            let why = if matches!(e, FrameError::TooLarge(_)) {
                                Goodbye::PacketTooLarge
                            } else {
                                Goodbye::Malformed
                            };
                            return self
                                .close(&mut cwr, &mut ewr, &to_engine, &to_client, why, &e.to_string())
                                .await;
                        }
                    };
                    match self.on_client_packet(frame) {
                        Step::Forward(b) => to_engine.extend_from_slice(&b),
                        Step::Reply(b) => to_client.extend_from_slice(&b),
                        Step::Nothing => {}
                        Step::Disconnect(b) => {
                            to_engine.extend_from_slice(&b);
                            let _ = flush(&mut cwr, &mut to_client).await;
                            let _ = flush(&mut ewr, &mut to_engine).await;
                            // Let the engine see the DISCONNECT before the socket goes (no will).
                            let _ = tokio::time::timeout(Duration::from_secs(1), erd.read_buf(&mut ebuf)).await;
                            return "client disconnected".into();
                        }
                        Step::Close(why, reason) => {
                            return self
                                .close(&mut cwr, &mut ewr, &to_engine, &to_client, why, reason)
                                .await;
                        }
                    }
                }
            }
            if engine_ready {
                engine_ready = false;
                loop {
                    let frame = match codec::next_frame(&mut ebuf, ENGINE_MAX_PACKET) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return format!("engine sent a bad packet: {e}"),
                    };
                    if let Some(b) = self.on_engine_packet(frame) {
                        to_client.extend_from_slice(&b);
                    }
                }
            }
            Metrics::add(&self.shared.metrics.bytes_out, to_client.len() as u64);
            if flush(&mut ewr, &mut to_engine).await.is_err() {
                return "engine write error".into();
            }
            if flush(&mut cwr, &mut to_client).await.is_err() {
                return "client write error".into();
            }
        }
    }

    async fn close<W: AsyncWrite + Unpin>(
        &self,
        cwr: &mut W,
        ewr: &mut tokio::net::tcp::OwnedWriteHalf,
        to_engine: &BytesMut,
        to_client: &BytesMut,
        why: Goodbye,
        reason: &str,
    ) -> String {
        let _ = ewr.write_all(to_engine).await;
        let _ = cwr.write_all(to_client).await;
        if let Some(d) = codec::disconnect(self.proto, why) {
            let _ = cwr.write_all(&d).await;
        }
        let _ = cwr.shutdown().await;
        log::info!("client `{}` closed by the gateway: {reason}", self.id.client_id);
        format!("closed: {reason}")
    }

    /// Decides what a packet from the client does.
    fn on_client_packet(&mut self, frame: Frame) -> Step {
        let m = &self.shared.metrics;
        match frame.kind {
            kind::PUBLISH => {
                let p = match codec::decode_publish(self.proto, &frame) {
                    Ok(p) => p,
                    Err(_) => {
                        Metrics::inc(&m.malformed_packets);
                        return Step::Close(Goodbye::Malformed, "malformed PUBLISH");
                    }
                };
                Metrics::inc(&m.publishes_in);
                let topic = match (p.alias, p.topic.is_empty()) {
                    (Some(a), false) => {
                        self.aliases.insert(a, p.topic.clone());
                        p.topic.clone()
                    }
                    (Some(a), true) => match self.aliases.get(&a) {
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
                if !self.shared.policy.load().may_publish(&self.id, &topic) {
                    Metrics::inc(&m.publish_denied);
                    log::debug!("client `{}`: publish to `{topic}` denied", self.id.client_id);
                    return match p.qos {
                        0 => Step::Nothing,
                        q => {
                            if q == 2 && self.proto == Proto::V4 {
                                self.denied_qos2.insert(p.pkid);
                            }
                            Step::Reply(codec::denied_publish_ack(self.proto, q, p.pkid))
                        }
                    };
                }
                if p.qos > 0 {
                    self.inflight += 1;
                    if self.inflight > self.shared.limits.max_inflight as u32 {
                        Metrics::inc(&m.inflight_exceeded);
                        return Step::Close(Goodbye::ReceiveMaximumExceeded, "too many unacknowledged publishes");
                    }
                }
                // The engine drops its retained message on any empty publish; the store follows it.
                if p.retain || p.payload.is_empty() {
                    self.shared.retained.put(Retained {
                        topic,
                        payload: p.payload,
                        qos: p.qos,
                    });
                }
                Step::Forward(frame.bytes)
            }
            kind::SUBSCRIBE => {
                let s = match codec::decode_subscribe(self.proto, &frame) {
                    Ok(s) => s,
                    Err(_) => {
                        Metrics::inc(&m.malformed_packets);
                        return Step::Close(Goodbye::Malformed, "malformed SUBSCRIBE");
                    }
                };
                let policy = self.shared.policy.load();
                let plan: Vec<SubResult> = s
                    .filters
                    .iter()
                    .map(|f| {
                        if !topics::strip_share(f).is_some_and(topics::valid_filter) {
                            SubResult::Denied(SubDenied::InvalidFilter)
                        } else if (f.starts_with('$') && !f.starts_with("$share/"))
                            || !policy.may_subscribe(&self.id, f)
                        {
                            // The engine has no `$` topics and disconnects clients asking for
                            // them; such filters are refused here in SUBACK instead.
                            Metrics::inc(&m.subscribe_denied);
                            log::debug!("client `{}`: subscribe to `{f}` denied", self.id.client_id);
                            SubResult::Denied(SubDenied::NotAuthorized)
                        } else {
                            SubResult::FromEngine
                        }
                    })
                    .collect();
                let keep: Vec<usize> = plan
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| matches!(p, SubResult::FromEngine))
                    .map(|(i, _)| i)
                    .collect();
                if keep.is_empty() {
                    return match codec::merge_suback(self.proto, s.pkid, &plan, None) {
                        Ok((ack, _)) => Step::Reply(ack),
                        Err(_) => Step::Close(Goodbye::ProtocolError, "cannot answer SUBSCRIBE"),
                    };
                }
                let out = if keep.len() == plan.len() {
                    frame.bytes
                } else {
                    s.subset(&keep)
                };
                self.pending_subs.insert(s.pkid, (s.filters, plan));
                Step::Forward(out)
            }
            kind::UNSUBSCRIBE => {
                let (pkid, filters) = match codec::decode_unsubscribe(self.proto, &frame) {
                    Ok(u) => u,
                    Err(_) => {
                        Metrics::inc(&m.malformed_packets);
                        return Step::Close(Goodbye::Malformed, "malformed UNSUBSCRIBE");
                    }
                };
                let mut subs = self.shared.subscriptions.lock().expect("subscriptions lock");
                let held = subs.entry(self.id.client_id.clone()).or_default();
                // The engine never answers an UNSUBSCRIBE of filters the client does not hold.
                if !filters.iter().any(|f| held.contains(f)) {
                    return Step::Reply(codec::unsuback_none(self.proto, pkid, filters.len()));
                }
                for f in &filters {
                    held.remove(f);
                }
                Step::Forward(frame.bytes)
            }
            kind::PUBREL => match codec::pubrel_pkid(&frame) {
                Ok(pkid) if self.denied_qos2.remove(&pkid) => Step::Reply(codec::pubcomp(self.proto, pkid)),
                Ok(_) => Step::Forward(frame.bytes),
                Err(_) => Step::Close(Goodbye::Malformed, "malformed PUBREL"),
            },
            kind::PINGREQ => {
                self.client_pings += 1;
                Step::Forward(frame.bytes)
            }
            kind::DISCONNECT => Step::Disconnect(frame.bytes),
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

    /// Decides what a packet from the engine does; `None` swallows it.
    fn on_engine_packet(&mut self, frame: Frame) -> Option<Bytes> {
        match frame.kind {
            kind::PUBACK | kind::PUBCOMP => {
                self.inflight = self.inflight.saturating_sub(1);
                Some(frame.bytes)
            }
            kind::SUBACK => {
                let pkid = codec::suback_pkid(&frame)?;
                let Some((filters, plan)) = self.pending_subs.remove(&pkid) else {
                    return Some(frame.bytes);
                };
                let (ack, granted) = codec::merge_suback(self.proto, pkid, &plan, Some(&frame)).ok()?;
                let mut subs = self.shared.subscriptions.lock().expect("subscriptions lock");
                let held = subs.entry(self.id.client_id.clone()).or_default();
                for (f, g) in filters.into_iter().zip(granted) {
                    if g {
                        held.insert(f);
                    }
                }
                Some(ack)
            }
            kind::PINGRESP => {
                if self.client_pings > 0 {
                    self.client_pings -= 1;
                    Some(frame.bytes)
                } else {
                    None
                }
            }
            _ => Some(frame.bytes),
        }
    }
}

async fn flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if !buf.is_empty() {
        w.write_all(buf).await?;
        w.flush().await?;
        buf.clear();
    }
    Ok(())
}
