//! Where messages enter the broker: clients' PUBLISHes and wills (through [`Shared::ingress`]),
//! the gateway's own publishes ([`Bus`]), and the gateway's components as in-process clients
//! ([`LocalClient`]). Every message passes the retained store, then the taps (the bridges'
//! spools), then the router.

use super::retained::Retained;
use super::router::message::Message;
use super::router::session::{Session, SubOpts};
use super::{auth, router, topics, Shared};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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
    /// A message entering the broker: retained store, the taps (bridge spools), then every
    /// session it is for. `waits` gets what must be durable before the publisher's ack.
    pub(super) fn ingress(
        &self,
        msg: &Arc<Message>,
        durable: bool,
        waits: &mut Vec<tokio::sync::oneshot::Receiver<()>>,
    ) {
        if msg.retain {
            let kept = self.retained.put(
                Retained {
                    topic: msg.topic.to_string(),
                    payload: msg.payload.clone(),
                    qos: msg.qos,
                    props: msg.props.clone(),
                    expires_ms: msg.expires_ms,
                },
                durable,
            );
            // A QoS 1/2 one is acknowledged only once it is on disk.
            waits.extend(kept);
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
        if origin.is_some() && self.shared.access.is_restricted(topic) {
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
