//! The device keystore: one JSON file under `data_dir` (mode 0600, written atomically, locked
//! while changed), holding each device's e2e key and MQTT credentials. Its `format` number lets
//! older and newer outpost read it: fields added later are ignored by older readers, and a file
//! from a newer major format is refused with a clear message rather than misread.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Keystore {
    pub format: u32,
    pub devices: Vec<Device>,
    /// Fields a newer outpost wrote: kept as they are when this one rewrites the file.
    #[serde(flatten)]
    pub later: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Deserialize, Serialize, PartialEq)]
pub struct Device {
    /// `[a-z0-9_-]+`; also the device's MQTT user name.
    pub id: String,
    /// The 16-byte AES-128 key, hex.
    pub key: String,
    /// The device's MQTT password (the file is as secret as the keys it holds).
    pub password: String,
    /// Seconds since the epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
    /// Set once the device proved over the provisioning link that it holds the key.
    #[serde(default)]
    pub provisioned: bool,
    /// The hardware id the device gave when it was last provisioned (bound into that exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_id: Option<String>,
    /// Seconds since the epoch of the last successful provisioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned_at: Option<u64>,
    /// Provisioning attempts in a row in which the pairing code was tried and not proven (reset
    /// by a success); each makes the gateway wait longer before the next ([`pairing_delay`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pairing_failures: u32,
    /// Seconds since the epoch of the last of those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pairing_failure: Option<u64>,
    /// Fields a newer outpost wrote, kept on rewrite.
    #[serde(flatten, default)]
    pub later: serde_json::Map<String, serde_json::Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Longest wait between provisioning attempts for one device.
pub const MAX_PAIRING_DELAY: u64 = 3600;

/// Seconds to wait before the next provisioning attempt for `d` is allowed: 2^n after n
/// failures in a row (2, 4, 8, ... up to an hour); `None` when it may start now.
pub fn pairing_delay(d: &Device, now: u64) -> Option<u64> {
    if d.pairing_failures == 0 {
        return None;
    }
    let delay = 1u64
        .checked_shl(d.pairing_failures.min(63))
        .unwrap_or(u64::MAX)
        .min(MAX_PAIRING_DELAY);
    let until = d.last_pairing_failure.unwrap_or(0).saturating_add(delay);
    (now < until).then(|| until - now)
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

impl Device {
    pub fn key_bytes(&self) -> Result<super::e2e::Key> {
        parse_key(&self.key).with_context(|| format!("device {}", self.id))
    }

    pub fn topic_base(&self) -> Result<String> {
        Ok(super::e2e::topic_base(&self.key_bytes()?))
    }
}

/// A key written as 32 hex digits.
pub fn parse_key(hex: &str) -> Result<super::e2e::Key> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<_>>()
        .context("key is not hex")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("key is not 16 bytes"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

use crate::system::clock::now_secs;

/// A new key and password.
pub fn secrets() -> (String, String) {
    let key: [u8; 16] = rand::random();
    let pw: [u8; 18] = rand::random();
    (hex(&key), hex(&pw))
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("devices.json")
}

/// Reads the keystore; a missing file is an empty one.
pub fn load(path: &Path) -> Result<Keystore> {
    let ks: Keystore = crate::system::jsonfile::load(path)?;
    if ks.format > FORMAT {
        bail!(
            "{} was written by a newer outpost (format {}; this one reads up to {FORMAT})",
            path.display(),
            ks.format
        );
    }
    Ok(ks)
}

/// Changes the keystore under an exclusive lock and writes it back atomically.
pub fn update<T>(path: &Path, change: impl FnOnce(&mut Keystore) -> Result<T>) -> Result<T> {
    crate::system::jsonfile::update(path, load, |ks: &mut Keystore| {
        ks.format = FORMAT;
        change(ks)
    })
}

/// Adds a device with a fresh key and password.
pub fn add(path: &Path, id: &str) -> Result<Device> {
    if !valid_id(id) {
        bail!("device id `{id}` must be 1-64 characters of a-z, 0-9, - and _");
    }
    update(path, |ks| {
        if ks.devices.iter().any(|d| d.id == id) {
            bail!("device `{id}` already exists (use `outpost devices rotate {id}` for a new key)");
        }
        let (key, password) = secrets();
        let d = Device {
            id: id.to_string(),
            key,
            password,
            created: now_secs(),
            rotated: None,
            revoked: false,
            provisioned: false,
            hardware_id: None,
            provisioned_at: None,
            pairing_failures: 0,
            last_pairing_failure: None,
            later: Default::default(),
        };
        ks.devices.push(d.clone());
        Ok(d)
    })
}

/// A new key and password for a device (it must be provisioned again).
pub fn rotate(path: &Path, id: &str) -> Result<Device> {
    update(path, |ks| {
        let d = ks
            .devices
            .iter_mut()
            .find(|d| d.id == id)
            .with_context(|| format!("no device `{id}`"))?;
        let (key, password) = secrets();
        d.key = key;
        d.password = password;
        d.rotated = Some(now_secs());
        d.revoked = false;
        d.provisioned = false;
        Ok(d.clone())
    })
}

pub fn revoke(path: &Path, id: &str) -> Result<()> {
    update(path, |ks| {
        let d = ks
            .devices
            .iter_mut()
            .find(|d| d.id == id)
            .with_context(|| format!("no device `{id}`"))?;
        d.revoked = true;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn add_rotate_revoke_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let d = add(&p, "kitchen").unwrap();
        assert_eq!(d.key.len(), 32);
        assert!(add(&p, "kitchen").unwrap_err().to_string().contains("already exists"));
        assert!(add(&p, "Bad Id").is_err());
        let r = rotate(&p, "kitchen").unwrap();
        assert_ne!(r.key, d.key);
        revoke(&p, "kitchen").unwrap();
        let ks = load(&p).unwrap();
        assert!(ks.devices[0].revoked && ks.format == FORMAT);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!p.with_extension("json.tmp").exists());
    }

    #[test]
    fn newer_formats_are_refused_and_unknown_fields_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        std::fs::write(&p, r#"{"format": 1, "devices": [], "later_field": 3}"#).unwrap();
        assert!(load(&p).is_ok());
        // ... and kept when this version rewrites the file.
        add(&p, "x").unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("later_field"));
        std::fs::write(&p, r#"{"format": 2, "devices": []}"#).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("newer outpost"));
    }

    /// The previous release's `Device`, as it was: no provisioning fields of its own.
    #[derive(Deserialize, Serialize)]
    struct PreviousDevice {
        id: String,
        key: String,
        password: String,
        created: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotated: Option<u64>,
        #[serde(default)]
        revoked: bool,
        #[serde(default)]
        provisioned: bool,
        #[serde(flatten, default)]
        later: serde_json::Map<String, serde_json::Value>,
    }

    #[test]
    fn provisioning_fields_survive_the_previous_loader_and_old_files_load() {
        // A file of the previous release loads, with the new fields empty.
        let old =
            r#"{"id":"a","key":"762e4c1dc0a7d8b60e61bc68dc858bee","password":"p","created":1,"provisioned":true}"#;
        let d: Device = serde_json::from_str(old).unwrap();
        assert_eq!((d.hardware_id.clone(), d.pairing_failures), (None, 0));
        // What this one writes, the previous one reads and writes back with the fields kept.
        let mut d = d;
        d.hardware_id = Some("esp32-c3-0042".into());
        d.provisioned_at = Some(5);
        d.pairing_failures = 2;
        d.last_pairing_failure = Some(7);
        let prev: PreviousDevice = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert!(prev.provisioned && prev.later.contains_key("hardware_id"));
        let back: Device = serde_json::from_str(&serde_json::to_string(&prev).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn the_pairing_delay_doubles_and_is_capped() {
        let mut d: Device = serde_json::from_str(r#"{"id":"a","key":"","password":"","created":0}"#).unwrap();
        assert_eq!(pairing_delay(&d, 100), None);
        d.last_pairing_failure = Some(100);
        for (n, wait) in [(1, 2), (2, 4), (3, 8), (11, 2048), (12, 3600), (40, 3600)] {
            d.pairing_failures = n;
            assert_eq!(pairing_delay(&d, 100), Some(wait), "{n}");
        }
        d.pairing_failures = 1;
        assert_eq!(pairing_delay(&d, 102), None);
    }
}
