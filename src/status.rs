//! `outpost status`: the status file the gateway writes, as a table a person reads.

use serde_json::Value;
use std::fmt::Write;
use std::time::SystemTime;

fn ago(secs: i64) -> String {
    match secs {
        s if s < 0 => "-".into(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n}B"),
        n if n < 1 << 20 => format!("{:.1}KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1}MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
    }
}

pub fn render(doc: &Value, now: SystemTime) -> String {
    let now_s = crate::system::clock::since_epoch(now).as_secs() as i64;
    let now_ms = now_s * 1000;
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let mut out = String::new();
    let written = doc["written"].as_i64().unwrap_or(0);
    let _ = writeln!(
        out,
        "outpost {} (gateway {}), pid {}, up {}, status written {} ago{}",
        doc["version"].as_str().unwrap_or("?"),
        doc["gateway"].as_str().unwrap_or("?"),
        u(&doc["pid"]),
        ago(written - doc["started"].as_i64().unwrap_or(written)),
        ago(now_s - written),
        if now_s - written > 10 { " (not running?)" } else { "" }
    );
    if doc["clock_synchronized"] == Value::Bool(false) {
        let _ = writeln!(
            out,
            "WARNING: the system clock is not synchronized; mqtt-e2e packets may be refused as stale"
        );
    }
    let listeners: Vec<&str> = doc["listeners"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "listeners: {}", listeners.join(", "));
    let b = &doc["broker"];
    let _ = writeln!(
        out,
        "clients: {} connected, {} since start, {} refused; denied: {} publishes, {} subscribes; closed for bad packets: {}",
        u(&b["connections"]),
        u(&b["connections_total"]),
        u(&b["connects_refused"]),
        u(&b["publish_denied"]),
        u(&b["subscribe_denied"]),
        u(&b["malformed_packets"]) + u(&b["oversized_packets"]),
    );
    let r = &doc["router"];
    if r.is_object() {
        let d = &r["dropped"];
        let _ = writeln!(
            out,
            "sessions: {} ({} connected), {} subscriptions, {} retained; queued {} of {} bytes; \
             dropped: {} queue full, {} too large, {} expired, {} past the away share, {} denied; \
             publishers paused {} times",
            u(&r["sessions"]),
            u(&r["sessions_connected"]),
            u(&r["subscriptions"]),
            u(&r["retained"]),
            u(&r["queued_bytes"]),
            u(&r["memory_budget"]),
            u(&d["queue_full"]),
            u(&d["too_large"]),
            u(&d["expired"]),
            u(&d["away_budget"]),
            u(&d["denied"]),
            u(&r["publisher_pauses"]),
        );
        for s in r["sessions_dropping"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  session {} dropped {} (queue full), {} (too large), {} (expired); {} queued now",
                s["session"].as_str().unwrap_or("?"),
                u(&s["queue_full"]),
                u(&s["too_large"]),
                u(&s["expired"]),
                u(&s["queued"]),
            );
        }
    }
    let bridges = doc["bridges"].as_array().cloned().unwrap_or_default();
    if bridges.is_empty() {
        let _ = writeln!(out, "bridges: none");
        return out;
    }
    let mut rows = vec![[
        "BRIDGE",
        "LINK",
        "FOR",
        "QUEUED",
        "BYTES",
        "OLDEST",
        "SENT",
        "RECEIVED",
        "DROPPED",
        "RECONNECTS",
        "LAST ERROR",
    ]
    .map(String::from)];
    for br in &bridges {
        let dropped: u64 = br["dropped"].as_object().map(|o| o.values().map(u).sum()).unwrap_or(0);
        rows.push([
            br["name"].as_str().unwrap_or("?").to_string(),
            if br["stalled"].as_bool() == Some(true) {
                "stalled".into()
            } else if br["connected"].as_bool() == Some(true) {
                "up".into()
            } else {
                "down".into()
            },
            ago((now_ms - br["since_ms"].as_i64().unwrap_or(now_ms)) / 1000),
            u(&br["queued"]).to_string(),
            bytes(u(&br["queued_bytes"])),
            br["oldest_age_s"]
                .as_f64()
                .map(|s| ago(s as i64))
                .unwrap_or_else(|| "-".into()),
            u(&br["sent"]).to_string(),
            u(&br["received"]).to_string(),
            dropped.to_string(),
            u(&br["reconnects"]).to_string(),
            br["last_error"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..11)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// `outpost plugs list`.
pub fn render_plugs(doc: &Value) -> String {
    let mut out = String::new();
    let plugs = doc["plugs"].as_array().cloned().unwrap_or_default();
    if plugs.is_empty() {
        return "no plugs configured or found\n".into();
    }
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<8} {:<8} {:<10} {:<9} {:<8} ERRORS",
        "PLUG", "ADDRESS", "MODEL", "ONLINE", "POWER W", "STATE", "MOVED"
    );
    for p in plugs {
        let errors: u64 = p["errors"]
            .as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<8} {:<8} {:<10} {:<9} {:<8} {errors}",
            p["name"].as_str().unwrap_or("?"),
            format!("{}:{}", p["host"].as_str().unwrap_or("?"), p["port"]),
            p["model"].as_str().unwrap_or("-"),
            if p["online"] == true { "yes" } else { "no" },
            p["last"]["power_w"]
                .as_f64()
                .map(|w| format!("{w:.1}"))
                .unwrap_or_else(|| "-".into()),
            p["last"]["state"].as_str().unwrap_or("-"),
            p["moved"].as_u64().unwrap_or(0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bridges_as_a_table() {
        let doc = serde_json::json!({
            "gateway": "gw", "version": "0.1.0", "pid": 7, "started": 1000, "written": 1100,
            "listeners": ["127.0.0.1:1883"],
            "broker": {"connections": 2, "connections_total": 5},
            "bridges": [{"name": "cloud", "connected": false, "since_ms": 1_050_000, "queued": 3, "queued_bytes": 2048,
                          "oldest_age_s": 42.0, "sent": 10, "received": 1, "reconnects": 2,
                          "dropped": {"expired": 1, "too_large": 2}, "last_error": "connection refused"}]
        });
        let t = render(&doc, std::time::UNIX_EPOCH + std::time::Duration::from_secs(1101));
        assert!(t.contains("gateway gw") && t.contains("up 100s"), "{t}");
        let line = t.lines().find(|l| l.starts_with("cloud")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &cols[..10],
            ["cloud", "down", "51s", "3", "2.0KiB", "42s", "10", "1", "3", "2"]
        );
        assert!(line.ends_with("connection refused"));
    }
}
