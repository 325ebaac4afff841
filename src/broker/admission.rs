//! Who gets to log in, and how many at once:
//!
//! - **Sockets** of any kind, logged in or still handshaking, hold a slot of
//!   `max_connections` + 256; logged-in clients hold one of `max_connections`.
//! - **Pre-login slots.** Sockets that have not finished their handshake and CONNECT hold one of
//!   a fixed number of pre-login slots. When all are taken, the oldest pending socket is evicted
//!   for the newcomer if it has been logging in for [`EVICT_AFTER`] already, so sockets that
//!   trickle a byte at a time (slowloris) cannot keep real clients out; when the oldest is
//!   younger (a crowd of honest clients reconnecting at once), the newcomer waits for a slot
//!   until its connect deadline instead: later, not never.
//! - **Password checks** (argon2: ~20 MiB and tens of ms each) run two at a time, and one at a
//!   time per source address, so one address guessing passwords leaves a check free for others.
//! - **Back-off** after failed logins, per source address and user name together: a guesser at
//!   one address is slowed down as that user from that address only, so it cannot lock the
//!   real user (or a device) out from elsewhere, nor lock out other users behind its address.

use super::metrics::Metrics;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Sockets that may be logging in at once.
const PRELOGIN_SLOTS: usize = 256;
/// How long a socket may log in before a newcomer may push it out.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// Password checks running at once.
const AUTH_SLOTS: usize = 2;
/// Failures allowed before back-off starts, and its longest wait.
const FREE_FAILURES: u32 = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The broker's gates for new sockets and logins.
pub struct Admission {
    /// Logged-in clients (max_connections).
    sessions: Arc<Semaphore>,
    /// Open sockets of any kind, logged in or still handshaking.
    sockets: Arc<Semaphore>,
    /// Sockets that have not finished logging in.
    prelogin: Arc<Semaphore>,
    /// Those sockets, oldest first, so the oldest can be evicted for a newcomer.
    pending: Arc<Pending>,
    /// Password checks running at once.
    auth_slots: Semaphore,
    /// Recent failed logins by source address and user name, for back-off.
    failures: Mutex<HashMap<(IpAddr, String), Failures>>,
    /// Source addresses with a password check running or waiting for a slot.
    checking: Checking,
    metrics: Arc<Metrics>,
}

/// Failed logins of one source or user: how many in a row, and until when the next attempt is
/// refused without a password check.
#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    until: std::time::Instant,
}

/// Sockets still logging in, oldest first, each with the token that evicts it.
#[derive(Default)]
struct Pending {
    queue: Mutex<VecDeque<(u64, CancellationToken, Instant)>>,
    next: AtomicU64,
}

/// A socket's pre-login slot; dropping it (at CONNACK, or when the socket ends) frees it.
pub struct PreLogin {
    _permit: OwnedSemaphorePermit,
    id: u64,
    /// Cancelled when this socket is evicted for a newer one.
    pub evict: CancellationToken,
    pending: Arc<Pending>,
}

impl Drop for PreLogin {
    fn drop(&mut self) {
        self.pending
            .queue
            .lock()
            .expect("pending lock")
            .retain(|(i, _, _)| *i != self.id);
    }
}

