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
