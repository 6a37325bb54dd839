//! The embedded backend: SQLite files in the data directory, one for registrations and one
//! for sessions. Every committed transaction is on disk when its commit returns
//! (`journal_mode=WAL`, `synchronous=FULL`); SQLite's calls block, so each write runs on
//! the blocking pool.

mod registrations;
mod sessions;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use registrations::SqliteRegistrations;
pub use sessions::SqliteSessions;

use super::StoreError;

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Backend { backend: "sqlite", message: err.to_string() }
    }
}

/// A connection shared by a store and the blocking tasks that use it.
type Shared = Arc<Mutex<Connection>>;

/// Runs `work` on the connection on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    db: &Shared,
    work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || work(&mut db.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .map_err(|_| StoreError::Interrupted)?
}

/// Whether the database at `path` was left without a clean close: SQLite removes its
/// write-ahead log when the last connection closes normally.
fn left_unclean(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Path::new(&wal).exists()
}

/// `PRAGMA quick_check`: damaged pages or indexes are refused at start, with `remedy`.
fn check_integrity(db: &Connection, path: &Path, remedy: &'static str) -> Result<(), StoreError> {
    let findings = (|| -> rusqlite::Result<Vec<String>> {
        let mut statement = db.prepare("PRAGMA quick_check")?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
        rows.take(3).collect()
    })();
    let detail = match findings {
        Ok(findings) if findings.len() == 1 && findings[0] == "ok" => return Ok(()),
        Ok(findings) => findings.join("; "),
        Err(err) => err.to_string(),
    };
    Err(StoreError::Damaged { file: path.display().to_string(), detail, remedy })
}

/// Creates `path` readable and writable by its owner only, or narrows an existing file to
/// that (SQLite gives its `-wal` and `-shm` files the database's mode).
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e| StoreError::Io(path.display().to_string(), e);
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

/// Opens the database at `path` (created mode 0600) after SQLite's integrity check, durable
/// and with its schema brought up to date by `steps`; and whether it was left unclean.
fn open(path: &Path, remedy: &'static str, steps: &[&str]) -> Result<(Connection, bool), StoreError> {
    let unclean = left_unclean(path);
    create_private(path)?;
    let db = Connection::open(path)?;
    check_integrity(&db, path, remedy)?;
    Ok((prepare(db, steps)?, unclean))
}

/// `db` made durable, its schema brought up to date by `steps`.
fn prepare(db: Connection, steps: &[&str]) -> Result<Connection, StoreError> {
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    migrate(&db, steps)?;
    Ok(db)
}

/// Brings the schema of `db` up to date: `steps[i]` takes it from version `i` to `i + 1`
/// (`PRAGMA user_version`), each in its own transaction with its version.
fn migrate(db: &Connection, steps: &[&str]) -> Result<(), StoreError> {
    let version: usize = db.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?.try_into().unwrap_or(0);
    for (i, step) in steps.iter().enumerate().skip(version) {
        db.execute_batch(&format!("BEGIN; {step} PRAGMA user_version = {}; COMMIT;", i + 1))?;
    }
    Ok(())
}
