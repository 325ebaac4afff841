//! The local MQTT broker: outpost's front door (listeners, authentication, ACLs, limits) in
//! front of the rumqttd engine, which does the routing. Everything in the gateway meets here.

pub mod auth;
pub mod codec;
pub mod engine;
mod handler;
pub mod listener;
pub mod metrics;
pub mod retained;
pub mod topics;

use crate::config::{self, Config};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use auth::Policy;
use engine::{Engine, EngineLimits};
use metrics::Metrics;
use retained::{Retained, RetainedStore};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// State every connection shares.
pub struct Shared {
    /// Users and ACL in force; replaced whole on reload.
    pub policy: ArcSwap<Policy>,
    pub metrics: Arc<Metrics>,
    pub engine: Engine,
    pub retained: RetainedStore,
    pub limits: config::Limits,
    /// Filters each client id holds, kept across its connections like the engine's sessions,
    /// so the front door can answer UNSUBSCRIBEs the engine would leave unanswered.
    pub subscriptions: Mutex<HashMap<String, HashSet<String>>>,
    /// Logged-in clients (max_connections).
    pub sessions_allowed: Arc<Semaphore>,
    /// Open sockets of any kind, logged in or still handshaking.
    pub sockets_allowed: Arc<Semaphore>,
    /// Sockets that have not finished logging in.
    pub prelogin_allowed: Arc<Semaphore>,
    /// Password checks running at once (argon2 takes ~20 MiB and tens of ms each).
    pub auth_slots: Semaphore,
    /// What must see every message entering the broker (the bridges' spools); swapped on reload.
    pub taps: ArcSwap<Vec<Arc<dyn Tap>>>,
    /// Devices' credentials and ACLs from the keystore; swapped when it changes.
    pub devices: ArcSwap<HashMap<String, DeviceCred>>,
    /// Connected clients by user name ("" for anonymous), so revoking a device, or the end of
    /// a grant, closes the connections it concerns at once.
    by_user: Mutex<HashMap<String, Vec<Conn>>>,
    /// Time-limited grants in force, and who may ask for them.
    pub grants: ArcSwap<GrantState>,
    /// Request topics only some users may publish on (grant requests, provisioning), with them.
    pub admin_topics: ArcSwap<Vec<(String, Vec<String>)>>,
    /// One connection at a time takes over a client id's session (see `take_over`).
    takeovers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Conn {
    id: u64,
    token: CancellationToken,
    /// Set when the token is cancelled because the same client id connected again.
    taken_over: Arc<std::sync::atomic::AtomicBool>,
    identity: auth::Identity,
    engine_id: String,
}

/// The grants the front door checks beside the static ACL.
#[derive(Default)]
pub struct GrantState {
    pub list: Vec<crate::grants::Grant>,
}

/// A device's MQTT login and what it may publish and subscribe to (filters already filled in).
pub struct DeviceCred {
    pub password: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// A message entering the broker, as a [`Tap`] sees it.
pub struct Incoming<'a> {
    pub topic: &'a str,
    pub payload: &'a bytes::Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The bridge it came in over, if any (loop prevention).
    pub origin: Option<&'a str>,
}

/// Sees every message entering the broker before it is routed. When `durable` is asked for,
/// the returned receiver fires once the tap's copy is safe; the publisher is acknowledged only
/// after that.
pub trait Tap: Send + Sync {
    fn accept(&self, m: &Incoming, durable: bool) -> Option<tokio::sync::oneshot::Receiver<()>>;
}

impl Shared {
    /// Only `admins` (logged-in users, not devices) may publish on `topic`, whatever the ACL says.
    pub fn restrict_topic(&self, topic: &str, admins: &[String]) {
        let mut v: Vec<(String, Vec<String>)> = self
            .admin_topics
            .load()
            .iter()
            .filter(|(t, _)| t != topic)
            .cloned()
            .collect();
        v.push((topic.to_string(), admins.to_vec()));
        self.admin_topics.store(Arc::new(v));
    }

    /// Checks a device's password; `None` when `user` is not a device.
    pub fn device_login(&self, user: &str, password: &str) -> Option<bool> {
        use subtle::ConstantTimeEq;
        let devices = self.devices.load();
        let d = devices.get(user)?;
        Some(bool::from(d.password.as_bytes().ct_eq(password.as_bytes())))
    }

