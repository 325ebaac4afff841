//! The page's own endpoints, and who is asking: HTTP Basic with a broker user (verified as
//! the broker verifies a CONNECT, then remembered for a few minutes), or the configured
//! bearer token for scrapers. `/api/me` tells the page what its user may read, so it
//! subscribes to that and says what is hidden; `/api/problems` keeps the most recent refusals.

use crate::broker::auth::Identity;
use crate::broker::events::Event as SecurityEvent;
use crate::broker::{topics, Right, Shared};
use crate::status_doc::{BrokerCounters, StatusDoc};
use headers::authorization::{Basic, Bearer, Credentials};
use headers::{Authorization, Header};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the dashboard needs from the config, taken once at start and handed over as it is
/// (`View::settings`): no trip through JSON, so nothing can decode to an empty default.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub gateway: String,
    pub origins: Vec<String>,
    pub anonymous: bool,
    pub admins: Vec<String>,
    pub token: Option<String>,
    pub tls: bool,
    /// Every subscribe filter the ACL names, to probe with the live policy for a user.
    pub acl_filters: Vec<String>,
    /// Plug names are filled into these (`sensor/{name}/live`, ...).
    pub plug_live: String,
    pub plug_state: String,
    pub plug_set: String,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::Config) -> Settings {
        let d = &cfg.dashboard;
        let mut acl_filters: Vec<String> = cfg
            .broker
            .acl
            .iter()
            .flat_map(|r| r.allow.subscribe.iter().cloned())
            .collect();
        acl_filters.sort();
        acl_filters.dedup();
        Settings {
            gateway: cfg.gateway.id.clone(),
            origins: d.origins.clone(),
            anonymous: d.anonymous,
            admins: d.admins.clone(),
            token: d.token.clone(),
            tls: d.tls.is_some(),
            acl_filters,
            plug_live: cfg.plugs.topics.live.clone(),
            plug_state: cfg.plugs.topics.state.clone(),
            plug_set: cfg.plugs.topics.set.clone(),
        }
    }

    pub fn bridge_request_topic(&self) -> String {
        crate::bridge::request_topic(&self.gateway)
    }
}

/// Who an HTTP request is.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller {
    User(String),
    /// The bearer token: may read `/metrics` and `/info.json`, nothing a user has.
    Token,
    /// No credentials at all.
    Nobody,
}

