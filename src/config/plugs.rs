//! Config of the WeMo-style smart plugs (the pollers are in `src/plugs/`).

use super::Dur;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Plugs {
    pub discovery: Discovery,
    /// Plugs at known addresses; the port is found by probing when not given (plugs move).
    #[serde(rename = "static")]
    pub statics: Vec<StaticPlug>,
    /// How often each plug is read.
    pub poll: Dur,
    /// Per request to a plug.
    pub timeout: Dur,
    /// The moving average's window, and how often it is published.
    pub average: Dur,
    pub average_every: Dur,
    /// A plug that has not answered for this long is marked offline.
    pub offline_after: Dur,
    pub topics: PlugTopics,
    /// Publish Home Assistant MQTT discovery configs for every plug.
    pub homeassistant: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// SSDP M-SEARCH to the multicast group 239.255.255.250:1900.
    pub ssdp: bool,
    /// Unicast SSDP targets (`host:port`), for networks without multicast (and tests).
    pub targets: Vec<String>,
    pub interval: Dur,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticPlug {
    pub name: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlugTopics {
    pub live: String,
    pub average: String,
    pub state: String,
    pub set: String,
}

impl Default for Plugs {
    fn default() -> Self {
        Plugs {
            discovery: Discovery::default(),
            statics: vec![],
            poll: Dur(Duration::from_millis(500)),
            timeout: Dur(Duration::from_secs(2)),
            average: Dur(Duration::from_secs(60)),
            average_every: Dur(Duration::from_secs(10)),
            offline_after: Dur(Duration::from_secs(10)),
            topics: PlugTopics::default(),
            homeassistant: false,
        }
    }
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            ssdp: false,
            targets: vec![],
            interval: Dur(Duration::from_secs(600)),
        }
    }
}

impl Default for PlugTopics {
    fn default() -> Self {
        PlugTopics {
            live: "sensor/{name}/live".into(),
            average: "sensor/{name}/1m".into(),
            state: "sensor/{name}/state".into(),
            set: "sensor/{name}/set".into(),
        }
    }
}

impl PlugTopics {
    pub fn fill(t: &str, name: &str) -> String {
        t.replace("{name}", name)
    }
}

pub(super) fn validate(p: &Plugs) -> Result<(), (String, String)> {
    let e = |k: String, r: String| Err((format!("plugs.{k}"), r));
    for (k, d) in [
        ("poll", p.poll),
        ("timeout", p.timeout),
        ("average", p.average),
        ("average_every", p.average_every),
        ("offline_after", p.offline_after),
        ("discovery.interval", p.discovery.interval),
    ] {
        if d.0.is_zero() {
            return e(k.into(), "must be longer than 0".into());
        }
    }
    if p.poll.0 < Duration::from_millis(100) {
        return e(
            "poll".into(),
            "must be at least 100ms (plugs crash when polled harder)".into(),
        );
    }
    for (i, t) in p.discovery.targets.iter().enumerate() {
        if t.parse::<std::net::SocketAddr>().is_err() {
            return e(format!("discovery.targets[{i}]"), format!("`{t}` is not IP:PORT"));
        }
    }
    for (i, s) in p.statics.iter().enumerate() {
        if plug_slug(&s.name) != s.name {
            return e(
                format!("static[{i}].name"),
                format!("`{}` must be lower case letters, digits and `-`", s.name),
            );
        }
        if s.host.parse::<std::net::IpAddr>().is_err() {
            return e(
                format!("static[{i}].host"),
                format!("`{}` is not an IP address (plugs answer 500 to host names)", s.host),
            );
        }
        if p.statics[..i].iter().any(|o| o.name == s.name) {
            return e(format!("static[{i}].name"), format!("`{}` is listed twice", s.name));
        }
    }
    for (k, t) in [
        ("live", &p.topics.live),
        ("average", &p.topics.average),
        ("state", &p.topics.state),
        ("set", &p.topics.set),
    ] {
        if !t.contains("{name}") || !crate::topic::valid_topic(&PlugTopics::fill(t, "x")) {
            return e(
                format!("topics.{k}"),
                format!("`{t}` must be a topic with `{{name}}` in it"),
            );
        }
    }
    Ok(())
}

/// A plug name fit for a topic level: lower case, `-` for anything else. Discovery names the
/// plugs it finds with it; a static plug's name must already be one.
pub fn plug_slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "plug".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::plug_slug;

    #[test]
    fn slugs_fit_a_topic_level() {
        assert_eq!(plug_slug("Living Room Lamp"), "living-room-lamp");
        assert_eq!(plug_slug("  #+/ "), "plug");
        assert_eq!(plug_slug("kettle-2"), "kettle-2");
    }
}
