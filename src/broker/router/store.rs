//! Persistent sessions on disk (SQLite under `data_dir`): sessions that outlive their
//! connection (3.1.1 clean session 0, MQTT 5 session expiry > 0), their subscriptions, and
//! every QoS 1/2 message queued or in flight for them, with its packet id once sent. Clean
//! sessions never touch it.
//!
//! One writer thread commits in groups (WAL, `synchronous=FULL`): a publisher's PUBACK waits
//! for the commit that holds its message (see `Shared::ingress`), so what was acknowledged
//! survives `kill -9` and power loss. Everything else (acks, packet ids, subscriptions) is
//! written in the same order without anyone waiting.

use super::message::{Message, Props};
use super::session::{Delivery, SubOpts};
use crate::broker::auth::Identity;
use crate::system::sqlite;
use anyhow::{Context, Result};
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use rusqlite_migration::M;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// A stored message id; 0 means "not stored".
pub type StoreId = u64;

enum Op {
    Session { key: Arc<str>, id: Identity, expiry: u32 },
    Detached { key: Arc<str>, at_ms: i64, expiry: u32 },
    End(Arc<str>),
    Sub(Arc<str>, Arc<str>, SubOpts),
    Unsub(Arc<str>, Arc<str>),
    Enqueue(Arc<str>, StoreId, Delivery, Option<tokio::sync::oneshot::Sender<()>>),
    Sent(StoreId, u16),
    Released(StoreId),
    Done(StoreId),
    Qos2In(Arc<str>, u16, bool),
    Flush(mpsc::Sender<()>),
}

/// Handle to the writer thread.
pub struct SessionStore {
    tx: mpsc::Sender<Op>,
    next_id: AtomicU64,
}

/// A session as it was on disk at start.
pub struct Restored {
    pub key: Arc<str>,
    pub identity: Identity,
    pub expiry: u32,
    /// When its connection ended (ms since the epoch); now, for one that was connected.
    pub detached_ms: i64,
    pub subs: Vec<(Arc<str>, SubOpts)>,
    /// Queued deliveries in order, each with its id, packet id (0: not sent yet) and whether
    /// its PUBREL went out.
    pub messages: Vec<(StoreId, Delivery, u16, bool)>,
    pub qos2_in: Vec<u16>,
}

fn open_db(path: &Path) -> Result<Connection> {
    let mut db = Connection::open(path).with_context(|| format!("opening session store {}", path.display()))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    // Only added nullable columns, so an older outpost (after a snap revert) reads the tables
    // as before (see `system::sqlite`).
    let steps = vec![M::up(FIRST_SCHEMA), sqlite::add_column("messages", "share", "TEXT")];
    sqlite::migrate(&mut db, &format!("session store {}", path.display()), steps)?;
    Ok(db)
}

/// The tables as the first release made them.
const FIRST_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sessions (
            key TEXT PRIMARY KEY, username TEXT, client_id TEXT NOT NULL, listener TEXT NOT NULL,
            device INTEGER NOT NULL, expiry INTEGER NOT NULL, detached_ms INTEGER);
         CREATE TABLE IF NOT EXISTS subs (
            key TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL, no_local INTEGER NOT NULL,
            rap INTEGER NOT NULL, sub_id INTEGER, PRIMARY KEY (key, filter));
         CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY, key TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
            pub_qos INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, sub_ids TEXT NOT NULL,
            props TEXT, expires_ms INTEGER, pkid INTEGER NOT NULL DEFAULT 0, released INTEGER NOT NULL DEFAULT 0);
         CREATE INDEX IF NOT EXISTS messages_by_key ON messages (key, id);
         CREATE TABLE IF NOT EXISTS qos2_in (key TEXT NOT NULL, pkid INTEGER NOT NULL, PRIMARY KEY (key, pkid));";

