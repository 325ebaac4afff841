//! The router as a user sees it: who gets a message, at what QoS, how often, and what a session
//! keeps (offline queues, their bounds, expiry, restarts). Raw sockets where a test must control
//! every packet (no library acking for us), rumqttc and mosquitto_* elsewhere.

use crate::common::*;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet as P4};
use rumqttc::v5::mqttbytes::v5::{self as m5, Packet as P5};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);
/// How long a test watches for something that must not arrive.
const QUIET: Duration = Duration::from_millis(800);

/// A client on a raw socket: it sends exactly what the test says, and acks nothing by itself.
pub(crate) struct Raw {
    pub(crate) s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub(crate) fn open(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    /// A 3.1.1 CONNECT; returns the client and CONNACK's session present flag.
    pub(crate) fn v4(port: u16, id: &str, clean: bool) -> (Raw, bool) {
        let mut c = v4::Connect::new(id);
        c.keep_alive = 60;
        c.clean_session = clean;
        let mut r = Raw::open(port);
        r.send4(P4::Connect(c));
        match r.recv4(T) {
            Some(P4::ConnAck(a)) => {
                assert_eq!(a.code, v4::ConnectReturnCode::Success, "CONNACK for {id}");
                (r, a.session_present)
            }
            other => panic!("expected CONNACK for {id}, got {other:?}"),
        }
    }

    /// An MQTT 5 CONNECT; returns the client and its CONNACK.
    pub(crate) fn v5(port: u16, id: &str, clean_start: bool, props: m5::ConnectProperties) -> (Raw, m5::ConnAck) {
        let c = m5::Connect {
            keep_alive: 60,
            client_id: id.into(),
            clean_start,
            properties: Some(props),
        };
        let mut r = Raw::open(port);
        r.send5(P5::Connect(c, None, None));
        match r.recv5(T) {
            Some(P5::ConnAck(a)) => {
                assert_eq!(a.code, m5::ConnectReturnCode::Success, "CONNACK for {id}");
                (r, a)
            }
            other => panic!("expected CONNACK for {id}, got {other:?}"),
        }
    }

    pub(crate) fn send4(&mut self, p: P4) {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 24).unwrap();
        self.s.write_all(&b).unwrap();
    }

    pub(crate) fn send5(&mut self, p: P5) {
        let mut b = BytesMut::new();
        p.write(&mut b, None).unwrap();
        self.s.write_all(&b).unwrap();
    }

    /// Reads more bytes; false on timeout. Panics when the broker closes the connection.
    pub(crate) fn fill(&mut self, end: Instant) -> bool {
        let now = Instant::now();
        if now >= end {
            return false;
        }
        self.s.set_read_timeout(Some(end - now)).unwrap();
        let mut tmp = [0u8; 65536];
        match self.s.read(&mut tmp) {
            Ok(0) => panic!("the broker closed the connection"),
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
            Err(e) => panic!("connection failed: {e}"),
        }
    }

    /// The next packet, or `None` after `within`.
    pub(crate) fn recv4(&mut self, within: Duration) -> Option<P4> {
        let end = Instant::now() + within;
        loop {
            match P4::read(&mut self.buf, 1 << 24) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !self.fill(end) {
                        return None;
                    }
                }
                Err(e) => panic!("undecodable packet from the broker: {e}"),
            }
        }
    }

    pub(crate) fn recv5(&mut self, within: Duration) -> Option<P5> {
        let end = Instant::now() + within;
        loop {
            if !whole_frame(&self.buf) {
                if !self.fill(end) {
                    return None;
                }
                continue;
            }
            normalize5(&mut self.buf);
            match P5::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(e) => panic!("undecodable packet from the broker: {e}"),
            }
        }
    }

    /// Waits for a packet `f` picks, skipping others (PINGRESPs, deliveries not asked about).
    pub(crate) fn expect4<T>(&mut self, what: &str, mut f: impl FnMut(&P4) -> Option<T>) -> T {
        let end = Instant::now() + T;
        while let Some(p) = self.recv4(end.saturating_duration_since(Instant::now())) {
            if let Some(t) = f(&p) {
                return t;
            }
        }
        panic!("no {what} within {T:?}");
    }

    pub(crate) fn subscribe4(&mut self, filters: &[(&str, QoS)]) -> Vec<rumqttc::SubscribeReasonCode> {
        let mut s = v4::Subscribe::new_many(filters.iter().map(|(f, q)| v4::SubscribeFilter::new(f.to_string(), *q)));
        s.pkid = 900;
        self.send4(P4::Subscribe(s));
        self.expect4("SUBACK", |p| match p {
            P4::SubAck(a) if a.pkid == 900 => Some(a.return_codes.clone()),
            _ => None,
        })
    }

    pub(crate) fn publish4(&mut self, topic: &str, qos: QoS, retain: bool, pkid: u16, payload: &[u8]) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
        self.send4(P4::Publish(p));
    }

    /// Publishes and waits until the broker has taken the message (PUBACK, or PUBREC + PUBCOMP).
    pub(crate) fn publish4_acked(&mut self, topic: &str, qos: QoS, retain: bool, pkid: u16, payload: &[u8]) {
        self.publish4(topic, qos, retain, pkid, payload);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.expect4("PUBACK", |p| matches!(p, P4::PubAck(a) if a.pkid == pkid).then_some(())),
            QoS::ExactlyOnce => {
                self.expect4("PUBREC", |p| matches!(p, P4::PubRec(a) if a.pkid == pkid).then_some(()));
                self.send4(P4::PubRel(v4::PubRel::new(pkid)));
                self.expect4("PUBCOMP", |p| {
                    matches!(p, P4::PubComp(a) if a.pkid == pkid).then_some(())
                });
            }
        }
    }

    /// Publishes `n` QoS 1 messages, `topic(i)`/`payload(i)` for i in 0..n, keeping at most 50
    /// unacknowledged (inside the broker's in-flight limit); returns when all are PUBACKed.
    pub(crate) fn publish4_many(&mut self, n: usize, retain: bool, mut msg: impl FnMut(usize) -> (String, Vec<u8>)) {
        let mut acked = 0;
        for i in 0..n {
            let (t, b) = msg(i);
            self.publish4(&t, qos(1), retain, (i % 60000) as u16 + 1, &b);
            if i + 1 - acked >= 50 {
                self.expect4("PUBACK", |x| matches!(x, P4::PubAck(_)).then_some(()));
                acked += 1;
            }
        }
        while acked < n {
            self.expect4("PUBACK", |x| matches!(x, P4::PubAck(_)).then_some(()));
            acked += 1;
        }
    }

    /// Acks one delivery the way a well-behaved 3.1.1 client does.
    pub(crate) fn ack4(&mut self, p: &v4::Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send4(P4::PubAck(v4::PubAck::new(p.pkid))),
            QoS::ExactlyOnce => self.send4(P4::PubRec(v4::PubRec::new(p.pkid))),
        }
    }

    /// Collects deliveries (acking each; answering PUBREL with PUBCOMP) until `QUIET` passes
    /// with nothing new, or `within` ends.
    pub(crate) fn drain4(&mut self, within: Duration, quiet: Duration) -> Vec<v4::Publish> {
        let end = Instant::now() + within;
        let mut got = vec![];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv4(left.min(quiet)) {
                None => return got,
                Some(P4::Publish(p)) => {
                    self.ack4(&p);
                    got.push(p);
                }
                Some(P4::PubRel(r)) => self.send4(P4::PubComp(v4::PubComp::new(r.pkid))),
                Some(_) => {}
            }
        }
    }

    /// Collects deliveries until `n` arrived (or `within` ends), acking each.
    pub(crate) fn collect4(&mut self, n: usize, within: Duration) -> Vec<v4::Publish> {
        let end = Instant::now() + within;
        let mut got = vec![];
        while got.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv4(left) {
                None => break,
                Some(P4::Publish(p)) => {
                    self.ack4(&p);
                    got.push(p);
                }
                Some(P4::PubRel(r)) => self.send4(P4::PubComp(v4::PubComp::new(r.pkid))),
                Some(_) => {}
            }
        }
        got
    }

    pub(crate) fn disconnect4(mut self) {
        self.send4(P4::Disconnect);
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        closes_within(&mut self.s, T);
    }
}

