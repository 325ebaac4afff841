//! Config of the upstream bridges (they run in `src/bridge/`).

use super::rules::Rule;
use super::{Dur, Rate, Size};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// Names the bridge in topics, logs and its spool file; `[a-z0-9_-]+`.
    pub name: String,
    /// `mqtt://host:port`, `mqtts://host:port`, `ws://host:port/path` or `wss://host:port/path`.
    /// Give this or `urls`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Several addresses of one upstream (the nodes of a cluster), in the order of preference:
    /// the first is the primary. See `failover`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// How the bridge moves between `urls`.
    #[serde(default, skip_serializing_if = "Failover::is_default")]
    pub failover: Failover,
    /// Defaults to `<gateway.id>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<BridgeAuth>,
    /// For mqtts/wss: a custom CA (else the system's roots) and an optional client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BridgeTls>,
    #[serde(default)]
    pub protocol: MqttVersion,
    /// Ask the upstream to keep the session (and queue inbound messages) while the link is down.
    #[serde(default = "yes")]
    pub persistent_session: bool,
    #[serde(default = "keep_alive")]
    pub keep_alive: Dur,
    pub rules: Vec<BridgeRule>,
    /// `rules` compiled as they run (gateway facts and `remote_prefix` filled in), in the same
    /// order. Made when the config is read ([`super::Config::from_yaml`]); not written in the file.
    #[serde(skip)]
    pub compiled: Vec<Rule>,
    #[serde(default)]
    pub spool: Spool,
    /// Cap on messages sent upstream per second (e.g. after an outage); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_rate: Option<Rate>,
    #[serde(default)]
    pub backoff: Backoff,
    /// The upstream's largest packet; larger messages are refused at the rule and counted.
    #[serde(default = "max_packet")]
    pub max_packet_size: Size,
    /// Connected, but the oldest message in flight has had no ack for this long: the bridge is
    /// reported `stalled` (state topic, `outpost status`) until acks move again.
    #[serde(default = "stall_after")]
    pub stall_after: Dur,
    /// QoS 1/2 messages in flight upstream.
    #[serde(default = "inflight")]
    pub inflight: u16,
    /// MQTT 5: each message carries a message expiry of what is left of `spool.max_age`, so
    /// the upstream (and its offline subscribers' queues) drop it when it is too old.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub message_expiry: bool,
    /// Put before every rule's remote topic (template or filter), e.g. `sites/{gateway.id}/`:
    /// one place for a site's namespace upstream.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub remote_prefix: String,
    /// Send nothing upstream with the retain flag (AWS IoT Core refuses it): messages, the
    /// status topic and the will go out unretained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_retain: bool,
    /// Retained `online`/`offline` (the latter as will) upstream; default `outpost/<gateway.id>/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_topic: Option<String>,
    /// What waited in the spool when a connection came up (the backlog) against what comes in
    /// while it drains.
    #[serde(default, skip_serializing_if = "Backlog::is_default")]
    pub backlog: Backlog,
}

/// The backlog of a connection is what the spool held when it came up.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backlog {
    /// New messages go before the backlog, except on a topic that has backlog: those wait
    /// behind it, so each topic keeps its order.
    pub live_first: bool,
    /// MQTT 5: every backlog message carries the user property `outpost-backlog` with the time
    /// it was accepted (ms since the epoch), so consumers can tell replay from live.
    pub mark: bool,
}

impl Backlog {
    fn is_default(&self) -> bool {
        *self == Backlog::default()
    }
}

/// Moving between a bridge's `urls`: on a failed connection or a broken session the next address
/// is tried at once; only when every address failed in a row does the backoff wait.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    /// Each new connection starts at the address after the last one used, and stays there;
    /// off: the first address is preferred and returned to (`fail_back_after`).
    pub round_robin: bool,
    /// Connected to another address, the bridge goes back to the primary once the primary has
    /// accepted TCP connections (probed every `probe`) for this long.
    pub fail_back_after: Dur,
    pub probe: Dur,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            round_robin: false,
            fail_back_after: Dur(Duration::from_secs(60)),
            probe: Dur(Duration::from_secs(5)),
        }
    }
}

impl Failover {
    fn is_default(&self) -> bool {
        *self == Failover::default()
    }
}

/// The gateway facts a bridge's client id, status topic, remote prefix and rules may name, so
/// one file serves every site: `{gateway.id}` and `{hostname}`.
pub fn facts(gateway_id: &str) -> Vec<(&'static str, String)> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    vec![("{gateway.id}", gateway_id.to_string()), ("{hostname}", host)]
}

