//! The local MQTT broker: listeners, connections (authentication, ACLs, limits, the MQTT
//! 3.1.1 and 5 protocol), and the router (subscription index, per-session queues, retained
//! messages). Everything in the gateway meets here: its own components are clients too,
//! in process ([`LocalClient`], [`Bus`]).

pub mod admission;
pub mod auth;
pub mod codec;
mod connection;
pub mod events;
pub mod listener;
pub mod metrics;
pub mod retained;
pub mod router;
pub mod topics;
pub mod websocket;

use crate::config::{self, Config};
use anyhow::Result;
use arc_swap::ArcSwap;
use auth::Policy;
use metrics::Metrics;
use retained::{Retained, RetainedStore};
use router::message::{now_ms, Message};
use router::session::{QueueLimits, Session, SubOpts};
use router::{Router, NEVER};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How sessions are kept, from `broker.sessions`.
#[derive(Clone, Debug)]
pub struct SessionsCfg {
    /// Seconds a 3.1.1 persistent session (clean session 0) outlives its connection.
    pub persistent_session_expiry: u32,
    /// The most an MQTT 5 client may ask for.
    pub max_session_expiry: u32,
}

/// State every connection shares.
pub struct Shared {
    /// Users and ACL in force; replaced whole on reload.
    pub policy: ArcSwap<Policy>,
    pub metrics: Arc<Metrics>,
    pub router: Router,
    pub retained: RetainedStore,
    pub limits: config::Limits,
    pub sessions_cfg: SessionsCfg,
    /// Logged-in clients (max_connections).
    pub sessions_allowed: Arc<Semaphore>,
    /// Open sockets of any kind, logged in or still handshaking.
    pub sockets_allowed: Arc<Semaphore>,
    /// Sockets that have not finished logging in.
    pub prelogin_allowed: Arc<Semaphore>,
    /// Those sockets, oldest first, so the oldest can be evicted for a newcomer.
    pub pending: admission::Pending,
    /// Password checks running at once (argon2 takes ~20 MiB and tens of ms each).
    pub auth_slots: Semaphore,
    /// What must see every message entering the broker (the bridges' spools); swapped on reload.
    pub taps: ArcSwap<Vec<Arc<dyn Tap>>>,
    /// Devices' credentials and ACLs from the keystore; swapped when it changes.
    pub devices: ArcSwap<HashMap<String, DeviceCred>>,
    /// Connected clients by user name ("" for anonymous), so revoking a device, or the end of
    /// a login, closes the connections it concerns at once.
    by_user: Mutex<HashMap<String, Vec<Conn>>>,
    /// Time-limited grants in force, and who may ask for them.
    pub grants: ArcSwap<GrantState>,
    /// Request topics only some users may publish on (grant requests, provisioning), with them.
    pub admin_topics: ArcSwap<Vec<(String, Vec<String>)>>,
    /// Topics under the reserved prefix that the ACL decides after all (the grants claim topic).
    pub open_topics: ArcSwap<Vec<String>>,
    /// Wills waiting out their MQTT 5 delay, by session key: a reconnect cancels them.
    delayed_wills: Mutex<HashMap<Arc<str>, CancellationToken>>,
    /// `outpost/<gateway.id>/`: the gateway's own topics (status, bridges, devices), which no
    /// client may publish to whatever the ACL says (but the request topics of their admins).
    pub reserved_prefix: String,
    /// Recent failed logins by source address and by user name, for back-off.
    failures: Mutex<HashMap<String, Failures>>,
    /// Recent refused logins and ACL denials, with names (a bounded ring).
    pub events: events::Events,
}

/// Failed logins of one source or user: how many in a row, and until when the next attempt is
/// refused without a password check.
#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    until: std::time::Instant,
}