/// rumqttc's v5 decoder wants the property length that the spec lets a sender leave out of a
/// DISCONNECT with only a reason code (3.14.2.2.1) or an ack with pkid and reason code
/// (3.4.2.2.1): add the zero it stands for.
fn normalize5(buf: &mut BytesMut) {
    let (kind, len) = (buf[0] & 0xf0, buf[1]);
    if (kind == 0xe0 && len == 1) || (matches!(kind, 0x40 | 0x50 | 0x60 | 0x70) && len == 3) {
        let end = 2 + len as usize;
        let mut fixed = BytesMut::from(&buf[..end]);
        fixed[1] += 1;
        fixed.extend_from_slice(&[0]);
        fixed.extend_from_slice(&buf[end..]);
        *buf = fixed;
    }
}

/// Whether `buf` starts with a whole MQTT packet (fixed header and remaining length).
fn whole_frame(buf: &[u8]) -> bool {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return false;
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return buf.len() >= 2 + i + len;
        }
    }
    true // malformed length: let the decoder say so
}

pub(crate) fn qos(n: u8) -> QoS {
    rumqttc::qos(n).unwrap()
}

pub(crate) fn q5(n: u8) -> Q5 {
    rumqttc::v5::mqttbytes::qos(n).unwrap()
}

fn payloads(got: &[v4::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).to_string())
        .collect()
}

/// Waits until `f` holds for the gateway's status document (rewritten every 2 s).
fn wait_status(gw: &Gateway, within: Duration, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = Instant::now() + within;
    loop {
        let st = gw.status();
        if f(&st) || Instant::now() >= end {
            return st;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn broker_with(port: u16, extra: &str) -> String {
    format!("{}{extra}", open_broker(port))
}

#[test]
fn delivered_qos_is_the_minimum_of_publish_and_granted_qos() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    // One 3.1.1 and one MQTT 5 subscriber, each with filters granted 0, 1 and 2.
    let (mut s4, _) = Raw::v4(port, "qos-sub4", true);
    let granted = s4.subscribe4(&[("q/0/#", qos(0)), ("q/1/#", qos(1)), ("q/2/#", qos(2))]);
    assert_eq!(
        granted,
        [0, 1, 2]
            .map(|q| rumqttc::SubscribeReasonCode::Success(qos(q)))
            .to_vec()
    );
    let (mut s5, _) = Raw::v5(port, "qos-sub5", true, m5::ConnectProperties::new());
    s5.send5(P5::Subscribe(m5::Subscribe {
        pkid: 1,
        filters: (0..3).map(|q| m5::Filter::new(format!("q/{q}/#"), q5(q))).collect(),
        properties: None,
    }));
    assert!(matches!(s5.recv5(T), Some(P5::SubAck(_))));

    let (mut p, _) = Raw::v4(port, "qos-pub", true);
    for sub in 0..3u8 {
        for publ in 0..3u8 {
            let pkid = 1 + (sub * 3 + publ) as u16;
            p.publish4_acked(&format!("q/{sub}/{publ}"), qos(publ), false, pkid, b"x");
        }
    }
    let mut got4 = BTreeMap::new();
    for m in s4.collect4(9, T) {
        got4.entry(m.topic.clone()).or_insert(vec![]).push(m.qos as u8);
    }
    let mut got5 = BTreeMap::new();
    let end = Instant::now() + T;
    while got5.len() < 9 {
        match s5.recv5(end.saturating_duration_since(Instant::now())) {
            None => break,
            Some(P5::Publish(m)) => {
                match m.qos {
                    Q5::AtLeastOnce => s5.send5(P5::PubAck(m5::PubAck::new(m.pkid, None))),
                    Q5::ExactlyOnce => s5.send5(P5::PubRec(m5::PubRec::new(m.pkid, None))),
                    _ => {}
                }
                got5.insert(String::from_utf8_lossy(&m.topic).to_string(), m.qos as u8);
            }
            Some(_) => {}
        }
    }
    let mut want4 = BTreeMap::new();
    let mut want5 = BTreeMap::new();
    for sub in 0..3u8 {
        for publ in 0..3u8 {
            want4.insert(format!("q/{sub}/{publ}"), vec![sub.min(publ)]);
            want5.insert(format!("q/{sub}/{publ}"), sub.min(publ));
        }
    }
    assert_eq!(
        got4, want4,
        "3.1.1 subscriber: topic q/GRANTED/PUBLISHED -> delivered QoS"
    );
    assert_eq!(
        got5, want5,
        "MQTT 5 subscriber: topic q/GRANTED/PUBLISHED -> delivered QoS"
    );
}

#[test]
fn qos2_is_exactly_once_when_the_publisher_reconnects_mid_flow() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut sub, _) = Raw::v4(port, "eo-sub", true);
    sub.subscribe4(&[("eo/#", qos(2))]);

    // Message A: PUBREC seen, connection lost; on reconnect the client resends the PUBLISH
    // (DUP) and then the PUBREL. Message B: PUBREC seen, connection lost; on reconnect the
    // client sends only the PUBREL (3.1.1 4.4, 5.0 4.4).
    let (mut p, _) = Raw::v4(port, "eo-pub", false);
    p.publish4("eo/a", qos(2), false, 7, b"A");
    p.expect4("PUBREC 7", |x| matches!(x, P4::PubRec(a) if a.pkid == 7).then_some(()));
    p.publish4("eo/b", qos(2), false, 8, b"B");
    p.expect4("PUBREC 8", |x| matches!(x, P4::PubRec(a) if a.pkid == 8).then_some(()));
    drop(p); // no DISCONNECT: the connection just breaks

    let (mut p, present) = Raw::v4(port, "eo-pub", false);
    assert!(present, "the publisher's session (with its QoS 2 state) is gone");
    let mut again = v4::Publish::new("eo/a", qos(2), b"A".to_vec());
    again.pkid = 7;
    again.dup = true;
    p.send4(P4::Publish(again));
    p.expect4("PUBREC 7 for the resent PUBLISH", |x| {
        matches!(x, P4::PubRec(a) if a.pkid == 7).then_some(())
    });
    for id in [7, 8] {
        p.send4(P4::PubRel(v4::PubRel::new(id)));
        p.expect4("PUBCOMP", |x| matches!(x, P4::PubComp(a) if a.pkid == id).then_some(()));
    }
    // Message C: the same PUBLISH twice on one connection before PUBREL.
    p.publish4("eo/c", qos(2), false, 9, b"C");
    p.expect4("PUBREC 9", |x| matches!(x, P4::PubRec(a) if a.pkid == 9).then_some(()));
    let mut dup = v4::Publish::new("eo/c", qos(2), b"C".to_vec());
    dup.pkid = 9;
    dup.dup = true;
    p.send4(P4::Publish(dup));
    p.expect4("PUBREC 9 again", |x| {
        matches!(x, P4::PubRec(a) if a.pkid == 9).then_some(())
    });
    p.send4(P4::PubRel(v4::PubRel::new(9)));
    p.expect4("PUBCOMP 9", |x| {
        matches!(x, P4::PubComp(a) if a.pkid == 9).then_some(())
    });
    let mut got = payloads(&sub.drain4(T, Duration::from_millis(1500)));
    got.sort();
    assert_eq!(got, vec!["A", "B", "C"], "each QoS 2 message exactly once");
}

