//! Registrations in `registrations.db`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{params, Connection};
use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::SessionHandle;

use super::{blocking, Shared};
use crate::store::wall_clock::{instant, unix_ms};
use crate::store::{OpenReport, RegistrationStore, RegistrationWrite, StoreError, StoreFuture};

/// The schema, one step per version.
const SCHEMA: &[&str] = &[
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
];

/// Registrations in an SQLite file.
#[derive(Debug)]
pub struct SqliteRegistrations {
    db: Shared,
    opened: OpenReport,
}

impl SqliteRegistrations {
    /// Opens (creating if needed, mode 0600) the database at `path`, after SQLite's
    /// integrity check: a damaged file is refused, never half-served.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let remedy = "restore it from a backup, or move it away to start with no registrations";
        let (db, unclean) = super::open(path, remedy, SCHEMA)?;
        Ok(Self { db: Arc::new(Mutex::new(db)), opened: OpenReport { unclean } })
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = super::prepare(Connection::open_in_memory()?, SCHEMA)?;
        Ok(Self { db: Arc::new(Mutex::new(db)), opened: OpenReport::default() })
    }
}

impl RegistrationStore for SqliteRegistrations {
    fn apply(&self, writes: Vec<RegistrationWrite>, now: Instant) -> StoreFuture<'_, ()> {
        Box::pin(blocking(&self.db, move |db| apply(db, &writes, now)))
    }

    fn load(&self, now: Instant) -> StoreFuture<'_, Vec<Registration>> {
        Box::pin(blocking(&self.db, move |db| load(db, now)))
    }

    fn opened(&self) -> &OpenReport {
        &self.opened
    }
}

fn apply(db: &mut Connection, writes: &[RegistrationWrite], now: Instant) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let tx = db.transaction()?;
    {
        let mut save = tx.prepare_cached(
            "INSERT OR REPLACE INTO registrations
             (endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format,
              registered_unix_ms, updated_unix_ms, session)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut remove = tx.prepare_cached("DELETE FROM registrations WHERE endpoint = ?1 AND id = ?2")?;
        for write in writes {
            match write {
                RegistrationWrite::Save(r) => {
                    save.execute(params![
                        r.endpoint,
                        r.id,
                        r.identity,
                        r.peer.to_string(),
                        i64::try_from(r.lifetime.as_secs()).unwrap_or(i64::MAX),
                        r.version,
                        r.binding.as_str(),
                        r.links.as_str(),
                        r.content_format.map(i64::from),
                        unix_ms(r.registered_at, now),
                        unix_ms(r.last_update, now),
                        r.session.map(|s| s.0 as i64),
                    ])?;
                }
                RegistrationWrite::Remove { endpoint, id } => {
                    remove.execute(params![endpoint, id])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Every stored registration, its times mapped onto `now`. Rows that no longer parse are
/// skipped.
fn load(db: &mut Connection, now: Instant) -> Result<Vec<Registration>, StoreError> {
    let mut statement = db.prepare(
        "SELECT endpoint, id, identity, peer, lifetime_secs, version, binding, links, content_format,
                registered_unix_ms, updated_unix_ms, session
         FROM registrations",
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
        let (endpoint, id, identity, peer, lifetime, version, binding, links, ct, registered, updated, session) = row?;
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