/// Failures allowed before back-off starts, and its longest wait.
const FREE_FAILURES: u32 = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Conn {
    id: u64,
    token: CancellationToken,
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
    /// MQTT 5 properties the publisher set, forwarded untouched.
    pub props: Option<&'a router::message::Props>,
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

    /// Lets the ACL decide who may publish on `topic`, though it lies under the gateway's
    /// reserved prefix (a topic the gateway offers to clients, like the grants claim topic).
    pub fn open_topic(&self, topic: &str) {
        let mut v: Vec<String> = self
            .open_topics
            .load()
            .iter()
            .filter(|t| *t != topic)
            .cloned()
            .collect();
        v.push(topic.to_string());
        self.open_topics.store(Arc::new(v));
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
        if topic.starts_with(&self.reserved_prefix) && !self.open_topics.load().iter().any(|t| t == topic) {
            return false;
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

    /// May `id` receive a message on `topic`? Checked at every delivery, so a subscription to
    /// `#` never carries what its holder may not read, and an ended grant stops at once.
    pub fn may_read(&self, id: &auth::Identity, topic: &str) -> bool {
        let now = crate::grants::now_secs();
        if self
            .grants
            .load()
            .list
            .iter()
            .any(|g| g.allows_subscribe(id, topic, now))
        {
            return true;
        }
        if id.device {
            let devices = self.devices.load();
            return id
                .username
                .as_ref()
                .and_then(|u| devices.get(u))
                .is_some_and(|d| d.subscribe.iter().any(|f| topics::matches(topic, f)));
        }
        self.policy.load().may_read(id, topic)
    }

    /// Is a login from `source` as `user` in back-off after failures? Returns how long is left.
    pub fn login_backoff(&self, source: Option<&str>, user: Option<&str>) -> Option<Duration> {
        let now = std::time::Instant::now();
        let f = self.failures.lock().expect("failures lock");
        [source.map(|s| format!("src:{s}")), user.map(|u| format!("user:{u}"))]
            .into_iter()
            .flatten()
            .filter_map(|k| f.get(&k).filter(|x| x.until > now).map(|x| x.until - now))
            .max()
    }

    /// Records a login's outcome: failures grow a back-off per source and per user (doubling
    /// past the first few, up to 30 s); a success clears the user's.
    pub fn login_result(&self, source: Option<&str>, user: Option<&str>, ok: bool) {
        let now = std::time::Instant::now();
        let mut f = self.failures.lock().expect("failures lock");
        if f.len() > 10_000 {
            f.retain(|_, x| x.until > now);
        }
        let keys = [source.map(|s| format!("src:{s}")), user.map(|u| format!("user:{u}"))];
        for k in keys.into_iter().flatten() {
            if ok {
                f.remove(&k);
                continue;
            }
            let e = f.entry(k).or_insert(Failures { count: 0, until: now });
            e.count += 1;
            let wait = match e.count.checked_sub(FREE_FAILURES) {
                None => Duration::ZERO,
                Some(n) => (Duration::from_millis(250) * 2u32.saturating_pow(n.min(8))).min(MAX_BACKOFF),
            };
            e.until = now + wait;
        }
    }

    /// Registers a connection; its token is cancelled by [`Shared::kick`].
    pub fn register(&self, identity: &auth::Identity) -> (u64, CancellationToken, Arc<AtomicBool>) {
        let id = rand::random::<u64>();
        let token = CancellationToken::new();
        self.by_user
            .lock()
            .expect("users lock")
            .entry(identity.username.clone().unwrap_or_default())
            .or_default()
            .push(Conn {
                id,
                token: token.clone(),
            });
        (id, token, Arc::new(AtomicBool::new(false)))
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

    /// Delivery checks access per message, so nothing needs closing when access narrows (a
    /// grant ended, an ACL changed): what is no longer allowed simply stops arriving.
    /// Returns how many held subscriptions are no longer allowed, for the log.
    pub fn enforce_subscriptions(&self) -> usize {
        let mut n = 0;
        for s in self.router.sessions().iter().filter(|s| !s.internal) {
            let id = s.identity.load();
            n += s.lock().subs.keys().filter(|f| !self.may_subscribe(&id, f)).count();
        }
        n
    }

    /// Attaches a connection to its session, cancelling a delayed will of the same session.
    fn attach(
        &self,
        req: router::AttachReq,
        token: CancellationToken,
        taken_over: Arc<AtomicBool>,
    ) -> router::Attached {
        if let Some(w) = self.delayed_wills.lock().expect("wills lock").remove(req.key.as_str()) {
            w.cancel();
        }
        self.router.attach(req, token, taken_over)
    }

    /// A connection ended: publish its will (now, or after its delay), keep or end the session.
    fn detach(self: &Arc<Self>, session: &Arc<Session>, gen: u64, will: Option<codec::Will>, _failed: bool) {
        let how = self.router.detach(session, gen);
        let ended = how == router::Detached::Ended;
        let expiry = session.lock().expiry;
        if let Some(w) = will {
            let delay = if ended { 0 } else { w.delay.min(expiry) };
            if how == router::Detached::TakenOver && delay > 0 {
                // A newer connection holds the session already: a delayed will is cancelled.
            } else if delay == 0 {
                self.publish_will(session, &w);
            } else {
                let cancel = CancellationToken::new();
                self.delayed_wills
                    .lock()
                    .expect("wills lock")
                    .insert(session.key.clone(), cancel.clone());
                let (me, s) = (self.clone(), session.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(delay as u64)) => {
                            me.delayed_wills.lock().expect("wills lock").remove(&s.key);
                            me.publish_will(&s, &w);
                        }
                        _ = cancel.cancelled() => {}
                    }
                });
            }
        }
        if how == router::Detached::Kept && expiry != NEVER {
            self.expire_later(session, gen, Duration::from_secs(expiry as u64));
        }
    }

    /// Ends `session` after `after`, unless a connection took it since generation `gen` (which
    /// cancels this timer, so a client that comes and goes leaves one timer, not one each time).
    fn expire_later(self: &Arc<Self>, session: &Arc<Session>, gen: u64, after: Duration) {
        let Some(cancel) = self.router.expiry_timer(session, gen) else {
            return;
        };
        let (me, s) = (self.clone(), session.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {
                    if me.router.end_session(&s, gen) {
                        log::debug!("session {} expired", s.key);
                    }
                }
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// Takes back the sessions the store kept; those whose expiry passed while the gateway was
    /// down are ended.
    fn restore_sessions(self: &Arc<Self>, kept: Vec<router::store::Restored>) {
        let now = now_ms();
        let (mut n, mut msgs) = (0, 0);
        for r in kept {
            let left_ms = match r.expiry {
                NEVER => None,
                e => Some(r.detached_ms + e as i64 * 1000 - now),
            };
            if left_ms.is_some_and(|l| l <= 0) {
                if let Some(st) = &self.router.store {
                    st.end(&r.key);
                }
                continue;
            }
            n += 1;
            msgs += r.messages.len();
            let s = self.router.restore(r);
            if let Some(l) = left_ms {
                self.expire_later(&s, 0, Duration::from_millis(l as u64));
            }
        }
        if n > 0 {
            log::info!("restored {n} persistent sessions with {msgs} queued messages");
        }
    }

    fn publish_will(&self, session: &Session, w: &codec::Will) {
        // Checked again now: a reload may have taken the right away since CONNECT.
        let id = session.identity.load();
        let login_gone = id.username.as_deref().is_some_and(|u| {
            if id.device {
                self.device_login(u, "").is_none()
            } else {
                !self.policy.load().has_user(u)
            }
        });
        if login_gone || !self.may_publish(&id, &w.topic) {
            log::info!(
                "will of {:?} on {:?} no longer allowed; not published",
                id.client_id,
                w.topic
            );
            return;
        }
        let msg = Arc::new(Message {
            topic: Arc::from(w.topic.as_str()),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            props: w.props.clone(),
            expires_ms: w.expiry.map(|e| now_ms() + e as i64 * 1000),
            origin: None,
            from: session.id,
        });
        self.ingress(&msg, false, &mut vec![]);
    }

    fn subscribe(&self, s: &Arc<Session>, filter: &str, opts: SubOpts, rh: u8) -> (bool, Vec<Arc<Message>>) {
        self.router.subscribe(s, filter, opts, rh)
    }

    fn unsubscribe(&self, s: &Arc<Session>, filter: &str) -> bool {
        self.router.unsubscribe(s, filter)
    }

    /// A message entering the broker: retained store, the taps (bridge spools), then every
    /// session it is for. `waits` gets what must be durable before the publisher's ack.
    pub fn ingress(&self, msg: &Arc<Message>, durable: bool, waits: &mut Vec<tokio::sync::oneshot::Receiver<()>>) {
        if msg.retain {
            self.retained.put(Retained {
                topic: msg.topic.to_string(),
                payload: msg.payload.clone(),
                qos: msg.qos,
                props: msg.props.clone(),
                expires_ms: msg.expires_ms,
            });
            self.router.retain(msg);
        }
        let m = Incoming {
            topic: &msg.topic,
            payload: &msg.payload,
            qos: msg.qos,
            retain: msg.retain,
            origin: msg.origin.as_deref(),
            props: msg.props.as_deref(),
        };
        for t in self.taps.load().iter() {
            waits.extend(t.accept(&m, durable));
        }
        for t in self.router.route(msg) {
            self.router
                .push(&t, msg, false, if durable { Some(&mut *waits) } else { None });
        }
    }

    /// An in-process client for a component of the gateway, subscribed to `filters` at once.
    pub fn local_client(self: &Arc<Self>, name: &str, filters: &[String]) -> LocalClient {
        let id = auth::Identity {
            username: None,
            client_id: name.to_string(),
            listener: String::new(),
            device: false,
        };
        let req = router::AttachReq {
            key: format!("$outpost:{name}"),
            identity: id,
            clean: true,
            expiry: 0,
            internal: true,
            window: usize::MAX,
        };
        let a = self
            .router
            .attach(req, CancellationToken::new(), Arc::new(AtomicBool::new(false)));
        let c = LocalClient {
            shared: self.clone(),
            session: a.session,
            gen: a.gen,
            buf: std::collections::VecDeque::new(),
        };
        for f in filters {
            c.subscribe(f);
        }
        c
    }
}

/// A component of the gateway as a client of the broker, in process: it subscribes and
/// receives through a session like any client's (the same queue bounds), without a socket.
pub struct LocalClient {
    shared: Arc<Shared>,
    session: Arc<Session>,
    gen: u64,
    buf: std::collections::VecDeque<router::session::Delivery>,
}

impl LocalClient {
    /// Subscribes (at QoS 0: nothing in process needs acks); retained messages arrive first,
    /// with `retain` set, live ones without (as MQTT delivers them).
    pub fn subscribe(&self, filter: &str) {
        let opts = SubOpts {
            qos: 0,
            no_local: false,
            retain_as_published: false,
            id: None,
        };
        let (_, retained) = self.shared.router.subscribe(&self.session, filter, opts, 0);
        for m in retained {
            let t = router::Target {
                session: self.session.clone(),
                qos: 0,
                retain: true,
                sub_ids: vec![],
                share: None,
            };
            self.shared.router.push(&t, &m, true, None);
        }
    }

    pub fn unsubscribe(&self, filter: &str) {
        self.shared.router.unsubscribe(&self.session, filter);
    }

    /// The next message for this client.
    pub async fn recv(&mut self) -> router::session::Delivery {
        loop {
            if let Some(m) = self.buf.pop_front() {
                return m;
            }
            if let Some(t) = self.session.take(self.gen, usize::MAX, 256, |_| None) {
                self.shared.router.release(t.freed);
                self.buf.extend(t.out.into_iter().map(|(_, d)| d));
                if !self.buf.is_empty() {
                    continue;
                }
            }
            self.session.notify.notified().await;
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        let _ = self.shared.router.detach(&self.session, self.gen);
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
    /// Restores retained messages and binds every listener. Clients are let in by
    /// [`Broker::serve`], once whatever must see every message (the taps) is in place.
    pub async fn start(cfg: &Config) -> Result<Broker> {
        let limits = cfg.broker.limits.clone();
        let sc = &cfg.broker.sessions;
        let data_dir = &cfg.gateway.data_dir;
        let (store, kept) = router::store::SessionStore::open(&data_dir.join("sessions.db"))?;
        let router = Router::new(
            QueueLimits {
                max_messages: sc.max_queued_messages as usize,
                max_bytes: sc.max_queued_bytes.0 as usize,
                // Clients that are away hold half the budget at most: the live ones always
                // have the rest.
                away_bytes: sc.memory_budget.0 as usize / 2,
            },
            sc.memory_budget.0 as usize,
            Some(store),
        );
        let (retained, existing) = RetainedStore::open(&data_dir.join("retained.db"))?;
        for r in &existing {
            router.retain(&Arc::new(Message {
                topic: Arc::from(r.topic.as_str()),
                payload: r.payload.clone(),
                qos: r.qos,
                retain: true,
                props: r.props.clone(),
                expires_ms: r.expires_ms,
                origin: None,
                from: 0,
            }));
        }
        if !existing.is_empty() {
            log::info!("restored {} retained messages", existing.len());
        }
        let mut listeners = vec![];
        for (i, l) in cfg.broker.listeners.iter().enumerate() {
            listeners.push(listener::Listener::bind(i, l).await?);
        }
        let secs = |d: &Option<config::Dur>| d.as_ref().map_or(NEVER, |d| d.0.as_secs().min(NEVER as u64 - 1) as u32);
        let shared = Arc::new(Shared {
            policy: ArcSwap::from_pointee(Policy::from_config(&cfg.broker)),
            metrics: Arc::new(Metrics::default()),
            router,
            retained,
            sessions_allowed: Arc::new(Semaphore::new(limits.max_connections as usize)),
            sockets_allowed: Arc::new(Semaphore::new(limits.max_connections as usize + 256)),
            prelogin_allowed: Arc::new(Semaphore::new(256)),
            pending: admission::Pending::default(),
            auth_slots: Semaphore::new(2),
            limits,
            sessions_cfg: SessionsCfg {
                persistent_session_expiry: secs(&sc.persistent_session_expiry),
                max_session_expiry: secs(&sc.max_session_expiry),
            },
            taps: ArcSwap::from_pointee(vec![]),
            devices: ArcSwap::from_pointee(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
            grants: ArcSwap::from_pointee(GrantState::default()),
            admin_topics: ArcSwap::from_pointee(vec![]),
            open_topics: ArcSwap::from_pointee(vec![]),
            delayed_wills: Mutex::new(HashMap::new()),
            reserved_prefix: format!("outpost/{}/", cfg.gateway.id),
            failures: Mutex::new(HashMap::new()),
            events: events::Events::default(),
        });
        // Routing asks the broker who may read what (a shared group picks among those only).
        let weak = Arc::downgrade(&shared);
        let access: router::Access = Box::new(move |s, topic| {
            let Some(sh) = weak.upgrade() else { return false };
            s.internal || sh.may_read(&s.identity.load(), topic)
        });
        let _ = shared.router.access.set(access);
        shared.restore_sessions(kept);
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
    /// Connections of users removed from the config are closed: a login is only as good as the
    /// config in force.
    pub fn reload(&self, cfg: &Config) {
        let new = Arc::new(Policy::from_config(&cfg.broker));
        let old = self.shared.policy.swap(new.clone());
        for user in old.users_gone_in(&new) {
            let n = self.shared.kick(&user);
            if n > 0 {
                log::info!("user {user:?} removed from the config: {n} connection(s) closed");
            }
        }
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
        let me = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(s) = &me.router.store {
                s.flush();
            }
        })
        .await;
    }
}

/// The gateway's own way to publish into the broker (bridged-in messages, state topics): the
/// same taps, retained store and routing as a client's PUBLISH, in process.
#[derive(Clone)]
pub struct Bus {
    shared: Arc<Shared>,
}

impl Bus {
    pub fn start(shared: Arc<Shared>) -> Bus {
        Bus { shared }
    }

    pub async fn publish(&self, topic: &str, payload: bytes::Bytes, qos: u8, retain: bool, origin: Option<&str>) {
        self.publish_durable(topic, payload, qos, retain, origin, None, false)
            .await;
    }

    /// Routes the message and, when `durable`, returns what must fire before it is safe: the
    /// store commit of every persistent session it was queued for and every bridge spool it
    /// went to (a receiver that is dropped instead means it could not be kept). A message that
    /// is refused here returns none: there is nothing to wait for.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_durable(
        &self,
        topic: &str,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
        origin: Option<&str>,
        props: Option<Box<router::message::Props>>,
        durable: bool,
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        // Only admins logged in to the broker may ask for grants; a bridge never may.
        if origin.is_some() && self.shared.admin_topics.load().iter().any(|(t, _)| t == topic) {
            log::warn!("a message for {topic} came in over a bridge; dropped");
            return vec![];
        }
        if !topics::valid_topic(topic) {
            log::error!("internal bus: not a valid topic name: {topic:?}");
            return vec![];
        }
        self.shared.router.wait_for_budget().await;
        let msg = Arc::new(Message {
            topic: Arc::from(topic),
            payload,
            qos: qos.min(2),
            retain,
            props,
            expires_ms: None,
            origin: origin.map(Arc::from),
            from: 0,
        });
        let mut waits = vec![];
        self.shared.ingress(&msg, durable && msg.qos > 0, &mut waits);
        waits
    }
}
