//! Out-of-band provisioning: hands a device its id, e2e key and MQTT settings over a short-range
//! link (UART or BLE), with the protocol of docs/provisioning.md (version 2, SPAKE2), and marks
//! the device provisioned in the keystore once it proved it holds the key.

pub mod ble;
pub mod protocol;
pub mod service;
pub mod uart;

use crate::config::Config;
use crate::devices::keystore;
use anyhow::{bail, Context, Result};
use protocol::{Bundle, E2eSettings, MqttSettings, Transport, Wifi};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// One provisioning run, as the operator asked for it.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub device_id: &'a str,
    /// As the operator typed it (normalised here).
    pub code: &'a str,
    /// The broker address for the bundle (`--mqtt-host`).
    pub mqtt_host: Option<&'a str>,
    pub wifi: Option<Wifi>,
    /// Provision a device that already is: with a new key and password.
    pub force: bool,
    /// How long to wait for a device to answer.
    pub wait: Duration,
}

impl<'a> Request<'a> {
    pub fn new(device_id: &'a str, code: &'a str) -> Self {
        Request {
            device_id,
            code,
            mqtt_host: None,
            wifi: None,
            force: false,
            wait: Duration::from_secs(60),
        }
    }
}

fn is_loopback_host(h: &str) -> bool {
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Where the bundle tells the device to connect, and a warning for the operator if any. Without
/// `--mqtt-host` it is the first listener on a specific non-loopback address; a loopback or
/// wildcard listener is refused (a device cannot reach 127.0.0.1 or 0.0.0.0).
fn mqtt_settings(cfg: &Config, host: Option<&str>) -> Result<(String, u16, bool, Option<String>)> {
    let l = cfg
        .broker
        .listeners
        .iter()
        .find(|l| !l.bind.0.ip().is_loopback())
        .or(cfg.broker.listeners.first());
    let (ip, port, tls) = l.map_or(("127.0.0.1".parse().expect("an address"), 1883, false), |l| {
        (l.bind.0.ip(), l.bind.0.port(), l.protocol.needs_tls())
    });
    match host {
        Some(h) if is_loopback_host(h) => Ok((
            h.to_string(),
            port,
            tls,
            Some(format!(
                "--mqtt-host {h} is a loopback address: only a client on this machine can reach it, not a device"
            )),
        )),
        Some(h) => Ok((h.to_string(), port, tls, None)),
        None if ip.is_loopback() || ip.is_unspecified() => bail!(
            "the broker listens on {ip}:{port}, which a device cannot use as an address: give `--mqtt-host` \
             with this gateway's address on the device's network (and a listener the device can reach)"
        ),
        None => Ok((ip.to_string(), port, tls, None)),
    }
}

/// The bundle for `d`, with its key and password as given; and a warning, if any.
pub fn bundle_for(
    cfg: &Config,
    d: &keystore::Device,
    host: Option<&str>,
    wifi: Option<Wifi>,
) -> Result<(Bundle, Option<String>)> {
    let base = d.topic_base()?;
    let (host, port, tls, warning) = mqtt_settings(cfg, host)?;
    if let Some(w) = &wifi {
        if w.ssid.is_empty() || w.ssid.len() > 32 || w.password.len() > 64 {
            bail!("Wi-Fi: the SSID must be 1-32 bytes and the password at most 64");
        }
    }
    let e = &cfg.devices;
    Ok((
        Bundle {
            version: protocol::VERSION as u32,
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
        },
        warning,
    ))
}

/// Provisions `req.device_id` over `link`; on success the keystore says so (with the hardware
/// id). Returns the device's hardware id.
pub async fn provision<T: Transport>(cfg: &Config, data_dir: &Path, req: &Request<'_>, link: &mut T) -> Result<String> {
    let code = protocol::normalize_code(req.code)?;
    let path = keystore::path(data_dir);
    let ks = keystore::load(&path)?;
    let id = req.device_id;
    let mut d = ks
        .devices
        .iter()
        .find(|d| d.id == id)
        .cloned()
        .with_context(|| format!("no device `{id}` (create it with `outpost devices add {id}`)"))?;
    if d.revoked {
        bail!("device `{id}` is revoked");
    }
    if d.provisioned && !req.force {
        bail!(
            "device `{id}` is already provisioned (hardware id {}): `--force` provisions it again with a new key and \
             password, and the old ones stop working once it succeeds",
            d.hardware_id.as_deref().unwrap_or("not recorded")
        );
    }
    if let Some(wait) = keystore::pairing_delay(&d, crate::system::clock::now_secs()) {
        bail!(
            "device `{id}`: {} failed pairing attempt(s) in a row; the next is allowed in {wait} s (the wait doubles \
             with each failure, up to an hour; a success resets it)",
            d.pairing_failures
        );
    }
    let rotating = d.provisioned;
    if rotating {
        (d.key, d.password) = keystore::secrets();
    }
    let (bundle, warning) = bundle_for(cfg, &d, req.mqtt_host, req.wifi.clone())?;
    if let Some(w) = warning {
        eprintln!("outpost: warning: {w}");
    }
    let mut attempt = protocol::Attempt::default();
    let params = protocol::GatewayParams {
        gateway_id: &cfg.gateway.id,
        code: &code,
        bundle: &bundle,
        e2e_key: &d.key_bytes()?,
        wait: req.wait,
    };
    let commit = |hw: &str| {
        keystore::update(&path, |ks| {
            let s = ks
                .devices
                .iter_mut()
                .find(|s| s.id == id)
                .context("device removed meanwhile")?;
            if rotating {
                s.key = d.key.clone();
                s.password = d.password.clone();
                s.rotated = Some(crate::system::clock::now_secs());
            }
            s.provisioned = true;
            s.hardware_id = Some(hw.to_string());
            s.provisioned_at = Some(crate::system::clock::now_secs());
            s.pairing_failures = 0;
            s.last_pairing_failure = None;
            Ok(())
        })
        .map_err(|e| format!("{e:#}"))
    };
    let res = protocol::gateway(link, &params, &mut protocol::OsEntropy, &mut attempt, commit).await;
    match res {
        Ok(hw) => {
            log::info!("device {id}: provisioned (hardware id {hw:?})");
            Ok(hw)
        }
        Err(e) if attempt.code_tried => {
            let n = keystore::update(&path, |ks| {
                let s = ks.devices.iter_mut().find(|s| s.id == id).context("device removed")?;
                s.pairing_failures += 1;
                s.last_pairing_failure = Some(crate::system::clock::now_secs());
                Ok(s.pairing_failures)
            })?;
            log::warn!("device {id}: provisioning failed after the code was tried ({n} in a row): {e}");
            Err(anyhow::Error::new(e).context(format!(
                "device `{id}`: failed pairing attempt {n} in a row (hardware id {}); the next is allowed in {} s",
                attempt.hw_id.as_deref().unwrap_or("?"),
                1u64.checked_shl(n.min(63))
                    .unwrap_or(u64::MAX)
                    .min(keystore::MAX_PAIRING_DELAY)
            )))
        }
        Err(e) => Err(e.into()),
    }
}
