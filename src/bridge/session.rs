//! One connected session of a bridge, from the upstream's CONNACK to its end: finish the QoS 2
//! messages of a resumed session first, then subscribe and say `online`; send the spool in
//! order within the window and `drain_rate` (with `backlog.live_first`, new messages on topics
//! without backlog ahead of the backlog), and delete each message only once the upstream
//! acknowledged it; bring inbound messages into the local broker and acknowledge them upstream
//! once they are safe; drop echoes; report `stalled`; say goodbye. The state is a `Session`;
//! how it ends is a `link::Exit`.

use super::link::{Exit, Link, Live, BACKLOG_MARK};
use super::spool::{Message, Spool};
use super::upstream::{Ack, UpEvent, Upstream};
use crate::broker::router::message::Props;
use crate::system::clock::now_ms;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// How long a resumed session's QoS 2 messages may take to finish before the bridge starts over.
const RESUME_WITHIN: Duration = Duration::from_secs(10);
const ECHO_WINDOW: Duration = Duration::from_secs(10);

/// What was handed to rumqttc and not yet seen going out.
enum Submitted {
    Spooled { id: i64, qos: u8 },
    Other,
}

/// Messages this bridge sent upstream recently, to drop them if the upstream echoes them back
/// (brokers that ignore MQTT 5 No Local, and 3.1.1 which has none). Kept across sessions:
/// echoes of what went out just before a disconnect come back after.
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

/// One pass over the spool in id order, holding the messages it takes that are not handed
/// over yet.
struct Reader {
    /// Highest spool id read.
    cursor: i64,
    ahead: VecDeque<Message>,
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
    async fn next(&mut self, spool: &Spool, ours: impl Fn(&Message) -> bool) -> bool {
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

/// The order the spool goes out in: by id; with `backlog.live_first` a second reader takes
/// what came in after the connection, on topics that had nothing waiting, ahead of the first.
struct Order {
    main: Reader,
    live: Reader,
    live_first: bool,
    /// The highest spool id when the connection came up: the backlog is at or below it.
    boundary: i64,
    /// The backlog's topics (with `live_first`).
    backlog_topics: HashSet<String>,
    /// Spool ids of a resumed session's QoS 2 messages, which `main` passes over.
    skip: HashSet<i64>,
    /// The next message is the live reader's (as `next` found).
    from_live: bool,
}

impl Order {
    async fn new(spool: &Spool, live_first: bool, mark: bool) -> Order {
        let (boundary, backlog_topics) = if live_first || mark {
            spool.backlog(live_first).await
        } else {
            (0, HashSet::new())
        };
        Order {
            main: Reader::from(0),
            live: Reader::from(boundary),
            live_first,
            boundary,
            backlog_topics,
            skip: HashSet::new(),
            from_live: false,
        }
    }

    /// Whether a message is ready to go (then `front`, `pop`): the live reader's first.
    async fn next(&mut self, spool: &Spool) -> bool {
        let (live_first, boundary, topics, skip) = (self.live_first, self.boundary, &self.backlog_topics, &self.skip);
        self.from_live = live_first
            && self
                .live
                .next(spool, |m| m.id > boundary && !topics.contains(&m.topic))
                .await;
        self.from_live
            || self
                .main
                .next(spool, |m| {
                    !skip.contains(&m.id) && (!live_first || m.id <= boundary || topics.contains(&m.topic))
                })
                .await
    }

    fn front(&self) -> &Message {
        let r = if self.from_live { &self.live } else { &self.main };
        r.ahead.front().expect("next found one")
    }

    fn pop(&mut self) -> Message {
        let r = if self.from_live { &mut self.live } else { &mut self.main };
        r.ahead.pop_front().expect("next found one")
    }

    /// Both readers read to the end: only an append (or the tick) gives them more to read.
    fn caught_up(&self) -> bool {
        self.main.caught_up && (!self.live_first || self.live.caught_up)
    }

    /// Makes both readers look for more.
    fn read_on(&mut self) {
        self.main.caught_up = false;
        self.live.caught_up = false;
    }
}

/// One connection's state, from the CONNACK to its end.
pub struct Session<'a> {
    link: &'a mut Link,
    up: &'a mut Upstream,
    /// The inbound rules' filters and QoS, subscribed once a resumed session is finished.
    inbound: &'a [(String, u8)],
    /// The smaller of ours and the upstream's packet limit.
    max_packet: usize,
    /// How many messages may be in flight or handed to rumqttc at once.
    window: usize,
    /// Inbound rules exist, so what goes out may come back.
    watch_echoes: bool,
    order: Order,
    pace: Pace,
    submitted: VecDeque<Submitted>,
    /// Packet id → (spool id, when it went out, QoS).
    in_flight: HashMap<u16, (i64, Instant, u8)>,
    /// Spool ids to delete, gathered until the next `record`.
    acks: Vec<i64>,
    /// QoS 2 progress to record: (spool id, packet id, PUBREC received).
    marks: Vec<(i64, u16, bool)>,
    /// QoS 2 messages of a resumed session being finished (packet ids; `order.skip` has their
    /// spool ids). Nothing new goes out until they are done, so no packet id rumqttc hands out
    /// can meet one of theirs.
    resuming: HashSet<u16>,
    /// When a resume that has not finished gives up.
    resume_by: Instant,
    /// Subscribed and said `online`.
    greeted: bool,
    /// Saying goodbye (stop, admin, fail back): how it will end, and by when. Events are
    /// handled as usual meanwhile, so what rumqttc still sends is recorded.
    leaving: Option<(Exit, Instant)>,
    /// Fired by an inbound message a local store could not keep: a new connection makes the
    /// upstream send it again.
    not_kept: Arc<Notify>,
    /// When the state topic was last refreshed.
    last_state: Instant,
}

impl<'a> Session<'a> {
    /// A session on `up`, just connected, with the upstream's session kept or not.
    pub async fn open(
        link: &'a mut Link,
        up: &'a mut Upstream,
        inbound: &'a [(String, u8)],
        session_present: bool,
        max_packet: usize,
        window: usize,
    ) -> Session<'a> {
        let order = Order::new(&link.spool, link.cfg.backlog.live_first, link.cfg.backlog.mark).await;
        let pace = Pace {
            rate: link.cfg.drain_rate.map(|r| r.0),
            tokens: 1.0,
            last: Instant::now(),
        };
        let mut s = Session {
            link,
            up,
            inbound,
            max_packet,
            window,
            watch_echoes: !inbound.is_empty(),
            order,
            pace,
            submitted: VecDeque::new(),
            in_flight: HashMap::new(),
            acks: vec![],
            marks: vec![],
            resuming: HashSet::new(),
            resume_by: Instant::now(),
            greeted: false,
            leaving: None,
            not_kept: Arc::new(Notify::new()),
            last_state: Instant::now(),
        };
        s.resume(session_present).await;
        s.resume_by = Instant::now() + RESUME_WITHIN;
        s
    }

