//! What the SQLite stores (retained messages, sessions, bridge spools) share: their schema
//! migrations, numbered in `PRAGMA user_version` by `rusqlite_migration`, and the shape of
//! their writer thread ([`Batches`], [`spawn_writer`]): one thread owns the connection, takes
//! ops from a channel, and hands the store whatever has queued as one batch to commit.
//!
//! Keeping a revert possible: a migration only adds a column that an older INSERT may leave
//! out (nullable, or with a default) or a table, so the release before reads and writes a
//! database the newer one migrated, and a database whose `user_version` is beyond the steps
//! this release knows (a newer release wrote it) is opened as it is.

use anyhow::{Context, Result};
use rusqlite::Connection;
use rusqlite_migration::{HookError, Migrations, M};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A store's writer: the state its thread owns (the connection, counters) and what it does
/// with a batch. Commits, error handling and answering waiters are the store's own.
pub trait Batches: Send + 'static {
    type Op: Send + 'static;
    /// At most this many queued ops join the one that woke the thread.
    const MORE: usize = 10_000;
    /// With `Some(t)`: [`Batches::idle`] runs when no op came for `t` and when the last
    /// sender is gone, [`Batches::every`] at least every `t`, busy or not.
    const TICK: Option<Duration> = None;
    /// Writes one batch, in the order the ops were sent.
    fn write(&mut self, batch: Vec<Self::Op>);
    fn idle(&mut self) {}
    fn every(&mut self) {}
}

/// Starts the thread `name` that runs `state` over the ops sent to the returned sender; it
/// ends once every sender is dropped.
pub fn spawn_writer<B: Batches>(name: String, mut state: B) -> std::io::Result<mpsc::Sender<B::Op>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&mut state, &rx))?;
    Ok(tx)
}

fn run<B: Batches>(state: &mut B, rx: &mpsc::Receiver<B::Op>) {
    let mut last = Instant::now();
    loop {
        let first = match B::TICK {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match first {
            Ok(first) => {
                // Group commit: whatever else is waiting goes into the same batch.
                let mut batch = vec![first];
                batch.extend(rx.try_iter().take(B::MORE));
                state.write(batch);
            }
            Err(RecvTimeoutError::Timeout) => state.idle(),
            Err(RecvTimeoutError::Disconnected) => {
                state.idle();
                return;
            }
        }
        if let Some(t) = B::TICK {
            if last.elapsed() >= t {
                last = Instant::now();
                state.every();
            }
        }
    }
}

/// A step that adds `column` (declared `decl`) to `table`, unless the table has it already:
/// databases written before `user_version` was kept carry no version, and some of them have
/// the column (see [`migrate`]).
pub fn add_column(table: &'static str, column: &'static str, decl: &'static str) -> M<'static> {
    M::up_with_hook("", move |tx: &rusqlite::Transaction| {
        let has = tx
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists([table, column])?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
        Ok::<(), HookError>(())
    })
}

/// Brings `db` up to the last of `steps`, in one transaction. The first step creates the
/// tables as the first release made them (`CREATE TABLE IF NOT EXISTS`), the later ones are
/// [`add_column`]s: a database from before `user_version` (version 0) goes through all of
/// them, whichever columns it has already.
pub fn migrate(db: &mut Connection, what: &str, steps: Vec<M<'static>>) -> Result<()> {
    let known = steps.len();
    let at: usize = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if at > known {
        log::info!("{what}: schema version {at}, from a newer outpost (this one knows {known}); used as it is");
        return Ok(());
    }
    Migrations::new(steps)
        .to_latest(db)
        .with_context(|| format!("upgrading {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<M<'static>> {
        vec![
            M::up("CREATE TABLE IF NOT EXISTS t (a TEXT NOT NULL)"),
            add_column("t", "b", "TEXT"),
            add_column("t", "c", "INTEGER NOT NULL DEFAULT 0"),
        ]
    }

    fn columns(db: &Connection) -> Vec<String> {
        db.prepare("SELECT name FROM pragma_table_info('t')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn version(db: &Connection) -> usize {
        db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_new_database_and_one_from_before_user_version_end_up_alike() {
        let mut new = Connection::open_in_memory().unwrap();
        migrate(&mut new, "t", steps()).unwrap();
        assert_eq!(
            (columns(&new), version(&new)),
            (vec!["a".into(), "b".into(), "c".into()], 3)
        );
        // Version 0 with one of the later columns already added by hand, and a row.
        let mut old = Connection::open_in_memory().unwrap();
        old.execute_batch("CREATE TABLE t (a TEXT NOT NULL, b TEXT); INSERT INTO t VALUES ('x', 'y');")
            .unwrap();
        migrate(&mut old, "t", steps()).unwrap();
        assert_eq!(
            (columns(&old), version(&old)),
            (vec!["a".into(), "b".into(), "c".into()], 3)
        );
        let row: (String, String, i64) = old
            .query_row("SELECT a, b, c FROM t", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        assert_eq!(row, ("x".into(), "y".into(), 0));
        // Again: nothing to do.
        migrate(&mut old, "t", steps()).unwrap();
        assert_eq!(version(&old), 3);
    }

    /// Hands each batch out, and waits before writing it until told to go on.
    struct Gated {
        out: mpsc::Sender<Vec<u32>>,
        entered: mpsc::Sender<()>,
        go: mpsc::Receiver<()>,
    }
    impl Batches for Gated {
        type Op = u32;
        const MORE: usize = 2;
        fn write(&mut self, batch: Vec<u32>) {
            self.entered.send(()).unwrap();
            self.go.recv().unwrap();
            self.out.send(batch).unwrap();
        }
    }

    #[test]
    fn the_writer_takes_what_queued_as_one_batch_and_ends_with_its_senders() {
        let (out, batches) = mpsc::channel();
        let (entered, writing) = mpsc::channel();
        let (go_on, go) = mpsc::channel();
        let tx = spawn_writer("test-writer".into(), Gated { out, entered, go }).unwrap();
        tx.send(1).unwrap();
        writing.recv().unwrap();
        // Queued while the first batch is being written.
        for i in 2..=5 {
            tx.send(i).unwrap();
        }
        drop(tx);
        for _ in 0..3 {
            go_on.send(()).unwrap();
        }
        let got: Vec<Vec<u32>> = batches.iter().collect();
        assert_eq!(got, vec![vec![1], vec![2, 3, 4], vec![5]]);
    }

    #[test]
    fn a_database_from_a_newer_release_is_used_as_it_is() {
        let mut db = Connection::open_in_memory().unwrap();
        migrate(&mut db, "t", steps()).unwrap();
        db.execute_batch("ALTER TABLE t ADD COLUMN d TEXT; PRAGMA user_version = 4;")
            .unwrap();
        migrate(&mut db, "t", steps()).unwrap();
        assert_eq!(version(&db), 4);
        // What this release writes still goes in.
        db.execute("INSERT INTO t (a, b) VALUES ('x', 'y')", []).unwrap();
    }
}