impl Admission {
    pub fn new(max_connections: usize, metrics: Arc<Metrics>) -> Admission {
        Admission {
            sessions: Arc::new(Semaphore::new(max_connections)),
            sockets: Arc::new(Semaphore::new(max_connections + PRELOGIN_SLOTS)),
            prelogin: Arc::new(Semaphore::new(PRELOGIN_SLOTS)),
            pending: Arc::default(),
            auth_slots: Semaphore::new(AUTH_SLOTS),
            failures: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// A slot for a new socket, held until it closes; `None` when all are taken.
    pub fn socket(&self) -> Option<OwnedSemaphorePermit> {
        self.sockets.clone().try_acquire_owned().ok()
    }

    /// A slot for a logged-in client, held until it disconnects. At `max_connections` it waits
    /// for one: a crowd reconnecting at once finds the slots of its own last connections still
    /// closing. The caller bounds the wait (the connect deadline).
    pub async fn session(&self) -> Option<OwnedSemaphorePermit> {
        self.sessions.clone().acquire_owned().await.ok()
    }

    /// Waits for one of the few password-check slots, after the one slot of `source`.
    pub async fn password_check(&self, source: IpAddr) -> Option<CheckSlot<'_>> {
        let mine = self
            .checking
            .lock()
            .expect("checking lock")
            .entry(source)
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone();
        // The guard first: a wait cut short (an evicted socket) still tidies the address's entry.
        let mut guard = CheckSlot {
            _slot: None,
            source: Some((None, source, &self.checking)),
        };
        let permit = mine.acquire_owned().await.ok()?;
        if let Some(s) = guard.source.as_mut() {
            s.0 = Some(permit);
        }
        guard._slot = Some(self.auth_slots.acquire().await.ok()?);
        Some(guard)
    }

    /// Takes a pre-login slot, evicting the oldest pending socket if none is free and it has
    /// been logging in for [`EVICT_AFTER`]. `None` when no slot could be had by `deadline`
    /// (then the socket is closed).
    pub async fn pre_login(&self, deadline: Instant) -> Option<PreLogin> {
        let permit = match self.prelogin.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let oldest = {
                    let mut q = self.pending.queue.lock().expect("pending lock");
                    match q.front() {
                        Some((_, _, since)) if since.elapsed() >= EVICT_AFTER => q.pop_front(),
                        _ => None,
                    }
                };
                if let Some((_, token, _)) = oldest {
                    token.cancel();
                    Metrics::inc(&self.metrics.prelogin_evicted);
                }
                tokio::time::timeout_at(deadline, self.prelogin.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let id = self.pending.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.pending
            .queue
            .lock()
            .expect("pending lock")
            .push_back((id, evict.clone(), Instant::now()));
        Some(PreLogin {
            _permit: permit,
            id,
            evict,
            pending: self.pending.clone(),
        })
    }

    /// Is a login from `source` as `user` in back-off after failures? Returns how long is left.
    pub fn login_backoff(&self, source: IpAddr, user: &str) -> Option<Duration> {
        let now = std::time::Instant::now();
        let f = self.failures.lock().expect("failures lock");
        f.get(&(source, user.to_string()))
            .filter(|x| x.until > now)
            .map(|x| x.until - now)
    }

    /// Records a login's outcome: failures grow a back-off for this source and user (doubling
    /// past the first few, up to 30 s); a success clears it.
    pub fn login_result(&self, source: IpAddr, user: &str, ok: bool) {
        let now = std::time::Instant::now();
        let mut f = self.failures.lock().expect("failures lock");
        if f.len() > 10_000 {
            f.retain(|_, x| x.until > now);
        }
        let key = (source, user.to_string());
        if ok {
            f.remove(&key);
            return;
        }
        let e = f.entry(key).or_insert(Failures { count: 0, until: now });
        e.count += 1;
        let wait = match e.count.checked_sub(FREE_FAILURES) {
            None => Duration::ZERO,
            Some(n) => (Duration::from_millis(250) * 2u32.saturating_pow(n.min(8))).min(MAX_BACKOFF),
        };
        e.until = now + wait;
    }
}

/// Each source address's own password-check slot, while it has a check running or waiting.
type Checking = Mutex<HashMap<IpAddr, Arc<Semaphore>>>;

/// A password-check slot, and its source address's own; the address's entry goes with its
/// last holder.
pub struct CheckSlot<'a> {
    _slot: Option<SemaphorePermit<'a>>,
    source: Option<(Option<OwnedSemaphorePermit>, IpAddr, &'a Checking)>,
}

impl Drop for CheckSlot<'_> {
    fn drop(&mut self) {
        let Some((permit, ip, map)) = self.source.take() else {
            return;
        };
        drop(permit);
        drop(self._slot.take());
        let mut m = map.lock().expect("checking lock");
        // Only the map holds it now: nobody checks or waits from this address.
        if m.get(&ip).is_some_and(|s| Arc::strong_count(s) == 1) {
            m.remove(&ip);
        }
    }
}
