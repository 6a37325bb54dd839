//! Established sessions in `sessions.db`: every session's compact state, so a restarted
//! server (even after a SIGKILL) serves its devices over their old sessions, with no
//! handshake.
//!
//! A row holds the session's snapshot (keys included) and the parts that change while it
//! lives, written by checkpoints: its write-sequence limit, its replay window and its peer's
//! address. The file (and SQLite's `-wal` and `-shm` files, which SQLite creates with the
//! database's mode) is readable by its owner only (0600), and no key is ever logged. A crash
//! loses at most the last checkpoint interval of replay window movement and never a
//! write-sequence reservation in use.
//!
//! Keys do not outlive their session on disk: deleted rows are overwritten with zeros
//! (`secure_delete`), and a transaction that deleted any truncates the write-ahead log, which
//! held the rows' earlier copies.
//!
//! **A copy put back is detected.** Every transaction counts up a generation, kept both in
//! the database and in a marker file beside it (`sessions.db.generation`), which the
//! database's own backup does not carry back. A database older than its marker was put back
//! from a copy: its sessions may have used sequence numbers, and seen records, after the copy
//! was taken; reusing them would reuse AEAD nonces and roll back replay windows. The opening
//! says so ([`SessionsOpened::rolled_back`]) and none of them may be restored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};
use tether_proto::dtls::{HandleSpace, NodeId, SessionHandle, SessionSnapshot};

use super::{blocking, Shared};
use crate::store::generation::Marker;
use crate::store::{Applied, SessionStore, SessionWrite, SessionsOpened, StoreError, StoreFuture, StoredSession};

/// The schema, one step per version.
const SCHEMA: &[&str] = &[
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
    // How many times the store was opened: the start count in session handles.
    "INSERT INTO meta (key, value) VALUES ('boots', 0);",
];

/// Established sessions in an SQLite file. See the module docs.
#[derive(Debug)]
pub struct SqliteSessions {
    db: Shared,
    /// The generation marker beside the database (`None` in memory).
    marker: Option<Arc<Marker>>,
    opened: SessionsOpened,
}

impl SqliteSessions {
    /// Opens (creating if needed, mode 0600) the database at `path`, after SQLite's
    /// integrity check, and says if the database is older than its generation marker (see
    /// the module docs): then none of its sessions may be restored.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let remedy = "move it away to start without stored sessions (each device handshakes once)";
        let (mut db, unclean) = super::open(path, remedy, SCHEMA)?;
        db.pragma_update(None, "secure_delete", "ON")?;
        let mut marker = path.as_os_str().to_owned();
        marker.push(".generation");
        let marker = Marker::at(PathBuf::from(marker));
        let (rolled_back, next) = marker.compare(generation(&mut db)?)?;
        db.execute("UPDATE meta SET value = ?1 WHERE key = 'generation'", params![next as i64])?;
        let boot: i64 =
            db.query_row("UPDATE meta SET value = value + 1 WHERE key = 'boots' RETURNING value", [], |row| {
                row.get(0)
            })?;
        marker.write(next)?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
            marker: Some(Arc::new(marker)),
            opened: SessionsOpened {
                store: crate::store::OpenReport { unclean },
                rolled_back,
                handles: HandleSpace { node: NodeId(0), boot: u64::try_from(boot).unwrap_or(0) },
            },
        })
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = super::prepare(Connection::open_in_memory()?, SCHEMA)?;
        Ok(Self { db: Arc::new(Mutex::new(db)), marker: None, opened: SessionsOpened::default() })
    }
}

impl SessionStore for SqliteSessions {
    fn apply(&self, writes: Vec<SessionWrite>) -> StoreFuture<'_, Applied> {
        let marker = self.marker.clone();
        // One server holds every session of the file: nothing is ever fenced.
        Box::pin(async move {
            blocking(&self.db, move |db| apply(db, &writes, marker.as_deref())).await.map(|()| Applied::default())
        })
    }

    fn load(&self) -> StoreFuture<'_, Vec<StoredSession>> {
        Box::pin(blocking(&self.db, load))
    }

    fn count(&self) -> StoreFuture<'_, usize> {
        Box::pin(blocking(&self.db, |db| {
            let count: i64 = db.query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get(0))?;
            Ok(usize::try_from(count).unwrap_or(0))
        }))
    }

    fn opened(&self) -> &SessionsOpened {
        &self.opened
    }
}

/// The generation the database holds.
fn generation(db: &mut Connection) -> Result<u64, StoreError> {
    let value: i64 = db.query_row("SELECT value FROM meta WHERE key = 'generation'", [], |row| row.get(0))?;
    Ok(u64::try_from(value).unwrap_or(0))
}

fn apply(db: &mut Connection, writes: &[SessionWrite], marker: Option<&Marker>) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let tx = db.transaction()?;
    tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'", [])?;
    let generation: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'generation'", [], |row| row.get(0))?;
    let deleted = writes.iter().any(|w| matches!(w, SessionWrite::Delete(_)));
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
        for write in writes {
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
        // The write-ahead log still holds the deleted rows' earlier pages: fold it into the
        // database (where they are zeros now) and empty it.
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    // After the commit: a crash in between leaves the database ahead of the marker, which
    // is no rollback.
    match marker {
        Some(marker) => marker.write(u64::try_from(generation).unwrap_or(0)),
        None => Ok(()),
    }
}

fn load(db: &mut Connection) -> Result<Vec<StoredSession>, StoreError> {
    let mut sessions = Vec::new();
    let mut broken = Vec::new();
    {
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
    }
    for handle in broken {
        db.execute("DELETE FROM sessions WHERE handle = ?1", params![handle])?;
    }
    Ok(sessions)
}
