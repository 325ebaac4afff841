//! Session expiry: a session kept after its connection ends (MQTT 5 Session Expiry Interval,
//! or `persistent_session_expiry` for 3.1.1) is ended when its time is up, unless a connection
//! took it since.

use super::router::session::Session;
use super::Shared;
use std::sync::Arc;
use std::time::Duration;

impl Shared {
    /// Ends `session` after `after`, unless a connection took it since generation `gen` (which
    /// cancels this timer, so a client that comes and goes leaves one timer, not one each time).
    pub(super) fn expire_later(self: &Arc<Self>, session: &Arc<Session>, gen: u64, after: Duration) {
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
}
