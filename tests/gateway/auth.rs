//! Users, passwords, client ids, ACLs and their reload, as a device owner would check them.

use crate::common::*;
use rumqttc::v5::{
    self,
    mqttbytes::v5::{ConnectReturnCode as C5, Packet as P5, PubAckReason, SubscribeReasonCode as R5},
};
use rumqttc::{ConnectReturnCode, ConnectionError, Packet, QoS, SubscribeReasonCode as R4};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn secured(port: u16, extra_acl: &str) -> String {
    let alice = passwd("alice-pw");
    let admin = passwd("admin-pw");
    format!(
        r##"broker:
  listeners:
    - {{ bind: "127.0.0.1:{port}", protocol: mqtt, anonymous: false }}
  users:
    - {{ name: alice, password_hash: "{alice}", client_ids: ["{{username}}-*"] }}
    - {{ name: admin, password_hash: "{admin}" }}
  acl:
    - {{ who: "user:admin", allow: {{ publish: ["#"], subscribe: ["#"] }} }}
    - {{ who: "user:*", allow: {{ publish: ["devices/{{username}}/#"], subscribe: ["devices/{{username}}/cmd/#"] }} }}
{extra_acl}"##
    )
}

fn user(port: u16, id: &str, name: &str, pw: &str) -> rumqttc::MqttOptions {
    let mut o = opts(port, id);
    o.set_credentials(name, pw);
    o
}

