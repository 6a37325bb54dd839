//! The registration store: LwM2M registrations in an embedded SQLite database, so a restart
//! (or a SIGKILL) loses none.
//!
//! Writes are durable before they return (`journal_mode=WAL`, `synchronous=FULL`), and the
//! LwM2M server writes a registration before it acknowledges it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::SessionHandle;

/// A store (registrations or sessions) could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file could not be created or given its permissions.
    #[error("cannot create {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// SQLite's integrity check found the file damaged: nothing is served from it.
    #[error("{file} is damaged ({detail}): {remedy}")]
    Damaged {
        /// The file.
        file: String,
        /// What `PRAGMA quick_check` said, first lines.
        detail: String,
        /// What the operator can do.
        remedy: &'static str,
    },
}

/// What opening a store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The file was not closed cleanly: its write-ahead log was left behind by a server that
    /// stopped without shutting down (a crash, `kill -9`, power loss). SQLite recovered
    /// every committed write from it.
    pub unclean: bool,
}

/// Registrations on disk.
#[derive(Debug)]
pub struct RegistrationStore {
    db: Mutex<Connection>,
    opened: OpenReport,
}

impl RegistrationStore {
    /// Opens (creating if needed, mode 0600) the database at `path`, after SQLite's
    /// integrity check: a damaged file is refused, never half-served.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let opened = OpenReport { unclean: left_unclean(path) };
        create_private(path).map_err(|e| StoreError::Io(path.display().to_string(), e))?;
        let db = Connection::open(path)?;
        check_integrity(&db, path, "restore it from a backup, or move it away to start with no registrations")?;
        Ok(Self { opened, ..Self::init(db)? })
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// What opening found.
    pub fn opened(&self) -> &OpenReport {
        &self.opened
    }

    fn init(db: Connection) -> Result<Self, StoreError> {
        let db = durable(db)?;
        migrate(
            &db,
            &[
                "CREATE TABLE IF NOT EXISTS registrations (
                    endpoint TEXT PRIMARY KEY,
                    id TEXT NOT NULL UNIQUE,
                    identity TEXT NOT NULL,
                    peer TEXT NOT NULL,
                    lifetime_secs INTEGER NOT NULL,
                    version TEXT NOT NULL,
                    binding TEXT NOT NULL,
                    links TEXT NOT NULL,
                    content_format INTEGER,
                    registered_unix_ms INTEGER NOT NULL,
                    updated_unix_ms INTEGER NOT NULL
                );",
                // The DTLS session a registration is bound to (requests go over it alone).
                "ALTER TABLE registrations ADD COLUMN session INTEGER;",
            ],
        )?;
        Ok(Self { db: Mutex::new(db), opened: OpenReport::default() })
    }

    /// Writes (inserts or replaces) a registration. `now` is the instant its times are
    /// relative to; they are stored as wall-clock times.
    pub fn save(&self, registration: &Registration, now: Instant) -> Result<(), StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        db.execute(
            "INSERT OR REPLACE INTO registrations
             (endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format, registered_unix_ms, updated_unix_ms, session)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                registration.endpoint,
                registration.id,
                registration.identity,
                registration.peer.to_string(),
                i64::try_from(registration.lifetime.as_secs()).unwrap_or(i64::MAX),
                registration.version,
                registration.binding.as_str(),
                registration.links.as_str(),
                registration.content_format.map(i64::from),
                unix_ms(registration.registered_at, now),
                unix_ms(registration.last_update, now),
                registration.session.map(|s| s.0 as i64),
            ],
        )?;
        Ok(())
    }

    /// Deletes the registration of `endpoint` if its ID is `id` (a newer one is kept).
    pub fn remove(&self, endpoint: &str, id: &str) -> Result<(), StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        db.execute("DELETE FROM registrations WHERE endpoint = ?1 AND id = ?2", params![endpoint, id])?;
        Ok(())
    }

    /// Every stored registration, with times mapped onto `now`. Rows that no longer parse
    /// are skipped.
    pub fn load(&self, now: Instant) -> Result<Vec<Registration>, StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let mut statement = db.prepare(
            "SELECT endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format, registered_unix_ms, updated_unix_ms, session FROM registrations",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, Option<i64>>(8)?,
                row.get::<_, i64>(9)?,
                row.get::<_, i64>(10)?,
                row.get::<_, Option<i64>>(11)?,
            ))
        })?;
        let mut registrations = Vec::new();
        for row in rows {
            let (endpoint, id, identity, peer, lifetime, version, binding, links, ct, registered, updated, session) =
                row?;
            let (Ok(peer), Ok(links)) = (peer.parse::<SocketAddr>(), Links::parse(&links)) else { continue };
            registrations.push(Registration {
                id,
                endpoint,
                identity,
                session: session.map(|s| SessionHandle(s as u64)),
                peer,
                lifetime: Lifetime::clamped(u64::try_from(lifetime).unwrap_or(0)),
                version,
                binding: if binding == "U" { Binding::Udp } else { Binding::UdpQueue },
                links,
                content_format: ct.and_then(|c| u16::try_from(c).ok()),
                registered_at: instant(registered, now),
                last_update: instant(updated, now),
            });
        }
        Ok(registrations)
    }
}

