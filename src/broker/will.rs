//! Wills: published when a connection ends without a normal DISCONNECT, at once or after the
//! MQTT 5 Will Delay Interval; a reconnect of the same session within the delay cancels it.

use super::access::Right;
use super::codec;
use super::router::message::Message;
use super::router::session::Session;
use super::Shared;
use crate::system::clock::now_ms;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Wills waiting out their delay, by session key.
#[derive(Default)]
pub struct Wills {
    delayed: Mutex<HashMap<Arc<str>, CancellationToken>>,
}

impl Wills {
    /// A connection took the session back: its delayed will is not published.
    pub fn cancel(&self, key: &str) {
        if let Some(w) = self.delayed.lock().expect("wills lock").remove(key) {
            w.cancel();
        }
    }
}

impl Shared {
    /// Publishes `w` now, or after `delay` seconds unless the session is taken back first.
    pub(super) fn will_after(self: &Arc<Self>, session: &Arc<Session>, w: codec::Will, delay: u32) {
        if delay == 0 {
            return self.publish_will(session, &w);
        }
        let cancel = CancellationToken::new();
        self.wills
            .delayed
            .lock()
            .expect("wills lock")
            .insert(session.key.clone(), cancel.clone());
        let (me, s) = (self.clone(), session.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(delay as u64)) => {
                    me.wills.delayed.lock().expect("wills lock").remove(&s.key);
                    me.publish_will(&s, &w);
                }
                _ = cancel.cancelled() => {}
            }
        });
    }

    fn publish_will(&self, session: &Session, w: &codec::Will) {
        // Checked again now: a reload may have taken the right away since CONNECT.
        let id = session.identity.load();
        if !self.access.login_exists(&id) || !self.access.allows(&id, &w.topic, Right::Publish) {
            log::info!(
                "will of {:?} on {:?} no longer allowed; not published",
                id.client_id,
                w.topic
            );
            return;
        }
        let msg = Arc::new(Message {
            topic: Arc::from(w.topic.as_str()),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            props: w.props.clone(),
            expires_ms: w.expiry.map(|e| now_ms() + e as i64 * 1000),
            origin: None,
            from: session.id,
        });
        self.ingress(&msg, false, &mut vec![]);
    }
}
