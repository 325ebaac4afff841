//! The command line as an operator uses it: config checks that name file, line and key,
//! `passwd`, `--help`, and readiness on the systemd notify socket.

use crate::common::*;
use std::process::Command;
use std::time::Duration;

fn check(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("outpost.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&f).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_names_file_line_key_and_reason() {
    let (ok, msg) = check("gateway:\n  id: gw\nbroker:\n  listeners:\n    - { bind: \"127.0.0.1:1883\", protocol: mqtt }\n  limits:\n    max_conections: 5\n");
    assert!(!ok);
    assert!(
        msg.contains("outpost.yaml:7")
            && msg.contains("broker.limits")
            && msg.contains("unknown field `max_conections`"),
        "{msg}"
    );

    let (ok, msg) = check("gateway:\n  shutdown_timeout: soon\n");
    assert!(
        !ok && msg.contains(":2") && msg.contains("gateway.shutdown_timeout") && msg.contains("not a duration"),
        "{msg}"
    );

    let (ok, msg) = check("broker:\n  limits:\n    max_packet_size: huge\n");
    assert!(
        !ok && msg.contains("broker.limits.max_packet_size") && msg.contains("not a size"),
        "{msg}"
    );

    let (ok, msg) = check("broker:\n  listeners:\n    - { bind: \"127.0.0.1:99999\", protocol: mqtt }\n");
    assert!(
        !ok && msg.contains(":3") && msg.contains("broker.listeners[0].bind"),
        "{msg}"
    );

    let (ok, msg) = check("broker:\n  listeners:\n    - { bind: \"127.0.0.1:8883\", protocol: mqtts }\n");
    assert!(
        !ok && msg.contains("broker.listeners[0].tls") && msg.contains("needs"),
        "{msg}"
    );

    let (ok, msg) = check("broker:\n  acl:\n    - { who: \"root\", allow: { publish: [\"#\"] } }\n");
    assert!(!ok && msg.contains("broker.acl[0].who"), "{msg}");

    let (ok, msg) = check("broker:\n  acl:\n    - { who: \"*\", allow: { subscribe: [\"a/#/b\"] } }\n");
    assert!(!ok && msg.contains("broker.acl[0].allow.subscribe[0]"), "{msg}");

    let (ok, msg) = check("broker:\n  users:\n    - { name: a, password_hash: plain }\n");
    assert!(
        !ok && msg.contains("broker.users[0].password_hash") && msg.contains("outpost passwd"),
        "{msg}"
    );

    let (ok, msg) = check("broker:\n  listeners: [ { bind: \"127.0.0.1:1883\", protocol: mqtt }, { bind: \"127.0.0.1:1883\", protocol: ws } ]\n");
    assert!(
        !ok && msg.contains("broker.listeners[1].bind") && msg.contains("already used"),
        "{msg}"
    );

    let (ok, msg) = check("{}\n");
    assert!(ok, "{msg}");
}

#[test]
fn the_built_in_default_is_valid_and_printable() {
    let out = Command::new(BIN).arg("default-config").output().unwrap();
    assert!(out.status.success());
    let (ok, msg) = check(&String::from_utf8(out.stdout).unwrap());
    assert!(ok, "{msg}");
}

#[test]
fn run_with_a_bad_config_exits_nonzero_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, "broker:\n  listners: []\n").unwrap();
    let out = Command::new(BIN).args(["run", "--config"]).arg(&f).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:2") && err.contains("unknown field `listners`"),
        "{err}"
    );
}

#[test]
fn help_covers_every_subcommand() {
    for sub in ["run", "check-config", "default-config", "passwd"] {
        let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: outpost"), "{sub}");
    }
}

#[test]
fn ready_comes_after_listeners_are_bound_and_stopping_on_sigterm() {
    let port = free_port();
    let mut gw = Gateway::start(&open_broker(port));
    // READY=1 was received by the harness: the port must already accept.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(
        gw.notes.iter().any(|n| n.contains("READY=1") && n.contains("STATUS=")),
        "{:?}",
        gw.notes
    );
    gw.signal("TERM");
    gw.wait_note("STOPPING=1", Duration::from_secs(5));
    assert!(gw.stop(), "exit status after SIGTERM");
}

#[test]
fn watchdog_pings_arrive_when_systemd_asks_for_them() {
    let port = free_port();
    let mut gw = Gateway::start_with_env(&open_broker(port), &[("WATCHDOG_USEC", "400000")]);
    gw.wait_note("WATCHDOG=1", Duration::from_secs(3));
}

#[test]
fn a_file_descriptor_limit_too_small_for_max_connections_is_refused_and_a_low_soft_limit_raised() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "gateway: {{ data_dir: {} }}\nbroker:\n  listeners: [ {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }} ]\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    // Hard limit 1024: the default max_connections (1000) cannot fit.
    let out = Command::new("prlimit")
        .args(["--nofile=1024:1024", BIN, "run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broker.limits.max_connections") && err.contains("1024"),
        "{err}"
    );
    // Soft 1024 under a hard 8192 (systemd's default shape): raised, and it serves.
    let mut child = Command::new("prlimit")
        .args(["--nofile=1024:8192", BIN, "run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut limit = String::new();
    while std::time::Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
            limit = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .unwrap_or("")
                .to_string();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        limit.split_whitespace().filter(|w| *w == "8192").count() == 2,
        "{limit:?}"
    );
}