#[test]
fn qos2_toward_a_subscriber_resumes_with_pubrel_after_its_reconnect() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut sub, _) = Raw::v4(port, "eo-rx", false);
    sub.subscribe4(&[("rx/#", qos(2))]);
    let (mut p, _) = Raw::v4(port, "eo-tx", true);
    p.publish4_acked("rx/1", qos(2), false, 1, b"once");

    // The subscriber gets the PUBLISH but its connection breaks before it answers.
    let first = sub.expect4("PUBLISH", |x| match x {
        P4::Publish(m) => Some(m.clone()),
        _ => None,
    });
    drop(sub);
    // Back: the broker resends the PUBLISH with DUP set and the same packet id.
    let (mut sub, present) = Raw::v4(port, "eo-rx", false);
    assert!(present);
    let again = sub.expect4("resent PUBLISH", |x| match x {
        P4::Publish(m) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(
        (again.pkid, again.dup, &again.payload),
        (first.pkid, true, &first.payload)
    );
    // Now it answers PUBREC, gets PUBREL, and breaks again before sending PUBCOMP.
    sub.send4(P4::PubRec(v4::PubRec::new(again.pkid)));
    sub.expect4("PUBREL", |x| {
        matches!(x, P4::PubRel(r) if r.pkid == again.pkid).then_some(())
    });
    drop(sub);
    // Back again: only the PUBREL is resent, never the message.
    let (mut sub, present) = Raw::v4(port, "eo-rx", false);
    assert!(present);
    let mut seen = vec![];
    while let Some(x) = sub.recv4(QUIET) {
        seen.push(x);
    }
    assert_eq!(
        seen,
        vec![P4::PubRel(v4::PubRel::new(again.pkid))],
        "after PUBREC the broker must resend PUBREL and not the PUBLISH"
    );
}

#[test]
fn a_shared_group_member_that_never_reads_does_not_stall_the_group() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    shared_group_body(port);
}

fn shared_group_body(port: u16) {
    // Member A: MQTT 5, Receive Maximum 5, subscribes and then never reads its socket.
    let mut props = m5::ConnectProperties::new();
    props.receive_maximum = Some(5);
    let (mut a, _) = Raw::v5(port, "share-a", true, props);
    a.send5(P5::Subscribe(m5::Subscribe::new(
        m5::Filter::new("$share/g/work", q5(1)),
        None,
    )));
    assert!(matches!(a.recv5(T), Some(P5::SubAck(_))));
    // Member B reads as fast as it can.
    let (mut b, _) = Raw::v4(port, "share-b", true);
    b.subscribe4(&[("$share/g/work", qos(1))]);

    // 300 QoS 1 messages: the publisher is never held up.
    let (mut p, _) = Raw::v4(port, "share-pub", true);
    let n = 300usize;
    let started = Instant::now();
    p.publish4_many(n, false, |i| ("work".into(), i.to_string().into_bytes()));
    assert!(started.elapsed() < T, "the publisher was held up by the group");

    // B gets everything but what A holds in flight (at most its Receive Maximum).
    let mut got: BTreeSet<String> = payloads(&b.drain4(T, QUIET)).into_iter().collect();
    let while_a_connected = got.len();
    // When A's connection ends (its session with it), what it held goes to B (5.0 4.8.2).
    drop(a);
    got.extend(payloads(&b.drain4(T, Duration::from_millis(1500))));
    assert!(
        while_a_connected >= n - 5,
        "the reading member got {while_a_connected} of {n} while the other member held the rest \
         ({} of {n} once that member had left)",
        got.len()
    );
    assert_eq!(
        got.len(),
        n,
        "messages the silent member never acked were not given to the other member"
    );
}

#[test]
fn a_persistent_shared_member_leaving_with_an_unacked_message_breaks_nothing() {
    // The old engine's router thread panicked here and nothing was routed for anyone.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut m, _) = Raw::v4(port, "share-persist", false);
    m.subscribe4(&[("$share/g/jobs", qos(1))]);
    let (mut p, _) = Raw::v4(port, "jobs-pub", true);
    p.publish4_acked("jobs", qos(1), false, 1, b"one");
    m.expect4("the job", |x| matches!(x, P4::Publish(_)).then_some(()));
    drop(m); // no PUBACK, no DISCONNECT

    let (mut other, _) = Raw::v4(port, "bystander", true);
    other.subscribe4(&[("plain/#", qos(1))]);
    p.publish4_acked("plain/x", qos(1), false, 2, b"still routed");
    assert_eq!(payloads(&other.collect4(1, T)), vec!["still routed"]);
    let (_c, present) = Raw::v4(port, "newcomer", true);
    assert!(!present);
    // The member comes back and gets its job again.
    let (mut m, present) = Raw::v4(port, "share-persist", false);
    assert!(present);
    assert_eq!(payloads(&m.collect4(1, T)), vec!["one"]);
}

#[test]
fn ten_thousand_retained_topics_all_reach_a_new_hash_subscriber() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let n = 10_000usize;
    let (mut p, _) = Raw::v4(port, "retainer", true);
    p.publish4_many(n, true, |i| (format!("ret/{i}"), format!("v{i}").into_bytes()));

    let (mut s, _) = Raw::v4(port, "everything", true);
    s.subscribe4(&[("#", qos(1))]);
    let got = s.drain4(Duration::from_secs(15), Duration::from_secs(2));
    let topics: BTreeSet<&str> = got
        .iter()
        .filter(|p| p.retain && p.topic.starts_with("ret/"))
        .map(|p| p.topic.as_str())
        .collect();
    assert_eq!(topics.len(), n, "retained messages delivered to the new `#` subscriber");
    let wrong = got
        .iter()
        .filter(|p| p.topic.starts_with("ret/") && p.payload != format!("v{}", &p.topic[4..]).as_bytes())
        .count();
    assert_eq!(wrong, 0, "retained messages with the wrong payload");
}

#[test]
fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut s, _) = Raw::v4(port, "overlap", true);
    s.subscribe4(&[("ov/#", qos(0)), ("ov/+", qos(2)), ("ov/x", qos(1))]);
    let (mut p, _) = Raw::v4(port, "ov-pub", true);
    p.publish4_acked("ov/x", qos(2), false, 1, b"m");
    let got = s.drain4(T, QUIET);
    assert_eq!(
        got.iter().map(|m| (m.topic.as_str(), m.qos as u8)).collect::<Vec<_>>(),
        vec![("ov/x", 2)],
        "one copy, at the highest QoS of the matching subscriptions"
    );
}

