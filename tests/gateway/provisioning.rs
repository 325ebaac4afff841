//! Provisioning over a real pty pair: `outpost provision uart` on one end, the device side of
//! docs/provisioning.md (the library's reference implementation) on the other, with log lines
//! and line noise on the wire; then the device uses what it got.

use crate::common::*;
use outpost::devices::e2e::{self, Codec};
use outpost::provision::protocol::{self, Bundle, DeviceParams, OsEntropy, ProvError, Transport};
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

/// The reference device of the library, as a firmware would run it.
async fn run_device<T: Transport>(link: &mut T, code: &str, hw_id: &str) -> Result<Bundle, ProvError> {
    let p = DeviceParams {
        code,
        hw_id,
        announce: false,
    };
    protocol::device(link, &p, &mut OsEntropy).await
}

/// `outpost provision uart`, with the loopback broker named explicitly (the test's device runs
/// on this machine).
fn provision(gw_config: &std::path::Path, port: &str, device: &str, code: &str) -> std::process::Child {
    provision_with(gw_config, port, device, code, &[])
}

fn provision_with(
    gw_config: &std::path::Path,
    port: &str,
    device: &str,
    code: &str,
    extra: &[&str],
) -> std::process::Child {
    Command::new(BIN)
        .args([
            "provision",
            "uart",
            port,
            "--device",
            device,
            "--code",
            code,
            "--mqtt-host",
            "127.0.0.1",
        ])
        .args(extra)
        .arg("--config")
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
        run_device(&mut dev, "739 201", "esp32-c3-0042"),
    )
    .await
    .expect("device side finished")
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("esp32-c3-0042"));
    // The operator was warned that a loopback address reaches no real device.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: --mqtt-host 127.0.0.1 is a loopback address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The hardware id is in the keystore.
    let ks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gw.dir.path().join("data/devices.json")).unwrap()).unwrap();
    assert_eq!(ks["devices"][0]["hardware_id"], "esp32-c3-0042", "{ks}");
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

    // Provisioned already: refused without --force ...
    let (master, slave, _line) = pty();
    let out = provision(&gw.config, &slave, "boiler", "739201")
        .wait_with_output()
        .unwrap();
    drop(master);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already provisioned (hardware id esp32-c3-0042): `--force`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and with it, the device gets a new key and password, and the old login stops working.
    let (master, slave, _line) = pty();
    let child = provision_with(&gw.config, &slave, "boiler", "739201", &["--force"]);
    let mut dev = device_end(master, None);
    let again = tokio::time::timeout(Duration::from_secs(20), run_device(&mut dev, "739201", "esp32-c3-0042"))
        .await
        .unwrap()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(again.key, bundle.key);
    assert_ne!(again.mqtt.password, bundle.mqtt.password);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut o = opts(port, "old-login");
    o.set_credentials(bundle.mqtt.username.clone(), bundle.mqtt.password.clone());
    assert!(connect(o).await.is_err(), "the old password still works");
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
    let child = provision(&gw.config, &slave, "door", "314159");
    let mut dev = device_end(master, None);
    let res = tokio::time::timeout(Duration::from_secs(20), run_device(&mut dev, "271828", "dev"))
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
    let _ = tokio::time::timeout(Duration::from_secs(12), run_device(&mut dev, "123123", "dev")).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer from the device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Cable pulled: the far end closes. (Another device: "quiet" now waits out its delay.)
    assert!(Command::new(BIN)
        .args(["devices", "add", "cable", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());
    let (master, slave, _line) = pty();
    let child = provision_with(&gw.config, &slave, "cable", "123123", &["--wait", "3s"]);
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

    // Without --mqtt-host, a broker on loopback only cannot be handed to a device.
    let (_master, slave, _line) = pty();
    let out = Command::new(BIN)
        .args([
            "provision",
            "uart",
            &slave,
            "--device",
            "cable",
            "--code",
            "123123",
            "--config",
        ])
        .arg(&gw.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("give `--mqtt-host`"), "{err}");
    // An empty or weak code is refused before anything is sent.
    for weak in ["", "123456", "000000"] {
        let out = Command::new(BIN)
            .args([
                "provision",
                "uart",
                &slave,
                "--device",
                "cable",
                "--mqtt-host",
                "10.0.0.2",
            ])
            .args(["--code", weak, "--config"])
            .arg(&gw.config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("pairing code:"),
            "{weak:?}: {err}"
        );
    }
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
    let request = serde_json::json!({ "transport": "uart", "port": slave, "device": "oven", "code": "555000", "mqtt_host": "127.0.0.1", "reply_to": "outpost/test-gw/provision/reply/ui" });

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
    let bundle = tokio::time::timeout(Duration::from_secs(20), run_device(&mut dev, "555000", "oven-hw"))
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

// ---- an attacker on the UART link ----------------------------------------------------------

const M_HEX: &str = "15cfd18e385952982b6a8f8c7854963b58e34388c8e6dae891db756481a02312";

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The best offline test of a candidate code that a party posing as the device has: with the
/// scalar `y` it chose and its message B, and the gateway's message A and confirmation it
/// received, compute the key the gateway would have if the code were `candidate`, and compare
/// confirmations. (SPAKE2 as docs/provisioning.md writes it out.)
fn offline_check(
    candidate: &str,
    gid: &[u8],
    hw: &[u8],
    y: &Scalar,
    msg_b: &[u8],
    msg_a: &[u8],
    confirm: &[u8],
) -> bool {
    let mut okm = [0u8; 48];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(b""), candidate.as_bytes())
        .expand(b"SPAKE2 pw", &mut okm)
        .unwrap();
    let mut le = [0u8; 64];
    for (i, b) in okm.iter().enumerate() {
        le[47 - i] = *b;
    }
    let w = Scalar::from_bytes_mod_order_wide(&le);
    let m_bytes: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&M_HEX[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let m = CompressedEdwardsY(m_bytes).decompress().unwrap();
    let x_point = CompressedEdwardsY(msg_a[1..].try_into().unwrap()).decompress().unwrap();
    let k = (x_point - m * w) * y;
    let key = sha256(&[
        &sha256(&[candidate.as_bytes()]),
        &sha256(&[gid]),
        &sha256(&[hw]),
        &msg_a[1..],
        &msg_b[1..],
        k.compress().as_bytes(),
    ]);
    protocol::Keys::derive(&key, protocol::transcript(gid, hw, msg_a, msg_b)).gateway_confirm()[..] == confirm[..]
}

use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::scalar::Scalar;

/// Someone on the UART link poses as the device: it gets HELLO, answers with its one guess,
/// receives the gateway's SPAKE2 message and confirmation, and then searches the code space
/// offline with everything it saw. Nothing verifies: not its guess, not the real code. Its
/// wrong confirmation gets ERROR 2 on the wire, no bundle is ever sent, the failure is counted
/// in the keystore, and the gateway refuses the next attempt for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_posing_as_the_device_gets_one_online_guess_and_nothing_to_search_offline() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    assert!(Command::new(BIN)
        .args(["devices", "add", "door", "--config"])
        .arg(&gw.config)
        .status()
        .unwrap()
        .success());
    let real = "48151623";
    let (master, slave, _line) = pty();
    let child = provision(&gw.config, &slave, "door", real);
    let mut link = Uart::new(tokio::fs::File::from_std(master));

    let hello = loop {
        let m = link.recv(Duration::from_secs(5)).await.unwrap();
        if m[0] == protocol::HELLO {
            break m;
        }
    };
    let gid = hello[4..].to_vec();
    assert_eq!(gid, b"test-gw");
    let (guess, hw) = ("00000042", b"mallory-1".as_slice());
    let seed = [0x5a; 64];
    let y = Scalar::from_bytes_mod_order_wide(&seed);
    let (_, msg_b) = protocol::spake_start(false, guess, &gid, hw, seed);
    let start = [&[protocol::START, 0, protocol::VERSION, hw.len() as u8][..], hw, &msg_b].concat();
    link.send(&start).await.unwrap();
    let mut seen = vec![hello];
    let pake = loop {
        let m = link.recv(Duration::from_secs(5)).await.unwrap();
        seen.push(m.clone());
        if m[0] == protocol::PAKE {
            break m;
        }
    };
    let (msg_a, confirm) = (&pake[2..2 + protocol::PAKE_LEN], &pake[2 + protocol::PAKE_LEN..]);

    // Its online guess: a confirmation it cannot compute. The gateway says ERROR 2, on the wire.
    link.send(&[&[protocol::CONFIRM, 1][..], &[0u8; 32]].concat())
        .await
        .unwrap();
    let error = loop {
        let m = link.recv(Duration::from_secs(5)).await.unwrap();
        seen.push(m.clone());
        if m[0] == protocol::ERROR {
            break m;
        }
    };
    assert_eq!(error[2], protocol::code::PAIRING, "{error:?}");
    assert!(seen.iter().all(|m| m[0] != protocol::BUNDLE), "a bundle went out");

    // Meanwhile, or later: everything it saw, searched offline.
    // The offline search over a slice of the code space that holds the real code (1000
    // candidates; the whole space only takes longer): nothing verifies.
    let t0 = std::time::Instant::now();
    let hits: Vec<String> = (48151000..48152000)
        .map(|n| n.to_string())
        .chain([guess.to_string()])
        .filter(|c| offline_check(c, &gid, hw, &y, &msg_b, msg_a, confirm))
        .collect();
    assert!(hits.is_empty(), "an offline search verified {hits:?}");
    eprintln!("offline search of 1001 codes: no match ({:?})", t0.elapsed());
    // The same check is not blind: against a gateway whose code was the attacker's guess, it
    // finds the guess (and only it). That is the one online guess an attempt gives.
    let (g_state, g_msg_a) = protocol::spake_start(true, guess, &gid, hw, [0x33; 64]);
    let g_keys = protocol::Keys::derive(
        &g_state.finish(&msg_b).unwrap(),
        protocol::transcript(&gid, hw, &g_msg_a, &msg_b),
    );
    assert!(offline_check(
        guess,
        &gid,
        hw,
        &y,
        &msg_b,
        &g_msg_a,
        &g_keys.gateway_confirm()
    ));
    assert!(!offline_check(
        real,
        &gid,
        hw,
        &y,
        &msg_b,
        &g_msg_a,
        &g_keys.gateway_confirm()
    ));

    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pairing failed"), "{err}");
    assert!(
        err.contains("failed pairing attempt 1 in a row (hardware id mallory-1)"),
        "{err}"
    );

    // The next attempt is refused at once, before anything is sent.
    let (_master, slave, _line) = pty();
    let out = provision(&gw.config, &slave, "door", real).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("1 failed pairing attempt(s) in a row; the next is allowed in"),
        "{err}"
    );
    let ks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gw.dir.path().join("data/devices.json")).unwrap()).unwrap();
    let d = &ks["devices"][0];
    assert_eq!(
        (d["pairing_failures"].as_u64(), d["provisioned"].as_bool()),
        (Some(1), Some(false)),
        "{ks}"
    );
    assert!(d.get("hardware_id").is_none(), "{ks}");
}

