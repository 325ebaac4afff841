//! `outpost status`: the status file the gateway writes, as a table a person reads.

use crate::status_doc::{RouterStatus, StatusDoc};
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

pub fn render(doc: &StatusDoc, now: SystemTime) -> String {
    let now_s = crate::system::clock::since_epoch(now).as_secs() as i64;
    let now_ms = now_s * 1000;
    let mut out = String::new();
    let written = doc.written as i64;
    let _ = writeln!(
        out,
        "outpost {} (gateway {}), pid {}, up {}, status written {} ago{}",
        doc.version,
        doc.gateway,
        doc.pid,
        ago(written - doc.started as i64),
        ago(now_s - written),
        if now_s - written > 10 { " (not running?)" } else { "" }
    );
    if doc.clock_synchronized == Some(false) {
        let _ = writeln!(
            out,
            "WARNING: the system clock is not synchronized; mqtt-e2e packets may be refused as stale"
        );
    }
    let _ = writeln!(out, "listeners: {}", doc.listeners.join(", "));
    let b = &doc.broker;
    let _ = writeln!(
        out,
        "clients: {} connected, {} since start, {} refused; denied: {} publishes, {} subscribes; closed for bad packets: {}",
        b.connections,
        b.connections_total,
        b.connects_refused,
        b.publish_denied,
        b.subscribe_denied,
        b.malformed_packets + b.oversized_packets,
    );
    render_router(&mut out, &doc.router);
    if doc.bridges.is_empty() {
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
    for br in &doc.bridges {
        rows.push([
            br.name.clone(),
            if br.stalled {
                "stalled".into()
            } else if br.connected {
                "up".into()
            } else {
                "down".into()
            },
            ago((now_ms - br.since_ms) / 1000),
            br.queued.to_string(),
            bytes(br.queued_bytes),
            br.oldest_age_s.map(|s| ago(s as i64)).unwrap_or_else(|| "-".into()),
            br.sent.to_string(),
            br.received.to_string(),
            br.dropped.total().to_string(),
            br.reconnects.to_string(),
            br.last_error.clone().unwrap_or_else(|| "-".into()),
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

/// The router's line, and one per session that dropped messages.
fn render_router(out: &mut String, r: &RouterStatus) {
    let d = &r.dropped;
    let _ = writeln!(
        out,
        "sessions: {} ({} connected), {} subscriptions, {} retained; queued {} of {} bytes; \
         dropped: {} queue full, {} too large, {} expired, {} past the away share, {} denied; \
         publishers paused {} times",
        r.sessions,
        r.sessions_connected,
        r.subscriptions,
        r.retained,
        r.queued_bytes,
        r.memory_budget,
        d.queue_full,
        d.too_large,
        d.expired,
        d.away_budget,
        d.denied,
        r.publisher_pauses,
    );
    for s in &r.sessions_dropping {
        let _ = writeln!(
            out,
            "  session {} dropped {} (queue full), {} (too large), {} (expired); {} queued now",
            s.session, s.queue_full, s.too_large, s.expired, s.queued,
        );
    }
}

/// `outpost plugs list`.
pub fn render_plugs(doc: &StatusDoc) -> String {
    let mut out = String::new();
    if doc.plugs.is_empty() {
        return "no plugs configured or found\n".into();
    }
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<8} {:<8} {:<10} {:<9} {:<8} ERRORS",
        "PLUG", "ADDRESS", "MODEL", "ONLINE", "POWER W", "STATE", "MOVED"
    );
    for p in &doc.plugs {
        let errors: u64 = p.errors.values().sum();
        let last = p.last.as_ref();
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<8} {:<8} {:<10} {:<9} {:<8} {errors}",
            p.name,
            format!("{}:{}", p.host, p.port),
            p.model,
            if p.online { "yes" } else { "no" },
            last.and_then(|l| l.power_w)
                .map(|w| format!("{w:.1}"))
                .unwrap_or_else(|| "-".into()),
            last.map(|l| l.state.as_str()).unwrap_or("-"),
            p.moved,
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
        let doc: StatusDoc = serde_json::from_value(doc).unwrap();
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
