//! WeMo-style smart plugs, clients of the local broker: found by SSDP or configured by address,
//! each polled by its own task (a slow plug never delays another), publishing live readings,
//! a time-weighted moving average and a retained state, and switched by command. A plug that
//! moved port is found again by probing its host, then by SSDP with its UDN.

pub mod average;
mod client;
pub mod ssdp;
pub mod wemo;

use crate::broker::{self, Bus};
use crate::config::{self, PlugTopics};
use average::MovingAverage;
use bytes::Bytes;
use client::PlugClient;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use wemo::{PlugState, Setup};

use crate::status_doc::PlugReading;
/// What `outpost plugs list` and the status file show of a plug: the status document's type.
pub use crate::status_doc::PlugStatus;

pub type AllPlugs = Arc<Mutex<HashMap<String, PlugStatus>>>;

struct Ctx {
    cfg: config::Plugs,
    bus: Bus,
    client: PlugClient,
    status: AllPlugs,
    targets: Vec<SocketAddr>,
}

/// Starts discovery, the pollers and the command listener; returns the plugs' status table.
pub fn start(cfg: config::Plugs, shared: Arc<broker::Shared>, bus: Bus, stop: CancellationToken) -> AllPlugs {
    let status: AllPlugs = Default::default();
    let mut targets: Vec<SocketAddr> = cfg.discovery.targets.iter().filter_map(|t| t.parse().ok()).collect();
    if cfg.discovery.ssdp {
        targets.push(ssdp::MULTICAST.parse().expect("literal address"));
    }
    if cfg.statics.is_empty() && targets.is_empty() {
        return status;
    }
    let ctx = Arc::new(Ctx {
        client: PlugClient::new(cfg.timeout.0),
        cfg,
        bus,
        status: status.clone(),
        targets,
    });
    let commands: Arc<Mutex<HashMap<String, mpsc::Sender<bool>>>> = Default::default();
    for s in ctx.cfg.statics.clone() {
        spawn_plug(&ctx, &commands, s.name, s.host, s.port, None, &stop);
    }
    // Discovery: every interval, new plugs get a poller.
    {
        let (ctx, commands, stop) = (ctx.clone(), commands.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ctx.cfg.discovery.interval.0);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                if ctx.targets.is_empty() {
                    continue;
                }
                for f in ssdp::search(&ctx.targets, Duration::from_secs(2)).await {
                    let known = ctx.status.lock().expect("plugs lock").values().any(|p| p.udn == f.udn);
                    if known {
                        continue;
                    }
                    let Some((host, port)) = host_port(&f.location) else {
                        continue;
                    };
                    let client = ctx.client.clone();
                    let h = host.clone();
                    match tokio::task::spawn_blocking(move || client.setup(&h, port)).await {
                        Ok(Ok(setup)) => {
                            let name = config::plug_slug(&setup.name);
                            if ctx.status.lock().expect("plugs lock").contains_key(&name) {
                                continue;
                            }
                            log::info!(
                                "plug {name}: found by SSDP at {host}:{port} ({}, {})",
                                setup.model,
                                setup.udn
                            );
                            spawn_plug(&ctx, &commands, name, host, Some(port), Some(setup), &stop);
                        }
                        Ok(Err(e)) => log::warn!("plug at {}: {e}", f.location),
                        Err(_) => {}
                    }
                }
            }
        });
    }
    // Commands on `set` topics, from an in-process client of the broker.
    {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        let mut client = shared.local_client("plugs", &[PlugTopics::fill(&ctx.cfg.topics.set, "+")]);
        tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    d = client.recv() => d,
                    _ = stop.cancelled() => return,
                };
                let topic = &*d.msg.topic;
                let name = plug_of(&ctx.cfg.topics.set, topic);
                let on = match String::from_utf8_lossy(&d.msg.payload)
                    .trim()
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "on" | "1" | "true" => Some(true),
                    "off" | "0" | "false" => Some(false),
                    _ => None,
                };
                match (
                    name.and_then(|n| commands.lock().expect("commands lock").get(&n).cloned()),
                    on,
                ) {
                    (Some(tx), Some(on)) => {
                        let _ = tx.try_send(on);
                    }
                    (None, _) => log::info!("command on {topic}: no such plug"),
                    (_, None) => log::info!("command on {topic}: payload must be on or off"),
                }
            }
        });
    }
    status
}

