//! What the SQLite stores (retained messages, sessions, bridge spools) share: their schema
//! migrations, numbered in `PRAGMA user_version` by `rusqlite_migration`.
//!
//! Keeping a revert possible: a migration only adds a column that an older INSERT may leave
//! out (nullable, or with a default) or a table, so the release before reads and writes a
//! database the newer one migrated, and a database whose `user_version` is beyond the steps
//! this release knows (a newer release wrote it) is opened as it is.

use anyhow::{Context, Result};
use rusqlite::Connection;
use rusqlite_migration::{HookError, Migrations, M};

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
