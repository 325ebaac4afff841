//! Recent security events, with names: refused logins (and why), publishes and subscriptions
//! the ACL denied. The counters in [`super::metrics`] say how many; this ring says who, from
//! where and on what topic, for the dashboard's Problems panel.
//!
//! Bounded whatever clients send: [`CAPACITY`] events at most, the oldest dropped; every string
//! cut to a few hundred bytes; O(1) work per event under one short lock. One noisy origin
//! cannot flush the others' events: an origin (a logged-in user, or for refused logins and
//! anonymous clients the source address, IPv6 by /64) holds at most [`PER_ORIGIN`] events, and
//! a further event of its own replaces its own oldest. An event like one the origin already
//! holds (same kind, user, client id, topic, reason up to its numbers) is counted into it
//! (`count`, `at_ms`) instead of taking a slot. In memory only: a restart starts it empty.

use super::auth::Identity;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

/// Events kept at most.
pub const CAPACITY: usize = 64;
/// Events one origin holds at most.
pub const PER_ORIGIN: usize = 8;
/// Longest client id, user name or reason kept (bytes); longer ones are cut, marked `…`.
const MAX_NAME: usize = 128;
/// Longest topic kept (bytes).
const MAX_TOPIC: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    LoginRefused,
    PublishDenied,
    SubscribeDenied,
}

/// One event as the dashboard shows it. Every string is the client's own, unescaped: whoever
/// renders it must escape it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    pub kind: Kind,
    /// When it last happened (ms since the epoch), and first.
    pub at_ms: i64,
    pub first_ms: i64,
    /// How many times it happened (repeats are counted here, not kept apart).
    pub count: u64,
    pub client_id: String,
    pub username: Option<String>,
    /// `IP:port` of the socket.
    pub source: Option<String>,
    /// The topic or filter denied.
    pub topic: Option<String>,
    /// Why a login was refused.
    pub reason: Option<String>,
}

/// Who an event is charged to (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Origin {
    User(String),
    Addr(IpAddr),
    Nowhere,
}

