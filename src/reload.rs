//! Reload on SIGHUP: the new config is compared with the one in force section by section; the
//! sections that can change live (broker users and ACLs, bridges) are prepared in full, then
//! put in force together, or not at all; the others are reported as needing a restart, by key.
//!
//! [`compare`] is pure (config in, [`ReloadReport`] out); [`reload`] does the apply.

use crate::bridge::Bridges;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use std::fmt;
use std::path::{Path, PathBuf};

/// A part of the config that is applied (or not) as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Gateway,
    Log,
    Listeners,
    Limits,
    Sessions,
    Users,
    Acl,
    Bridges,
    Devices,
    Plugs,
    Grants,
    Provisioning,
    Dashboard,
}

/// What a reload can do with a changed section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Put in force by the reload.
    Live,
    /// Read once at start; the reason says by what.
    Restart(&'static str),
}

impl Section {
    pub const ALL: [Section; 13] = [
        Section::Gateway,
        Section::Log,
        Section::Listeners,
        Section::Limits,
        Section::Sessions,
        Section::Users,
        Section::Acl,
        Section::Bridges,
        Section::Devices,
        Section::Plugs,
        Section::Grants,
        Section::Provisioning,
        Section::Dashboard,
    ];

    /// Its key path in the config file.
    pub fn key(self) -> &'static str {
        match self {
            Section::Gateway => "gateway",
            Section::Log => "log",
            Section::Listeners => "broker.listeners",
            Section::Limits => "broker.limits",
            Section::Sessions => "broker.sessions",
            Section::Users => "broker.users",
            Section::Acl => "broker.acl",
            Section::Bridges => "bridges",
            Section::Devices => "devices",
            Section::Plugs => "plugs",
            Section::Grants => "grants",
            Section::Provisioning => "provisioning",
            Section::Dashboard => "dashboard",
        }
    }

    pub fn apply(self) -> Apply {
        match self {
            Section::Users | Section::Acl | Section::Bridges => Apply::Live,
            Section::Gateway => Apply::Restart("the id names every topic and data_dir holds the open stores"),
            Section::Log => Apply::Restart("the log level is set when the process starts"),
            Section::Listeners => Apply::Restart("listeners are bound at start"),
            Section::Limits => Apply::Restart("the broker's limits are fixed at start"),
            Section::Sessions => Apply::Restart("session queues are sized at start"),
            Section::Devices => Apply::Restart("the device service reads it at start"),
            Section::Plugs => Apply::Restart("plug polling is started at start"),
            Section::Grants => Apply::Restart("the grant service reads it at start"),
            Section::Provisioning => Apply::Restart("the provisioning service reads it at start"),
            Section::Dashboard => Apply::Restart("the dashboard is bound and set up at start"),
        }
    }

    /// This section of `c`, as the file would say it.
    fn value(self, c: &serde_json::Value) -> &serde_json::Value {
        let mut v = c;
        for part in self.key().split('.') {
            v = &v[part];
        }
        v
    }
}

/// A section that differs, with the keys that do (`broker.listeners[0].bind`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    pub section: Section,
    pub keys: Vec<String>,
}

/// What a reload found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed and put in force.
    pub applied: Vec<Changed>,
    /// Changed, not in force until a restart, and why.
    pub needs_restart: Vec<(Changed, &'static str)>,
}

impl ReloadReport {
    pub fn unchanged(&self) -> bool {
        self.applied.is_empty() && self.needs_restart.is_empty()
    }

    fn applies(&self, s: Section) -> bool {
        self.applied.iter().any(|c| c.section == s)
    }
}

/// At most this many keys are named per section; the rest are counted.
const KEYS_NAMED: usize = 4;

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unchanged() {
            return f.write_str("no change");
        }
        let applied: Vec<&str> = self.applied.iter().map(|c| c.section.key()).collect();
        match applied.is_empty() {
            true => f.write_str("applied nothing")?,
            false => write!(f, "applied {}", applied.join(", "))?,
        }
        if self.needs_restart.is_empty() {
            return Ok(());
        }
        f.write_str("; changed but need a restart: ")?;
        for (i, (c, why)) in self.needs_restart.iter().enumerate() {
            let mut keys = c.keys[..c.keys.len().min(KEYS_NAMED)].join(", ");
            if c.keys.len() > KEYS_NAMED {
                keys.push_str(&format!(" and {} more", c.keys.len() - KEYS_NAMED));
            }
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{keys} ({why})")?;
        }
        Ok(())
    }
}

