//! The task that runs one bridge: stay away while an admin has it paused, connect upstream (to
//! the address `failover` picks, with backoff and jitter), run each connection as a `Session`,
//! and act on how it ended (`Exit`): stop, connect again at once, fail back, or move on. Keeps
//! the link's counters and its local state topic.

use super::failover::{probe_primary, Arrival, Failover, Next};
use super::session::{Echoes, Session};
use super::spool::Spool;
use super::upstream::{UpEvent, Upstream};
use super::LinkStats;
use crate::broker::Bus;
use crate::config;
use crate::config::rules::Rule;
use crate::system::clock::now_ms;
use bytes::Bytes;
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A live QoS 0 message (not spooled), with its remote topic.
pub type Live = super::spool::Entry;

pub struct Link {
    pub cfg: config::Bridge,
    /// Kept across sessions: echoes of what went out just before a disconnect come back after.
    pub echoes: Echoes,
    pub client_id: String,
    /// The address in use (or being tried), one of `cfg.endpoints()`.
    pub url: String,
    pub status_topic: String,
    pub state_topic: String,
    pub rules: Arc<Vec<Rule>>,
    pub spool: Spool,
    pub live: mpsc::Receiver<Live>,
    pub stats: Arc<LinkStats>,
    pub bus: Bus,
}

/// Why a connection to the upstream ended (or never came up), and so what `run` does next.
#[derive(Debug)]
pub(super) enum Exit {
    /// The bridge stops (reload, shutdown): the task ends.
    Stopped,
    /// An admin paused or restarted the bridge: connect again at once (once resumed), to the
    /// same address, the backoff from its start.
    Kicked,
    /// The primary address has been back long enough: connect to it at once.
    FailBack,
    /// The connection failed or broke, for this reason: the next address at once, or the
    /// backoff after a whole round of them.
    Failed(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Exit::Stopped => f.write_str("stopped"),
            Exit::Kicked => f.write_str("paused or restarted by an admin"),
            Exit::FailBack => f.write_str("the primary address is back"),
            Exit::Failed(why) => f.write_str(why),
        }
    }
}

/// The upstream's answer to our CONNECT.
struct Connack {
    session_present: bool,
    /// Its Maximum Packet Size and Receive Maximum (MQTT 5), if it gave them.
    max_packet: Option<u32>,
    receive_max: Option<u16>,
}

/// The user property `backlog.mark` adds: when the message was accepted, ms since the epoch.
pub const BACKLOG_MARK: &str = "outpost-backlog";

