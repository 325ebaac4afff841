//! Upstream bridges: each one a client of a cloud broker, fed by a [`Tap`] on the local broker
//! that maps topics by the bridge's rules and writes outbound messages to the bridge's durable
//! spool before the local publisher is acknowledged. Bridges are started, changed and removed
//! on reload without touching the others, in two steps (prepare what can fail, then commit);
//! a spool outlives its bridge's restarts.

mod failover;
pub mod link;
mod session;
pub mod spool;
mod upstream;

use crate::broker::{Bus, Incoming, Shared, Tap};
use crate::config;
use crate::status_doc::{BridgeDrops, BridgeState};
use anyhow::Result;
use config::rules::Rule;
use link::{Link, Live};
use spool::Spool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A bridge's counters, shown on its state topic and by `outpost status`.
#[derive(Default, Debug)]
pub struct LinkStats {
    pub connected: AtomicBool,
    /// Connected, but the oldest message in flight has waited longer than `stall_after` for
    /// its ack.
    pub stalled: AtomicBool,
    /// When `connected` last changed (ms since epoch).
    pub since_ms: AtomicI64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub reconnects: AtomicU64,
    /// Connections made to another address than the one before (see `urls`).
    pub failovers: AtomicU64,
    /// The upstream address of the current (or last) connection.
    pub url: Mutex<Option<String>>,
    pub echoes: AtomicU64,
    /// Larger than the upstream's max_packet_size: refused at the rule.
    pub dropped_too_large: AtomicU64,
    /// QoS 0 messages not spooled while the link was down or busy.
    pub dropped_qos0: AtomicU64,
    /// The upstream answered with an MQTT 5 failure reason.
    pub dropped_refused: AtomicU64,
    /// A rule's filter matched but its template made no valid topic (e.g. empty).
    pub dropped_unmappable: AtomicU64,
    /// Inbound messages a local store could not keep: not acknowledged upstream.
    pub inbound_not_kept: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Paused by an admin: the link stays disconnected (the spool keeps filling) until resumed.
    pub paused: AtomicBool,
    /// Wakes the link for an admin's pause or restart.
    pub kick: tokio::sync::Notify,
}

/// The bridge's part of the status document, also published on its local state topic.
pub fn state(name: &str, s: &LinkStats, spool: &Spool) -> BridgeState {
    let sp = &spool.stats;
    let oldest = sp.oldest_ms.load(Ordering::Relaxed);
    let queued = sp.queued.load(Ordering::Relaxed);
    let age = (oldest > 0 && queued > 0).then(|| ((crate::system::clock::now_ms() - oldest).max(0) as f64) / 1000.0);
    BridgeState {
        name: name.to_string(),
        connected: s.connected.load(Ordering::Relaxed),
        stalled: s.stalled.load(Ordering::Relaxed),
        paused: s.paused.load(Ordering::Relaxed),
        since_ms: s.since_ms.load(Ordering::Relaxed),
        queued,
        queued_bytes: sp.queued_bytes.load(Ordering::Relaxed),
        oldest_age_s: age,
        sent: s.sent.load(Ordering::Relaxed),
        received: s.received.load(Ordering::Relaxed),
        reconnects: s.reconnects.load(Ordering::Relaxed),
        url: s.url.lock().expect("stats lock").clone(),
        failovers: s.failovers.load(Ordering::Relaxed),
        echoes_dropped: s.echoes.load(Ordering::Relaxed),
        dropped: BridgeDrops {
            spool_full_oldest: sp.dropped_full.load(Ordering::Relaxed),
            spool_full_rejected: sp.dropped_rejected.load(Ordering::Relaxed),
            expired: sp.dropped_expired.load(Ordering::Relaxed),
            too_large: s.dropped_too_large.load(Ordering::Relaxed),
            qos0_not_connected: s.dropped_qos0.load(Ordering::Relaxed),
            refused_upstream: s.dropped_refused.load(Ordering::Relaxed),
            unmappable: s.dropped_unmappable.load(Ordering::Relaxed),
        },
        spool_write_errors: sp.write_errors.load(Ordering::Relaxed),
        inbound_not_kept: s.inbound_not_kept.load(Ordering::Relaxed),
        last_error: s.last_error.lock().expect("stats lock").clone(),
    }
}