    /// Takes up the QoS 2 messages of the last session on this address, when the upstream kept
    /// it and they fit; otherwise they go again as new messages.
    async fn resume(&mut self, session_present: bool) {
        let (name, url) = (&self.link.cfg.name, &self.link.url);
        let (items, had_rec) = self.link.spool.session(url, session_present).await;
        if had_rec > 0 {
            log::info!(
                "bridge {name}: no session of ours on {url}: {had_rec} QoS 2 messages it had answered with PUBREC go again \
                 (a broker that delivers at PUBREL never delivered them; one that delivers at PUBREC shows them twice)"
            );
        }
        if items.is_empty() {
            return;
        }
        let cfg = &self.link.cfg;
        if items.len() <= self.window && self.up.resume(&items, cfg.inflight, cfg.strip_retain) {
            log::info!(
                "bridge {name}: the upstream kept the session; finishing {} QoS 2 messages of it",
                items.len()
            );
            for i in &items {
                self.in_flight.insert(i.pkid, (i.msg.id, Instant::now(), 2));
                self.resuming.insert(i.pkid);
                self.order.skip.insert(i.msg.id);
                if !i.rec {
                    // Its `Sent` event comes before any other.
                    self.submitted.push_back(Submitted::Other);
                }
            }
        } else {
            log::warn!(
                "bridge {name}: {} QoS 2 messages of the last session do not fit this connection's window ({}) \
                 or ids (`inflight` {}); sent again as new messages",
                items.len(),
                self.window,
                cfg.inflight
            );
            self.link.spool.session(url, false).await;
        }
    }