/// The plug name a topic made from `template` holds.
fn plug_of(template: &str, topic: &str) -> Option<String> {
    let (pre, post) = template.split_once("{name}")?;
    topic
        .strip_prefix(pre)?
        .strip_suffix(post)
        .filter(|n| !n.contains('/'))
        .map(str::to_string)
}

fn host_port(location: &str) -> Option<(String, u16)> {
    let u = url::Url::parse(location).ok()?;
    Some((u.host_str()?.to_string(), u.port().unwrap_or(80)))
}

fn spawn_plug(
    ctx: &Arc<Ctx>,
    commands: &Arc<Mutex<HashMap<String, mpsc::Sender<bool>>>>,
    name: String,
    host: String,
    port: Option<u16>,
    setup: Option<Setup>,
    stop: &CancellationToken,
) {
    let (tx, rx) = mpsc::channel(8);
    commands.lock().expect("commands lock").insert(name.clone(), tx);
    let status = PlugStatus {
        name: name.clone(),
        host: host.clone(),
        port: port.unwrap_or(0),
        udn: setup.as_ref().map(|s| s.udn.clone()).unwrap_or_default(),
        model: setup.as_ref().map(|s| s.model.clone()).unwrap_or_default(),
        ..Default::default()
    };
    ctx.status.lock().expect("plugs lock").insert(name.clone(), status);
    let plug = Plug {
        ctx: ctx.clone(),
        name,
        host,
        port: port.unwrap_or(0),
        setup,
        last_ok: Instant::now(),
        offline_said: false,
        last_state: None,
    };
    tokio::spawn(plug.run(rx, stop.clone()));
}

struct Plug {
    ctx: Arc<Ctx>,
    name: String,
    host: String,
    /// 0 until found.
    port: u16,
    setup: Option<Setup>,
    last_ok: Instant,
    offline_said: bool,
    last_state: Option<PlugState>,
}

enum Reading {
    Insight(wemo::Insight),
    Switch(PlugState),
}

