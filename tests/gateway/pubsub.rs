//! Publish and subscribe as the MQTT spec says, for 3.1.1 and 5 clients on one port.

use crate::common::*;
use rumqttc::v5::{self, mqttbytes::v5::Packet as P5};
use rumqttc::{Packet, QoS};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn qos_0_1_2_between_v4_and_v5_clients_on_one_port() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));

    // A v5 subscriber and a v4 publisher on the same port.
    let mut o5 = v5::MqttOptions::new("sub5", "127.0.0.1", port);
    o5.set_keep_alive(Duration::from_secs(30));
    let (s5, mut e5) = v5::AsyncClient::new(o5, 100);
    s5.subscribe("qos/#", v5::mqttbytes::QoS::ExactlyOnce).await.unwrap();
    loop {
        if let v5::Event::Incoming(P5::SubAck(_)) = e5.poll().await.unwrap() {
            break;
        }
    }
    let (p4, mut e4) = connect(opts(port, "pub4")).await.unwrap();
    for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        p4.publish(format!("qos/{}", q as u8), q, false, format!("m{}", q as u8))
            .await
            .unwrap();
    }
    // The publisher sees its QoS 1 and 2 flows completed.
    let mut puback = false;
    let mut pubcomp = false;
    while !(puback && pubcomp) {
        match tokio::time::timeout(T, e4.poll()).await.expect("acks").unwrap() {
            rumqttc::Event::Incoming(Packet::PubAck(_)) => puback = true,
            rumqttc::Event::Incoming(Packet::PubComp(_)) => pubcomp = true,
            _ => {}
        }
    }
    let mut got = vec![];
    while got.len() < 3 {
        if let v5::Event::Incoming(P5::Publish(p)) =
            tokio::time::timeout(T, e5.poll()).await.expect("3 messages").unwrap()
        {
            got.push((String::from_utf8(p.topic.to_vec()).unwrap(), p.payload.to_vec()))
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("qos/0".into(), b"m0".to_vec()),
            ("qos/1".into(), b"m1".to_vec()),
            ("qos/2".into(), b"m2".to_vec())
        ]
    );

    // And the other way round: v5 publishes, a v4 subscriber receives.
    let (s4, mut se4) = connect(opts(port, "sub4")).await.unwrap();
    subscribe(&s4, &mut se4, "back/+", QoS::AtLeastOnce).await;
    s5.publish("back/x", v5::mqttbytes::QoS::AtLeastOnce, false, "from-v5")
        .await
        .unwrap();
    let _d = tokio::spawn(async move { while e5.poll().await.is_ok() {} });
    assert_eq!(
        next_publish(&mut se4, T).await,
        Some(("back/x".into(), b"from-v5".to_vec(), false))
    );
}

#[test]
fn mosquitto_clients_work_against_the_default_style_listener() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    for version in ["mqttv311", "mqttv5"] {
        let sub = Command::new("mosquitto_sub")
            .args([
                "-p",
                &port.to_string(),
                "-V",
                version,
                "-t",
                "m/#",
                "-v",
                "-C",
                "1",
                "-W",
                "10",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
        std::thread::sleep(Duration::from_millis(500));
        let st = Command::new("mosquitto_pub")
            .args([
                "-p",
                &port.to_string(),
                "-V",
                version,
                "-t",
                "m/1",
                "-m",
                "hello",
                "-q",
                "1",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        let out = sub.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "m/1 hello", "{version}");
    }
}

#[tokio::test]
async fn retained_messages_survive_a_restart_and_can_be_cleared() {
    let port = free_port();
    let mut gw = Gateway::start(&open_broker(port));
    let (c, ev) = connect(opts(port, "retainer")).await.unwrap();
    let d = drive(ev);
    c.publish("r/kept", QoS::AtLeastOnce, true, "v1").await.unwrap();
    c.publish("r/kept", QoS::AtLeastOnce, true, "v2").await.unwrap();
    c.publish("r/gone", QoS::AtLeastOnce, true, "x").await.unwrap();
    c.publish("r/gone", QoS::AtLeastOnce, true, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.abort();
    gw.restart();

    let (s, mut ev) = connect(opts(port, "late")).await.unwrap();
    subscribe(&s, &mut ev, "r/#", QoS::AtLeastOnce).await;
    assert_eq!(
        next_publish(&mut ev, T).await,
        Some(("r/kept".into(), b"v2".to_vec(), true))
    );
    assert_eq!(
        next_publish(&mut ev, Duration::from_millis(700)).await,
        None,
        "a cleared retained message came back"
    );
}

#[tokio::test]
async fn last_will_is_published_when_a_client_vanishes() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let (w, mut wev) = connect(opts(port, "watcher")).await.unwrap();
    subscribe(&w, &mut wev, "wills/#", QoS::AtLeastOnce).await;

    let mut o = opts(port, "doomed");
    o.set_last_will(rumqttc::LastWill::new("wills/doomed", "gone", QoS::AtLeastOnce, false));
    let (_c, ev) = connect(o).await.unwrap();
    drop(ev); // the socket closes without DISCONNECT
    assert_eq!(
        next_publish(&mut wev, T).await,
        Some(("wills/doomed".into(), b"gone".to_vec(), false))
    );

    // A clean DISCONNECT sends no will.
    let mut o = opts(port, "polite");
    o.set_last_will(rumqttc::LastWill::new("wills/polite", "gone", QoS::AtLeastOnce, false));
    let (c, ev) = connect(o).await.unwrap();
    let d = drive(ev);
    c.disconnect().await.unwrap();
    let _ = d.await;
    assert_eq!(next_publish(&mut wev, Duration::from_secs(1)).await, None);
}

#[tokio::test]
async fn persistent_session_gets_messages_sent_while_offline() {
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let mut o = opts(port, "sleepy");
    o.set_clean_session(false);
    let (c, mut ev) = connect(o.clone()).await.unwrap();
    subscribe(&c, &mut ev, "mail/#", QoS::AtLeastOnce).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(T, async { while ev.poll().await.is_ok() {} }).await;

    let (p, pev) = connect(opts(port, "sender")).await.unwrap();
    let _d = drive(pev);
    p.publish("mail/1", QoS::AtLeastOnce, false, "while you slept")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (_c, mut ev) = rumqttc::AsyncClient::new(o, 10);
    let present = wait_for(&mut ev, T, |p| match p {
        Packet::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    assert_eq!(present, Some(true));
    assert_eq!(
        next_publish(&mut ev, T).await,
        Some(("mail/1".into(), b"while you slept".to_vec(), false))
    );
}

#[tokio::test]
async fn status_topic_says_online_then_offline_on_shutdown() {
    let port = free_port();
    let mut gw = Gateway::start(&open_broker(port));
    let (s, mut ev) = connect(opts(port, "ops")).await.unwrap();
    subscribe(&s, &mut ev, "outpost/test-gw/status", QoS::AtLeastOnce).await;
    assert_eq!(
        next_publish(&mut ev, T).await,
        Some(("outpost/test-gw/status".into(), b"online".to_vec(), true))
    );
    gw.signal("TERM");
    assert_eq!(next_publish(&mut ev, T).await.map(|p| p.1), Some(b"offline".to_vec()));
    gw.wait_note("STOPPING=1", T);
}
