//! The session store: every established DTLS session's compact state in SQLite, so a
//! restarted server (even after a SIGKILL) serves its devices over their old sessions, with
//! no handshake.
//!
//! A row holds the session's snapshot (keys included) and the parts that change while it
//! lives, written by checkpoints: its write-sequence limit, its replay window and its peer's
//! address. The database file (and SQLite's `-wal` and `-shm` files, which SQLite creates
//! with the database's mode) is readable by its owner only (0600), and no key is ever
//! logged. Writes are batched: one transaction per driver wake-up, durable when it returns
//! (`synchronous=FULL`), so a crash loses at most the last checkpoint interval of replay
//! window movement and never a write-sequence reservation in use.
//!
//! Keys do not outlive their session on disk: deleted rows are overwritten with zeros
//! (`secure_delete`), and a transaction that deleted any truncates the write-ahead log, which
//! held the rows' earlier copies.
//!
//! **A copy put back is detected.** Every transaction counts up a generation, kept both in
//! the database and in a marker file beside it (`sessions.db.generation`), which the
//! database's own backup does not carry back. A database older than its marker was put back
//! from a copy: its sessions may have used sequence numbers, and seen records, after the copy
//! was taken. Reusing them would reuse AEAD nonces and roll back replay windows, so they are
//! all dropped (each device handshakes once) and the opening says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};
use tether_proto::dtls::{Checkpoint, SessionHandle, SessionSnapshot};

use crate::store::{check_integrity, create_private, durable, left_unclean, migrate, OpenReport, StoreError};

/// One change to the stored sessions.
#[derive(Debug, Clone)]
pub enum SessionWrite {
    /// A new session (its first snapshot).
    Insert {
        /// Its handle, stable across restarts.
        handle: SessionHandle,
        /// Its peer's address.
        peer: SocketAddr,
        /// Its snapshot (boxed: the other writes, the many, are small).
        snapshot: Box<SessionSnapshot>,
    },
    /// A checkpoint of a stored session.
    Checkpoint(Checkpoint),
    /// A session that ended.
    Delete(SessionHandle),
}

/// A session loaded from the store.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Its handle.
    pub handle: SessionHandle,
    /// Where its peer last was.
    pub peer: SocketAddr,
    /// Its state, with the last checkpoint applied.
    pub snapshot: SessionSnapshot,
}

/// Established sessions on disk.
#[derive(Debug)]
pub struct SessionStore {
    db: Mutex<Connection>,
    /// The generation marker beside the database (`None` in memory).
    marker: Option<PathBuf>,
    opened: SessionsOpened,
}

/// What opening a session store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionsOpened {
    /// Left without a clean close.
    pub store: OpenReport,
    /// The database was older than its generation marker (put back from a copy): its
    /// sessions must be ended, not restored.
    pub rolled_back: Option<RolledBack>,
}

/// A session store put back from an older copy (see the module docs): none of its
/// sessions may be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The generation the database holds.
    pub database: u64,
    /// The generation the marker holds: the last one written.
    pub marker: u64,
}

impl SessionStore {
    /// Opens (creating if needed, mode 0600) the database at `path`, after SQLite's
    /// integrity check, and says if the database is older than its generation marker (see
    /// the module docs): then none of its sessions may be restored.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let unclean = left_unclean(path);
        create_private(path).map_err(|e| StoreError::Io(path.display().to_string(), e))?;
        let db = Connection::open(path)?;
        check_integrity(&db, path, "move it away to start without stored sessions (each device handshakes once)")?;
        let mut store = Self::init(db)?;
        store.opened.store.unclean = unclean;
        let mut marker = path.as_os_str().to_owned();
        marker.push(".generation");
        let marker = PathBuf::from(marker);
        let written = read_marker(&marker).map_err(|e| StoreError::Io(marker.display().to_string(), e))?;
        store.marker = Some(marker);
        let database = store.generation()?;
        if let Some(written) = written.filter(|written| database < *written) {
            store.opened.rolled_back = Some(RolledBack { database, marker: written });
        }
        // Move both past anything written before, so the next comparison is fair.
        let next = database.max(written.unwrap_or(0)) + 1;
        store
            .db
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .execute("UPDATE meta SET value = ?1 WHERE key = 'generation'", params![next as i64])?;
        store.write_marker(next)?;
        Ok(store)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// What opening found.
    pub fn opened(&self) -> &SessionsOpened {
        &self.opened
    }

