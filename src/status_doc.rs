//! The status document: what the gateway writes to `data_dir/status.json` every 2 s and hands
//! to the dashboard, as types. The router, the broker's counters, the bridges, the devices and
//! the plugs each produce their part; `outpost status`, `/metrics` and the dashboard read it
//! back as this value. A leaf: it imports no runtime module, so any of them may use it.
//!
//! The JSON is the document `outpost status --json` has always printed: the field names are the
//! contract. Fields of the parts that were once built as JSON maps are declared in alphabetical
//! order, so the file's bytes come out as before too. Every struct takes missing fields as their
//! defaults, so a file from an older gateway (or a test's partial one) still reads.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `status.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusDoc {
    pub bridges: Vec<BridgeState>,
    pub broker: BrokerCounters,
    /// Grant claims refused since start.
    pub claims_refused: u64,
    /// `None` when the clock's state is unknown.
    pub clock_synchronized: Option<bool>,
    /// Each mqtt-e2e device's counters, by device id.
    pub devices: BTreeMap<String, DeviceCounters>,
    /// The gateway's id.
    pub gateway: String,
    /// Where the broker listens (`ip:port`).
    pub listeners: Vec<String>,
    pub pid: u32,
    /// By name.
    pub plugs: Vec<PlugStatus>,
    /// Provisioning frames refused since start.
    pub provisioning_frames_refused: u64,
    pub router: RouterStatus,
    /// When the gateway started (Unix time, s).
    pub started: u64,
    pub stores: Stores,
    pub version: String,
    /// When this document was written (Unix time, s).
    pub written: u64,
}

/// The broker's counters since start (`broker::metrics`), and the deliveries the ACL withheld.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerCounters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Clients connected now.
    pub connections: u64,
    pub connections_total: u64,
    pub connects_refused: u64,
    /// Withheld by access checks, at routing and when a queued message goes out.
    pub delivery_denied: u64,
    pub handshakes_failed: u64,
    pub inflight_exceeded: u64,
    pub logins_throttled: u64,
    pub malformed_packets: u64,
    pub oversized_packets: u64,
    pub password_checks: u64,
    pub prelogin_evicted: u64,
    pub publish_denied: u64,
    pub publishes_in: u64,
    pub publishes_not_kept: u64,
    pub publishes_out: u64,
    pub session_panics: u64,
    pub subscribe_denied: u64,
    pub websocket_violations: u64,
}

/// The router: sessions, subscriptions, queues against their bounds, and every drop by reason,
/// in total and for the sessions that dropped most.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterStatus {
    pub away_budget: u64,
    pub away_bytes: u64,
    pub dropped: RouterDrops,
    pub index_nodes: u64,
    /// The gateway's own clients (bridges, services), not counted in `sessions`.
    pub internal_clients: u64,
    pub max_queued_bytes: u64,
    pub max_queued_messages: u64,
    pub memory_budget: u64,
    /// Every session connected now, internal ones included.
    pub online: u64,
    pub publisher_pauses: u64,
    pub queued_bytes: u64,
    pub retained: u64,
    pub sessions: u64,
    pub sessions_connected: u64,
    /// The (at most 20) sessions that dropped most, most first.
    pub sessions_dropping: Vec<SessionDrops>,
    pub subscriptions: u64,
    pub user_budget: u64,
}

/// Messages the router did not deliver to a session, by reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterDrops {
    pub away_budget: u64,
    pub denied: u64,
    pub expired: u64,
    pub queue_full: u64,
    pub too_large: u64,
    pub user_share: u64,
}

/// One session's drops by reason, and what it has queued now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionDrops {
    pub away_budget: u64,
    pub denied: u64,
    pub expired: u64,
    pub queue_full: u64,
    pub queued: u64,
    /// The session's key (its client id).
    pub session: String,
    pub too_large: u64,
    pub user_share: u64,
}

/// How the stores' writes go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stores {
    pub retained: StoreHealth,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreHealth {
    /// The last write failed.
    pub failing: bool,
    /// Batches that could not be written since start.
    pub failures: u64,
}

/// One bridge: its link, its spool and its drops. Also what the bridge publishes, retained, on
/// its local state topic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BridgeState {
    pub connected: bool,
    pub dropped: BridgeDrops,
    pub echoes_dropped: u64,
    pub failovers: u64,
    pub inbound_not_kept: u64,
    pub last_error: Option<String>,
    pub name: String,
    /// Age of the oldest spooled message; `None` with an empty spool.
    pub oldest_age_s: Option<f64>,
    pub paused: bool,
    pub queued: u64,
    pub queued_bytes: u64,
    pub received: u64,
    pub reconnects: u64,
    pub sent: u64,
    /// When the link last went up or down (ms since epoch; 0: never).
    pub since_ms: i64,
    pub spool_write_errors: u64,
    pub stalled: bool,
    /// The upstream in use.
    pub url: Option<String>,
}

/// Messages a bridge dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BridgeDrops {
    pub expired: u64,
    pub qos0_not_connected: u64,
    pub refused_upstream: u64,
    pub spool_full_oldest: u64,
    pub spool_full_rejected: u64,
    pub too_large: u64,
    pub unmappable: u64,
}

impl BridgeDrops {
    /// Every reason with its count, under the names the JSON uses.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("expired", self.expired),
            ("qos0_not_connected", self.qos0_not_connected),
            ("refused_upstream", self.refused_upstream),
            ("spool_full_oldest", self.spool_full_oldest),
            ("spool_full_rejected", self.spool_full_rejected),
            ("too_large", self.too_large),
            ("unmappable", self.unmappable),
        ]
    }

    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

/// One device's counters, shown on its state topic and by `outpost devices show`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceCounters {
    pub messages_in: u64,
    pub commands_out: u64,
    /// Packets refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// ms since the epoch.
    pub last_seen_ms: Option<i64>,
}

/// What `outpost plugs list` and the status file show of a plug.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlugStatus {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub udn: String,
    pub model: String,
    pub online: bool,
    /// The last reading, as published on the plug's live topic.
    pub last: Option<PlugReading>,
    pub polls: u64,
    /// Failed polls by reason.
    pub errors: BTreeMap<String, u64>,
    pub moved: u64,
}

/// A plug's reading: a full one (power and energy) or only its switch state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlugReading {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub today_kwh: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_kwh: Option<f64>,
    /// ms since the epoch.
    pub ts: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_document_reads_with_defaults_and_keeps_its_field_names() {
        let doc: StatusDoc = serde_json::from_str(
            r#"{"gateway": "gw", "broker": {"connections": 2}, "clock_synchronized": false,
                "bridges": [{"name": "cloud", "oldest_age_s": null, "dropped": {"expired": 1}}]}"#,
        )
        .unwrap();
        assert_eq!(doc.broker.connections, 2);
        assert_eq!(doc.clock_synchronized, Some(false));
        assert_eq!(doc.bridges[0].dropped.total(), 1);
        let v = serde_json::to_value(&doc).unwrap();
        assert_eq!(v["router"]["dropped"]["queue_full"], 0);
        assert_eq!(v["stores"]["retained"]["failing"], false);
        assert!(v["bridges"][0]["oldest_age_s"].is_null());
    }

    #[test]
    fn a_switch_reading_has_no_power_fields() {
        let r = PlugReading {
            state: "on".into(),
            ts: 5,
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"state":"on","ts":5}"#);
    }
}