#[test]
fn a_session_over_its_queue_bound_keeps_exactly_the_bound_and_counts_the_drops() {
    let port = free_port();
    let gw = Gateway::start(&broker_with(port, "  sessions: { max_queued_messages: 100 }\n"));
    let (mut s, _) = Raw::v4(port, "bounded", false);
    s.subscribe4(&[("bound/#", qos(1))]);
    s.disconnect4();

    let (mut p, _) = Raw::v4(port, "bound-pub", true);
    for i in 1..=150u16 {
        p.publish4_acked("bound/x", qos(1), false, i, i.to_string().as_bytes());
    }
    let (mut s, present) = Raw::v4(port, "bounded", false);
    assert!(present);
    let got = s.drain4(T, Duration::from_millis(1500));
    assert_eq!(got.len(), 100, "messages delivered from a queue bounded at 100");
    let distinct: BTreeSet<_> = payloads(&got).into_iter().collect();
    assert_eq!(distinct.len(), 100, "duplicates among the queued messages");

    // The 50 dropped are counted where a user looks: `outpost status` (status.json), in total
    // and for this session, by reason.
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["dropped"]["queue_full"].as_u64() == Some(50)
    });
    assert_eq!(
        st["router"]["dropped"]["queue_full"].as_u64(),
        Some(50),
        "drops counted in `outpost status --json`: {}",
        st["router"]
    );
    let mine: Vec<_> = st["router"]["sessions_dropping"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d["session"].as_str().is_some_and(|k| k.contains("bounded")))
        .collect();
    assert_eq!(mine.len(), 1, "the dropping session is named: {}", st["router"]);
    assert_eq!(mine[0]["queue_full"].as_u64(), Some(50), "{}", mine[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_slows_publishers_and_loses_nothing() {
    let port = free_port();
    let gw = Gateway::start(&broker_with(
        port,
        // One user (anonymous) may hold the whole budget here: the pause itself is tested.
        "  sessions: { max_queued_bytes: 64MiB, memory_budget: 1MiB, max_user_bytes: 1MiB }\n",
    ));
    // A QoS 1 subscriber that stops reading (its event loop is not polled) for a while.
    let (sub, mut sev) = connect(opts(port, "slow-sub")).await.unwrap();
    subscribe(&sub, &mut sev, "budget/#", QoS::AtLeastOnce).await;

    let n = 4000usize; // 4000 x 1 KiB: four times the budget
    let (p, mut pev) = connect(opts(port, "fast-pub")).await.unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = acked.clone();
    let pumping = tokio::spawn(async move {
        while let Ok(e) = pev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
                a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let publishing = tokio::spawn(async move {
        for i in 0..n {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(1024, b'.');
            p.publish("budget/x", QoS::AtLeastOnce, false, payload).await.unwrap();
        }
        p
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_stalled = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        while_stalled < n / 2,
        "the publisher was not slowed: {while_stalled} of {n} acknowledged while the subscriber read nothing"
    );

    // The subscriber reads again: every acknowledged message arrives, once, in order.
    let mut got = vec![];
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n {
        match tokio::time::timeout_at(end, sev.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(m)))) => {
                got.push(String::from_utf8_lossy(&m.payload[..6]).to_string())
            }
            Ok(Ok(_)) => {}
        }
    }
    let _p = publishing.await.unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("{i:06}")).collect();
    assert_eq!(got.len(), n, "messages delivered of {n} published at QoS 1");
    assert_eq!(got, want, "lost, duplicated or reordered");
    let end = tokio::time::Instant::now() + T;
    while acked.load(std::sync::atomic::Ordering::Relaxed) < n && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(acked.load(std::sync::atomic::Ordering::Relaxed), n);
    pumping.abort();
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["publisher_pauses"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        st["router"]["publisher_pauses"].as_u64().unwrap_or(0) > 0,
        "the pause is not visible in `outpost status`: {}",
        st["router"]
    );
    assert_eq!(
        st["router"]["dropped"]["queue_full"].as_u64(),
        Some(0),
        "{}",
        st["router"]
    );
}

const DENY_ACL: &str = "  acl:\n    - { who: \"*\", allow: { publish: [\"#\"], subscribe: [\"#\"] }, deny: { subscribe: [\"test/nosubscribe\", \"secret/#\"] } }\n";

#[test]
fn deny_rules_refuse_the_subscription_and_filter_wider_ones() {
    let port = free_port();
    let gw = Gateway::start(&broker_with(port, DENY_ACL));
    let (mut s, _) = Raw::v4(port, "denied", true);
    let codes = s.subscribe4(&[
        ("test/nosubscribe", qos(1)),
        ("secret/#", qos(1)),
        ("secret/inner", qos(1)),
        ("test/ok", qos(1)),
    ]);
    assert_eq!(
        codes,
        vec![
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Success(qos(1)),
        ]
    );
    // MQTT 5: a reason code of 0x80 or more (Not authorized, 0x87, is the one that says why).
    let (mut s5, _) = Raw::v5(port, "denied5", true, m5::ConnectProperties::new());
    s5.send5(P5::Subscribe(m5::Subscribe::new(
        m5::Filter::new("test/nosubscribe", q5(1)),
        None,
    )));
    match s5.recv5(T) {
        Some(P5::SubAck(a)) => assert!(
            !matches!(a.return_codes[0], m5::SubscribeReasonCode::Success(_)),
            "MQTT 5 subscription to a denied filter granted: {a:?}"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let (mut all, _) = Raw::v4(port, "hash", true);
    all.subscribe4(&[("#", qos(1))]);
    let (mut p, _) = Raw::v4(port, "deny-pub", true);
    p.publish4_acked("test/nosubscribe", qos(1), false, 1, b"hidden");
    p.publish4_acked("secret/deep/x", qos(1), true, 2, b"hidden");
    p.publish4_acked("test/ok", qos(1), false, 3, b"visible");
    let got: Vec<String> = all
        .drain4(T, QUIET)
        .into_iter()
        .filter(|m| !m.topic.starts_with("outpost/"))
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, vec!["test/ok"], "a `#` subscriber got a denied topic");
    // Nor does a new `#` subscriber get the denied retained message.
    let (mut late, _) = Raw::v4(port, "hash-late", true);
    late.subscribe4(&[("#", qos(1))]);
    let got: Vec<String> = late.drain4(T, QUIET).into_iter().map(|m| m.topic).collect();
    assert!(
        !got.iter().any(|t| t.starts_with("secret/")),
        "retained denied topic delivered: {got:?}"
    );
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["broker"]["delivery_denied"].as_u64().unwrap_or(0) >= 2
    });
    assert!(
        st["broker"]["delivery_denied"].as_u64().unwrap_or(0) >= 2,
        "deliveries held back by the deny rule are not counted: {}",
        st["broker"]
    );
}

