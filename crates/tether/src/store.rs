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
use tether_coap::registration::{Binding, Links, Registration};

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
}

/// Registrations on disk.
#[derive(Debug)]
pub struct RegistrationStore {
    db: Mutex<Connection>,
}

impl RegistrationStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        Self::init(db)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(db: Connection) -> Result<Self, StoreError> {
        let db = durable(db)?;
        db.execute_batch(
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
        )?;
        Ok(Self { db: Mutex::new(db) })
    }

    /// Writes (inserts or replaces) a registration. `now` is the instant its times are
    /// relative to; they are stored as wall-clock times.
    pub fn save(&self, registration: &Registration, now: Instant) -> Result<(), StoreError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        db.execute(
            "INSERT OR REPLACE INTO registrations
             (endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format, registered_unix_ms, updated_unix_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                registration.endpoint,
                registration.id,
                registration.identity,
                registration.peer.to_string(),
                registration.lifetime.as_secs() as i64,
                registration.version,
                registration.binding.as_str(),
                registration.links.as_str(),
                registration.content_format.map(i64::from),
                unix_ms(registration.registered_at, now),
                unix_ms(registration.last_update, now),
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
            "SELECT endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format, registered_unix_ms, updated_unix_ms FROM registrations",
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
            ))
        })?;
        let mut registrations = Vec::new();
        for row in rows {
            let (endpoint, id, identity, peer, lifetime, version, binding, links, ct, registered, updated) = row?;
            let (Ok(peer), Ok(links)) = (peer.parse::<SocketAddr>(), Links::parse(&links)) else { continue };
            registrations.push(Registration {
                id,
                endpoint,
                identity,
                peer,
                lifetime: Duration::from_secs(lifetime.max(0) as u64),
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
            peer: "127.0.0.1:5000".parse().unwrap(),
            lifetime: Duration::from_secs(300),
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
            (&got.id, &got.endpoint, got.peer, got.lifetime, got.content_format),
            (&registration.id, &registration.endpoint, registration.peer, registration.lifetime, Some(11543))
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
