//! The local MQTT broker: listeners, connections (authentication, ACLs, limits, the MQTT
//! 3.1.1 and 5 protocol), and the router (subscription index, per-session queues, retained
//! messages). Everything in the gateway meets here: its own components are clients too,
//! in process ([`LocalClient`], [`Bus`]).
//!
//! [`Shared`] is the hub every connection holds, in named parts: `access` (who may do what),
//! `admission` (who gets in), `registry` (connections by user), `wills` and session life
//! (`sessions.rs`, `will.rs`, `expiry.rs`), and `ingress` (where messages enter). Other modules
//! of the gateway reach it through its methods only.

pub mod access;
pub mod admission;
pub mod auth;
pub mod codec;
mod connection;
pub mod events;
mod expiry;
pub mod grant;
mod ingress;
pub mod listener;
pub mod metrics;
mod registry;
pub mod retained;
pub mod router;
mod sessions;
pub mod topics;
pub mod websocket;
mod will;

use crate::config::{self, Config};
pub use access::{Access, DeviceCred, GrantState, Right};
use admission::Admission;
use anyhow::Result;
use auth::Policy;
pub use ingress::{Bus, Incoming, LocalClient, Tap};
use metrics::Metrics;
use registry::Registry;
use retained::RetainedStore;
use router::message::Message;
use router::session::QueueLimits;
use router::{Router, NEVER};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use will::Wills;

/// How sessions are kept, from `broker.sessions`.
#[derive(Clone, Debug)]
pub struct SessionsCfg {
    /// Seconds a 3.1.1 persistent session (clean session 0) outlives its connection.
    pub persistent_session_expiry: u32,
    /// The most an MQTT 5 client may ask for.
    pub max_session_expiry: u32,
}

/// State every connection shares, in named parts.
pub struct Shared {
    /// Who may do what: policy, devices, grants, the gateway's topic rules.
    access: Arc<Access>,
    /// Who gets in: socket, session, pre-login and password-check slots, login back-off.
    admission: Admission,
    /// Connected clients by user name, so the end of a login closes them.
    registry: Registry,
    /// Wills waiting out their MQTT 5 delay.
    wills: Wills,
    metrics: Arc<Metrics>,
    router: Router,
    retained: RetainedStore,
    limits: config::Limits,
    sessions_cfg: SessionsCfg,
    /// What must see every message entering the broker (the bridges' spools); swapped on reload.
    taps: arc_swap::ArcSwap<Vec<Arc<dyn Tap>>>,
    /// Recent refused logins and ACL denials, with names (a bounded ring).
    events: events::Events,
}

impl Shared {
    pub fn access(&self) -> &Access {
        &self.access
    }
    pub fn admission(&self) -> &Admission {
        &self.admission
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    pub fn router(&self) -> &Router {
        &self.router
    }
    pub fn limits(&self) -> &config::Limits {
        &self.limits
    }
    pub fn events(&self) -> &events::Events {
        &self.events
    }

    /// How the stores' writes go: for status and `/healthz`.
    pub fn stores(&self) -> crate::status_doc::Stores {
        let h = self.retained.health();
        crate::status_doc::Stores {
            retained: crate::status_doc::StoreHealth {
                failing: h.failing.load(std::sync::atomic::Ordering::Relaxed),
                failures: h.failures.load(std::sync::atomic::Ordering::Relaxed),
            },
        }
    }

    /// Puts the taps in force (the bridges' spools): every message entering after this passes
    /// them.
    pub fn set_taps(&self, taps: Vec<Arc<dyn Tap>>) {
        self.taps.store(Arc::new(taps));
    }

    /// Closes every connection of `user`; returns how many.
    pub fn kick(&self, user: &str) -> usize {
        self.registry.kick(user)
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
                // One user's clients hold a share (a quarter by default): one user can never
                // pause the others.
                user_bytes: sc.user_bytes(),
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
        let access = Arc::new(Access::new(Policy::from_config(&cfg.broker), &cfg.gateway.id));
        // Routing asks who may read what (a shared group picks among those only).
        let reader = access.clone();
        let _ = router.access.set(Box::new(move |s, topic| {
            s.internal || reader.allows(&s.identity.load(), topic, Right::Read)
        }));
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            access,
            admission: Admission::new(limits.max_connections as usize, metrics.clone()),
            registry: Registry::default(),
            wills: Wills::default(),
            metrics,
            router,
            retained,
            limits,
            sessions_cfg: SessionsCfg {
                persistent_session_expiry: secs(&sc.persistent_session_expiry),
                max_session_expiry: secs(&sc.max_session_expiry),
            },
            taps: arc_swap::ArcSwap::from_pointee(vec![]),
            events: events::Events::default(),
        });
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
        let old = self.shared.access.set_policy(Policy::from_config(&cfg.broker));
        for user in old.users_gone_in(&self.shared.access.policy()) {
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