/// Narrows `reader` to subscribing (and so reading) `filter` alone, lets `writer` publish
/// anything, reloads (SIGHUP) and waits until the new policy is in force.
fn reload_narrowed_acl(gw: &Gateway, port: u16, reader: &str, filter: &str) {
    gw.write_config(&broker_with(
        port,
        &format!(
            "  acl:\n    - {{ who: \"client:{reader}\", allow: {{ publish: [], subscribe: [\"{filter}\"] }} }}\n    - {{ who: \"client:writer\", allow: {{ publish: [\"#\"], subscribe: [] }} }}\n"
        ),
    ));
    gw.signal("HUP");
    // In force once the writer is refused subscribing.
    let end = Instant::now() + T;
    loop {
        let (mut w, _) = Raw::v4(port, "writer", true);
        if w.subscribe4(&[("probe", qos(0))]) == vec![rumqttc::SubscribeReasonCode::Failure] {
            return;
        }
        assert!(Instant::now() < end, "the new ACL never came into force");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn delivery_checks_the_acl_in_force_for_a_hash_subscriber() {
    let port = free_port();
    let gw = Gateway::start(&broker_with(
        port,
        "  acl:\n    - { who: \"*\", allow: { publish: [\"#\"], subscribe: [\"#\"] } }\n",
    ));
    let (mut s, _) = Raw::v4(port, "reader", true);
    s.subscribe4(&[("#", qos(1))]);
    // The operator narrows the reader to `a/#` (SIGHUP reloads the ACL); the `#` subscription
    // made before stays, but may only deliver what the reader may read now.
    reload_narrowed_acl(&gw, port, "reader", "a/#");
    let (mut w, _) = Raw::v4(port, "writer", true);
    w.publish4_acked("b/1", qos(1), false, 1, b"not yours");
    w.publish4_acked("a/1", qos(1), false, 2, b"yours");
    w.publish4_acked("b/2", qos(1), false, 3, b"not yours");
    let got: Vec<String> = s
        .drain4(T, QUIET)
        .into_iter()
        .filter(|m| !m.topic.starts_with("outpost/"))
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, vec!["a/1"], "the `#` subscriber read topics outside its ACL");
}

fn expiry(secs: u32) -> m5::ConnectProperties {
    let mut p = m5::ConnectProperties::new();
    p.session_expiry_interval = Some(secs);
    p
}

fn subscribe5(c: &mut Raw, filter: &str, q: Q5) {
    c.send5(P5::Subscribe(m5::Subscribe::new(m5::Filter::new(filter, q), None)));
    match c.recv5(T) {
        Some(P5::SubAck(a)) => assert_eq!(a.return_codes, vec![m5::SubscribeReasonCode::Success(q)]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn disconnect5(mut c: Raw) {
    c.send5(P5::Disconnect(m5::Disconnect::new(
        m5::DisconnectReasonCode::NormalDisconnection,
    )));
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    closes_within(&mut c.s, T);
}

#[test]
fn mqtt5_session_expiry_zero_ends_the_session_at_disconnect() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut c, ack) = Raw::v5(port, "exp0", false, expiry(0));
    assert!(!ack.session_present);
    subscribe5(&mut c, "exp0/#", q5(1));
    disconnect5(c);
    let (mut p, _) = Raw::v4(port, "exp0-pub", true);
    p.publish4_acked("exp0/x", qos(1), false, 1, b"nobody home");
    // Clean Start 0, but the session ended with the last connection (5.0 3.1.2.11.2).
    let (mut c, ack) = Raw::v5(port, "exp0", false, expiry(0));
    assert!(!ack.session_present, "session expiry 0: the session came back");
    let got = std::iter::from_fn(|| c.recv5(QUIET))
        .filter(|p| matches!(p, P5::Publish(_)))
        .count();
    assert_eq!(got, 0, "a message queued for an ended session was delivered");
    // The same holds when the connection breaks instead of disconnecting.
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let (_c, ack) = Raw::v5(port, "exp0", false, expiry(0));
    assert!(!ack.session_present);
}

#[test]
fn mqtt5_clean_start_0_without_a_session_expiry_keeps_no_session() {
    // 5.0 3.1.2.11.2: "If the Session Expiry Interval is absent the value 0 is used."
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut c, _) = Raw::v5(port, "noexp", false, m5::ConnectProperties::new());
    subscribe5(&mut c, "noexp/#", q5(1));
    disconnect5(c);
    let (mut p, _) = Raw::v4(port, "noexp-pub", true);
    p.publish4_acked("noexp/x", qos(1), false, 1, b"nobody home");
    let (mut c, ack) = Raw::v5(port, "noexp", false, m5::ConnectProperties::new());
    assert!(
        !ack.session_present,
        "an MQTT 5 session without Session Expiry Interval outlived its connection"
    );
    let got = std::iter::from_fn(|| c.recv5(QUIET))
        .filter(|p| matches!(p, P5::Publish(_)))
        .count();
    assert_eq!(got, 0, "a message queued for an ended session was delivered");
}

#[test]
fn mqtt5_short_session_expiry_keeps_the_session_within_and_not_after() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut c, _) = Raw::v5(port, "exp2", true, expiry(2));
    subscribe5(&mut c, "exp2/#", q5(1));
    disconnect5(c);
    let (mut p, _) = Raw::v4(port, "exp2-pub", true);
    p.publish4_acked("exp2/x", qos(1), false, 1, b"within");
    let (mut c, ack) = Raw::v5(port, "exp2", false, expiry(2));
    assert!(ack.session_present, "the session was gone within its 2 s expiry");
    match c.recv5(T) {
        Some(P5::Publish(m)) => {
            assert_eq!(&m.payload[..], b"within");
            c.send5(P5::PubAck(m5::PubAck::new(m.pkid, None)));
        }
        other => panic!("queued message not delivered: {other:?}"),
    }
    disconnect5(c);
    std::thread::sleep(Duration::from_millis(3000));
    p.publish4_acked("exp2/x", qos(1), false, 2, b"after");
    let (mut c, ack) = Raw::v5(port, "exp2", false, expiry(2));
    assert!(!ack.session_present, "the session outlived its 2 s expiry");
    assert!(
        !std::iter::from_fn(|| c.recv5(QUIET)).any(|p| matches!(p, P5::Publish(_))),
        "an expired session's subscription still delivered"
    );
}

#[test]
fn v311_persistent_session_keeps_subscriptions_and_queued_messages_across_reconnects() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut s, present) = Raw::v4(port, "keeper", false);
    assert!(!present);
    s.subscribe4(&[("keep/1", qos(1)), ("keep/2", qos(2))]);
    let (mut p, _) = Raw::v4(port, "keep-pub", true);
    // One message delivered but never acked before the connection breaks.
    p.publish4_acked("keep/1", qos(1), false, 1, b"m0");
    let unacked = s.expect4("m0", |x| match x {
        P4::Publish(m) => Some(m.clone()),
        _ => None,
    });
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    for (i, t) in ["keep/1", "keep/2", "keep/1", "keep/2"].iter().enumerate() {
        let q = if t.ends_with('1') { qos(1) } else { qos(2) };
        p.publish4_acked(t, q, false, 10 + i as u16, format!("m{}", i + 1).as_bytes());
    }
    let (mut s, present) = Raw::v4(port, "keeper", false);
    assert!(present);
    let got = s.drain4(T, QUIET);
    let first = got.first().expect("nothing delivered after reconnect");
    assert_eq!(
        (first.pkid, first.dup, &first.payload[..]),
        (unacked.pkid, true, &b"m0"[..]),
        "the unacknowledged message is resent first, with DUP and its packet id"
    );
    assert_eq!(payloads(&got), vec!["m0", "m1", "m2", "m3", "m4"]);
    // The subscriptions are still there.
    p.publish4_acked("keep/2", qos(2), false, 20, b"live");
    assert_eq!(payloads(&s.collect4(1, T)), vec!["live"]);
}