    pub fn may_publish(&self, id: &auth::Identity, topic: &str) -> bool {
        if let Some((_, admins)) = self.admin_topics.load().iter().find(|(t, _)| t == topic) {
            return !id.device && id.username.as_ref().is_some_and(|u| admins.contains(u));
        }
        let g = self.grants.load();
        let now = crate::grants::now_secs();
        if g.list.iter().any(|x| x.allows_publish(id, topic, now)) {
            return true;
        }
        if id.device {
            // Devices get the device ACL only, never the broad rules meant for people.
            let devices = self.devices.load();
            return id
                .username
                .as_ref()
                .and_then(|u| devices.get(u))
                .is_some_and(|d| d.publish.iter().any(|f| topics::matches(topic, f)));
        }
        self.policy.load().may_publish(id, topic)
    }

    pub fn may_subscribe(&self, id: &auth::Identity, filter: &str) -> bool {
        let now = crate::grants::now_secs();
        if self
            .grants
            .load()
            .list
            .iter()
            .any(|g| g.allows_subscribe(id, filter, now))
        {
            return true;
        }
        if id.device {
            let Some(inner) = topics::strip_share(filter) else {
                return false;
            };
            let devices = self.devices.load();
            return id
                .username
                .as_ref()
                .and_then(|u| devices.get(u))
                .is_some_and(|d| d.subscribe.iter().any(|f| topics::covers(f, inner)));
        }
        self.policy.load().may_subscribe(id, filter)
    }

    /// Registers a connection; its token is cancelled by [`Shared::kick`] or
    /// [`Shared::enforce_subscriptions`].
    pub fn register(
        &self,
        identity: &auth::Identity,
        engine_id: &str,
    ) -> (u64, CancellationToken, Arc<std::sync::atomic::AtomicBool>) {
        let id = rand::random::<u64>();
        let token = CancellationToken::new();
        let taken_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = Conn {
            id,
            token: token.clone(),
            taken_over: taken_over.clone(),
            identity: identity.clone(),
            engine_id: engine_id.to_string(),
        };
        self.by_user
            .lock()
            .expect("users lock")
            .entry(identity.username.clone().unwrap_or_default())
            .or_default()
            .push(conn);
        (id, token, taken_over)
    }

