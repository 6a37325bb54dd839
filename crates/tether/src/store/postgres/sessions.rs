//! Sessions: each row belongs to the node that holds the session, and to one start of it
//! (its epoch): a row changes only by its holder's current start.

use tether_proto::dtls::{SessionHandle, SessionSnapshot};

use super::PostgresStore;
use crate::store::{Applied, SessionStore, SessionWrite, SessionsOpened, StoreError, StoreFuture, StoredSession};

impl SessionStore for PostgresStore {
    fn apply(&self, writes: Vec<SessionWrite>) -> StoreFuture<'_, Applied> {
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(Applied::default());
            }
            self.hold_node_lock().await?;
            let node = i32::from(self.node.0);
            let epoch = self.epoch_param();
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let generation: i64 = tx
                .query_one(
                    "UPDATE nodes SET generation = generation + 1 WHERE node = $1 RETURNING generation",
                    &[&node],
                )
                .await?
                .get(0);
            let insert = tx
                .prepare_cached(
                    "INSERT INTO sessions
                       (handle, node, epoch, peer, snapshot, write_limit, window_next, window_seen, cid)
                     VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7)
                     ON CONFLICT (handle) DO UPDATE SET peer = EXCLUDED.peer, snapshot = EXCLUDED.snapshot,
                       write_limit = EXCLUDED.write_limit, window_next = 0, window_seen = 0, cid = EXCLUDED.cid
                     WHERE sessions.node = EXCLUDED.node AND sessions.epoch = EXCLUDED.epoch",
                )
                .await?;
            // A checkpoint changes a session only while this start of this node holds it, and
            // never moves its reservation down.
            let checkpoint = tx
                .prepare_cached(
                    "UPDATE sessions SET peer = $4, write_limit = GREATEST(write_limit, $5), window_next = $6,
                       window_seen = $7
                     WHERE handle = $1 AND node = $2 AND epoch = $3",
                )
                .await?;
            let delete =
                tx.prepare_cached("DELETE FROM sessions WHERE handle = $1 AND node = $2 AND epoch = $3").await?;
            let mut applied = Applied::default();
            for write in &writes {
                match write {
                    SessionWrite::Insert { handle, peer, snapshot } => {
                        let limit = snapshot.write_limit() as i64;
                        let cid = snapshot.connection_id();
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                            [&(handle.0 as i64), &node, &epoch, &peer.to_string(), &snapshot.encode(), &limit, &cid];
                        if tx.execute(&insert, &params).await? == 0 {
                            // Compare-and-set: another node's session is never overwritten.
                            return Err(StoreError::Backend {
                                backend: "postgresql",
                                message: format!("session {handle} belongs to another node"),
                            });
                        }
                    }
                    SessionWrite::Checkpoint(c) => {
                        let (next, seen) = c.replay_window;
                        let written = tx
                            .execute(
                                &checkpoint,
                                &[
                                    &(c.handle.0 as i64),
                                    &node,
                                    &epoch,
                                    &c.peer.to_string(),
                                    &(c.write_limit as i64),
                                    &(next as i64),
                                    &(seen as i64),
                                ],
                            )
                            .await?;
                        if written == 0 {
                            applied.fenced.push(c.handle);
                        }
                    }
                    SessionWrite::Delete(handle) => {
                        tx.execute(&delete, &[&(handle.0 as i64), &node, &epoch]).await?;
                    }
                }
            }
            tx.commit().await?;
            // After the commit: a crash in between leaves the database ahead of the marker,
            // which is no rollback.
            if let Some(marker) = &self.marker {
                marker.write(u64::try_from(generation).unwrap_or(0))?;
            }
            Ok(applied)
        })
    }

    fn load(&self) -> StoreFuture<'_, Vec<StoredSession>> {
        Box::pin(async move {
            let node = i32::from(self.node.0);
            let client = self.pool.get().await?;
            // The node's sessions pass to this start of it: an earlier one still running
            // (paused, cut off) is fenced from them.
            let rows = client
                .query(
                    "UPDATE sessions SET epoch = $2 WHERE node = $1
                     RETURNING handle, peer, snapshot, write_limit, window_next, window_seen",
                    &[&node, &self.epoch_param()],
                )
                .await?;
            let (sessions, broken) = decode_rows(&rows);
            for handle in broken {
                client.execute("DELETE FROM sessions WHERE handle = $1 AND node = $2", &[&handle, &node]).await?;
            }
            Ok(sessions)
        })
    }

    fn count(&self) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let node = i32::from(self.node.0);
            let client = self.pool.get().await?;
            let count: i64 = client.query_one("SELECT COUNT(*) FROM sessions WHERE node = $1", &[&node]).await?.get(0);
            Ok(usize::try_from(count).unwrap_or(0))
        })
    }

    fn opened(&self) -> &SessionsOpened {
        &self.opened
    }
}

/// Rows of `handle, peer, snapshot, write_limit, window_next, window_seen` as sessions with
/// their last checkpoint applied; and the handles of rows that no longer decode.
pub(super) fn decode_rows(rows: &[tokio_postgres::Row]) -> (Vec<StoredSession>, Vec<i64>) {
    let mut sessions = Vec::with_capacity(rows.len());
    let mut broken = Vec::new();
    for row in rows {
        let handle: i64 = row.get(0);
        let peer = row.get::<_, String>(1).parse();
        let snapshot = SessionSnapshot::decode(row.get::<_, &[u8]>(2));
        match (peer, snapshot) {
            (Ok(peer), Ok(mut snapshot)) => {
                let window = (row.get::<_, i64>(4) as u64, row.get::<_, i64>(5) as u64);
                snapshot.advance(row.get::<_, i64>(3) as u64, window);
                sessions.push(StoredSession { handle: SessionHandle(handle as u64), peer, snapshot });
            }
            _ => broken.push(handle),
        }
    }
    sessions.sort_by_key(|s| s.handle);
    (sessions, broken)
}
