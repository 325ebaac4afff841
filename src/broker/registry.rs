//! Which connections each user has, so the end of a login (a device revoked, a user removed on
//! reload) closes every connection it concerns at once.

use super::auth::Identity;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

struct Conn {
    id: u64,
    token: CancellationToken,
}

/// Connected clients by user name ("" for anonymous).
#[derive(Default)]
pub struct Registry {
    by_user: Mutex<HashMap<String, Vec<Conn>>>,
}

/// A registered connection: its id, the token [`Registry::kick`] cancels, and the flag a
/// takeover sets before it cancels the token.
pub struct Registered {
    pub id: u64,
    pub kick: CancellationToken,
    pub taken_over: Arc<AtomicBool>,
}

impl Registry {
    pub fn register(&self, identity: &Identity) -> Registered {
        let id = rand::random::<u64>();
        let kick = CancellationToken::new();
        self.by_user
            .lock()
            .expect("users lock")
            .entry(identity.username.clone().unwrap_or_default())
            .or_default()
            .push(Conn {
                id,
                token: kick.clone(),
            });
        Registered {
            id,
            kick,
            taken_over: Arc::new(AtomicBool::new(false)),
        }
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
}