/// Compares `new` with `running`, section by section, key by key.
pub fn compare(running: &Config, new: &Config) -> ReloadReport {
    let (old, new) = (as_json(running), as_json(new));
    let mut report = ReloadReport::default();
    for section in Section::ALL {
        let mut keys = vec![];
        diff(section.key(), section.value(&old), section.value(&new), &mut keys);
        if keys.is_empty() {
            continue;
        }
        let changed = Changed { section, keys };
        match section.apply() {
            Apply::Live => report.applied.push(changed),
            Apply::Restart(why) => report.needs_restart.push((changed, why)),
        }
    }
    report
}

/// The config as the file says it (compiled bridge rules, which follow from it, left out).
fn as_json(c: &Config) -> serde_json::Value {
    serde_json::to_value(c).expect("a config serializes")
}

/// The key paths under `key` where `a` and `b` differ; a list that grew or shrank names the
/// items added or removed.
fn diff(key: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::{Array, Null, Object};
    match (a, b) {
        _ if a == b => {}
        (Object(x), Object(y)) => {
            let mut names: Vec<&String> = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))).collect();
            names.sort();
            for n in names {
                let (va, vb) = (x.get(n).unwrap_or(&Null), y.get(n).unwrap_or(&Null));
                diff(&format!("{key}.{n}"), va, vb, out);
            }
        }
        (Array(x), Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let (va, vb) = (x.get(i).unwrap_or(&Null), y.get(i).unwrap_or(&Null));
                diff(&format!("{key}[{i}]"), va, vb, out);
            }
        }
        _ => out.push(key.to_string()),
    }
}

/// Where a reload reads its config from: the file, and the `--data-dir` given on the command
/// line, which overrides the file's `gateway.data_dir` at every read, as at start.
pub struct Source {
    pub path: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
}

impl Source {
    fn load(&self, path: &Path) -> Result<Config, ConfigError> {
        let mut c = Config::load(path)?;
        if let Some(d) = &self.data_dir {
            c.gateway.data_dir = d.clone();
        }
        Ok(c)
    }
}

/// How a reload ended.
#[derive(Debug)]
pub enum Outcome {
    /// No config file: the built-in config has nothing to re-read.
    BuiltIn,
    /// The file did not load or validate; nothing changed.
    Refused(ConfigError),
    /// A live section could not be prepared; nothing changed.
    Failed(Section, anyhow::Error),
    /// Compared, and what could change live did.
    Done(ReloadReport),
}

/// Re-reads the config and applies what can change live, all of it or none. `running` is the
/// config in force, and is brought up to date with what was applied (sections that need a
/// restart keep their running values, so they are reported again until the restart).
///
/// Two-phase: every fallible step (opening new bridges' spools, building their taps and
/// links; the policy is built from a validated config and cannot fail) runs before anything
/// running is touched. The commit (swap the policy, swap the taps, stop replaced bridges,
/// start new ones) cannot fail. It is not one atomic instant: the policy and the taps are two
/// swaps, so a message entering between them meets the new policy and the old taps.
pub async fn reload(source: &Source, running: &mut Config, broker: &Broker, bridges: &mut Bridges) -> Outcome {
    let Some(path) = &source.path else {
        return Outcome::BuiltIn;
    };
    let new = match source.load(path) {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e),
    };
    let report = compare(running, &new);
    // The gateway section waits for a restart; what applies now must follow the one in force.
    let new = match new.gateway.id == running.gateway.id {
        true => new,
        false => match under_running_gateway(&new, running, path) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e),
        },
    };
    let plan = if report.applies(Section::Bridges) {
        match bridges.prepare(&new.bridges).await {
            Ok(p) => Some(p),
            Err(e) => return Outcome::Failed(Section::Bridges, e),
        }
    } else {
        None
    };
    if report.applies(Section::Users) || report.applies(Section::Acl) {
        broker.reload(&new);
        running.broker.users = new.broker.users;
        running.broker.acl = new.broker.acl;
    }
    if let Some(plan) = plan {
        bridges.commit(plan).await;
        running.bridges = new.bridges;
    }
    Outcome::Done(report)
}