/// Logins checked recently: a page polls, and argon2 costs 19 MiB and tens of ms each time.
pub struct Logins {
    key: [u8; 32],
    ok: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

const REMEMBER: Duration = Duration::from_secs(300);

impl Default for Logins {
    fn default() -> Self {
        Logins {
            key: rand::random(),
            ok: Mutex::new(HashMap::new()),
        }
    }
}

impl Logins {
    fn tag(&self, user: &str, pass: &str) -> [u8; 32] {
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(user.as_bytes());
        m.update(&[0]);
        m.update(pass.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// Who the `Authorization` header says, `Err` for wrong credentials.
    pub async fn caller(
        &self,
        shared: &Shared,
        settings: &Settings,
        header: Option<&hyper::header::HeaderValue>,
        peer: std::net::IpAddr,
    ) -> Result<Caller, ()> {
        let Some(h) = header else {
            return Ok(Caller::Nobody);
        };
        // The header's schemes are decoded by `headers` (RFC 7617 Basic, RFC 6750 Bearer).
        if let Some(Authorization(bearer)) = credentials::<Bearer>(h) {
            use subtle::ConstantTimeEq;
            return match &settings.token {
                Some(want) if bool::from(want.as_bytes().ct_eq(bearer.token().as_bytes())) => Ok(Caller::Token),
                _ => Err(()),
            };
        }
        let Authorization(basic) = credentials::<Basic>(h).ok_or(())?;
        let (user, pass) = (basic.username(), basic.password());
        let tag = self.tag(user, pass);
        let policy = shared.access().policy();
        {
            let mut ok = self.ok.lock().expect("logins lock");
            ok.retain(|_, (_, at)| at.elapsed() < REMEMBER);
            // A user removed on reload is not let in from memory.
            if ok.get(&tag).is_some_and(|(u, _)| u == user) && policy.has_user(user) {
                return Ok(Caller::User(user.to_string()));
            }
        }
        let _slot = shared.admission().password_check(peer).await.ok_or(())?;
        let (u, p) = (user.to_string(), pass.to_string());
        let good = tokio::task::spawn_blocking(move || policy.verify_password(&u, &p))
            .await
            .unwrap_or(false);
        if !good {
            return Err(());
        }
        let mut ok = self.ok.lock().expect("logins lock");
        if ok.len() >= 1024 {
            ok.clear();
        }
        ok.insert(tag, (user.to_string(), Instant::now()));
        Ok(Caller::User(user.to_string()))
    }
}

/// The identity the page's MQTT connection will have, for access checks.
pub fn identity(user: Option<&str>, bind: &str) -> Identity {
    Identity {
        username: user.map(str::to_string),
        client_id: "dashboard".into(),
        listener: bind.to_string(),
        device: false,
    }
}

/// The filters `id` may subscribe to, narrowest first removed when a wider one covers it.
/// Candidates are the ACL's own filters (with `{username}` filled), the grants that apply,
/// and `#`; each is checked against the policy in force now.
pub fn readable(shared: &Shared, settings: &Settings, id: &Identity) -> Vec<String> {
    let mut cands: Vec<String> = vec!["#".into()];
    for f in &settings.acl_filters {
        if f.contains("{client_id}") {
            continue;
        }
        match (&id.username, f.contains("{username}")) {
            (Some(u), true) => cands.push(f.replace("{username}", u)),
            (None, true) => {}
            (_, false) => cands.push(f.clone()),
        }
    }
    let now = crate::system::clock::now_secs();
    for g in shared.access().grants().list.iter() {
        if g.subscribe && g.active(now) && g.applies(id) {
            cands.push(g.filter.clone());
        }
    }
    let allowed: Vec<String> = cands
        .into_iter()
        .filter(|f| topics::valid_filter(f) && shared.access().allows(id, f, Right::Subscribe))
        .collect();
    let mut out: Vec<String> = vec![];
    for f in &allowed {
        let covered = allowed.iter().any(|o| o != f && topics::covers(o, f)) || out.contains(f);
        if !covered {
            out.push(f.clone());
        }
    }
    out.sort();
    out
}

/// `/api/me`.
pub fn me(shared: &Shared, settings: &Settings, user: Option<&str>, bind: &str, status: &StatusDoc) -> Value {
    let id = identity(user, bind);
    let filters = readable(shared, settings, &id);
    let everything = filters.iter().any(|f| f == "#");
    let notice = if everything {
        Value::Null
    } else if filters.is_empty() {
        json!(format!(
            "{} may not read any topic: the broker's ACL gives it none, so the page shows no topics.",
            user.unwrap_or("an anonymous client")
        ))
    } else {
        json!(format!(
            "{} may read only {}: the page subscribes to these, and the broker does not deliver anything else to this user.",
            user.unwrap_or("an anonymous client"),
            filters.join(", ")
        ))
    };
    // Plugs are those the plug service reports, under the topics it publishes them on.
    let plugs: Vec<Value> = status
        .plugs
        .iter()
        .map(|p| p.name.as_str())
        .map(|n| {
            let fill = |t: &str| crate::config::PlugTopics::fill(t, n);
            json!({
                "name": n,
                "live": fill(&settings.plug_live),
                "state": fill(&settings.plug_state),
                "set": fill(&settings.plug_set),
                "may_set": shared.access().allows(&id, &fill(&settings.plug_set), Right::Publish),
            })
        })
        .filter(|p| {
            shared
                .access()
                .allows(&id, p["state"].as_str().unwrap_or(""), Right::Read)
                || shared
                    .access()
                    .allows(&id, p["live"].as_str().unwrap_or(""), Right::Read)
        })
        .collect();
    json!({
        "user": user,
        "gateway": settings.gateway,
        "filters": filters,
        "everything": everything,
        "notice": notice,
        "admin": user.is_some_and(|u| settings.admins.iter().any(|a| a == u)),
        "bridge_request": settings.bridge_request_topic(),
        "bridge_reply": crate::bridge::reply_prefix(&settings.gateway),
        "plugs": plugs,
    })
}

/// One thing that went wrong, as the page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub at_ms: i64,
    pub kind: String,
    pub count: u64,
    pub detail: String,
}

/// The most recent problems: counter rises seen in the status document (the broker's refused
/// logins and ACL denials; the names are in the broker's own ring, `broker::events`), the
/// dashboard's own refusals, and bridges going down. In memory: a restart starts it empty.
#[derive(Default)]
pub struct Problems {
    recent: Mutex<VecDeque<Event>>,
    last: Mutex<HashMap<String, u64>>,
    bridges: Mutex<HashMap<String, bool>>,
}

const KEEP: usize = 20;

/// Reads one broker counter from the status document.
pub type Counter = fn(&BrokerCounters) -> u64;

/// The broker counters shown as problems, with how the page names them.
pub const COUNTERS: [(&str, &str, Counter); 4] = [
    ("connects_refused", "refused logins", |b| b.connects_refused),
    ("publish_denied", "publishes denied by the ACL", |b| b.publish_denied),
    ("subscribe_denied", "subscriptions denied by the ACL", |b| {
        b.subscribe_denied
    }),
    ("delivery_denied", "deliveries withheld by the ACL", |b| {
        b.delivery_denied
    }),
];

impl Problems {
    pub fn note(&self, kind: &str, count: u64, detail: String) {
        let mut r = self.recent.lock().expect("problems lock");
        if r.len() >= KEEP {
            r.pop_front();
        }
        r.push_back(Event {
            at_ms: crate::system::clock::now_ms(),
            kind: kind.to_string(),
            count,
            detail,
        });
    }

