//! The durable queue of one bridge: messages bound upstream, on disk (SQLite, WAL, fsync per
//! batch) before the local publisher is acknowledged, removed only when the upstream acked them.
//! One thread owns the database; callers send it work and it commits whatever has gathered as
//! one transaction. Bounded by `max_bytes` and `max_age`; every drop is counted by reason.

use crate::broker::router::message::Props;
use crate::config::{Spool as SpoolConfig, WhenFull};
use crate::system::clock::now_ms;
use crate::system::sqlite;
use anyhow::{Context, Result};
use bytes::Bytes;
use rusqlite::{params, Connection};
use rusqlite_migration::M;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// A message for upstream, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: i64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// When it was accepted, in ms since the epoch.
    pub ts_ms: i64,
    /// MQTT 5 properties of the local publish, sent upstream untouched (3.1.1 has none).
    pub props: Option<Box<Props>>,
}

/// A message a rule hands to the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Option<Box<Props>>,
}

/// What the spool holds and has dropped; read by the bridge's state topic.
#[derive(Default, Debug)]
pub struct Stats {
    pub queued: AtomicU64,
    pub queued_bytes: AtomicU64,
    /// Accepted time of the oldest queued message (ms since epoch), 0 when empty.
    pub oldest_ms: AtomicI64,
    pub dropped_full: AtomicU64,
    pub dropped_rejected: AtomicU64,
    pub dropped_expired: AtomicU64,
    /// Messages not accepted because the spool could not be written.
    pub write_errors: AtomicU64,
}

enum Op {
    Append(Vec<Entry>, Option<oneshot::Sender<()>>),
    Ack(Vec<i64>),
    Read {
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Vec<Message>>,
    },
    Flush(oneshot::Sender<()>),
    Reconfigure(SpoolConfig),
    /// QoS 2 progress: (spool id, packet id, PUBREC received).
    Mark(Vec<(i64, u16, bool)>),
    /// A connection came up to this address, with or without the session kept upstream.
    Session {
        url: String,
        present: bool,
        reply: oneshot::Sender<(Vec<InFlight>, u64)>,
    },
    Backlog(bool, oneshot::Sender<(i64, HashSet<String>)>),
}

/// A QoS 2 message that went out in an upstream session that may resume: its packet id, and
/// whether the upstream answered PUBREC (then only PUBREL is sent again).
#[derive(Clone, Debug)]
pub struct InFlight {
    pub msg: Message,
    pub pkid: u16,
    pub rec: bool,
}

/// Handle to one bridge's spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Op>,
    pub stats: Arc<Stats>,
    /// Woken when messages are appended.
    pub appended: Arc<Notify>,
}

fn size_of(topic: &str, payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64
}

