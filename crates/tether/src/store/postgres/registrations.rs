//! Registrations: one table every node shares.

use std::time::Instant;

use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::SessionHandle;

use super::PostgresStore;
use crate::store::wall_clock::{instant, unix_ms};
use crate::store::{OpenReport, RegistrationStore, RegistrationWrite, StoreFuture};

impl RegistrationStore for PostgresStore {
    fn apply(&self, writes: Vec<RegistrationWrite>, now: Instant) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(());
            }
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let save = tx
                .prepare_cached(
                    "INSERT INTO registrations
                     (endpoint, id, identity, session, peer, lifetime_secs, version, binding, links, content_format,
                      registered_unix_ms, updated_unix_ms, node)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (endpoint) DO UPDATE SET node = EXCLUDED.node,
                       id = EXCLUDED.id, identity = EXCLUDED.identity, session = EXCLUDED.session,
                       peer = EXCLUDED.peer, lifetime_secs = EXCLUDED.lifetime_secs, version = EXCLUDED.version,
                       binding = EXCLUDED.binding, links = EXCLUDED.links, content_format = EXCLUDED.content_format,
                       registered_unix_ms = EXCLUDED.registered_unix_ms, updated_unix_ms = EXCLUDED.updated_unix_ms",
                )
                .await?;
            // A registration another node serves now (its device moved there) stays.
            let remove =
                tx.prepare_cached("DELETE FROM registrations WHERE endpoint = $1 AND id = $2 AND node = $3").await?;
            let node = i32::from(self.node.0);
            for write in &writes {
                match write {
                    RegistrationWrite::Save(r) => {
                        // Another registration may hold the ID (a stale row of another endpoint).
                        tx.execute("DELETE FROM registrations WHERE id = $1 AND endpoint <> $2", &[&r.id, &r.endpoint])
                            .await?;
                        let session = r.session.map(|s| s.0 as i64);
                        let lifetime = i64::try_from(r.lifetime.as_secs()).unwrap_or(i64::MAX);
                        let content_format = r.content_format.map(i32::from);
                        tx.execute(
                            &save,
                            &[
                                &r.endpoint,
                                &r.id,
                                &r.identity,
                                &session,
                                &r.peer.to_string(),
                                &lifetime,
                                &r.version,
                                &r.binding.as_str(),
                                &r.links.as_str(),
                                &content_format,
                                &unix_ms(r.registered_at, now),
                                &unix_ms(r.last_update, now),
                                &node,
                            ],
                        )
                        .await?;
                    }
                    RegistrationWrite::Remove { endpoint, id } => {
                        tx.execute(&remove, &[endpoint, id, &node]).await?;
                    }
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn load(&self, now: Instant) -> StoreFuture<'_, Vec<Registration>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            let query = format!("SELECT {COLUMNS} FROM registrations WHERE node = $1");
            let rows = client.query(&query, &[&i32::from(self.node.0)]).await?;
            Ok(rows.iter().filter_map(|row| registration_of(row, now)).collect())
        })
    }

    fn opened(&self) -> &OpenReport {
        &self.opened.store
    }
}

/// The columns [`registration_of`] reads, in its order.
pub(super) const COLUMNS: &str = "endpoint, id, identity, session, peer, lifetime_secs, version, binding, links, \
                                  content_format, registered_unix_ms, updated_unix_ms";

/// A row of [`COLUMNS`] as a registration, its times mapped onto `now`; `None` if it no
/// longer parses.
pub(super) fn registration_of(row: &tokio_postgres::Row, now: Instant) -> Option<Registration> {
    let peer = row.get::<_, String>(4).parse().ok()?;
    let links = Links::parse(row.get::<_, &str>(8)).ok()?;
    Some(Registration {
        endpoint: row.get(0),
        id: row.get(1),
        identity: row.get(2),
        session: row.get::<_, Option<i64>>(3).map(|s| SessionHandle(s as u64)),
        peer,
        lifetime: Lifetime::clamped(u64::try_from(row.get::<_, i64>(5)).unwrap_or(0)),
        version: row.get(6),
        binding: if row.get::<_, &str>(7) == "U" { Binding::Udp } else { Binding::UdpQueue },
        links,
        content_format: row.get::<_, Option<i32>>(9).and_then(|c| u16::try_from(c).ok()),
        registered_at: instant(row.get(10), now),
        last_update: instant(row.get(11), now),
    })
}