impl SessionStore {
    /// Opens (or creates) the store and returns what it holds.
    pub fn open(path: &Path) -> Result<(SessionStore, Vec<Restored>)> {
        let db = open_db(path)?;
        let restored = load(&db)?;
        let max: Option<i64> = db
            .query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))
            .optional()?
            .flatten();
        let tx = sqlite::spawn_writer("session-store".into(), Writer(db))?;
        Ok((
            SessionStore {
                tx,
                next_id: AtomicU64::new(max.unwrap_or(0) as u64 + 1),
            },
            restored,
        ))
    }

    pub fn next_id(&self) -> StoreId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, op: Op) {
        let _ = self.tx.send(op);
    }

    pub fn session(&self, key: &Arc<str>, id: &Identity, expiry: u32) {
        self.send(Op::Session {
            key: key.clone(),
            id: id.clone(),
            expiry,
        });
    }
    pub fn detached(&self, key: &Arc<str>, at_ms: i64, expiry: u32) {
        self.send(Op::Detached {
            key: key.clone(),
            at_ms,
            expiry,
        });
    }
    pub fn end(&self, key: &Arc<str>) {
        self.send(Op::End(key.clone()));
    }
    pub fn sub(&self, key: &Arc<str>, filter: &str, o: &SubOpts) {
        self.send(Op::Sub(key.clone(), Arc::from(filter), o.clone()));
    }
    pub fn unsub(&self, key: &Arc<str>, filter: &str) {
        self.send(Op::Unsub(key.clone(), Arc::from(filter)));
    }
    /// Stores a queued delivery; with `durable`, the receiver fires once it is committed.
    pub fn enqueue(
        &self,
        key: &Arc<str>,
        id: StoreId,
        d: &Delivery,
        durable: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (tx, rx) = if durable {
            let (t, r) = tokio::sync::oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.send(Op::Enqueue(key.clone(), id, d.clone(), tx));
        rx
    }
    pub fn sent(&self, id: StoreId, pkid: u16) {
        self.send(Op::Sent(id, pkid));
    }
    pub fn released(&self, id: StoreId) {
        self.send(Op::Released(id));
    }
    pub fn done(&self, id: StoreId) {
        self.send(Op::Done(id));
    }
    pub fn qos2_in(&self, key: &Arc<str>, pkid: u16, held: bool) {
        self.send(Op::Qos2In(key.clone(), pkid, held));
    }

    /// Waits until everything sent so far is committed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Op::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn load(db: &Connection) -> Result<Vec<Restored>> {
    let now = crate::system::clock::now_ms();
    let mut out = vec![];
    let mut q = db.prepare("SELECT key, username, client_id, listener, device, expiry, detached_ms FROM sessions")?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, bool>(4)?,
            r.get::<_, u32>(5)?,
            r.get::<_, Option<i64>>(6)?,
        ))
    })?;
    for row in rows {
        let (key, username, client_id, listener, device, expiry, detached) = row?;
        out.push(Restored {
            key: Arc::from(key.as_str()),
            identity: Identity {
                username,
                client_id,
                listener,
                device,
            },
            expiry,
            detached_ms: detached.unwrap_or(now),
            subs: vec![],
            messages: vec![],
            qos2_in: vec![],
        });
    }
    for s in &mut out {
        let mut q = db.prepare("SELECT filter, qos, no_local, rap, sub_id FROM subs WHERE key = ?1")?;
        s.subs = q
            .query_map([&*s.key], |r| {
                Ok((
                    Arc::from(r.get::<_, String>(0)?.as_str()),
                    SubOpts {
                        qos: r.get(1)?,
                        no_local: r.get(2)?,
                        retain_as_published: r.get(3)?,
                        id: r.get(4)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut q = db.prepare(
            "SELECT id, topic, payload, pub_qos, qos, retain, sub_ids, props, expires_ms, pkid, released, share
             FROM messages WHERE key = ?1 ORDER BY id",
        )?;
        s.messages = q
            .query_map([&*s.key], |r| {
                let sub_ids: String = r.get(6)?;
                let props: Option<String> = r.get(7)?;
                let msg = Message {
                    topic: Arc::from(r.get::<_, String>(1)?.as_str()),
                    payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    qos: r.get(3)?,
                    retain: r.get(5)?,
                    props: props.as_deref().and_then(Props::from_json),
                    expires_ms: r.get(8)?,
                    origin: None,
                    from: 0,
                };
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    Delivery {
                        msg: Arc::new(msg),
                        qos: r.get(4)?,
                        retain: r.get(5)?,
                        sub_ids: sub_ids.split(',').filter_map(|x| x.parse().ok()).collect(),
                        store_id: r.get::<_, i64>(0)? as u64,
                        share: r.get::<_, Option<String>>(11)?.map(|s| Arc::from(s.as_str())),
                    },
                    r.get::<_, u16>(9)?,
                    r.get::<_, bool>(10)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut q = db.prepare("SELECT pkid FROM qos2_in WHERE key = ?1")?;
        s.qos2_in = q.query_map([&*s.key], |r| r.get(0))?.collect::<Result<_, _>>()?;
    }
    Ok(out)
}

/// The writer thread's connection.
struct Writer(Connection);

impl sqlite::Batches for Writer {
    type Op = Op;

    fn write(&mut self, mut batch: Vec<Op>) {
        let db = &mut self.0;
        let res: rusqlite::Result<()> = (|| {
            let tx = db.transaction()?;
            for op in &batch {
                apply(&tx, op)?;
            }
            tx.commit()
        })();
        if let Err(e) = res {
            // One bad write must not take the batch's others with it (a subscription, an ack):
            // the batch goes again with a savepoint per change (still one commit), and only
            // what fails is lost, logged.
            log::error!(
                "session store: batch write failed ({e}); writing its {} changes one by one",
                batch.len()
            );
            let mut ok = vec![false; batch.len()];
            let res: rusqlite::Result<()> = (|| {
                let mut tx = db.transaction()?;
                for (i, op) in batch.iter().enumerate() {
                    let sp = tx.savepoint()?;
                    if apply(&sp, op).is_ok() {
                        sp.commit()?;
                        ok[i] = true;
                    }
                }
                tx.commit()
            })();
            if let Err(e) = res {
                log::error!("session store: the retry failed too ({e})");
                ok.iter_mut().for_each(|o| *o = false);
            }
            let failed = ok.iter().filter(|o| !**o).count();
            if failed > 0 {
                log::error!("session store: {failed} changes could not be written");
            }
            // Dropped: a publisher waiting on one is not acknowledged and publishes again.
            batch = batch
                .into_iter()
                .zip(ok)
                .filter(|(_, ok)| *ok)
                .map(|(op, _)| op)
                .collect();
        }
        // Only a committed message releases its publisher's ack.
        for op in batch {
            match op {
                Op::Enqueue(_, _, _, Some(w)) => {
                    let _ = w.send(());
                }
                Op::Flush(w) => {
                    let _ = w.send(());
                }
                _ => {}
            }
        }
    }
}

fn apply(tx: &Connection, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Session { key, id, expiry } => {
            tx.execute(
                "INSERT INTO sessions (key, username, client_id, listener, device, expiry, detached_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)
                 ON CONFLICT(key) DO UPDATE SET username = excluded.username, listener = excluded.listener,
                   device = excluded.device, expiry = excluded.expiry, detached_ms = NULL",
                params![&**key, id.username, id.client_id, id.listener, id.device, expiry],
            )?;
        }
        Op::Detached { key, at_ms, expiry } => {
            tx.execute(
                "UPDATE sessions SET detached_ms = ?2, expiry = ?3 WHERE key = ?1",
                params![&**key, at_ms, expiry],
            )?;
        }
        Op::End(key) => {
            for t in ["sessions", "subs", "messages", "qos2_in"] {
                tx.execute(&format!("DELETE FROM {t} WHERE key = ?1"), params![&**key])?;
            }
        }
        Op::Sub(key, filter, o) => {
            tx.execute(
                "INSERT INTO subs (key, filter, qos, no_local, rap, sub_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(key, filter) DO UPDATE SET qos = excluded.qos, no_local = excluded.no_local,
                   rap = excluded.rap, sub_id = excluded.sub_id",
                params![&**key, &**filter, o.qos, o.no_local, o.retain_as_published, o.id],
            )?;
        }
        Op::Unsub(key, filter) => {
            tx.execute(
                "DELETE FROM subs WHERE key = ?1 AND filter = ?2",
                params![&**key, &**filter],
            )?;
        }
        Op::Enqueue(key, id, d, _) => {
            let sub_ids = d.sub_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
            tx.execute(
                "INSERT OR REPLACE INTO messages (id, key, topic, payload, pub_qos, qos, retain, sub_ids, props, expires_ms, share)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    *id as i64,
                    &**key,
                    &*d.msg.topic,
                    &d.msg.payload[..],
                    d.msg.qos,
                    d.qos,
                    d.retain,
                    sub_ids,
                    d.msg.props.as_deref().map(Props::to_json),
                    d.msg.expires_ms,
                    d.share.as_deref()
                ],
            )?;
        }
        Op::Sent(id, pkid) => {
            tx.execute("UPDATE messages SET pkid = ?2 WHERE id = ?1", params![*id as i64, pkid])?;
        }
        Op::Released(id) => {
            tx.execute("UPDATE messages SET released = 1 WHERE id = ?1", params![*id as i64])?;
        }
        Op::Done(id) => {
            tx.execute("DELETE FROM messages WHERE id = ?1", params![*id as i64])?;
        }
        Op::Qos2In(key, pkid, true) => {
            tx.execute(
                "INSERT OR IGNORE INTO qos2_in (key, pkid) VALUES (?1, ?2)",
                params![&**key, pkid],
            )?;
        }
        Op::Qos2In(key, pkid, false) => {
            tx.execute(
                "DELETE FROM qos2_in WHERE key = ?1 AND pkid = ?2",
                params![&**key, pkid],
            )?;
        }
        Op::Flush(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, share: Option<&str>) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: Arc::from(topic),
                payload: Bytes::from_static(b"p"),
                qos: 1,
                retain: false,
                props: None,
                expires_ms: None,
                origin: None,
                from: 0,
            }),
            qos: 1,
            retain: false,
            sub_ids: vec![],
            store_id: 0,
            share: share.map(Arc::from),
        }
    }

    #[test]
    fn one_failing_write_loses_only_itself_and_a_share_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SessionStore::open(&path).unwrap());
        // A write the disk refuses (as a full disk would), for one topic only.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.topic = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let (s, _) = SessionStore::open(&path).unwrap();
        let key: Arc<str> = Arc::from("u:c");
        let id = Identity {
            username: None,
            client_id: "c".into(),
            listener: String::new(),
            device: false,
        };
        s.session(&key, &id, NEVER_EXPIRES);
        let bad = s.enqueue(&key, s.next_id(), &delivery("poison", None), true).unwrap();
        let good = s
            .enqueue(&key, s.next_id(), &delivery("fine", Some("$share/g/fine")), true)
            .unwrap();
        let opts = SubOpts {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        };
        s.sub(&key, "fine", &opts);
        s.flush();
        assert!(good.blocking_recv().is_ok(), "the good write was not confirmed");
        assert!(
            bad.blocking_recv().is_err(),
            "a refused write was confirmed to its publisher"
        );
        drop(s);
        let (_s, kept) = SessionStore::open(&path).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].subs.len(), 1, "the subscription went down with the batch");
        let topics: Vec<_> = kept[0]
            .messages
            .iter()
            .map(|m| (&*m.1.msg.topic, m.1.share.as_deref()))
            .collect();
        assert_eq!(topics, vec![("fine", Some("$share/g/fine"))]);
    }

    #[test]
    fn tables_from_before_the_share_column_are_read_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(FIRST_SCHEMA).unwrap();
        db.execute_batch(
            "INSERT INTO sessions VALUES ('u:c', NULL, 'c', '', 0, 60, 1000);
             INSERT INTO subs VALUES ('u:c', 'a/#', 1, 0, 0, NULL);
             INSERT INTO messages (id, key, topic, payload, pub_qos, qos, retain, sub_ids)
               VALUES (7, 'u:c', 'a/b', x'41', 1, 1, 0, '');",
        )
        .unwrap();
        drop(db);
        let (s, kept) = SessionStore::open(&path).unwrap();
        assert_eq!((kept.len(), kept[0].subs.len(), kept[0].messages.len()), (1, 1, 1));
        let (id, d, pkid, _) = &kept[0].messages[0];
        assert_eq!((*id, &*d.msg.topic, d.share.is_none(), *pkid), (7, "a/b", true, 0));
        let key: Arc<str> = Arc::from("u:c");
        assert_eq!(s.next_id(), 8);
        s.enqueue(&key, 8, &delivery("a/c", Some("$share/g/a/#")), false);
        s.sent(7, 3);
        s.flush();
        drop(s);
        // An older outpost's queries still work on the extended table.
        let db = Connection::open(&path).unwrap();
        db.execute(
            "INSERT INTO messages (id, key, topic, payload, pub_qos, qos, retain, sub_ids) VALUES (9, 'u:c', 'a/d', x'42', 1, 1, 0, '')",
            [],
        )
        .unwrap();
        drop(db);
        let (_s, kept) = SessionStore::open(&path).unwrap();
        let got: Vec<_> = kept[0]
            .messages
            .iter()
            .map(|m| (m.0, &*m.1.msg.topic, m.1.share.as_deref(), m.2))
            .collect();
        assert_eq!(
            got,
            vec![
                (7, "a/b", None, 3),
                (8, "a/c", Some("$share/g/a/#"), 0),
                (9, "a/d", None, 0)
            ]
        );
    }

    const NEVER_EXPIRES: u32 = u32::MAX;
}
