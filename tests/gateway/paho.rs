//! MQTT 5 as an independent implementation sees it: Debian's paho-mqtt (python3-paho-mqtt)
//! scripts in tests/paho/, each run against a fresh gateway. A script prints every check it
//! makes and exits non-zero if one failed; its output is shown on failure.

use crate::common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter: the package installs for it, not for another python3 on PATH.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run(script: &str) {
    let port = free_port();
    let gw = Gateway::start(&open_broker(port));
    let path = format!("{}/tests/paho/{script}", env!("CARGO_MANIFEST_DIR"));
    let out_path = gw.dir.path().join("paho.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(python())
        .arg(&path)
        .args(["--port", &port.to_string()])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 (with Debian's python3-paho-mqtt) must be installed");
    let end = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(st) if st.success() => {}
        Some(st) => panic!(
            "{script} failed ({st}):\n{output}\n--- outpost log (tail) ---\n{}",
            tail(&gw.log())
        ),
        None => panic!("{script} did not finish in 40 s:\n{output}"),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn paho_every_mqtt5_property_round_trips_live_retained_and_as_will() {
    run("properties.py");
}

#[test]
fn paho_message_expiry_in_an_offline_queue() {
    run("message_expiry.py");
}

#[test]
fn paho_subscription_identifiers_no_local_retain_handling_and_retain_as_published() {
    run("subscription_options.py");
}

#[test]
fn paho_topic_aliases_both_ways() {
    run("topic_aliases.py");
}

#[test]
fn paho_small_maximum_packet_size() {
    run("max_packet_size.py");
}

#[test]
fn paho_connack_assigned_client_id_and_server_keep_alive() {
    run("connack.py");
}

#[test]
fn paho_will_delay_published_after_delay_cancelled_on_reconnect() {
    run("will_delay.py");
}

#[test]
fn paho_mqtt5_properties_to_a_v311_subscriber_keep_the_broker_working() {
    run("v5_to_v311.py");
}
