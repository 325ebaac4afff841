//! One time-limited grant of access to a topic filter, as the broker checks it beside the
//! static ACL: who (a logged-in user), which rights, from when until when. `grants/` keeps
//! them in a file and drives the broker's access setters; the type lives here so the broker
//! names nothing above it.

use super::auth::{Identity, Who};
use super::topics;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    pub id: String,
    /// `user:NAME`: a logged-in broker user. (`client:ID` grants are refused: anyone, even an
    /// anonymous client, can connect with any client id; one in an older file grants nothing.)
    pub who: String,
    pub filter: String,
    #[serde(default)]
    pub subscribe: bool,
    #[serde(default)]
    pub publish: bool,
    /// Seconds since the epoch.
    pub not_before: u64,
    pub expires: u64,
    pub created: u64,
    /// `cli`, `request`, or `claim:<reference>`.
    pub source: String,
    #[serde(default)]
    pub revoked: bool,
}

impl Grant {
    pub fn active(&self, now: u64) -> bool {
        !self.revoked && self.not_before <= now && now < self.expires
    }

    /// A grant names an authenticated identity: a user, never a device login or a client id.
    pub fn applies(&self, id: &Identity) -> bool {
        !id.device && matches!(Who::parse(&self.who), Ok(w @ Who::User(_)) if w.applies(id))
    }

    pub fn allows_subscribe(&self, id: &Identity, filter: &str, now: u64) -> bool {
        self.subscribe
            && self.active(now)
            && self.applies(id)
            && topics::strip_share(filter).is_some_and(|f| topics::covers(&self.filter, f))
    }

    pub fn allows_publish(&self, id: &Identity, topic: &str, now: u64) -> bool {
        self.publish && self.active(now) && self.applies(id) && topics::matches(topic, &self.filter)
    }
}
