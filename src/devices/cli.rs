//! `outpost devices ...`: the keystore as an operator sees it.

use super::keystore::{self, Device};
use crate::config::{Config, ListenerProtocol};
use anyhow::{Context, Result};
use std::path::Path;

pub enum Action {
    Add { id: String, show_secret: bool },
    List,
    Show { id: String, show_secret: bool },
    Revoke { id: String },
    Rotate { id: String, show_secret: bool },
}

pub fn run(action: Action, cfg: &Config, data_dir: &Path) -> Result<()> {
    let path = keystore::path(data_dir);
    match action {
        Action::Add { id, show_secret } => {
            let d = keystore::add(&path, &id)?;
            println!("device {} created in {}", d.id, path.display());
            print!("{}", describe(&d, cfg, show_secret)?);
        }
        Action::Rotate { id, show_secret } => {
            let d = keystore::rotate(&path, &id)?;
            println!("device {}: new key and password; provision it again", d.id);
            print!("{}", describe(&d, cfg, show_secret)?);
        }
        Action::Revoke { id } => {
            keystore::revoke(&path, &id)?;
            println!("device {id} revoked: a running gateway closes its connections within a second");
        }
        Action::List => {
            let ks = keystore::load(&path)?;
            println!(
                "{:<24} {:<8} {:<12} {:<14} CREATED",
                "DEVICE", "STATE", "PROVISIONED", "TOPIC BASE"
            );
            for d in &ks.devices {
                println!(
                    "{:<24} {:<8} {:<12} {:<14} {}",
                    d.id,
                    if d.revoked { "revoked" } else { "active" },
                    if d.provisioned { "yes" } else { "no" },
                    d.topic_base().unwrap_or_else(|_| "(bad key)".into()),
                    d.created
                );
            }
        }
        Action::Show { id, show_secret } => {
            let ks = keystore::load(&path)?;
            let d = ks
                .devices
                .iter()
                .find(|d| d.id == id)
                .with_context(|| format!("no device `{id}`"))?;
            print!("{}", describe(d, cfg, show_secret)?);
            println!("state:       {}", if d.revoked { "revoked" } else { "active" });
            let status = std::fs::read_to_string(data_dir.join("status.json")).ok();
            match status.and_then(|s| serde_json::from_str::<crate::status_doc::StatusDoc>(&s).ok()) {
                Some(doc) => match doc.devices.get(&id) {
                    Some(c) => println!("counters:    {}", serde_json::to_string(c).unwrap_or_default()),
                    None => println!("counters:    null"),
                },
                None => println!("counters:    (the gateway is not running with this data_dir)"),
            }
        }
    }
    Ok(())
}

/// What the provisioning step sends to the device; secrets only when asked.
fn describe(d: &Device, cfg: &Config, show_secret: bool) -> Result<String> {
    let base = d.topic_base()?;
    let l = cfg
        .broker
        .listeners
        .iter()
        .find(|l| !l.bind.0.ip().is_loopback())
        .or(cfg.broker.listeners.first())
        .context("no listener configured")?;
    let e = &cfg.devices;
    let mut out = format!(
        "id:          {}\nmqtt:        {}:{} ({}), username {}\ne2e:         topic base {base}, publish {base}/{}/..., commands on {base}/{}, pad {}, window {}\n",
        d.id,
        l.bind.0.ip(),
        l.bind.0.port(),
        match l.protocol {
            ListenerProtocol::Mqtt => "mqtt",
            ListenerProtocol::Mqtts => "mqtts",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
        },
        d.id,
        e.device_topic,
        e.controller_topic,
        e.pad,
        e.window
    );
    if show_secret {
        out += &format!("key:         {}\npassword:    {}\n", d.key, d.password);
    } else {
        out += "key:         (hidden; --show-secret prints it)\n";
    }
    Ok(out)
}
