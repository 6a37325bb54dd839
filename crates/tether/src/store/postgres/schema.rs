//! The schema, and how a database is brought up to date.

use deadpool_postgres::Pool;

use crate::store::StoreError;

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
    // A cluster: where each node is reached and until when it holds its lease (the database's
    // clock); which start of its node holds a session (the fencing epoch) and the session's
    // Connection ID; which node serves a registration.
    "ALTER TABLE nodes ADD COLUMN channel TEXT, ADD COLUMN http TEXT, ADD COLUMN lease_until TIMESTAMPTZ;
     ALTER TABLE sessions ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0, ADD COLUMN cid BYTEA;
     CREATE INDEX sessions_by_cid ON sessions (cid) WHERE cid IS NOT NULL;
     ALTER TABLE registrations ADD COLUMN node INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX registrations_by_node ON registrations (node);",
    // A device without a Connection ID that moved to another node claims its registration
    // by id.
    "CREATE INDEX registrations_by_id ON registrations (id);",
];

/// Brings the schema up to date, one step a transaction, under an advisory lock (nodes
/// starting together migrate once).
pub(super) async fn migrate(pool: &Pool) -> Result<(), StoreError> {
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