    fn init(db: Connection) -> Result<Self, StoreError> {
        let db = durable(db)?;
        db.pragma_update(None, "secure_delete", "ON")?;
        migrate(
            &db,
            &[
                "CREATE TABLE IF NOT EXISTS sessions (
                    handle INTEGER PRIMARY KEY,
                    peer TEXT NOT NULL,
                    snapshot BLOB NOT NULL,
                    write_limit INTEGER NOT NULL,
                    window_next INTEGER NOT NULL,
                    window_seen INTEGER NOT NULL
                );",
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta (key, value) VALUES ('generation', 0);",
            ],
        )?;
        Ok(Self { db: Mutex::new(db), marker: None, opened: SessionsOpened::default() })
    }

    /// The generation the database holds.
    fn generation(&self) -> Result<u64, StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let value: i64 = db.query_row("SELECT value FROM meta WHERE key = 'generation'", [], |row| row.get(0))?;
        Ok(u64::try_from(value).unwrap_or(0))
    }

    /// Writes the generation marker in place (one short fixed-width line, synced): it is
    /// never behind the database by more than a crash between the two writes, which reads
    /// as no rollback.
    fn write_marker(&self, generation: u64) -> Result<(), StoreError> {
        use std::io::{Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let Some(marker) = &self.marker else { return Ok(()) };
        let io = |e| StoreError::Io(marker.display().to_string(), e);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(marker)
            .map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{generation:020}").map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Applies a batch of changes in one durable transaction.
    pub fn apply(&self, batch: &[SessionWrite]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let tx = db.transaction()?;
        tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'", [])?;
        let generation: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'generation'", [], |row| row.get(0))?;
        let deleted = batch.iter().any(|w| matches!(w, SessionWrite::Delete(_)));
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions (handle, peer, snapshot, write_limit, window_next, window_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut checkpoint = tx.prepare_cached(
                "UPDATE sessions SET peer = ?2, write_limit = MAX(write_limit, ?3), window_next = ?4, window_seen = ?5
                 WHERE handle = ?1",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM sessions WHERE handle = ?1")?;
            for write in batch {
                match write {
                    SessionWrite::Insert { handle, peer, snapshot } => {
                        insert.execute(params![
                            handle.0 as i64,
                            peer.to_string(),
                            snapshot.encode(),
                            snapshot.write_limit() as i64,
                            0i64,
                            0i64,
                        ])?;
                    }
                    SessionWrite::Checkpoint(c) => {
                        let (next, seen) = c.replay_window;
                        checkpoint.execute(params![
                            c.handle.0 as i64,
                            c.peer.to_string(),
                            c.write_limit as i64,
                            next as i64,
                            seen as i64,
                        ])?;
                    }
                    SessionWrite::Delete(handle) => {
                        delete.execute(params![handle.0 as i64])?;
                    }
                }
            }
        }
        tx.commit()?;
        if deleted {
            // The write-ahead log still holds the deleted rows' earlier pages: fold it into
            // the database (where they are zeros now) and empty it.
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        drop(db);
        // After the commit: a crash in between leaves the database ahead of the marker,
        // which is no rollback.
        self.write_marker(u64::try_from(generation).unwrap_or(0))
    }

    /// Every stored session, with its last checkpoint applied. Rows that no longer decode
    /// are deleted (their devices will handshake again).
    pub fn load(&self) -> Result<Vec<StoredSession>, StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let mut statement = db.prepare(
            "SELECT handle, peer, snapshot, write_limit, window_next, window_seen FROM sessions ORDER BY handle",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })?;
        let mut sessions = Vec::new();
        let mut broken = Vec::new();
        for row in rows {
            let (handle, peer, snapshot, write_limit, next, seen) = row?;
            match (peer.parse::<SocketAddr>(), SessionSnapshot::decode(&snapshot)) {
                (Ok(peer), Ok(mut snapshot)) => {
                    snapshot.advance(write_limit as u64, (next as u64, seen as u64));
                    sessions.push(StoredSession { handle: SessionHandle(handle as u64), peer, snapshot });
                }
                _ => broken.push(handle),
            }
        }
        drop(statement);
        for handle in broken {
            db.execute("DELETE FROM sessions WHERE handle = ?1", params![handle])?;
        }
        Ok(sessions)
    }

    /// Sessions stored.
    pub fn len(&self) -> Result<usize, StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        Ok(db.query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get::<_, i64>(0))? as usize)
    }

    /// True if no session is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

/// The generation in the marker file, if there is one.
fn read_marker(marker: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(marker) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-session-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_database_put_back_from_an_older_copy_is_detected() {
        let dir = dir("rollback");
        let path = dir.join("sessions.db");
        let store = SessionStore::open(&path).unwrap();
        assert_eq!(store.opened().rolled_back, None);
        store.apply(&[SessionWrite::Delete(SessionHandle(1))]).unwrap();
        drop(store); // a clean close folds the write-ahead log into the file
        assert!(!crate::store::left_unclean(&path));
        std::fs::copy(&path, dir.join("copy.db")).unwrap();

        let store = SessionStore::open(&path).unwrap();
        assert_eq!(store.opened().rolled_back, None, "reopened as it was left");
        store.apply(&[SessionWrite::Delete(SessionHandle(2))]).unwrap();
        drop(store);
        std::fs::copy(dir.join("copy.db"), &path).unwrap();
        let store = SessionStore::open(&path).unwrap();
        let rolled_back = store.opened().rolled_back.expect("the copy is older than the marker");
        assert!(rolled_back.database < rolled_back.marker, "{rolled_back:?}");
        store.apply(&[SessionWrite::Delete(SessionHandle(1))]).unwrap();
        drop(store);
        let store = SessionStore::open(&path).unwrap();
        assert_eq!(store.opened().rolled_back, None, "the store goes on from there");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_file_is_refused_and_a_killed_one_is_named() {
        let dir = dir("damaged");
        let path = dir.join("sessions.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = SessionStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("is damaged") && err.contains("move it away"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let store = SessionStore::open(&path).unwrap();
        std::fs::copy(&path, dir.join("live.db")).unwrap();
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        std::fs::copy(&wal, dir.join("live.db-wal")).unwrap(); // as a kill leaves it
        drop(store);
        assert!(SessionStore::open(&dir.join("live.db")).unwrap().opened().store.unclean);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
