//! Provisioning over a real pty pair: `outpost provision uart` on one end, the device side of
//! docs/provisioning.md (the library's reference implementation) on the other, with log lines
//! and line noise on the wire; then the device uses what it got.

use crate::common::*;
use outpost::devices::e2e::{self, Codec};
use outpost::provision::protocol::{self, Bundle, ProvError, Transport};
use outpost::provision::uart::Uart;
use rumqttc::QoS;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A pty pair: the master as a file, the slave's path, and a handle on the slave that keeps the
/// line up (reading the master fails while no one has the slave open).
fn pty() -> (std::fs::File, String, std::fs::File) {
    let (mut master, mut slave) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two fds and a NUL-terminated name into the buffers given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .to_string();
    (unsafe { std::fs::File::from_raw_fd(master) }, path, unsafe {
        std::fs::File::from_raw_fd(slave)
    })
}

/// The device end, writing boot-log lines and line noise before each of its messages.
struct NoisyDevice {
    link: Uart<tokio::fs::File>,
    raw: std::fs::File,
    stop_after: Option<usize>,
    sent: usize,
}

impl Transport for NoisyDevice {
    async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
        if self.stop_after.is_some_and(|n| self.sent >= n) {
            return Ok(()); // the device went quiet
        }
        self.sent += 1;
        let _ = self
            .raw
            .write_all(b"I (1234) wifi: sta start\r\n#OP1:bm9pc2U=*00000000\n\x00\xff garbage without newline ");
        self.link.send(msg).await
    }
    async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
        self.link.recv(within).await
    }
}

fn device_end(master: std::fs::File, stop_after: Option<usize>) -> NoisyDevice {
    let raw = master.try_clone().unwrap();
    NoisyDevice {
        link: Uart::new(tokio::fs::File::from_std(master)),
        raw,
        stop_after,
        sent: 0,
    }
}