/// `new` with the running `gateway` section, read again so that bridges' rules are compiled
/// with the gateway id in force (`{gateway.id}` in their topics), not the one a restart brings.
fn under_running_gateway(new: &Config, running: &Config, path: &Path) -> Result<Config, ConfigError> {
    let mut c = new.clone();
    c.gateway = running.gateway.clone();
    let text = serde_yaml::to_string(&c).expect("a config serializes");
    Config::from_yaml(&text, path)
}

/// Logs the outcome in one line and tells systemd (READY=1 with a STATUS= that says it).
pub fn report(source: &Source, outcome: &Outcome) {
    let file = source
        .path
        .as_deref()
        .map_or_else(String::new, |p| p.display().to_string());
    let status = match outcome {
        Outcome::BuiltIn => {
            log::info!("SIGHUP: running on the built-in config, nothing to reload");
            "serving (built-in config, nothing to reload)".to_string()
        }
        Outcome::Refused(e) => {
            log::error!("reload refused, keeping the running config: {e}");
            "serving (reload refused: the running config stays)".to_string()
        }
        Outcome::Failed(section, e) => {
            log::error!(
                "reload failed, nothing applied, keeping the running config: {}: {e:#}",
                section.key()
            );
            format!("serving (reload failed at {}: the running config stays)", section.key())
        }
        Outcome::Done(r) => {
            log::info!("reloaded {file}: {r}");
            format!("serving (reloaded: {r})")
        }
    };
    crate::system::notify::ready(&status);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_yaml(text, Path::new("t.yaml")).unwrap()
    }

    const BASE: &str = "broker:\n  listeners:\n    - { bind: \"127.0.0.1:1883\", protocol: mqtt }\n";

    #[test]
    fn the_same_config_is_no_change() {
        let r = compare(&parse(BASE), &parse(BASE));
        assert!(r.unchanged());
        assert_eq!(r.to_string(), "no change");
    }

    #[test]
    fn a_listener_change_needs_a_restart_and_names_its_key() {
        let new = parse(&BASE.replace("1883", "1884"));
        let r = compare(&parse(BASE), &new);
        assert!(r.applied.is_empty());
        assert_eq!(r.needs_restart.len(), 1);
        let (c, _) = &r.needs_restart[0];
        assert_eq!(c.section, Section::Listeners);
        assert_eq!(c.keys, ["broker.listeners[0].bind"]);
        assert_eq!(
            r.to_string(),
            "applied nothing; changed but need a restart: broker.listeners[0].bind (listeners are bound at start)"
        );
    }

    #[test]
    fn policy_and_bridges_are_live_and_the_rest_is_sorted_by_section() {
        let new = parse(&format!(
            "{BASE}  acl: []\n  limits: {{ max_connections: 5 }}\nlog: {{ level: debug }}\n\
             bridges:\n  - {{ name: up, url: \"mqtt://a\", rules: [{{ direction: out, local: \"a/#\", remote: \"a/{{#}}\" }}] }}\n"
        ));
        let r = compare(&parse(BASE), &new);
        let applied: Vec<Section> = r.applied.iter().map(|c| c.section).collect();
        assert_eq!(applied, [Section::Acl, Section::Bridges]);
        assert_eq!(r.applied[1].keys, ["bridges[0]"]);
        let restart: Vec<Section> = r.needs_restart.iter().map(|(c, _)| c.section).collect();
        assert_eq!(restart, [Section::Log, Section::Limits]);
        assert_eq!(r.needs_restart[1].0.keys, ["broker.limits.max_connections"]);
    }

    #[test]
    fn bridges_applied_beside_a_new_gateway_id_keep_the_running_id() {
        let bridge = "bridges:\n  - { name: up, url: \"mqtt://a\", remote_prefix: \"sites/{gateway.id}/\", \
                      rules: [{ direction: out, local: \"a/#\", remote: \"a/{#}\" }] }\n";
        let running = parse(&format!("gateway: {{ id: old }}\n{BASE}"));
        let new = parse(&format!("gateway: {{ id: new }}\n{BASE}{bridge}"));
        let r = compare(&running, &new);
        assert_eq!(r.needs_restart[0].0.keys, ["gateway.id"]);
        let c = under_running_gateway(&new, &running, Path::new("t.yaml")).unwrap();
        assert_eq!(c.gateway.id, "old");
        let out = c.bridges[0].compiled[0].out.as_ref().unwrap();
        assert_eq!(out.map("a/x").as_deref(), Some("sites/old/a/x"));
    }
}
