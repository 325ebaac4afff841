//! Config of the device service (the service is in `src/devices/`).

use super::{Dur, Size};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Devices {
    /// mqtt-e2e: accept packets whose timestamp is within this much of our clock.
    pub window: Dur,
    /// mqtt-e2e: messages shorter than this are zero-padded (hides their length).
    pub pad: usize,
    /// mqtt-e2e additional authenticated data; both sides must use the same.
    pub aad: String,
    /// Larger e2e packets are refused before decryption.
    pub max_packet: Size,
    /// Under a device's topic base: where it publishes (`<base>/<device_topic>/...`).
    pub device_topic: String,
    /// Under a device's topic base: where outpost sends it commands.
    pub controller_topic: String,
    /// What devices may publish; `{id}` is the device id, `{base}` its e2e topic base.
    pub publish: Vec<String>,
    /// What devices may subscribe to.
    pub subscribe: Vec<String>,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            window: Dur(Duration::from_secs(15)),
            pad: 50,
            aad: "1234567812345678".into(),
            max_packet: Size(1024),
            device_topic: "iot".into(),
            controller_topic: "controller".into(),
            publish: vec!["{base}/#".into(), "devices/{id}/#".into()],
            subscribe: vec!["{base}/#".into(), "devices/{id}/cmd/#".into()],
        }
    }
}

pub(super) fn validate(d: &Devices) -> Result<(), (String, String)> {
    let e = |k: &str, r: String| Err((format!("devices.{k}"), r));
    if d.window.0.is_zero() {
        return e("window", "must be longer than 0".into());
    }
    if d.max_packet.0 < 31 {
        return e(
            "max_packet",
            "must be at least 31 bytes (an empty mqtt-e2e packet)".into(),
        );
    }
    for (k, t) in [
        ("device_topic", &d.device_topic),
        ("controller_topic", &d.controller_topic),
    ] {
        if t.is_empty() || !crate::topic::valid_topic(t) || t.starts_with('$') {
            return e(k, format!("`{t}` is not a topic name"));
        }
    }
    for (k, list) in [("publish", &d.publish), ("subscribe", &d.subscribe)] {
        for (i, f) in list.iter().enumerate() {
            let probe = f.replace("{id}", "x").replace("{base}", "x");
            if !crate::topic::valid_filter(&probe) {
                return e(&format!("{k}[{i}]"), format!("`{f}` is not a topic filter"));
            }
        }
    }
    Ok(())
}
