//! The device service, a client of the local broker: it follows the keystore (polled every
//! second), keeps the front door's device logins in step with it (a revoked or rotated device is
//! disconnected at once), decrypts what devices publish under their e2e topic base and
//! republishes it under `devices/<id>/...`, and encrypts `devices/<id>/cmd/...` for them.

use super::e2e::{self, Codec, Receiver, Reject};
use super::keystore::{self, Device};
use crate::broker::LocalClient;
use crate::broker::{Bus, DeviceCred, Shared};
use crate::config;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One device's counters, shown on its state topic and by `outpost devices show`: the
/// status document's type.
pub use crate::status_doc::DeviceCounters as Counters;

/// Counters of every device, shared with the status file.
pub type AllCounters = Arc<Mutex<HashMap<String, Counters>>>;

struct Live {
    device: Device,
    base: String,
    receiver: Receiver,
}

pub struct DeviceService {
    shared: Arc<Shared>,
    bus: Bus,
    cfg: config::Devices,
    path: PathBuf,
    state_prefix: String,
    pub counters: AllCounters,
}

impl DeviceService {
    pub fn new(shared: Arc<Shared>, bus: Bus, cfg: config::Devices, gateway: &config::Gateway) -> DeviceService {
        DeviceService {
            shared,
            bus,
            cfg,
            path: keystore::path(&gateway.data_dir),
            state_prefix: format!("outpost/{}/devices", gateway.id),
            counters: Default::default(),
        }
    }

    /// Installs the device logins from the keystore now (before clients are let in).
    pub fn load(&self) -> anyhow::Result<Vec<Device>> {
        let ks = keystore::load(&self.path)?;
        let devices: Vec<Device> = ks
            .devices
            .into_iter()
            .filter(|d| !d.revoked && d.key_bytes().is_ok())
            .collect();
        self.install(&devices);
        Ok(devices)
    }

    fn install(&self, devices: &[Device]) {
        let creds = devices
            .iter()
            .filter_map(|d| {
                let base = d.topic_base().ok()?;
                let fill = |f: &String| f.replace("{id}", &d.id).replace("{base}", &base);
                Some((
                    d.id.clone(),
                    DeviceCred {
                        password: d.password.clone(),
                        publish: self.cfg.publish.iter().map(fill).collect(),
                        subscribe: self.cfg.subscribe.iter().map(fill).collect(),
                    },
                ))
            })
            .collect();
        self.shared.access().set_devices(creds);
    }

    fn live(&self, d: Device) -> Option<Live> {
        let key = d.key_bytes().ok()?;
        let codec = Codec::new(&key, self.cfg.aad.as_bytes(), self.cfg.pad);
        let receiver = Receiver::new(codec, self.cfg.window.0, self.cfg.max_packet.0 as usize);
        Some(Live {
            base: e2e::topic_base(&key),
            device: d,
            receiver,
        })
    }

    /// Subscribed to commands and to every device's packets before clients are let in.
    pub async fn connect(&self, devices: &[Device]) -> anyhow::Result<LocalClient> {
        let mut filters = vec!["devices/+/cmd/#".to_string()];
        for d in devices {
            if let Ok(base) = d.topic_base() {
                filters.push(format!("{base}/{}/#", self.cfg.device_topic));
            }
        }
        Ok(self.shared.local_client("devices", &filters))
    }

