//! The gateway's one config file: typed, with defaults for everything, and validated in full
//! before anything starts. A bad file is refused with file, line, key path and reason.
//!
//! The types here are the config reference: every field says what it is for.

pub mod acl;
mod bridges;
mod devices;
mod error;
mod grants;
mod plugs;
pub mod rules;
mod units;

pub use acl::Who;
pub use bridges::*;
pub use devices::Devices;
pub use error::ConfigError;
pub use grants::{Grants, Price, Verifier};
pub use plugs::{plug_slug, PlugTopics, Plugs, StaticPlug};
pub use units::{Bind, Dur, Rate, Size};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The built-in default, compiled in: a broker on loopback, anonymous, everything allowed.
pub const DEFAULT_YAML: &str = include_str!("../../config/outpost.yaml");

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: Gateway,
    pub log: Log,
    pub broker: Broker,
    /// Links to upstream brokers, each with its own durable spool.
    pub bridges: Vec<Bridge>,
    /// Devices with their own keys: mqtt-e2e and MQTT credentials (`outpost devices ...`).
    pub devices: Devices,
    /// WeMo-style smart plugs polled over local HTTP.
    pub plugs: Plugs,
    /// Time-limited access to topics (paid data).
    pub grants: Grants,
    pub provisioning: Provisioning,
    /// HTTP port for health, metrics and MQTT over WebSocket on `/mqtt`.
    pub dashboard: Dashboard,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dashboard {
    /// The page, `/healthz`, `/metrics`, and `/mqtt` (the broker's front door, same users and
    /// ACLs). On by default at `127.0.0.1:8080`; `bind: null` (or `enabled: false`) turns it off.
    /// Off loopback it needs `broker.users`, like a listener. The default address gives way
    /// (a warning, no dashboard) when another program holds it; any other address must bind.
    pub bind: Option<Bind>,
    /// `false` turns the dashboard off whatever `bind` says (handy with `snap set`).
    pub enabled: bool,
    /// Serve HTTPS (and `wss://` on `/mqtt`) with this certificate, as a `wss` listener does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Web origins (`https://ops.example.com`) whose pages may open `/mqtt` besides the
    /// dashboard's own page. A browser's WebSocket from any other origin is refused.
    pub origins: Vec<String>,
    /// Let clients without a user name in on `/mqtt`. Off by default, even on loopback: any
    /// local process or browser tab could otherwise use the broker as the anonymous rule allows.
    pub anonymous: bool,
    /// Users who may pause, resume and restart bridges (`outpost/<gateway.id>/bridges/request`).
    pub admins: Vec<String>,
    /// A bearer token (`Authorization: Bearer ...`) that opens `/metrics` and `/info.json` off
    /// loopback to a scraper, besides a broker user's login. At least 16 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Where the dashboard listens unless told otherwise.
pub const DEFAULT_DASHBOARD_BIND: &str = "127.0.0.1:8080";

/// How long (ms) the router may leave the gateway's probe unrouted before the gateway stops
/// feeding the systemd watchdog and the dashboard's `/healthz` reports it. Fixed, not a
/// setting; it sits here because both the gateway and the dashboard it starts read it.
pub const ROUTER_SILENCE_MS: i64 = 20_000;

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            bind: Some(DEFAULT_DASHBOARD_BIND.parse().expect("a socket address")),
            enabled: true,
            tls: None,
            origins: vec![],
            anonymous: false,
            admins: vec![],
            token: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Provisioning {
    /// Users who may start provisioning over the broker (`outpost/<gateway.id>/provision/request`).
    pub admins: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    /// Names this gateway in its topics (`outpost/<id>/status`) and upstream.
    pub id: String,
    /// Retained messages, keys and spools live here. Created if missing.
    pub data_dir: PathBuf,
    /// How long to let connections finish on shutdown before closing them.
    pub shutdown_timeout: Dur,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// error, warn, info, debug or trace. `RUST_LOG` overrides it when set.
    pub level: LogLevel,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    /// Where devices connect. Each listener speaks MQTT 3.1.1 and 5 on the same port.
    pub listeners: Vec<Listener>,
    /// Who may log in. Passwords are argon2 hashes (`outpost passwd` prints one).
    pub users: Vec<User>,
    /// Who may publish and subscribe where. A packet is allowed when any matching rule allows it.
    pub acl: Vec<AclRule>,
    pub limits: Limits,
    pub sessions: Sessions,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub bind: Bind,
    pub protocol: ListenerProtocol,
    /// Required for `mqtts` and `wss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Let clients in without a username. Defaults to true on loopback addresses and false
    /// elsewhere; a non-loopback listener with no users configured refuses to start unless
    /// this says `true` explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
}

impl Listener {
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.unwrap_or(self.bind.0.ip().is_loopback())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerProtocol {
    pub fn needs_tls(self) -> bool {
        matches!(self, ListenerProtocol::Mqtts | ListenerProtocol::Wss)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate signed by one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl Tls {
    /// Every file named exists and can be read; the error names `key.cert`/`.key`/`.client_ca`.
    fn files_readable(&self, key: &str) -> Result<(), (String, String)> {
        for (name, path) in [
            ("cert", Some(&self.cert)),
            ("key", Some(&self.key)),
            ("client_ca", self.client_ca.as_ref()),
        ] {
            if let Some(p) = path {
                if let Err(e) = std::fs::metadata(p) {
                    return Err((format!("{key}.{name}"), format!("cannot read {}: {e}", p.display())));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// An argon2 PHC string (`$argon2id$v=19$...`).
    pub password_hash: String,
    /// Client ids this user may connect with (`*` at the end matches any rest; `{username}`
    /// is replaced). Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ids: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// `*` everyone, `anonymous`, `user:*` any logged-in user, `user:NAME`, `client:ID`
    /// (`client:` takes a trailing `*`).
    pub who: Who,
    pub allow: AclAllow,
    /// What this rule forbids, in the same shape; a deny that matches wins over any allow.
    /// Subscribing exactly a denied filter (or one inside it) is refused, and a wider
    /// subscription never delivers a denied topic.
    #[serde(default, skip_serializing_if = "AclAllow::is_empty")]
    pub deny: AclAllow,
    /// Only on these listeners (their `bind` as written); all when empty. E.g. a free topic
    /// readable by anonymous clients on one public listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclAllow {
    /// Topic filters the client may publish to; `{username}` and `{client_id}` are replaced.
    pub publish: Vec<String>,
    /// Topic filters the client may subscribe to (a subscription must lie inside one).
    pub subscribe: Vec<String>,
}

impl AclAllow {
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty() && self.subscribe.is_empty()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connected clients at once, over all listeners; more get CONNACK "server unavailable".
    pub max_connections: u32,
    /// Largest MQTT packet a client may send; a larger one closes that connection.
    pub max_packet_size: Size,
    /// QoS 1/2 publishes a client may have unacknowledged (MQTT 5 Receive Maximum).
    pub max_inflight: u16,
    /// Time for a new socket to finish its TLS/WebSocket handshake and send CONNECT.
    pub connect_timeout: Dur,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// Gone with the rumqttd engine; kept only to refuse it with what replaced it.
    #[serde(default, skip_serializing)]
    pub filter_log: Option<Size>,
}

/// How the broker keeps sessions and what their queues may hold.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sessions {
    /// Messages one session's queue holds at most (waiting to be sent plus in flight); one more
    /// is dropped for that session alone and counted.
    pub max_queued_messages: u32,
    /// Bytes one session's queue holds at most.
    pub max_queued_bytes: Size,
    /// Bytes all queues together may hold. When reached, the broker stops reading publishers
    /// (TCP pushes back on them) until subscribers catch up; nothing is dropped for it.
    pub memory_budget: Size,
    /// Bytes the queues of one user's sessions may hold together (anonymous clients are one
    /// user); past it, that user's deliveries are dropped and counted (`user_share`), so no
    /// user's slow or stalled clients can pause anyone else. `null`: a quarter of the budget.
    pub max_user_bytes: Option<Size>,
    /// How long a 3.1.1 persistent session (clean session 0) is kept after its connection
    /// ends; `null` keeps it until the client cleans it (Mosquitto's default).
    pub persistent_session_expiry: Option<Dur>,
    /// The longest session expiry an MQTT 5 client may ask for; `null`: whatever it asks.
    pub max_session_expiry: Option<Dur>,
}

impl Sessions {
    /// What one user's sessions may hold together.
    pub fn user_bytes(&self) -> usize {
        self.max_user_bytes.map_or(self.memory_budget.0 / 4, |u| u.0) as usize
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            // A subscriber that reads keeps everything: by default one session may hold the
            // whole budget, so a fast publisher is slowed to its pace (back-pressure) rather
            // than its messages dropped. Lower these to shield others from a slow reader.
            max_queued_messages: 1_000_000,
            max_queued_bytes: Size(256 * 1024 * 1024),
            memory_budget: Size(256 * 1024 * 1024),
            max_user_bytes: None,
            persistent_session_expiry: None,
            max_session_expiry: None,
        }
    }
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            id: "outpost".into(),
            data_dir: PathBuf::from("/var/lib/outpost"),
            shutdown_timeout: Dur(std::time::Duration::from_secs(5)),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { level: LogLevel::Info }
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            listeners: vec![Listener {
                bind: Bind("127.0.0.1:1883".parse().expect("literal address")),
                protocol: ListenerProtocol::Mqtt,
                tls: None,
                anonymous: None,
            }],
            users: vec![],
            acl: vec![AclRule {
                who: Who::Everyone,
                allow: AclAllow {
                    publish: vec!["#".into()],
                    subscribe: vec!["#".into()],
                },
                deny: AclAllow::default(),
                on: vec![],
            }],
            limits: Limits::default(),
            sessions: Sessions::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            max_packet_size: Size(256 * 1024),
            max_inflight: 100,
            connect_timeout: Dur(std::time::Duration::from_secs(10)),
            max_client_id_len: 256,
            filter_log: None,
        }
    }
}

impl Config {
    /// The built-in default config.
    pub fn builtin() -> Config {
        Config::from_yaml(DEFAULT_YAML, Path::new("<built-in config/outpost.yaml>"))
            .expect("the built-in default config is valid")
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut config: Config = match serde_path_to_error::deserialize(de) {
            Ok(c) => c,
            Err(e) => return Err(ConfigError::from_serde(file, text, e)),
        };
        if !config.dashboard.enabled {
            config.dashboard.bind = None;
        }
        config
            .validate()
            .map_err(|(key, reason)| ConfigError::invalid(file, text, &key, reason))?;
        Ok(config)
    }

    /// Checks what the types alone cannot, and keeps what checking made (each bridge's compiled
    /// rules). Returns the key path and the reason.
    fn validate(&mut self) -> Result<(), (String, String)> {
        // Section by section, in this order: the first error a file gets stays the same.
        validate_gateway(&self.gateway)?;
        validate_dashboard(&self.dashboard, &self.broker)?;
        validate_broker(&self.broker)?;
        devices::validate(&self.devices)?;
        plugs::validate(&self.plugs)?;
        grants::validate(&self.grants)?;
        for i in 0..self.bridges.len() {
            self.bridges[i].compiled = bridges::validate(&self.gateway.id, &self.bridges[i], &self.bridges[..i])
                .map_err(|(k, r)| (format!("bridges[{i}]{k}"), r))?;
        }
        Ok(())
    }
}

/// The key path and the reason, as an `Err`: what each validator below returns.
fn err(key: String, reason: String) -> Result<(), (String, String)> {
    Err((key, reason))
}

/// `gateway`: the id (it names topics and files) and the data folder.
fn validate_gateway(g: &Gateway) -> Result<(), (String, String)> {
    let id = &g.id;
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return err(
            "gateway.id".into(),
            format!("`{id}` must be non-empty and use only letters, digits, `.`, `_` and `-`"),
        );
    }
    if g.data_dir.as_os_str().is_empty() {
        return err("gateway.data_dir".into(), "must not be empty".into());
    }
    Ok(())
}

/// `dashboard`, when it has an address: not open to the network without users, its TLS files,
/// origins and token, and not on a broker listener's address.
fn validate_dashboard(d: &Dashboard, b: &Broker) -> Result<(), (String, String)> {
    let Some(bind) = &d.bind else {
        return Ok(());
    };
    if !bind.0.ip().is_loopback() && b.users.is_empty() {
        return err(
            "dashboard.bind".into(),
            format!(
                "{} is reachable from the network and no users are configured: add broker.users",
                bind.0
            ),
        );
    }
    if let Some(tls) = &d.tls {
        tls.files_readable("dashboard.tls")?;
    }
    for (i, o) in d.origins.iter().enumerate() {
        let ok = (o.starts_with("http://") || o.starts_with("https://"))
            && !o.ends_with('/')
            && o.split("://").nth(1).is_some_and(|h| !h.is_empty() && !h.contains('/'));
        if !ok {
            return err(
                format!("dashboard.origins[{i}]"),
                format!("`{o}` is not a web origin: write scheme://host[:port], e.g. `https://ops.example.com`"),
            );
        }
    }
    if d.token.as_ref().is_some_and(|t| t.len() < 16) {
        return err("dashboard.token".into(), "a token needs at least 16 characters".into());
    }
    if b.listeners.iter().any(|l| l.bind.0 == bind.0 && bind.0.port() != 0) {
        return err(
            "dashboard.bind".into(),
            format!("{} is already a broker listener", bind.0),
        );
    }
    Ok(())
}

/// `broker`: listeners, users, acl, limits, sessions, then the connect timeout (last, as it
/// always was checked).
fn validate_broker(b: &Broker) -> Result<(), (String, String)> {
    validate_listeners(b)?;
    validate_users(&b.users)?;
    validate_acl(b)?;
    validate_limits(&b.limits)?;
    validate_sessions(&b.sessions)?;
    if b.limits.connect_timeout.0.is_zero() {
        return err("broker.limits.connect_timeout".into(), "must be longer than 0".into());
    }
    Ok(())
}

/// `broker.listeners`: at least one; TLS exactly where the protocol needs it; none open to the
/// network by accident; no address twice.
fn validate_listeners(b: &Broker) -> Result<(), (String, String)> {
    if b.listeners.is_empty() {
        return err("broker.listeners".into(), "at least one listener is needed".into());
    }
    for (i, l) in b.listeners.iter().enumerate() {
        let key = format!("broker.listeners[{i}]");
        if l.protocol.needs_tls() && l.tls.is_none() {
            return err(
                format!("{key}.tls"),
                format!("protocol {:?} needs `tls: {{ cert, key }}`", l.protocol).to_lowercase(),
            );
        }
        if !l.protocol.needs_tls() && l.tls.is_some() {
            return err(
                format!("{key}.tls"),
                "TLS settings on a plain listener: use protocol mqtts or wss".into(),
            );
        }
        if let Some(tls) = &l.tls {
            tls.files_readable(&format!("{key}.tls"))?;
        }
        if !l.bind.0.ip().is_loopback() && l.anonymous.is_none() && b.users.is_empty() {
            return err(
                format!("{key}.bind"),
                format!(
                    "{} is reachable from the network and no users are configured: add broker.users, \
                     or set `anonymous: true` on this listener to open it on purpose",
                    l.bind.0
                ),
            );
        }
        if let Some(j) = b.listeners[..i]
            .iter()
            .position(|o| o.bind.0 == l.bind.0 && l.bind.0.port() != 0)
        {
            return err(
                format!("{key}.bind"),
                format!("{} is already used by broker.listeners[{j}]", l.bind.0),
            );
        }
    }
    Ok(())
}

/// `broker.users`: named, each once, with an argon2 hash.
fn validate_users(users: &[User]) -> Result<(), (String, String)> {
    for (i, u) in users.iter().enumerate() {
        let key = format!("broker.users[{i}]");
        if u.name.is_empty() {
            return err(format!("{key}.name"), "must not be empty".into());
        }
        if users[..i].iter().any(|o| o.name == u.name) {
            return err(format!("{key}.name"), format!("user `{}` is listed twice", u.name));
        }
        if let Err(e) = argon2::PasswordHash::new(&u.password_hash) {
            return err(
                format!("{key}.password_hash"),
                format!("not an argon2 PHC string ({e}); make one with `outpost passwd`"),
            );
        }
    }
    Ok(())
}

/// `broker.acl`: each `on` names a listener, each filter is a valid MQTT filter.
fn validate_acl(b: &Broker) -> Result<(), (String, String)> {
    for (i, r) in b.acl.iter().enumerate() {
        let key = format!("broker.acl[{i}]");
        for (j, on) in r.on.iter().enumerate() {
            let addr = on.parse::<std::net::SocketAddr>().ok();
            if !b.listeners.iter().any(|l| Some(l.bind.0) == addr) {
                return err(
                    format!("{key}.on[{j}]"),
                    format!("`{on}` is not the bind address of a listener"),
                );
            }
        }
        for (kind, filters) in [
            ("allow.publish", &r.allow.publish),
            ("allow.subscribe", &r.allow.subscribe),
            ("deny.publish", &r.deny.publish),
            ("deny.subscribe", &r.deny.subscribe),
        ] {
            for (j, f) in filters.iter().enumerate() {
                if !crate::topic::valid_filter(f) {
                    return err(
                        format!("{key}.{kind}[{j}]"),
                        format!("`{f}` is not a valid MQTT topic filter"),
                    );
                }
            }
        }
    }
    Ok(())
}

/// `broker.limits`, but for `connect_timeout` (see [`validate_broker`]).
fn validate_limits(lim: &Limits) -> Result<(), (String, String)> {
    if lim.max_connections == 0 {
        return err("broker.limits.max_connections".into(), "must be at least 1".into());
    }
    if lim.max_packet_size.0 < 64 || lim.max_packet_size.0 > 256 * 1024 * 1024 {
        return err(
            "broker.limits.max_packet_size".into(),
            "must be between 64B and 256MiB (the MQTT maximum)".into(),
        );
    }
    if lim.max_inflight == 0 {
        return err("broker.limits.max_inflight".into(), "must be at least 1".into());
    }
    if lim.filter_log.is_some() {
        return err(
            "broker.limits.filter_log".into(),
            "no longer exists: outpost routes its own messages, and each session's queue is bounded by \
             broker.sessions.max_queued_messages and max_queued_bytes, all queues by broker.sessions.memory_budget; \
             remove this key"
                .into(),
        );
    }
    Ok(())
}

/// `broker.sessions`: the queue bounds, each within the next.
fn validate_sessions(sc: &Sessions) -> Result<(), (String, String)> {
    if sc.max_queued_messages == 0 {
        return err(
            "broker.sessions.max_queued_messages".into(),
            "must be at least 1".into(),
        );
    }
    if sc.max_queued_bytes.0 < 1024 {
        return err(
            "broker.sessions.max_queued_bytes".into(),
            "must be at least 1KiB".into(),
        );
    }
    if sc.memory_budget.0 < sc.max_queued_bytes.0.min(1024 * 1024) {
        return err(
            "broker.sessions.memory_budget".into(),
            "must be at least 1MiB (or max_queued_bytes, if smaller)".into(),
        );
    }
    if sc
        .max_user_bytes
        .is_some_and(|u| u.0 < 1024 || u.0 > sc.memory_budget.0)
    {
        return err(
            "broker.sessions.max_user_bytes".into(),
            "must be at least 1KiB and at most memory_budget".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("t.yaml"))
    }

    #[test]
    fn acl_subjects_are_read_typed_and_a_bad_one_is_named_where_it_stands() {
        let c = parse("broker:\n  acl:\n    - { who: \"user:alice\", allow: { publish: [\"a\"] } }\n").unwrap();
        assert_eq!(c.broker.acl[0].who, Who::User("alice".into()));
        let e = parse("broker:\n  acl:\n    - allow: { publish: [\"#\"] }\n      who: \"client:\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.yaml:4: key `broker.acl[0].who`: `client:` is not a rule subject: \
             use `*`, `anonymous`, `user:*`, `user:NAME` or `client:ID`"
        );
    }

    /// The config is read by every part of the gateway and so depends on none of them: a file
    /// here that names a runtime module brings back a circle (and a check that runs twice).
    #[test]
    fn config_names_no_runtime_module() {
        const RUNTIME: [&str; 8] = [
            "broker",
            "bridge",
            "gateway",
            "dashboard",
            "plugs",
            "devices",
            "grants",
            "provision",
        ];
        fn files(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    files(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut sources = vec![];
        files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config"), &mut sources);
        assert!(sources.len() > 5, "{sources:?}");
        let mut found = vec![];
        for file in &sources {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                for m in RUNTIME {
                    let path = format!("crate::{m}");
                    let named = line
                        .match_indices(&path)
                        .any(|(at, _)| !line[at + path.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_'));
                    if named {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(found.is_empty(), "config names runtime modules:\n{}", found.join("\n"));
    }

    #[test]
    fn builtin_default_matches_the_typed_defaults() {
        let builtin = serde_yaml::to_string(&Config::builtin()).unwrap();
        let typed = serde_yaml::to_string(&Config::default()).unwrap();
        assert_eq!(builtin, typed);
    }

    #[test]
    fn dashboard_off_loopback_needs_users_and_its_own_port() {
        let e = parse("dashboard:\n  bind: \"0.0.0.0:8080\"\n").unwrap_err().to_string();
        assert!(
            e.contains("dashboard.bind") && e.contains("no users are configured"),
            "{e}"
        );
        let e = parse("dashboard:\n  bind: \"127.0.0.1:1883\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dashboard.bind") && e.contains("already a broker listener"),
            "{e}"
        );
        let ok = parse("dashboard:\n  bind: \"127.0.0.1:8080\"\n").unwrap();
        assert_eq!(ok.dashboard.bind.map(|b| b.0.port()), Some(8080));
    }

    #[test]
    fn dashboard_is_on_by_default_on_loopback_and_can_be_turned_off() {
        let c = parse("gateway:\n  id: g\n").unwrap();
        assert_eq!(
            c.dashboard.bind.map(|b| b.0.to_string()).as_deref(),
            Some("127.0.0.1:8080")
        );
        assert!(!c.dashboard.anonymous, "anonymous on /mqtt must be asked for");
        assert_eq!(parse("dashboard:\n  bind: null\n").unwrap().dashboard.bind, None);
        assert_eq!(parse("dashboard:\n  enabled: false\n").unwrap().dashboard.bind, None);
        // Off survives a round trip through YAML (snap-config writes the file back).
        let off = parse("dashboard:\n  bind: null\n").unwrap();
        let again = parse(&serde_yaml::to_string(&off).unwrap()).unwrap();
        assert_eq!(again.dashboard.bind, None);
        let e = parse("dashboard:\n  origins: [\"evil.example\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dashboard.origins[0]"), "{e}");
    }

    #[test]
    fn bridges_keep_their_rules_compiled_as_they_run() {
        let c = parse(
            "gateway:\n  id: g1\nbridges:\n  - name: cloud\n    url: \"mqtt://a\"\n    remote_prefix: \"sites/{gateway.id}/\"\n    \
             rules:\n      - { direction: out, local: \"a/+\", remote: \"up/{1}\" }\n      - { direction: in, local: \"cmd/#\", remote: \"cmd/#\" }\n",
        )
        .unwrap();
        let rules = &c.bridges[0].compiled;
        assert_eq!(rules.len(), 2);
        let out = rules[0].out.as_ref().unwrap();
        assert_eq!(out.map("a/x").as_deref(), Some("sites/g1/up/x"));
        let inbound = rules[1].inbound.as_ref().unwrap();
        assert_eq!(inbound.filter(), "sites/g1/cmd/#");
        assert_eq!(inbound.map("sites/g1/cmd/plug/on").as_deref(), Some("cmd/plug/on"));
    }

    #[test]
    fn bridge_urls_are_checked_one_by_one_and_named_in_errors() {
        let bridge = |addr: &str| {
            format!(
                "bridges:\n  - name: cloud\n{addr}    rules: [{{ direction: out, local: \"a/#\", remote: \"b/{{#}}\" }}]\n"
            )
        };
        let ok = parse(&bridge(
            "    urls: [\"mqtt://a:1883\", \"mqtt://b:1884\"]\n    failover: { fail_back_after: 10s }\n",
        ))
        .unwrap();
        assert_eq!(ok.bridges[0].endpoints(), ["mqtt://a:1883", "mqtt://b:1884"]);
        // A file written back (snap-config) parses to the same bridge.
        let again = parse(&serde_yaml::to_string(&ok).unwrap()).unwrap();
        assert_eq!(again.bridges, ok.bridges);
        for (addr, key, why) in [
            (
                "    urls: [\"mqtt://a\", \"http://b\"]\n",
                "bridges[0].urls[1]",
                "scheme `http`",
            ),
            (
                "    urls: [\"mqtt://a\", \"mqtt://a\"]\n",
                "bridges[0].urls[1]",
                "already urls[0]",
            ),
            (
                "    url: \"mqtt://a\"\n    urls: [\"mqtt://b\"]\n",
                "bridges[0].urls",
                "not both",
            ),
            ("", "bridges[0].url", "needs `url`"),
            (
                "    url: \"mqtt://a\"\n    message_expiry: true\n",
                "bridges[0].message_expiry",
                "protocol: 5",
            ),
            (
                "    url: \"mqtt://a\"\n    backlog: { mark: true }\n",
                "bridges[0].backlog.mark",
                "protocol: 5",
            ),
            (
                "    url: \"mqtt://a\"\n    backlog: { live_frist: true }\n",
                "bridges[0]",
                "live_frist",
            ),
            (
                "    url: \"mqtt://a\"\n    stall_after: 10ms\n",
                "bridges[0].stall_after",
                "at least",
            ),
            (
                "    urls: [\"mqtt://a\", \"mqtts://b\"]\n",
                "bridges[0].urls",
                "mixes TLS",
            ),
            (
                "    urls: [\"mqtt://a\"]\n    failover: { probe: 1s, fail_back_after: 500ms }\n",
                "bridges[0].failover.fail_back_after",
                "at least",
            ),
        ] {
            let e = parse(&bridge(addr)).unwrap_err().to_string();
            assert!(
                e.contains("t.yaml") && e.contains(key) && e.contains(why),
                "{addr}: {e}"
            );
        }
    }

    proptest! {
        // Config is outside input: any text is either a config or an error, never a panic, and
        // an error always names the file.
        #[test]
        fn any_text_parses_or_is_refused_by_name(text in "[ -~\n]{0,200}") {
            if let Err(e) = parse(&text) {
                prop_assert!(e.to_string().starts_with("t.yaml"), "{e}");
            }
        }

        // What outpost writes (e.g. `snap-config`) it reads back as the same config.
        #[test]
        fn written_configs_read_back_the_same(
            port in 1u16..,
            conns in 1u32..100_000,
            packet in 64u64..(1 << 24),
            inflight in 1u16..,
            timeout_ms in 1u64..1_000_000,
            id in "[a-z][a-z0-9-]{0,20}",
        ) {
            let mut c = Config::default();
            c.gateway.id = id;
            c.broker.listeners[0].bind = Bind(format!("127.0.0.1:{port}").parse().unwrap());
            c.broker.limits.max_connections = conns;
            c.broker.limits.max_packet_size = Size(packet);
            c.broker.limits.max_inflight = inflight;
            c.broker.limits.connect_timeout = Dur(std::time::Duration::from_millis(timeout_ms));
            let text = serde_yaml::to_string(&c).unwrap();
            let back = parse(&text).unwrap();
            prop_assert_eq!(serde_yaml::to_string(&back).unwrap(), text);
        }

        // An unknown key anywhere is refused, and the message names it.
        #[test]
        fn unknown_keys_are_named(section in prop::sample::select(vec!["gateway", "log", "broker", "broker.limits"]), key in "[a-z]{3,12}x") {
            let text = match section {
                "broker.limits" => format!("broker:\n  limits:\n    {key}: 1\n"),
                s => format!("{s}:\n  {key}: 1\n"),
            };
            let e = parse(&text).unwrap_err().to_string();
            prop_assert!(e.contains(&format!("unknown field `{key}`")) && e.contains(section), "{e}");
        }
    }
}