    /// Runs the session until it ends, and says why. What the upstream acknowledged by then is
    /// recorded in the spool.
    pub async fn run(mut self, fail_back: oneshot::Receiver<()>, stop: &CancellationToken) -> Exit {
        let exit = self.until_the_end(fail_back, stop).await;
        self.record();
        exit
    }

    async fn until_the_end(&mut self, fail_back: oneshot::Receiver<()>, stop: &CancellationToken) -> Exit {
        // Fires only when the probe says so (a probe that is not running never does).
        let fail_back = async {
            if fail_back.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(fail_back);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            if let Err(exit) = self.between_events().await {
                return exit;
            }
            let step = tokio::select! {
                ev = self.up.poll() => self.event(ev).await,
                qos0 = self.link.live.recv() => {
                    if let Some(m) = qos0 {
                        self.live(m);
                    }
                    Ok(())
                }
                _ = self.link.spool.appended.notified(), if self.order.caught_up() => {
                    self.order.read_on();
                    Ok(())
                }
                _ = tick.tick() => {
                    self.tick().await;
                    Ok(())
                }
                _ = self.not_kept.notified() => Err(Exit::Failed(
                    "an inbound message could not be kept locally; reconnecting so the upstream sends it again".into(),
                )),
                _ = self.link.stats.kick.notified(), if self.leaving.is_none() => {
                    self.leave(Exit::Kicked);
                    Ok(())
                }
                _ = &mut fail_back, if self.leaving.is_none() => {
                    self.leave(Exit::FailBack);
                    Ok(())
                }
                _ = stop.cancelled(), if self.leaving.is_none() => {
                    self.leave(Exit::Stopped);
                    Ok(())
                }
            };
            if let Err(exit) = step {
                return exit;
            }
        }
    }

    /// Before waiting for the next event: ends a goodbye that is due, greets once a resumed
    /// session is finished, hands over what may go and records the acks, and gives up on a
    /// resume that takes too long.
    async fn between_events(&mut self) -> Result<(), Exit> {
        if self.leaving.as_ref().is_some_and(|(_, by)| Instant::now() >= *by) {
            return Err(self.leaving.take().expect("leaving").0);
        }
        if self.resuming.is_empty() && !self.greeted && self.leaving.is_none() {
            self.greeted = true;
            if !self.up.subscribe(self.inbound) {
                return Err(Exit::Failed("cannot queue SUBSCRIBE".into()));
            }
            if self.say(b"online") {
                self.submitted.push_back(Submitted::Other);
            }
        }
        self.hand_over().await;
        self.record();
        if !self.resuming.is_empty() && Instant::now() >= self.resume_by && self.leaving.is_none() {
            // Going on would let new packet ids meet theirs: start over instead.
            return Err(Exit::Failed(format!(
                "the upstream did not finish {} QoS 2 messages of the resumed session within {RESUME_WITHIN:?}",
                self.resuming.len()
            )));
        }
        Ok(())
    }

