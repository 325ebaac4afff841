//! The task that runs one bridge: connect upstream with backoff and jitter, send the spool in
//! order and delete each message only when the upstream acknowledged it, bring inbound
//! messages into the local broker, and report state.

use super::spool::{now_ms, Spool};
use super::upstream::{UpEvent, Upstream};
use super::LinkStats;
use crate::broker::Bus;
use crate::config;
use crate::config::rules::Rule;
use bytes::Bytes;
use rand::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
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

/// What was handed to rumqttc and not yet seen going out.
enum Submitted {
    Spooled { id: i64, qos: u8 },
    Other,
}

/// Messages this bridge sent upstream recently, to drop them if the upstream echoes them back
/// (brokers that ignore MQTT 5 No Local, and 3.1.1 which has none).
#[derive(Default)]
pub struct Echoes {
    sent: HashMap<(String, u64), (u32, Instant)>,
}

fn digest(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

const ECHO_WINDOW: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// How `serve` ends when an admin paused or restarted the bridge.
const ADMIN_KICK: &str = "paused or restarted by an admin";
/// How long a resumed session's QoS 2 messages may take to finish before the bridge starts over.
const RESUME_WITHIN: Duration = Duration::from_secs(10);
/// The user property `backlog.mark` adds: when the message was accepted, ms since the epoch.
pub const BACKLOG_MARK: &str = "outpost-backlog";

/// One pass over the spool in id order, holding the messages it takes that are not handed
/// over yet.
struct Reader {
    /// Highest spool id read.
    cursor: i64,
    ahead: VecDeque<super::spool::Message>,
    /// Read to the end; set again to look for more.
    caught_up: bool,
}

impl Reader {
    fn from(cursor: i64) -> Reader {
        Reader {
            cursor,
            ahead: VecDeque::new(),
            caught_up: false,
        }
    }

    /// Whether a message is ready at the front, reading on while what is read is not `ours`.
    async fn next(&mut self, spool: &Spool, ours: impl Fn(&super::spool::Message) -> bool) -> bool {
        while self.ahead.is_empty() {
            if self.caught_up {
                return false;
            }
            let read = spool.read(self.cursor, 512).await;
            let Some(last) = read.last().map(|m| m.id) else {
                self.caught_up = true;
                return false;
            };
            self.cursor = last;
            self.ahead.extend(read.into_iter().filter(|m| ours(m)));
        }
        true
    }
}

/// How `serve` ends when the primary address has been back long enough.
const FAIL_BACK: &str = "the primary address is back";

impl Echoes {
    fn sent(&mut self, topic: &str, payload: &[u8]) {
        let e = self
            .sent
            .entry((topic.to_string(), digest(payload)))
            .or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
    }
    fn is_echo(&mut self, topic: &str, payload: &[u8]) -> bool {
        let key = (topic.to_string(), digest(payload));
        match self.sent.get_mut(&key) {
            Some((n, t)) if t.elapsed() < ECHO_WINDOW => {
                *n -= 1;
                if *n == 0 {
                    self.sent.remove(&key);
                }
                true
            }
            _ => false,
        }
    }
    fn prune(&mut self) {
        self.sent.retain(|_, (_, t)| t.elapsed() < ECHO_WINDOW);
    }
}

/// Token bucket for `drain_rate`.
struct Pace {
    rate: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl Pace {
    fn take(&mut self) -> bool {
        let Some(rate) = self.rate else { return true };
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Link {
    pub async fn run(mut self, stop: CancellationToken) {
        let name = self.cfg.name.clone();
        let inbound: Vec<(String, u8)> = self
            .rules
            .iter()
            .filter_map(|r| r.inbound.as_ref().map(|m| (m.filter().to_string(), r.qos)))
            .collect();
        let mut attempt = 0u32;
        let mut first = true;
        let urls: Vec<String> = self.cfg.endpoints().into_iter().map(String::from).collect();
        // The address to try next, and how many failed in a row since the last connection.
        let mut at = 0usize;
        let mut failed_in_row = 0usize;
        let mut last_connected: Option<usize> = None;
        loop {
            // Paused by an admin: stay away from the upstream until resumed.
            while self.stats.paused.load(Ordering::Relaxed) {
                self.publish_state().await;
                tokio::select! {
                    _ = self.stats.kick.notified() => {}
                    _ = stop.cancelled() => return,
                }
            }
            self.url = urls[at].clone();
            // Reads certificates and the password file: off the async threads.
            let (cfg, id, topic, url) = (
                self.cfg.clone(),
                self.client_id.clone(),
                self.status_topic.clone(),
                self.url.clone(),
            );
            let made = tokio::task::spawn_blocking(move || Upstream::new(&cfg, &url, &id, &topic)).await;
            let mut up = match made.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(u) => u,
                Err(e) => {
                    self.failed(&format!("{e:#}"));
                    if self
                        .next_address(urls.len(), &mut at, &mut failed_in_row, &mut attempt, &stop)
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            // Connect.
            let connected = loop {
                tokio::select! {
                    ev = up.poll() => match ev {
                        Ok(UpEvent::Connected { session_present, max_packet, receive_max }) => break Ok((session_present, max_packet, receive_max)),
                        Ok(_) => {}
                        Err(e) => break Err(e),
                    },
                    _ = self.stats.kick.notified() => break Err(ADMIN_KICK.to_string()),
                    _ = stop.cancelled() => return,
                }
            };
            let (session_present, server_max, receive_max) = match connected {
                Ok(s) => s,
                Err(e) if e == ADMIN_KICK => continue,
                Err(e) => {
                    self.failed(&e);
                    if self
                        .next_address(urls.len(), &mut at, &mut failed_in_row, &mut attempt, &stop)
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            failed_in_row = 0;
            if last_connected.is_some_and(|l| l != at) {
                self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            }
            last_connected = Some(at);
            *self.stats.url.lock().expect("stats lock") = Some(self.url.clone());
            let session_start = Instant::now();
            if !first {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            self.stats.connected.store(true, Ordering::Relaxed);
            self.stats.since_ms.store(now_ms(), Ordering::Relaxed);
            log::info!(
                "bridge {name}: connected to {} (session present: {session_present})",
                self.url
            );
            self.publish_state().await;
            // The smaller of ours and the upstream's limit applies to every message sent.
            let ours = self.cfg.max_packet_size.0 as usize;
            let limit = server_max.map_or(ours, |m| (m as usize).min(ours));
            // On another address than the primary (and not round robin): watch the primary.
            let (back_tx, back_rx) = tokio::sync::oneshot::channel();
            let probe = (at != 0 && !self.cfg.failover.round_robin).then(|| {
                let f = &self.cfg.failover;
                tokio::spawn(probe_primary(urls[0].clone(), f.probe.0, f.fail_back_after.0, back_tx))
            });
            // No more in flight than the upstream's Receive Maximum allows (MQTT 5).
            let window = receive_max.map_or(self.cfg.inflight, |r| r.min(self.cfg.inflight)) as usize;
            let end = self
                .serve(&mut up, session_present, &inbound, limit, window, back_rx, &stop)
                .await;
            if let Some(p) = probe {
                p.abort();
            }
            if session_start.elapsed() >= STABLE {
                attempt = 0;
            }
            self.stats.connected.store(false, Ordering::Relaxed);
            self.stats.stalled.store(false, Ordering::Relaxed);
            self.stats.since_ms.store(now_ms(), Ordering::Relaxed);
            match end {
                Ok(()) => {
                    // Stopped (serve said goodbye upstream).
                    self.publish_state().await;
                    return;
                }
                Err(e) if e == ADMIN_KICK || e == FAIL_BACK => {
                    // Then pause or connect again at once (to the primary when failing back;
                    // what was in flight is re-sent there).
                    log::info!("bridge {name}: {e}, left {}", self.url);
                    attempt = 0;
                    if e == FAIL_BACK {
                        at = 0;
                    }
                    self.publish_state().await;
                }
                Err(e) => {
                    self.failed(&e);
                    if self
                        .next_address(urls.len(), &mut at, &mut failed_in_row, &mut attempt, &stop)
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// After a failure on address `at`: the next address at once while some in this round are
    /// untried, the backoff once all failed in a row (then the primary first again, unless
    /// round robin). True when stopped meanwhile.
    async fn next_address(
        &mut self,
        n: usize,
        at: &mut usize,
        failed_in_row: &mut usize,
        attempt: &mut u32,
        stop: &CancellationToken,
    ) -> bool {
        *failed_in_row += 1;
        *at = (*at + 1) % n;
        if *failed_in_row < n {
            self.publish_state().await;
            return stop.is_cancelled();
        }
        *failed_in_row = 0;
        if !self.cfg.failover.round_robin {
            *at = 0;
        }
        self.backoff(attempt, stop).await
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

    /// Sleeps the backoff with full jitter; true when stopped meanwhile.
    async fn backoff(&mut self, attempt: &mut u32, stop: &CancellationToken) -> bool {
        self.publish_state().await;
        let b = &self.cfg.backoff;
        let cap = b.max.0.min(b.min.0.saturating_mul(1u32 << (*attempt).min(20)));
        *attempt += 1;
        let wait = Duration::from_secs_f64(
            rand::rng()
                .random_range(0.0..=cap.as_secs_f64())
                .max(b.min.0.as_secs_f64() / 4.0),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = self.stats.kick.notified() => false,
            _ = stop.cancelled() => true,
        }
    }

    /// Runs one connected session until it breaks (`Err`) or the bridge stops (`Ok`).
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        up: &mut Upstream,
        session_present: bool,
        inbound: &[(String, u8)],
        max_packet: usize,
        window: usize,
        fail_back: tokio::sync::oneshot::Receiver<()>,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        // Fires only when the probe says so (a probe that is not running never does).
        let fail_back = async {
            if fail_back.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(fail_back);
        let stats = self.stats.clone();
        // Fired by an inbound message a local store could not keep: a new connection makes the
        // upstream send it again.
        let not_kept = Arc::new(tokio::sync::Notify::new());
        // Saying goodbye (stop, admin, fail back): how it will end, and by when. Events are
        // handled as usual meanwhile, so what rumqttc still sends is recorded.
        let mut leaving: Option<(Result<(), String>, Instant)> = None;
        // The spool in id order; with `backlog.live_first` a second reader takes what came in
        // after the connection, on topics that had nothing waiting, ahead of the first.
        let mut main = Reader::from(0);
        let live_first = self.cfg.backlog.live_first;
        let (boundary, backlog_topics) = if live_first || self.cfg.backlog.mark {
            self.spool.backlog(live_first).await
        } else {
            (0, HashSet::new())
        };
        let mut live = Reader::from(boundary);
        let mut submitted: VecDeque<Submitted> = VecDeque::new();
        // Packet id → (spool id, when it went out, QoS).
        let mut in_flight: HashMap<u16, (i64, Instant, u8)> = HashMap::new();
        let mut acks: Vec<i64> = vec![];
        // QoS 2 progress to record: (spool id, packet id, PUBREC received).
        let mut marks: Vec<(i64, u16, bool)> = vec![];
        // QoS 2 messages of a resumed session being finished (packet ids), and their spool ids,
        // which the reads below pass over. Nothing new goes out until they are done, so no
        // packet id rumqttc hands out can meet one of theirs.
        let mut resuming: HashSet<u16> = HashSet::new();
        let mut skip: HashSet<i64> = HashSet::new();
        let mut pace = Pace {
            rate: self.cfg.drain_rate.map(|r| r.0),
            tokens: 1.0,
            last: Instant::now(),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut last_state = Instant::now();
        let watch_echoes = !inbound.is_empty();

        let (items, had_rec) = self.spool.session(&self.url, session_present).await;
        if had_rec > 0 {
            log::info!(
                "bridge {}: no session of ours on {}: {had_rec} QoS 2 messages it had answered with PUBREC go again \
                 (a broker that delivers at PUBREL never delivered them; one that delivers at PUBREC shows them twice)",
                self.cfg.name,
                self.url
            );
        }
        if !items.is_empty() {
            if items.len() <= window && up.resume(&items, self.cfg.inflight, self.cfg.strip_retain) {
                log::info!(
                    "bridge {}: the upstream kept the session; finishing {} QoS 2 messages of it",
                    self.cfg.name,
                    items.len()
                );
                for i in &items {
                    in_flight.insert(i.pkid, (i.msg.id, Instant::now(), 2));
                    resuming.insert(i.pkid);
                    skip.insert(i.msg.id);
                    if !i.rec {
                        // Its `Sent` event comes before any other.
                        submitted.push_back(Submitted::Other);
                    }
                }
            } else {
                log::warn!(
                    "bridge {}: {} QoS 2 messages of the last session do not fit this connection's window ({window}) \
                     or ids (`inflight` {}); sent again as new messages",
                    self.cfg.name,
                    items.len(),
                    self.cfg.inflight
                );
                self.spool.session(&self.url, false).await;
            }
        }
        let resume_by = Instant::now() + RESUME_WITHIN;
        let mut greeted = false;

        loop {
            if let Some((_, by)) = &leaving {
                if Instant::now() >= *by {
                    self.record(&mut marks, &mut acks);
                    return leaving.take().expect("leaving").0;
                }
            }
            if resuming.is_empty() && !greeted && leaving.is_none() {
                greeted = true;
                if !up.subscribe(inbound) {
                    return Err("cannot queue SUBSCRIBE".into());
                }
                if self.say(up, b"online") {
                    submitted.push_back(Submitted::Other);
                }
            }
            // Hand over as much as the window, the pace and rumqttc's queue allow.
            while resuming.is_empty() && leaving.is_none() && in_flight.len() + submitted.len() < window {
                let src = if live_first
                    && live
                        .next(&self.spool, |m| m.id > boundary && !backlog_topics.contains(&m.topic))
                        .await
                {
                    &mut live
                } else if main
                    .next(&self.spool, |m| {
                        !skip.contains(&m.id) && (!live_first || m.id <= boundary || backlog_topics.contains(&m.topic))
                    })
                    .await
                {
                    &mut main
                } else {
                    break;
                };
                if !pace.take() {
                    break;
                }
                let m = src.ahead.front().expect("not empty");
                // Checked again here: the limit may have shrunk (reload, the upstream's CONNACK),
                // and one message the upstream cannot take must not block the rest.
                if m.topic.len() + m.payload.len() + 16 + m.props.as_ref().map_or(0, |p| p.wire_len()) > max_packet {
                    let m = src.ahead.pop_front().expect("not empty");
                    stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "bridge {}: spooled message on {} is over the upstream's {max_packet} bytes; dropped",
                        self.cfg.name,
                        m.topic
                    );
                    acks.push(m.id);
                    continue;
                }
                // What is left of the spool's max_age goes with it, so the upstream drops it too.
                let expiry = self.cfg.message_expiry.then(|| {
                    let left = self.cfg.spool.max_age.0.as_millis() as i64 - (now_ms() - m.ts_ms);
                    (left / 1000).clamp(1, u32::MAX as i64) as u32
                });
                // Backlog is marked with when it was accepted.
                let marked = (self.cfg.backlog.mark && m.id <= boundary).then(|| {
                    let mut p = m.props.as_deref().cloned().unwrap_or_default();
                    p.user_properties.push((BACKLOG_MARK.to_string(), m.ts_ms.to_string()));
                    p
                });
                if !up.publish_with(
                    &m.topic,
                    &m.payload,
                    m.qos,
                    m.retain && !self.cfg.strip_retain,
                    marked.as_ref().or(m.props.as_deref()),
                    expiry,
                ) {
                    break;
                }
                let m = src.ahead.pop_front().expect("not empty");
                if watch_echoes {
                    self.echoes.sent(&m.topic, &m.payload);
                }
                submitted.push_back(Submitted::Spooled { id: m.id, qos: m.qos });
            }
            self.record(&mut marks, &mut acks);
            if !resuming.is_empty() && Instant::now() >= resume_by && leaving.is_none() {
                // Going on would let new packet ids meet theirs: start over instead.
                return Err(format!(
                    "the upstream did not finish {} QoS 2 messages of the resumed session within {RESUME_WITHIN:?}",
                    resuming.len()
                ));
            }

            tokio::select! {
                ev = up.poll() => match ev {
                    Err(e) => {
                        self.record(&mut marks, &mut acks);
                        // Leaving: the goodbye ends that way too.
                        return match leaving.take() {
                            Some((end, _)) => end,
                            None => Err(e),
                        };
                    }
                    Ok(UpEvent::Sent(pkid)) => match submitted.pop_front() {
                        Some(Submitted::Spooled { id, qos: 0 }) => {
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                            acks.push(id);
                        }
                        Some(Submitted::Spooled { id, qos }) => {
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                            in_flight.insert(pkid, (id, Instant::now(), qos));
                            if qos == 2 {
                                marks.push((id, pkid, false));
                            }
                        }
                        Some(Submitted::Other) | None => {}
                    },
                    Ok(UpEvent::Received { pkid, refused }) => {
                        if let Some(&(id, _, 2)) = in_flight.get(&pkid) {
                            let refused_for_good = refused.is_some();
                            // Not now: the upstream freed the id; a reconnect sends it again.
                            if let Err(e) = self.refusal(refused) {
                                self.record(&mut marks, &mut acks);
                                return Err(e);
                            }
                            if refused_for_good {
                                // rumqttc keeps the refused message's in-flight slot for good:
                                // a new connection gives it back.
                                acks.push(id);
                                self.record(&mut marks, &mut acks);
                                return Err("upstream refused a QoS 2 message; reconnecting".into());
                            }
                            marks.push((id, pkid, true));
                        }
                    }
                    Ok(UpEvent::Acked { pkid, refused, reset }) => {
                        resuming.remove(&pkid);
                        if let Some((id, _, _)) = in_flight.remove(&pkid) {
                            if let Err(e) = self.refusal(refused) {
                                self.record(&mut marks, &mut acks);
                                return Err(e);
                            }
                            acks.push(id);
                        }
                        if reset {
                            // A PUBCOMP with a failure code: rumqttc keeps its slot for good.
                            self.record(&mut marks, &mut acks);
                            return Err("the upstream answered PUBREL with a failure code; reconnecting".into());
                        }
                    }
                    Ok(UpEvent::Message { topic, payload, qos, retain, props, ack }) => {
                        let mapped = self.rules.iter().find_map(|r| r.inbound.as_ref().and_then(|m| m.map(&topic)).map(|t| (t, r.qos)));
                        if watch_echoes && self.echoes.is_echo(&topic, &payload) {
                            stats.echoes.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(ack.send());
                        } else if let Some((local, q)) = mapped {
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            // Routed here, in order; acknowledged upstream only once every
                            // persistent session and spool it went to has it on disk.
                            let waits = self
                                .bus
                                .publish_durable(&local, payload, q.min(qos), retain, Some(&self.cfg.name), props, true)
                                .await;
                            let (stats, name, not_kept) = (stats.clone(), self.cfg.name.clone(), not_kept.clone());
                            tokio::spawn(async move {
                                for w in waits {
                                    if w.await.is_err() {
                                        stats.inbound_not_kept.fetch_add(1, Ordering::Relaxed);
                                        log::error!("bridge {name}: an inbound message could not be stored locally; not acknowledged upstream");
                                        not_kept.notify_one();
                                        return;
                                    }
                                }
                                ack.send().await;
                            });
                        } else {
                            tokio::spawn(ack.send());
                        }
                    }
                    Ok(UpEvent::Closed) if leaving.is_some() => {
                        self.record(&mut marks, &mut acks);
                        return leaving.take().expect("leaving").0;
                    }
                    Ok(UpEvent::Connected { .. } | UpEvent::Closed | UpEvent::Other) => {}
                },
                qos0 = self.live.recv() => {
                    // `drain_rate` caps every publish (an upstream quota counts them all); a QoS 0
                    // message over it is dropped and counted, as when the link is busy.
                    if let Some(m) = qos0 {
                        if pace.take() && up.publish_with(&m.topic, &m.payload, 0, m.retain && !self.cfg.strip_retain, m.props.as_deref(), None) {
                            if watch_echoes {
                                self.echoes.sent(&m.topic, &m.payload);
                            }
                            submitted.push_back(Submitted::Other);
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ = self.spool.appended.notified(), if main.caught_up && (!live_first || live.caught_up) => {
                    main.caught_up = false;
                    live.caught_up = false;
                }
                _ = tick.tick() => {
                    main.caught_up = false;
                    live.caught_up = false;
                    let stall = self.cfg.stall_after.0;
                    let stalled = in_flight.values().any(|(_, t, _)| t.elapsed() >= stall);
                    if stats.stalled.swap(stalled, Ordering::Relaxed) != stalled {
                        if stalled {
                            log::warn!(
                                "bridge {}: stalled: connected to {}, but no ack for {} for a message in flight",
                                self.cfg.name,
                                self.url,
                                self.cfg.stall_after
                            );
                        } else {
                            log::info!("bridge {}: acks move again", self.cfg.name);
                        }
                        self.publish_state().await;
                    }
                    if last_state.elapsed() >= Duration::from_secs(5) {
                        last_state = Instant::now();
                        self.echoes.prune();
                        self.publish_state().await;
                    }
                }
                _ = not_kept.notified() => {
                    self.record(&mut marks, &mut acks);
                    return Err("an inbound message could not be kept locally; reconnecting so the upstream sends it again".into());
                }
                _ = stats.kick.notified(), if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Err(ADMIN_KICK.into())),
                _ = &mut fail_back, if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Err(FAIL_BACK.into())),
                _ = stop.cancelled(), if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Ok(())),
            }
        }
    }

    /// Hands the acks and QoS 2 marks gathered so far to the spool.
    fn record(&self, marks: &mut Vec<(i64, u16, bool)>, acks: &mut Vec<i64>) {
        self.spool.mark(std::mem::take(marks));
        self.spool.ack(std::mem::take(acks));
    }

    /// An upstream's MQTT 5 refusal of a message in flight: `Err` (ends the connection; the
    /// message stays and goes again) when it is for now (quota, busy); counted and logged when
    /// it is for good, and the message is the caller's to drop.
    fn refusal(&self, refused: Option<(String, bool)>) -> Result<(), String> {
        match refused {
            Some((why, false)) => Err(format!("upstream refused a message for now: {why}")),
            Some((why, true)) => {
                self.stats.dropped_refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("bridge {}: upstream refused a message: {why}", self.cfg.name);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The bridge's status upstream (`online` / `offline`), retained unless `strip_retain`.
    fn say(&self, up: &Upstream, what: &'static [u8]) -> bool {
        up.publish(&self.status_topic, &Bytes::from_static(what), 1, !self.cfg.strip_retain)
    }

    /// Says goodbye upstream (retained `offline`, then DISCONNECT) and lets `serve` go on
    /// handling events until the DISCONNECT is out (a second at most), so what rumqttc still
    /// sends meanwhile is recorded like the rest.
    fn leave(
        &self,
        up: &Upstream,
        leaving: &mut Option<(Result<(), String>, Instant)>,
        submitted: &mut VecDeque<Submitted>,
        end: Result<(), String>,
    ) {
        if self.say(up, b"offline") {
            submitted.push_back(Submitted::Other);
        }
        let by = if up.request_disconnect() {
            Instant::now() + Duration::from_secs(1)
        } else {
            Instant::now()
        };
        *leaving = Some((end, by));
    }

    async fn publish_state(&self) {
        let state = super::state_json(&self.cfg.name, &self.stats, &self.spool);
        self.bus
            .publish(
                &self.state_topic,
                Bytes::from(state.to_string()),
                0,
                true,
                Some(&self.cfg.name),
            )
            .await;
    }
}

/// Sends on `back` once the primary has accepted TCP connections for `needed`, probed every
/// `every` (the bridge's session elsewhere goes on meanwhile).
async fn probe_primary(url: String, every: Duration, needed: Duration, back: tokio::sync::oneshot::Sender<()>) {
    let Ok(ep) = crate::config::Endpoint::parse(&url) else {
        return;
    };
    let mut up_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let reachable = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if !reachable {
            up_since = None;
            continue;
        }
        if up_since.get_or_insert_with(Instant::now).elapsed() >= needed {
            let _ = back.send(());
            return;
        }
    }
}