impl Spool {
    pub fn open(path: &Path, cfg: SpoolConfig, name: &str) -> Result<Spool> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut db = Connection::open(path).with_context(|| format!("opening spool {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed message survives power loss, not only a crash of outpost.
        db.pragma_update(None, "synchronous", "FULL")?;
        // Later columns: MQTT 5 properties (NULL: none) and, for QoS 2, the packet id a message
        // went out with and whether the upstream sent PUBREC for it (what a resumed session
        // must finish). Each an older INSERT may leave out (nullable or with a default), so an
        // older outpost (after a snap revert) uses the spool as before (see `system::sqlite`).
        let steps = vec![
            M::up(
                "CREATE TABLE IF NOT EXISTS spool (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
                    retain INTEGER NOT NULL, ts INTEGER NOT NULL, size INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
                 INSERT OR IGNORE INTO meta VALUES ('format', 1);",
            ),
            sqlite::add_column("spool", "props", "TEXT"),
            sqlite::add_column("spool", "pkid", "INTEGER"),
            sqlite::add_column("spool", "rec", "INTEGER NOT NULL DEFAULT 0"),
        ];
        sqlite::migrate(&mut db, &format!("spool {}", path.display()), steps)?;
        let stats = Arc::new(Stats::default());
        let (count, bytes): (i64, i64) =
            db.query_row("SELECT count(*), coalesce(sum(size), 0) FROM spool", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        stats.queued.store(count as u64, Ordering::Relaxed);
        stats.queued_bytes.store(bytes as u64, Ordering::Relaxed);
        let appended = Arc::new(Notify::new());
        let mut w = Writer {
            db,
            cfg,
            stats: stats.clone(),
            appended: appended.clone(),
            name: name.to_string(),
            last_drop_log: None,
            full: true,
            synced: true,
        };
        w.refresh_oldest();
        let tx = sqlite::spawn_writer(format!("spool-{name}"), w)?;
        Ok(Spool { tx, stats, appended })
    }

    /// Queues messages; the receiver fires once they are on disk (or dropped by policy).
    pub fn append(&self, msgs: Vec<Entry>, wait: bool) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = if wait {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let _ = self.tx.send(Op::Append(msgs, tx));
        rx
    }

    /// Removes messages the upstream acknowledged.
    pub fn ack(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.tx.send(Op::Ack(ids));
        }
    }

    /// New bounds, for a bridge reconfigured on reload (the spool file stays the same).
    pub fn reconfigure(&self, cfg: SpoolConfig) {
        let _ = self.tx.send(Op::Reconfigure(cfg));
    }

    /// The oldest messages with an id above `after`: at most `limit`, and no more than about
    /// 4 MiB of payload.
    pub async fn read(&self, after: i64, limit: usize) -> Vec<Message> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Read { after, limit, reply }).is_err() {
            return vec![];
        }
        rx.await.unwrap_or_default()
    }

    /// Records QoS 2 progress (not waited for; see the README on the window it leaves).
    pub fn mark(&self, marks: Vec<(i64, u16, bool)>) {
        if !marks.is_empty() {
            let _ = self.tx.send(Op::Mark(marks));
        }
    }

    /// At a new connection to `url`: the QoS 2 messages to finish, oldest first, when the
    /// upstream kept the session (`present`) and their packet ids were given on that same
    /// address (each node of a cluster has sessions of its own). Otherwise none: every message
    /// that had a packet id goes again as a new one, including those the upstream answered
    /// with PUBREC (a broker that delivers at PUBREL, as Mosquitto does, never delivered them;
    /// one that delivers at PUBREC sees them twice). Also returns how many had PUBREC.
    pub async fn session(&self, url: &str, present: bool) -> (Vec<InFlight>, u64) {
        let (reply, rx) = oneshot::channel();
        let op = Op::Session {
            url: url.to_string(),
            present,
            reply,
        };
        if self.tx.send(op).is_err() {
            return (vec![], 0);
        }
        rx.await.unwrap_or_default()
    }

    /// The highest id now (what a connection that comes up now has as its backlog) and, if
    /// asked, the topics of that backlog.
    pub async fn backlog(&self, topics: bool) -> (i64, HashSet<String>) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Backlog(topics, reply)).is_err() {
            return (0, HashSet::new());
        }
        rx.await.unwrap_or_default()
    }

    /// Waits until everything sent so far is done.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(reply)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    db: Connection,
    cfg: SpoolConfig,
    stats: Arc<Stats>,
    appended: Arc<Notify>,
    name: String,
    last_drop_log: Option<std::time::Instant>,
    /// `synchronous` is FULL (commits fsync); deletes and QoS 2 marks commit with NORMAL.
    full: bool,
    /// Everything committed has been fsynced (a FULL commit syncs the WAL written before it).
    synced: bool,
}

impl sqlite::Batches for Writer {
    type Op = Op;
    const TICK: Option<Duration> = Some(Duration::from_secs(1));

    fn write(&mut self, batch: Vec<Op>) {
        self.handle(batch);
    }

    /// Idle for a second, or at the end: what was committed without an fsync is synced.
    fn idle(&mut self) {
        self.sync();
    }

    /// Busy or idle, old messages go once a second, and what was committed without an fsync
    /// is synced at least that often.
    fn every(&mut self) {
        self.expire();
        self.sync();
    }
}

