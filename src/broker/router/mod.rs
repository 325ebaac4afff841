//! The router: sessions by key, the subscription index, retained messages, and the global
//! memory budget for everything queued. It decides who gets a message and at what QoS; the
//! sessions hold the queues; the connections do the protocol.
//!
//! Invariants: the index holds exactly the subscriptions of sessions in `sessions` (a removed
//! session leaves nothing behind, and memory for a filter is freed with its last subscriber);
//! `queued` is the sum of every session's `bytes`; one lock (`inner`) guards the index, the
//! session map and the retained map, and no session lock is ever taken while it is held.

pub mod index;
pub mod message;
pub mod session;
pub mod store;

use crate::broker::auth::Identity;
use index::Index;
use message::Message;
use session::{Conn, Delivery, QueueLimits, Session, SubOpts};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use store::SessionStore;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// `expiry` meaning "never".
pub const NEVER: u32 = u32::MAX;

/// A session's subscription, as the index holds it.
type Entry = SubOpts;

struct Inner {
    index: Index<u64, Entry>,
    sessions: HashMap<Arc<str>, Arc<Session>>,
    by_id: HashMap<u64, Arc<Session>>,
    retained: HashMap<Arc<str>, Arc<Message>>,
}

/// One session a message goes to, with what the delivery looks like.
pub struct Target {
    pub session: Arc<Session>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/G/F`) it goes out under, if any.
    pub share: Option<Arc<str>>,
}

/// One member of a shared group for `msg`: round robin from `cursor` over the members that are
/// connected and hold fewer deliveries than their window (Receive Maximum), so a member that
/// stops acknowledging is passed over once its window is full; if no member is ready, the
/// connected one that made progress last (a delivery written or acknowledged).
fn pick_member(
    inner: &Inner,
    group: &str,
    filter: &str,
    members: &[(u64, Entry)],
    cursor: usize,
    msg: &Message,
) -> Option<Target> {
    let n = members.len();
    let mut best: Option<(usize, usize)> = None;
    for k in 0..n {
        let i = (cursor + k) % n;
        let (id, o) = &members[i];
        let Some(s) = inner.by_id.get(id) else { continue };
        if o.no_local && *id == msg.from {
            continue;
        }
        let load = s.pending.load(Ordering::Relaxed);
        let window = s.window.load(Ordering::Relaxed);
        let online = s.online.load(Ordering::Relaxed);
        if online && load < window {
            best = Some((i, 0));
            break;
        }
        // Not ready: connected members first, the one that made progress last, then the one
        // with the least queued past its window.
        let past = load.saturating_sub(window);
        let stale_ms = (message::now_ms() as u64).saturating_sub(s.progress_ms.load(Ordering::Relaxed)) as usize;
        let score = if online {
            stale_ms.min(usize::MAX / 8) * 4 + past.min(3)
        } else {
            usize::MAX / 2 + past.min(usize::MAX / 4)
        };
        if best.is_none_or(|(_, b)| score < b) {
            best = Some((i, score));
        }
    }
    let (id, o) = &members[best?.0];
    Some(Target {
        session: inner.by_id.get(id)?.clone(),
        qos: o.qos.min(msg.qos),
        retain: o.retain_as_published && msg.retain,
        sub_ids: o.id.into_iter().collect(),
        share: Some(Arc::from(format!("$share/{group}/{filter}"))),
    })
}

pub struct Router {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Picks where a shared group's round starts for each message.
    share_cursor: AtomicUsize,
    pub limits: QueueLimits,
    /// Bytes queued in all sessions together, and the most they may hold before publishers
    /// are paused (back-pressure).
    queued: AtomicUsize,
    budget: usize,
    budget_freed: Notify,
    /// Counters over all sessions, kept when sessions end.
    pub dropped_queue_full: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_expired: AtomicU64,
    pub paused: AtomicU64,
    /// Flips while publishers wait for the budget, so a waiting reader is logged once.
    over: AtomicBool,
    /// Where sessions that outlive their connection are kept (`None` in tests of the router alone).
    pub store: Option<SessionStore>,
}

/// Who opens a session, and how.
pub struct AttachReq {
    pub key: String,
    pub identity: Identity,
    /// Discard what the session had (3.1.1 clean session, MQTT 5 clean start).
    pub clean: bool,
    /// Seconds the session outlives the connection ([`NEVER`]: kept until cleaned).
    pub expiry: u32,
    /// A component of the gateway itself.
    pub internal: bool,
    /// The connection's Receive Maximum (deliveries in flight toward it at most).
    pub window: usize,
}

/// What became of a session when its connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    Ended,
    Kept,
    TakenOver,
}

/// What `attach` found.
pub struct Attached {
    pub session: Arc<Session>,
    pub present: bool,
    pub gen: u64,
}

impl Router {
    pub fn new(limits: QueueLimits, budget: usize, store: Option<SessionStore>) -> Router {
        Router {
            inner: Mutex::new(Inner {
                index: Index::new(),
                sessions: HashMap::new(),
                by_id: HashMap::new(),
                retained: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
            share_cursor: AtomicUsize::new(0),
            limits,
            queued: AtomicUsize::new(0),
            budget,
            budget_freed: Notify::new(),
            dropped_queue_full: AtomicU64::new(0),
            dropped_too_large: AtomicU64::new(0),
            dropped_expired: AtomicU64::new(0),
            paused: AtomicU64::new(0),
            over: AtomicBool::new(false),
            store,
        }
    }

    fn stored(&self, s: &Session) -> Option<&SessionStore> {
        self.store.as_ref().filter(|_| s.persisted.load(Ordering::Relaxed))
    }

    /// Puts a session from the store back, offline, with its subscriptions and messages.
    pub fn restore(&self, r: store::Restored) -> Arc<Session> {
        let mut inner = self.lock();
        let s = self.new_session_locked(&mut inner, &r.key, r.identity, false, r.expiry);
        s.persisted.store(true, Ordering::Relaxed);
        for (f, o) in &r.subs {
            let (group, filter) = split_share(f);
            inner.index.insert(filter, group, s.id, o.clone());
        }
        drop(inner);
        {
            let mut st = s.lock();
            st.subs = r.subs.into_iter().collect();
            st.incoming_qos2 = r.qos2_in.into_iter().collect();
        }
        let added = s.restore(r.messages.into_iter().map(|(_, d, p, rel)| (d, p, rel)).collect());
        self.queued.fetch_add(added, Ordering::Relaxed);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens (or resumes) the session `key` for a new connection. A connection holding it now
    /// is told to go (its token is cancelled). `clean` discards what the session had.
    pub fn attach(&self, req: AttachReq, token: CancellationToken, taken_over: Arc<AtomicBool>) -> Attached {
        let AttachReq {
            key,
            identity,
            clean,
            expiry,
            internal,
            window,
        } = req;
        let key = key.as_str();
        let mut inner = self.lock();
        let existing = inner.sessions.get(key).cloned();
        let (session, present) = match existing {
            Some(s) if !clean => (s, true),
            Some(s) => {
                Self::remove_locked(&mut inner, &s);
                if let Some(st) = self.stored(&s) {
                    st.end(&s.key);
                }
                let freed = s.clear();
                self.release(freed);
                if let Some(c) = s.lock().conn.take() {
                    c.taken_over.store(true, Ordering::Relaxed);
                    c.token.cancel();
                }
                (
                    self.new_session_locked(&mut inner, key, identity.clone(), internal, expiry),
                    false,
                )
            }
            None => (
                self.new_session_locked(&mut inner, key, identity.clone(), internal, expiry),
                false,
            ),
        };
        drop(inner);
        session.identity.store(Arc::new(identity));
        session.window.store(window, Ordering::Relaxed);
        let mut st = session.lock();
        if let Some(old) = st.conn.take() {
            old.taken_over.store(true, Ordering::Relaxed);
            old.token.cancel();
        }
        st.gen += 1;
        let gen = st.gen;
        st.expiry = expiry;
        st.conn = Some(Conn { gen, token, taken_over });
        drop(st);
        if let Some(store) = self.store.as_ref().filter(|_| !internal && expiry > 0) {
            session.persisted.store(true, Ordering::Relaxed);
            store.session(&session.key, &session.identity.load(), expiry);
        }
        session.online.store(true, Ordering::Relaxed);
        // Wake a writer of an older generation so it notices and stops.
        session.notify.notify_waiters();
        Attached { session, present, gen }
    }

    fn new_session_locked(
        &self,
        inner: &mut Inner,
        key: &str,
        identity: Identity,
        internal: bool,
        expiry: u32,
    ) -> Arc<Session> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(key);
        let s = Arc::new(Session::new(id, key.clone(), identity, internal, expiry));
        inner.sessions.insert(key, s.clone());
        inner.by_id.insert(id, s.clone());
        s
    }

    /// The connection of generation `gen` has ended: the session ends with it (expiry 0), is
    /// kept for a later connection, or was already taken by a newer one.
    pub fn detach(&self, session: &Arc<Session>, gen: u64) -> Detached {
        let expiry = {
            let mut st = session.lock();
            if st.gen != gen {
                return Detached::TakenOver;
            }
            st.conn = None;
            st.expiry
        };
        session.online.store(false, Ordering::Relaxed);
        if expiry == 0 {
            self.end_session(session, gen);
            return Detached::Ended;
        }
        if let Some(store) = self.stored(session) {
            store.detached(&session.key, message::now_ms(), expiry);
        }
        Detached::Kept
    }

    /// Ends `session` if no connection came back since generation `gen`; returns whether it did.
    pub fn end_session(&self, session: &Arc<Session>, gen: u64) -> bool {
        let mut inner = self.lock();
        {
            let st = session.lock();
            if st.gen != gen || st.conn.is_some() {
                return false;
            }
        }
        if !inner
            .sessions
            .get(&session.key)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            return false;
        }
        Self::remove_locked(&mut inner, session);
        drop(inner);
        if let Some(st) = self.stored(session) {
            st.end(&session.key);
        }
        // What a shared group gave this session and it never acknowledged goes to another
        // member of the group (MQTT 5 4.8.2); the rest ends with the session.
        let (shared, freed) = session.drain_shared();
        self.release(freed);
        let freed = session.clear();
        self.release(freed);
        self.reroute_shared(shared);
        true
    }

    fn reroute_shared(&self, deliveries: Vec<Delivery>) {
        for d in deliveries {
            let Some(share) = d.share.clone() else { continue };
            let target = {
                let inner = self.lock();
                let (group, filter) = split_share(&share);
                let mut t = None;
                let cursor = self.share_cursor.fetch_add(1, Ordering::Relaxed);
                inner.index.for_each_match(
                    &d.msg.topic,
                    |_, _| {},
                    |g, f, members| {
                        if Some(g) == group && f == filter && t.is_none() {
                            t = pick_member(&inner, g, f, members, cursor, &d.msg);
                        }
                    },
                );
                t
            };
            if let Some(t) = target {
                self.push(&t, &d.msg, false, None);
            }
        }
    }

    fn remove_locked(inner: &mut Inner, session: &Arc<Session>) {
        let subs: Vec<Arc<str>> = session.lock().subs.drain().map(|(f, _)| f).collect();
        for f in subs {
            let (group, filter) = split_share(&f);
            inner.index.remove(filter, group, &session.id);
        }
        inner.sessions.remove(&session.key);
        inner.by_id.remove(&session.id);
    }

    /// Adds or replaces a subscription; returns whether it existed before, and the retained
    /// messages to send for it (per its retain handling; none for shared subscriptions).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        filter: &str,
        opts: SubOpts,
        retain_handling: u8,
    ) -> (bool, Vec<Arc<Message>>) {
        let mut inner = self.lock();
        let (group, inner_filter) = split_share(filter);
        let existed = inner.index.insert(inner_filter, group, session.id, opts.clone());
        if let Some(st) = self.stored(session) {
            st.sub(&session.key, filter, &opts);
        }
        session.lock().subs.insert(Arc::from(filter), opts);
        let send = group.is_none() && (retain_handling == 0 || (retain_handling == 1 && !existed));
        let retained = if send {
            let now = message::now_ms();
            inner
                .retained
                .values()
                .filter(|m| !m.expired(now) && crate::broker::topics::matches(&m.topic, inner_filter))
                .cloned()
                .collect()
        } else {
            vec![]
        };
        (existed, retained)
    }

    /// Removes a subscription; returns whether the session held it.
    pub fn unsubscribe(&self, session: &Arc<Session>, filter: &str) -> bool {
        let mut inner = self.lock();
        let (group, inner_filter) = split_share(filter);
        let held = session.lock().subs.remove(filter).is_some();
        if held {
            inner.index.remove(inner_filter, group, &session.id);
            if let Some(st) = self.stored(session) {
                st.unsub(&session.key, filter);
            }
        }
        held
    }

    /// Who gets `msg`: one delivery per session for its plain subscriptions (the highest
    /// granted QoS among those that match, every subscription identifier), and one member of
    /// each matching shared group (round robin, skipping members offline or with a fuller
    /// queue than the window, so a slow member never stalls the group).
    pub fn route(&self, msg: &Message) -> Vec<Target> {
        let inner = self.lock();
        let mut plain: HashMap<u64, Target> = HashMap::new();
        let mut shared: Vec<Target> = vec![];
        let cursor = self.share_cursor.fetch_add(1, Ordering::Relaxed);
        inner.index.for_each_match(
            &msg.topic,
            |id, o| {
                if o.no_local && *id == msg.from {
                    return;
                }
                let Some(s) = inner.by_id.get(id) else { return };
                let qos = o.qos.min(msg.qos);
                let t = plain.entry(*id).or_insert_with(|| Target {
                    session: s.clone(),
                    qos,
                    retain: false,
                    sub_ids: vec![],
                    share: None,
                });
                t.qos = t.qos.max(qos);
                t.retain |= o.retain_as_published && msg.retain;
                if let Some(i) = o.id {
                    t.sub_ids.push(i);
                }
            },
            |group, filter, members| {
                if let Some(t) = pick_member(&inner, group, filter, members, cursor, msg) {
                    shared.push(t);
                }
            },
        );
        let mut out: Vec<Target> = plain.into_values().collect();
        out.extend(shared);
        out
    }

    /// Keeps `msg` as the retained message of its topic; an empty payload removes it.
    pub fn retain(&self, msg: &Arc<Message>) {
        let mut inner = self.lock();
        if msg.payload.is_empty() {
            inner.retained.remove(&msg.topic);
        } else {
            inner.retained.insert(msg.topic.clone(), msg.clone());
        }
    }

    pub fn retained_count(&self) -> usize {
        self.lock().retained.len()
    }

    /// Queues a delivery into a session, counting it against the budget. For a persistent
    /// session, QoS 1/2 deliveries go to the store too; with `waits`, what to wait for before
    /// the publisher is acknowledged is added there.
    pub fn push(
        &self,
        t: &Target,
        msg: &Arc<Message>,
        force: bool,
        waits: Option<&mut Vec<tokio::sync::oneshot::Receiver<()>>>,
    ) -> bool {
        // QoS 0 is not kept for a client that is away (as Mosquitto does by default).
        if !t.session.online.load(Ordering::Relaxed) && t.qos == 0 && !t.session.internal {
            return false;
        }
        let store = self.stored(&t.session).filter(|_| t.qos > 0);
        let d = Delivery {
            msg: msg.clone(),
            qos: t.qos,
            retain: t.retain,
            sub_ids: t.sub_ids.clone(),
            store_id: store.map_or(0, |s| s.next_id()),
            share: t.share.clone(),
        };
        let mut wait = None;
        let queued = |d: &Delivery| {
            if let Some(s) = store {
                wait = s.enqueue(&t.session.key, d.store_id, d, waits.is_some());
            }
        };
        let res = t.session.push(d, &self.limits, force, queued);
        if let (Some(w), Some(ws)) = (wait, waits) {
            ws.push(w);
        }
        match res {
            Ok(cost) => {
                self.queued.fetch_add(cost, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A delivery's store row is no longer needed (acknowledged, dropped).
    pub fn done(&self, id: u64) {
        if let (Some(s), true) = (&self.store, id != 0) {
            s.done(id);
        }
    }

    /// Returns bytes to the budget (a delivery was written or acknowledged).
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let before = self.queued.fetch_sub(bytes, Ordering::Relaxed);
        if before >= self.budget && before - bytes < self.budget {
            self.budget_freed.notify_waiters();
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Do the queues hold the whole budget (so publishers are held back)?
    pub fn over_budget(&self) -> bool {
        let over = self.queued.load(Ordering::Relaxed) >= self.budget;
        if over && !self.over.swap(true, Ordering::Relaxed) {
            self.paused.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "queued messages hold the memory budget ({} bytes): pausing publishers",
                self.budget
            );
        }
        over
    }

    /// Returns once some budget was freed (or after a short while: a missed wake-up only delays).
    pub async fn budget_freed(&self) {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), self.budget_freed.notified()).await;
    }

    /// Waits while the queues hold the whole budget: publishers stop being read (TCP pushes
    /// back on them) instead of anything being dropped.
    pub async fn wait_for_budget(&self) {
        loop {
            let freed = self.budget_freed.notified();
            if self.queued.load(Ordering::Relaxed) < self.budget {
                if self.over.swap(false, Ordering::Relaxed) {
                    log::info!("queued messages back under the memory budget; reading publishers again");
                }
                return;
            }
            if !self.over.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "queued messages hold the memory budget ({} bytes): pausing publishers",
                    self.budget
                );
            }
            self.paused.fetch_add(1, Ordering::Relaxed);
            // A timeout as well, so a missed wake-up can only delay, never hang.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), freed).await;
        }
    }

    /// Sessions held now (connected or kept), and how many are connected.
    pub fn session_counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let online = inner
            .sessions
            .values()
            .filter(|s| s.online.load(Ordering::Relaxed))
            .count();
        (inner.sessions.len(), online)
    }

    pub fn subscription_count(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.index.len(), inner.index.node_count())
    }

    /// Every session, for checks that walk them all (access re-checks, status).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.lock().sessions.values().cloned().collect()
    }

    /// The router's state for `status.json` (and so `outpost status` and `/metrics`): sessions,
    /// subscriptions, queues against their bounds, and every drop by reason, in total and for
    /// the sessions that dropped most.
    pub fn snapshot(&self) -> serde_json::Value {
        let (subs, nodes) = self.subscription_count();
        let sessions = self.sessions();
        let online = sessions.iter().filter(|s| s.online.load(Ordering::Relaxed)).count();
        let mut dropping: Vec<(u64, serde_json::Value)> = sessions
            .iter()
            .filter(|s| !s.internal)
            .filter_map(|s| {
                let d = s.drops();
                let total: u64 = d.values().sum();
                (total > 0).then(|| {
                    let mut v = serde_json::json!({ "session": &*s.key, "queued": s.pending.load(Ordering::Relaxed) });
                    for r in session::DropReason::ALL {
                        v[r.name()] = d.get(&r).copied().unwrap_or(0).into();
                    }
                    (total, v)
                })
            })
            .collect();
        dropping.sort_by_key(|d| std::cmp::Reverse(d.0));
        dropping.truncate(20);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "sessions": sessions.iter().filter(|s| !s.internal).count(),
            "sessions_connected": sessions.iter().filter(|s| !s.internal && s.online.load(Ordering::Relaxed)).count(),
            "internal_clients": sessions.len() - sessions.iter().filter(|s| !s.internal).count(),
            "online": online,
            "subscriptions": subs,
            "index_nodes": nodes,
            "retained": self.retained_count(),
            "queued_bytes": self.queued_bytes(),
            "memory_budget": self.budget,
            "max_queued_messages": self.limits.max_messages,
            "max_queued_bytes": self.limits.max_bytes,
            "publisher_pauses": g(&self.paused),
            "dropped": {
                "queue_full": g(&self.dropped_queue_full),
                "too_large": g(&self.dropped_too_large),
                "expired": g(&self.dropped_expired),
            },
            "sessions_dropping": dropping.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        })
    }

    pub fn session(&self, key: &str) -> Option<Arc<Session>> {
        self.lock().sessions.get(key).cloned()
    }
}

/// `$share/G/F` → (`Some(G)`, `F`); any other filter → (`None`, itself).
pub fn split_share(f: &str) -> (Option<&str>, &str) {
    match f.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
        Some((g, inner)) => (Some(g), inner),
        None => (None, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn id(c: &str) -> Identity {
        Identity {
            username: None,
            client_id: c.into(),
            listener: String::new(),
            device: false,
        }
    }

    fn router(max_messages: usize) -> Router {
        Router::new(
            QueueLimits {
                max_messages,
                max_bytes: 1 << 30,
            },
            1 << 30,
            None,
        )
    }

    fn attach(r: &Router, key: &str, clean: bool, expiry: u32) -> Attached {
        attach_with_window(r, key, clean, expiry, usize::MAX)
    }

    fn attach_with_window(r: &Router, key: &str, clean: bool, expiry: u32, window: usize) -> Attached {
        let req = AttachReq {
            key: key.into(),
            identity: id(key),
            clean,
            expiry,
            internal: false,
            window,
        };
        r.attach(req, CancellationToken::new(), Arc::new(AtomicBool::new(false)))
    }

    fn msg(topic: &str, qos: u8) -> Arc<Message> {
        Arc::new(Message {
            topic: Arc::from(topic),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            props: None,
            expires_ms: None,
            origin: None,
            from: 0,
        })
    }

    fn opts(qos: u8, id: Option<u32>) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            id,
        }
    }

    fn publish(r: &Router, m: &Arc<Message>) -> usize {
        r.route(m).iter().filter(|t| r.push(t, m, false, None)).count()
    }

    #[test]
    fn overlapping_subscriptions_give_one_delivery_at_the_highest_qos_with_every_id() {
        let r = router(100);
        let a = attach(&r, ":a", true, 0);
        r.subscribe(&a.session, "s/+", opts(1, Some(1)), 0);
        r.subscribe(&a.session, "s/#", opts(2, Some(2)), 0);
        let t = r.route(&msg("s/x", 2));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].qos, 2);
        let mut ids = t[0].sub_ids.clone();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
        // The publish's QoS caps the delivery.
        assert_eq!(r.route(&msg("s/x", 0))[0].qos, 0);
    }

    #[test]
    fn a_shared_group_skips_a_member_that_does_not_read() {
        let r = router(100_000);
        let slow = attach_with_window(&r, ":slow", true, 0, 10);
        let fast = attach_with_window(&r, ":fast", true, 0, 10);
        r.subscribe(&slow.session, "$share/g/t", opts(1, None), 0);
        r.subscribe(&fast.session, "$share/g/t", opts(1, None), 0);
        for _ in 0..1000 {
            assert_eq!(publish(&r, &msg("t", 1)), 1, "each message goes to exactly one member");
            // Only the fast member reads.
            let t = fast.session.take(fast.gen, usize::MAX, usize::MAX, |_| true).unwrap();
            for (pkid, _) in t.out {
                fast.session.acked(pkid, false);
            }
        }
        let stuck = slow.session.pending.load(Ordering::Relaxed);
        assert_eq!(stuck, 10, "the slow member gets its window's worth, no more");
        // When it leaves, what it held goes to the member that reads.
        assert_eq!(r.detach(&slow.session, slow.gen), Detached::Ended);
        assert_eq!(fast.session.pending.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_full_queue_drops_for_that_session_alone_and_counts() {
        let r = router(10);
        let full = attach(&r, ":full", true, 0);
        let other = attach(&r, ":other", true, 0);
        r.subscribe(&full.session, "t", opts(1, None), 0);
        r.subscribe(&other.session, "t", opts(1, None), 0);
        for _ in 0..15 {
            publish(&r, &msg("t", 1));
            let t = other.session.take(other.gen, usize::MAX, usize::MAX, |_| true).unwrap();
            for (pkid, _) in t.out {
                other.session.acked(pkid, false);
            }
        }
        assert_eq!(full.session.pending.load(Ordering::Relaxed), 10);
        assert_eq!(full.session.drops().get(&session::DropReason::QueueFull), Some(&5));
        assert_eq!(r.dropped_queue_full.load(Ordering::Relaxed), 5);
        assert!(other.session.drops().is_empty());
        assert_eq!(other.session.delivered.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn the_budget_comes_back_and_an_ended_session_leaves_nothing() {
        let r = router(1000);
        let (subs0, nodes0) = r.subscription_count();
        let a = attach(&r, ":a", true, 0);
        r.subscribe(&a.session, "x/y/z/#", opts(1, None), 0);
        r.subscribe(&a.session, "$share/g/x/+", opts(0, None), 0);
        for _ in 0..50 {
            publish(&r, &msg("x/y/z/w", 1));
        }
        assert!(r.queued_bytes() > 0);
        let t = a.session.take(a.gen, 20, usize::MAX, |_| true).unwrap();
        assert_eq!(t.out.len(), 20, "the window bounds what is in flight");
        r.release(t.freed);
        for (pkid, _) in t.out {
            let (freed, _) = a.session.acked(pkid, false).unwrap();
            r.release(freed);
        }
        assert_eq!(a.session.pending.load(Ordering::Relaxed), 30);
        assert_eq!(r.detach(&a.session, a.gen), Detached::Ended);
        assert_eq!(r.queued_bytes(), 0, "ending the session returned its bytes");
        assert_eq!(r.subscription_count(), (subs0, nodes0));
        assert_eq!(r.session_counts(), (0, 0));
    }

    #[test]
    fn a_kept_session_is_resumed_and_a_clean_start_discards_it() {
        let r = router(1000);
        let a = attach(&r, ":k", false, NEVER);
        r.subscribe(&a.session, "t", opts(1, None), 0);
        assert_eq!(r.detach(&a.session, a.gen), Detached::Kept);
        publish(&r, &msg("t", 1));
        publish(&r, &msg("t", 0));
        let b = attach(&r, ":k", false, NEVER);
        assert!(b.present && Arc::ptr_eq(&a.session, &b.session));
        let t = b.session.take(b.gen, 100, 100, |_| true).unwrap();
        assert_eq!(t.out.len(), 1, "the QoS 1 message waited, the QoS 0 one was not kept");
        // The older generation may no longer take.
        assert!(a.session.take(a.gen, 100, 100, |_| true).is_none());
        let c = attach(&r, ":k", true, 0);
        assert!(!c.present && !Arc::ptr_eq(&a.session, &c.session));
        assert!(r.route(&msg("t", 1)).is_empty());
    }
}