// ---- BLE through BlueZ's D-Bus API ---------------------------------------------------------

/// A private dbus-daemon and, on it, tests/tools/fake_bluez.py: BlueZ's object API with one
/// device behind it that speaks protocol v2 (a Python implementation written from the doc).
struct FakeBluez {
    bus: Child,
    bluez: Child,
    address: String,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    _dir: tempfile::TempDir,
}

use std::process::Child;

impl FakeBluez {
    fn start(code: &str, hw: &str, mode: &str) -> FakeBluez {
        use std::io::BufRead;
        assert!(
            std::path::Path::new("/usr/bin/dbus-daemon").exists(),
            "dbus-daemon is missing (Debian `dbus-daemon`; .ci/test installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}", dir.path().join("bus").display());
        let mut bus = Command::new("/usr/bin/dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                "--address",
                &address,
                "--print-address",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // It prints its address once it listens.
        let mut first = String::new();
        std::io::BufReader::new(bus.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with("unix:path="), "dbus-daemon said {first:?}");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/fake_bluez.py");
        let mut bluez = Command::new("/usr/bin/python3")
            .args([script, &address, code, hw, mode])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = bluez.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        let ready = lines.recv_timeout(Duration::from_secs(10)).expect("fake BlueZ started");
        assert_eq!(ready["ready"], true, "{ready}");
        FakeBluez {
            bus,
            bluez,
            address,
            lines,
            _dir: dir,
        }
    }

    /// Everything the stand-in and its device reported so far.
    fn seen(&self) -> Vec<serde_json::Value> {
        std::thread::sleep(Duration::from_millis(300));
        self.lines.try_iter().collect()
    }

    fn provision(&self, gw: &Gateway, device: &str, code: &str) -> std::process::Output {
        Command::new(BIN)
            .args([
                "provision",
                "ble",
                "--name",
                "outpost-dev",
                "--device",
                device,
                "--code",
                code,
            ])
            .args(["--mqtt-host", "127.0.0.1", "--config"])
            .arg(&gw.config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .output()
            .unwrap()
    }
}

impl Drop for FakeBluez {
    fn drop(&mut self) {
        let _ = self.bluez.kill();
        let _ = self.bluez.wait();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

fn add_device(gw: &Gateway, id: &str) {
    assert!(Command::new(BIN)
        .args(["devices", "add", id, "--config"])
        .arg(&gw.config)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
}

/// `outpost provision ble` over btleplug's real BlueZ path: scan with the service filter,
/// connect, service discovery, notifications on, 20-byte writes with response, notifications
/// back; then a wrong code, a device that drops the connection mid-exchange, and no adapter.
#[test]
fn ble_provisioning_runs_through_bluez_d_bus_api() {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    for id in ["lamp", "fan", "heater", "none"] {
        add_device(&gw, id);
    }

    let bz = FakeBluez::start("ab12-cd34", "nrf52-0001", "ok");
    let out = bz.provision(&gw, "lamp", "AB12CD34");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hardware id nrf52-0001"));
    let seen = bz.seen();
    let done = seen
        .iter()
        .find(|v| v.get("acknowledged").is_some())
        .expect("the device finished");
    assert_eq!(done["acknowledged"], true, "{seen:?}");
    assert_eq!(done["bundle"]["id"], "lamp");
    assert_eq!(done["bundle"]["mqtt"]["port"], port);
    // What btleplug asked BlueZ for: a scan filtered on our service, writes with response of at
    // most 20 bytes, notifications switched on, and a disconnect at the end.
    let filter = seen
        .iter()
        .find_map(|v| v.get("discovery_filter"))
        .expect("a discovery filter");
    assert_eq!(filter["UUIDs"][0], "6f75742d-706f-7374-0000-70726f760001", "{filter}");
    let writes: Vec<_> = seen.iter().filter(|v| v.get("write").is_some()).collect();
    assert!(writes.len() >= 8, "{writes:?}");
    assert!(writes
        .iter()
        .all(|v| v["write"].as_u64().unwrap() <= 20 && v["type"] == "request"));
    assert!(seen.iter().any(|v| v.get("notify").is_some()));
    assert!(seen.iter().any(|v| v["disconnect"] == "by the gateway"), "{seen:?}");
    drop(bz);

    // A wrong code: the device refuses the gateway's confirmation and says ERROR 2.
    let bz = FakeBluez::start("999111", "nrf52-0002", "ok");
    let out = bz.provision(&gw, "fan", "111999");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pairing failed"), "{err}");
    assert!(bz.seen().iter().any(|v| v["pairing"] == "failed"));
    drop(bz);

    // The device drops the connection mid-exchange: the gateway says so at once.
    let bz = FakeBluez::start("424243", "nrf52-0003", "drop-after-pake");
    let t0 = std::time::Instant::now();
    let out = bz.provision(&gw, "heater", "424243");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the device disconnected"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert!(bz.seen().iter().any(|v| v["disconnected"] == true));
    drop(bz);

    // No adapter at all.
    let bz = FakeBluez::start("424243", "x", "no-adapter");
    let out = bz.provision(&gw, "none", "424243");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no Bluetooth adapter"), "{err}");

    let ks = std::fs::read_to_string(gw.dir.path().join("data/devices.json")).unwrap();
    let ks: serde_json::Value = serde_json::from_str(&ks).unwrap();
    let hw: Vec<_> = ks["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["hardware_id"].clone())
        .collect();
    assert_eq!(hw[0], "nrf52-0001");
    assert!(hw[1..].iter().all(|h| h.is_null()), "{ks}");
}
