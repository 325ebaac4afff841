//! Retained messages on disk, so they survive a restart; the router keeps them in memory too.
//! The broker records every retained PUBLISH it lets through; on start the store is
//! loaded into the router before any client connects. Writes go to one thread in batches; a
//! QoS 1/2 retained PUBLISH is acknowledged only once its batch is committed (`synchronous`
//! FULL for such a batch), and a batch that cannot be written (a full disk) refuses them.
//! Every batch is a fresh try, so the store recovers by itself when space comes back.

use super::router::message::Props;
use crate::system::sqlite;
use anyhow::{Context, Result};
use bytes::Bytes;
use rusqlite::{params, Connection};
use rusqlite_migration::M;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// MQTT 5 properties the publisher set; they go out with the message after a restart too.
    pub props: Option<Box<Props>>,
    /// Wall-clock expiry (ms since the epoch) from the message expiry interval: an expired
    /// retained message is not loaded.
    pub expires_ms: Option<i64>,
}

/// Handle to the writer thread. Cloned into every connection.
#[derive(Clone)]
pub struct RetainedStore {
    tx: mpsc::Sender<Op>,
    health: Arc<Health>,
}

/// How the last writes went, for status and `/healthz`.
#[derive(Default)]
pub struct Health {
    /// Batches that could not be written since start.
    pub failures: AtomicU64,
    /// Whether the last batch failed (cleared by the next one that is written).
    pub failing: AtomicBool,
}

enum Op {
    /// A retained message, and who waits for it to be on disk.
    Put(Retained, Option<oneshot::Sender<()>>),
    Flush(mpsc::Sender<()>),
}

fn open(path: &Path) -> Result<Connection> {
    let mut db = Connection::open(path).with_context(|| format!("opening retained store {}", path.display()))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    // Only added nullable columns, so an older outpost (after a snap revert) reads the table
    // as before (see `system::sqlite`).
    let steps = vec![
        M::up(
            "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL)",
        ),
        sqlite::add_column("retained", "props", "TEXT"),
        sqlite::add_column("retained", "expires_ms", "INTEGER"),
    ];
    sqlite::migrate(&mut db, &format!("retained store {}", path.display()), steps)?;
    Ok(db)
}

