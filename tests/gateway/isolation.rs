//! No client can hurt another (issue 29): what one user's clients send, hold or fail to read
//! costs only that user. Each attack runs beside a bystander of another user whose QoS 1 round
//! trip is measured quiet and under attack.

use crate::common::*;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Users alice (the bystander) and mallory, each allowed `devices/<name>/#` only.
fn two_users(port: u16, sessions: &str) -> String {
    let (alice, mallory) = (passwd("alice-pw"), passwd("mallory-pw"));
    format!(
        r##"broker:
  listeners:
    - {{ bind: "127.0.0.1:{port}", protocol: mqtt, anonymous: false }}
  users:
    - {{ name: alice, password_hash: "{alice}" }}
    - {{ name: mallory, password_hash: "{mallory}" }}
  acl:
    - {{ who: "user:*", allow: {{ publish: ["devices/{{username}}/#"], subscribe: ["devices/{{username}}/#"] }} }}
  sessions: {sessions}
"##
    )
}

async fn alice(port: u16) -> Bystander {
    let mut o = opts(port, "alice-1");
    o.set_credentials("alice", "alice-pw");
    Bystander::connect_with(o, "devices/alice/echo").await
}

/// A raw socket logged in as mallory with MQTT 5 and the given Receive Maximum; reads its
/// CONNACK and nothing after unless the test does.
fn mallory5(port: u16, id: &str, receive_max: u16) -> TcpStream {
    let mut props = v5::ConnectProperties::new();
    props.receive_maximum = Some(receive_max);
    let c = v5::Connect {
        keep_alive: 60,
        client_id: id.into(),
        clean_start: true,
        properties: Some(props),
    };
    let mut b = BytesMut::new();
    c.write(&None, &Some(v5::Login::new("mallory", "mallory-pw")), &mut b)
        .unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!((head[0], head[3]), (0x20, 0), "mallory's CONNACK");
    let mut rest = vec![0u8; head[1] as usize - 2];
    s.read_exact(&mut rest).unwrap();
    s
}

fn mallory4(port: u16, id: &str) -> TcpStream {
    let mut c = v4::Connect::new(id);
    c.set_login("mallory", "mallory-pw");
    let mut b = BytesMut::new();
    v4::Packet::Connect(c).write(&mut b, 1 << 20).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "mallory's CONNACK");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_and_again_to_a_big_retained_message_pauses_nobody() {
    // Issue 29, point 2, scaled: a 16 MiB budget, 300 SUBSCRIBEs of a 200 KiB retained message
    // (60 MB of copies before the fix).
    let port = free_port();
    let gw = Gateway::start(&two_users(port, "{ memory_budget: 16MiB }"));
    let mut by = alice(port).await;
    let quiet = by
        .median(20, Duration::from_millis(10))
        .await
        .expect("quiet round trips");

    let mut m = mallory5(port, "mallory-rm1", 1);
    let mut b = BytesMut::new();
    let mut p = v5::Publish::new("devices/mallory/blob", Q5::AtLeastOnce, vec![7u8; 200 * 1024], None);
    p.retain = true;
    p.pkid = 1;
    p.write(&mut b).unwrap();
    m.write_all(&b).unwrap();
    b.clear();
    for pkid in 2..302u16 {
        let mut s = v5::Subscribe::new(v5::Filter::new("devices/mallory/blob", Q5::AtLeastOnce), None);
        s.pkid = pkid;
        s.write(&mut b).unwrap();
    }
    // All 300 at once, and never an ack or a read after.
    m.write_all(&b).unwrap();
    let under = by.median(40, Duration::from_millis(25)).await;
    assert_unhurt(quiet, under, "300 SUBSCRIBEs of a 200 KiB retained message");
    let st = gw.status();
    let queued = st["router"]["queued_bytes"].as_u64().unwrap();
    assert!(
        queued <= 3 * 205 * 1024,
        "copies of one retained message queued: {queued} bytes"
    );
    assert_eq!(st["router"]["publisher_pauses"].as_u64(), Some(0), "{}", st["router"]);
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_subscribers_that_never_read_cost_only_that_user() {
    // Issue 29, point 2: sessions of one user that never read (nor acknowledge) fill only that
    // user's share (1 MiB of a 4 MiB budget), never the budget; its own publisher goes on.
    let port = free_port();
    let gw = Gateway::start(&two_users(port, "{ memory_budget: 4MiB }"));
    let mut by = alice(port).await;
    let quiet = by
        .median(20, Duration::from_millis(10))
        .await
        .expect("quiet round trips");

    let mut stalled = vec![];
    for i in 0..8 {
        let mut s = mallory4(port, &format!("mallory-sub-{i}"));
        let mut b = BytesMut::new();
        v4::Subscribe::new("devices/mallory/#", rumqttc::QoS::AtLeastOnce)
            .write(&mut b)
            .unwrap();
        s.write_all(&b).unwrap();
        let mut suback = [0u8; 5];
        s.read_exact(&mut suback).unwrap();
        stalled.push(s);
    }
    let mut o = opts(port, "mallory-pub");
    o.set_credentials("mallory", "mallory-pw");
    let (publisher, pev) = connect(o).await.unwrap();
    let _drive = drive(pev);
    let flood = tokio::spawn(async move {
        for i in 0..4000u32 {
            let mut body = i.to_be_bytes().to_vec();
            body.resize(1024, b'm');
            publisher
                .publish("devices/mallory/x", rumqttc::QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }
    });
    let under = by.median(40, Duration::from_millis(25)).await;
    assert_unhurt(quiet, under, "8 stalled subscribers of one user");
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("mallory's own publisher was paused")
        .unwrap();
    let st = gw.status();
    let r = &st["router"];
    assert_eq!(r["publisher_pauses"].as_u64(), Some(0), "{r}");
    assert!(
        r["dropped"]["user_share"].as_u64().unwrap_or(0) > 0,
        "drops are counted: {r}"
    );
    assert!(
        r["queued_bytes"].as_u64().unwrap() <= r["user_budget"].as_u64().unwrap() + 64 * 1024,
        "one user's queues past its share: {r}"
    );
    drop(stalled);
}
