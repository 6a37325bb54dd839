//! The shared backend: PostgreSQL, the system of record a cluster's nodes have in common
//! (and a single node's, where operators would rather back up one database than files).
//!
//! `tokio-postgres` through a `deadpool-postgres` pool: the mature, plain asynchronous
//! client of the Rust ecosystem (no macros checked against a live database at build time,
//! as sqlx's are), a handful of connections shared by the LwM2M and DTLS tasks. Every batch
//! is one transaction. The schema is versioned in `tether_schema` and brought up to date at
//! connect, under an advisory lock, so nodes starting together migrate once.
//!
//! Sessions belong to a node (`sessions.node`); a node loads and checkpoints its own only,
//! and a checkpoint changes a row only while that node owns it. Each node's store generation
//! is kept in the database and in a marker file in the node's data directory, as the SQLite
//! backend keeps it: a database put back from a backup (a point-in-time restore) is older than
//! the marker, and its sessions are not restored.

mod connection;
mod membership;
mod registrations;
mod schema;
mod sessions;

use std::path::Path;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tether_proto::dtls::{HandleSpace, NodeId};

use super::generation::Marker;
use super::{OpenReport, SessionsOpened, StoreError};

/// The advisory lock class of node locks (the node id is the other key).
const NODE_LOCK: i32 = 0x7e7e_0001;

/// Registrations and one node's sessions in a PostgreSQL database. See the module docs.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    node: NodeId,
    /// Where the database is, without its password (for logs).
    location: Arc<str>,
    /// The connection that holds the node's advisory lock while the store is open.
    node_lock: Arc<tokio::sync::Mutex<Option<deadpool_postgres::ClientWrapper>>>,
    /// The generation marker in the node's data directory (`None`: not kept).
    marker: Option<Arc<Marker>>,
    opened: Arc<SessionsOpened>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("node", &self.node).finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`, or
    /// key=value pairs) as node `node`, brings its schema up to date, and compares the node's
    /// generation with the marker in `data_dir` (none with `None`).
    pub async fn connect(url: &str, node: NodeId, data_dir: Option<&Path>) -> Result<Self, StoreError> {
        let (pool, location) = connection::pool(url)?;
        schema::migrate(&pool).await?;
        let marker = data_dir.map(|dir| Arc::new(Marker::at(dir.join(format!("postgres-node-{}.generation", node.0)))));
        let mut store =
            Self { pool, node, location: location.into(), node_lock: Arc::default(), marker, opened: Arc::default() };
        store.hold_node_lock().await?;
        store.opened = Arc::new(store.open_generation().await?);
        Ok(store)
    }

    /// Holds the node's advisory lock (taken again on a new connection if the one that held
    /// it was lost, as when PostgreSQL restarts): two servers writing one node's sessions
    /// would restore, and send on, the same sessions.
    async fn hold_node_lock(&self) -> Result<(), StoreError> {
        let mut held = self.node_lock.lock().await;
        if held.as_ref().is_some_and(|client| !client.is_closed()) {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&NODE_LOCK, &i32::from(self.node.0)])
            .await?
            .get(0);
        if !taken {
            return Err(StoreError::Backend {
                backend: "postgresql",
                message: format!(
                    "node {} is in use by another tether serve on this database (each server needs its own node)",
                    self.node.0
                ),
            });
        }
        // Out of the pool: the lock lasts as long as this connection.
        *held = Some(deadpool_postgres::Object::take(client));
        Ok(())
    }

    /// Where the database is: `postgresql://user@host:port/database`, never the password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The node whose sessions this store loads and writes.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// This start's fencing epoch, as a query parameter.
    fn epoch_param(&self) -> i64 {
        i64::try_from(self.opened.handles.boot).unwrap_or(i64::MAX)
    }

    /// Compares the node's generation in the database with its marker and moves both past
    /// anything written before.
    async fn open_generation(&self) -> Result<SessionsOpened, StoreError> {
        let client = self.pool.get().await?;
        let node = i32::from(self.node.0);
        client
            .execute("INSERT INTO nodes (node, generation) VALUES ($1, 0) ON CONFLICT (node) DO NOTHING", &[&node])
            .await?;
        let row = client.query_one("SELECT generation FROM nodes WHERE node = $1", &[&node]).await?;
        let database = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let (rolled_back, next) = match &self.marker {
            Some(marker) => marker.compare(database)?,
            None => (None, database + 1),
        };
        let stored = i64::try_from(next).unwrap_or(i64::MAX);
        let boot: i64 = client
            .query_one(
                "UPDATE nodes SET generation = $2, boots = boots + 1 WHERE node = $1 RETURNING boots",
                &[&node, &stored],
            )
            .await?
            .get(0);
        if let Some(marker) = &self.marker {
            marker.write(next)?;
        }
        let handles = HandleSpace { node: self.node, boot: u64::try_from(boot).unwrap_or(0) };
        Ok(SessionsOpened { store: OpenReport::default(), rolled_back, handles })
    }
}
