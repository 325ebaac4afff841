//! One session: what the broker keeps for a client id between and during its connections. Its
//! outbound queue (bounded by messages and bytes), the deliveries in flight awaiting an ack (at
//! most the client's Receive Maximum), packet ids, the QoS 2 ids it received, and its
//! subscriptions. A connection's writer takes from here; routing pushes here.
//!
//! Invariants: a delivery is in exactly one of `queue` or `inflight` until it is acknowledged
//! (QoS 1/2) or written (QoS 0); `bytes` is the cost of both, and the router's global budget
//! holds the same amount for this session. Only the writer of the current connection (`gen`)
//! takes from the queue.

use super::message::Message;
use crate::broker::auth::Identity;
use crate::system::clock::now_ms;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Orders the moments sessions had room (see `Session::room_at`).
pub static ROOM: AtomicU64 = AtomicU64::new(1);

/// Options of one subscription, as the client asked and the broker granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubOpts {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<u32>,
}

/// A message on its way to this session, at the QoS it is delivered with.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Its row in the session store (0: not stored: a clean session, or QoS 0).
    pub store_id: u64,
    /// The shared subscription it came under, so it can go to another member if this session ends.
    pub share: Option<Arc<str>>,
}

/// A delivery sent with a packet id, awaiting PUBACK, or PUBREC then PUBCOMP.
#[derive(Clone, Debug)]
pub struct Inflight {
    pub pkid: u16,
    pub d: Delivery,
    /// PUBREC came and PUBREL went: only PUBCOMP is awaited (and PUBREL is what a resend sends).
    pub released: bool,
    /// Sent on an earlier connection and not yet again on this one (its window was full at the
    /// resume): it goes out again, same packet id, DUP set, as the window opens.
    pub resend: bool,
}

/// Why a message did not reach a session, counted per session and in total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The session's own queue bound (messages or bytes) was reached.
    QueueFull,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// Its MQTT 5 message expiry passed while it waited.
    Expired,
    /// The client is away and the queues of away clients together hold their share of the
    /// memory budget (so clients that never return cannot pause the live ones).
    AwayBudget,
    /// The client may no longer read its topic (an ACL change, an ended grant) when it was due.
    Denied,
    /// The queues of the sessions of this client's user hold the user's share of the memory
    /// budget (so one user's slow or stalled clients cannot pause anyone else).
    UserShare,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::TooLarge,
        DropReason::Expired,
        DropReason::AwayBudget,
        DropReason::Denied,
        DropReason::UserShare,
    ];
    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::Expired => "expired",
            DropReason::AwayBudget => "away_budget",
            DropReason::Denied => "denied",
            DropReason::UserShare => "user_share",
        }
    }
}

/// The bounds of one session's queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Bytes the queues of all away sessions may hold together.
    pub away_bytes: usize,
    /// Bytes the queues of one user's sessions may hold together (anonymous clients are one
    /// user): whatever one user's clients fail to read costs only that user.
    pub user_bytes: usize,
}

/// What one `take` gave the writer.
#[derive(Default)]
pub struct Taken {
    /// Deliveries with their packet ids (0 for QoS 0).
    pub out: Vec<(u16, Delivery)>,
    /// Deliveries sent before, going out again under their packet ids (DUP).
    pub again: Vec<(u16, Delivery)>,
    /// Bytes no longer held (QoS 0 written, dropped ones).
    pub freed: usize,
    pub too_large: u64,
    pub expired: u64,
    pub denied: u64,
    /// Store rows of deliveries dropped here (expired, too large), to delete.
    pub dropped_ids: Vec<u64>,
    /// What `out` and `again` cost together.
    pub bytes: usize,
}

/// What a resumed connection resends, and what it dropped.
#[derive(Default)]
pub struct Resume {
    pub resend: Vec<Inflight>,
    pub freed: usize,
    pub dropped_ids: Vec<u64>,
}

/// What every session's connection may need to hear from outside.
pub struct Conn {
    pub gen: u64,
    pub token: CancellationToken,
    /// Set before `token` is cancelled when a newer connection took the session.
    pub taken_over: Arc<AtomicBool>,
}

