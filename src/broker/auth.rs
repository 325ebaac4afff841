//! Who may connect, and what they may publish and subscribe to. Built from config; swapped
//! whole on SIGHUP, so every packet is checked against the policy in force at that moment.

use super::topics;
use crate::config;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use std::collections::HashMap;

pub use crate::config::Who;

/// How a subject (parsed with the config) meets a connection.
impl Who {
    pub fn applies(&self, id: &Identity) -> bool {
        match self {
            Who::Everyone => true,
            Who::Anonymous => id.username.is_none(),
            Who::AnyUser => id.username.is_some(),
            Who::User(n) => id.username.as_deref() == Some(n.as_str()),
            Who::Client(pat) => glob(pat, &id.client_id),
        }
    }
}

/// `*` at the end matches any rest; otherwise the text must be equal.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => s.starts_with(prefix),
        None => pattern == s,
    }
}

/// Who a connection is, once logged in.
#[derive(Clone, Debug)]
pub struct Identity {
    pub username: Option<String>,
    pub client_id: String,
    /// The listener the client came in on (its `bind` as configured).
    pub listener: String,
    /// Logged in with device credentials from the keystore (the device ACL applies, not the broad rules).
    pub device: bool,
}

struct Rule {
    who: Who,
    on: Vec<String>,
    publish: Vec<String>,
    subscribe: Vec<String>,
    deny_publish: Vec<String>,
    deny_subscribe: Vec<String>,
}

struct UserEntry {
    hash: String,
    client_ids: Vec<String>,
}

/// The users and ACL in force.
pub struct Policy {
    users: HashMap<String, UserEntry>,
    rules: Vec<Rule>,
}

/// A hash to verify against when the user is unknown, so a wrong user name takes as long to
/// refuse as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("outpost-unknown-user"))
}

impl Policy {
    pub fn from_config(b: &config::Broker) -> Policy {
        Policy {
            users: b
                .users
                .iter()
                .map(|u| {
                    (
                        u.name.clone(),
                        UserEntry {
                            hash: u.password_hash.clone(),
                            client_ids: u.client_ids.clone(),
                        },
                    )
                })
                .collect(),
            rules: b
                .acl
                .iter()
                .map(|r| Rule {
                    who: r.who.clone(),
                    on: r
                        .on
                        .iter()
                        .map(|b| b.parse::<std::net::SocketAddr>().map_or(b.clone(), |a| a.to_string()))
                        .collect(),
                    publish: r.allow.publish.clone(),
                    subscribe: r.allow.subscribe.clone(),
                    deny_publish: r.deny.publish.clone(),
                    deny_subscribe: r.deny.subscribe.clone(),
                })
                .collect(),
        }
    }