impl Writer {
    fn handle(&mut self, batch: Vec<Op>) {
        let mut appends = vec![];
        let mut waiters = vec![];
        let mut acks = vec![];
        let mut reads = vec![];
        let mut flushes = vec![];
        let mut marks = vec![];
        let mut later = vec![];
        for op in batch {
            match op {
                Op::Append(m, w) => {
                    appends.extend(m);
                    waiters.extend(w);
                }
                Op::Ack(ids) => acks.extend(ids),
                Op::Read { after, limit, reply } => reads.push((after, limit, reply)),
                Op::Flush(r) => flushes.push(r),
                Op::Reconfigure(cfg) => self.cfg = cfg,
                Op::Mark(m) => marks.extend(m),
                op @ (Op::Session { .. } | Op::Backlog(..)) => later.push(op),
            }
        }
        let appended = !appends.is_empty();
        let count = appends.len() as u64;
        match self.write(appends, acks, marks) {
            Ok(()) => {
                for w in waiters {
                    let _ = w.send(());
                }
            }
            Err(e) => {
                // The waiters are dropped unanswered: their publishers are not acknowledged.
                self.stats.write_errors.fetch_add(count, Ordering::Relaxed);
                log::error!(
                    "bridge {}: spool write failed, {count} messages not accepted: {e}",
                    self.name
                );
            }
        }
        if appended {
            self.appended.notify_waiters();
            self.appended.notify_one();
        }
        for (after, limit, reply) in reads {
            let _ = reply.send(self.read(after, limit).unwrap_or_else(|e| {
                log::error!("bridge {}: spool read failed: {e}", self.name);
                vec![]
            }));
        }
        for op in later {
            match op {
                Op::Session { url, present, reply } => {
                    let _ = reply.send(self.session(&url, present).unwrap_or_else(|e| {
                        log::error!("bridge {}: spool read failed: {e}", self.name);
                        (vec![], 0)
                    }));
                }
                Op::Backlog(topics, reply) => {
                    let _ = reply.send(self.backlog(topics).unwrap_or_else(|e| {
                        log::error!("bridge {}: spool read failed: {e}", self.name);
                        (0, HashSet::new())
                    }));
                }
                _ => {}
            }
        }
        if !flushes.is_empty() {
            self.sync();
        }
        for f in flushes {
            let _ = f.send(());
        }
    }

    /// Commits without an fsync unless `durable`: an append must be on disk before its
    /// publisher's ack; a delete or a QoS 2 mark that power loss undoes only sends a message
    /// again, so it need not pay an fsync of its own while publishers wait behind it.
    fn mode(&mut self, durable: bool) -> rusqlite::Result<()> {
        if self.full != durable {
            self.db
                .pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
            self.full = durable;
        }
        Ok(())
    }

    /// Puts on disk what was committed without an fsync (idle for a second, a flush, the end):
    /// one small FULL commit syncs the whole WAL before it.
    fn sync(&mut self) {
        if self.synced {
            return;
        }
        let r = self.mode(true).and_then(|_| {
            self.db
                .execute("UPDATE meta SET value = value WHERE key = 'format'", [])
                .map(|_| ())
        });
        match r {
            Ok(()) => self.synced = true,
            Err(e) => log::error!("bridge {}: spool sync failed: {e}", self.name),
        }
    }

    fn in_flight(&mut self) -> rusqlite::Result<Vec<InFlight>> {
        let mut q = self.db.prepare_cached(
            "SELECT id, topic, payload, qos, retain, ts, props, pkid, rec FROM spool
             WHERE pkid IS NOT NULL ORDER BY id",
        )?;
        let rows = q.query_map([], |r| {
            Ok(InFlight {
                msg: row_message(r)?,
                pkid: r.get(7)?,
                rec: r.get(8)?,
            })
        })?;
        rows.collect()
    }

