//! The router: sessions by key, the subscription index, retained messages, and the global
//! memory budget for everything queued. It decides who gets a message and at what QoS; the
//! sessions hold the queues; the connections do the protocol.
//!
//! Invariants: the index holds exactly the subscriptions of sessions in `sessions` (a removed
//! session leaves nothing behind, and memory for a filter is freed with its last subscriber);
//! `queued` is the sum of every session's `bytes`, `away` that of the sessions no connection
//! holds; one lock (`inner`) guards the index, the session map and the retained map. A session
//! lock may be taken while it is held (attach, end, subscribe: so a session is never half in
//! the router), never the other way round.

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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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
/// connected one that had room last (see `Session::room_at`).
/// Only members that may read the message's topic are candidates, and a member whose queue is
/// at its bound is not ready whatever its window.
fn pick_member(
    router: &Router,
    inner: &Inner,
    (group, filter): (&str, &str),
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
        if !router.readable(s, &msg.topic) {
            continue;
        }
        let load = s.pending.load(Ordering::Relaxed);
        let window = s.window.load(Ordering::Relaxed).min(router.limits.max_messages);
        let online = s.online.load(Ordering::Relaxed);
        // A member whose user holds its share would only drop the message: it is not ready,
        // and scores behind every member that could still take it.
        let at_share = s.user_bytes() >= router.limits.user_bytes;
        if online && load < window && !at_share {
            best = Some((i, 0));
            break;
        }
        // Not ready: connected members first, the one that had room last, then the one with
        // the least queued past its window.
        let past = load.saturating_sub(window);
        let stale = session::ROOM
            .load(Ordering::Relaxed)
            .saturating_sub(s.room_at.load(Ordering::Relaxed)) as usize;
        let score = if at_share {
            usize::MAX - 1
        } else if online {
            stale.min(usize::MAX / 8) * 4 + past.min(3)
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
    pub dropped_away_budget: AtomicU64,
    pub dropped_user_share: AtomicU64,
    pub dropped_denied: AtomicU64,
    pub paused: AtomicU64,
    /// Bytes queued in sessions no connection holds (bounded by `limits.away_bytes`).
    away: Arc<AtomicUsize>,
    /// Bytes queued in the sessions of each user (each bounded by `limits.user_bytes`).
    users: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// May this session read this topic now? Set by the broker (its ACLs, grants and devices);
    /// unset, everything is readable (the router tested alone).
    pub access: OnceLock<Access>,
    /// Flips while publishers wait for the budget, so a waiting reader is logged once.
    over: AtomicBool,
    /// Where sessions that outlive their connection are kept (`None` in tests of the router alone).
    pub store: Option<SessionStore>,
}

/// The broker's read check, as the router calls it.
pub type Access = Box<dyn Fn(&Session, &str) -> bool + Send + Sync>;

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
            dropped_away_budget: AtomicU64::new(0),
            dropped_user_share: AtomicU64::new(0),
            dropped_denied: AtomicU64::new(0),
            paused: AtomicU64::new(0),
            away: Arc::new(AtomicUsize::new(0)),
            users: Mutex::new(HashMap::new()),
            access: OnceLock::new(),
            over: AtomicBool::new(false),
            store,
        }
    }

    fn readable(&self, s: &Session, topic: &str) -> bool {
        self.access.get().is_none_or(|f| f(s, topic))
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
    /// is told to go (its token is cancelled). `clean` ends what the session had.
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
        let (session, present, ended) = match existing {
            Some(s) if !clean => (s, true, None),
            Some(s) => {
                self.close_locked(&mut inner, &s);
                let new = self.new_session_locked(&mut inner, key, identity.clone(), internal, expiry);
                (new, false, Some(s))
            }
            None => (
                self.new_session_locked(&mut inner, key, identity.clone(), internal, expiry),
                false,
                None,
            ),
        };
        // Under the router lock: an expiry racing this attach either ended the session first
        // (and a new one was made above) or finds it held.
        let (gen, was_persisted) = {
            let mut st = session.lock();
            if let Some(old) = st.conn.take() {
                old.taken_over.store(true, Ordering::Relaxed);
                old.token.cancel();
            }
            if let Some(t) = st.expiry_timer.take() {
                t.cancel();
            }
            st.gen += 1;
            st.expiry = expiry;
            st.conn = Some(Conn {
                gen: st.gen,
                token,
                taken_over,
            });
            session.set_away(&mut st, false);
            session.identity.store(Arc::new(identity));
            session.window.store(window, Ordering::Relaxed);
            session.online.store(true, Ordering::Relaxed);
            (st.gen, session.persisted.load(Ordering::Relaxed))
        };
        // Still under the router lock, so the store hears of sessions of one key in the order
        // they come and go (an end sent later would wipe a newer session's rows).
        if let Some(store) = self.store.as_ref().filter(|_| !internal && expiry > 0) {
            session.persisted.store(true, Ordering::Relaxed);
            store.session(&session.key, &session.identity.load(), expiry);
            if !was_persisted {
                // It outlives its connection from now on: what it holds goes to the store too.
                self.persist_whole(&session, store);
            }
        }
        drop(inner);
        if let Some(old) = ended {
            self.finish_end(&old);
        }
        // Wake a writer of an older generation so it notices and stops.
        session.notify.notify_waiters();
        Attached { session, present, gen }
    }

    /// Writes what a session that just became persistent holds: its subscriptions and its
    /// QoS 1/2 deliveries, queued or in flight.
    fn persist_whole(&self, session: &Session, store: &SessionStore) {
        let mut st = session.lock();
        for (f, o) in &st.subs {
            store.sub(&session.key, f, o);
        }
        for &pkid in &st.incoming_qos2 {
            store.qos2_in(&session.key, pkid, true);
        }
        let st = &mut *st;
        for f in st.inflight.iter_mut().filter(|f| f.d.qos > 0 && f.d.store_id == 0) {
            f.d.store_id = store.next_id();
            let _ = store.enqueue(&session.key, f.d.store_id, &f.d, false);
            store.sent(f.d.store_id, f.pkid);
            if f.released {
                store.released(f.d.store_id);
            }
        }
        for d in st.queue.iter_mut().filter(|d| d.qos > 0 && d.store_id == 0) {
            d.store_id = store.next_id();
            let _ = store.enqueue(&session.key, d.store_id, d, false);
        }
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
        // The gateway's own sessions are no user's: they count apart from anonymous clients.
        let user = match internal {
            true => self.user_total("$outpost"),
            false => self.user_total(identity.username.as_deref().unwrap_or("")),
        };
        let s = Arc::new(Session::new(
            id,
            key.clone(),
            identity,
            internal,
            expiry,
            (self.away.clone(), user),
        ));
        inner.sessions.insert(key, s.clone());
        inner.by_id.insert(id, s.clone());
        s
    }

    /// The counter of bytes queued for `user`'s sessions, shared by all of them.
    fn user_total(&self, user: &str) -> Arc<AtomicUsize> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.entry(user.to_string()).or_default().clone()
    }

    /// The connection of generation `gen` has ended: the session ends with it (expiry 0), is
    /// kept for a later connection, or was already taken by a newer one (`Ended` when that one
    /// started clean, which ended this session).
    pub fn detach(&self, session: &Arc<Session>, gen: u64) -> Detached {
        let expiry = {
            let mut st = session.lock();
            if st.gen != gen {
                return if st.closed && st.gen == gen + 1 {
                    Detached::Ended
                } else {
                    Detached::TakenOver
                };
            }
            st.conn = None;
            session.set_away(&mut st, true);
            session.online.store(false, Ordering::Relaxed);
            st.expiry
        };
        if expiry == 0 {
            return if self.end_session(session, gen) {
                Detached::Ended
            } else {
                Detached::TakenOver
            };
        }
        if let Some(store) = self.stored(session) {
            store.detached(&session.key, crate::system::clock::now_ms(), expiry);
        }
        Detached::Kept
    }

    /// Ends `session` if no connection came back since generation `gen`; returns whether it did.
    pub fn end_session(&self, session: &Arc<Session>, gen: u64) -> bool {
        let mut inner = self.lock();
        {
            let st = session.lock();
            if st.gen != gen || st.conn.is_some() || st.closed {
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
        self.close_locked(&mut inner, session);
        drop(inner);
        self.finish_end(session);
        true
    }

    /// Takes a session out of the router (index, maps) and closes it: a connection holding it
    /// is told it was taken over, and nothing more is queued or subscribed to it.
    fn close_locked(&self, inner: &mut Inner, session: &Arc<Session>) {
        if let Some(store) = self.stored(session) {
            store.end(&session.key);
        }
        let mut st = session.lock();
        for (f, _) in st.subs.drain() {
            let (group, filter) = split_share(&f);
            inner.index.remove(filter, group, &session.id);
        }
        inner.sessions.remove(&session.key);
        inner.by_id.remove(&session.id);
        st.closed = true;
        st.gen += 1;
        if let Some(c) = st.conn.take() {
            c.taken_over.store(true, Ordering::Relaxed);
            c.token.cancel();
        }
        if let Some(t) = st.expiry_timer.take() {
            t.cancel();
        }
        session.set_away(&mut st, false);
        drop(st);
        session.online.store(false, Ordering::Relaxed);
        session.notify.notify_waiters();
    }

    /// After `close_locked`, outside the router lock: the session's bytes go back to the budget,
    /// and what a shared group gave it and it never acknowledged goes to another member of the
    /// group (MQTT 5 4.8.2); the rest ends with the session.
    fn finish_end(&self, session: &Arc<Session>) {
        let (shared, freed) = session.drain_shared();
        self.release(freed);
        let freed = session.clear();
        self.release(freed);
        self.reroute_shared(shared);
    }

    /// Arms the expiry of a session left away by generation `gen`; a new connection (or another
    /// arming) cancels it. Returns the token the timer waits on, or `None` when a connection
    /// took the session since (then its own end arms the timer).
    pub fn expiry_timer(&self, session: &Session, gen: u64) -> Option<CancellationToken> {
        let mut st = session.lock();
        if st.gen != gen || st.conn.is_some() || st.closed {
            return None;
        }
        let t = CancellationToken::new();
        if let Some(old) = st.expiry_timer.replace(t.clone()) {
            old.cancel();
        }
        Some(t)
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
                            t = pick_member(self, &inner, (g, f), members, cursor, &d.msg);
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
        let mut st = session.lock();
        if st.closed {
            // Its connection is on its way out (a clean start replaced the session).
            return (false, vec![]);
        }
        let (group, inner_filter) = split_share(filter);
        let existed = inner.index.insert(inner_filter, group, session.id, opts.clone());
        if let Some(store) = self.stored(session) {
            store.sub(&session.key, filter, &opts);
        }
        st.subs.insert(Arc::from(filter), opts);
        drop(st);
        let send = group.is_none() && (retain_handling == 0 || (retain_handling == 1 && !existed));
        if !send {
            return (existed, vec![]);
        }
        let now = crate::system::clock::now_ms();
        if !inner_filter.contains(['+', '#']) {
            let one = inner.retained.get(inner_filter).filter(|m| !m.expired(now)).cloned();
            return (existed, one.into_iter().collect());
        }
        // Matched outside the lock: a `#` subscriber over many retained topics holds up no one.
        let all: Vec<Arc<Message>> = inner.retained.values().cloned().collect();
        drop(inner);
        let retained = all
            .into_iter()
            .filter(|m| !m.expired(now) && crate::broker::topics::matches(&m.topic, inner_filter))
            .collect();
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
        let mut denied: Vec<u64> = vec![];
        let mut shared: Vec<Target> = vec![];
        let cursor = self.share_cursor.fetch_add(1, Ordering::Relaxed);
        inner.index.for_each_match(
            &msg.topic,
            |id, o| {
                if o.no_local && *id == msg.from {
                    return;
                }
                let Some(s) = inner.by_id.get(id) else { return };
                if !plain.contains_key(id) && (denied.contains(id) || !self.readable(s, &msg.topic)) {
                    if !denied.contains(id) {
                        denied.push(*id);
                    }
                    return;
                }
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
                if let Some(t) = pick_member(self, &inner, (group, filter), members, cursor, msg) {
                    shared.push(t);
                }
            },
        );
        self.dropped_denied.fetch_add(denied.len() as u64, Ordering::Relaxed);
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
            // Counted under the session's lock, before a writer can take and release it.
            self.queued.fetch_add(d.msg.cost(), Ordering::Relaxed);
            if let Some(s) = store {
                wait = s.enqueue(&t.session.key, d.store_id, d, waits.is_some());
            }
        };
        let res = t.session.push(d, &self.limits, force, queued);
        if let (Some(w), Some(ws)) = (wait, waits) {
            ws.push(w);
        }
        match res {
            Ok(_) => true,
            Err(None) => false,
            Err(Some(session::DropReason::AwayBudget)) => {
                self.dropped_away_budget.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Some(session::DropReason::UserShare)) => {
                self.dropped_user_share.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Some(_)) => {
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

    /// Bytes queued for sessions that no connection holds.
    pub fn away_bytes(&self) -> usize {
        self.away.load(Ordering::Relaxed)
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
    pub fn snapshot(&self) -> crate::status_doc::RouterStatus {
        let (subs, nodes) = self.subscription_count();
        let sessions = self.sessions();
        let online = sessions.iter().filter(|s| s.online.load(Ordering::Relaxed)).count();
        let mut dropping: Vec<(u64, crate::status_doc::SessionDrops)> = sessions
            .iter()
            .filter(|s| !s.internal)
            .filter_map(|s| {
                let d = s.drops();
                let total: u64 = d.values().sum();
                let n = |r: session::DropReason| d.get(&r).copied().unwrap_or(0);
                (total > 0).then(|| {
                    let v = crate::status_doc::SessionDrops {
                        session: s.key.to_string(),
                        queued: s.pending.load(Ordering::Relaxed) as u64,
                        queue_full: n(session::DropReason::QueueFull),
                        too_large: n(session::DropReason::TooLarge),
                        expired: n(session::DropReason::Expired),
                        away_budget: n(session::DropReason::AwayBudget),
                        denied: n(session::DropReason::Denied),
                        user_share: n(session::DropReason::UserShare),
                    };
                    (total, v)
                })
            })
            .collect();
        dropping.sort_by_key(|d| std::cmp::Reverse(d.0));
        dropping.truncate(20);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let external = sessions.iter().filter(|s| !s.internal).count();
        crate::status_doc::RouterStatus {
            sessions: external as u64,
            sessions_connected: sessions
                .iter()
                .filter(|s| !s.internal && s.online.load(Ordering::Relaxed))
                .count() as u64,
            internal_clients: (sessions.len() - external) as u64,
            online: online as u64,
            subscriptions: subs as u64,
            index_nodes: nodes as u64,
            retained: self.retained_count() as u64,
            queued_bytes: self.queued_bytes() as u64,
            away_bytes: self.away_bytes() as u64,
            memory_budget: self.budget as u64,
            away_budget: self.limits.away_bytes as u64,
            user_budget: self.limits.user_bytes as u64,
            max_queued_messages: self.limits.max_messages as u64,
            max_queued_bytes: self.limits.max_bytes as u64,
            publisher_pauses: g(&self.paused),
            dropped: crate::status_doc::RouterDrops {
                queue_full: g(&self.dropped_queue_full),
                too_large: g(&self.dropped_too_large),
                expired: g(&self.dropped_expired),
                away_budget: g(&self.dropped_away_budget),
                user_share: g(&self.dropped_user_share),
                denied: g(&self.dropped_denied),
            },
            sessions_dropping: dropping.into_iter().map(|(_, v)| v).collect(),
        }
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
                away_bytes: 1 << 29,
                user_bytes: usize::MAX,
            },
            1 << 30,
            None,
        )
    }

    /// A router with room for 1000 messages per session and the given away share, user share
    /// and budget (bytes).
    fn shares(away_bytes: usize, user_bytes: usize, budget: usize) -> Router {
        let limits = QueueLimits {
            max_messages: 1000,
            max_bytes: 1 << 30,
            away_bytes,
            user_bytes,
        };
        Router::new(limits, budget, None)
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
            let t = fast.session.take(fast.gen, usize::MAX, usize::MAX, |_| None).unwrap();
            for (pkid, _) in t.out {
                fast.session.acked(fast.gen, pkid, false);
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
            let t = other.session.take(other.gen, usize::MAX, usize::MAX, |_| None).unwrap();
            for (pkid, _) in t.out {
                other.session.acked(other.gen, pkid, false);
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
        let t = a.session.take(a.gen, 20, usize::MAX, |_| None).unwrap();
        assert_eq!(t.out.len(), 20, "the window bounds what is in flight");
        r.release(t.freed);
        for (pkid, _) in t.out {
            let (freed, _) = a.session.acked(a.gen, pkid, false).unwrap();
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
        let t = b.session.take(b.gen, 100, 100, |_| None).unwrap();
        assert_eq!(t.out.len(), 1, "the QoS 1 message waited, the QoS 0 one was not kept");
        // The older generation may no longer take.
        assert!(a.session.take(a.gen, 100, 100, |_| None).is_none());
        let c = attach(&r, ":k", true, 0);
        assert!(!c.present && !Arc::ptr_eq(&a.session, &c.session));
        assert!(r.route(&msg("t", 1)).is_empty());
    }

    fn take_all(a: &Attached) -> Vec<(u16, Delivery)> {
        a.session.take(a.gen, usize::MAX, usize::MAX, |_| None).unwrap().out
    }

    fn attach_as(r: &Router, user: &str, client: &str) -> Attached {
        let mut identity = id(client);
        identity.username = Some(user.into());
        let req = AttachReq {
            key: format!("{user}:{client}"),
            identity,
            clean: true,
            expiry: 0,
            internal: false,
            window: usize::MAX,
        };
        r.attach(req, CancellationToken::new(), Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn one_users_stalled_sessions_hold_its_share_and_never_pause_another_user() {
        let cost = msg("t", 1).cost();
        // Room for 100 messages in all; a quarter for any one user.
        let r = shares(50 * cost, 25 * cost, 100 * cost);
        // Issue 29, point 2: many sessions of one user that never read.
        let stalled: Vec<Attached> = (0..10)
            .map(|i| {
                let a = attach_as(&r, "mallory", &format!("m{i}"));
                r.subscribe(&a.session, "#", opts(1, None), 0);
                a
            })
            .collect();
        let alice = attach_as(&r, "alice", "a");
        r.subscribe(&alice.session, "t", opts(1, None), 0);
        for _ in 0..1000 {
            assert!(!r.over_budget(), "one user's stalled sessions paused the publishers");
            let m = msg("t", 1);
            for t in r.route(&m) {
                let is_alice = Arc::ptr_eq(&t.session, &alice.session);
                assert!(r.push(&t, &m, false, None) || !is_alice, "alice lost a message");
            }
            for (pkid, _) in take_all(&alice) {
                let (freed, _) = alice.session.acked(alice.gen, pkid, false).unwrap();
                r.release(freed);
            }
        }
        assert_eq!(alice.session.delivered.load(Ordering::Relaxed), 1000);
        let held: usize = stalled.iter().map(|a| a.session.lock().bytes).sum();
        assert!(held <= 25 * cost, "mallory holds {held} bytes, past her share");
        let dropped: u64 = stalled
            .iter()
            .map(|a| *a.session.drops().get(&session::DropReason::UserShare).unwrap_or(&0))
            .sum();
        assert_eq!(dropped, 10 * 1000 - (held / cost) as u64, "every drop is counted");
        assert_eq!(r.dropped_user_share.load(Ordering::Relaxed), dropped);
    }

    #[test]
    fn subscribing_again_and_again_queues_one_copy_of_a_retained_message() {
        let r = router(100);
        let big = Arc::new(Message {
            topic: Arc::from("devices/m/blob"),
            payload: Bytes::from(vec![7u8; 200 * 1024]),
            qos: 1,
            retain: true,
            props: None,
            expires_ms: None,
            origin: None,
            from: 0,
        });
        r.retain(&big);
        // Receive Maximum 1 and never an ack: one copy in flight, at most one waiting.
        let a = attach_with_window(&r, ":m", true, 0, 1);
        for _ in 0..1400 {
            let (_, msgs) = r.subscribe(&a.session, "devices/m/#", opts(1, None), 0);
            for m in msgs {
                let t = Target {
                    session: a.session.clone(),
                    qos: 1,
                    retain: true,
                    sub_ids: vec![],
                    share: None,
                };
                r.push(&t, &m, true, None);
            }
            let _ = a.session.take(a.gen, 1, 256, |_| None);
        }
        let st = a.session.lock();
        assert_eq!(st.inflight.len() + st.queue.len(), 2, "copies of one retained message");
        assert!(r.queued_bytes() <= 2 * big.cost());
    }

    #[test]
    fn a_writer_takes_a_bounded_number_of_bytes_per_round() {
        // The attack review's defect 1: 256 deliveries of 256 KiB each were taken in one round
        // and sat in the connection's buffer, outside every bound.
        let r = router(1000);
        let a = attach(&r, ":big", true, 0);
        r.subscribe(&a.session, "big", opts(0, None), 0);
        let big = Arc::new(Message {
            topic: Arc::from("big"),
            payload: Bytes::from(vec![1u8; 100 * 1024]),
            qos: 0,
            retain: false,
            props: None,
            expires_ms: None,
            origin: None,
            from: 0,
        });
        for _ in 0..10 {
            publish(&r, &big);
        }
        let t = a
            .session
            .take_bytes(a.gen, usize::MAX, (256, 256 * 1024), |_| None)
            .unwrap();
        assert_eq!(t.out.len(), 3, "stops once 256 KiB are taken (the third passes it)");
        let one = a.session.take_bytes(a.gen, usize::MAX, (256, 1), |_| None).unwrap();
        assert_eq!(one.out.len(), 1, "one at least, whatever its size");
    }

    #[test]
    fn a_shared_group_passes_over_a_member_whose_user_is_at_its_share() {
        // The attack review (A5): a member whose user's share was full was still picked, and
        // the message was dropped for it.
        let cost = msg("t", 1).cost();
        let r = shares(1 << 29, 10 * cost, 1 << 30);
        let hog = attach_as(&r, "mallory", "hog");
        r.subscribe(&hog.session, "hog/#", opts(1, None), 0);
        for _ in 0..10 {
            publish(&r, &msg("hog/x", 1));
        }
        let member_m = attach_as(&r, "mallory", "member");
        let member_a = attach_as(&r, "alice", "member");
        for m in [&member_m, &member_a] {
            r.subscribe(&m.session, "$share/g/jobs", opts(1, None), 0);
        }
        for _ in 0..100 {
            assert_eq!(publish(&r, &msg("jobs", 1)), 1, "a job was dropped");
            // alice reads and acknowledges: her share never fills.
            for (pkid, _) in take_all(&member_a) {
                let (freed, _) = member_a.session.acked(member_a.gen, pkid, false).unwrap();
                r.release(freed);
            }
        }
        assert_eq!(member_a.session.delivered.load(Ordering::Relaxed), 100);
        assert_eq!(member_m.session.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn away_sessions_hold_their_share_and_never_pause_the_live_ones() {
        let cost = msg("t", 1).cost();
        // Room for 100 messages in all, 50 of them for clients that are away.
        let r = shares(50 * cost, usize::MAX, 100 * cost);
        let mut dead = vec![];
        for i in 0..4 {
            let a = attach(&r, &format!(":dead{i}"), false, NEVER);
            r.subscribe(&a.session, "#", opts(1, None), 0);
            assert_eq!(r.detach(&a.session, a.gen), Detached::Kept);
            dead.push(a);
        }
        let live = attach(&r, ":live", true, 0);
        r.subscribe(&live.session, "t", opts(1, None), 0);
        for _ in 0..1000 {
            let m = msg("t", 1);
            assert!(!r.over_budget(), "away clients paused the publishers");
            let to_live = r
                .route(&m)
                .into_iter()
                .filter(|t| Arc::ptr_eq(&t.session, &live.session));
            for t in to_live.collect::<Vec<_>>() {
                assert!(r.push(&t, &m, false, None), "the live client lost a message");
            }
            for t in r
                .route(&m)
                .into_iter()
                .filter(|t| !Arc::ptr_eq(&t.session, &live.session))
            {
                r.push(&t, &m, false, None);
            }
            for (pkid, _) in take_all(&live) {
                let (freed, _) = live.session.acked(live.gen, pkid, false).unwrap();
                r.release(freed);
            }
        }
        assert_eq!(live.session.delivered.load(Ordering::Relaxed), 1000);
        assert!(
            r.away_bytes() <= 50 * cost,
            "away bytes {} past their share",
            r.away_bytes()
        );
        let dropped: u64 = dead
            .iter()
            .map(|a| *a.session.drops().get(&session::DropReason::AwayBudget).unwrap_or(&0))
            .sum();
        assert_eq!(dropped, 4 * 1000 - 50, "every message past the share is counted");
        assert_eq!(r.dropped_away_budget.load(Ordering::Relaxed), dropped);
        // A client that comes back takes its bytes out of the away share.
        let back = attach(&r, ":dead0", false, NEVER);
        assert!(back.present);
        let held = back.session.lock().bytes;
        assert!(held > 0);
        assert_eq!(r.away_bytes(), 50 * cost - held);
    }

    #[test]
    fn nothing_is_queued_into_a_session_that_has_ended() {
        let r = router(100);
        let a = attach(&r, ":a", true, 0);
        r.subscribe(&a.session, "t", opts(1, None), 0);
        let targets = r.route(&msg("t", 1));
        assert_eq!(targets.len(), 1);
        // The session ends between routing and queueing.
        assert_eq!(r.detach(&a.session, a.gen), Detached::Ended);
        assert!(!r.push(&targets[0], &msg("t", 1), false, None));
        assert_eq!(r.queued_bytes(), 0, "bytes leaked into an ended session");
        assert_eq!(a.session.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_clean_start_ends_the_old_session_for_its_connection_too() {
        let r = router(100);
        let (subs0, nodes0) = r.subscription_count();
        let old = attach(&r, ":c", false, NEVER);
        r.subscribe(&old.session, "a/b", opts(1, None), 0);
        let new = attach(&r, ":c", true, NEVER);
        assert!(!new.present);
        // The old connection's reader still has a SUBSCRIBE in hand: it must not reach the index.
        r.subscribe(&old.session, "x/y/z", opts(1, None), 0);
        assert_eq!(r.subscription_count(), (subs0, nodes0), "a closed session subscribed");
        assert!(
            old.session.take(old.gen, 10, 10, |_| None).is_none(),
            "the old writer still takes"
        );
        // Its end: the session it held ended (so its will goes now), nothing else is touched.
        assert_eq!(r.detach(&old.session, old.gen), Detached::Ended);
        assert!(r.session(":c").is_some_and(|s| Arc::ptr_eq(&s, &new.session)));
        assert!(new.session.online.load(Ordering::Relaxed));
    }

    #[test]
    fn an_expiry_racing_a_resume_never_ends_the_resumed_session() {
        let r = router(100);
        let a = attach(&r, ":e", false, 10);
        r.subscribe(&a.session, "t", opts(1, None), 0);
        assert_eq!(r.detach(&a.session, a.gen), Detached::Kept);
        let timer = r.expiry_timer(&a.session, a.gen).expect("armed for an away session");
        let b = attach(&r, ":e", false, 10);
        // An arming that comes late, for a generation no longer current, does not replace
        // (and cancel) the newer connection's timer.
        assert!(r.expiry_timer(&a.session, a.gen).is_none());
        assert!(timer.is_cancelled(), "the resume did not cancel the expiry timer");
        // A timer that fired anyway finds the session held by generation b.
        assert!(!r.end_session(&a.session, a.gen));
        assert_eq!(publish(&r, &msg("t", 1)), 1);
        assert_eq!(take_all(&b).len(), 1);
    }

    #[test]
    fn a_shared_group_picks_only_members_that_may_read_and_have_room() {
        let r = Router::new(
            QueueLimits {
                max_messages: 5,
                max_bytes: 1 << 30,
                away_bytes: 1 << 29,
                user_bytes: usize::MAX,
            },
            1 << 30,
            None,
        );
        let _ = r
            .access
            .set(Box::new(|s: &Session, _t: &str| !s.key.starts_with(":blind")));
        let blind = attach(&r, ":blind", true, 0);
        let full = attach(&r, ":full", true, 0);
        let free = attach(&r, ":free", true, 0);
        for a in [&blind, &full, &free] {
            r.subscribe(&a.session, "$share/g/t", opts(1, None), 0);
        }
        // `full` has a wide window but a queue bound of 5; it never reads.
        for _ in 0..100 {
            assert_eq!(publish(&r, &msg("t", 1)), 1);
            for (pkid, _) in take_all(&free) {
                free.session.acked(free.gen, pkid, false);
            }
        }
        assert_eq!(
            blind.session.pending.load(Ordering::Relaxed),
            0,
            "a member that may not read got messages"
        );
        assert!(full.session.drops().is_empty(), "a full member was picked and dropped");
        assert_eq!(full.session.pending.load(Ordering::Relaxed), 5);
        assert_eq!(free.session.delivered.load(Ordering::Relaxed), 95);
    }

    #[test]
    fn a_resume_resends_only_what_the_new_receive_maximum_allows_under_the_same_ids() {
        let r = router(100);
        let a = attach_with_window(&r, ":w", false, NEVER, 10);
        r.subscribe(&a.session, "t", opts(1, None), 0);
        for _ in 0..10 {
            publish(&r, &msg("t", 1));
        }
        let first: Vec<u16> = a
            .session
            .take(a.gen, 10, 100, |_| None)
            .unwrap()
            .out
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(first.len(), 10);
        r.detach(&a.session, a.gen);
        let b = attach_with_window(&r, ":w", false, NEVER, 3);
        // A late ack from the old connection does not touch the resumed session.
        assert!(a.session.acked(a.gen, first[0], false).is_none());
        let res = b.session.resume(b.gen, 3, |_| None).unwrap();
        let mut ids: Vec<u16> = res.resend.iter().map(|f| f.pkid).collect();
        assert_eq!(ids, first[..3]);
        // The rest wait in flight and go again, same ids, as the window opens.
        let t = b.session.take(b.gen, 3, 100, |_| None).unwrap();
        assert!(t.out.is_empty() && t.again.is_empty());
        for f in &res.resend {
            b.session.acked(b.gen, f.pkid, false).unwrap();
        }
        while ids.len() < 10 {
            let t = b.session.take(b.gen, 3, 100, |_| None).unwrap();
            assert!(t.out.is_empty(), "a sent message was given a new packet id");
            assert!(!t.again.is_empty() && t.again.len() <= 3);
            for (pkid, _) in &t.again {
                ids.push(*pkid);
                b.session.acked(b.gen, *pkid, false).unwrap();
            }
        }
        assert_eq!(
            ids, first,
            "every delivery went again under its first packet id, in order"
        );
        assert_eq!(b.session.pending.load(Ordering::Relaxed), 0);
    }
}