    /// Users of `self` that `newer` no longer has: their connections must end when `newer`
    /// comes in force. (A changed hash may be the same password with a new salt: it is not
    /// taken as a change.)
    pub fn users_gone_in(&self, newer: &Policy) -> Vec<String> {
        self.users
            .keys()
            .filter(|name| !newer.users.contains_key(*name))
            .cloned()
            .collect()
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Checks a password. Slow on purpose (argon2): call it off the async threads.
    pub fn verify_password(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(u) => (u.hash.as_str(), true),
            None => (dummy_hash(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        ok && known
    }

    /// May this user connect with this client id?
    pub fn client_id_allowed(&self, user: Option<&str>, client_id: &str) -> bool {
        let Some(u) = user.and_then(|u| self.users.get(u).map(|e| (u, e))) else {
            return true;
        };
        u.1.client_ids.is_empty()
            || u.1
                .client_ids
                .iter()
                .any(|p| glob(&p.replace("{username}", u.0), client_id))
    }

    pub fn may_publish(&self, id: &Identity, topic: &str) -> bool {
        if topic.starts_with('$') {
            return false;
        }
        self.allowed(id, |r| &r.publish, |f| topics::matches(topic, f))
            && !self.allowed(id, |r| &r.deny_publish, |f| topics::matches(topic, f))
    }

    /// A subscription must lie inside an allowed filter, and not inside a denied one.
    pub fn may_subscribe(&self, id: &Identity, filter: &str) -> bool {
        let Some(inner) = topics::strip_share(filter) else {
            return false;
        };
        self.allowed(id, |r| &r.subscribe, |f| topics::covers(f, inner))
            && !self.allowed(id, |r| &r.deny_subscribe, |f| topics::covers(f, inner))
    }

    /// May a message on `topic` be delivered: some allowed subscribe filter matches it, and no
    /// denied one does.
    pub fn may_read(&self, id: &Identity, topic: &str) -> bool {
        self.allowed(id, |r| &r.subscribe, |f| topics::matches(topic, f))
            && !self.allowed(id, |r| &r.deny_subscribe, |f| topics::matches(topic, f))
    }

    fn allowed(&self, id: &Identity, list: impl Fn(&Rule) -> &Vec<String>, check: impl Fn(&str) -> bool) -> bool {
        self.rules
            .iter()
            .filter(|r| r.who.applies(id) && (r.on.is_empty() || r.on.contains(&id.listener)))
            .any(|r| {
                list(r).iter().any(|f| match substitute(f, id) {
                    Some(f) => check(&f),
                    None => false,
                })
            })
    }
}

/// Fills `{username}` and `{client_id}` in a filter. A value holding `/`, `+` or `#` would
/// widen the filter, so such a rule does not apply (nor one needing a username the client lacks).
/// Borrows when there is nothing to fill (the common case, checked at every delivery).
fn substitute<'a>(filter: &'a str, id: &Identity) -> Option<std::borrow::Cow<'a, str>> {
    if !filter.contains('{') {
        return Some(std::borrow::Cow::Borrowed(filter));
    }
    let mut out = filter.to_string();
    if out.contains("{username}") {
        let u = id.username.as_deref()?;
        if u.contains(['/', '+', '#']) {
            return None;
        }
        out = out.replace("{username}", u);
    }
    if out.contains("{client_id}") {
        if id.client_id.contains(['/', '+', '#']) {
            return None;
        }
        out = out.replace("{client_id}", &id.client_id);
    }
    Some(std::borrow::Cow::Owned(out))
}

/// An argon2id PHC string for a password, as `outpost passwd` prints it.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AclAllow, AclRule, Broker, User};

    fn policy() -> Policy {
        let b = Broker {
            users: vec![User {
                name: "dev1".into(),
                password_hash: hash_password("pw"),
                client_ids: vec!["{username}-*".into()],
            }],
            acl: vec![
                AclRule {
                    who: Who::AnyUser,
                    on: vec![],
                    allow: AclAllow {
                        publish: vec!["devices/{username}/#".into()],
                        subscribe: vec!["devices/{username}/cmd/#".into()],
                    },
                    deny: AclAllow::default(),
                },
                AclRule {
                    who: Who::Anonymous,
                    on: vec![],
                    allow: AclAllow {
                        publish: vec![],
                        subscribe: vec!["public/#".into()],
                    },
                    deny: AclAllow {
                        publish: vec![],
                        subscribe: vec!["public/secret/#".into()],
                    },
                },
            ],
            ..Broker::default()
        };
        Policy::from_config(&b)
    }

    #[test]
    fn users_and_acls() {
        let p = policy();
        assert!(p.verify_password("dev1", "pw"));
        assert!(!p.verify_password("dev1", "nope") && !p.verify_password("ghost", "pw"));
        assert!(p.client_id_allowed(Some("dev1"), "dev1-a") && !p.client_id_allowed(Some("dev1"), "other"));
        let dev = Identity {
            username: Some("dev1".into()),
            client_id: "dev1-a".into(),
            listener: String::new(),
            device: false,
        };
        let anon = Identity {
            username: None,
            client_id: "x".into(),
            listener: String::new(),
            device: false,
        };
        assert!(p.may_publish(&dev, "devices/dev1/temp") && !p.may_publish(&dev, "devices/dev2/temp"));
        assert!(p.may_subscribe(&dev, "devices/dev1/cmd/#") && !p.may_subscribe(&dev, "devices/dev1/#"));
        assert!(p.may_subscribe(&dev, "$share/g/devices/dev1/cmd/x"));
        assert!(
            p.may_subscribe(&anon, "public/a") && !p.may_subscribe(&anon, "#") && !p.may_publish(&anon, "public/a")
        );
        // A deny wins: the denied filter itself is refused, a wider one never reads inside it.
        assert!(!p.may_subscribe(&anon, "public/secret/#") && !p.may_subscribe(&anon, "public/secret/x"));
        assert!(p.may_read(&anon, "public/a") && !p.may_read(&anon, "public/secret/x") && !p.may_read(&anon, "x"));
        let sneaky = Identity {
            username: Some("#".into()),
            client_id: "y".into(),
            listener: String::new(),
            device: false,
        };
        assert!(!p.may_publish(&sneaky, "devices/x/y"));
    }
}
