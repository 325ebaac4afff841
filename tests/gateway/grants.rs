//! Paid and free data: the free topic is public, the live one only while a grant lasts;
//! grants from the CLI, from an admin's request topic, and from verified payment claims.

use crate::common::*;
use rumqttc::{QoS, SubscribeReasonCode as R};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn config(port: u16, extra: &str) -> String {
    let alice = passwd("alice-pw");
    let payer = passwd("payer-pw");
    format!(
        r##"broker:
  listeners:
    - {{ bind: "127.0.0.1:{port}", protocol: mqtt }}
  users:
    - {{ name: alice, password_hash: "{alice}" }}
    - {{ name: payer, password_hash: "{payer}" }}
  acl:
    - {{ who: anonymous, on: ["127.0.0.1:{port}"], allow: {{ subscribe: ["sensor/+/1m", "outpost/test-gw/grants/reply/#"], publish: ["sensor/#", "outpost/test-gw/grants/claim"] }} }}
    - {{ who: "user:*", allow: {{ subscribe: ["outpost/test-gw/grants/reply/#"] }} }}
{extra}"##
    )
}

fn login(port: u16, id: &str, user: &str, pw: &str) -> rumqttc::MqttOptions {
    let mut o = opts(port, id);
    o.set_credentials(user, pw);
    o
}

#[tokio::test]
async fn the_live_topic_is_readable_only_while_a_grant_lasts_and_the_average_is_free() {
    let port = free_port();
    let gw = Gateway::start(&config(port, ""));
    let (anon, mut aev) = connect(opts(port, "anyone")).await.unwrap();
    assert_eq!(
        subscribe(&anon, &mut aev, "sensor/kitchen/1m", QoS::AtMostOnce).await,
        vec![R::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        subscribe(&anon, &mut aev, "sensor/kitchen/live", QoS::AtMostOnce).await,
        vec![R::Failure]
    );
    let (alice, mut ev) = connect(login(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/kitchen/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "no grant yet"
    );

    let out = Command::new(BIN)
        .args([
            "grants",
            "add",
            "--who",
            "user:alice",
            "--topic",
            "sensor/kitchen/live",
            "--for",
            "4s",
            "--config",
        ])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let until: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/kitchen/live", QoS::AtMostOnce).await,
        vec![R::Success(QoS::AtMostOnce)]
    );
    let (p, pev) = connect(opts(port, "plug")).await.unwrap();
    let _d = drive(pev);
    p.publish("sensor/kitchen/live", QoS::AtMostOnce, false, "{\"power_w\":60}")
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut ev, T).await.map(|m| m.0),
        Some("sensor/kitchen/live".into())
    );

    // At expiry delivery stops: the plug keeps publishing, the client stays connected, and
    // nothing reaches it after the grant's end (plus the time a message takes to arrive).
    let feeder = {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let _ = p
                    .publish("sensor/kitchen/live", QoS::AtMostOnce, false, format!("{{\"n\":{i}}}"))
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut last_at = 0f64;
    let quiet_until = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < quiet_until {
        match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)))) => {
                last_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64();
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("disconnected when the grant ended ({e}); only delivery should stop"),
        }
    }
    feeder.abort();
    assert!(last_at > 0.0, "no message arrived while the grant lasted");
    assert!(
        last_at <= until as f64 + 0.5,
        "a message arrived at {last_at}, after the grant ended at {until}"
    );
    drop(alice);
    let (alice, mut ev) = connect(login(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/kitchen/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "expired grant still works"
    );
    let list = Command::new(BIN)
        .args(["grants", "list", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.contains("user:alice") && l.contains("expired")));
}

/// The next reply on the shop's reply topic, as JSON.
async fn reply(ev: &mut rumqttc::EventLoop) -> Option<serde_json::Value> {
    next_publish(ev, T).await.map(|m| serde_json::from_slice(&m.1).unwrap())
}

