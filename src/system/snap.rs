//! `snap set outpost ...` → the YAML config, with the daemon's own types and validation.
//!
//! The snap's hooks run `outpost snap-config --from-snapctl`, which asks `snapctl get -d` for
//! every top-level key of [`Config`] ([`keys`]: the one list, taken from the type). Keys are kebab-case (snapd allows no
//! underscores); `bridges`, `broker.users` and `plugs.static` may be written as maps keyed by
//! name (`bridges.cloud.url=...`) as well as lists. A bad value is refused naming the `snap set`
//! key, and the config file is left as it was.

use crate::config::Config;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The top-level keys `snap set` can set, as snapctl names them: every field of [`Config`]
/// (each is serialized, so the type's serialization is the list).
pub fn keys() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(Value::Object(m)) => m.keys().map(|k| k.replace('_', "-")).collect(),
        _ => unreachable!("Config serializes to a map"),
    }
}

/// `snapctl get -d <every key>`: the JSON document of what is set. A snapctl that fails is
/// an error (with its exit status and message), never an empty document.
pub fn from_snapctl() -> Result<String, String> {
    let out = std::process::Command::new("snapctl")
        .args(["get", "-d"])
        .args(keys())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run snapctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "snapctl get failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("snapctl gave no text: {e}"))
}

/// Where a command run inside the snap finds the daemon: `snap run` sets `$SNAP`, `$SNAP_DATA`
/// (the config the hooks write) and `$SNAP_COMMON` (the default data_dir).
pub struct SnapEnv {
    pub data: PathBuf,
    pub common: PathBuf,
}

impl SnapEnv {
    pub fn from_env() -> Option<SnapEnv> {
        std::env::var_os("SNAP")?;
        Some(SnapEnv {
            data: std::env::var_os("SNAP_DATA")?.into(),
            common: std::env::var_os("SNAP_COMMON")?.into(),
        })
    }

    /// The config the snap's daemon runs with.
    pub fn config(&self) -> PathBuf {
        self.data.join("outpost.yaml")
    }
}

/// Addresses a value names that this host does not have (`bind` on `IP:0` fails): such a value
/// would pass the types and then keep the daemon from starting.
fn unbindable(config: &Config) -> Option<(String, String)> {
    let listeners = config
        .broker
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("broker.listeners[{i}].bind"), l.bind.0));
    let dashboard = config
        .dashboard
        .bind
        .iter()
        .map(|b| ("dashboard.bind".to_string(), b.0));
    for (key, addr) in listeners.chain(dashboard) {
        if let Err(e) = std::net::TcpListener::bind((addr.ip(), 0)) {
            if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                return Some((key, format!("{} is not an address of this host ({e})", addr.ip())));
            }
        }
    }
    None
}

/// Lists that `snap set` can also write as maps keyed by their items' `name`.
const NAMED_LISTS: [&[&str]; 3] = [&["bridges"], &["broker", "users"], &["plugs", "static"]];

/// kebab-case keys to the config's snake_case; the names of named-list entries (`bridges.cloud-1`)
/// are names, not keys, and stay as written.
fn snake(v: Value, path: &mut Vec<String>) -> Value {
    let named = NAMED_LISTS
        .iter()
        .any(|l| l.len() == path.len() && l.iter().zip(path.iter()).all(|(a, b)| *a == b));
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = if named { k } else { k.replace('-', "_") };
                    path.push(key.clone());
                    let v = snake(v, path);
                    path.pop();
                    (key, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| snake(v, &mut vec!["[]".into()])).collect()),
        v => v,
    }
}

/// Turns `{name: {...}}` maps into lists of `{name, ...}`; returns the names in list order,
/// per list, to name keys in errors.
fn lists(root: &mut Value) -> Vec<(String, Vec<String>)> {
    let mut names = vec![];
    for path in NAMED_LISTS {
        let Some(node) = root.pointer_mut(&format!("/{}", path.join("/"))) else {
            continue;
        };
        if let Value::Object(m) = node {
            let mut items = vec![];
            let mut order = vec![];
            for (name, v) in std::mem::take(m) {
                let mut item = match v {
                    Value::Object(o) => o,
                    other => {
                        let mut o = Map::new();
                        o.insert("value".into(), other);
                        o
                    }
                };
                item.entry("name").or_insert(Value::String(name.clone()));
                order.push(name);
                items.push(Value::Object(item));
            }
            *node = Value::Array(items);
            names.push((path.join("."), order));
        }
    }
    names
}

/// The `snap set` key for a config key path: `bridges[0].max_packet_size` → `bridges.cloud.max-packet-size`.
fn snap_key(path: &str, names: &[(String, Vec<String>)]) -> String {
    let mut key = path.to_string();
    for (list, order) in names {
        for (i, n) in order.iter().enumerate() {
            key = key.replace(&format!("{list}[{i}]"), &format!("{list}.{n}"));
        }
    }
    key.replace('_', "-")
}

/// What a configure run did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

