//! Out-of-band provisioning: hands a device its id, e2e key and MQTT settings over a link the
//! attacker is not on (UART or BLE), with the protocol of docs/provisioning.md, and marks the
//! device provisioned in the keystore once it proved it holds the key.

pub mod ble;
pub mod protocol;
pub mod service;
pub mod uart;

use crate::config::Config;
use crate::devices::keystore;
use anyhow::{Context, Result};
use protocol::{Bundle, E2eSettings, MqttSettings, Transport, Wifi};
use std::path::Path;

/// What the bundle says about where to connect, when the operator does not say.
fn mqtt_settings(cfg: &Config, host: Option<&str>) -> (String, u16, bool) {
    let l = cfg
        .broker
        .listeners
        .iter()
        .find(|l| !l.bind.0.ip().is_loopback())
        .or(cfg.broker.listeners.first());
    let (ip, port, tls) = l.map_or(("127.0.0.1".to_string(), 1883, false), |l| {
        (l.bind.0.ip().to_string(), l.bind.0.port(), l.protocol.needs_tls())
    });
    (host.map(str::to_string).unwrap_or(ip), port, tls)
}

pub fn bundle_for(cfg: &Config, d: &keystore::Device, host: Option<&str>, wifi: Option<Wifi>) -> Result<Bundle> {
    let base = d.topic_base()?;
    let (host, port, tls) = mqtt_settings(cfg, host);
    let e = &cfg.devices;
    Ok(Bundle {
        version: 1,
        id: d.id.clone(),
        key: d.key.clone(),
        mqtt: MqttSettings {
            host,
            port,
            tls,
            username: d.id.clone(),
            password: d.password.clone(),
        },
        e2e: E2eSettings {
            publish: format!("{base}/{}", e.device_topic),
            subscribe: format!("{base}/{}", e.controller_topic),
            base,
            pad: e.pad,
            aad: e.aad.clone(),
        },
        wifi,
    })
}

/// Provisions `device_id` over `link`; on success the keystore says so. Returns the device's
/// hardware id.
pub async fn provision<T: Transport>(
    cfg: &Config,
    data_dir: &Path,
    device_id: &str,
    code: &str,
    host: Option<&str>,
    wifi: Option<Wifi>,
    link: &mut T,
) -> Result<String> {
    let path = keystore::path(data_dir);
    let ks = keystore::load(&path)?;
    let d = ks
        .devices
        .iter()
        .find(|d| d.id == device_id)
        .with_context(|| format!("no device `{device_id}` (create it with `outpost devices add {device_id}`)"))?;
    if d.revoked {
        anyhow::bail!("device `{device_id}` is revoked");
    }
    let bundle = bundle_for(cfg, d, host, wifi)?;
    let hw = protocol::gateway(link, code, &bundle, &d.key_bytes()?).await?;
    keystore::update(&path, |ks| {
        let d = ks
            .devices
            .iter_mut()
            .find(|d| d.id == device_id)
            .context("device removed meanwhile")?;
        d.provisioned = true;
        Ok(())
    })?;
    log::info!("device {device_id}: provisioned (hardware id {hw:?})");
    Ok(hw)
}