/// A payment verifier: `good-*` references are paid, others not.
async fn verifier() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                loop {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if n >= i + 4 + len {
                            let paid = text[i + 4..].contains("\"reference\":\"good-");
                            let body = format!("{{\"valid\":{paid}}}");
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn grants_from_an_admin_request_and_from_verified_claims_and_replays_refused() {
    let vport = verifier().await;
    let port = free_port();
    let mut gw = Gateway::start(&config(
        port,
        &format!("grants:\n  admins: [payer]\n  claims: true\n  prices: [ {{ topic: \"sensor/+/live\", price: 500, per: 1h }} ]\n  verifier: {{ url: \"http://127.0.0.1:{vport}/verify\" }}\n"),
    ));
    let (anon, mut aev) = connect(opts(port, "shop")).await.unwrap();
    subscribe(&anon, &mut aev, "outpost/test-gw/grants/reply/#", QoS::AtLeastOnce).await;
    let claim = |reference: &str, user: &str, topic: &str| {
        serde_json::json!({ "user": user, "amount": 500, "reference": reference, "topic": topic, "reply_to": "outpost/test-gw/grants/reply/shop" }).to_string()
    };
    anon.publish(
        "outpost/test-gw/grants/claim",
        QoS::AtLeastOnce,
        false,
        claim("good-1", "carol", "sensor/z/live"),
    )
    .await
    .unwrap();
    let r = reply(&mut aev)
        .await
        .unwrap_or_else(|| panic!("no reply; log:\n{}", gw.log()));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["grant"]["who"], "user:carol");
    anon.publish(
        "outpost/test-gw/grants/claim",
        QoS::AtLeastOnce,
        false,
        claim("bad-2", "dave", "sensor/z/live"),
    )
    .await
    .unwrap();
    assert_eq!(reply(&mut aev).await.unwrap()["ok"], false);
    anon.publish(
        "outpost/test-gw/grants/claim",
        QoS::AtLeastOnce,
        false,
        claim("good-1", "mallory", "sensor/z/live"),
    )
    .await
    .unwrap();
    let r = reply(&mut aev).await.unwrap();
    assert!(r["error"].as_str().unwrap().contains("already used"), "{r}");

    // A privileged user's request creates a grant; anyone else's is dropped.
    let (payer, pev) = connect(login(port, "payer-1", "payer", "payer-pw")).await.unwrap();
    let _d = drive(pev);
    let req = serde_json::json!({ "action": "add", "who": "user:alice", "topic": "sensor/y/live", "for": "1h", "reply_to": "outpost/test-gw/grants/reply/shop" });
    payer
        .publish(
            "outpost/test-gw/grants/request",
            QoS::AtLeastOnce,
            false,
            req.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(reply(&mut aev).await.unwrap()["ok"], true);
    let (alice, aliceev) = connect(login(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    let _e = drive(aliceev);
    alice
        .publish(
            "outpost/test-gw/grants/request",
            QoS::AtLeastOnce,
            false,
            req.to_string(),
        )
        .await
        .unwrap();
    assert!(
        next_publish(&mut aev, Duration::from_secs(1)).await.is_none(),
        "a non-admin's request was answered"
    );

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(gw.status()["claims_refused"], 2);

    // Grants survive a restart.
    gw.restart();
    let (alice, mut ev) = connect(login(port, "alice-2", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/y/live", QoS::AtMostOnce).await,
        vec![R::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/z/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "carol's grant is not alice's"
    );
}

/// Issue 13, point 5: a grant names a logged-in user. A `client:ID` grant is refused when
/// asked for, and one already on file (written by an older outpost) gives nothing to whoever
/// connects with that id, anonymous or another user.
#[tokio::test]
async fn a_client_id_grant_is_refused_and_one_on_file_is_not_taken_by_that_id() {
    let port = free_port();
    let gw = Gateway::start(&config(port, "grants:\n  admins: [payer]\n"));
    let (shop, mut sev) = connect(opts(port, "shop")).await.unwrap();
    subscribe(&shop, &mut sev, "outpost/test-gw/grants/reply/#", QoS::AtLeastOnce).await;
    let (payer, pev) = connect(login(port, "payer-1", "payer", "payer-pw")).await.unwrap();
    let _d = drive(pev);
    let req = serde_json::json!({ "action": "add", "who": "client:kiosk-7", "topic": "sensor/kiosk/live", "for": "1h", "reply_to": "outpost/test-gw/grants/reply/shop" });
    payer
        .publish(
            "outpost/test-gw/grants/request",
            QoS::AtLeastOnce,
            false,
            req.to_string(),
        )
        .await
        .unwrap();
    let r = reply(&mut sev).await.expect("a reply to the request");
    assert_eq!(r["ok"], false, "a client:ID grant was made: {r}");
    assert!(r["error"].as_str().unwrap().contains("user:NAME"), "{r}");
    let out = Command::new(BIN)
        .args([
            "grants",
            "add",
            "--who",
            "client:kiosk-7",
            "--topic",
            "sensor/kiosk/live",
            "--for",
            "1h",
            "--config",
        ])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the CLI made a client:ID grant");

    // A grants file from before: the id alone must not open the topic.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let file = serde_json::json!({ "format": 1, "grants": [{ "id": "old1", "who": "client:kiosk-7", "filter": "sensor/kiosk/live",
        "subscribe": true, "publish": false, "not_before": now - 10, "expires": now + 3600, "created": now - 10, "source": "cli" }] });
    std::fs::write(gw.dir.path().join("data/grants.json"), file.to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (anon, mut aev) = connect(opts(port, "kiosk-7")).await.unwrap();
    assert_eq!(
        subscribe(&anon, &mut aev, "sensor/kiosk/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "an anonymous client took the grant by its client id"
    );
    let (alice, mut ev) = connect(login(port, "kiosk-7", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/kiosk/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "another user took the grant by its client id"
    );
}

/// Issue 13, point 6: a claim buys the one topic asked for. A wildcard claim is refused (the
/// price is per topic), and a paid claim opens that topic only.
#[tokio::test]
async fn a_claim_buys_one_topic_and_a_wildcard_claim_is_refused() {
    let vport = verifier().await;
    let port = free_port();
    let gw = Gateway::start(&config(
        port,
        &format!("grants:\n  claims: true\n  prices: [ {{ topic: \"sensor/+/live\", price: 500, per: 1h }} ]\n  verifier: {{ url: \"http://127.0.0.1:{vport}/verify\" }}\n"),
    ));
    let (shop, mut sev) = connect(opts(port, "shop")).await.unwrap();
    subscribe(&shop, &mut sev, "outpost/test-gw/grants/reply/#", QoS::AtLeastOnce).await;
    let claim = |reference: &str, topic: &str| {
        serde_json::json!({ "user": "alice", "amount": 500, "reference": reference, "topic": topic, "reply_to": "outpost/test-gw/grants/reply/shop" }).to_string()
    };
    for wild in ["sensor/+/live", "sensor/#"] {
        shop.publish(
            "outpost/test-gw/grants/claim",
            QoS::AtLeastOnce,
            false,
            claim("good-w", wild),
        )
        .await
        .unwrap();
        let r = reply(&mut sev)
            .await
            .unwrap_or_else(|| panic!("no reply; log:\n{}", gw.log()));
        assert_eq!(r["ok"], false, "one payment bought {wild}: {r}");
        assert!(r["error"].as_str().unwrap().contains("one topic"), "{r}");
    }
    shop.publish(
        "outpost/test-gw/grants/claim",
        QoS::AtLeastOnce,
        false,
        claim("good-k", "sensor/kitchen/live"),
    )
    .await
    .unwrap();
    let r = reply(&mut sev).await.unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["grant"]["filter"], "sensor/kitchen/live");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (alice, mut ev) = connect(login(port, "alice-1", "alice", "alice-pw")).await.unwrap();
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/kitchen/live", QoS::AtMostOnce).await,
        vec![R::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        subscribe(&alice, &mut ev, "sensor/garage/live", QoS::AtMostOnce).await,
        vec![R::Failure],
        "the claim for one topic opened another"
    );
}

/// Issue 13, point 13: a verifier command gets no arguments a claimant could turn into
/// options: the claim comes on standard input as JSON.
#[tokio::test]
async fn a_verifier_command_reads_the_claim_on_stdin_never_as_arguments() {
    let port = free_port();
    let d = tempfile::tempdir().unwrap();
    let seen = d.path().join("seen");
    let script = d.path().join("verify.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"args=$#:$*\" > {seen}\ncat >> {seen}\ngrep -q '\"reference\":\"--help\"' {seen}\n",
            seen = seen.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let gw = Gateway::start(&config(
        port,
        &format!(
            "grants:\n  claims: true\n  prices: [ {{ topic: \"sensor/+/live\", price: 500, per: 1h }} ]\n  verifier: {{ command: \"{}\" }}\n",
            script.display()
        ),
    ));
    let (shop, mut sev) = connect(opts(port, "shop")).await.unwrap();
    subscribe(&shop, &mut sev, "outpost/test-gw/grants/reply/#", QoS::AtLeastOnce).await;
    let claim = serde_json::json!({ "user": "alice", "amount": 500, "reference": "--help", "topic": "sensor/kitchen/live", "reply_to": "outpost/test-gw/grants/reply/shop" });
    shop.publish(
        "outpost/test-gw/grants/claim",
        QoS::AtLeastOnce,
        false,
        claim.to_string(),
    )
    .await
    .unwrap();
    let r = reply(&mut sev)
        .await
        .unwrap_or_else(|| panic!("no reply; log:\n{}", gw.log()));
    let got = std::fs::read_to_string(&seen).unwrap_or_default();
    let mut lines = got.lines();
    assert_eq!(lines.next(), Some("args=0:"), "the verifier got arguments:\n{got}");
    let doc: serde_json::Value = serde_json::from_str(lines.next().unwrap_or("null")).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({ "reference": "--help", "amount": 500, "user": "alice" })
    );
    assert_eq!(r["ok"], true, "{r}");
}