#[tokio::test]
async fn wrong_password_unknown_user_and_anonymous_get_refusal_codes() {
    let port = free_port();
    let _gw = Gateway::start(&secured(port, ""));
    let refused = |r: Result<_, ConnectionError>| match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got connected"),
    };
    assert_eq!(
        refused(connect(user(port, "alice-1", "alice", "wrong")).await),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        refused(connect(user(port, "alice-1", "mallory", "x")).await),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        refused(connect(opts(port, "anon")).await),
        ConnectReturnCode::NotAuthorized
    );
    // Client id outside the user's pattern.
    assert_eq!(
        refused(connect(user(port, "bob-1", "alice", "alice-pw")).await),
        ConnectReturnCode::BadClientId
    );
    assert!(connect(user(port, "alice-1", "alice", "alice-pw")).await.is_ok());

    // MQTT 5 clients get v5 reason codes.
    let mut o = v5::MqttOptions::new("alice-5", "127.0.0.1", port);
    o.set_credentials("alice", "nope");
    let (_c, mut ev) = v5::AsyncClient::new(o, 10);
    match tokio::time::timeout(T, ev.poll()).await.unwrap() {
        Err(v5::ConnectionError::ConnectionRefused(code)) => assert_eq!(code, C5::BadUserNamePassword),
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn acl_denies_subscribe_in_suback_and_drops_denied_publishes() {
    let port = free_port();
    let _gw = Gateway::start(&secured(port, ""));
    let (admin, mut aev) = connect(user(port, "admin-1", "admin", "admin-pw")).await.unwrap();
    subscribe(&admin, &mut aev, "devices/#", QoS::AtLeastOnce).await;

    let (alice, mut ev) = connect(user(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    // One SUBSCRIBE with an allowed, a denied and an invalid filter: codes in order.
    alice
        .subscribe_many(vec![
            rumqttc::SubscribeFilter::new("devices/alice/cmd/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/bob/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("$SYS/#".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = wait_for(&mut ev, T, |p| match p {
        Packet::SubAck(a) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(codes, vec![R4::Success(QoS::AtLeastOnce), R4::Failure, R4::Failure]);

    // A denied QoS 1 publish is acknowledged but never delivered; an allowed one is.
    alice
        .publish("devices/bob/temp", QoS::AtLeastOnce, false, "spoof")
        .await
        .unwrap();
    alice
        .publish("devices/alice/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let acks = {
        let mut n = 0;
        while n < 2 {
            if let rumqttc::Event::Incoming(Packet::PubAck(_)) =
                tokio::time::timeout(T, ev.poll()).await.expect("PUBACKs").unwrap()
            {
                n += 1;
            }
        }
        n
    };
    assert_eq!(acks, 2);
    assert_eq!(
        next_publish(&mut aev, T).await,
        Some(("devices/alice/temp".into(), b"21.5".to_vec(), false))
    );
    assert_eq!(next_publish(&mut aev, Duration::from_millis(500)).await, None);

    // Commands for alice reach her subscription.
    admin
        .publish("devices/alice/cmd/led", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let _d = drive(aev);
    assert_eq!(
        next_publish(&mut ev, T).await,
        Some(("devices/alice/cmd/led".into(), b"on".to_vec(), false))
    );
}

#[tokio::test]
async fn mqtt5_denials_carry_reason_codes() {
    let port = free_port();
    let _gw = Gateway::start(&secured(port, ""));
    let mut o = v5::MqttOptions::new("alice-v5", "127.0.0.1", port);
    o.set_credentials("alice", "alice-pw");
    let (c, mut ev) = v5::AsyncClient::new(o, 10);
    c.subscribe("devices/bob/#", v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    c.publish("devices/bob/x", v5::mqttbytes::QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    let (mut suback, mut puback) = (None, None);
    while suback.is_none() || puback.is_none() {
        match tokio::time::timeout(T, ev.poll()).await.expect("acks").unwrap() {
            v5::Event::Incoming(P5::SubAck(a)) => suback = Some(a.return_codes),
            v5::Event::Incoming(P5::PubAck(a)) => puback = Some(a.reason),
            _ => {}
        }
    }
    assert_eq!(suback.unwrap(), vec![R5::NotAuthorized]);
    assert_eq!(puback.unwrap(), PubAckReason::NotAuthorized);
}

#[tokio::test]
async fn sighup_reloads_acls_without_dropping_clients() {
    let port = free_port();
    let mut gw = Gateway::start(&secured(port, ""));
    let (alice, mut ev) = connect(user(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "public/#", QoS::AtMostOnce).await,
        vec![R4::Failure]
    );

    gw.write_config(&secured(
        port,
        "    - { who: \"user:alice\", allow: { subscribe: [\"public/#\"] } }\n",
    ));
    gw.signal("HUP");
    gw.wait_note("READY=1", T);
    // Same connection, now allowed.
    assert_eq!(
        subscribe(&alice, &mut ev, "public/#", QoS::AtMostOnce).await,
        vec![R4::Success(QoS::AtMostOnce)]
    );

    // A bad config on reload is refused and the running one stays.
    std::fs::write(&gw.config, "broker: { listeners: 5 }\n").unwrap();
    gw.signal("HUP");
    gw.wait_note("READY=1", T);
    assert!(gw.log().contains("reload refused"), "log:\n{}", gw.log());
    assert_eq!(
        subscribe(&alice, &mut ev, "public/x", QoS::AtMostOnce).await,
        vec![R4::Success(QoS::AtMostOnce)]
    );
}

#[test]
fn non_loopback_listener_without_users_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "gateway: {{ data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"0.0.0.0:{}\", protocol: mqtt }}\n",
            dir.path().display(),
            free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broker.listeners[0].bind") && err.contains("no users are configured"),
        "{err}"
    );
}

#[tokio::test]
async fn connection_limit_refuses_with_server_unavailable() {
    let port = free_port();
    let _gw = Gateway::start(&format!("{}  limits: {{ max_connections: 2 }}\n", open_broker(port)));
    let (_a, ae) = connect(opts(port, "a")).await.unwrap();
    let (_b, be) = connect(opts(port, "b")).await.unwrap();
    let (_da, _db) = (drive(ae), drive(be));
    match connect(opts(port, "c")).await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::ServiceUnavailable),
        Err(e) => panic!("expected CONNACK refusal, got {e}"),
        Ok(_) => panic!("third client got in over max_connections: 2"),
    }
}

#[tokio::test]
async fn the_same_client_id_under_another_user_gets_its_own_session() {
    let port = free_port();
    let _gw = Gateway::start(&secured(
        port,
        "    - { who: \"user:*\", allow: { publish: [\"shared/#\"], subscribe: [\"shared/#\"] } }\n",
    ));
    // alice keeps a persistent session as client "alice-box".
    let mut o = user(port, "alice-box", "alice", "alice-pw");
    o.set_clean_session(false);
    let (a, mut aev) = connect(o).await.unwrap();
    subscribe(&a, &mut aev, "shared/#", QoS::AtLeastOnce).await;
    a.disconnect().await.unwrap();
    let _ = tokio::time::timeout(T, async { while aev.poll().await.is_ok() {} }).await;

    // admin picks the same client id: a session of its own, nothing of alice's.
    let mut o = user(port, "alice-box", "admin", "admin-pw");
    o.set_clean_session(false);
    let (_b, mut bev) = rumqttc::AsyncClient::new(o, 10);
    let present = wait_for(&mut bev, T, |p| match p {
        Packet::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    assert_eq!(present, Some(false));
    let (p, pev) = connect(user(port, "admin-2", "admin", "admin-pw")).await.unwrap();
    let _d = drive(pev);
    p.publish("shared/x", QoS::AtLeastOnce, false, "for alice only")
        .await
        .unwrap();
    assert_eq!(next_publish(&mut bev, Duration::from_secs(1)).await, None);
}

#[tokio::test]
async fn clients_cannot_take_the_gateways_internal_client_ids() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (s, mut sev) = connect(opts(port, "ops")).await.unwrap();
    subscribe(&s, &mut sev, "outpost/test-gw/status", QoS::AtLeastOnce).await;
    assert_eq!(next_publish(&mut sev, T).await.map(|m| m.1), Some(b"online".to_vec()));
    for id in ["outpost-status-test-gw", "outpost-bus"] {
        let (c, ev) = connect(opts(port, id)).await.unwrap();
        let _d = drive(ev);
        drop(c);
    }
    // The status client was not kicked: no `offline` will.
    assert_eq!(next_publish(&mut sev, Duration::from_secs(2)).await, None);
}

#[tokio::test]
async fn mqtt5_unsubscribe_gets_one_unsuback_with_a_reason_per_filter() {
    use rumqttc::v5::mqttbytes::v5::UnsubAckReason as U;
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    // rumqttc's v5 client unsubscribes one filter per packet; write one with three by hand.
    let (tx, rx) = std::sync::mpsc::channel();
    let port2 = port;
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port2)).unwrap();
        let mut b = bytes::BytesMut::new();
        let p = P5::Connect(
            v5::mqttbytes::v5::Connect {
                keep_alive: 30,
                client_id: "raw5".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        );
        p.write(&mut b, None).unwrap();
        let mut sub = v5::mqttbytes::v5::Subscribe::new(
            v5::mqttbytes::v5::Filter::new("x/1", v5::mqttbytes::QoS::AtMostOnce),
            None,
        );
        sub.pkid = 1;
        sub.filters
            .push(v5::mqttbytes::v5::Filter::new("x/2", v5::mqttbytes::QoS::AtMostOnce));
        P5::Subscribe(sub).write(&mut b, None).unwrap();
        let un = v5::mqttbytes::v5::Unsubscribe {
            pkid: 2,
            filters: vec!["x/1".into(), "never".into(), "x/2".into()],
            properties: None,
        };
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&b).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut b = bytes::BytesMut::new();
        P5::Unsubscribe(un).write(&mut b, None).unwrap();
        s.write_all(&b).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = bytes::BytesMut::new();
        let mut tmp = [0u8; 4096];
        let mut unsubacks = vec![];
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < end {
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
            while let Ok(p) = P5::read(&mut buf, None) {
                if let P5::UnsubAck(a) = p {
                    unsubacks.push(a.reasons);
                }
            }
        }
        tx.send(unsubacks).unwrap();
    });
    let got = tokio::task::spawn_blocking(move || rx.recv().unwrap()).await.unwrap();
    assert_eq!(got, vec![vec![U::Success, U::NoSubscriptionExisted, U::Success]]);
}

#[tokio::test]
async fn failed_logins_do_not_keep_memory() {
    // Each password check takes ~19 MiB (argon2). Before the allocator was told to return large
    // blocks, 50 failed logins left the gateway at ~570 MiB.
    let port = free_port();
    let gw = Gateway::start(&secured(port, ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, _) = gw.rss_kib();
    for round in 0..5 {
        let tries: Vec<_> = (0..10)
            .map(|i| {
                tokio::spawn(connect(user(
                    port,
                    &format!("x{round}-{i}"),
                    &format!("ghost{i}"),
                    "nope",
                )))
            })
            .collect();
        for t in tries {
            assert!(t.await.unwrap().is_err(), "an unknown user got in");
        }
    }
    // Clients give up after 5 s while checks still queue (a debug build's argon2 is slow): wait
    // until the gateway has refused all 50 before reading its memory.
    let end = std::time::Instant::now() + Duration::from_secs(90);
    while gw.status()["broker"]["connects_refused"].as_u64().unwrap_or(0) < 50 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (after, peak) = gw.rss_kib();
    assert!(
        after < before + 30 * 1024,
        "RSS went from {before} KiB to {after} KiB (peak {peak} KiB) after 50 failed logins"
    );
}

#[tokio::test]
async fn a_user_removed_on_reload_is_disconnected_and_its_will_not_published() {
    let port = free_port();
    let mut gw = Gateway::start(&secured(port, ""));
    let (admin, mut aev) = connect(user(port, "watch", "admin", "admin-pw")).await.unwrap();
    assert_eq!(
        subscribe(&admin, &mut aev, "devices/#", QoS::AtLeastOnce).await,
        vec![R4::Success(QoS::AtLeastOnce)]
    );
    let mut o = user(port, "alice-1", "alice", "alice-pw");
    o.set_last_will(rumqttc::LastWill::new(
        "devices/alice/status",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (alice, mut ev) = connect(o).await.unwrap();
    alice
        .publish("devices/alice/t", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    let acked = wait_for(&mut ev, T, |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
    assert_eq!(acked, Some(()));
    assert_eq!(
        next_publish(&mut aev, T).await.map(|m| m.0),
        Some("devices/alice/t".into())
    );

    // alice leaves the config; her ACL rule would still allow the will's topic to others.
    let without_alice = secured(port, "");
    let mut lines: Vec<&str> = without_alice.lines().collect();
    lines.retain(|l| !l.contains("name: alice"));
    gw.write_config(&(lines.join("\n") + "\n"));
    gw.signal("HUP");
    gw.wait_note("READY=1", T);
    let closed = tokio::time::timeout(T, async {
        loop {
            if ev.poll().await.is_err() {
                return true;
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "a removed user's connection stayed open");
    assert!(
        connect(user(port, "alice-1", "alice", "alice-pw")).await.is_err(),
        "a removed user logged in again"
    );
    // Its will was allowed at CONNECT, but the user is gone: the will is checked again.
    let stray = next_publish(&mut aev, Duration::from_millis(800)).await;
    assert_eq!(stray, None, "the removed user's will was published");
}

#[tokio::test]
async fn failed_logins_back_off_per_user_and_the_right_password_works_after() {
    let port = free_port();
    let gw = Gateway::start(&secured(port, ""));
    for _ in 0..7 {
        assert!(connect(user(port, "alice-1", "alice", "guess")).await.is_err());
    }
    // In back-off: even the right password is refused at once, without a check, and counted.
    let t0 = std::time::Instant::now();
    assert!(connect(user(port, "alice-1", "alice", "alice-pw")).await.is_err());
    assert!(t0.elapsed() < Duration::from_millis(500));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while gw.status()["broker"]["logins_throttled"].as_u64().unwrap_or(0) == 0 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gw.status()["broker"]["logins_throttled"].as_u64().unwrap_or(0) >= 1);
    // Other users are not held up by alice's back-off.
    assert!(connect(user(port, "adm", "admin", "admin-pw")).await.is_ok());
    // Once the wait is over, the right password gets in (and clears the count).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(connect(user(port, "alice-1", "alice", "alice-pw")).await.is_ok());
}

#[tokio::test]
async fn clients_may_not_publish_the_gateways_own_topics() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (watch, mut wev) = connect(opts(port, "watch")).await.unwrap();
    assert_eq!(
        subscribe(&watch, &mut wev, "outpost/test-gw/#", QoS::AtLeastOnce).await,
        vec![R4::Success(QoS::AtLeastOnce)]
    );
    // The retained `online` of the status topic arrives first.
    assert_eq!(
        next_publish(&mut wev, T).await,
        Some(("outpost/test-gw/status".into(), b"online".to_vec(), true))
    );
    let (c, ev) = connect(opts(port, "faker")).await.unwrap();
    let _d = drive(ev);
    c.publish("outpost/test-gw/status", QoS::AtLeastOnce, true, "offline")
        .await
        .unwrap();
    c.publish("outpost/test-gw/bridges/cloud/state", QoS::AtLeastOnce, true, "{}")
        .await
        .unwrap();
    c.publish("outpost/other-gw/status", QoS::AtLeastOnce, false, "not ours")
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut wev, Duration::from_millis(800)).await,
        None,
        "a client published on the gateway's own topics"
    );
}