/// Validates `snapctl get -d` JSON and writes it as YAML to `out` (atomically), unless it is
/// what is there already. `common` is `$SNAP_COMMON`, the default data_dir.
pub fn apply(json: &str, out: &Path, common: Option<&Path>) -> Result<Outcome, String> {
    let v: Value = if json.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(json).map_err(|e| format!("snapctl gave no JSON: {e}"))?
    };
    let mut v = snake(v, &mut vec![]);
    let names = lists(&mut v);
    if let (Some(common), Value::Object(root)) = (common, &mut v) {
        let gw = root.entry("gateway").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(gw) = gw {
            gw.entry("data_dir")
                .or_insert(Value::String(common.display().to_string()));
        }
    }
    let yaml = serde_yaml::to_string(&v).map_err(|e| e.to_string())?;
    let config = Config::from_yaml(&yaml, Path::new("snap set")).map_err(|e| match e.key() {
        Some(k) => {
            let reason = e.to_string();
            let reason = reason
                .split_once(": key `")
                .and_then(|(_, r)| r.split_once("`: "))
                .map(|(_, r)| r.to_string())
                .unwrap_or(reason);
            format!("snap set outpost: `{}`: {reason}", snap_key(k, &names))
        }
        None => e.to_string(),
    })?;
    if let Some((key, reason)) = unbindable(&config) {
        return Err(format!("snap set outpost: `{}`: {reason}", snap_key(&key, &names)));
    }
    // What the daemon reads back is exactly what was validated.
    let text = format!(
        "# Written by `outpost snap-config` from `snap set` values; edits here are overwritten.\n{}",
        serde_yaml::to_string(&config).map_err(|e| e.to_string())?
    );
    if std::fs::read_to_string(out).ok().as_deref() == Some(text.as_str()) {
        return Ok(Outcome::Unchanged);
    }
    super::jsonfile::replace(out, text.as_bytes()).map_err(|e| format!("writing {}: {e:#}", out.display()))?;
    Ok(Outcome::Changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snap_values_become_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outpost.yaml");
        let json = r#"{"gateway":{"id":"site1"},"broker":{"limits":{"max-connections":50}},
            "dashboard":{"bind":"127.0.0.1:8080"},
            "bridges":{"cloud-1":{"url":"mqtt://127.0.0.1:1883","rules":[{"direction":"out","local":"a/#","remote":"b/{#}"}],"max-packet-size":"64KiB"}}}"#;
        assert_eq!(
            apply(json, &out, Some(Path::new("/var/snap/outpost/common"))).unwrap(),
            Outcome::Changed
        );
        let c = Config::load(&out).unwrap();
        assert_eq!((c.gateway.id.as_str(), c.broker.limits.max_connections), ("site1", 50));
        assert_eq!(c.bridges[0].name, "cloud-1", "names stay as written");
        assert_eq!(
            c.dashboard.bind.map(|b| b.0.to_string()).as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(c.gateway.data_dir, Path::new("/var/snap/outpost/common"));
        assert_eq!(
            apply(json, &out, Some(Path::new("/var/snap/outpost/common"))).unwrap(),
            Outcome::Unchanged
        );
    }

    #[test]
    fn keys_are_every_field_the_config_accepts() {
        // serde's own list of accepted fields, from refusing an unknown one.
        let e = serde_json::from_str::<Config>(r#"{"no-such-key": 1}"#)
            .unwrap_err()
            .to_string();
        let accepted: Vec<String> = e
            .split("expected one of ")
            .nth(1)
            .unwrap()
            .split(", ")
            .map(|k| k.trim_matches(|c: char| c == '`' || !c.is_ascii_graphic()).to_string())
            .map(|k| k.split('`').next().unwrap().replace('_', "-"))
            .collect();
        let mut keys = keys();
        keys.sort();
        let mut accepted = accepted;
        accepted.sort();
        assert_eq!(keys, accepted);
        assert!(keys.contains(&"dashboard".to_string()) && keys.contains(&"provisioning".to_string()));
    }

    #[test]
    fn an_address_the_host_lacks_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outpost.yaml");
        // 192.0.2.0/24 is TEST-NET-1: on no host's interfaces.
        let e = apply(
            r#"{"broker":{"listeners":[{"bind":"192.0.2.7:1883","protocol":"mqtt","anonymous":true}]}}"#,
            &out,
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("`broker.listeners[0].bind`") && e.contains("not an address of this host"),
            "{e}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn bad_values_name_the_snap_key_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outpost.yaml");
        std::fs::write(&out, "old").unwrap();
        let cases = [
            (
                r#"{"bridges":{"cloud":{"url":"http://x","rules":[{"direction":"out","local":"a","remote":"b"}]}}}"#,
                "bridges.cloud.url",
            ),
            (
                r#"{"broker":{"limits":{"max-connections":"many"}}}"#,
                "broker.limits.max-connections",
            ),
            (r#"{"plugs":{"poll":"fast"}}"#, "plugs.poll"),
            (r#"{"broker":{"listners":[]}}"#, "broker.listners"),
            (r#"{"dashboard":{"bind":"0.0.0.0:8080"}}"#, "dashboard.bind"),
        ];
        for (json, key) in cases {
            let e = apply(json, &out, None).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
    }
}