pub struct State {
    pub queue: VecDeque<Delivery>,
    pub inflight: VecDeque<Inflight>,
    /// Cost of `queue` and `inflight` together.
    pub bytes: usize,
    next_pkid: u16,
    /// QoS 2 packet ids received from the client and not yet released: a resent PUBLISH
    /// with one of these is not routed again (exactly once).
    pub incoming_qos2: HashSet<u16>,
    /// Filters as the client wrote them (`$share/...` included), with their options.
    pub subs: HashMap<Arc<str>, SubOpts>,
    /// The connection that holds the session now, if any.
    pub conn: Option<Conn>,
    /// Counts connections; a writer works only while its generation is current.
    pub gen: u64,
    /// Seconds the session outlives its connection (`u32::MAX`: never expires).
    pub expiry: u32,
    pub drops: HashMap<DropReason, u64>,
    /// Drops since the last log line (one line per burst).
    unlogged_drops: u64,
    /// Taken out of the router (ended, or replaced by a clean start): nothing more is queued or
    /// subscribed here, so no bytes or store rows outlive it.
    pub closed: bool,
    /// No connection holds it: its bytes count in the router's away total.
    pub away: bool,
    /// Cancels the pending expiry of this session once a connection takes it again.
    pub expiry_timer: Option<CancellationToken>,
}

pub struct Session {
    pub id: u64,
    /// `user:client_id`: sessions of different users never meet.
    pub key: Arc<str>,
    /// Who holds it (the latest connection's login), for delivery-time access checks.
    pub identity: ArcSwap<Identity>,
    /// A component of the gateway itself: no socket, no access checks, no packet ids.
    pub internal: bool,
    /// Wakes the writer: something was queued, or the inflight window opened.
    pub notify: Notify,
    /// Queue plus inflight length, read without the lock when a shared group picks a member.
    pub pending: AtomicUsize,
    pub online: AtomicBool,
    /// Messages delivered (written or handed over), for status.
    pub delivered: AtomicU64,
    /// Kept in the session store (it outlives its connection, and is a client's).
    pub persisted: AtomicBool,
    /// The Receive Maximum of the connection holding it (how much a shared group gives it).
    pub window: AtomicUsize,
    /// When it last had room (a delivery queued within its window, a QoS 0 one written, a
    /// QoS 1/2 one acknowledged), as a stamp of [`ROOM`] (unique, so no two members tie):
    /// a shared group whose members are all full gives to the one that moved last.
    pub room_at: AtomicU64,
    /// Bytes held by all away sessions together (the router's), kept in step under this lock.
    away_total: Arc<AtomicUsize>,
    /// Bytes held by all sessions of this session's user (the router's), kept in step too.
    user_total: Arc<AtomicUsize>,
    state: Mutex<State>,
}