    /// Hands over as much of the spool as the window, the pace and rumqttc's queue allow.
    async fn hand_over(&mut self) {
        while self.resuming.is_empty()
            && self.leaving.is_none()
            && self.in_flight.len() + self.submitted.len() < self.window
        {
            if !self.order.next(&self.link.spool).await || !self.pace.take() {
                break;
            }
            // Checked again here: the limit may have shrunk (reload, the upstream's CONNACK),
            // and one message the upstream cannot take must not block the rest.
            if self.too_large(self.order.front()) {
                let m = self.order.pop();
                self.link.stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "bridge {}: spooled message on {} is over the upstream's {} bytes; dropped",
                    self.link.cfg.name,
                    m.topic,
                    self.max_packet
                );
                self.acks.push(m.id);
                continue;
            }
            if !self.publish(self.order.front()) {
                break;
            }
            let m = self.order.pop();
            if self.watch_echoes {
                self.link.echoes.sent(&m.topic, &m.payload);
            }
            self.submitted.push_back(Submitted::Spooled { id: m.id, qos: m.qos });
        }
    }

    fn too_large(&self, m: &Message) -> bool {
        m.topic.len() + m.payload.len() + 16 + m.props.as_ref().map_or(0, |p| p.wire_len()) > self.max_packet
    }

    /// Hands a spooled message to rumqttc; false when its queue is full.
    fn publish(&self, m: &Message) -> bool {
        let cfg = &self.link.cfg;
        // What is left of the spool's max_age goes with it, so the upstream drops it too.
        let expiry = cfg.message_expiry.then(|| {
            let left = cfg.spool.max_age.0.as_millis() as i64 - (now_ms() - m.ts_ms);
            (left / 1000).clamp(1, u32::MAX as i64) as u32
        });
        // Backlog is marked with when it was accepted.
        let marked = (cfg.backlog.mark && m.id <= self.order.boundary).then(|| {
            let mut p = m.props.as_deref().cloned().unwrap_or_default();
            p.user_properties.push((BACKLOG_MARK.to_string(), m.ts_ms.to_string()));
            p
        });
        self.up.publish_with(
            &m.topic,
            &m.payload,
            m.qos,
            m.retain && !cfg.strip_retain,
            marked.as_ref().or(m.props.as_deref()),
            expiry,
        )
    }

    /// What the upstream connection reports; `Err` ends the session.
    async fn event(&mut self, ev: Result<UpEvent, String>) -> Result<(), Exit> {
        match ev {
            // Leaving: the goodbye ends that way too.
            Err(e) => Err(self.leaving.take().map_or(Exit::Failed(e), |(exit, _)| exit)),
            Ok(UpEvent::Sent(pkid)) => {
                self.sent(pkid);
                Ok(())
            }
            Ok(UpEvent::Received { pkid, refused }) => self.received(pkid, refused),
            Ok(UpEvent::Acked { pkid, refused, reset }) => self.acked(pkid, refused, reset),
            Ok(UpEvent::Message {
                topic,
                payload,
                qos,
                retain,
                props,
                ack,
            }) => {
                self.inbound(topic, payload, qos, retain, props, ack).await;
                Ok(())
            }
            Ok(UpEvent::Closed) if self.leaving.is_some() => Err(self.leaving.take().expect("leaving").0),
            Ok(UpEvent::Connected { .. } | UpEvent::Closed | UpEvent::Other) => Ok(()),
        }
    }

    /// A PUBLISH went out with packet id `pkid`: the oldest submitted one.
    fn sent(&mut self, pkid: u16) {
        match self.submitted.pop_front() {
            Some(Submitted::Spooled { id, qos: 0 }) => {
                self.link.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.acks.push(id);
            }
            Some(Submitted::Spooled { id, qos }) => {
                self.link.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.in_flight.insert(pkid, (id, Instant::now(), qos));
                if qos == 2 {
                    self.marks.push((id, pkid, false));
                }
            }
            Some(Submitted::Other) | None => {}
        }
    }

    /// PUBREC for a QoS 2 message in flight.
    fn received(&mut self, pkid: u16, refused: Option<(String, bool)>) -> Result<(), Exit> {
        let Some(&(id, _, 2)) = self.in_flight.get(&pkid) else {
            return Ok(());
        };
        let refused_for_good = refused.is_some();
        // Not now: the upstream freed the id; a reconnect sends it again.
        self.refusal(refused)?;
        if refused_for_good {
            // rumqttc keeps the refused message's in-flight slot for good: a new connection
            // gives it back.
            self.acks.push(id);
            return Err(Exit::Failed("upstream refused a QoS 2 message; reconnecting".into()));
        }
        self.marks.push((id, pkid, true));
        Ok(())
    }

    /// PUBACK or PUBCOMP: the message is done (refused for good, or delivered).
    fn acked(&mut self, pkid: u16, refused: Option<(String, bool)>, reset: bool) -> Result<(), Exit> {
        self.resuming.remove(&pkid);
        if let Some((id, _, _)) = self.in_flight.remove(&pkid) {
            self.refusal(refused)?;
            self.acks.push(id);
        }
        if reset {
            // A PUBCOMP with a failure code: rumqttc keeps its slot for good.
            return Err(Exit::Failed(
                "the upstream answered PUBREL with a failure code; reconnecting".into(),
            ));
        }
        Ok(())
    }

    /// An inbound message: an echo is dropped; one a rule maps is routed here, in order, and
    /// acknowledged upstream only once every persistent session and spool it went to has it on
    /// disk.
    async fn inbound(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        props: Option<Box<Props>>,
        ack: Ack,
    ) {
        let mapped = self
            .link
            .rules
            .iter()
            .find_map(|r| r.inbound.as_ref().and_then(|m| m.map(&topic)).map(|t| (t, r.qos)));
        if self.watch_echoes && self.link.echoes.is_echo(&topic, &payload) {
            self.link.stats.echoes.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(ack.send());
        } else if let Some((local, q)) = mapped {
            self.link.stats.received.fetch_add(1, Ordering::Relaxed);
            let name = &self.link.cfg.name;
            let waits = self
                .link
                .bus
                .publish_durable(&local, payload, q.min(qos), retain, Some(name), props, true)
                .await;
            let (stats, name, not_kept) = (self.link.stats.clone(), name.clone(), self.not_kept.clone());
            tokio::spawn(async move {
                for w in waits {
                    if w.await.is_err() {
                        stats.inbound_not_kept.fetch_add(1, Ordering::Relaxed);
                        log::error!(
                            "bridge {name}: an inbound message could not be stored locally; not acknowledged upstream"
                        );
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

    /// A live QoS 0 message. `drain_rate` caps every publish (an upstream quota counts them
    /// all); one over it is dropped and counted, as when the link is busy.
    fn live(&mut self, m: Live) {
        let retain = m.retain && !self.link.cfg.strip_retain;
        if self.pace.take()
            && self
                .up
                .publish_with(&m.topic, &m.payload, 0, retain, m.props.as_deref(), None)
        {
            if self.watch_echoes {
                self.link.echoes.sent(&m.topic, &m.payload);
            }
            self.submitted.push_back(Submitted::Other);
            self.link.stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.link.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every 200 ms: read on, report `stalled` when it changes, and the state every 5 s.
    async fn tick(&mut self) {
        self.order.read_on();
        let stall = self.link.cfg.stall_after.0;
        let stalled = self.in_flight.values().any(|(_, t, _)| t.elapsed() >= stall);
        if self.link.stats.stalled.swap(stalled, Ordering::Relaxed) != stalled {
            if stalled {
                log::warn!(
                    "bridge {}: stalled: connected to {}, but no ack for {} for a message in flight",
                    self.link.cfg.name,
                    self.link.url,
                    self.link.cfg.stall_after
                );
            } else {
                log::info!("bridge {}: acks move again", self.link.cfg.name);
            }
            self.link.publish_state().await;
        }
        if self.last_state.elapsed() >= Duration::from_secs(5) {
            self.last_state = Instant::now();
            self.link.echoes.prune();
            self.link.publish_state().await;
        }
    }

    /// Hands the acks and QoS 2 marks gathered so far to the spool.
    fn record(&mut self) {
        self.link.spool.mark(std::mem::take(&mut self.marks));
        self.link.spool.ack(std::mem::take(&mut self.acks));
    }

    /// An upstream's MQTT 5 refusal of a message in flight: `Err` (ends the connection; the
    /// message stays and goes again) when it is for now (quota, busy); counted and logged when
    /// it is for good, and the message is the caller's to drop.
    fn refusal(&self, refused: Option<(String, bool)>) -> Result<(), Exit> {
        match refused {
            Some((why, false)) => Err(Exit::Failed(format!("upstream refused a message for now: {why}"))),
            Some((why, true)) => {
                self.link.stats.dropped_refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("bridge {}: upstream refused a message: {why}", self.link.cfg.name);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The bridge's status upstream (`online` / `offline`), retained unless `strip_retain`.
    fn say(&self, what: &'static [u8]) -> bool {
        let cfg = &self.link.cfg;
        self.up
            .publish(&self.link.status_topic, &Bytes::from_static(what), 1, !cfg.strip_retain)
    }

    /// Says goodbye upstream (retained `offline`, then DISCONNECT) and lets the session go on
    /// handling events until the DISCONNECT is out (a second at most), so what rumqttc still
    /// sends meanwhile is recorded like the rest; then it ends with `exit`.
    fn leave(&mut self, exit: Exit) {
        if self.say(b"offline") {
            self.submitted.push_back(Submitted::Other);
        }
        let by = if self.up.request_disconnect() {
            Instant::now() + Duration::from_secs(1)
        } else {
            Instant::now()
        };
        self.leaving = Some((exit, by));
    }
}
