//! Provisioning driven over the local broker, for a dashboard or a script: an admin publishes
//! `{"transport": "uart", "port": "/dev/ttyUSB0", "device": "boiler", "code": "739201",
//! "mqtt_host": "192.168.1.2", "reply_to": "outpost/<id>/provision/reply/<anything>"}` (or
//! `"transport": "ble", "name": ...`; `"force": true` re-provisions with a new key)
//! on `outpost/<gateway.id>/provision/request` and hears `started`, then the outcome. One device
//! at a time.

use crate::broker::LocalClient;
use crate::broker::{Bus, Shared};
use crate::config::Config;
use bytes::Bytes;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct ProvisionService {
    shared: Arc<Shared>,
    bus: Bus,
    cfg: Config,
    data_dir: PathBuf,
    request_topic: String,
    /// One provisioning run at a time (one radio, one serial port).
    busy: tokio::sync::Mutex<()>,
}

impl ProvisionService {
    pub fn new(shared: Arc<Shared>, bus: Bus, cfg: &Config) -> ProvisionService {
        let request_topic = format!("outpost/{}/provision/request", cfg.gateway.id);
        shared.access().restrict_topic(&request_topic, &cfg.provisioning.admins);
        ProvisionService {
            shared,
            bus,
            data_dir: cfg.gateway.data_dir.clone(),
            cfg: cfg.clone(),
            request_topic,
            busy: Default::default(),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<LocalClient> {
        Ok(self
            .shared
            .local_client("provision", std::slice::from_ref(&self.request_topic)))
    }

    pub async fn run(self: Arc<Self>, mut client: LocalClient, stop: CancellationToken) {
        loop {
            tokio::select! {
                d = client.recv() => if !d.retain {
                    let me = self.clone();
                    tokio::spawn(async move { me.handle(&d.msg.payload).await });
                },
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn reply(&self, to: Option<&str>, v: Value) {
        let prefix = self.request_topic.trim_end_matches("request").to_string() + "reply/";
        if let Some(to) = to.filter(|t| t.starts_with(&prefix) && crate::broker::topics::valid_topic(t)) {
            self.bus.publish(to, Bytes::from(v.to_string()), 1, false, None).await;
        }
    }

    async fn handle(&self, payload: &[u8]) {
        let m: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let to = m["reply_to"].as_str();
        let (Some(device), Some(code)) = (m["device"].as_str(), m["code"].as_str()) else {
            return self
                .reply(to, json!({ "ok": false, "error": "a request needs device and code" }))
                .await;
        };
        let Ok(_turn) = self.busy.try_lock() else {
            return self
                .reply(
                    to,
                    json!({ "ok": false, "error": "another device is being provisioned" }),
                )
                .await;
        };
        self.reply(to, json!({ "state": "started", "device": device })).await;
        let req = super::Request {
            mqtt_host: m["mqtt_host"].as_str(),
            force: m["force"].as_bool().unwrap_or(false),
            ..super::Request::new(device, code)
        };
        let res = match m["transport"].as_str() {
            Some("uart") => match super::uart::open(
                m["port"].as_str().unwrap_or(""),
                m["baud"].as_u64().unwrap_or(115_200) as u32,
            ) {
                Ok(mut link) => super::provision(&self.cfg, &self.data_dir, &req, &mut link).await,
                Err(e) => Err(e.into()),
            },
            Some("ble") => {
                match super::ble::Ble::connect(m["name"].as_str().unwrap_or(""), Duration::from_secs(5)).await {
                    Ok(mut link) => {
                        let res = super::provision(&self.cfg, &self.data_dir, &req, &mut link).await;
                        link.close().await;
                        res
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => Err(anyhow::anyhow!("transport must be uart or ble")),
        };
        let v = match res {
            Ok(hw) => json!({ "ok": true, "device": device, "hardware_id": hw }),
            Err(e) => json!({ "ok": false, "device": device, "error": format!("{e:#}") }),
        };
        self.reply(to, v).await;
    }
}