fn queue_then_kill9(v5: bool) {
    queue_then_stop(v5, true)
}

fn queue_then_stop(v5: bool, kill: bool) {
    let port = free_port();
    let mut gw = Gateway::start(&open_broker(port));
    let id = if v5 { "durable5" } else { "durable4" };
    let connect = |present_wanted: Option<bool>| {
        let (c, present) = if v5 {
            let (c, a) = Raw::v5(port, id, false, expiry(3600));
            (c, a.session_present)
        } else {
            Raw::v4(port, id, false)
        };
        if let Some(w) = present_wanted {
            assert_eq!(present, w, "session present after outpost stopped");
        }
        c
    };
    let mut c = connect(Some(false));
    if v5 {
        subscribe5(&mut c, "durable/#", q5(1));
        disconnect5(c);
    } else {
        c.subscribe4(&[("durable/#", qos(1))]);
        c.disconnect4();
    }
    let (mut p, _) = Raw::v4(port, "durable-pub", true);
    for i in 1..=50u16 {
        p.publish4_acked("durable/x", qos(1), false, i, i.to_string().as_bytes());
    }
    drop(p);
    if kill {
        gw.kill9();
        gw.start_again();
    } else {
        gw.restart();
    }

    let mut c = connect(Some(true));
    let mut got = vec![];
    let end = Instant::now() + T;
    while got.len() < 50 {
        if v5 {
            match c.recv5(end.saturating_duration_since(Instant::now())) {
                None => break,
                Some(P5::Publish(m)) => {
                    c.send5(P5::PubAck(m5::PubAck::new(m.pkid, None)));
                    got.push(String::from_utf8_lossy(&m.payload).to_string());
                }
                Some(_) => {}
            }
        } else {
            let m = c.collect4(50 - got.len(), end.saturating_duration_since(Instant::now()));
            if m.is_empty() {
                break;
            }
            got.extend(payloads(&m));
        }
    }
    let want: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    let restored: Vec<String> = gw
        .log()
        .lines()
        .filter(|l| l.contains("restored"))
        .map(String::from)
        .collect();
    assert_eq!(
        got, want,
        "QoS 1 messages queued (and PUBACKed) before outpost stopped; outpost said: {restored:?}"
    );
    // The subscription itself survived too.
    let (mut p, _) = Raw::v4(port, "durable-pub", true);
    p.publish4_acked("durable/x", qos(1), false, 99, b"after");
    let live = if v5 {
        match c.recv5(T) {
            Some(P5::Publish(m)) => String::from_utf8_lossy(&m.payload).to_string(),
            other => panic!("no live message: {other:?}"),
        }
    } else {
        payloads(&c.collect4(1, T)).join(",")
    };
    assert_eq!(live, "after");
}

#[test]
fn persistent_session_survives_kill_9_v311() {
    queue_then_kill9(false);
}

#[test]
fn persistent_session_survives_kill_9_v5() {
    queue_then_kill9(true);
}

#[test]
fn persistent_session_survives_a_clean_restart_v311() {
    queue_then_stop(false, false);
}

#[test]
fn receive_maximum_bounds_what_the_broker_has_in_flight_toward_a_client() {
    // 5.0 3.3.4: the Server MUST NOT send more unacknowledged QoS 1/2 PUBLISHes than the
    // client's Receive Maximum.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let mut props = m5::ConnectProperties::new();
    props.receive_maximum = Some(2);
    let (mut c, _) = Raw::v5(port, "rm2", true, props);
    subscribe5(&mut c, "rm/#", q5(1));
    let (mut p, _) = Raw::v4(port, "rm-pub", true);
    p.publish4_many(10, false, |i| ("rm/x".into(), i.to_string().into_bytes()));
    let mut held = vec![];
    while let Some(x) = c.recv5(QUIET) {
        if let P5::Publish(m) = x {
            held.push(m.pkid);
        }
    }
    assert_eq!(
        held.len(),
        2,
        "unacknowledged deliveries toward a client with Receive Maximum 2"
    );
    c.send5(P5::PubAck(m5::PubAck::new(held[0], None)));
    let mut more = 0;
    while let Some(x) = c.recv5(QUIET) {
        if let P5::Publish(_) = x {
            more += 1;
        }
    }
    assert_eq!(more, 1, "one ack frees exactly one slot");
}

#[test]
fn mqtt5_session_expiry_set_to_0_at_disconnect_ends_the_session() {
    // 5.0 3.14.2.2.2: the DISCONNECT's Session Expiry Interval replaces the CONNECT's.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut c, _) = Raw::v5(port, "exp-d", true, expiry(600));
    subscribe5(&mut c, "expd/#", q5(1));
    let mut d = m5::Disconnect::new(m5::DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(m5::DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: None,
        user_properties: vec![],
        server_reference: None,
    });
    c.send5(P5::Disconnect(d));
    closes_within(&mut c.s, T);
    let (_c, ack) = Raw::v5(port, "exp-d", false, expiry(600));
    assert!(
        !ack.session_present,
        "the session outlived a DISCONNECT with session expiry 0"
    );
}

#[test]
fn mosquitto_clients_get_min_qos_and_retained_through_the_router() {
    // mosquitto_sub asks QoS 2 and prints the QoS it got (-F %q); mosquitto_pub sends QoS 0.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "mq/#",
            "-q",
            "2",
            "-F",
            "%t %q %p",
            "-C",
            "2",
            "-W",
            "10",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(500));
    for (q, t) in [("0", "mq/zero"), ("1", "mq/one")] {
        let st = std::process::Command::new("mosquitto_pub")
            .args(["-p", &port.to_string(), "-t", t, "-m", "x", "-q", q])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mq/zero 0 x\nmq/one 1 x\n");
}

#[test]
fn every_retained_message_reaches_a_new_subscriber_even_past_the_queue_bound() {
    // The queue bound drops live messages for a slow session; the retained messages a new
    // subscription is owed are not live traffic (issue: "every matching retained message,
    // however many").
    let port = free_port();
    let _gw = Gateway::start(&broker_with(port, "  sessions: { max_queued_messages: 100 }\n"));
    let (mut p, _) = Raw::v4(port, "ret-pub", true);
    p.publish4_many(1000, true, |i| (format!("many/{i}"), b"r".to_vec()));
    let (mut s, _) = Raw::v4(port, "ret-sub", true);
    s.subscribe4(&[("many/#", qos(1))]);
    let got: BTreeSet<String> = s
        .drain4(Duration::from_secs(10), Duration::from_millis(1500))
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(
        got.len(),
        1000,
        "retained messages delivered with max_queued_messages 100"
    );
}