impl Link {
    pub async fn run(mut self, stop: CancellationToken) {
        let inbound: Vec<(String, u8)> = self
            .rules
            .iter()
            .filter_map(|r| r.inbound.as_ref().map(|m| (m.filter().to_string(), r.qos)))
            .collect();
        let urls = self.cfg.endpoints().into_iter().map(String::from).collect();
        let mut failover = Failover::new(urls, self.cfg.failover.round_robin);
        loop {
            if self.paused(&stop).await {
                return;
            }
            self.url = failover.url().to_string();
            // The connection is dropped only when the next one is tried (after the backoff).
            let (_up, exit) = match self.connect(&stop).await {
                Ok((mut up, connack)) => {
                    let exit = self.connected(&mut up, connack, &mut failover, &inbound, &stop).await;
                    (Some(up), exit)
                }
                // Never connected: nothing to say upstream, nothing new on the state topic.
                Err(Exit::Stopped) => return,
                // Before the CONNACK: pause or connect again at once, the backoff as it was.
                Err(Exit::Kicked) => continue,
                Err(exit) => (None, exit),
            };
            match exit {
                // Goodbye said upstream.
                Exit::Stopped => {
                    self.publish_state().await;
                    return;
                }
                // Pause or connect again at once (to the primary when failing back; what was in
                // flight is re-sent there).
                Exit::Kicked | Exit::FailBack => {
                    log::info!("bridge {}: {exit}, left {}", self.cfg.name, self.url);
                    failover.reset_backoff();
                    if matches!(exit, Exit::FailBack) {
                        failover.fail_back();
                    }
                    self.publish_state().await;
                }
                Exit::Failed(why) => {
                    self.failed(&why);
                    if self.next_address(&mut failover, &stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// While an admin has the bridge paused: stays away from the upstream until resumed. True
    /// when stopped meanwhile.
    async fn paused(&mut self, stop: &CancellationToken) -> bool {
        while self.stats.paused.load(Ordering::Relaxed) {
            self.publish_state().await;
            tokio::select! {
                _ = self.stats.kick.notified() => {}
                _ = stop.cancelled() => return true,
            }
        }
        false
    }

    /// Connects to `self.url` and waits for the CONNACK. `Err`: why not (`Failed`), or an
    /// admin's kick or the stop came first.
    async fn connect(&mut self, stop: &CancellationToken) -> Result<(Upstream, Connack), Exit> {
        // Reads certificates and the password file: off the async threads.
        let (cfg, id, topic, url) = (
            self.cfg.clone(),
            self.client_id.clone(),
            self.status_topic.clone(),
            self.url.clone(),
        );
        let made = tokio::task::spawn_blocking(move || Upstream::new(&cfg, &url, &id, &topic)).await;
        let mut up = made
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .map_err(|e| Exit::Failed(format!("{e:#}")))?;
        loop {
            tokio::select! {
                ev = up.poll() => match ev {
                    Ok(UpEvent::Connected { session_present, max_packet, receive_max }) => {
                        return Ok((up, Connack { session_present, max_packet, receive_max }));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(Exit::Failed(e)),
                },
                _ = self.stats.kick.notified() => return Err(Exit::Kicked),
                _ = stop.cancelled() => return Err(Exit::Stopped),
            }
        }
    }

    /// One connection from its CONNACK to its end: the counters and the state topic, the
    /// limits that apply, the probe of the primary for the fail back, and the session itself.
    async fn connected(
        &mut self,
        up: &mut Upstream,
        connack: Connack,
        failover: &mut Failover,
        inbound: &[(String, u8)],
        stop: &CancellationToken,
    ) -> Exit {
        let start = Instant::now();
        match failover.connected() {
            Arrival::First => {}
            Arrival::Again => {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            Arrival::Moved => {
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        *self.stats.url.lock().expect("stats lock") = Some(self.url.clone());
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.since_ms.store(now_ms(), Ordering::Relaxed);
        log::info!(
            "bridge {}: connected to {} (session present: {})",
            self.cfg.name,
            self.url,
            connack.session_present
        );
        self.publish_state().await;
        // The smaller of ours and the upstream's limit applies to every message sent.
        let ours = self.cfg.max_packet_size.0 as usize;
        let limit = connack.max_packet.map_or(ours, |m| (m as usize).min(ours));
        // No more in flight than the upstream's Receive Maximum allows (MQTT 5).
        let window = connack
            .receive_max
            .map_or(self.cfg.inflight, |r| r.min(self.cfg.inflight)) as usize;
        // On another address than the primary (and not round robin): watch the primary.
        let (back_tx, back_rx) = tokio::sync::oneshot::channel();
        let probe = failover.primary_to_watch().map(|primary| {
            let f = &self.cfg.failover;
            tokio::spawn(probe_primary(
                primary.to_string(),
                f.probe.0,
                f.fail_back_after.0,
                back_tx,
            ))
        });
        let exit = Session::open(self, up, inbound, connack.session_present, limit, window)
            .await
            .run(back_rx, stop)
            .await;
        if let Some(p) = probe {
            p.abort();
        }
        failover.ended(start.elapsed());
        self.stats.connected.store(false, Ordering::Relaxed);
        self.stats.stalled.store(false, Ordering::Relaxed);
        self.stats.since_ms.store(now_ms(), Ordering::Relaxed);
        exit
    }

    /// After a failure on the address in use: the next address at once, or the backoff once
    /// every address failed in a row. True when stopped meanwhile.
    async fn next_address(&mut self, failover: &mut Failover, stop: &CancellationToken) -> bool {
        match failover.failed() {
            Next::AtOnce => {
                self.publish_state().await;
                stop.is_cancelled()
            }
            Next::Backoff => {
                let b = &self.cfg.backoff;
                let cap = failover.backoff(b.min.0, b.max.0);
                self.backoff(cap, stop).await
            }
        }
    }

    /// Records a failed connection; TLS failures also name the certificates in use.
    fn failed(&self, e: &str) {
        let mut msg = format!("{e} ({})", self.url);
        if e.contains("TLS") || e.contains("certificate") {
            let tls = self.cfg.tls.as_ref();
            let ca = tls
                .and_then(|t| t.ca.as_ref())
                .map_or("the system's CA roots".to_string(), |p| format!("CA {}", p.display()));
            let cert = tls
                .and_then(|t| t.cert.as_ref())
                .map_or("no client certificate".to_string(), |p| {
                    format!("client certificate {}", p.display())
                });
            let host = crate::config::Endpoint::parse(&self.url)
                .map(|e| e.host)
                .unwrap_or_default();
            msg = format!("{msg}; server name {host}, checked against {ca}, {cert}");
        }
        log::warn!("bridge {}: {msg}", self.cfg.name);
        *self.stats.last_error.lock().expect("stats lock") = Some(msg);
    }

    /// Sleeps the backoff with full jitter below `cap`; true when stopped meanwhile.
    async fn backoff(&mut self, cap: Duration, stop: &CancellationToken) -> bool {
        self.publish_state().await;
        let wait = Duration::from_secs_f64(
            rand::rng()
                .random_range(0.0..=cap.as_secs_f64())
                .max(self.cfg.backoff.min.0.as_secs_f64() / 4.0),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = self.stats.kick.notified() => false,
            _ = stop.cancelled() => true,
        }
    }

    /// The bridge's state on its local state topic, retained.
    pub(super) async fn publish_state(&self) {
        let state = super::state(&self.cfg.name, &self.stats, &self.spool);
        self.bus
            .publish(
                &self.state_topic,
                Bytes::from(serde_json::to_vec(&state).unwrap_or_default()),
                0,
                true,
                Some(&self.cfg.name),
            )
            .await;
    }
}