fn provision(gw_config: &std::path::Path, port: &str, device: &str, code: &str) -> std::process::Child {
    Command::new(BIN)
        .args([
            "provision",
            "uart",
            port,
            "--device",
            device,
            "--code",
            code,
            "--config",
        ])
        .arg(gw_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_provisioned_over_uart_and_then_talks_end_to_end() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    assert!(Command::new(BIN)
        .args(["devices", "add", "boiler", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());
    let (master, slave, _line) = pty();
    let child = provision(&gw.config, &slave, "boiler", "739201");
    let mut dev = device_end(master, None);
    let bundle: Bundle = tokio::time::timeout(
        Duration::from_secs(20),
        protocol::device(&mut dev, "739201", "esp32-c3-0042"),
    )
    .await
    .expect("device side finished")
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("esp32-c3-0042"));
    let list = Command::new(BIN)
        .args(["devices", "list", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout)
            .lines()
            .any(|l| l.starts_with("boiler") && l.contains(" yes ")),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    assert_eq!((bundle.id.as_str(), bundle.mqtt.port), ("boiler", port));

    // What it got works: log in, publish e2e, see the plaintext locally.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (w, mut wev) = connect(opts(port, "watch")).await.unwrap();
    subscribe(&w, &mut wev, "devices/boiler/#", QoS::AtLeastOnce).await;
    let mut o = opts(bundle.mqtt.port, "boiler-board");
    o.set_credentials(bundle.mqtt.username.clone(), bundle.mqtt.password.clone());
    let (c, ev) = connect(o).await.unwrap();
    let _d = drive(ev);
    let key = outpost::devices::keystore::parse_key(&bundle.key).unwrap();
    let codec = Codec::new(&key, bundle.e2e.aad.as_bytes(), bundle.e2e.pad);
    c.publish(
        format!("{}/temp", bundle.e2e.publish),
        QoS::AtLeastOnce,
        false,
        codec.seal(b"61.0"),
    )
    .await
    .unwrap();
    assert_eq!(
        next_publish(&mut wev, Duration::from_secs(10)).await,
        Some(("devices/boiler/temp".into(), b"61.0".to_vec(), false))
    );
    assert_eq!(e2e::topic_base(&key), bundle.e2e.base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pairing_code_fails_cleanly_and_reveals_nothing() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    assert!(Command::new(BIN)
        .args(["devices", "add", "door", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());
    let (master, slave, _line) = pty();
    let child = provision(&gw.config, &slave, "door", "111111");
    let mut dev = device_end(master, None);
    let res = tokio::time::timeout(Duration::from_secs(20), protocol::device(&mut dev, "222222", "dev"))
        .await
        .unwrap();
    assert_eq!(res, Err(ProvError::PairingFailed), "the device must not get a bundle");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pairing failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = Command::new(BIN)
        .args(["devices", "list", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with("door") && l.contains(" no ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_mid_exchange_or_a_pulled_cable_gives_a_clear_error() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    assert!(Command::new(BIN)
        .args(["devices", "add", "quiet", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());

    // Stops after its first message: the gateway retries, then gives up.
    let (master, slave, _line) = pty();
    let child = provision(&gw.config, &slave, "quiet", "123123");
    let mut dev = device_end(master, Some(1));
    let _ = tokio::time::timeout(Duration::from_secs(12), protocol::device(&mut dev, "123123", "dev")).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer from the device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Cable pulled: the far end closes.
    let (master, slave, _line) = pty();
    let child = provision(&gw.config, &slave, "quiet", "123123");
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(master);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("link") || err.contains("no answer"), "{err}");

    // A port that does not exist.
    let out = Command::new(BIN)
        .args([
            "provision",
            "uart",
            "/dev/ttyNOPE9",
            "--device",
            "quiet",
            "--code",
            "1",
            "--config",
        ])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such serial port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_can_drive_provisioning_over_the_broker_and_others_cannot() {
    let port = free_port();
    let admin = passwd("admin-pw");
    let gw = Gateway::start(&format!(
        "{}  users: [ {{ name: admin, password_hash: \"{admin}\" }} ]\nprovisioning: {{ admins: [admin] }}\n",
        open_broker(port)
    ));
    assert!(Command::new(BIN)
        .args(["devices", "add", "oven", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());
    let (master, slave, _line) = pty();
    let request = serde_json::json!({ "transport": "uart", "port": slave, "device": "oven", "code": "555000", "reply_to": "outpost/test-gw/provision/reply/ui" });

    // Anyone else's request is not even delivered.
    let (w, mut wev) = connect(opts(port, "watch")).await.unwrap();
    subscribe(&w, &mut wev, "outpost/test-gw/provision/reply/#", QoS::AtLeastOnce).await;
    w.publish(
        "outpost/test-gw/provision/request",
        QoS::AtLeastOnce,
        false,
        request.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(
        next_publish(&mut wev, Duration::from_secs(1)).await,
        None,
        "a non-admin started provisioning"
    );

    let mut o = opts(port, "ui");
    o.set_credentials("admin", "admin-pw");
    let (a, aev) = connect(o).await.unwrap();
    let _d = drive(aev);
    a.publish(
        "outpost/test-gw/provision/request",
        QoS::AtLeastOnce,
        false,
        request.to_string(),
    )
    .await
    .unwrap();
    let mut dev = device_end(master, None);
    let bundle = tokio::time::timeout(Duration::from_secs(20), protocol::device(&mut dev, "555000", "oven-hw"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bundle.id, "oven");
    let mut replies = vec![];
    while let Some(p) = next_publish(&mut wev, Duration::from_secs(5)).await {
        let v: serde_json::Value = serde_json::from_slice(&p.1).unwrap();
        let done = v.get("ok").is_some();
        replies.push(v);
        if done {
            break;
        }
    }
    assert_eq!(
        replies.first().map(|v| v["state"].clone()),
        Some(serde_json::json!("started")),
        "{replies:?}"
    );
    assert_eq!(
        replies.last().map(|v| (v["ok"].clone(), v["hardware_id"].clone())),
        Some((serde_json::json!(true), serde_json::json!("oven-hw"))),
        "{replies:?}"
    );
    // The device wrote a bad frame before each of its messages: each was counted.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        gw.status()["provisioning_frames_refused"].as_u64().unwrap() >= 3,
        "{}",
        gw.status()
    );
}
