//! `/metrics`: the status document in the Prometheus text exposition format (version 0.0.4).

use serde_json::Value;
use std::fmt::Write;

/// One metric family: its samples as (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64))
}

/// Adds an empty family and returns its index.
fn fam(fams: &mut Vec<Family>, name: &'static str, kind: &'static str, help: &'static str) -> usize {
    fams.push(Family {
        name,
        kind,
        help,
        samples: vec![],
    });
    fams.len() - 1
}

pub fn render(doc: &crate::status_doc::StatusDoc) -> String {
    // The typed document in its JSON form, until the exposition is built from the types.
    let doc = &serde_json::to_value(doc).unwrap_or_default();
    let mut fams: Vec<Family> = vec![];
    let b = &doc["broker"];
    let mut scalar = vec![];
    for (name, kind, help, v) in [
        (
            "outpost_start_time_seconds",
            "gauge",
            "When the gateway started (Unix time).",
            &doc["started"],
        ),
        (
            "outpost_connections",
            "gauge",
            "Clients logged in now.",
            &b["connections"],
        ),
        (
            "outpost_connections_total",
            "counter",
            "Clients logged in since start.",
            &b["connections_total"],
        ),
        (
            "outpost_connects_refused_total",
            "counter",
            "CONNECTs refused (credentials, limits).",
            &b["connects_refused"],
        ),
        (
            "outpost_handshakes_failed_total",
            "counter",
            "TLS or WebSocket handshakes that failed.",
            &b["handshakes_failed"],
        ),
        (
            "outpost_messages_in_total",
            "counter",
            "PUBLISH packets received from clients.",
            &b["publishes_in"],
        ),
        (
            "outpost_messages_out_total",
            "counter",
            "PUBLISH packets delivered to clients.",
            &b["publishes_out"],
        ),
        (
            "outpost_bytes_in_total",
            "counter",
            "Bytes received from clients.",
            &b["bytes_in"],
        ),
        (
            "outpost_bytes_out_total",
            "counter",
            "Bytes sent to clients.",
            &b["bytes_out"],
        ),
        (
            "outpost_inflight_exceeded_total",
            "counter",
            "Clients that exceeded the inflight limit.",
            &b["inflight_exceeded"],
        ),
        (
            "outpost_session_panics_total",
            "counter",
            "Connections ended by an internal error (caught; other clients unaffected).",
            &b["session_panics"],
        ),
        (
            "outpost_publishes_not_kept_total",
            "counter",
            "QoS 1/2 publishes not acknowledged because a copy could not be kept (a full disk).",
            &b["publishes_not_kept"],
        ),
        (
            "outpost_retained_store_write_failures_total",
            "counter",
            "Batches the retained store could not write.",
            &doc["stores"]["retained"]["failures"],
        ),
        (
            "outpost_claims_refused_total",
            "counter",
            "Grant claims refused.",
            &doc["claims_refused"],
        ),
        (
            "outpost_provisioning_frames_refused_total",
            "counter",
            "Provisioning frames refused.",
            &doc["provisioning_frames_refused"],
        ),
    ] {
        if let Some(x) = num(v) {
            scalar.push((fam(&mut fams, name, kind, help), x));
        }
    }
    for (i, x) in scalar {
        fams[i].samples.push((vec![], x));
    }
    let denied = fam(
        &mut fams,
        "outpost_denied_total",
        "counter",
        "Packets denied by the ACL, by kind.",
    );
    let refused = fam(
        &mut fams,
        "outpost_packets_refused_total",
        "counter",
        "Connections closed for a bad packet, by reason.",
    );
    for (kind, key) in [("publish", "publish_denied"), ("subscribe", "subscribe_denied")] {
        fams[denied]
            .samples
            .push((vec![("kind", kind.into())], num(&b[key]).unwrap_or(0.0)));
    }
    for (reason, key) in [
        ("malformed", "malformed_packets"),
        ("oversized", "oversized_packets"),
        ("websocket", "websocket_violations"),
    ] {
        fams[refused]
            .samples
            .push((vec![("reason", reason.into())], num(&b[key]).unwrap_or(0.0)));
    }

    let r = &doc["router"];
    for (name, help, v) in [
        (
            "outpost_sessions",
            "Sessions the broker holds (connected or kept).",
            &r["sessions"],
        ),
        (
            "outpost_subscriptions",
            "Subscriptions held by all sessions.",
            &r["subscriptions"],
        ),
        ("outpost_retained_messages", "Retained messages.", &r["retained"]),
        (
            "outpost_queued_bytes",
            "Bytes queued for delivery in all sessions.",
            &r["queued_bytes"],
        ),
        (
            "outpost_memory_budget_bytes",
            "Bytes all queues may hold before publishers are paused.",
            &r["memory_budget"],
        ),
    ] {
        if let Some(x) = num(v) {
            let i = fam(&mut fams, name, "gauge", help);
            fams[i].samples.push((vec![], x));
        }
    }
    if r.is_object() {
        let i = fam(
            &mut fams,
            "outpost_publisher_pauses_total",
            "counter",
            "Times publishers were paused because the queues held the memory budget.",
        );
        fams[i]
            .samples
            .push((vec![], num(&r["publisher_pauses"]).unwrap_or(0.0)));
        let i = fam(
            &mut fams,
            "outpost_messages_dropped_total",
            "counter",
            "Messages not delivered to a session, by reason (queue_full, too_large, expired, away_budget, user_share, denied).",
        );
        for reason in ["queue_full", "too_large", "expired", "away_budget", "user_share"] {
            fams[i].samples.push((
                vec![("reason", reason.into())],
                num(&r["dropped"][reason]).unwrap_or(0.0),
            ));
        }
        fams[i].samples.push((
            vec![("reason", "denied".into())],
            num(&b["delivery_denied"]).unwrap_or(0.0),
        ));
        let i = fam(
            &mut fams,
            "outpost_session_messages_dropped_total",
            "counter",
            "Messages dropped for one session, by reason (the sessions that dropped most).",
        );
        for s in r["sessions_dropping"].as_array().into_iter().flatten() {
            let key = s["session"].as_str().unwrap_or("?").to_string();
            for reason in ["queue_full", "too_large", "expired", "away_budget", "denied"] {
                fams[i].samples.push((
                    vec![("session", key.clone()), ("reason", reason.into())],
                    num(&s[reason]).unwrap_or(0.0),
                ));
            }
        }
    }
    let connected = fam(
        &mut fams,
        "outpost_bridge_connected",
        "gauge",
        "1 while the bridge's upstream link is up.",
    );
    let queued = fam(
        &mut fams,
        "outpost_bridge_queued_messages",
        "gauge",
        "Messages in the bridge's spool.",
    );
    let qbytes = fam(
        &mut fams,
        "outpost_bridge_queued_bytes",
        "gauge",
        "Bytes in the bridge's spool.",
    );
    let oldest = fam(
        &mut fams,
        "outpost_bridge_oldest_age_seconds",
        "gauge",
        "Age of the oldest spooled message.",
    );
    let sent = fam(
        &mut fams,
        "outpost_bridge_sent_total",
        "counter",
        "Messages delivered upstream.",
    );
    let received = fam(
        &mut fams,
        "outpost_bridge_received_total",
        "counter",
        "Messages received from upstream.",
    );
    let reconnects = fam(
        &mut fams,
        "outpost_bridge_reconnects_total",
        "counter",
        "Upstream reconnects.",
    );
    let dropped = fam(
        &mut fams,
        "outpost_bridge_dropped_total",
        "counter",
        "Messages the bridge dropped, by reason.",
    );
    for br in doc["bridges"].as_array().into_iter().flatten() {
        let name = br["name"].as_str().unwrap_or("?").to_string();
        let l = || vec![("bridge", name.clone())];
        for (i, key) in [
            (connected, "connected"),
            (queued, "queued"),
            (qbytes, "queued_bytes"),
            (oldest, "oldest_age_s"),
            (sent, "sent"),
            (received, "received"),
            (reconnects, "reconnects"),
        ] {
            if let Some(x) = num(&br[key]) {
                fams[i].samples.push((l(), x));
            }
        }
        for (reason, n) in br["dropped"].as_object().into_iter().flatten() {
            let mut labels = l();
            labels.push(("reason", reason.clone()));
            fams[dropped].samples.push((labels, num(n).unwrap_or(0.0)));
        }
    }

    let dev_in = fam(
        &mut fams,
        "outpost_device_messages_in_total",
        "counter",
        "mqtt-e2e messages accepted from the device.",
    );
    let dev_out = fam(
        &mut fams,
        "outpost_device_commands_out_total",
        "counter",
        "Commands encrypted and sent to the device.",
    );
    let dev_rej = fam(
        &mut fams,
        "outpost_device_rejected_total",
        "counter",
        "mqtt-e2e packets refused, by reason.",
    );
    for (id, d) in doc["devices"].as_object().into_iter().flatten() {
        let l = || vec![("device", id.clone())];
        fams[dev_in].samples.push((l(), num(&d["messages_in"]).unwrap_or(0.0)));
        fams[dev_out]
            .samples
            .push((l(), num(&d["commands_out"]).unwrap_or(0.0)));
        for (reason, n) in d["rejected"].as_object().into_iter().flatten() {
            let mut labels = l();
            labels.push(("reason", reason.clone()));
            fams[dev_rej].samples.push((labels, num(n).unwrap_or(0.0)));
        }
    }

    let online = fam(&mut fams, "outpost_plug_online", "gauge", "1 while the plug answers.");
    let power = fam(
        &mut fams,
        "outpost_plug_power_watts",
        "gauge",
        "The plug's last live power reading.",
    );
    let errors = fam(
        &mut fams,
        "outpost_plug_poll_errors_total",
        "counter",
        "Failed polls of the plug, by kind.",
    );
    for p in doc["plugs"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let l = || vec![("plug", name.clone())];
        fams[online].samples.push((l(), num(&p["online"]).unwrap_or(0.0)));
        if let Some(w) = num(&p["last"]["power_w"]) {
            fams[power].samples.push((l(), w));
        }
        for (kind, n) in p["errors"].as_object().into_iter().flatten() {
            let mut labels = l();
            labels.push(("kind", kind.clone()));
            fams[errors].samples.push((labels, num(n).unwrap_or(0.0)));
        }
    }

    let mut out = String::new();
    for f in fams.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
        for (labels, v) in &f.samples {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            if labels.is_empty() {
                let _ = writeln!(out, "{} {v}", f.name);
            } else {
                let _ = writeln!(out, "{}{{{}}} {v}", f.name, labels.join(","));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_devices_and_plugs_become_labelled_samples() {
        let doc = serde_json::json!({
            "started": 1000,
            "broker": {"connections": 2, "publishes_in": 7, "publish_denied": 1, "malformed_packets": 3},
            "bridges": [{"name": "cl\"oud", "connected": true, "queued": 4, "sent": 9, "dropped": {"expired": 2}}],
            "devices": {"kitchen": {"messages_in": 5, "commands_out": 0, "rejected": {"replay": 1}}},
            "plugs": [{"name": "fridge", "online": false, "last": {"power_w": 61.5}, "errors": {"timeout": 3}}],
        });
        let doc: crate::status_doc::StatusDoc = serde_json::from_value(doc).unwrap();
        let text = render(&doc);
        for line in [
            "# TYPE outpost_messages_in_total counter",
            "outpost_messages_in_total 7",
            "outpost_denied_total{kind=\"publish\"} 1",
            "outpost_packets_refused_total{reason=\"malformed\"} 3",
            "outpost_bridge_connected{bridge=\"cl\\\"oud\"} 1",
            "outpost_bridge_dropped_total{bridge=\"cl\\\"oud\",reason=\"expired\"} 2",
            "outpost_device_rejected_total{device=\"kitchen\",reason=\"replay\"} 1",
            "outpost_plug_power_watts{plug=\"fridge\"} 61.5",
            "outpost_plug_poll_errors_total{plug=\"fridge\",kind=\"timeout\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        // Families without samples are left out rather than announced empty.
        assert!(!text.contains("outpost_bridge_oldest_age_seconds"), "{text}");
    }
}