impl Bridge {
    /// The bridge as it runs: gateway facts filled in, `remote_prefix` put before each remote.
    pub fn expanded(&self, gateway_id: &str) -> Bridge {
        let facts = facts(gateway_id);
        let fill = |s: &str| facts.iter().fold(s.to_string(), |s, (k, v)| s.replace(k, v));
        let mut b = self.clone();
        b.client_id = b.client_id.as_deref().map(fill);
        b.status_topic = b.status_topic.as_deref().map(fill);
        let prefix = fill(&b.remote_prefix);
        for r in &mut b.rules {
            r.local = fill(&r.local);
            r.remote = format!("{prefix}{}", fill(&r.remote));
        }
        b.remote_prefix = String::new();
        b
    }

    /// The upstream's addresses, primary first (`url` alone is a list of one).
    pub fn endpoints(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }
}

fn yes() -> bool {
    true
}
fn keep_alive() -> Dur {
    Dur(Duration::from_secs(30))
}
fn max_packet() -> Size {
    Size(256 * 1024)
}
fn stall_after() -> Dur {
    Dur(Duration::from_secs(30))
}
fn inflight() -> u16 {
    100
}

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeAuth {
    pub username: String,
    /// A file holding the password (trailing newline ignored). Preferred over `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for BridgeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeAuth")
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MqttVersion {
    #[default]
    V311,
    V5,
}

impl Serialize for MqttVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
}

