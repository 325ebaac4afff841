//! SIGHUP as an operator meets it: what changed is applied or named as needing a restart, in
//! one log line and in systemd's STATUS=, and a reload that cannot be applied whole changes
//! nothing.

use crate::common::*;
use rumqttc::{ConnectionError, QoS};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn users(port: u16, names: &[&str], bridges: &str) -> String {
    let mut s = format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt, anonymous: true }}\n  users:\n"
    );
    for n in names {
        s.push_str(&format!(
            "    - {{ name: {n}, password_hash: \"{}\" }}\n",
            passwd(&format!("{n}-pw"))
        ));
    }
    if !bridges.is_empty() {
        s.push_str(&format!("bridges:\n{bridges}"));
    }
    s
}

fn login(port: u16, id: &str, name: &str) -> rumqttc::MqttOptions {
    let mut o = opts(port, id);
    o.set_credentials(name, format!("{name}-pw"));
    o
}

fn refused(r: Result<(rumqttc::AsyncClient, rumqttc::EventLoop), ConnectionError>) -> bool {
    matches!(r, Err(ConnectionError::ConnectionRefused(_)))
}

/// Sends SIGHUP and returns the READY=1 note that ends the reload (it carries STATUS=).
fn hup(gw: &mut Gateway) -> String {
    gw.signal("HUP");
    gw.wait_note("READY=1", T)
}

#[tokio::test]
async fn a_changed_listener_needs_a_restart_and_the_old_one_keeps_serving() {
    let (port, other) = (free_port(), free_port());
    let mut gw = Gateway::start(&open_broker(port));
    gw.write_config(&open_broker(other));
    let note = hup(&mut gw);
    let line = "changed but need a restart: broker.listeners[0].bind (listeners are bound at start)";
    assert!(note.contains(line), "note: {note}");
    assert!(
        gw.log().contains(&format!("applied nothing; {line}")),
        "log:\n{}",
        gw.log()
    );
    connect(opts(port, "still-here"))
        .await
        .expect("the old listener serves");
    assert!(std::net::TcpStream::connect(("127.0.0.1", other)).is_err());
}

#[tokio::test]
async fn a_users_only_change_is_applied_and_said_so() {
    let port = free_port();
    let mut gw = Gateway::start(&users(port, &["alice"], ""));
    assert!(refused(connect(login(port, "bob-1", "bob")).await));
    let note = hup(&mut gw);
    assert!(note.contains("reloaded: no change"), "note: {note}");
    gw.write_config(&users(port, &["alice", "bob"], ""));
    let note = hup(&mut gw);
    assert!(
        note.contains("STATUS=serving (reloaded: applied broker.users)"),
        "note: {note}"
    );
    assert!(!gw.log().contains("need a restart"), "log:\n{}", gw.log());
    connect(login(port, "bob-1", "bob")).await.expect("bob is in");
}

#[tokio::test]
async fn a_bridge_that_cannot_start_leaves_users_acls_and_bridges_as_they_were() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let bridge = |name: &str, remote: &str| {
        format!(
            "  - name: {name}\n    url: \"{}\"\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n      \
             - {{ direction: out, local: \"data/#\", remote: \"{remote}/{{#}}\", qos: 1 }}\n",
            m.url()
        )
    };
    let one = bridge("one", "one");
    let mut gw = Gateway::start(&users(port, &["alice"], &one));
    let up = Collector::start(m.port, "up", "#", None, false);
    let (c, ev) = connect(opts(port, "pub")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/first", QoS::AtLeastOnce, false, "1").await.unwrap();
    up.wait(T, "data/first upstream", |g| g.iter().any(|(t, _)| t == "one/first"))
        .await;

    // The new bridge's spool cannot be opened: its file's place is taken by a directory.
    std::fs::create_dir_all(gw.dir.path().join("data/bridges/two.db")).unwrap();
    let changed = format!("{}{}", bridge("one", "changed"), bridge("two", "two"));
    gw.write_config(&users(port, &["alice", "bob"], &changed));
    let note = hup(&mut gw);
    assert!(note.contains("reload failed at bridges"), "note: {note}");
    let log = gw.log();
    assert!(
        log.contains("reload failed, nothing applied, keeping the running config: bridges: bridge two"),
        "log:\n{log}"
    );
    assert!(!log.contains("bridge one: stopping"), "log:\n{log}");
    assert!(refused(connect(login(port, "bob-1", "bob")).await), "bob got in");
    c.publish("data/second", QoS::AtLeastOnce, false, "2").await.unwrap();
    up.wait(T, "data/second on the old rule", |g| {
        g.iter().any(|(t, _)| t == "one/second")
    })
    .await;
    assert!(!up.got.lock().unwrap().iter().any(|(t, _)| t.starts_with("changed/")));

    // Once the spool can be opened, the same file applies whole.
    std::fs::remove_dir(gw.dir.path().join("data/bridges/two.db")).unwrap();
    let note = hup(&mut gw);
    assert!(note.contains("applied broker.users, bridges"), "note: {note}");
    connect(login(port, "bob-1", "bob")).await.expect("bob is in");
    c.publish("data/third", QoS::AtLeastOnce, false, "3").await.unwrap();
    up.wait(T, "data/third on the new rule", |g| {
        g.iter().any(|(t, _)| t == "changed/third")
    })
    .await;
}