impl RetainedStore {
    /// Opens (or creates) the store and returns it with what it holds.
    pub fn open(path: &Path) -> Result<(RetainedStore, Vec<Retained>)> {
        let db = open(path)?;
        let existing = {
            let mut q = db.prepare("SELECT topic, payload, qos, props, expires_ms FROM retained ORDER BY topic")?;
            let rows = q.query_map([], |r| {
                Ok(Retained {
                    topic: r.get(0)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    qos: r.get(2)?,
                    props: r.get::<_, Option<String>>(3)?.as_deref().and_then(Props::from_json),
                    expires_ms: r.get(4)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        // Expired while the gateway was down: gone from the table too.
        let now = crate::system::clock::now_ms();
        db.execute(
            "DELETE FROM retained WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
            params![now],
        )?;
        let existing: Vec<Retained> = existing
            .into_iter()
            .filter(|r| r.expires_ms.is_none_or(|e| e > now))
            .collect();
        let health = Arc::new(Health::default());
        let writer = Writer {
            db,
            health: health.clone(),
        };
        let tx = sqlite::spawn_writer("retained-store".into(), writer)?;
        Ok((RetainedStore { tx, health }, existing))
    }

    /// Records a retained publish; an empty payload clears the topic. With `durable`, returns
    /// what fires once it is on disk (dropped unfired when it could not be written).
    pub fn put(&self, r: Retained, durable: bool) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = match durable {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let _ = self.tx.send(Op::Put(r, tx));
        rx
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Waits until everything put so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Op::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// What the writer thread owns.
struct Writer {
    db: Connection,
    health: Arc<Health>,
}

impl sqlite::Batches for Writer {
    type Op = Op;
    /// Everything queued goes into one batch.
    const MORE: usize = usize::MAX;

    fn write(&mut self, batch: Vec<Op>) {
        let (db, health) = (&mut self.db, &self.health);
        let mut waiters = vec![];
        let mut kept = vec![];
        // A batch that carries acknowledgements is synced to the disk before they go out.
        let durable = batch.iter().any(|op| matches!(op, Op::Put(_, Some(_))));
        let sync = if durable { "FULL" } else { "NORMAL" };
        let res: rusqlite::Result<()> = (|| {
            db.pragma_update(None, "synchronous", sync)?;
            let tx = db.transaction()?;
            for op in batch {
                let r = match op {
                    Op::Put(r, w) => {
                        kept.extend(w);
                        r
                    }
                    Op::Flush(w) => {
                        waiters.push(w);
                        continue;
                    }
                };
                match r {
                    r if r.payload.is_empty() => {
                        tx.execute("DELETE FROM retained WHERE topic = ?1", params![r.topic])?;
                    }
                    r => {
                        tx.execute(
                            "INSERT INTO retained (topic, payload, qos, props, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos,
                                 props = excluded.props, expires_ms = excluded.expires_ms",
                            params![
                                r.topic,
                                &r.payload[..],
                                r.qos,
                                r.props.as_deref().map(Props::to_json),
                                r.expires_ms
                            ],
                        )?;
                    }
                }
            }
            tx.commit()
        })();
        match res {
            Ok(()) => {
                if health.failing.swap(false, Ordering::Relaxed) {
                    log::info!("retained store: writing again");
                }
                for k in kept {
                    let _ = k.send(());
                }
            }
            Err(e) => {
                // The waiting publishers are not acknowledged (their receivers see the senders
                // dropped): they are refused, or publish again.
                health.failures.fetch_add(1, Ordering::Relaxed);
                health.failing.store(true, Ordering::Relaxed);
                log::error!(
                    "retained store: write failed: {e}; QoS 1/2 retained publishes refused until it writes again"
                );
            }
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl RetainedStore {
        fn put_now(&self, r: Retained) {
            self.put(r, false);
        }
    }

    #[test]
    fn put_replace_clear_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (s, existing) = RetainedStore::open(&path).unwrap();
        assert!(existing.is_empty());
        s.put_now(Retained {
            topic: "a".into(),
            payload: Bytes::from_static(b"1"),
            qos: 1,
            props: None,
            expires_ms: None,
        });
        s.put_now(Retained {
            topic: "a".into(),
            payload: Bytes::from_static(b"2"),
            qos: 0,
            props: None,
            expires_ms: None,
        });
        s.put_now(Retained {
            topic: "b".into(),
            payload: Bytes::from_static(b"x"),
            qos: 0,
            props: None,
            expires_ms: None,
        });
        s.put_now(Retained {
            topic: "b".into(),
            payload: Bytes::new(),
            qos: 0,
            props: None,
            expires_ms: None,
        });
        s.flush();
        drop(s);
        let (_s, existing) = RetainedStore::open(&path).unwrap();
        assert_eq!(
            existing,
            vec![Retained {
                topic: "a".into(),
                payload: Bytes::from_static(b"2"),
                qos: 0,
                props: None,
                expires_ms: None,
            }]
        );
    }

    #[test]
    fn properties_and_expiry_survive_a_reopen_and_expired_ones_are_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (s, _) = RetainedStore::open(&path).unwrap();
        let now = crate::system::clock::now_ms();
        let props = Props::from_parts(
            Some(1),
            Some("text/plain".into()),
            None,
            None,
            vec![("k".into(), "v".into())],
        );
        let keep = Retained {
            topic: "keep".into(),
            payload: Bytes::from_static(b"1"),
            qos: 1,
            props,
            expires_ms: Some(now + 60_000),
        };
        s.put_now(keep.clone());
        s.put_now(Retained {
            topic: "gone".into(),
            payload: Bytes::from_static(b"2"),
            qos: 1,
            props: None,
            expires_ms: Some(now - 1),
        });
        s.flush();
        drop(s);
        let (_s, existing) = RetainedStore::open(&path).unwrap();
        assert_eq!(existing, vec![keep]);
    }

    #[test]
    fn a_table_from_before_the_new_columns_is_read_and_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
             INSERT INTO retained VALUES ('old', x'41', 1);",
        )
        .unwrap();
        drop(db);
        let (s, existing) = RetainedStore::open(&path).unwrap();
        assert_eq!(existing.len(), 1);
        assert_eq!((existing[0].topic.as_str(), existing[0].props.is_none()), ("old", true));
        let new = Retained {
            topic: "new".into(),
            payload: Bytes::from_static(b"2"),
            qos: 0,
            props: Props::from_parts(None, Some("text/plain".into()), None, None, vec![]),
            expires_ms: Some(crate::system::clock::now_ms() + 60_000),
        };
        s.put_now(new.clone());
        s.flush();
        drop(s);
        // What an older outpost reads and writes still works on the extended table.
        let db = Connection::open(&path).unwrap();
        db.execute(
            "INSERT INTO retained (topic, payload, qos) VALUES ('older', x'42', 1)",
            [],
        )
        .unwrap();
        let n: i64 = db
            .query_row("SELECT count(*) FROM retained WHERE qos = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        drop(db);
        let (_s, existing) = RetainedStore::open(&path).unwrap();
        let topics: Vec<_> = existing.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["new", "old", "older"]);
        assert_eq!(existing[0], new);
    }
}