impl<'de> Deserialize<'de> for MqttVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            F(f64),
            S(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::F(f) => f.to_string(),
            Raw::S(s) => s,
        };
        match text.as_str() {
            "3.1.1" | "4" | "311" => Ok(MqttVersion::V311),
            "5" | "5.0" => Ok(MqttVersion::V5),
            other => Err(serde::de::Error::custom(format!(
                "protocol `{other}` is not supported: use 3.1.1 or 5"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local publishes go upstream.
    Out,
    /// Upstream publishes come into the local broker.
    In,
    Both,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeRule {
    pub direction: Direction,
    /// Local topic filter (source of `out`), or template (target of `in`).
    pub local: String,
    /// Remote topic template (target of `out`), or filter (source of `in`). In templates `{1}`
    /// is what the first `+` matched, `{#}` what `#` matched; a bare `+`/`#` level means the next.
    pub remote: String,
    /// QoS used upstream (and locally for `in`).
    #[serde(default = "qos1")]
    pub qos: u8,
    /// QoS 0 rules: also spool while the link is down (default: drop and count).
    #[serde(default)]
    pub spool_qos0: bool,
}

fn qos1() -> u8 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Spool {
    /// Disk the spool may use; then `when_full` applies.
    pub max_bytes: Size,
    /// Older messages are dropped (and counted).
    pub max_age: Dur,
    pub when_full: WhenFull,
}

impl Default for Spool {
    fn default() -> Self {
        Spool {
            max_bytes: Size(512 << 20),
            max_age: Dur(Duration::from_secs(7 * 86400)),
            when_full: WhenFull::DropOldest,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    DropOldest,
    RejectNew,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// First wait after a failed connection; doubles each time, with full jitter.
    pub min: Dur,
    pub max: Dur,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Dur(Duration::from_millis(500)),
            max: Dur(Duration::from_secs(60)),
        }
    }
}

/// A bridge URL, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// The whole URL (WebSocket transports take it as it is).
    pub url: String,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let u = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let default_port = match u.scheme() {
            "mqtt" => 1883,
            "mqtts" => 8883,
            "ws" => 80,
            "wss" => 443,
            other => return Err(format!("scheme `{other}` is not supported: use mqtt, mqtts, ws or wss")),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(Endpoint {
            scheme: u.scheme().to_string(),
            host,
            port: u.port().unwrap_or(default_port),
            url: s.to_string(),
        })
    }

    pub fn tls(&self) -> bool {
        self.scheme == "mqtts" || self.scheme == "wss"
    }
}

/// Checks one bridge and returns its compiled rules; or the key below `bridges[i]` and the reason.
pub(super) fn validate(gateway_id: &str, b: &Bridge, before: &[Bridge]) -> Result<Vec<Rule>, (String, String)> {
    let e = |k: &str, r: String| Err((k.to_string(), r));
    if let Some(c) = b.client_id.as_ref().filter(|c| c.trim().is_empty()) {
        return e(".client_id", format!("`{c}` is empty"));
    }
    // Rules and topics are checked as they will run, with the gateway's facts filled in.
    let b = &b.expanded(gateway_id);
    if b.name.is_empty()
        || !b
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return e(
            ".name",
            format!("`{}` must be non-empty and use only a-z, 0-9, - and _", b.name),
        );
    }
    if let Some(j) = before.iter().position(|o| o.name == b.name) {
        return e(".name", format!("`{}` is already the name of bridges[{j}]", b.name));
    }
    let mut eps = vec![];
    match (b.url.is_empty(), b.urls.is_empty()) {
        (true, true) => return e(".url", "a bridge needs `url` (or `urls`, a list)".into()),
        (false, false) => return e(".urls", "give `url` or `urls`, not both".into()),
        (false, true) => eps.push(Endpoint::parse(&b.url).map_err(|r| (".url".to_string(), r))?),
        (true, false) => {
            for (j, u) in b.urls.iter().enumerate() {
                let ep = Endpoint::parse(u).map_err(|r| (format!(".urls[{j}]"), r))?;
                if let Some(k) = b.urls[..j].iter().position(|o| o == u) {
                    return e(&format!(".urls[{j}]"), format!("`{u}` is already urls[{k}]"));
                }
                eps.push(ep);
            }
        }
    }
    let tls = eps.iter().filter(|ep| ep.tls()).count();
    if tls > 0 && tls < eps.len() {
        return e(
            ".urls",
            "mixes TLS (mqtts://, wss://) and plain addresses: one upstream, one kind of transport".into(),
        );
    }
    if b.tls.is_some() && tls == 0 {
        return e(
            ".tls",
            format!("TLS settings with a `{}://` URL: use mqtts:// or wss://", eps[0].scheme),
        );
    }
    let f = &b.failover;
    if f.probe.0 < Duration::from_millis(100) {
        return e(".failover.probe", "must be at least 100ms".into());
    }
    if f.fail_back_after.0 < f.probe.0 {
        return e(".failover.fail_back_after", "must be at least `failover.probe`".into());
    }
    if let Some(t) = &b.tls {
        if t.cert.is_some() != t.key.is_some() {
            return e(".tls", "a client certificate needs both `cert` and `key`".into());
        }
        for (k, p) in [(".tls.ca", &t.ca), (".tls.cert", &t.cert), (".tls.key", &t.key)] {
            if let Some(p) = p {
                if let Err(err) = std::fs::metadata(p) {
                    return e(k, format!("cannot read {}: {err}", p.display()));
                }
            }
        }
    }
    if let Some(a) = &b.auth {
        match (&a.password_file, &a.password) {
            (Some(_), Some(_)) => return e(".auth", "give `password_file` or `password`, not both".into()),
            (Some(p), None) => {
                if let Err(err) = std::fs::metadata(p) {
                    return e(".auth.password_file", format!("cannot read {}: {err}", p.display()));
                }
            }
            _ => {}
        }
    }
    if b.rules.is_empty() {
        return e(".rules", "a bridge needs at least one rule".into());
    }
    let mut compiled = Vec::with_capacity(b.rules.len());
    for (j, r) in b.rules.iter().enumerate() {
        if r.qos > 2 {
            return e(
                &format!(".rules[{j}].qos"),
                format!("{} is not a QoS (0, 1 or 2)", r.qos),
            );
        }
        compiled.push(Rule::compile(r).map_err(|reason| (format!(".rules[{j}]"), reason))?);
    }
    if b.spool.max_bytes.0 < 4096 {
        return e(".spool.max_bytes", "must be at least 4KiB".into());
    }
    if b.spool.max_age.0.is_zero() {
        return e(".spool.max_age", "must be longer than 0".into());
    }
    if b.backoff.min.0.is_zero() || b.backoff.max < b.backoff.min {
        return e(".backoff", "needs 0 < min <= max".into());
    }
    if b.message_expiry && b.protocol != MqttVersion::V5 {
        return e(
            ".message_expiry",
            "MQTT 3.1.1 has no message expiry: set `protocol: 5`".into(),
        );
    }
    if b.backlog.mark && b.protocol != MqttVersion::V5 {
        return e(
            ".backlog.mark",
            "MQTT 3.1.1 has no user properties: set `protocol: 5`".into(),
        );
    }
    if b.stall_after.0 < Duration::from_millis(200) {
        return e(".stall_after", "must be at least 200ms".into());
    }
    if b.inflight == 0 {
        return e(".inflight", "must be at least 1".into());
    }
    if b.max_packet_size.0 < 64 || b.max_packet_size.0 > 256 << 20 {
        return e(".max_packet_size", "must be between 64B and 256MiB".into());
    }
    if let Some(t) = &b.status_topic {
        if !crate::topic::valid_topic(t) {
            return e(".status_topic", format!("`{t}` is not a topic name"));
        }
    }
    Ok(compiled)
}
