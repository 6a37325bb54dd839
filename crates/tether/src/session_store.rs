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

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use tether_proto::dtls::{Checkpoint, SessionHandle, SessionSnapshot};

use crate::store::{durable, StoreError};

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
}

impl SessionStore {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private(path).map_err(|e| StoreError::Io(path.display().to_string(), e))?;
        Self::init(Connection::open(path)?)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(db: Connection) -> Result<Self, StoreError> {
        let db = durable(db)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                handle INTEGER PRIMARY KEY,
                peer TEXT NOT NULL,
                snapshot BLOB NOT NULL,
                write_limit INTEGER NOT NULL,
                window_next INTEGER NOT NULL,
                window_seen INTEGER NOT NULL
            );",
        )?;
        Ok(Self { db: Mutex::new(db) })
    }

    /// Applies a batch of changes in one durable transaction.
    pub fn apply(&self, batch: &[SessionWrite]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let tx = db.transaction()?;
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
        Ok(())
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

/// Creates `path` readable and writable by its owner only, or narrows an existing file to
/// that.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}