    /// Compares the status document with the last one seen.
    pub fn sample(&self, status: &StatusDoc) {
        let mut last = self.last.lock().expect("problems lock");
        for (key, what, get) in COUNTERS {
            let now = get(&status.broker);
            let before = last.insert(key.to_string(), now);
            if let Some(b) = before.filter(|b| now > *b) {
                self.note(key, now - b, format!("{} {what}", now - b));
            }
        }
        drop(last);
        let mut seen = self.bridges.lock().expect("problems lock");
        for b in &status.bridges {
            let (name, up) = (&b.name, b.connected);
            if seen.insert(name.clone(), up) != Some(up) && !up {
                let err = b.last_error.as_deref().unwrap_or("not connected yet");
                self.note("bridge_down", 1, format!("bridge {name} down: {err}"));
            }
        }
    }

    /// `/api/problems` for `user`. The broker's security events (`events`, newest first) name
    /// other users and addresses: an admin sees them all, anyone else only those under their
    /// own user name.
    pub fn doc(&self, status: &StatusDoc, events: &[SecurityEvent], user: Option<&str>, admin: bool) -> Value {
        let counts: serde_json::Map<String, Value> = COUNTERS
            .iter()
            .map(|(k, what, get)| (k.to_string(), json!({ "what": what, "count": get(&status.broker) })))
            .collect();
        let now = crate::system::clock::now_ms();
        let bridges: Vec<Value> = status
            .bridges
            .iter()
            .map(|b| {
                // A bridge that never connected has been down since the gateway started.
                let since = match b.since_ms {
                    0 => status.started as i64 * 1000,
                    s => s,
                };
                json!({
                    "name": b.name,
                    "connected": b.connected,
                    "paused": b.paused,
                    "down_for_s": if b.connected || since == 0 { Value::Null } else { json!((now - since).max(0) / 1000) },
                    "last_error": b.last_error,
                    "queued": b.queued,
                })
            })
            .collect();
        let mut recent: Vec<Event> = self.recent.lock().expect("problems lock").iter().cloned().collect();
        recent.reverse();
        let security: Vec<&SecurityEvent> = events
            .iter()
            .filter(|e| admin || (user.is_some() && e.username.as_deref() == user))
            .collect();
        json!({
            "since": status.started,
            "counts": counts,
            "bridges": bridges,
            "recent": recent,
            "security": security,
            "security_scope": if admin { "all" } else { "own" },
        })
    }
}
/// The `Authorization` header's credentials of scheme `C`, if it is that scheme and well formed.
pub fn credentials<C: Credentials>(h: &hyper::header::HeaderValue) -> Option<Authorization<C>> {
    Authorization::<C>::decode(&mut std::iter::once(h)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_headers_are_decoded_by_scheme_and_never_panic() {
        let h = |v: &str| hyper::header::HeaderValue::from_str(v).unwrap();
        let basic = credentials::<Basic>(&h("Basic YWxpY2U6cHc6d2l0aDpjb2xvbnM=")).unwrap();
        assert_eq!((basic.0.username(), basic.0.password()), ("alice", "pw:with:colons"));
        assert_eq!(credentials::<Bearer>(&h("Bearer t0ken")).unwrap().0.token(), "t0ken");
        assert!(credentials::<Bearer>(&h("Basic YWxpY2U6cHc=")).is_none());
        assert!(credentials::<Basic>(&h("Bearer t0ken")).is_none());
        for junk in ["Basic", "Basic !!!", "Basic YWxpY2U=", "Digest x", ""] {
            assert!(credentials::<Basic>(&h(junk)).is_none(), "{junk:?}");
        }
    }
}