/// The bridge's side of the local broker: picks the messages its `out` rules match.
struct BridgeTap {
    name: String,
    rules: Arc<Vec<Rule>>,
    spool: Spool,
    live: mpsc::Sender<Live>,
    stats: Arc<LinkStats>,
    max_packet: usize,
    last_too_large_log: Mutex<Option<std::time::Instant>>,
}

impl Tap for BridgeTap {
    fn accept(&self, m: &Incoming, durable: bool) -> Option<oneshot::Receiver<()>> {
        if m.origin == Some(self.name.as_str()) {
            return None;
        }
        // The first rule whose filter matches decides.
        let rule = self.rules.iter().find(|r| {
            r.out
                .as_ref()
                .is_some_and(|o| crate::broker::topics::matches(m.topic, o.filter()))
        })?;
        let Some(remote) = rule.out.as_ref().and_then(|o| o.map(m.topic)) else {
            self.stats.dropped_unmappable.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // PUBLISH overhead: fixed header (≤5), topic length (2), packet id (2), properties.
        if remote.len() + m.payload.len() + 16 + m.props.map_or(0, |p| p.wire_len()) > self.max_packet {
            self.stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
            let mut last = self.last_too_large_log.lock().expect("log lock");
            if last.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                *last = Some(std::time::Instant::now());
                log::warn!(
                    "bridge {}: message on {} ({} bytes) is larger than the upstream's max_packet_size {}; not sent",
                    self.name,
                    m.topic,
                    m.payload.len(),
                    self.max_packet
                );
            }
            return None;
        }
        let e = spool::Entry {
            topic: remote,
            payload: m.payload.clone(),
            qos: rule.qos,
            retain: m.retain,
            props: m.props.map(|p| Box::new(p.clone())),
        };
        if rule.qos > 0 || rule.spool_qos0 {
            return self.spool.append(vec![e], durable);
        }
        if !self.stats.connected.load(Ordering::Relaxed) || self.live.try_send(e).is_err() {
            self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
        }
        None
    }
}

struct Running {
    cfg: config::Bridge,
    tap: Arc<BridgeTap>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A bridge made ready to run: its tap can be installed, its link started.
struct Prepared {
    cfg: config::Bridge,
    tap: Arc<BridgeTap>,
    link: Link,
}

/// What [`Bridges::prepare`] made ready and [`Bridges::commit`] puts in force: the bridges
/// wanted, and those of them that are new or changed, ready to run.
pub struct BridgePlan {
    wanted: Vec<config::Bridge>,
    prepared: Vec<Prepared>,
}

/// All bridges of the gateway.
pub struct Bridges {
    shared: Arc<Shared>,
    bus: Bus,
    gateway_id: String,
    dir: PathBuf,
    running: HashMap<String, Running>,
    /// Open spools and counters by bridge name: they outlive restarts of their bridge (one
    /// writer per spool file, counters that do not reset on reload).
    spools: HashMap<String, (config::Spool, Spool, Arc<LinkStats>)>,
    /// The running bridges' counters by name, for the admin request topic.
    controls: Controls,
}

type Controls = Arc<Mutex<HashMap<String, Arc<LinkStats>>>>;

/// Where admins ask to pause, resume or restart a bridge:
/// `{"bridge": "cloud", "action": "pause" | "resume" | "restart", "reply_to": "<reply prefix>..."}`.
/// Only `dashboard.admins` may publish there (the dashboard restricts it; until then nobody may).
pub fn request_topic(gateway_id: &str) -> String {
    format!("outpost/{gateway_id}/bridges/request")
}

/// Replies go under this prefix, and only there.
pub fn reply_prefix(gateway_id: &str) -> String {
    format!("outpost/{gateway_id}/bridges/reply/")
}

impl Bridges {
    pub fn new(shared: Arc<Shared>, bus: Bus, gateway: &config::Gateway) -> Bridges {
        let controls: Controls = Default::default();
        let topic = request_topic(&gateway.id);
        shared.access().restrict_topic(&topic, &[]);
        let client = shared.local_client("bridges-admin", std::slice::from_ref(&topic));
        tokio::spawn(admin_requests(
            client,
            bus.clone(),
            controls.clone(),
            gateway.id.clone(),
        ));
        Bridges {
            shared,
            bus,
            gateway_id: gateway.id.clone(),
            dir: gateway.data_dir.join("bridges"),
            running: HashMap::new(),
            spools: HashMap::new(),
            controls,
        }
    }