    /// Closes connections holding a subscription that nothing allows any more (a grant ended,
    /// an ACL changed); returns how many. The engine cannot drop one subscription of a client,
    /// so the client is disconnected (MQTT 5: DISCONNECT 0x87) and may come back without it.
    pub fn enforce_subscriptions(&self) -> usize {
        let subs = self.subscriptions.lock().expect("subscriptions lock");
        let conns = self.by_user.lock().expect("users lock");
        let mut n = 0;
        for c in conns.values().flatten() {
            let Some(held) = subs.get(&c.engine_id) else { continue };
            if held.iter().any(|f| !self.may_subscribe(&c.identity, f)) && !c.token.is_cancelled() {
                log::info!(
                    "client {:?} of {:?}: a subscription is no longer allowed; disconnecting",
                    c.identity.client_id,
                    c.identity.username
                );
                c.token.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn unregister(&self, user: &str, id: u64) {
        let mut m = self.by_user.lock().expect("users lock");
        if let Some(v) = m.get_mut(user) {
            v.retain(|c| c.id != id);
            if v.is_empty() {
                m.remove(user);
            }
        }
    }

    /// The lock a new connection of `engine_id` holds while it takes the session over.
    pub fn takeover_slot(&self, engine_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.takeovers.lock().expect("takeovers lock");
        m.retain(|_, v| Arc::strong_count(v) > 1);
        m.entry(engine_id.to_string()).or_default().clone()
    }

    /// Closes the connections that hold `engine_id`'s session and waits (up to 3 s) until they
    /// are gone, so the engine never sees two connections of one client at once.
    pub async fn take_over(&self, engine_id: &str) {
        let held = |kick: bool| {
            let conns = self.by_user.lock().expect("users lock");
            let mut n = 0;
            for c in conns.values().flatten().filter(|c| c.engine_id == engine_id) {
                if kick {
                    c.taken_over.store(true, std::sync::atomic::Ordering::Relaxed);
                    c.token.cancel();
                }
                n += 1;
            }
            n
        };
        if held(true) == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while held(false) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes every connection of `user`; returns how many.
    pub fn kick(&self, user: &str) -> usize {
        let v = self
            .by_user
            .lock()
            .expect("users lock")
            .remove(user)
            .unwrap_or_default();
        for c in &v {
            c.token.cancel();
        }
        v.len()
    }

    /// Runs a message past the taps and the retained store; returns what to wait for.
    pub fn ingress(&self, m: &Incoming, durable: bool, waits: &mut Vec<tokio::sync::oneshot::Receiver<()>>) {
        // The engine drops its retained message on any empty publish; the store follows it.
        if m.retain || m.payload.is_empty() {
            self.retained.put(Retained {
                topic: m.topic.to_string(),
                payload: m.payload.clone(),
                qos: m.qos,
            });
        }
        for t in self.taps.load().iter() {
            waits.extend(t.accept(m, durable));
        }
    }
}

/// A running broker.
pub struct Broker {
    pub shared: Arc<Shared>,
    /// Where each configured listener ended up (port 0 picks a free one).
    pub local_addrs: Vec<SocketAddr>,
    /// Stops the accept loops.
    stop_accepting: CancellationToken,
    /// Closes client connections, after the drain window.
    stop_connections: CancellationToken,
    tracker: TaskTracker,
    /// Bound, not yet accepting: `serve` starts them once the taps are in place.
    listeners: Mutex<Vec<listener::Listener>>,
}

/// The front door for clients that arrive through another server (the dashboard's `/mqtt`):
/// they count against the same limits and are closed and awaited with every other client.
#[derive(Clone)]
pub struct FrontDoor {
    pub shared: Arc<Shared>,
    close: CancellationToken,
    tracker: TaskTracker,
}

/// How long connections keep flowing after the listeners close on shutdown, so messages
/// already routed (the status topic's `offline` among them) still reach their subscribers.
const DRAIN: Duration = Duration::from_millis(300);

impl Broker {
    /// Starts the engine, restores retained messages, and binds every listener. Clients are
    /// let in by [`Broker::serve`], once whatever must see every message (the taps) is in place.
    pub async fn start(cfg: &Config) -> Result<Broker> {
        let limits = cfg.broker.limits.clone();
        let engine = Engine::start(EngineLimits {
            max_connections: limits.max_connections as usize,
            max_packet_size: limits.max_packet_size.0 as usize,
            // The engine keeps `segments` full segments plus the one being written.
            segment_size: (limits.filter_log.0 as usize / 9).max(1024),
            segments: 8,
        })
        .await?;
        let data_dir = &cfg.gateway.data_dir;
        let (retained, existing) = RetainedStore::open(&data_dir.join("retained.db"))?;
        // A store the engine cannot take in time is reported, not fatal: the broker still serves.
        match restore_retained(&engine, &existing).await {
            Ok(()) if !existing.is_empty() => log::info!("restored {} retained messages", existing.len()),
            Ok(()) => {}
            Err(e) => log::error!("restoring retained messages: {e:#}"),
        }
        let mut listeners = vec![];
        for (i, l) in cfg.broker.listeners.iter().enumerate() {
            listeners.push(listener::Listener::bind(i, l).await?);
        }
        let shared = Arc::new(Shared {
            policy: ArcSwap::from_pointee(Policy::from_config(&cfg.broker)),
            metrics: Arc::new(Metrics::default()),
            engine,
            retained,
            sessions_allowed: Arc::new(Semaphore::new(limits.max_connections as usize)),
            sockets_allowed: Arc::new(Semaphore::new(limits.max_connections as usize + 256)),
            prelogin_allowed: Arc::new(Semaphore::new(256)),
            auth_slots: Semaphore::new(2),
            limits,
            subscriptions: Mutex::new(HashMap::new()),
            taps: ArcSwap::from_pointee(vec![]),
            devices: ArcSwap::from_pointee(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
            grants: ArcSwap::from_pointee(GrantState::default()),
            takeovers: Mutex::new(HashMap::new()),
            admin_topics: ArcSwap::from_pointee(vec![]),
        });
        let stop_accepting = CancellationToken::new();
        let stop_connections = CancellationToken::new();
        let tracker = TaskTracker::new();
        let local_addrs = listeners.iter().map(|l| l.local).collect();
        Ok(Broker {
            shared,
            local_addrs,
            stop_accepting,
            stop_connections,
            tracker,
            listeners: Mutex::new(listeners),
        })
    }

    /// Starts accepting clients on every bound listener.
    pub fn serve(&self) {
        for l in self.listeners.lock().expect("listeners lock").drain(..) {
            log::info!("{}: listening on {}", l.name(), l.local);
            tokio::spawn(l.run(
                self.shared.clone(),
                self.stop_accepting.clone(),
                self.stop_connections.clone(),
                self.tracker.clone(),
            ));
        }
    }

    /// A handle for the dashboard to pass WebSocket clients of `/mqtt` to the front door.
    pub fn front_door(&self) -> FrontDoor {
        FrontDoor {
            shared: self.shared.clone(),
            close: self.stop_connections.clone(),
            tracker: self.tracker.clone(),
        }
    }

    /// Puts new users and ACLs in force; connected clients stay connected.
    pub fn reload(&self, cfg: &Config) {
        self.shared.policy.store(Arc::new(Policy::from_config(&cfg.broker)));
    }

    /// Stops accepting, lets routed messages drain, tells clients, and waits up to `grace` for
    /// connections to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_accepting.cancel();
        tokio::time::sleep(DRAIN.min(grace)).await;
        self.stop_connections.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            log::warn!("{} connections still open after {grace:?}; closing", self.tracker.len());
        }
        let retained = self.shared.retained.clone();
        let _ = tokio::task::spawn_blocking(move || retained.flush()).await;
    }
}

/// An MQTT client of the engine itself, for the gateway's own components.
pub fn engine_client(engine: &Engine, client_id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, engine.v4.ip().to_string(), engine.v4.port());
    o.set_credentials(engine.user.clone(), engine.secret.clone());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
    o
}

/// A client of the engine already subscribed to `filters` (it has the SUBACK), so a component
/// misses nothing sent once clients are let in.
pub async fn subscribed_client(
    engine: &Engine,
    id: &str,
    cap: usize,
    filters: &[String],
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (client, mut events) = rumqttc::AsyncClient::new(engine_client(engine, id), cap);
    if filters.is_empty() {
        return Ok((client, events));
    }
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.poll())
            .await
            .context("engine did not answer SUBSCRIBE in 10s")??
        {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => return Ok((client, events)),
            _ => continue,
        }
    }
}

/// Publishes the stored retained messages into the engine and waits until it has them all.
async fn restore_retained(engine: &Engine, msgs: &[Retained]) -> Result<()> {
    if msgs.is_empty() {
        return Ok(());
    }
    let (client, mut events) =
        rumqttc::AsyncClient::new(engine_client(engine, "outpost-restore"), msgs.len().min(1000) + 10);
    let todo = msgs.to_vec();
    let publisher = tokio::spawn(async move {
        for m in todo {
            // QoS 1 so every message is acknowledged before clients are let in.
            client
                .publish_bytes(m.topic, rumqttc::QoS::AtLeastOnce, true, m.payload)
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30) + Duration::from_millis(msgs.len() as u64);
    while acked < msgs.len() {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .context("engine did not take the retained messages in 30s")??;
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
            acked += 1;
        }
    }
    let client = publisher.await??;
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    Ok(())
}

/// The gateway's own way to publish into the broker (bridged-in messages, state topics): the
/// same taps and retained store as a client's PUBLISH, then into the engine over one internal
/// connection.
#[derive(Clone)]
pub struct Bus {
    shared: Arc<Shared>,
    client: rumqttc::AsyncClient,
}

impl Bus {
    pub fn start(shared: Arc<Shared>) -> Bus {
        let mut opts = engine_client(&shared.engine, "outpost-bus");
        opts.set_inflight(1000);
        // Kept by the engine across a reconnect, so rumqttc resends what was in flight.
        opts.set_clean_session(false);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 1000);
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!("internal bus: {e}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Bus { shared, client }
    }

    pub async fn publish(&self, topic: &str, payload: bytes::Bytes, qos: u8, retain: bool, origin: Option<&str>) {
        // Only admins logged in to the front door may ask for grants; a bridge never may.
        if origin.is_some() && self.shared.admin_topics.load().iter().any(|(t, _)| t == topic) {
            log::warn!("a message for {topic} came in over a bridge; dropped");
            return;
        }
        let mut waits = vec![];
        let m = Incoming {
            topic,
            payload: &payload,
            qos,
            retain,
            origin,
        };
        self.shared.ingress(&m, false, &mut waits);
        let qos = rumqttc::qos(qos.min(2)).unwrap_or(rumqttc::QoS::AtLeastOnce);
        if let Err(e) = self.client.publish_bytes(topic, qos, retain, payload).await {
            log::error!("internal bus: cannot publish to {topic}: {e}");
        }
    }
}
