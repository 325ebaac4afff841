//! Who gets to log in: sockets that have not finished their handshake and CONNECT hold one of
//! a fixed number of pre-login slots. When all are taken, the oldest pending socket is evicted
//! for the newcomer, so sockets that trickle a byte at a time (slowloris) cannot keep real
//! clients out: a real client finishes in milliseconds, long before enough newer sockets arrive
//! to push it out.

use super::Shared;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// Sockets still logging in, oldest first, each with the token that evicts it.
#[derive(Default)]
pub struct Pending {
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

/// A socket's pre-login slot; dropping it (at CONNACK, or when the socket ends) frees it.
pub struct PreLogin {
    _permit: OwnedSemaphorePermit,
    id: u64,
    /// Cancelled when this socket is evicted for a newer one.
    pub evict: CancellationToken,
    shared: Arc<Shared>,
}

impl Drop for PreLogin {
    fn drop(&mut self) {
        self.shared
            .pending
            .queue
            .lock()
            .expect("pending lock")
            .retain(|(i, _)| *i != self.id);
    }
}

/// Takes a pre-login slot, evicting the oldest pending socket if none is free. `None` when no
/// slot could be had within a second (then the socket is closed).
pub async fn pre_login(shared: &Arc<Shared>) -> Option<PreLogin> {
    let permit = match shared.prelogin_allowed.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            let oldest = shared.pending.queue.lock().expect("pending lock").pop_front();
            if let Some((_, token)) = oldest {
                token.cancel();
                super::metrics::Metrics::inc(&shared.metrics.prelogin_evicted);
            }
            tokio::time::timeout(Duration::from_secs(1), shared.prelogin_allowed.clone().acquire_owned())
                .await
                .ok()?
                .ok()?
        }
    };
    let id = shared.pending.next.fetch_add(1, Ordering::Relaxed);
    let evict = CancellationToken::new();
    shared
        .pending
        .queue
        .lock()
        .expect("pending lock")
        .push_back((id, evict.clone()));
    Some(PreLogin {
        _permit: permit,
        id,
        evict,
        shared: shared.clone(),
    })
}