#[test]
fn retained_messages_are_delivered_at_the_lower_of_their_qos_and_the_granted_one() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut p, _) = Raw::v4(port, "rq-pub", true);
    for q in 0..3u8 {
        p.publish4_acked(&format!("rq/{q}"), qos(q), true, 1 + q as u16, b"r");
    }
    for granted in 0..3u8 {
        let (mut s, _) = Raw::v4(port, &format!("rq-sub{granted}"), true);
        s.subscribe4(&[("rq/#", qos(granted))]);
        let mut got: Vec<(String, u8, bool)> = s
            .drain4(T, QUIET)
            .into_iter()
            .map(|m| (m.topic, m.qos as u8, m.retain))
            .collect();
        got.sort();
        let want: Vec<(String, u8, bool)> = (0..3u8).map(|q| (format!("rq/{q}"), q.min(granted), true)).collect();
        assert_eq!(
            got, want,
            "retained deliveries for a subscription granted QoS {granted}"
        );
    }
}

#[test]
fn memory_for_filters_is_freed_when_nothing_uses_them() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    let base = wait_status(&gw, T, |st| st["router"]["index_nodes"].is_u64());
    let nodes0 = base["router"]["index_nodes"].as_u64().unwrap();
    let subs0 = base["router"]["subscriptions"].as_u64().unwrap();
    let (mut c, _) = Raw::v4(port, "many-filters", true);
    for chunk in 0..30 {
        let fs: Vec<String> = (0..100).map(|i| format!("user/{chunk}/{i}/+/state")).collect();
        let fs: Vec<(&str, QoS)> = fs.iter().map(|f| (f.as_str(), qos(1))).collect();
        c.subscribe4(&fs);
    }
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["subscriptions"].as_u64() == Some(subs0 + 3000)
    });
    assert_eq!(
        st["router"]["subscriptions"].as_u64(),
        Some(subs0 + 3000),
        "{}",
        st["router"]
    );
    // Unsubscribe half, and let the clean session end for the rest.
    let mut u = v4::Unsubscribe::new("user/0/0/+/state");
    u.topics = (0..1500)
        .map(|i| format!("user/{}/{}/+/state", i / 100, i % 100))
        .collect();
    u.pkid = 77;
    c.send4(P4::Unsubscribe(u));
    c.expect4("UNSUBACK", |x| {
        matches!(x, P4::UnsubAck(a) if a.pkid == 77).then_some(())
    });
    c.disconnect4();
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["subscriptions"].as_u64() == Some(subs0) && st["router"]["index_nodes"].as_u64() == Some(nodes0)
    });
    assert_eq!(
        (
            st["router"]["subscriptions"].as_u64(),
            st["router"]["index_nodes"].as_u64()
        ),
        (Some(subs0), Some(nodes0)),
        "the subscription index did not shrink back: {}",
        st["router"]
    );
}

#[test]
fn a_newer_connection_takes_the_session_and_the_older_one_is_told() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (mut old, _) = Raw::v5(port, "twin", true, expiry(60));
    subscribe5(&mut old, "twin/#", q5(1));
    let (mut new, ack) = Raw::v5(port, "twin", false, expiry(60));
    assert!(ack.session_present, "the newer connection did not get the session");
    // 5.0 3.1.4-3: the old connection is closed, with DISCONNECT 0x8E (Session taken over).
    let mut bytes = old.buf.to_vec();
    old.s.set_read_timeout(Some(T)).unwrap();
    let mut tmp = [0u8; 256];
    loop {
        match old.s.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&tmp[..n]),
        }
    }
    assert!(
        bytes.len() >= 3 && bytes[0] == 0xe0 && bytes[2] == 0x8e,
        "the older connection was closed with {bytes:02x?}, not DISCONNECT 0x8E (Session taken over)"
    );
    let (mut p, _) = Raw::v4(port, "twin-pub", true);
    p.publish4_acked("twin/x", qos(1), false, 1, b"to the new one");
    match new.recv5(T) {
        Some(P5::Publish(m)) => assert_eq!(&m.payload[..], b"to the new one"),
        other => panic!("the subscription did not move with the session: {other:?}"),
    }
}

#[test]
fn a_message_too_big_for_a_client_is_dropped_for_it_and_counted() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    let mut props = m5::ConnectProperties::new();
    props.max_packet_size = Some(128);
    let (mut c, _) = Raw::v5(port, "tiny", true, props);
    subscribe5(&mut c, "big/#", q5(1));
    let (mut p, _) = Raw::v4(port, "big-pub", true);
    p.publish4_acked("big/x", qos(1), false, 1, &[b'x'; 1000]);
    p.publish4_acked("big/y", qos(1), false, 2, b"small");
    match c.recv5(T) {
        Some(P5::Publish(m)) => assert_eq!(&m.payload[..], b"small"),
        other => panic!("expected only the small message, got {other:?}"),
    }
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["dropped"]["too_large"].as_u64() == Some(1)
    });
    assert_eq!(
        st["router"]["dropped"]["too_large"].as_u64(),
        Some(1),
        "{}",
        st["router"]
    );
}

