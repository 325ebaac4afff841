//! `/metrics`: the status document in the Prometheus text exposition format (version 0.0.4).
//! Each scrape builds a `prometheus-client` registry from the typed document and encodes it;
//! the metric names, types, help texts and labels are those /metrics has always exposed.

use crate::status_doc::{BridgeState, PlugStatus, RouterStatus, StatusDoc};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A sample's labels, in the order they are written.
type Labels = Vec<(&'static str, String)>;

/// One scrape's registry. Names are given as exposed: prometheus-client writes a counter's
/// name with `_total` after it, so the suffix is taken off before registering; and it ends
/// every help text with a full stop, so that is taken off too.
struct Scrape(Registry);

fn counter_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").expect("a counter's name ends in _total")
}

fn help_text(help: &'static str) -> &'static str {
    help.strip_suffix('.').unwrap_or(help)
}

impl Scrape {
    fn counter(&mut self, name: &'static str, help: &'static str, v: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        self.0.register(counter_name(name), help_text(help), c);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, v: u64) {
        let g = Gauge::<i64>::default();
        g.set(v as i64);
        self.0.register(name, help_text(help), g);
    }

    /// A family with one sample per label set; without samples it is left out.
    fn counters(&mut self, name: &'static str, help: &'static str, samples: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).inc_by(v);
        }
        self.0.register(counter_name(name), help_text(help), family);
    }

    fn gauges(&mut self, name: &'static str, help: &'static str, samples: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).set(v as i64);
        }
        self.0.register(name, help_text(help), family);
    }

    /// Gauges whose values have fractions (ages, watts).
    fn float_gauges(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).set(v);
        }
        self.0.register(name, help_text(help), family);
    }
}

pub fn render(doc: &StatusDoc) -> String {
    let mut m = Scrape(Registry::default());
    broker(&mut m, doc);
    router(&mut m, &doc.router, doc.broker.delivery_denied);
    bridges(&mut m, &doc.bridges);
    devices(&mut m, doc);
    plugs(&mut m, &doc.plugs);
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = prometheus_text::encode(&mut out, &m.0);
    out
}

/// The gateway's and the broker's counters.
fn broker(m: &mut Scrape, doc: &StatusDoc) {
    let b = &doc.broker;
    m.gauge(
        "outpost_start_time_seconds",
        "When the gateway started (Unix time).",
        doc.started,
    );
    m.gauge("outpost_connections", "Clients logged in now.", b.connections);
    for (name, help, v) in [
        (
            "outpost_connections_total",
            "Clients logged in since start.",
            b.connections_total,
        ),
        (
            "outpost_connects_refused_total",
            "CONNECTs refused (credentials, limits).",
            b.connects_refused,
        ),
        (
            "outpost_handshakes_failed_total",
            "TLS or WebSocket handshakes that failed.",
            b.handshakes_failed,
        ),
        (
            "outpost_messages_in_total",
            "PUBLISH packets received from clients.",
            b.publishes_in,
        ),
        (
            "outpost_messages_out_total",
            "PUBLISH packets delivered to clients.",
            b.publishes_out,
        ),
        ("outpost_bytes_in_total", "Bytes received from clients.", b.bytes_in),
        ("outpost_bytes_out_total", "Bytes sent to clients.", b.bytes_out),
        (
            "outpost_inflight_exceeded_total",
            "Clients that exceeded the inflight limit.",
            b.inflight_exceeded,
        ),
        (
            "outpost_session_panics_total",
            "Connections ended by an internal error (caught; other clients unaffected).",
            b.session_panics,
        ),
        (
            "outpost_logins_throttled_total",
            "Logins refused without a password check: that address and user name were in back-off.",
            b.logins_throttled,
        ),
        (
            "outpost_prelogin_evicted_total",
            "Sockets closed while logging in to make room for a newer one (all pre-login slots taken).",
            b.prelogin_evicted,
        ),
        (
            "outpost_password_checks_total",
            "Password hashes checked (argon2).",
            b.password_checks,
        ),
        (
            "outpost_publishes_not_kept_total",
            "QoS 1/2 publishes not acknowledged because a copy could not be kept (a full disk).",
            b.publishes_not_kept,
        ),
        (
            "outpost_retained_store_write_failures_total",
            "Batches the retained store could not write.",
            doc.stores.retained.failures,
        ),
        (
            "outpost_claims_refused_total",
            "Grant claims refused.",
            doc.claims_refused,
        ),
        (
            "outpost_provisioning_frames_refused_total",
            "Provisioning frames refused.",
            doc.provisioning_frames_refused,
        ),
    ] {
        m.counter(name, help, v);
    }
    m.counters(
        "outpost_denied_total",
        "Packets denied by the ACL, by kind.",
        [("publish", b.publish_denied), ("subscribe", b.subscribe_denied)].map(|(k, v)| (vec![("kind", k.into())], v)),
    );
    m.counters(
        "outpost_packets_refused_total",
        "Connections closed for a bad packet, by reason.",
        [
            ("malformed", b.malformed_packets),
            ("oversized", b.oversized_packets),
            ("websocket", b.websocket_violations),
        ]
        .map(|(r, v)| (vec![("reason", r.into())], v)),
    );
}