    /// The spool and counters `b` runs with: those already open under its name, or a spool
    /// opened now (kept only if the plan is committed; dropped, it closes its file). Changes
    /// nothing that runs: new bounds for a kept spool are put in force by [`Bridges::commit`].
    async fn spool(&self, b: &config::Bridge) -> Result<(Spool, Arc<LinkStats>)> {
        if let Some((_, s, stats)) = self.spools.get(&b.name) {
            return Ok((s.clone(), stats.clone()));
        }
        let (path, cfg, name) = (self.dir.join(format!("{}.db", b.name)), b.spool.clone(), b.name.clone());
        let s = tokio::task::spawn_blocking(move || Spool::open(&path, cfg, &name))
            .await?
            .map_err(|e| e.context(format!("bridge {}", b.name)))?;
        Ok((s, Arc::new(LinkStats::default())))
    }

    /// Makes the running bridges match `wanted` (see [`Bridges::prepare`] and
    /// [`Bridges::commit`]). If a bridge cannot be prepared, nothing changes.
    pub async fn apply(&mut self, wanted: &[config::Bridge]) -> Result<()> {
        let plan = self.prepare(wanted).await?;
        self.commit(plan).await;
        Ok(())
    }

    /// The first half of a reload: everything that can fail (opening the spools of new
    /// bridges, building their taps and links), with nothing running touched. Dropping the
    /// plan undoes it (a spool file made for a new bridge stays on disk, empty, as the spools
    /// of removed bridges do).
    pub async fn prepare(&self, wanted: &[config::Bridge]) -> Result<BridgePlan> {
        let mut prepared = vec![];
        for b in wanted {
            if self.running.get(&b.name).is_some_and(|r| r.cfg == *b) {
                continue;
            }
            prepared.push(self.prepare_one(b).await?);
        }
        Ok(BridgePlan {
            wanted: wanted.to_vec(),
            prepared,
        })
    }

    /// The second half, which cannot fail: new ones start, changed ones restart with their
    /// spool kept, removed ones stop (their spool stays on disk for when they return).
    pub async fn commit(&mut self, plan: BridgePlan) {
        let BridgePlan { wanted, prepared } = plan;
        for p in &prepared {
            match self.spools.get_mut(&p.cfg.name) {
                Some((cfg, s, _)) if *cfg != p.cfg.spool => {
                    s.reconfigure(p.cfg.spool.clone());
                    *cfg = p.cfg.spool.clone();
                }
                Some(_) => {}
                None => {
                    let entry = (p.cfg.spool.clone(), p.tap.spool.clone(), p.tap.stats.clone());
                    self.spools.insert(p.cfg.name.clone(), entry);
                }
            }
        }
        // Install every tap at once (those of unchanged bridges, and the new ones), so no
        // message falls between an old bridge and its replacement.
        let taps: Vec<Arc<dyn Tap>> = wanted
            .iter()
            .map(|b| match prepared.iter().find(|p| p.cfg.name == b.name) {
                Some(p) => p.tap.clone() as Arc<dyn Tap>,
                None => self.running[&b.name].tap.clone() as Arc<dyn Tap>,
            })
            .collect();
        self.shared.set_taps(taps);
        // Stop what is replaced or removed before its successor connects (same client id).
        let stopping: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.iter().any(|b| &b.name == *n) || prepared.iter().any(|p| &p.cfg.name == *n))
            .cloned()
            .collect();
        for name in stopping {
            let r = self.running.remove(&name).expect("listed above");
            log::info!("bridge {name}: stopping");
            r.stop.cancel();
            let _ = r.task.await;
        }
        for p in prepared {
            let stop = CancellationToken::new();
            let task = tokio::spawn(p.link.run(stop.clone()));
            log::info!("bridge {}: started ({} rules)", p.cfg.name, p.cfg.rules.len());
            self.running.insert(
                p.cfg.name.clone(),
                Running {
                    cfg: p.cfg,
                    tap: p.tap,
                    stop,
                    task,
                },
            );
        }
        *self.controls.lock().expect("controls lock") = self
            .running
            .iter()
            .map(|(n, r)| (n.clone(), r.tap.stats.clone()))
            .collect();
    }

