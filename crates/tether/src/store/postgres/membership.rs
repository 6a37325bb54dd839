//! Membership and leases in the `nodes` table, adoption by compare-and-set on `sessions`
//! and `registrations`. Every time is the database's (`now()`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_coap::registration::Registration;
use tether_proto::dtls::NodeId;

use super::registrations::{registration_of, COLUMNS};
use super::sessions::decode_rows;
use super::PostgresStore;
use crate::store::{Adopted, Membership, NodeAddresses, NodeRecord, Share, StoreFuture};

/// A lease length as an SQL interval parameter (milliseconds).
fn millis(lease: Duration) -> f64 {
    lease.as_secs_f64() * 1000.0
}

impl Membership for PostgresStore {
    fn node(&self) -> NodeId {
        self.node
    }

    fn epoch(&self) -> u64 {
        self.opened.handles.boot
    }

    fn join(&self, addresses: NodeAddresses, lease: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            client
                .execute(
                    "UPDATE nodes SET channel = $3, http = $4,
                       lease_until = now() + $5::float8 * interval '1 millisecond'
                     WHERE node = $1 AND boots = $2",
                    &[
                        &i32::from(self.node.0),
                        &self.epoch_param(),
                        &addresses.channel.to_string(),
                        &addresses.http.to_string(),
                        &millis(lease),
                    ],
                )
                .await?;
            Ok(())
        })
    }

    fn renew(&self, lease: Duration) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            let renewed = client
                .execute(
                    "UPDATE nodes SET lease_until = now() + $3::float8 * interval '1 millisecond'
                     WHERE node = $1 AND boots = $2 AND lease_until > now()",
                    &[&i32::from(self.node.0), &self.epoch_param(), &millis(lease)],
                )
                .await?;
            Ok(renewed == 1)
        })
    }

    fn leave(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            client
                .execute(
                    "UPDATE nodes SET lease_until = now() - interval '1 millisecond' WHERE node = $1 AND boots = $2",
                    &[&i32::from(self.node.0), &self.epoch_param()],
                )
                .await?;
            Ok(())
        })
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeRecord>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "SELECT n.node, n.channel, n.http, COALESCE(n.lease_until > now(), false), n.boots,
                       (SELECT COUNT(*) FROM sessions s WHERE s.node = n.node),
                       (SELECT COUNT(*) FROM registrations r WHERE r.node = n.node)
                     FROM nodes n ORDER BY n.node",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let channel = row.get::<_, Option<String>>(1).and_then(|a| a.parse::<SocketAddr>().ok());
                    let http = row.get::<_, Option<String>>(2).and_then(|a| a.parse::<SocketAddr>().ok());
                    NodeRecord {
                        node: NodeId(u8::try_from(row.get::<_, i32>(0)).unwrap_or(u8::MAX)),
                        addresses: channel.zip(http).map(|(channel, http)| NodeAddresses { channel, http }),
                        alive: row.get(3),
                        epoch: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
                        sessions: u64::try_from(row.get::<_, i64>(5)).unwrap_or(0),
                        registrations: u64::try_from(row.get::<_, i64>(6)).unwrap_or(0),
                    }
                })
                .collect())
        })
    }

    fn adopt(&self, dead: NodeId, share: Share, now: Instant) -> StoreFuture<'_, Adopted> {
        Box::pin(async move {
            let me = i32::from(self.node.0);
            let dead = i32::from(dead.0);
            let (rank, of) = (i64::from(share.rank), i64::from(share.of.max(1)));
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // Only while the dead node's lease has run out, by the database's clock; a row
            // is taken once: a second adopter finds it held by the first.
            let rows = tx
                .query(
                    "UPDATE sessions SET node = $1, epoch = $2
                     WHERE node = $3 AND mod(abs(handle), $5) = $4
                       AND EXISTS (SELECT 1 FROM nodes WHERE node = $3 AND COALESCE(lease_until <= now(), true))
                     RETURNING handle, peer, snapshot, write_limit, window_next, window_seen",
                    &[&me, &self.epoch_param(), &dead, &rank, &of],
                )
                .await?;
            let (sessions, broken) = decode_rows(&rows);
            for handle in &broken {
                tx.execute("DELETE FROM sessions WHERE handle = $1", &[handle]).await?;
            }
            let handles: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
            let orphans = rank == 0;
            let query = format!(
                "UPDATE registrations r SET node = $1
                 WHERE r.node = $2
                   AND EXISTS (SELECT 1 FROM nodes WHERE node = $2 AND COALESCE(lease_until <= now(), true))
                   AND (r.session = ANY($3)
                        OR ($4 AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.handle = r.session)))
                 RETURNING {COLUMNS}"
            );
            let rows = tx.query(&query, &[&me, &dead, &handles, &orphans]).await?;
            tx.commit().await?;
            let registrations = rows.iter().filter_map(|row| registration_of(row, now)).collect();
            Ok(Adopted { sessions, registrations })
        })
    }

    fn holder_of(&self, cid: &[u8]) -> StoreFuture<'_, Option<NodeId>> {
        let cid = cid.to_vec();
        Box::pin(async move {
            let client = self.pool.get().await?;
            let row = client.query_opt("SELECT node FROM sessions WHERE cid = $1", &[&cid]).await?;
            Ok(row.and_then(|row| u8::try_from(row.get::<_, i32>(0)).ok()).map(NodeId))
        })
    }

    fn registration_node(&self, endpoint: &str) -> StoreFuture<'_, Option<NodeId>> {
        let endpoint = endpoint.to_string();
        Box::pin(async move {
            let client = self.pool.get().await?;
            let row = client.query_opt("SELECT node FROM registrations WHERE endpoint = $1", &[&endpoint]).await?;
            Ok(row.and_then(|row| u8::try_from(row.get::<_, i32>(0)).ok()).map(NodeId))
        })
    }

    fn claim_registration(
        &self,
        id: &str,
        identity: &str,
        now: Instant,
    ) -> StoreFuture<'_, Option<(Registration, NodeId)>> {
        let (id, identity) = (id.to_string(), identity.to_string());
        Box::pin(async move {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // The row locked while it moves: two nodes claiming at once serialize, and the
            // loser sees the winner as the previous node.
            let query = "SELECT node FROM registrations WHERE id = $1 AND identity = $2 FOR UPDATE";
            let Some(previous) = tx.query_opt(query, &[&id, &identity]).await? else { return Ok(None) };
            let previous = NodeId(u8::try_from(previous.get::<_, i32>(0)).unwrap_or(0));
            let query =
                format!("UPDATE registrations SET node = $3 WHERE id = $1 AND identity = $2 RETURNING {COLUMNS}");
            let row = tx.query_one(&query, &[&id, &identity, &i32::from(self.node.0)]).await?;
            tx.commit().await?;
            Ok(registration_of(&row, now).map(|registration| (registration, previous)))
        })
    }
}