impl Session {
    pub fn new(
        id: u64,
        key: Arc<str>,
        identity: Identity,
        internal: bool,
        expiry: u32,
        (away_total, user_total): (Arc<AtomicUsize>, Arc<AtomicUsize>),
    ) -> Session {
        Session {
            id,
            key,
            identity: ArcSwap::from_pointee(identity),
            internal,
            notify: Notify::new(),
            pending: AtomicUsize::new(0),
            online: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            persisted: AtomicBool::new(false),
            window: AtomicUsize::new(usize::MAX),
            room_at: AtomicU64::new(0),
            away_total,
            user_total,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                bytes: 0,
                next_pkid: 0,
                incoming_qos2: HashSet::new(),
                subs: HashMap::new(),
                conn: None,
                gen: 0,
                expiry,
                drops: HashMap::new(),
                unlogged_drops: 0,
                closed: false,
                away: !internal,
                expiry_timer: None,
            }),
        }
    }

    /// The session's state. A panic elsewhere never makes it unusable (poison is ignored:
    /// every change below leaves the state consistent at each step).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_pending(&self, st: &State) {
        self.pending
            .store(st.queue.len() + st.inflight.len(), Ordering::Relaxed);
    }

    /// Queues a delivery; returns the bytes it added to the global budget, or why it was not
    /// queued (`None`: the session is closed, which is no drop).
    /// `force` skips the message bound (retained messages sent at subscribe: they are already
    /// held by the retained store, and a new `#` subscriber must get them all).
    /// `queued` runs under the session's lock once the delivery is in the queue (so the store
    /// hears of it before anyone can acknowledge it).
    pub fn push(
        &self,
        d: Delivery,
        limits: &QueueLimits,
        force: bool,
        queued: impl FnOnce(&Delivery),
    ) -> Result<usize, Option<DropReason>> {
        let cost = d.msg.cost();
        let mut st = self.lock();
        if st.closed {
            return Err(None);
        }
        // A retained message sent at subscribe that still waits in the queue is not queued a
        // second time: a client that subscribes again and again holds one copy.
        if force && d.retain && st.queue.iter().any(|q| q.retain && Arc::ptr_eq(&q.msg, &d.msg)) {
            return Err(None);
        }
        let why = if !force && (st.queue.len() >= limits.max_messages || st.bytes + cost > limits.max_bytes) {
            Some(DropReason::QueueFull)
        } else if st.away && self.away_total.load(Ordering::Relaxed) + cost > limits.away_bytes {
            Some(DropReason::AwayBudget)
        } else if !self.internal && self.user_total.load(Ordering::Relaxed) >= limits.user_bytes {
            // Past the share before this one (it may take the share over by one message, as
            // the budget's pause does): so a share equal to the budget never drops before the
            // budget pauses.
            Some(DropReason::UserShare)
        } else {
            None
        };
        if let Some(why) = why {
            *st.drops.entry(why).or_default() += 1;
            st.unlogged_drops += 1;
            if st.unlogged_drops == 1 {
                let what = match why {
                    DropReason::AwayBudget => "the queues of away clients hold their share of the memory budget",
                    DropReason::UserShare => {
                        "the queues of this user's clients hold the user's share of the memory budget"
                    }
                    _ => "queue full",
                };
                log::warn!(
                    "session {}: {what} ({} messages, {} bytes); dropping until it drains",
                    self.key,
                    st.queue.len(),
                    st.bytes
                );
            }
            return Err(Some(why));
        }
        if st.unlogged_drops > 1 {
            log::warn!("session {}: {} messages dropped", self.key, st.unlogged_drops);
        }
        st.unlogged_drops = 0;
        // It had room for this one: a shared group that finds every member full gives to the
        // member that had room last (routing order, not when its writer got to run).
        if st.queue.len() + st.inflight.len() < self.window.load(Ordering::Relaxed) {
            self.had_room();
        }
        queued(&d);
        st.queue.push_back(d);
        self.grow(&mut st, cost);
        self.sync_pending(&st);
        drop(st);
        self.notify.notify_one();
        Ok(cost)
    }

    /// Bytes the sessions of this session's user hold together.
    pub fn user_bytes(&self) -> usize {
        self.user_total.load(Ordering::Relaxed)
    }

    fn had_room(&self) {
        self.room_at
            .store(ROOM.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    fn grow(&self, st: &mut State, cost: usize) {
        st.bytes += cost;
        self.user_total.fetch_add(cost, Ordering::Relaxed);
        if st.away {
            self.away_total.fetch_add(cost, Ordering::Relaxed);
        }
    }

    fn shrink(&self, st: &mut State, cost: usize) {
        st.bytes -= cost;
        self.user_total.fetch_sub(cost, Ordering::Relaxed);
        if st.away {
            self.away_total.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Marks the session away (no connection) or held; its bytes move in or out of the away
    /// total with it.
    pub fn set_away(&self, st: &mut State, away: bool) {
        if st.away == away || self.internal {
            return;
        }
        if away {
            self.away_total.fetch_add(st.bytes, Ordering::Relaxed);
        } else {
            self.away_total.fetch_sub(st.bytes, Ordering::Relaxed);
        }
        st.away = away;
    }

    pub fn count_drop(&self, why: DropReason) {
        *self.lock().drops.entry(why).or_default() += 1;
    }

    /// Takes what the writer of connection `gen` may send now: QoS 0 messages, and QoS 1/2 ones
    /// while fewer than `window` are in flight (each given a packet id and moved to inflight).
    /// `check` says why a delivery may not go out now (larger than the client's Maximum Packet
    /// Size, no longer readable by it); those are dropped here. `None` when a newer connection
    /// holds the session.
    pub fn take(
        &self,
        gen: u64,
        window: usize,
        max: usize,
        check: impl Fn(&Delivery) -> Option<DropReason>,
    ) -> Option<Taken> {
        self.take_bytes(gen, window, (max, usize::MAX), check)
    }

    /// As [`Session::take`], stopping also once the deliveries taken cost `max_bytes` (one at
    /// least): what a writer takes is bounded in bytes as well as in number, so a batch never
    /// sits in one connection's buffer uncounted for long.
    pub fn take_bytes(
        &self,
        gen: u64,
        window: usize,
        (max, max_bytes): (usize, usize),
        check: impl Fn(&Delivery) -> Option<DropReason>,
    ) -> Option<Taken> {
        let mut st = self.lock();
        if st.gen != gen {
            return None;
        }
        let now = now_ms();
        let mut t = Taken::default();
        // Deliveries in flight count against the window once sent on this connection; those
        // held back at a resume go first, as it opens.
        let mut in_window = st.inflight.iter().filter(|f| !f.resend).count();
        for f in st.inflight.iter_mut().filter(|f| f.resend) {
            if in_window >= window || t.again.len() >= max {
                break;
            }
            f.resend = false;
            in_window += 1;
            t.again.push((f.pkid, f.d.clone()));
        }
        let mut bytes: usize = t.again.iter().map(|(_, d)| d.msg.cost()).sum();
        while t.out.len() + t.again.len() < max && bytes < max_bytes {
            let Some(front) = st.queue.front() else { break };
            if front.qos > 0 && in_window >= window {
                break;
            }
            let d = st.queue.pop_front().expect("front exists");
            let why = if d.msg.expired(now) {
                Some(DropReason::Expired)
            } else {
                check(&d)
            };
            if let Some(why) = why {
                match why {
                    DropReason::Expired => t.expired += 1,
                    DropReason::TooLarge => t.too_large += 1,
                    _ => t.denied += 1,
                }
                *st.drops.entry(why).or_default() += 1;
                let c = d.msg.cost();
                self.shrink(&mut st, c);
                t.freed += c;
                if d.store_id != 0 {
                    t.dropped_ids.push(d.store_id);
                }
                continue;
            }
            bytes += d.msg.cost();
            if d.qos == 0 {
                let c = d.msg.cost();
                self.shrink(&mut st, c);
                t.freed += c;
                t.out.push((0, d));
            } else {
                let pkid = st.free_pkid();
                st.inflight.push_back(Inflight {
                    pkid,
                    d: d.clone(),
                    released: false,
                    resend: false,
                });
                in_window += 1;
                t.out.push((pkid, d));
            }
        }
        self.sync_pending(&st);
        // Progress is what completes: a QoS 0 delivery written, or (in `acked`) an ack. Taking
        // QoS 1/2 into a window the client never acknowledges is not, so a shared group does not
        // take a member that stopped reading for one that moves.
        if t.out.iter().any(|(pkid, _)| *pkid == 0) {
            self.had_room();
        }
        t.bytes = bytes;
        Some(t)
    }

    /// What a new connection (generation `gen`) resends first, in order: the deliveries in
    /// flight, as many as its `window` (Receive Maximum) allows. The rest stay in flight with
    /// their packet ids, marked to go again as the window opens ([`Session::take`]); those
    /// `check` refuses now (too large for the new connection, no longer readable) are dropped
    /// as if sent [MQTT-3.1.2-25], except a QoS 2 one, sent again whatever (the client may
    /// hold its packet id awaiting PUBREL: dropping it would make a later reuse look a duplicate).
    /// `None` when a newer connection holds the session.
    pub fn resume(&self, gen: u64, window: usize, check: impl Fn(&Delivery) -> Option<DropReason>) -> Option<Resume> {
        let mut st = self.lock();
        if st.gen != gen {
            return None;
        }
        let mut r = Resume::default();
        let mut sent = 0;
        for mut f in std::mem::take(&mut st.inflight) {
            if f.released {
                // Past PUBREC: only PUBREL is sent, under the same packet id.
                sent += 1;
                f.resend = false;
                r.resend.push(f.clone());
                st.inflight.push_back(f);
                continue;
            }
            if let Some(why) = check(&f.d).filter(|_| f.d.qos == 1) {
                *st.drops.entry(why).or_default() += 1;
                let c = f.d.msg.cost();
                self.shrink(&mut st, c);
                r.freed += c;
                if f.d.store_id != 0 {
                    r.dropped_ids.push(f.d.store_id);
                }
                continue;
            }
            f.resend = sent >= window;
            if !f.resend {
                sent += 1;
                r.resend.push(f.clone());
            }
            st.inflight.push_back(f);
        }
        self.sync_pending(&st);
        Some(r)
    }

    /// PUBACK (qos 1) or PUBCOMP (qos 2 released) for `pkid`: the delivery is done. Returns the
    /// bytes freed and its store row, or `None` for an id that is not in flight.
    pub fn acked(&self, gen: u64, pkid: u16, comp: bool) -> Option<(usize, u64)> {
        let mut st = self.lock();
        if st.gen != gen {
            // A late ack from a connection that no longer holds the session: the id may be
            // in use again by the newer one.
            return None;
        }
        let i = st
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && (if comp { f.released } else { f.d.qos == 1 }))?;
        let f = st.inflight.remove(i).expect("index found");
        let c = f.d.msg.cost();
        self.shrink(&mut st, c);
        self.sync_pending(&st);
        drop(st);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.had_room();
        self.notify.notify_one();
        Some((c, f.d.store_id))
    }

    /// PUBREC for `pkid`: the store row of the QoS 2 delivery that awaited it, if any.
    pub fn received(&self, gen: u64, pkid: u16) -> Option<u64> {
        let mut st = self.lock();
        if st.gen != gen {
            return None;
        }
        let f = st.inflight.iter_mut().find(|f| f.pkid == pkid && f.d.qos == 2)?;
        f.released = true;
        Some(f.d.store_id)
    }

    /// Puts back what the store held for this session at start, in order.
    pub fn restore(&self, items: Vec<(Delivery, u16, bool)>) -> usize {
        let mut st = self.lock();
        let mut added = 0;
        for (d, pkid, released) in items {
            added += d.msg.cost();
            if pkid != 0 {
                st.inflight.push_back(Inflight {
                    pkid,
                    d,
                    released,
                    resend: false,
                });
            } else {
                st.queue.push_back(d);
            }
        }
        self.grow(&mut st, added);
        if let Some(max) = st.inflight.iter().map(|f| f.pkid).max() {
            st.next_pkid = max;
        }
        self.sync_pending(&st);
        added
    }

    /// Takes out the deliveries that came under shared subscriptions and were never acknowledged
    /// (QoS 1/2, queued or in flight); returns them and the bytes freed.
    pub fn drain_shared(&self) -> (Vec<Delivery>, usize) {
        let mut st = self.lock();
        let mut out = vec![];
        let mut freed = 0;
        let inflight = std::mem::take(&mut st.inflight);
        for f in inflight {
            if f.d.share.is_some() && !f.released {
                freed += f.d.msg.cost();
                out.push(f.d);
            } else {
                st.inflight.push_back(f);
            }
        }
        let queue = std::mem::take(&mut st.queue);
        for d in queue {
            if d.share.is_some() && d.qos > 0 {
                freed += d.msg.cost();
                out.push(d);
            } else {
                st.queue.push_back(d);
            }
        }
        self.shrink(&mut st, freed);
        self.sync_pending(&st);
        (out, freed)
    }

    /// Empties the queue and inflight (a clean start, or the session's end); returns bytes freed.
    pub fn clear(&self) -> usize {
        let mut st = self.lock();
        let b = st.bytes;
        st.queue.clear();
        st.inflight.clear();
        st.incoming_qos2.clear();
        self.shrink(&mut st, b);
        self.sync_pending(&st);
        b
    }

    pub fn drops(&self) -> HashMap<DropReason, u64> {
        self.lock().drops.clone()
    }
}

impl State {
    /// The next packet id not in flight (1..=65535).
    fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                continue;
            }
            let id = self.next_pkid;
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }
}