    fn backlog(&mut self, topics: bool) -> rusqlite::Result<(i64, HashSet<String>)> {
        let max: i64 = self
            .db
            .query_row("SELECT coalesce(max(id), 0) FROM spool", [], |r| r.get(0))?;
        let mut set = HashSet::new();
        if topics {
            let mut q = self
                .db
                .prepare_cached("SELECT DISTINCT topic FROM spool WHERE id <= ?1")?;
            for t in q.query_map([max], |r| r.get::<_, String>(0))? {
                set.insert(t?);
            }
        }
        Ok((max, set))
    }

    fn session(&mut self, url: &str, present: bool) -> rusqlite::Result<(Vec<InFlight>, u64)> {
        let owner: Option<String> = self
            .db
            .query_row("SELECT value FROM meta WHERE key = 'pkid_url'", [], |r| r.get(0))
            .ok();
        if present && owner.as_deref() == Some(url) {
            return Ok((self.in_flight()?, 0));
        }
        let tx = self.db.transaction()?;
        let rec: i64 = tx.query_row("SELECT count(*) FROM spool WHERE rec = 1", [], |r| r.get(0))?;
        tx.execute("UPDATE spool SET pkid = NULL, rec = 0 WHERE pkid IS NOT NULL", [])?;
        tx.execute("INSERT OR REPLACE INTO meta VALUES ('pkid_url', ?1)", [url])?;
        tx.commit()?;
        Ok((vec![], rec as u64))
    }

    fn write(&mut self, appends: Vec<Entry>, acks: Vec<i64>, marks: Vec<(i64, u16, bool)>) -> rusqlite::Result<()> {
        if appends.is_empty() && acks.is_empty() && marks.is_empty() {
            return Ok(());
        }
        let stats = self.stats.clone();
        let durable = !appends.is_empty();
        self.mode(durable)?;
        let tx = self.db.transaction()?;
        if !marks.is_empty() {
            let mut up = tx.prepare_cached("UPDATE spool SET pkid = ?2, rec = ?3 WHERE id = ?1")?;
            for (id, pkid, rec) in &marks {
                up.execute(params![id, pkid, rec])?;
            }
        }
        let mut freed = 0u64;
        let mut removed = 0u64;
        if !acks.is_empty() {
            let mut del = tx.prepare_cached("DELETE FROM spool WHERE id = ?1 RETURNING size")?;
            for id in &acks {
                if let Ok(size) = del.query_row(params![id], |r| r.get::<_, i64>(0)) {
                    freed += size as u64;
                    removed += 1;
                }
            }
        }
        let mut queued_bytes = stats.queued_bytes.load(Ordering::Relaxed).saturating_sub(freed);
        let mut queued = stats.queued.load(Ordering::Relaxed).saturating_sub(removed);
        let (mut dropped_full, mut rejected) = (0u64, 0u64);
        if !appends.is_empty() {
            let now = now_ms();
            let mut ins = tx.prepare_cached(
                "INSERT INTO spool (topic, payload, qos, retain, ts, size, props) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in appends {
                let props = e.props.as_ref().map(|p| p.to_json());
                let size = size_of(&e.topic, &e.payload) + props.as_ref().map_or(0, |p| p.len() as u64);
                if queued_bytes + size > self.cfg.max_bytes.0 {
                    match self.cfg.when_full {
                        WhenFull::RejectNew => {
                            rejected += 1;
                            continue;
                        }
                        WhenFull::DropOldest => {
                            let mut oldest = tx.prepare_cached("SELECT id, size FROM spool ORDER BY id LIMIT 64")?;
                            while queued_bytes + size > self.cfg.max_bytes.0 {
                                let rows: Vec<(i64, i64)> = oldest
                                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                                    .collect::<Result<_, _>>()?;
                                if rows.is_empty() {
                                    break;
                                }
                                for (id, sz) in rows {
                                    if queued_bytes + size <= self.cfg.max_bytes.0 {
                                        break;
                                    }
                                    tx.execute("DELETE FROM spool WHERE id = ?1", params![id])?;
                                    queued_bytes = queued_bytes.saturating_sub(sz as u64);
                                    queued = queued.saturating_sub(1);
                                    dropped_full += 1;
                                }
                            }
                            if queued_bytes + size > self.cfg.max_bytes.0 {
                                // Larger than the whole spool: it cannot be kept.
                                rejected += 1;
                                continue;
                            }
                        }
                    }
                }
                ins.execute(params![
                    e.topic,
                    &e.payload[..],
                    e.qos,
                    e.retain,
                    now,
                    size as i64,
                    props
                ])?;
                queued_bytes += size;
                queued += 1;
            }
        }
        tx.commit()?;
        self.synced = durable;
        stats.queued.store(queued, Ordering::Relaxed);
        stats.queued_bytes.store(queued_bytes, Ordering::Relaxed);
        if dropped_full + rejected > 0 {
            stats.dropped_full.fetch_add(dropped_full, Ordering::Relaxed);
            stats.dropped_rejected.fetch_add(rejected, Ordering::Relaxed);
            self.log_drops();
        }
        self.refresh_oldest();
        Ok(())
    }