#[test]
fn clients_that_never_return_do_not_pause_the_live_ones() {
    // Four persistent sessions on `away/#` whose clients are gone, a live subscriber, and more
    // traffic than the whole memory budget: the away sessions keep their half of the budget
    // and drop (counted) past it; the publisher and the live subscriber never stop.
    let port = free_port();
    let gw = Gateway::start(&broker_with(
        port,
        // All these clients are anonymous (one user): the user share is lifted to test the
        // away share alone.
        "  sessions: { max_queued_bytes: 1MiB, memory_budget: 1MiB, max_user_bytes: 1MiB }\n",
    ));
    for i in 0..4 {
        let (mut s, _) = Raw::v4(port, &format!("gone-{i}"), false);
        s.subscribe4(&[("away/#", qos(1))]);
        s.disconnect4();
    }
    let (mut live, _) = Raw::v4(port, "live", true);
    live.subscribe4(&[("away/#", qos(1))]);
    const N: usize = 2000;
    let reader = std::thread::spawn(move || live.collect4(N, Duration::from_secs(60)).len());
    let (mut p, _) = Raw::v4(port, "away-pub", true);
    let body = vec![b'x'; 1024];
    p.publish4_many(N, false, |i| (format!("away/{}", i % 10), body.clone()));
    assert_eq!(reader.join().unwrap(), N, "the live subscriber lost messages");
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["dropped"]["away_budget"].as_u64().unwrap_or(0) > 0
    });
    let r = &st["router"];
    assert!(r["dropped"]["away_budget"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(
        r["away_bytes"].as_u64().unwrap() <= r["away_budget"].as_u64().unwrap(),
        "away queues past their share: {r}"
    );
    // A returning client gets what its share held, and the counted drops are named.
    let (mut back, present) = Raw::v4(port, "gone-0", false);
    assert!(present);
    assert!(!back.drain4(T, QUIET).is_empty(), "a returning client got nothing");
}

#[test]
fn a_v5_client_closed_for_a_fault_is_told_the_reason() {
    let port = free_port();
    let _gw = Gateway::start(&broker_with(port, "  limits: { max_packet_size: 1KiB }\n"));
    let reason = |p: P5| {
        let (mut c, _) = Raw::v5(port, "faulty", true, m5::ConnectProperties::new());
        c.send5(p);
        let end = Instant::now() + T;
        while Instant::now() < end {
            match c.recv5(T) {
                Some(P5::Disconnect(d)) => return d.reason_code,
                Some(_) => continue,
                None => break,
            }
        }
        panic!("no DISCONNECT before the close");
    };
    let big = m5::Publish::new("t", q5(0), vec![0u8; 4096], None);
    assert_eq!(reason(P5::Publish(big)), m5::DisconnectReasonCode::PacketTooLarge);
    let props = m5::PublishProperties {
        topic_alias: Some(1000),
        ..Default::default()
    };
    let aliased = m5::Publish::new("t", q5(0), &b"x"[..], Some(props));
    assert_eq!(
        reason(P5::Publish(aliased)),
        m5::DisconnectReasonCode::TopicAliasInvalid
    );
}

#[test]
fn a_disconnect_with_an_error_reason_publishes_the_will() {
    // MQTT 5 3.1.2.5: only a DISCONNECT with reason 0x00 discards the will.
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    let (mut watch, _) = Raw::v4(port, "will-watch", true);
    watch.subscribe4(&[("wills/#", qos(1))]);
    for (id, code, fires) in [
        ("err", m5::DisconnectReasonCode::UnspecifiedError, true),
        ("normal", m5::DisconnectReasonCode::NormalDisconnection, false),
    ] {
        let c = m5::Connect {
            keep_alive: 60,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        let will = m5::LastWill::new(format!("wills/{id}"), "gone", q5(1), false, None);
        let mut r = Raw::open(port);
        r.send5(P5::Connect(c, Some(will), None));
        assert!(matches!(r.recv5(T), Some(P5::ConnAck(_))));
        r.send5(P5::Disconnect(m5::Disconnect::new(code)));
        let _ = r.s.shutdown(std::net::Shutdown::Write);
        closes_within(&mut r.s, T);
        let got: Vec<String> = watch.drain4(T, QUIET).into_iter().map(|p| p.topic).collect();
        assert_eq!(
            got.contains(&format!("wills/{id}")),
            fires,
            "will after DISCONNECT {code:?}: {got:?}"
        );
    }
    // Both DISCONNECTs (a reason code alone is a whole one) were read, not refused as malformed.
    let st = wait_status(&gw, Duration::from_secs(3), |_| false);
    assert_eq!(st["broker"]["malformed_packets"].as_u64(), Some(0), "{}", st["broker"]);
}

#[test]
fn a_message_queued_before_an_acl_change_is_not_delivered_after_it() {
    let port = free_port();
    let open = "  acl:\n    - { who: \"*\", allow: { publish: [\"#\"], subscribe: [\"#\"] } }\n";
    let gw = Gateway::start(&broker_with(port, open));
    let (mut s, _) = Raw::v4(port, "queued-reader", false);
    s.subscribe4(&[("acl/#", qos(1))]);
    s.disconnect4();
    let (mut w, _) = Raw::v4(port, "writer", true);
    w.publish4_acked("acl/b/1", qos(1), false, 1, b"not yours any more");
    w.publish4_acked("acl/a/1", qos(1), false, 2, b"yours");
    reload_narrowed_acl(&gw, port, "queued-reader", "acl/a/#");
    let (mut s, present) = Raw::v4(port, "queued-reader", false);
    assert!(present);
    let got: Vec<String> = s.drain4(T, QUIET).into_iter().map(|m| m.topic).collect();
    assert_eq!(
        got,
        vec!["acl/a/1"],
        "a queued message outlived the reader's right to it"
    );
    let st = wait_status(&gw, Duration::from_secs(6), |st| {
        st["router"]["dropped"]["denied"].as_u64() == Some(1)
    });
    assert_eq!(st["router"]["dropped"]["denied"].as_u64(), Some(1), "{}", st["router"]);
}

#[test]
fn a_resumed_session_resends_no_more_than_the_new_receive_maximum() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let mut props = expiry(600);
    props.receive_maximum = Some(10);
    let (mut c, _) = Raw::v5(port, "rm-resume", true, props);
    subscribe5(&mut c, "rmr/#", q5(1));
    let (mut p, _) = Raw::v4(port, "rmr-pub", true);
    p.publish4_many(10, false, |i| ("rmr/x".into(), i.to_string().into_bytes()));
    let mut first = BTreeSet::new();
    while let Some(x) = c.recv5(QUIET) {
        if let P5::Publish(m) = x {
            first.insert(m.pkid);
        }
    }
    assert_eq!(first.len(), 10);
    // Gone without acking any; back with room for 3.
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let mut props = expiry(600);
    props.receive_maximum = Some(3);
    let (mut c, ack) = Raw::v5(port, "rm-resume", false, props);
    assert!(ack.session_present);
    let mut got = vec![];
    while let Some(x) = c.recv5(QUIET) {
        if let P5::Publish(m) = x {
            got.push(m);
        }
    }
    assert_eq!(got.len(), 3, "deliveries in flight past the client's Receive Maximum");
    // Each ack lets one more out, until all 10 came again: each under the packet id it first
    // had, marked DUP (MQTT-4.4.0-1), so the client can tell them from new messages.
    let mut again = BTreeSet::new();
    let mut all = got.len();
    while let Some(m) = got.pop() {
        assert!(m.dup, "a resent delivery without DUP");
        again.insert(m.pkid);
        c.send5(P5::PubAck(m5::PubAck::new(m.pkid, None)));
        while let Some(x) = c.recv5(QUIET) {
            if let P5::Publish(m) = x {
                got.push(m);
                all += 1;
            }
        }
        assert!(got.len() <= 3, "more than 3 unacked");
    }
    assert_eq!(all, 10, "every message arrived in the end");
    assert_eq!(again, first, "resent under other packet ids");
}

#[test]
fn a_retained_message_keeps_its_properties_and_expiry_across_a_restart() {
    let port = free_port();
    let mut gw = Gateway::start(&open_broker(port));
    let (mut p, _) = Raw::v5(port, "ret-props-pub", true, m5::ConnectProperties::new());
    let props = m5::PublishProperties {
        message_expiry_interval: Some(600),
        content_type: Some("text/plain".into()),
        user_properties: vec![("site".into(), "north".into())],
        ..Default::default()
    };
    let mut m = m5::Publish::new("retprops/a", q5(1), &b"21.5"[..], Some(props));
    m.retain = true;
    m.pkid = 1;
    p.send5(P5::Publish(m));
    assert!(matches!(p.recv5(T), Some(P5::PubAck(_))));
    let mut short = m5::Publish::new(
        "retprops/short",
        q5(1),
        &b"soon gone"[..],
        Some(m5::PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        }),
    );
    short.retain = true;
    short.pkid = 2;
    p.send5(P5::Publish(short));
    assert!(matches!(p.recv5(T), Some(P5::PubAck(_))));
    drop(p);
    gw.restart();
    std::thread::sleep(Duration::from_millis(1200));
    let (mut s, _) = Raw::v5(port, "ret-props-sub", true, m5::ConnectProperties::new());
    s.send5(P5::Subscribe(m5::Subscribe::new(
        m5::Filter::new("retprops/#", q5(1)),
        None,
    )));
    let mut got = vec![];
    while let Some(x) = s.recv5(QUIET) {
        if let P5::Publish(m) = x {
            got.push(m);
        }
    }
    assert_eq!(got.len(), 1, "the expired retained message came back: {got:?}");
    let props = got[0].properties.clone().expect("properties after the restart");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("site".to_string(), "north".to_string())]);
    let left = props.message_expiry_interval.expect("the expiry after the restart");
    assert!((590..=600).contains(&left), "expiry left {left}");
}
