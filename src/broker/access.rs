//! Who may do what: one ladder over the gateway's topic rules, time-limited grants, device
//! logins and the ACL policy, for the three rights a client uses. Each source is swapped whole
//! by its owner through a named setter (reload, the keystore follower, the grants service);
//! readers see one consistent version of each.
//!
//! The ladder, first match wins:
//! 1. publishing only: a request topic (grants, provisioning) takes its admins and nobody else;
//!    the gateway's reserved prefix `outpost/<id>/` takes no client, but for its open topics;
//! 2. a grant in force allows it;
//! 3. a device gets its keystore ACL and nothing else (never the broad rules meant for people);
//! 4. the ACL policy decides.

use super::auth::{Identity, Policy};
use super::topics;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// What a client asks to do with a topic or filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    /// PUBLISH to a topic name (wills included).
    Publish,
    /// SUBSCRIBE to a filter (possibly `$share/...`).
    Subscribe,
    /// Receive a message on a topic name: checked at every delivery.
    Read,
}

/// The grants the front door checks beside the static ACL.
#[derive(Default)]
pub struct GrantState {
    pub list: Vec<super::grant::Grant>,
}

/// A device's MQTT login and what it may publish and subscribe to (filters already filled in).
pub struct DeviceCred {
    pub password: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Every source of access, each replaced whole.
pub struct Access {
    /// Users and ACL in force; replaced whole on reload.
    policy: ArcSwap<Policy>,
    /// Devices' credentials and ACLs from the keystore.
    devices: ArcSwap<HashMap<String, DeviceCred>>,
    /// Time-limited grants in force.
    grants: ArcSwap<GrantState>,
    /// Request topics only some users may publish on (grant requests, provisioning), with them.
    admin_topics: ArcSwap<Vec<(String, Vec<String>)>>,
    /// Topics under the reserved prefix that the ACL decides after all (the grants claim topic).
    open_topics: ArcSwap<Vec<String>>,
    /// `outpost/<gateway.id>/`: the gateway's own topics (status, bridges, devices).
    reserved_prefix: String,
}

impl Access {
    pub fn new(policy: Policy, gateway_id: &str) -> Access {
        Access {
            policy: ArcSwap::from_pointee(policy),
            devices: ArcSwap::from_pointee(HashMap::new()),
            grants: ArcSwap::from_pointee(GrantState::default()),
            admin_topics: ArcSwap::from_pointee(vec![]),
            open_topics: ArcSwap::from_pointee(vec![]),
            reserved_prefix: format!("outpost/{gateway_id}/"),
        }
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts a new policy in force; returns the one it replaced.
    pub fn set_policy(&self, p: Policy) -> Arc<Policy> {
        self.policy.swap(Arc::new(p))
    }

    pub fn set_devices(&self, devices: HashMap<String, DeviceCred>) {
        self.devices.store(Arc::new(devices));
    }

    pub fn grants(&self) -> Arc<GrantState> {
        self.grants.load_full()
    }

    pub fn set_grants(&self, g: GrantState) {
        self.grants.store(Arc::new(g));
    }

    /// Only `admins` (logged-in users, not devices) may publish on `topic`, whatever the ACL says.
    pub fn restrict_topic(&self, topic: &str, admins: &[String]) {
        let mut v: Vec<(String, Vec<String>)> = self
            .admin_topics
            .load()
            .iter()
            .filter(|(t, _)| t != topic)
            .cloned()
            .collect();
        v.push((topic.to_string(), admins.to_vec()));
        self.admin_topics.store(Arc::new(v));
    }

    /// Lets the ACL decide who may publish on `topic`, though it lies under the gateway's
    /// reserved prefix (a topic the gateway offers to clients, like the grants claim topic).
    pub fn open_topic(&self, topic: &str) {
        let mut v: Vec<String> = self
            .open_topics
            .load()
            .iter()
            .filter(|t| *t != topic)
            .cloned()
            .collect();
        v.push(topic.to_string());
        self.open_topics.store(Arc::new(v));
    }

    /// Is `topic` a request topic that only its admins may publish on?
    pub fn is_restricted(&self, topic: &str) -> bool {
        self.admin_topics.load().iter().any(|(t, _)| t == topic)
    }

    /// Checks a device's password; `None` when `user` is not a device.
    pub fn device_login(&self, user: &str, password: &str) -> Option<bool> {
        use subtle::ConstantTimeEq;
        let devices = self.devices.load();
        let d = devices.get(user)?;
        Some(bool::from(d.password.as_bytes().ct_eq(password.as_bytes())))
    }

    /// Is the login behind `id` still there (a user in the policy, a device in the keystore)?
    pub fn login_exists(&self, id: &Identity) -> bool {
        match id.username.as_deref() {
            None => true,
            Some(u) if id.device => self.device_login(u, "").is_some(),
            Some(u) => self.policy.load().has_user(u),
        }
    }

    /// May `id` do `right` with `topic` (a topic name, or a filter for [`Right::Subscribe`])?
    pub fn allows(&self, id: &Identity, topic: &str, right: Right) -> bool {
        if right == Right::Publish {
            if let Some((_, admins)) = self.admin_topics.load().iter().find(|(t, _)| t == topic) {
                return !id.device && id.username.as_ref().is_some_and(|u| admins.contains(u));
            }
            if topic.starts_with(&self.reserved_prefix) && !self.open_topics.load().iter().any(|t| t == topic) {
                return false;
            }
        }
        let now = crate::system::clock::now_secs();
        let granted = |g: &super::grant::Grant| match right {
            Right::Publish => g.allows_publish(id, topic, now),
            Right::Subscribe | Right::Read => g.allows_subscribe(id, topic, now),
        };
        if self.grants.load().list.iter().any(granted) {
            return true;
        }
        if id.device {
            let devices = self.devices.load();
            let Some(d) = id.username.as_ref().and_then(|u| devices.get(u)) else {
                return false;
            };
            return match right {
                Right::Publish => d.publish.iter().any(|f| topics::matches(topic, f)),
                Right::Read => d.subscribe.iter().any(|f| topics::matches(topic, f)),
                // A device's filter must cover the whole subscription (shared or not).
                Right::Subscribe => {
                    topics::strip_share(topic).is_some_and(|inner| d.subscribe.iter().any(|f| topics::covers(f, inner)))
                }
            };
        }
        let policy = self.policy.load();
        match right {
            Right::Publish => policy.may_publish(id, topic),
            Right::Subscribe => policy.may_subscribe(id, topic),
            Right::Read => policy.may_read(id, topic),
        }
    }
}