/// Sessions, queues and drops. `delivery_denied` is the broker's count of the `denied` drops.
fn router(m: &mut Scrape, r: &RouterStatus, delivery_denied: u64) {
    for (name, help, v) in [
        (
            "outpost_sessions",
            "Sessions the broker holds (connected or kept).",
            r.sessions,
        ),
        (
            "outpost_subscriptions",
            "Subscriptions held by all sessions.",
            r.subscriptions,
        ),
        ("outpost_retained_messages", "Retained messages.", r.retained),
        (
            "outpost_queued_bytes",
            "Bytes queued for delivery in all sessions.",
            r.queued_bytes,
        ),
        (
            "outpost_memory_budget_bytes",
            "Bytes all queues may hold before publishers are paused.",
            r.memory_budget,
        ),
    ] {
        m.gauge(name, help, v);
    }
    m.counter(
        "outpost_publisher_pauses_total",
        "Times publishers were paused because the queues held the memory budget.",
        r.publisher_pauses,
    );
    let d = &r.dropped;
    m.counters(
        "outpost_messages_dropped_total",
        "Messages not delivered to a session, by reason (queue_full, too_large, expired, away_budget, user_share, denied).",
        [
            ("queue_full", d.queue_full),
            ("too_large", d.too_large),
            ("expired", d.expired),
            ("away_budget", d.away_budget),
            ("user_share", d.user_share),
            ("denied", delivery_denied),
        ]
        .map(|(reason, v)| (vec![("reason", reason.into())], v)),
    );
    m.counters(
        "outpost_session_messages_dropped_total",
        "Messages dropped for one session, by reason (the sessions that dropped most).",
        r.sessions_dropping.iter().flat_map(|s| {
            [
                ("queue_full", s.queue_full),
                ("too_large", s.too_large),
                ("expired", s.expired),
                ("away_budget", s.away_budget),
                ("denied", s.denied),
            ]
            .map(|(reason, v)| (vec![("session", s.session.clone()), ("reason", reason.into())], v))
        }),
    );
}

fn bridges(m: &mut Scrape, bridges: &[BridgeState]) {
    let l = |b: &BridgeState| vec![("bridge", b.name.clone())];
    let each = |f: fn(&BridgeState) -> u64| bridges.iter().map(move |b| (l(b), f(b)));
    m.gauges(
        "outpost_bridge_connected",
        "1 while the bridge's upstream link is up.",
        each(|b| b.connected.into()),
    );
    m.gauges(
        "outpost_bridge_queued_messages",
        "Messages in the bridge's spool.",
        each(|b| b.queued),
    );
    m.gauges(
        "outpost_bridge_queued_bytes",
        "Bytes in the bridge's spool.",
        each(|b| b.queued_bytes),
    );
    m.float_gauges(
        "outpost_bridge_oldest_age_seconds",
        "Age of the oldest spooled message.",
        bridges.iter().filter_map(|b| Some((l(b), b.oldest_age_s?))),
    );
    m.counters(
        "outpost_bridge_sent_total",
        "Messages delivered upstream.",
        each(|b| b.sent),
    );
    m.counters(
        "outpost_bridge_received_total",
        "Messages received from upstream.",
        each(|b| b.received),
    );
    m.counters(
        "outpost_bridge_reconnects_total",
        "Upstream reconnects.",
        each(|b| b.reconnects),
    );
    m.counters(
        "outpost_bridge_dropped_total",
        "Messages the bridge dropped, by reason.",
        bridges.iter().flat_map(|b| {
            b.dropped.by_reason().map(|(reason, n)| {
                let mut labels = l(b);
                labels.push(("reason", reason.into()));
                (labels, n)
            })
        }),
    );
}

fn devices(m: &mut Scrape, doc: &StatusDoc) {
    let l = |id: &String| vec![("device", id.clone())];
    m.counters(
        "outpost_device_messages_in_total",
        "mqtt-e2e messages accepted from the device.",
        doc.devices.iter().map(|(id, d)| (l(id), d.messages_in)),
    );
    m.counters(
        "outpost_device_commands_out_total",
        "Commands encrypted and sent to the device.",
        doc.devices.iter().map(|(id, d)| (l(id), d.commands_out)),
    );
    m.counters(
        "outpost_device_rejected_total",
        "mqtt-e2e packets refused, by reason.",
        doc.devices.iter().flat_map(|(id, d)| {
            d.rejected.iter().map(move |(reason, n)| {
                let mut labels = l(id);
                labels.push(("reason", reason.clone()));
                (labels, *n)
            })
        }),
    );
}

fn plugs(m: &mut Scrape, plugs: &[PlugStatus]) {
    let l = |p: &PlugStatus| vec![("plug", p.name.clone())];
    m.gauges(
        "outpost_plug_online",
        "1 while the plug answers.",
        plugs.iter().map(|p| (l(p), p.online.into())),
    );
    m.float_gauges(
        "outpost_plug_power_watts",
        "The plug's last live power reading.",
        plugs.iter().filter_map(|p| Some((l(p), p.last.as_ref()?.power_w?))),
    );
    m.counters(
        "outpost_plug_poll_errors_total",
        "Failed polls of the plug, by kind.",
        plugs.iter().flat_map(|p| {
            p.errors.iter().map(move |(kind, n)| {
                let mut labels = l(p);
                labels.push(("kind", kind.clone()));
                (labels, *n)
            })
        }),
    );
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
            "# HELP outpost_start_time_seconds When the gateway started (Unix time).",
            "# TYPE outpost_start_time_seconds gauge",
            "outpost_start_time_seconds 1000",
            "# TYPE outpost_connections gauge",
            "outpost_connections 2",
            "# HELP outpost_connections_total Clients logged in since start.",
            "# TYPE outpost_connections_total counter",
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
