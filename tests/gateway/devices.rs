//! Devices end to end: created with the CLI, logging in with their own credentials, talking
//! mqtt-e2e through the real broker, refused packets counted, revocation, the keystore file.

use crate::common::*;
use outpost::devices::e2e::{self, Codec, Receiver};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// A broker where anonymous loopback clients may only watch `devices/#` and send commands, and
/// devices get what the device ACL gives them.
fn broker(port: u16) -> String {
    format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n  acl:\n    - {{ who: anonymous, allow: {{ publish: [\"devices/+/cmd/#\"], subscribe: [\"devices/#\"] }} }}\n"
    )
}

struct NewDevice {
    id: String,
    key: e2e::Key,
    password: String,
}

fn add_device(gw: &Gateway, id: &str) -> NewDevice {
    let out = Command::new(BIN)
        .args(["devices", "add", id, "--show-secret", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let hex = field("key:");
    let key: Vec<u8> = (0..32)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    NewDevice {
        id: id.into(),
        key: key.try_into().unwrap(),
        password: field("password:"),
    }
}

fn device_opts(port: u16, d: &NewDevice) -> rumqttc::MqttOptions {
    let mut o = opts(port, &format!("{}-board", d.id));
    o.set_credentials(d.id.clone(), d.password.clone());
    o
}

#[tokio::test]
async fn a_device_talks_end_to_end_encrypted_through_the_broker() {
    let port = free_port();
    let gw = Gateway::start(&broker(port));
    let d = add_device(&gw, "kitchen");
    tokio::time::sleep(Duration::from_millis(1500)).await; // the gateway reads the keystore every second
    let base = e2e::topic_base(&d.key);

    let (watch, mut wev) = connect(opts(port, "watcher")).await.unwrap();
    subscribe(&watch, &mut wev, "devices/kitchen/#", QoS::AtLeastOnce).await;
    let (dev, mut dev_ev) = connect(device_opts(port, &d)).await.unwrap();
    subscribe(&dev, &mut dev_ev, &format!("{base}/controller"), QoS::AtLeastOnce).await;

    // Device → gateway: the plaintext appears under devices/<id>/.
    let codec = Codec::new(&d.key, e2e::DEFAULT_AAD, 50);
    dev.publish(format!("{base}/iot/temp"), QoS::AtLeastOnce, false, codec.seal(b"21.5"))
        .await
        .unwrap();
    {
        // keep the device's event loop polled in the background from here on
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(ev) = dev_ev.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                    let _ = tx.send(p.payload.to_vec()).await;
                }
            }
        });
        // Gateway → device: a command is encrypted for the device's controller topic.
        assert_eq!(
            next_publish(&mut wev, T).await,
            Some(("devices/kitchen/temp".into(), b"21.5".to_vec(), false))
        );
        watch
            .publish("devices/kitchen/cmd/led", QoS::AtLeastOnce, false, "on")
            .await
            .unwrap();
        let _w = drive(wev);
        let packet = tokio::time::timeout(T, rx.recv())
            .await
            .expect("command reaches the device")
            .unwrap();
        assert_ne!(packet, b"on", "commands travel encrypted");
        let mut r = Receiver::new(Codec::new(&d.key, e2e::DEFAULT_AAD, 50), Duration::from_secs(15), 1024);
        assert_eq!(r.receive(&packet, e2e::now_ns()).unwrap(), b"on");
    }
}

#[tokio::test]
async fn bad_packets_are_refused_counted_and_the_next_good_one_goes_through() {
    let port = free_port();
    let gw = Gateway::start(&broker(port));
    let d = add_device(&gw, "sensor-1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let base = e2e::topic_base(&d.key);
    let topic = format!("{base}/iot/x");
    let (watch, mut wev) = connect(opts(port, "watcher")).await.unwrap();
    subscribe(&watch, &mut wev, "devices/#", QoS::AtLeastOnce).await;
    let (dev, dev_ev) = connect(device_opts(port, &d)).await.unwrap();
    let _d = drive(dev_ev);

    let codec = Codec::new(&d.key, e2e::DEFAULT_AAD, 50);
    let good = codec.seal(b"first");
    let now = e2e::now_ns();
    let mut flipped_ct = codec.seal(b"x");
    flipped_ct[20] ^= 0x01;
    let mut flipped_tag = codec.seal(b"x");
    let n = flipped_tag.len();
    flipped_tag[n - 1] ^= 0x80;
    let mut flipped_header = codec.seal(b"x");
    flipped_header[9] ^= 0x01;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("replay", good.clone()),
        ("stale", codec.encode(now - 60_000_000_000, [1, 2, 3, 4], b"old")),
        ("future", codec.encode(now + 60_000_000_000, [1, 2, 3, 5], b"new")),
        ("flipped ciphertext", flipped_ct),
        ("flipped tag", flipped_tag),
        ("flipped nonce", flipped_header),
        ("truncated", codec.seal(b"y")[..20].to_vec()),
        ("wrong key", Codec::new(&[9; 16], e2e::DEFAULT_AAD, 50).seal(b"z")),
        // Its "timestamp" is far off: refused as stale before any decryption, as the library does.
        ("garbage", vec![0xAB; 64]),
        ("too large", vec![0u8; 2000]),
    ];
    dev.publish(topic.clone(), QoS::AtLeastOnce, false, good).await.unwrap();
    assert_eq!(next_publish(&mut wev, T).await.map(|m| m.1), Some(b"first".to_vec()));
    for (_, p) in &bad {
        dev.publish(topic.clone(), QoS::AtLeastOnce, false, p.clone())
            .await
            .unwrap();
    }
    dev.publish(topic.clone(), QoS::AtLeastOnce, false, codec.seal(b"after"))
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut wev, T).await.map(|m| m.1),
        Some(b"after".to_vec()),
        "a bad packet got through, or the good one did not"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = &gw.status()["devices"]["sensor-1"];
    assert_eq!(c["messages_in"], 2, "{c}");
    let r = &c["rejected"];
    assert_eq!(
        (
            r["replay"].as_u64(),
            r["stale"].as_u64(),
            r["bad_tag"].as_u64(),
            r["bad_length"].as_u64(),
            r["too_large"].as_u64()
        ),
        (Some(1), Some(3), Some(4), Some(1), Some(1)),
        "{c}"
    );
}

#[tokio::test]
async fn revoking_a_device_disconnects_it_and_refuses_its_next_connect() {
    let port = free_port();
    let gw = Gateway::start(&broker(port));
    let d = add_device(&gw, "door");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_dev, mut ev) = connect(device_opts(port, &d)).await.unwrap();
    let st = Command::new(BIN)
        .args(["devices", "revoke", "door", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap();
    assert!(st.success());
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if ev.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "revoked device still connected");
    match connect(device_opts(port, &d)).await {
        Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("a revoked device logged in"),
    }
    let list = Command::new(BIN)
        .args(["devices", "list", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with("door") && l.contains("revoked")));
}

#[tokio::test]
async fn devices_may_only_use_their_own_topics() {
    let port = free_port();
    // The built-in ACL lets everyone use `#`: devices still get their own topics only.
    let gw = Gateway::start(&open_broker(port));
    let a = add_device(&gw, "a");
    let b = add_device(&gw, "b");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (dev, mut ev) = connect(device_opts(port, &a)).await.unwrap();
    let other = e2e::topic_base(&b.key);
    assert_eq!(
        subscribe(&dev, &mut ev, &format!("{other}/#"), QoS::AtMostOnce).await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    assert_eq!(
        subscribe(&dev, &mut ev, "devices/b/#", QoS::AtMostOnce).await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    let own = e2e::topic_base(&a.key);
    assert_eq!(
        subscribe(&dev, &mut ev, &format!("{own}/controller"), QoS::AtMostOnce).await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
}

#[test]
fn the_keystore_is_private_and_never_half_written() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Kill `devices add` at random moments; whatever survives must be a whole keystore.
    for i in 0..40 {
        let mut child = Command::new(BIN)
            .args(["devices", "add", &format!("d{i}"), "--data-dir"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // From right after start to well into the write (a run takes a few ms here).
        std::thread::sleep(Duration::from_micros((i * 2713 % 30_000) as u64));
        let _ = child.kill();
        let _ = child.wait();
    }
    let path = data.join("devices.json");
    let ks = outpost::devices::keystore::load(&path).expect("the keystore parses after the kills");
    assert!(ks.devices.iter().all(|d| d.key.len() == 32));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let before = ks.devices.len();
    let st = Command::new(BIN)
        .args(["devices", "add", "last", "--data-dir"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        outpost::devices::keystore::load(&path).unwrap().devices.len(),
        before + 1
    );
}

#[tokio::test]
async fn a_wrong_device_password_costs_what_an_unknown_name_costs() {
    // Refusals that differ in cost or code would tell an attacker which device ids exist.
    let port = free_port();
    let gw = Gateway::start(&broker(port));
    add_device(&gw, "meter");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let checks = || gw.status()["broker"]["password_checks"].as_u64().unwrap_or(0);
    let mut seen = vec![];
    for (user, pass) in [("meter", "not-its-password"), ("no-such-device", "whatever")] {
        let before = checks();
        let mut o = opts(port, &format!("{user}-probe"));
        o.set_credentials(user, pass);
        let code = match connect(o).await {
            Err(ConnectionError::ConnectionRefused(code)) => code,
            Err(e) => panic!("{user}: expected a CONNACK refusal, got {e}"),
            Ok(_) => panic!("{user}: logged in with a wrong password"),
        };
        // status.json is rewritten every 2 s.
        let mut after = checks();
        for _ in 0..30 {
            if after > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            after = checks();
        }
        seen.push((code, after - before));
    }
    assert_eq!(
        seen[0], seen[1],
        "(refusal code, password checks) for a device vs an unknown name"
    );
    assert_eq!(seen[0].1, 1, "each refusal costs exactly one password check");
}
