//! The snap's hooks against a stand-in `snapctl`, `outpost snap-config`, `outpost health`, and
//! the systemd unit through `systemd-analyze`. (snapd itself cannot run here: see README.)

use crate::common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

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

/// A snap's $SNAP, $SNAP_DATA, $SNAP_COMMON in temp dirs, the hooks from `snap/`, and a
/// stand-in `snapctl` that serves `get -d` from a file and logs what it is asked to do.
struct FakeSnap {
    dir: tempfile::TempDir,
}

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
        let snapctl = p.join("path/snapctl");
        std::fs::write(
            &snapctl,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$1\" in\n  get) cat {values} 2>/dev/null || echo '{{}}' ;;\n  services) echo 'Service Startup Current Notes'; echo 'outpost.daemon enabled active -' ;;\nesac\n",
                log = p.join("snapctl.log").display(),
                values = p.join("values.json").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&snapctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeSnap { dir }
    }

    fn set(&self, json: &str) {
        std::fs::write(self.dir.path().join("values.json"), json).unwrap();
    }

    fn hook(&self, name: &str) -> Output {
        let p = self.dir.path();
        Command::new("sh")
            .arg(Path::new(ROOT).join("snap/hooks").join(name))
            .env("SNAP", p.join("snap"))
            .env("SNAP_DATA", p.join("data"))
            .env("SNAP_COMMON", p.join("common"))
            .env(
                "PATH",
                format!("{}:{}", p.join("path").display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap()
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("data/outpost.yaml")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapctl.log")).unwrap_or_default()
    }
}

#[test]
fn snap_hooks_install_configure_refuse_and_check_health() {
    let snap = FakeSnap::new();
    // install: a valid config with the data in $SNAP_COMMON, before anything is set.
    let o = snap.hook("install");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let yaml = std::fs::read_to_string(snap.config()).unwrap();
    assert!(
        yaml.contains(&snap.dir.path().join("common").display().to_string()),
        "{yaml}"
    );

    // configure: a good value is written and the running service restarted.
    let port = free_port();
    snap.set(&format!(
        r#"{{"broker":{{"listeners":[{{"bind":"127.0.0.1:{port}","protocol":"mqtt"}}]}}}}"#
    ));
    let o = snap.hook("configure");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(snap.log().contains("restart outpost.daemon"), "{}", snap.log());

    // A bad value fails the hook (snapd then refuses the change) and leaves the config alone.
    let before = std::fs::read_to_string(snap.config()).unwrap();
    snap.set(r#"{"broker":{"limits":{"max-connections":-1}}}"#);
    let o = snap.hook("configure");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("broker.limits.max-connections"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(snap.config()).unwrap(), before);

    // The service starts with that config; check-health passes while it serves, fails after.
    let notify_dir = tempfile::tempdir().unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind(notify_dir.path().join("n")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut daemon = Command::new(BIN)
        .args(["run", "--config"])
        .arg(snap.config())
        .env("NOTIFY_SOCKET", notify_dir.path().join("n"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        let n = sock.recv(&mut buf).expect("READY=1 from the snap's daemon");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let o = snap.hook("check-health");
    assert!(o.status.success(), "{}", snap.log());
    assert!(snap.log().contains("set-health okay"));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let o = snap.hook("check-health");
    assert!(!o.status.success(), "check-health passed with the daemon gone");
    assert!(snap.log().contains("set-health error"), "{}", snap.log());
}