/// Whether the database at `path` was left without a clean close: SQLite removes its
/// write-ahead log when the last connection closes normally.
pub(crate) fn left_unclean(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Path::new(&wal).exists()
}

/// `PRAGMA quick_check`: damaged pages or indexes are refused at start, with `remedy`.
pub(crate) fn check_integrity(db: &Connection, path: &Path, remedy: &'static str) -> Result<(), StoreError> {
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
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Brings the schema of `db` up to date: `steps[i]` takes it from version `i` to `i + 1`
/// (`PRAGMA user_version`), each in its own transaction with its version.
pub(crate) fn migrate(db: &Connection, steps: &[&str]) -> Result<(), StoreError> {
    let version: usize = db.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?.try_into().unwrap_or(0);
    for (i, step) in steps.iter().enumerate().skip(version) {
        db.execute_batch(&format!("BEGIN; {step} PRAGMA user_version = {}; COMMIT;", i + 1))?;
    }
    Ok(())
}

/// A database whose every committed transaction is on disk when the commit returns
/// (`journal_mode=WAL`, `synchronous=FULL`): what the stores acknowledge survives a crash.
pub(crate) fn durable(db: Connection) -> Result<Connection, StoreError> {
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    Ok(db)
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The wall-clock time of `at`, given that `now` is the present.
fn unix_ms(at: Instant, now: Instant) -> i64 {
    now_unix_ms() - now.saturating_duration_since(at).as_millis() as i64
}

/// The instant of wall-clock time `unix_ms`, given that `now` is the present.
fn instant(unix_ms: i64, now: Instant) -> Instant {
    let ago = Duration::from_millis((now_unix_ms() - unix_ms).max(0) as u64);
    now.checked_sub(ago).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_round_trip_and_removal_keeps_newer_ones() {
        let now = Instant::now();
        let store = RegistrationStore::in_memory().unwrap();
        let registration = Registration {
            id: "abc".into(),
            endpoint: "urn:dev:1".into(),
            identity: "identity".into(),
            session: Some(SessionHandle(7)),
            peer: "127.0.0.1:5000".parse().unwrap(),
            lifetime: Lifetime::from_secs(300).unwrap(),
            version: "1.1".into(),
            binding: Binding::Udp,
            links: Links::parse("</>;ct=11543,</3/0>").unwrap(),
            content_format: Some(11543),
            registered_at: now - Duration::from_secs(60),
            last_update: now - Duration::from_secs(10),
        };
        store.save(&registration, now).unwrap();
        let loaded = store.load(now).unwrap();
        assert_eq!(loaded.len(), 1);
        let got = &loaded[0];
        assert_eq!(
            (&got.id, &got.endpoint, got.session, got.peer, got.lifetime, got.content_format),
            (
                &registration.id,
                &registration.endpoint,
                Some(SessionHandle(7)),
                registration.peer,
                registration.lifetime,
                Some(11543)
            )
        );
        assert_eq!(got.links, registration.links);
        let drift = got.last_update.max(registration.last_update) - got.last_update.min(registration.last_update);
        assert!(drift < Duration::from_millis(50), "times survive within the clock's resolution: {drift:?}");
        store.remove("urn:dev:1", "older-id").unwrap();
        assert_eq!(store.load(now).unwrap().len(), 1, "a stale removal keeps the newer registration");
        store.remove("urn:dev:1", "abc").unwrap();
        assert!(store.load(now).unwrap().is_empty());
    }
}
