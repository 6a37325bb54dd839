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

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, Pool, Runtime};
use openssl::ssl::{SslConnector, SslMethod};
use postgres_openssl::MakeTlsConnector;
use tether_coap::registration::{Binding, Lifetime, Links, Registration};
use tether_proto::dtls::{HandleSpace, NodeId, SessionHandle, SessionSnapshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use super::generation::Marker;
use super::wall_clock::{instant, unix_ms};
use super::{
    OpenReport, RegistrationStore, RegistrationWrite, SessionStore, SessionWrite, SessionsOpened, StoreError,
    StoreFuture, StoredSession,
};

/// Connections a store keeps open at most.
const POOL_SIZE: usize = 8;
/// How long connecting may take (unless the URL says `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory lock class of node locks (the node id is the other key).
const NODE_LOCK: i32 = 0x7e7e_0001;
/// How long a write waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The schema, one step per version.
const SCHEMA: &[&str] = &[
    "CREATE TABLE registrations (
        endpoint TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        identity TEXT NOT NULL,
        session BIGINT,
        peer TEXT NOT NULL,
        lifetime_secs BIGINT NOT NULL,
        version TEXT NOT NULL,
        binding TEXT NOT NULL,
        links TEXT NOT NULL,
        content_format INTEGER,
        registered_unix_ms BIGINT NOT NULL,
        updated_unix_ms BIGINT NOT NULL
    );
    CREATE TABLE sessions (
        handle BIGINT PRIMARY KEY,
        node INTEGER NOT NULL,
        peer TEXT NOT NULL,
        snapshot BYTEA NOT NULL,
        write_limit BIGINT NOT NULL,
        window_next BIGINT NOT NULL,
        window_seen BIGINT NOT NULL
    );
    CREATE INDEX sessions_by_node ON sessions (node);
    CREATE TABLE nodes (
        node INTEGER PRIMARY KEY,
        generation BIGINT NOT NULL
    );",
    // How many times each node opened the store: the start count in its session handles.
    "ALTER TABLE nodes ADD COLUMN boots BIGINT NOT NULL DEFAULT 0;",
];

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        StoreError::Backend { backend: "postgresql", message: describe(&err) }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        let message = match err {
            PoolError::Backend(err) => describe(&err),
            PoolError::Timeout(TimeoutType::Create) => {
                format!("no connection within {} s: is the server up and reachable?", CONNECT_TIMEOUT.as_secs())
            }
            PoolError::Timeout(_) => format!("every connection stayed busy for {} s", POOL_WAIT.as_secs()),
            other => other.to_string(),
        };
        StoreError::Backend { backend: "postgresql", message }
    }
}

/// What went wrong, in the server's words where it said something ("password authentication
/// failed for user …", "permission denied for schema public"), else the client's.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => match db.hint() {
            Some(hint) => format!("{} ({hint})", db.message()),
            None => db.message().to_string(),
        },
        None => {
            let mut message = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message = format!("{message}: {text}");
                }
                source = cause.source();
            }
            message
        }
    }
}

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
        let (pool, location) = pool(url)?;
        migrate(&pool).await?;
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

/// A pool of connections to the database at `url`. `sslmode=require` encrypts and verifies
/// the server's certificate and name against the system's trust store (stricter than
/// libpq's `require`); otherwise connections are plain, as on a private network or loopback.
fn pool(url: &str) -> Result<(Pool, String), StoreError> {
    let refused = |message: String| StoreError::Backend { backend: "postgresql", message };
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|err| refused(format!("the store URL is not valid: {err}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("tether");
    let location = location(&config);
    let manager = if config.get_ssl_mode() == SslMode::Require {
        let connector = SslConnector::builder(SslMethod::tls_client())
            .map_err(|err| refused(format!("cannot set up TLS: {err}")))?
            .build();
        Manager::new(config, MakeTlsConnector::new(connector))
    } else {
        Manager::new(config, NoTls)
    };
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .map(|pool| (pool, location))
        .map_err(|err| refused(err.to_string()))
}

/// `postgresql://user@host:port/database` of `config`: what logs may say.
fn location(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => format!("{}:{port}", path.display()),
        })
        .collect();
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("postgresql://{user}{}/{}", hosts.join(","), config.get_dbname().unwrap_or_default())
}