    pub async fn run(self, initial: Vec<Device>, mut client: LocalClient, stop: CancellationToken) {
        let mut live: HashMap<String, Live> = initial
            .into_iter()
            .filter_map(|d| self.live(d).map(|l| (l.device.id.clone(), l)))
            .collect();
        let mut mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        let mut last_state = Instant::now();
        loop {
            tokio::select! {
                // A retained command would be sent again at every restart: only live ones count.
                d = client.recv() => if !d.retain {
                    self.on_message(&mut live, &d.msg.topic, d.msg.payload.clone(), d.msg.qos).await
                },
                _ = poll.tick() => {
                    let now = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
                    if now != mtime {
                        mtime = now;
                        self.reload(&client, &mut live);
                    }
                    if last_state.elapsed() >= Duration::from_secs(5) {
                        last_state = Instant::now();
                        self.publish_states(&live).await;
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Takes in a changed keystore: new devices are subscribed, removed, revoked and rotated
    /// ones disconnected.
    fn reload(&self, client: &LocalClient, live: &mut HashMap<String, Live>) {
        let devices = match self.load() {
            Ok(d) => d,
            Err(e) => {
                log::error!("device keystore: {e:#}; keeping the devices loaded before");
                return;
            }
        };
        let wanted: HashMap<&str, &Device> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
        let gone: Vec<String> = live
            .iter()
            .filter(|(id, l)| {
                wanted
                    .get(id.as_str())
                    .is_none_or(|d| d.key != l.device.key || d.password != l.device.password)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            let l = live.remove(&id).expect("listed above");
            client.unsubscribe(&format!("{}/{}/#", l.base, self.cfg.device_topic));
            let n = self.shared.kick(&id);
            log::info!("device {id}: revoked, rotated or removed; {n} connection(s) closed");
        }
        for d in devices {
            if !live.contains_key(&d.id) {
                if let Some(l) = self.live(d) {
                    client.subscribe(&format!("{}/{}/#", l.base, self.cfg.device_topic));
                    log::info!("device {}: active (e2e topic base {})", l.device.id, l.base);
                    live.insert(l.device.id.clone(), l);
                }
            }
        }
    }

    fn count(&self, id: &str, f: impl FnOnce(&mut Counters)) {
        f(self
            .counters
            .lock()
            .expect("counters lock")
            .entry(id.to_string())
            .or_default());
    }

    async fn on_message(&self, live: &mut HashMap<String, Live>, topic: &str, payload: Bytes, qos: u8) {
        // A command for a device: encrypt it for the device's controller topic.
        if let Some(rest) = topic.strip_prefix("devices/") {
            let Some((id, _)) = rest.split_once("/cmd/") else {
                return;
            };
            let Some(l) = live.get_mut(id) else {
                log::debug!("command for unknown or revoked device {id:?} dropped");
                return;
            };
            let packet = l.receiver.codec().seal(&payload);
            l.receiver.remember(packet[..12].try_into().expect("12-byte nonce"));
            let to = format!("{}/{}", l.base, self.cfg.controller_topic);
            self.bus.publish(&to, Bytes::from(packet), 0, false, None).await;
            self.count(id, |c| c.commands_out += 1);
            return;
        }
        // A packet from a device, under its topic base.
        let Some((base, rest)) = topic.split_once('/') else {
            return;
        };
        let Some(l) = live.values_mut().find(|l| l.base == base) else {
            return;
        };
        let id = l.device.id.clone();
        let suffix = rest
            .strip_prefix(&format!("{}/", self.cfg.device_topic))
            .or((rest == self.cfg.device_topic).then_some(""));
        let Some(suffix) = suffix else { return };
        match l.receiver.receive(&payload, crate::system::clock::now_ns()) {
            Ok(plain) => {
                // Never let a device's message come back as a command for it.
                if suffix == "cmd" || suffix.starts_with("cmd/") {
                    self.count(&id, |c| *c.rejected.entry("reserved_topic".into()).or_default() += 1);
                    return;
                }
                let to = if suffix.is_empty() {
                    format!("devices/{id}")
                } else {
                    format!("devices/{id}/{suffix}")
                };
                self.bus
                    .publish(&to, Bytes::from(plain), qos.min(1), false, Some("devices"))
                    .await;
                self.count(&id, |c| {
                    c.messages_in += 1;
                    c.last_seen_ms = Some(crate::system::clock::now_ms());
                });
            }
            Err(why) => {
                if matches!(why, Reject::BadTag | Reject::Replay | Reject::Stale) {
                    log::debug!("device {id}: packet refused: {}", why.name());
                }
                self.count(&id, |c| *c.rejected.entry(why.name().into()).or_default() += 1);
            }
        }
    }

    async fn publish_states(&self, live: &HashMap<String, Live>) {
        let snapshot = self.counters.lock().expect("counters lock").clone();
        for id in live.keys() {
            let c = snapshot.get(id).cloned().unwrap_or_default();
            let doc = serde_json::json!({ "id": id, "counters": c, "at": crate::system::clock::now_secs() });
            self.bus
                .publish(
                    &format!("{}/{id}/state", self.state_prefix),
                    Bytes::from(doc.to_string()),
                    0,
                    true,
                    Some("devices"),
                )
                .await;
        }
    }
}