fn origin_of_addr(peer: Option<SocketAddr>) -> Origin {
    match peer.map(|p| p.ip().to_canonical()) {
        // One IPv6 host usually has a whole /64: charge them all as one.
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            Origin::Addr(IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
        }
        Some(ip) => Origin::Addr(ip),
        None => Origin::Nowhere,
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// Reasons that differ only in their numbers ("next try in 1.2s") are the same reason.
fn same_reason(a: &str, b: &str) -> bool {
    a.chars()
        .filter(|c| !c.is_ascii_digit())
        .eq(b.chars().filter(|c| !c.is_ascii_digit()))
}

struct Node {
    ev: Event,
    origin: Origin,
    /// Older and newer neighbours in the ring's age order.
    older: Option<usize>,
    newer: Option<usize>,
}

/// Slots in a doubly linked age order (oldest at `oldest`), and each origin's slots oldest
/// first: every operation touches a fixed number of them.
#[derive(Default)]
struct Ring {
    slots: Vec<Option<Node>>,
    free: Vec<usize>,
    oldest: Option<usize>,
    newest: Option<usize>,
    by_origin: HashMap<Origin, VecDeque<usize>>,
}

impl Ring {
    fn node(&mut self, i: usize) -> &mut Node {
        self.slots[i].as_mut().expect("a used slot")
    }

    fn unlink(&mut self, i: usize) {
        let (older, newer) = {
            let n = self.node(i);
            (n.older.take(), n.newer.take())
        };
        match older {
            Some(o) => self.node(o).newer = newer,
            None => self.oldest = newer,
        }
        match newer {
            Some(n) => self.node(n).older = older,
            None => self.newest = older,
        }
    }

    fn link_newest(&mut self, i: usize) {
        let prev = self.newest;
        {
            let n = self.node(i);
            n.older = prev;
            n.newer = None;
        }
        match prev {
            Some(p) => self.node(p).newer = Some(i),
            None => self.oldest = Some(i),
        }
        self.newest = Some(i);
    }

    /// Frees slot `i`, which must be the oldest of its origin.
    fn drop_slot(&mut self, i: usize) {
        self.unlink(i);
        let node = self.slots[i].take().expect("a used slot");
        if let Some(q) = self.by_origin.get_mut(&node.origin) {
            if q.front() == Some(&i) {
                q.pop_front();
            } else {
                q.retain(|x| *x != i);
            }
            if q.is_empty() {
                self.by_origin.remove(&node.origin);
            }
        }
        self.free.push(i);
    }

    fn used(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// The ring of recent security events (one per broker, in [`super::Shared`]).
#[derive(Default)]
pub struct Events {
    ring: Mutex<Ring>,
}

/// What an event says before it is stored (borrowed: nothing is copied for a repeat).
struct New<'a> {
    kind: Kind,
    client_id: &'a str,
    username: Option<&'a str>,
    source: Option<SocketAddr>,
    topic: Option<&'a str>,
    reason: Option<&'a str>,
}

impl Events {
    /// A CONNECT refused: bad credentials, client id, will, limits, protocol.
    pub fn login_refused(&self, peer: SocketAddr, client_id: &str, username: Option<&str>, reason: &str) {
        self.record(
            origin_of_addr(Some(peer)),
            New {
                kind: Kind::LoginRefused,
                client_id,
                username,
                source: Some(peer),
                topic: None,
                reason: Some(reason),
            },
        );
    }

    /// A CONNECT refused after it was read (the hook in `connection`).
    pub fn connect_refused(&self, peer: SocketAddr, c: &super::codec::Connect, reason: &str) {
        self.login_refused(peer, &c.client_id, c.username.as_deref(), reason);
    }

    /// A PUBLISH the ACL denied.
    pub fn publish_denied(&self, peer: SocketAddr, id: &Identity, topic: &str) {
        self.denied(Kind::PublishDenied, peer, id, topic);
    }

    /// A SUBSCRIBE filter the ACL denied.
    pub fn subscribe_denied(&self, peer: SocketAddr, id: &Identity, filter: &str) {
        self.denied(Kind::SubscribeDenied, peer, id, filter);
    }

    fn denied(&self, kind: Kind, peer: SocketAddr, id: &Identity, topic: &str) {
        // A logged-in user is one origin wherever it connects from; anonymous clients are
        // told apart by address.
        let origin = match &id.username {
            Some(u) => Origin::User(cut(u, MAX_NAME).into_owned()),
            None => origin_of_addr(Some(peer)),
        };
        self.record(
            origin,
            New {
                kind,
                client_id: &id.client_id,
                username: id.username.as_deref(),
                source: Some(peer),
                topic: Some(topic),
                reason: None,
            },
        );
    }

    fn record(&self, origin: Origin, new: New) {
        let now = crate::system::clock::now_ms();
        let client_id = cut(new.client_id, MAX_NAME);
        let username = new.username.map(|u| cut(u, MAX_NAME));
        let topic = new.topic.map(|t| cut(t, MAX_TOPIC));
        let reason = new.reason.map(|r| cut(r, MAX_NAME));
        let mut guard = self.ring.lock().expect("events lock");
        let r = &mut *guard;
        // A repeat of what this origin already holds: counted into it, which becomes its newest.
        if let Some(q) = r.by_origin.get(&origin) {
            let found = q.iter().position(|&i| {
                let e = &r.slots[i].as_ref().expect("a used slot").ev;
                e.kind == new.kind
                    && e.client_id == *client_id
                    && e.username.as_deref() == username.as_deref()
                    && e.topic.as_deref() == topic.as_deref()
                    && match (&e.reason, &reason) {
                        (Some(a), Some(b)) => same_reason(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            });
            if let Some(pos) = found {
                let q = r.by_origin.get_mut(&origin).expect("just seen");
                let i = q.remove(pos).expect("in range");
                q.push_back(i);
                let n = r.node(i);
                n.ev.count += 1;
                n.ev.at_ms = now;
                n.ev.source = new.source.map(|s| s.to_string());
                if let Some(reason) = reason {
                    n.ev.reason = Some(reason.into_owned());
                }
                r.unlink(i);
                r.link_newest(i);
                return;
            }
        }
        // Room: the origin's own oldest if it holds its share, else the oldest of all.
        let own = r
            .by_origin
            .get(&origin)
            .filter(|q| q.len() >= PER_ORIGIN)
            .and_then(|q| q.front().copied());
        if let Some(i) = own {
            r.drop_slot(i);
        } else if r.used() >= CAPACITY {
            if let Some(i) = r.oldest {
                r.drop_slot(i);
            }
        }
        let node = Node {
            ev: Event {
                kind: new.kind,
                at_ms: now,
                first_ms: now,
                count: 1,
                client_id: client_id.into_owned(),
                username: username.map(|u| u.into_owned()),
                source: new.source.map(|s| s.to_string()),
                topic: topic.map(|t| t.into_owned()),
                reason: reason.map(|r| r.into_owned()),
            },
            origin: origin.clone(),
            older: None,
            newer: None,
        };
        let i = match r.free.pop() {
            Some(i) => {
                r.slots[i] = Some(node);
                i
            }
            None => {
                r.slots.push(Some(node));
                r.slots.len() - 1
            }
        };
        r.link_newest(i);
        r.by_origin.entry(origin).or_default().push_back(i);
    }

    /// The events held, newest first.
    pub fn recent(&self) -> Vec<Event> {
        let r = self.ring.lock().expect("events lock");
        let mut out = Vec::with_capacity(r.used());
        let mut at = r.newest;
        while let Some(i) = at {
            let n = r.slots[i].as_ref().expect("a used slot");
            out.push(n.ev.clone());
            at = n.older;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 40000))
    }

    fn user(name: &str) -> Identity {
        Identity {
            username: Some(name.into()),
            client_id: format!("{name}-1"),
            listener: "127.0.0.1:1883".into(),
            device: false,
        }
    }

    #[test]
    fn newest_first_with_names_and_repeats_counted() {
        let e = Events::default();
        e.login_refused(peer(1), "c1", Some("eve"), "wrong password or unknown user \"eve\"");
        e.publish_denied(peer(2), &user("bob"), "plant/alice/soil");
        e.publish_denied(peer(2), &user("bob"), "plant/alice/soil");
        e.subscribe_denied(peer(2), &user("bob"), "#");
        let r = e.recent();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].kind, Kind::SubscribeDenied);
        assert_eq!(r[0].topic.as_deref(), Some("#"));
        assert_eq!(r[1].kind, Kind::PublishDenied);
        assert_eq!(r[1].count, 2);
        assert_eq!(r[1].username.as_deref(), Some("bob"));
        assert_eq!(r[1].source.as_deref(), Some("10.0.0.2:40000"));
        assert_eq!(r[2].kind, Kind::LoginRefused);
        assert_eq!(r[2].client_id, "c1");
        // A repeat moves to the front.
        e.login_refused(peer(1), "c1", Some("eve"), "wrong password or unknown user \"eve\"");
        let r = e.recent();
        assert_eq!((r[0].kind, r[0].count, r.len()), (Kind::LoginRefused, 2, 3));
    }

    #[test]
    fn throttled_logins_differing_in_their_wait_are_one_event() {
        let e = Events::default();
        for ms in [250, 500, 1000, 2000] {
            e.login_refused(
                peer(1),
                "c",
                Some("x"),
                &format!("too many failed logins; next try in {ms}ms"),
            );
        }
        let r = e.recent();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].count, 4);
        assert_eq!(
            r[0].reason.as_deref(),
            Some("too many failed logins; next try in 2000ms")
        );
    }

    #[test]
    fn bounded_whatever_is_sent_and_one_origin_cannot_flush_the_others() {
        let e = Events::default();
        e.publish_denied(peer(1), &user("alice"), "plant/secret");
        e.login_refused(peer(7), "quiet", Some("carol"), "wrong password");
        // Bob sends 10,000 denials, each on a new topic, with huge names.
        let long = "x".repeat(100_000);
        for i in 0..10_000 {
            let mut id = user(&long);
            id.client_id = format!("{i}{long}");
            e.publish_denied(peer(2), &id, &format!("{i}/{long}"));
        }
        let r = e.recent();
        assert!(r.len() <= CAPACITY);
        let noisy: Vec<&Event> = r
            .iter()
            .filter(|x| x.topic.as_deref().is_some_and(|t| t.ends_with("xxx…")))
            .collect();
        assert_eq!(noisy.len(), PER_ORIGIN, "one origin holds its share, no more");
        for x in &noisy {
            assert!(x.topic.as_ref().unwrap().len() <= MAX_TOPIC + 3);
            assert!(x.client_id.len() <= MAX_NAME + 3);
            assert!(x.username.as_ref().unwrap().len() <= MAX_NAME + 3);
        }
        assert!(
            r.iter().any(|x| x.topic.as_deref() == Some("plant/secret")),
            "alice's event was flushed"
        );
        assert!(
            r.iter().any(|x| x.username.as_deref() == Some("carol")),
            "carol's event was flushed"
        );
        // Refused logins from one address under ever new names: its share too.
        for i in 0..1000 {
            e.login_refused(peer(3), &format!("c{i}"), Some(&format!("u{i}")), "wrong password");
        }
        let r = e.recent();
        assert_eq!(
            r.iter()
                .filter(|x| x.source.as_deref() == Some("10.0.0.3:40000"))
                .count(),
            PER_ORIGIN
        );
        assert!(r.iter().any(|x| x.username.as_deref() == Some("carol")));
        // Many origins: the ring stays at its capacity, oldest dropped first.
        for n in 0..200u8 {
            e.login_refused(
                SocketAddr::from(([10, 1, 0, n], 1)),
                "c",
                Some("many"),
                "wrong password",
            );
        }
        let r = e.recent();
        assert_eq!(r.len(), CAPACITY);
        assert_eq!(r[0].source.as_deref(), Some("10.1.0.199:1"));
        assert!(
            !r.iter().any(|x| x.username.as_deref() == Some("carol")),
            "the oldest goes first"
        );
        let ring = e.ring.lock().unwrap();
        assert!(ring.slots.len() <= CAPACITY && ring.by_origin.len() <= CAPACITY);
    }

    #[test]
    fn ipv6_hosts_of_one_prefix_are_one_origin() {
        let e = Events::default();
        for i in 0..100u16 {
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i);
            e.login_refused(
                SocketAddr::from((ip, 1)),
                &format!("c{i}"),
                None,
                "anonymous clients are not allowed",
            );
        }
        assert_eq!(e.recent().len(), PER_ORIGIN);
    }

    #[test]
    fn cut_keeps_characters_whole() {
        let s = "é".repeat(200);
        let c = cut(&s, MAX_NAME);
        assert!(c.ends_with('…') && c.len() <= MAX_NAME + 3);
        assert_eq!(cut("short", MAX_NAME), "short");
    }
}