    async fn prepare_one(&self, raw: &config::Bridge) -> Result<Prepared> {
        let (spool, stats) = self.spool(raw).await?;
        let b = &raw.expanded(&self.gateway_id);
        let rules: Arc<Vec<Rule>> = Arc::new(b.compiled.clone());
        let (live_tx, live_rx) = mpsc::channel(1024);
        let tap = Arc::new(BridgeTap {
            name: b.name.clone(),
            rules: rules.clone(),
            spool: spool.clone(),
            live: live_tx,
            stats: stats.clone(),
            max_packet: b.max_packet_size.0 as usize,
            last_too_large_log: Mutex::new(None),
        });
        let link = Link {
            echoes: Default::default(),
            url: b.endpoints()[0].to_string(),
            client_id: b
                .client_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.gateway_id, b.name)),
            status_topic: b
                .status_topic
                .clone()
                .unwrap_or_else(|| format!("outpost/{}/status", self.gateway_id)),
            state_topic: format!("outpost/{}/bridges/{}/state", self.gateway_id, b.name),
            cfg: b.clone(),
            rules,
            spool,
            live: live_rx,
            stats,
            bus: self.bus.clone(),
        };
        Ok(Prepared {
            cfg: raw.clone(),
            tap,
            link,
        })
    }

    /// Every bridge's state, for `outpost status`.
    pub fn states(&self) -> Vec<BridgeState> {
        let mut v: Vec<_> = self
            .running
            .values()
            .map(|r| state(&r.cfg.name, &r.tap.stats, &r.tap.spool))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stops every bridge (each says `offline` upstream) and waits for the spools to be written.
    pub async fn stop_all(&mut self) {
        self.shared.set_taps(vec![]);
        for (_, r) in self.running.drain() {
            r.stop.cancel();
            let _ = r.task.await;
        }
        for (_, s, _) in self.spools.values() {
            s.flush().await;
        }
    }
}

/// Answers admins' bridge requests (the broker lets only them publish on the topic).
async fn admin_requests(mut client: crate::broker::LocalClient, bus: Bus, controls: Controls, gateway_id: String) {
    let prefix = reply_prefix(&gateway_id);
    loop {
        let d = client.recv().await;
        // A retained request would act again at every restart: only live ones count.
        if d.retain {
            continue;
        }
        let m: serde_json::Value = serde_json::from_slice(&d.msg.payload).unwrap_or_default();
        let name = m["bridge"].as_str().unwrap_or_default();
        let action = m["action"].as_str().unwrap_or_default();
        let stats = controls.lock().expect("controls lock").get(name).cloned();
        let reply = match (stats, action) {
            (None, _) => {
                serde_json::json!({ "ok": false, "bridge": name, "error": format!("no running bridge `{name}`") })
            }
            (Some(s), "pause" | "resume" | "restart") => {
                let was = s.paused.swap(action == "pause", Ordering::Relaxed);
                // Resuming a bridge that runs changes nothing; the rest wakes the link.
                if action != "resume" || was {
                    s.kick.notify_one();
                }
                log::info!(target: "outpost::audit", "bridge {name}: {action} asked by an admin");
                serde_json::json!({ "ok": true, "bridge": name, "action": action, "paused": action == "pause" })
            }
            (Some(_), a) => {
                serde_json::json!({ "ok": false, "bridge": name, "error": format!("action `{a}` must be pause, resume or restart") })
            }
        };
        if let Some(to) = m["reply_to"]
            .as_str()
            .filter(|t| t.starts_with(&prefix) && crate::broker::topics::valid_topic(t))
        {
            bus.publish(to, bytes::Bytes::from(reply.to_string()), 1, false, None)
                .await;
        }
    }
}