/// Brings the schema up to date, one step a transaction, under an advisory lock (nodes
/// starting together migrate once).
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Any constant: tether's migrations take this lock and no other.
    tx.execute("SELECT pg_advisory_xact_lock(7406437150346331)", &[]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tether_schema (version INTEGER NOT NULL)").await?;
    let version = match tx.query_opt("SELECT version FROM tether_schema", &[]).await? {
        Some(row) => usize::try_from(row.get::<_, i32>(0)).unwrap_or(0),
        None => {
            tx.execute("INSERT INTO tether_schema (version) VALUES (0)", &[]).await?;
            0
        }
    };
    if version > SCHEMA.len() {
        return Err(StoreError::Backend {
            backend: "postgresql",
            message: format!(
                "the database's schema is version {version}, written by a newer tether (this one knows up to {}): \
                 upgrade this node",
                SCHEMA.len()
            ),
        });
    }
    for (i, step) in SCHEMA.iter().enumerate().skip(version) {
        tx.batch_execute(step).await?;
        let done = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE tether_schema SET version = $1", &[&done]).await?;
    }
    tx.commit().await?;
    Ok(())
}

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
                      registered_unix_ms, updated_unix_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (endpoint) DO UPDATE SET
                       id = EXCLUDED.id, identity = EXCLUDED.identity, session = EXCLUDED.session,
                       peer = EXCLUDED.peer, lifetime_secs = EXCLUDED.lifetime_secs, version = EXCLUDED.version,
                       binding = EXCLUDED.binding, links = EXCLUDED.links, content_format = EXCLUDED.content_format,
                       registered_unix_ms = EXCLUDED.registered_unix_ms, updated_unix_ms = EXCLUDED.updated_unix_ms",
                )
                .await?;
            let remove = tx.prepare_cached("DELETE FROM registrations WHERE endpoint = $1 AND id = $2").await?;
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
                            ],
                        )
                        .await?;
                    }
                    RegistrationWrite::Remove { endpoint, id } => {
                        tx.execute(&remove, &[endpoint, id]).await?;
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
            let rows = client
                .query(
                    "SELECT endpoint, id, identity, session, peer, lifetime_secs, version, binding, links,
                            content_format, registered_unix_ms, updated_unix_ms
                     FROM registrations",
                    &[],
                )
                .await?;
            let mut registrations = Vec::with_capacity(rows.len());
            for row in rows {
                let (Ok(peer), Ok(links)) = (row.get::<_, String>(4).parse(), Links::parse(row.get::<_, &str>(8)))
                else {
                    continue;
                };
                registrations.push(Registration {
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
                });
            }
            Ok(registrations)
        })
    }

    fn opened(&self) -> &OpenReport {
        &self.opened.store
    }
}

impl SessionStore for PostgresStore {
    fn apply(&self, writes: Vec<SessionWrite>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(());
            }
            self.hold_node_lock().await?;
            let node = i32::from(self.node.0);
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
                    "INSERT INTO sessions (handle, node, peer, snapshot, write_limit, window_next, window_seen)
                     VALUES ($1, $2, $3, $4, $5, 0, 0)
                     ON CONFLICT (handle) DO UPDATE SET peer = EXCLUDED.peer, snapshot = EXCLUDED.snapshot,
                       write_limit = EXCLUDED.write_limit, window_next = 0, window_seen = 0
                     WHERE sessions.node = EXCLUDED.node",
                )
                .await?;
            // A checkpoint changes a session only while this node owns it, and never moves
            // its reservation down.
            let checkpoint = tx
                .prepare_cached(
                    "UPDATE sessions SET peer = $3, write_limit = GREATEST(write_limit, $4), window_next = $5,
                       window_seen = $6
                     WHERE handle = $1 AND node = $2",
                )
                .await?;
            let delete = tx.prepare_cached("DELETE FROM sessions WHERE handle = $1 AND node = $2").await?;
            for write in &writes {
                match write {
                    SessionWrite::Insert { handle, peer, snapshot } => {
                        let limit = snapshot.write_limit() as i64;
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                            [&(handle.0 as i64), &node, &peer.to_string(), &snapshot.encode(), &limit];
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
                        tx.execute(
                            &checkpoint,
                            &[
                                &(c.handle.0 as i64),
                                &node,
                                &c.peer.to_string(),
                                &(c.write_limit as i64),
                                &(next as i64),
                                &(seen as i64),
                            ],
                        )
                        .await?;
                    }
                    SessionWrite::Delete(handle) => {
                        tx.execute(&delete, &[&(handle.0 as i64), &node]).await?;
                    }
                }
            }
            tx.commit().await?;
            // After the commit: a crash in between leaves the database ahead of the marker,
            // which is no rollback.
            match &self.marker {
                Some(marker) => marker.write(u64::try_from(generation).unwrap_or(0)),
                None => Ok(()),
            }
        })
    }

    fn load(&self) -> StoreFuture<'_, Vec<StoredSession>> {
        Box::pin(async move {
            let node = i32::from(self.node.0);
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "SELECT handle, peer, snapshot, write_limit, window_next, window_seen
                     FROM sessions WHERE node = $1 ORDER BY handle",
                    &[&node],
                )
                .await?;
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
