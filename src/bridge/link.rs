//! The task that runs one bridge: connect upstream with backoff and jitter, send the spool in
//! order and delete each message only when the upstream acknowledged it, bring inbound
//! messages into the local broker, and report state.

use super::failover::{probe_primary, Arrival, Failover, Next};
use super::rules::Rule;
use super::spool::{now_ms, Spool};
use super::upstream::{UpEvent, Upstream};
use super::LinkStats;
use crate::broker::Bus;
use crate::config;
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

/// Why a connection to the upstream ended (or never came up), and so what `run` does next.
#[derive(Debug)]
enum Exit {
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
        let exit = self
            .serve(up, connack.session_present, inbound, limit, window, back_rx, stop)
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

    /// Runs one connected session until it ends, and says why.
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
    ) -> Exit {
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
        let mut leaving: Option<(Exit, Instant)> = None;
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
                    self.record(&mut marks, &mut acks);
                    return Exit::Failed("cannot queue SUBSCRIBE".into());
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
                return Exit::Failed(format!(
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
                            None => Exit::Failed(e),
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
                                return e;
                            }
                            if refused_for_good {
                                // rumqttc keeps the refused message's in-flight slot for good:
                                // a new connection gives it back.
                                acks.push(id);
                                self.record(&mut marks, &mut acks);
                                return Exit::Failed("upstream refused a QoS 2 message; reconnecting".into());
                            }
                            marks.push((id, pkid, true));
                        }
                    }
                    Ok(UpEvent::Acked { pkid, refused, reset }) => {
                        resuming.remove(&pkid);
                        if let Some((id, _, _)) = in_flight.remove(&pkid) {
                            if let Err(e) = self.refusal(refused) {
                                self.record(&mut marks, &mut acks);
                                return e;
                            }
                            acks.push(id);
                        }
                        if reset {
                            // A PUBCOMP with a failure code: rumqttc keeps its slot for good.
                            self.record(&mut marks, &mut acks);
                            return Exit::Failed("the upstream answered PUBREL with a failure code; reconnecting".into());
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
                    return Exit::Failed("an inbound message could not be kept locally; reconnecting so the upstream sends it again".into());
                }
                _ = stats.kick.notified(), if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Exit::Kicked),
                _ = &mut fail_back, if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Exit::FailBack),
                _ = stop.cancelled(), if leaving.is_none() => self.leave(up, &mut leaving, &mut submitted, Exit::Stopped),
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
    fn refusal(&self, refused: Option<(String, bool)>) -> Result<(), Exit> {
        match refused {
            Some((why, false)) => Err(Exit::Failed(format!("upstream refused a message for now: {why}"))),
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
        leaving: &mut Option<(Exit, Instant)>,
        submitted: &mut VecDeque<Submitted>,
        end: Exit,
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