impl Plug {
    async fn run(mut self, mut commands: mpsc::Receiver<bool>, stop: CancellationToken) {
        let cfg = self.ctx.cfg.clone();
        let mut tick = tokio::time::interval(cfg.poll.0);
        // No pile-up: a slow answer skips the polls it overlapped.
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut avg_tick = tokio::time::interval(cfg.average_every.0);
        avg_tick.tick().await;
        let mut avg = MovingAverage::new(cfg.average.0, cfg.poll.0 * 2);
        let mut failures = 0u32;
        let mut last_error_log: Option<Instant> = None;
        if self.ctx.cfg.homeassistant {
            self.homeassistant().await;
        }
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.poll().await {
                        Ok(r) => {
                            failures = 0;
                            self.last_ok = Instant::now();
                            self.published(r, &mut avg).await;
                        }
                        Err(e) => {
                            failures += 1;
                            self.count_error(&e);
                            if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                                last_error_log = Some(Instant::now());
                                log::warn!("plug {} ({}:{}): {e}", self.name, self.host, self.port);
                            }
                            if self.last_ok.elapsed() >= cfg.offline_after.0 && !self.offline_said {
                                self.offline_said = true;
                                self.set_online(false);
                                self.publish_state("offline").await;
                            }
                            // Looking for it can take long (ports, SSDP): say it is offline first.
                            if failures.is_multiple_of(3) {
                                self.relocate().await;
                            }
                        }
                    }
                }
                _ = avg_tick.tick() => {
                    if let Some((w, n)) = avg.average(Instant::now()) {
                        let doc = serde_json::json!({ "ts": crate::system::clock::now_ms(), "power_w": round(w), "samples": n, "window_s": cfg.average.0.as_secs_f64() });
                        self.ctx.bus.publish(&PlugTopics::fill(&cfg.topics.average, &self.name), Bytes::from(doc.to_string()), 0, false, None).await;
                    }
                }
                Some(on) = commands.recv() => self.switch(on).await,
                _ = stop.cancelled() => return,
            }
        }
    }

    fn count_error(&self, e: &str) {
        // The reason without the numbers in it, so counters group.
        let kind: String = e
            .split(':')
            .next()
            .unwrap_or(e)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let mut all = self.ctx.status.lock().expect("plugs lock");
        if let Some(s) = all.get_mut(&self.name) {
            *s.errors.entry(kind.trim().to_string()).or_default() += 1;
        }
    }

    fn set_online(&self, online: bool) {
        if let Some(s) = self.ctx.status.lock().expect("plugs lock").get_mut(&self.name) {
            s.online = online;
        }
    }

    /// One reading, off the async threads, bounded by the request timeout.
    async fn poll(&mut self) -> Result<Reading, String> {
        if self.setup.is_none() || self.port == 0 {
            self.relocate().await;
        }
        let setup = self.setup.clone().ok_or("not found yet")?;
        let (client, host, port) = (self.ctx.client.clone(), self.host.clone(), self.port);
        let limit = self.ctx.cfg.timeout.0 + Duration::from_secs(1);
        let job = tokio::task::spawn_blocking(move || {
            if setup.insight {
                client.insight(&host, port, &setup).map(Reading::Insight)
            } else {
                client.state(&host, port, &setup).map(Reading::Switch)
            }
        });
        match tokio::time::timeout(limit, job).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("poll task failed".into()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn published(&mut self, r: Reading, avg: &mut MovingAverage) {
        let topics = &self.ctx.cfg.topics;
        let now_ms = crate::system::clock::now_ms();
        let (state, doc) = match r {
            Reading::Insight(i) => {
                avg.add(Instant::now(), i.power_w);
                let doc = PlugReading {
                    ts: now_ms,
                    power_w: Some(round(i.power_w)),
                    state: i.state.name().to_string(),
                    today_kwh: Some(i.today_kwh),
                    total_kwh: Some(i.total_kwh),
                };
                self.ctx
                    .bus
                    .publish(
                        &PlugTopics::fill(&topics.live, &self.name),
                        Bytes::from(serde_json::to_vec(&doc).unwrap_or_default()),
                        0,
                        false,
                        None,
                    )
                    .await;
                (i.state, doc)
            }
            Reading::Switch(s) => (
                s,
                PlugReading {
                    ts: now_ms,
                    state: s.name().to_string(),
                    ..Default::default()
                },
            ),
        };
        {
            let mut all = self.ctx.status.lock().expect("plugs lock");
            if let Some(s) = all.get_mut(&self.name) {
                s.polls += 1;
                s.online = true;
                s.last = Some(doc);
                s.port = self.port;
            }
        }
        if self.last_state != Some(state) || self.offline_said {
            self.offline_said = false;
            self.last_state = Some(state);
            self.publish_state(state.name()).await;
        }
    }

    async fn publish_state(&self, state: &str) {
        let t = PlugTopics::fill(&self.ctx.cfg.topics.state, &self.name);
        self.ctx
            .bus
            .publish(&t, Bytes::from(state.to_string()), 1, true, None)
            .await;
    }

    async fn switch(&mut self, on: bool) {
        let Some(setup) = self.setup.clone() else {
            log::warn!("plug {}: cannot switch, not found", self.name);
            return;
        };
        let (client, host, port) = (self.ctx.client.clone(), self.host.clone(), self.port);
        match tokio::task::spawn_blocking(move || client.set(&host, port, &setup, on)).await {
            Ok(Ok(Some(state))) => {
                self.last_state = Some(state);
                self.publish_state(state.name()).await;
            }
            // Already in that state.
            Ok(Ok(None)) => {}
            Ok(Err(e)) => log::warn!("plug {}: switching {}: {e}", self.name, if on { "on" } else { "off" }),
            Err(_) => {}
        }
    }

    /// Finds the plug again: its known port, the other WeMo ports on its host (checking the UDN),
    /// then SSDP by UDN.
    async fn relocate(&mut self) {
        let udn = self.setup.as_ref().map(|s| s.udn.clone());
        let mut ports: Vec<u16> = vec![];
        if self.port != 0 {
            ports.push(self.port);
        }
        ports.extend(wemo::PROBE_PORTS.iter().filter(|p| **p != self.port));
        let (client, host, u) = (self.ctx.client.clone(), self.host.clone(), udn.clone());
        let found = tokio::task::spawn_blocking(move || {
            ports.into_iter().find_map(|p| {
                client
                    .setup(&host, p)
                    .ok()
                    .filter(|s| u.as_ref().is_none_or(|u| *u == s.udn))
                    .map(|s| (p, s))
            })
        })
        .await
        .ok()
        .flatten();
        let found = match found {
            Some(f) => Some((self.host.clone(), f.0, f.1)),
            None => self.rediscover(udn.as_deref()).await,
        };
        if let Some((host, port, setup)) = found {
            if port != self.port || host != self.host {
                if self.port != 0 {
                    log::info!(
                        "plug {}: moved from {}:{} to {host}:{port}",
                        self.name,
                        self.host,
                        self.port
                    );
                    if let Some(s) = self.ctx.status.lock().expect("plugs lock").get_mut(&self.name) {
                        s.moved += 1;
                    }
                }
                self.host = host;
                self.port = port;
            }
            if let Some(s) = self.ctx.status.lock().expect("plugs lock").get_mut(&self.name) {
                s.udn = setup.udn.clone();
                s.model = setup.model.clone();
                s.port = port;
                s.host = self.host.clone();
            }
            self.setup = Some(setup);
        }
    }

    async fn rediscover(&self, udn: Option<&str>) -> Option<(String, u16, Setup)> {
        let udn = udn?;
        if self.ctx.targets.is_empty() {
            return None;
        }
        let f = ssdp::search(&self.ctx.targets, Duration::from_secs(1))
            .await
            .into_iter()
            .find(|f| f.udn == udn)?;
        let (host, port) = host_port(&f.location)?;
        let (client, h) = (self.ctx.client.clone(), host.clone());
        let setup = tokio::task::spawn_blocking(move || client.setup(&h, port))
            .await
            .ok()?
            .ok()?;
        Some((host, port, setup))
    }

    /// Home Assistant MQTT discovery: power and energy sensors, and a switch.
    async fn homeassistant(&self) {
        let n = &self.name;
        let t = &self.ctx.cfg.topics;
        let device = serde_json::json!({ "identifiers": [format!("outpost-plug-{n}")], "name": n, "manufacturer": "Belkin", "via_device": "outpost" });
        let configs = [
            (
                "sensor",
                "power",
                serde_json::json!({ "name": "power", "unique_id": format!("outpost_{n}_power"), "state_topic": PlugTopics::fill(&t.live, n), "value_template": "{{ value_json.power_w }}", "unit_of_measurement": "W", "device_class": "power", "state_class": "measurement", "device": device }),
            ),
            (
                "sensor",
                "energy",
                serde_json::json!({ "name": "energy today", "unique_id": format!("outpost_{n}_energy"), "state_topic": PlugTopics::fill(&t.live, n), "value_template": "{{ value_json.today_kwh }}", "unit_of_measurement": "kWh", "device_class": "energy", "state_class": "total_increasing", "device": device }),
            ),
            (
                "switch",
                "switch",
                serde_json::json!({ "name": "switch", "unique_id": format!("outpost_{n}_switch"), "state_topic": PlugTopics::fill(&t.state, n), "command_topic": PlugTopics::fill(&t.set, n), "payload_on": "on", "payload_off": "off", "state_on": "on", "state_off": "off", "device": device }),
            ),
        ];
        for (kind, what, c) in configs {
            let topic = format!("homeassistant/{kind}/outpost_{n}_{what}/config");
            self.ctx
                .bus
                .publish(&topic, Bytes::from(c.to_string()), 1, true, None)
                .await;
        }
    }
}

fn round(w: f64) -> f64 {
    (w * 1000.0).round() / 1000.0
}
