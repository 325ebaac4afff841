//! Retained messages on disk, so they survive a restart; the router keeps them in memory too.
//! The broker records every retained PUBLISH it lets through; on start the store is
//! loaded into the router before any client connects. Writes go to one thread in batches.

use anyhow::{Context, Result};
use bytes::Bytes;
use rusqlite::{params, Connection};
use std::path::Path;
use std::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

/// Handle to the writer thread. Cloned into every connection.
#[derive(Clone)]
pub struct RetainedStore {
    tx: mpsc::Sender<Op>,
}

enum Op {
    Put(Retained),
    Flush(mpsc::Sender<()>),
}

fn open(path: &Path) -> Result<Connection> {
    let db = Connection::open(path).with_context(|| format!("opening retained store {}", path.display()))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL)",
    )?;
    Ok(db)
}

impl RetainedStore {
    /// Opens (or creates) the store and returns it with what it holds.
    pub fn open(path: &Path) -> Result<(RetainedStore, Vec<Retained>)> {
        let db = open(path)?;
        let existing = {
            let mut q = db.prepare("SELECT topic, payload, qos FROM retained ORDER BY topic")?;
            let rows = q.query_map([], |r| {
                Ok(Retained {
                    topic: r.get(0)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    qos: r.get(2)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("retained-store".into())
            .spawn(move || writer(db, rx))?;
        Ok((RetainedStore { tx }, existing))
    }

    /// Records a retained publish; an empty payload clears the topic.
    pub fn put(&self, r: Retained) {
        let _ = self.tx.send(Op::Put(r));
    }

    /// Waits until everything put so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Op::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn writer(mut db: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut waiters = vec![];
        let res: rusqlite::Result<()> = (|| {
            let tx = db.transaction()?;
            for op in batch {
                match op {
                    Op::Put(r) if r.payload.is_empty() => {
                        tx.execute("DELETE FROM retained WHERE topic = ?1", params![r.topic])?;
                    }
                    Op::Put(r) => {
                        tx.execute(
                            "INSERT INTO retained (topic, payload, qos) VALUES (?1, ?2, ?3)
                             ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos",
                            params![r.topic, &r.payload[..], r.qos],
                        )?;
                    }
                    Op::Flush(w) => waiters.push(w),
                }
            }
            tx.commit()
        })();
        if let Err(e) = res {
            log::error!("retained store: write failed: {e}");
        }
        for w in waiters {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_replace_clear_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (s, existing) = RetainedStore::open(&path).unwrap();
        assert!(existing.is_empty());
        s.put(Retained {
            topic: "a".into(),
            payload: Bytes::from_static(b"1"),
            qos: 1,
        });
        s.put(Retained {
            topic: "a".into(),
            payload: Bytes::from_static(b"2"),
            qos: 0,
        });
        s.put(Retained {
            topic: "b".into(),
            payload: Bytes::from_static(b"x"),
            qos: 0,
        });
        s.put(Retained {
            topic: "b".into(),
            payload: Bytes::new(),
            qos: 0,
        });
        s.flush();
        drop(s);
        let (_s, existing) = RetainedStore::open(&path).unwrap();
        assert_eq!(
            existing,
            vec![Retained {
                topic: "a".into(),
                payload: Bytes::from_static(b"2"),
                qos: 0
            }]
        );
    }
}
