//! Session life as the broker sees it: a connection attaches to its session (cancelling a
//! delayed will), detaches from it (will, keep or end, expiry timer), and sessions kept on disk
//! come back at start.

use super::router::session::Session;
use super::router::{self, NEVER};
use super::{codec, Shared};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Shared {
    /// Attaches a connection to its session, cancelling a delayed will of the same session.
    pub(super) fn attach(
        &self,
        req: router::AttachReq,
        token: CancellationToken,
        taken_over: Arc<AtomicBool>,
    ) -> router::Attached {
        self.wills.cancel(req.key.as_str());
        self.router.attach(req, token, taken_over)
    }

    /// A connection ended: publish its will (now, or after its delay), keep or end the session.
    pub(super) fn detach(self: &Arc<Self>, session: &Arc<Session>, gen: u64, will: Option<codec::Will>) {
        let how = self.router.detach(session, gen);
        let ended = how == router::Detached::Ended;
        let expiry = session.lock().expiry;
        if let Some(w) = will {
            let delay = if ended { 0 } else { w.delay.min(expiry) };
            // A newer connection holds the session already: a delayed will is cancelled.
            if !(how == router::Detached::TakenOver && delay > 0) {
                self.will_after(session, w, delay);
            }
        }
        if how == router::Detached::Kept && expiry != NEVER {
            self.expire_later(session, gen, Duration::from_secs(expiry as u64));
        }
    }

    /// Takes back the sessions the store kept; those whose expiry passed while the gateway was
    /// down are ended.
    pub(super) fn restore_sessions(self: &Arc<Self>, kept: Vec<router::store::Restored>) {
        let now = crate::system::clock::now_ms();
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

    /// Delivery checks access per message, so nothing needs closing when access narrows (a
    /// grant ended, an ACL changed): what is no longer allowed simply stops arriving.
    /// Returns how many held subscriptions are no longer allowed, for the log.
    pub fn enforce_subscriptions(&self) -> usize {
        let mut n = 0;
        for s in self.router.sessions().iter().filter(|s| !s.internal) {
            let id = s.identity.load();
            n += s
                .lock()
                .subs
                .keys()
                .filter(|f| !self.access.allows(&id, f, super::access::Right::Subscribe))
                .count();
        }
        n
    }
}