    fn log_drops(&mut self) {
        if self.last_drop_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            self.last_drop_log = Some(std::time::Instant::now());
            let s = &self.stats;
            log::warn!(
                "bridge {}: spool full ({} bytes, when_full {:?}): {} oldest dropped, {} new rejected so far",
                self.name,
                self.cfg.max_bytes.0,
                self.cfg.when_full,
                s.dropped_full.load(Ordering::Relaxed),
                s.dropped_rejected.load(Ordering::Relaxed)
            );
        }
    }

    fn refresh_oldest(&mut self) {
        let oldest: i64 = self
            .db
            .query_row(
                "SELECT coalesce(min(ts), 0) FROM spool WHERE id = (SELECT min(id) FROM spool)",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        self.stats.oldest_ms.store(oldest, Ordering::Relaxed);
    }

    fn expire(&mut self) {
        let cutoff = now_ms() - self.cfg.max_age.0.as_millis() as i64;
        let res: rusqlite::Result<(u64, u64)> = (|| {
            let tx = self.db.transaction()?;
            let (n, bytes): (i64, i64) = tx.query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM spool WHERE ts < ?1",
                params![cutoff],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if n > 0 {
                tx.execute("DELETE FROM spool WHERE ts < ?1", params![cutoff])?;
            }
            tx.commit()?;
            Ok((n as u64, bytes as u64))
        })();
        match res {
            Ok((0, _)) => {}
            Ok((n, bytes)) => {
                let s = &self.stats;
                s.dropped_expired.fetch_add(n, Ordering::Relaxed);
                s.queued
                    .fetch_sub(n.min(s.queued.load(Ordering::Relaxed)), Ordering::Relaxed);
                s.queued_bytes
                    .fetch_sub(bytes.min(s.queued_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                log::warn!(
                    "bridge {}: {n} spooled messages older than {} dropped",
                    self.name,
                    self.cfg.max_age
                );
                self.refresh_oldest();
            }
            Err(e) => log::error!("bridge {}: spool expiry failed: {e}", self.name),
        }
    }

    fn read(&mut self, after: i64, limit: usize) -> rusqlite::Result<Vec<Message>> {
        let mut q = self.db.prepare_cached(
            "SELECT id, topic, payload, qos, retain, ts, props FROM spool WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut bytes = 0usize;
        let rows = q.query_map(params![after, limit as i64], row_message)?;
        let mut out = vec![];
        for m in rows {
            let m = m?;
            bytes += m.payload.len();
            out.push(m);
            if bytes > 4 << 20 {
                break;
            }
        }
        Ok(out)
    }
}

/// A message from a row that starts `id, topic, payload, qos, retain, ts, props`.
fn row_message(r: &rusqlite::Row) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get(0)?,
        topic: r.get(1)?,
        payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
        qos: r.get(3)?,
        retain: r.get(4)?,
        ts_ms: r.get(5)?,
        props: r.get::<_, Option<String>>(6)?.and_then(|p| Props::from_json(&p)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Size};

    fn cfg(max: u64, when: WhenFull) -> SpoolConfig {
        SpoolConfig {
            max_bytes: Size(max),
            max_age: Dur(Duration::from_secs(3600)),
            when_full: when,
        }
    }

    fn msg(i: usize) -> Entry {
        // 100 bytes each with the topic
        Entry {
            topic: format!("t/{i:02}"),
            payload: Bytes::from(vec![b'x'; 96]),
            qos: 1,
            retain: false,
            props: None,
        }
    }

    #[tokio::test]
    async fn append_read_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.db");
        let s = Spool::open(&p, cfg(1 << 20, WhenFull::DropOldest), "t").unwrap();
        s.append((0..5).map(msg).collect(), true).unwrap().await.unwrap();
        let got = s.read(0, 10).await;
        assert_eq!(
            got.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["t/00", "t/01", "t/02", "t/03", "t/04"]
        );
        s.ack(vec![got[0].id, got[1].id]);
        s.flush().await;
        assert_eq!(s.stats.queued.load(Ordering::Relaxed), 3);
        drop(s);
        let s = Spool::open(&p, cfg(1 << 20, WhenFull::DropOldest), "t").unwrap();
        assert_eq!(s.stats.queued.load(Ordering::Relaxed), 3);
        assert_eq!(s.read(0, 10).await[0].topic, "t/02");
    }

    #[tokio::test]
    async fn properties_survive_the_spool_and_an_old_spool_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.db");
        // A spool as written before properties were kept, with one message in it.
        {
            let db = Connection::open(&p).unwrap();
            db.execute_batch(
                "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                   payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
                   ts INTEGER NOT NULL, size INTEGER NOT NULL);
                 INSERT INTO spool (topic, payload, qos, retain, ts, size) VALUES ('old/t', x'6869', 1, 0, 1, 7);",
            )
            .unwrap();
        }
        let s = Spool::open(&p, cfg(1 << 20, WhenFull::DropOldest), "t").unwrap();
        let props = Props::from_parts(
            Some(1),
            Some("text/plain".into()),
            None,
            Some(Bytes::from_static(b"\x00\xff")),
            vec![("site".into(), "a".into()), ("site".into(), "b".into())],
        );
        let mut e = msg(1);
        e.props = props.clone();
        s.append(vec![e], true).unwrap().await.unwrap();
        let got = s.read(0, 10).await;
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].topic.as_str(), &got[0].payload[..], &got[0].props),
            ("old/t", &b"hi"[..], &None)
        );
        assert_eq!(got[1].props, props, "user properties in order, with duplicates");
        drop(s);
        // An older outpost's INSERT still works on the extended table.
        Connection::open(&p)
            .unwrap()
            .execute(
                "INSERT INTO spool (topic, payload, qos, retain, ts, size) VALUES ('older/t', x'6869', 1, 0, 2, 9)",
                [],
            )
            .unwrap();
        let s = Spool::open(&p, cfg(1 << 20, WhenFull::DropOldest), "t").unwrap();
        let got = s.read(0, 10).await;
        assert_eq!(got.len(), 3);
        assert_eq!((got[2].topic.as_str(), &got[2].props), ("older/t", &None));
    }

    #[tokio::test]
    async fn full_spool_applies_the_policy_and_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for when in [WhenFull::DropOldest, WhenFull::RejectNew] {
            let s = Spool::open(&dir.path().join(format!("{when:?}.db")), cfg(1000, when), "t").unwrap();
            for i in 0..25 {
                s.append(vec![msg(i)], true).unwrap().await.unwrap();
            }
            let kept: Vec<String> = s.read(0, 100).await.into_iter().map(|m| m.topic).collect();
            assert_eq!(kept.len(), 10);
            let dropped =
                s.stats.dropped_full.load(Ordering::Relaxed) + s.stats.dropped_rejected.load(Ordering::Relaxed);
            assert_eq!(dropped, 15);
            match when {
                WhenFull::DropOldest => assert_eq!(kept[0], "t/15"),
                WhenFull::RejectNew => assert_eq!(kept[9], "t/09"),
            }
        }
    }
}
