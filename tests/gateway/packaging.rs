//! The snap's hooks run by dash against a stand-in `snapctl` that keeps snapd's contract
//! (tests/tools/snapctl), `outpost snap-config`, `outpost health`, the CLI inside the snap, revert
//! safety, and (in submodules) the packed `.snap` and the systemd unit. snapd itself cannot run
//! here: see README.

use crate::common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod pack;
mod unit;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn snap_config(json: &str, out: &Path) -> Output {
    let mut c = Command::new(BIN)
        .args(["snap-config", "--out"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

#[test]
fn snap_set_values_are_validated_with_the_daemons_types() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("outpost.yaml");
    let good = r#"{"gateway":{"id":"site1","data-dir":"/tmp/x"},"plugs":{"poll":"750ms"},"bridges":{"cloud":{"url":"mqtts://cloud.example:8883","rules":[{"direction":"out","local":"sensor/+/live","remote":"site1/{1}"}]}}}"#;
    let o = snap_config(good, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "changed");
    let check = Command::new(BIN).arg("check-config").arg(&out).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert_eq!(
        String::from_utf8_lossy(&snap_config(good, &out).stdout).trim(),
        "unchanged"
    );
    let before = std::fs::read_to_string(&out).unwrap();
    for (json, key) in [
        (r#"{"plugs":{"poll":"fast"}}"#, "`plugs.poll`"),
        (
            r#"{"broker":{"limits":{"max-packet-size":"huge"}}}"#,
            "`broker.limits.max-packet-size`",
        ),
        (
            r#"{"bridges":{"cloud":{"url":"http://x","rules":[{"direction":"out","local":"a","remote":"b"}]}}}"#,
            "`bridges.cloud.url`",
        ),
        (
            r#"{"broker":{"listeners":[{"bind":"0.0.0.0:1883","protocol":"mqtt"}]}}"#,
            "`broker.listeners[0].bind`",
        ),
        ("not json", "no JSON"),
    ] {
        let o = snap_config(json, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{json}");
        assert!(err.contains(key), "{json}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        before,
        "a refused value changed the config"
    );
}

/// A snap's $SNAP, $SNAP_DATA, $SNAP_COMMON in temp dirs, the hooks from `snap/`, and the
/// stand-in `snapctl` (tests/tools/snapctl) on PATH with its state in a JSON file.
struct FakeSnap {
    dir: tempfile::TempDir,
}

const PLUGS: [&str; 6] = [
    "network",
    "network-bind",
    "serial-port",
    "raw-usb",
    "bluez",
    "daemon-notify",
];

impl FakeSnap {
    fn new() -> FakeSnap {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in ["snap/bin", "data", "common", "path"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(BIN, p.join("snap/bin/outpost")).unwrap();
        std::fs::copy(
            Path::new(ROOT).join("snap/local/outpost-snap-hook"),
            p.join("snap/bin/outpost-snap-hook"),
        )
        .unwrap();
        std::os::unix::fs::symlink(Path::new(ROOT).join("tests/tools/snapctl"), p.join("path/snapctl")).unwrap();
        let snap = FakeSnap { dir };
        snap.write_state(&serde_json::json!({
            "config": {},
            "services": {"outpost.daemon": {"enabled": false, "active": false}},
            "plugs": PLUGS,
            "connected": PLUGS[..5],
        }));
        snap
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("state.json")).unwrap()).unwrap()
    }

    fn write_state(&self, v: &serde_json::Value) {
        std::fs::write(self.dir.path().join("state.json"), v.to_string()).unwrap();
    }

    /// What `snap set` stored, as snapd keeps it (a nested document).
    fn set(&self, json: &str) {
        let mut s = self.state();
        s["config"] = serde_json::from_str(json).unwrap();
        self.write_state(&s);
    }

    fn edit(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut s = self.state();
        f(&mut s);
        self.write_state(&s);
    }

    fn env(&self, c: &mut Command) {
        let p = self.dir.path();
        c.env("SNAP", p.join("snap"))
            .env("SNAP_DATA", p.join("data"))
            .env("SNAP_COMMON", p.join("common"))
            .env("SNAPCTL_STATE", p.join("state.json"))
            .env("SNAPCTL_LOG", p.join("snapctl.log"))
            .env(
                "PATH",
                format!("{}:{}", p.join("path").display(), std::env::var("PATH").unwrap()),
            );
    }

    /// Runs a hook as snapd does: the file in meta/hooks, by /bin/sh (dash on Ubuntu).
    fn hook(&self, name: &str) -> Output {
        let _ = std::fs::remove_file(self.dir.path().join("snapctl.log"));
        let mut c = Command::new("dash");
        c.arg(Path::new(ROOT).join("snap/hooks").join(name));
        self.env(&mut c);
        c.output().unwrap()
    }

    /// The `outpost` command as `snap run outpost` runs it: no --config, the snap's environment.
    fn cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.dir.path());
        self.env(&mut c);
        c.output().unwrap()
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("data/outpost.yaml")
    }

    fn common(&self) -> PathBuf {
        self.dir.path().join("common")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapctl.log")).unwrap_or_default()
    }

    /// The snap's daemon, as snapd starts it (`bin/outpost run --config $SNAP_DATA/outpost.yaml`).
    fn start_daemon(&self) -> Result<Child, String> {
        let notify_dir = tempfile::tempdir().unwrap();
        let sock = std::os::unix::net::UnixDatagram::bind(notify_dir.path().join("n")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut c = Command::new(BIN);
        c.args(["run", "--config"]).arg(self.config());
        self.env(&mut c);
        let log = self.dir.path().join("daemon.log");
        let mut child = c
            .env("NOTIFY_SOCKET", notify_dir.path().join("n"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < end {
            if let Ok(n) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    return Ok(child);
                }
            }
            if child.try_wait().unwrap().is_some() {
                return Err(std::fs::read_to_string(&log).unwrap());
            }
        }
        stop(child);
        panic!("no READY=1 in 30 s");
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn install_without_daemon_notify_then_connect_configure_and_check_health() {
    let snap = FakeSnap::new();
    // install: a valid config with the data in $SNAP_COMMON; every config key asked for.
    let o = snap.hook("install");
    assert!(o.status.success(), "{}", stderr(&o));
    let yaml = std::fs::read_to_string(snap.config()).unwrap();
    assert!(yaml.contains(&snap.common().display().to_string()), "{yaml}");
    let get = snap
        .log()
        .lines()
        .find(|l| l.starts_with("get -d"))
        .unwrap()
        .to_string();
    for key in [
        "gateway",
        "broker",
        "bridges",
        "devices",
        "plugs",
        "grants",
        "log",
        "provisioning",
        "dashboard",
    ] {
        assert!(get.split(' ').any(|k| k == key), "`{key}` not asked for: {get}");
    }
    // daemon-notify is not connected (a store install): the service is not started...
    assert!(!snap.log().contains("start"), "{}", snap.log());
    assert!(
        stderr(&o).contains("snap connect outpost:daemon-notify"),
        "{}",
        stderr(&o)
    );
    // ... and check-health says so, without failing the install.
    let o = snap.hook("check-health");
    assert!(o.status.success(), "{}", stderr(&o));
    let h = &snap.state()["health"];
    assert_eq!(
        (h["status"].as_str(), h["code"].as_str()),
        (Some("blocked"), Some("daemon-notify"))
    );
    assert!(
        h["message"]
            .as_str()
            .unwrap()
            .contains("snap connect outpost:daemon-notify"),
        "{h}"
    );

    // `snap connect outpost:daemon-notify`: the hook enables and starts the service.
    snap.edit(|s| s["connected"] = serde_json::json!(PLUGS));
    let o = snap.hook("connect-plug-daemon-notify");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(snap.log().contains("start --enable outpost.daemon"), "{}", snap.log());
    assert_eq!(
        snap.state()["services"]["outpost.daemon"],
        serde_json::json!({"enabled": true, "active": true})
    );

    // configure: dashboard.* and provisioning.* reach the config; the running service restarts.
    let (port, dash) = (free_port(), free_port());
    snap.set(&format!(
        r#"{{"broker":{{"listeners":[{{"bind":"127.0.0.1:{port}","protocol":"mqtt"}}]}},
            "dashboard":{{"bind":"127.0.0.1:{dash}"}},"provisioning":{{"admins":["ops"]}}}}"#
    ));
    let o = snap.hook("configure");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(snap.log().contains("restart outpost.daemon"), "{}", snap.log());
    let c = outpost::config::Config::load(&snap.config()).unwrap();
    assert_eq!(c.dashboard.bind.map(|b| b.0.port()), Some(dash));
    assert_eq!(c.provisioning.admins, ["ops"]);

    // A value our validation refuses fails the hook (snapd then refuses the change).
    let before = std::fs::read_to_string(snap.config()).unwrap();
    for (json, key) in [
        (
            r#"{"broker":{"limits":{"max-connections":-1}}}"#,
            "broker.limits.max-connections",
        ),
        (r#"{"dashboard":{"bind":"0.0.0.0:8080"}}"#, "dashboard.bind"),
    ] {
        snap.set(json);
        let o = snap.hook("configure");
        assert!(!o.status.success(), "{json} accepted");
        assert!(stderr(&o).contains(key), "{json}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(snap.config()).unwrap(), before);
    }

    // The daemon on that config: check-health passes while it serves...
    let daemon = snap.start_daemon().unwrap();
    let o = snap.hook("check-health");
    assert!(o.status.success(), "{}{}", stderr(&o), snap.log());
    assert_eq!(snap.state()["health"]["status"], "okay");
    stop(daemon);
    // ... and once it is gone fails (a refresh is undone), printing why and telling snapd.
    let o = snap.hook("check-health");
    assert!(!o.status.success(), "check-health passed with the daemon gone");
    assert!(
        stderr(&o).contains(&format!("broker on 127.0.0.1:{port}")),
        "{}",
        stderr(&o)
    );
    let h = &snap.state()["health"];
    assert_eq!(h["status"], "error");
    assert!(
        h["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("broker on 127.0.0.1:{port}")),
        "{h}"
    );

    // Disconnecting the plug stops and disables the service.
    let o = snap.hook("disconnect-plug-daemon-notify");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(snap.state()["services"]["outpost.daemon"]["enabled"], false);
}

#[test]
fn hooks_fail_when_snapctl_fails_instead_of_rendering_defaults() {
    let snap = FakeSnap::new();
    snap.set(r#"{"gateway":{"id":"site7"}}"#);
    assert!(snap.hook("install").status.success());
    assert!(std::fs::read_to_string(snap.config()).unwrap().contains("site7"));
    snap.edit(|s| s["unreachable"] = serde_json::json!(true));
    for hook in ["post-refresh", "configure", "install", "check-health"] {
        let o = snap.hook(hook);
        assert!(!o.status.success(), "{hook} succeeded though snapctl failed");
        assert!(
            stderr(&o).contains("cannot communicate with server"),
            "{hook}: {}",
            stderr(&o)
        );
        let yaml = std::fs::read_to_string(snap.config()).unwrap();
        assert!(yaml.contains("site7"), "{hook} reset gateway.id:\n{yaml}");
    }
}

#[test]
fn a_service_that_went_down_comes_back_when_the_value_is_fixed() {
    let snap = FakeSnap::new();
    assert!(snap.hook("install").status.success());
    // Enabled (daemon-notify connected) but down, e.g. after a bad value stopped it.
    snap.edit(|s| s["services"]["outpost.daemon"] = serde_json::json!({"enabled": true, "active": false}));
    // An address this host does not have is refused up front (192.0.2.0/24 is TEST-NET-1).
    snap.set(r#"{"broker":{"listeners":[{"bind":"192.0.2.7:1883","protocol":"mqtt","anonymous":true}]}}"#);
    let o = snap.hook("configure");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not an address of this host"), "{}", stderr(&o));
    // The fixed value: the hook starts the inactive service (not only restarts active ones).
    let port = free_port();
    snap.set(&format!(
        r#"{{"broker":{{"listeners":[{{"bind":"127.0.0.1:{port}","protocol":"mqtt"}}]}}}}"#
    ));
    let o = snap.hook("configure");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        snap.log().lines().any(|l| l == "start outpost.daemon"),
        "{}",
        snap.log()
    );
    // Unchanged and still down (the start failed, say): `snap set` of the same value tries again.
    snap.edit(|s| s["services"]["outpost.daemon"]["active"] = serde_json::json!(false));
    assert!(snap.hook("configure").status.success());
    assert!(
        snap.log().lines().any(|l| l == "start outpost.daemon"),
        "{}",
        snap.log()
    );
    // A disabled service (the user's choice, or no daemon-notify) is left alone.
    snap.edit(|s| s["services"]["outpost.daemon"]["enabled"] = serde_json::json!(false));
    assert!(snap.hook("configure").status.success());
    assert!(!snap.log().contains("start"), "{}", snap.log());
}

#[test]
fn the_cli_inside_the_snap_finds_the_daemons_config_and_data() {
    let snap = FakeSnap::new();
    let port = free_port();
    snap.set(&format!(
        r#"{{"gateway":{{"id":"snapped"}},"broker":{{"listeners":[{{"bind":"127.0.0.1:{port}","protocol":"mqtt"}}]}}}}"#
    ));
    assert!(snap.hook("install").status.success());
    let daemon = snap.start_daemon().unwrap();
    let o = snap.cli(&["devices", "add", "sensor-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        snap.common().join("devices.json").exists(),
        "the keystore is not in $SNAP_COMMON"
    );
    let o = snap.cli(&["devices", "list"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("sensor-1"),
        "{}",
        stderr(&o)
    );
    let o = snap.cli(&[
        "grants", "add", "--who", "user:ann", "--topic", "sensor/#", "--for", "1h",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(snap.common().join("grants.json").exists());
    let o = snap.cli(&["grants", "list"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("user:ann"),
        "{}",
        stderr(&o)
    );
    // status reads the running daemon's status.json from $SNAP_COMMON.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let o = snap.cli(&["status", "--json"]);
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).to_string();
        }
        assert!(std::time::Instant::now() < end, "status: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.contains("snapped"), "{out}");
    let o = snap.cli(&["health"]);
    assert!(o.status.success(), "{}", stderr(&o));
    stop(daemon);
}

#[test]
fn a_revert_after_a_format_migration_starts_on_the_pre_refresh_copy() {
    let snap = FakeSnap::new();
    let port = free_port();
    snap.set(&format!(
        r#"{{"broker":{{"listeners":[{{"bind":"127.0.0.1:{port}","protocol":"mqtt"}}]}}}}"#
    ));
    assert!(snap.hook("install").status.success());
    assert!(snap.cli(&["devices", "add", "kept-1"]).status.success());
    // Refresh away from this revision: its pre-refresh hook keeps a copy in its $SNAP_DATA.
    let o = snap.hook("pre-refresh");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(snap.dir.path().join("data/pre-refresh/devices.json").exists());
    // The newer revision migrates the keystore in $SNAP_COMMON (which a revert does not roll back).
    let ks = snap.common().join("devices.json");
    let migrated = std::fs::read_to_string(&ks)
        .unwrap()
        .replace("\"format\": 1", "\"format\": 2");
    assert!(migrated.contains("\"format\": 2"), "{migrated}");
    std::fs::write(&ks, &migrated).unwrap();
    // `snap revert`: this revision starts again, on its copy, and keeps the newer file aside.
    let daemon = snap
        .start_daemon()
        .unwrap_or_else(|log| panic!("the reverted daemon did not start:\n{log}"));
    assert!(
        snap.daemon_log().contains("put back its pre-refresh copy"),
        "{}",
        snap.daemon_log()
    );
    stop(daemon);
    let o = snap.cli(&["devices", "list"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("kept-1"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(snap.common().join("newer-formats")).unwrap().count(),
        1
    );

    // Without a copy it does not start, and says what to do.
    std::fs::write(&ks, &migrated).unwrap();
    std::fs::remove_dir_all(snap.dir.path().join("data/pre-refresh")).unwrap();
    let log = snap.start_daemon().map(stop).expect_err("started on a newer keystore");
    assert!(
        log.contains("newer outpost") && log.contains("snap refresh outpost"),
        "{log}"
    );
}

#[test]
fn the_stand_in_snapctl_answers_only_what_is_asked_and_fails_as_snapd_does() {
    let snap = FakeSnap::new();
    snap.set(r#"{"gateway":{"id":"g1"},"dashboard":{"bind":"127.0.0.1:8080"}}"#);
    let run = |args: &[&str]| {
        let mut c = Command::new(Path::new(ROOT).join("tests/tools/snapctl"));
        c.args(args);
        snap.env(&mut c);
        c.output().unwrap()
    };
    let o = run(&["get", "-d", "gateway", "plugs"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"gateway": {"id": "g1"}}),
        "only the keys asked, unset left out"
    );
    let o = run(&["get", "-d", "dashboard.bind"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"dashboard.bind": "127.0.0.1:8080"}));
    assert_eq!(String::from_utf8_lossy(&run(&["get", "gateway.id"]).stdout), "g1\n");
    assert_eq!(String::from_utf8_lossy(&run(&["get", "plugs"]).stdout), "\n");
    for (args, msg) in [
        (&["get"][..], "get which option?"),
        (&["get", "-d", "data_dir"][..], "invalid option name: \"data_dir\""),
        (&["get", "gateway.id.x"][..], "is not a map"),
        (&["services", "outpost.nope"][..], "unknown service"),
        (&["set-health", "error", "short"][..], "at least 7 characters"),
        (&["is-connected", "nope"][..], "has no plug or slot named"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).starts_with("error: error running snapctl: ") && stderr(&o).contains(msg),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = run(&["is-connected", "daemon-notify"]);
    assert_eq!(
        (o.status.code(), o.stderr.is_empty()),
        (Some(1), true),
        "not connected: exit 1, silent"
    );
}
