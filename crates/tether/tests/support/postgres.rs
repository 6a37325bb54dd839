//! A PostgreSQL database of its own for a test, on the server named by
//! `TETHER_TEST_POSTGRES` (a URL whose role may create databases; `.ci/run` starts one).
//!
//! Without it a test that needs PostgreSQL says so and passes, on a developer's machine;
//! with `TETHER_REQUIRE_POSTGRES=1` (as in CI) it fails instead.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use tokio_postgres::NoTls;

/// A database created for one test, dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    /// The server's URL (any database on it).
    server: String,
    /// The database's name.
    pub name: String,
    /// A URL of the database.
    pub url: String,
}

impl TestDatabase {
    /// A new, empty database named after `test`; `None` when no server is configured (and
    /// none is required).
    pub async fn create(test: &str) -> Option<Self> {
        let Ok(server) = std::env::var("TETHER_TEST_POSTGRES") else {
            assert!(
                std::env::var("TETHER_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TETHER_REQUIRE_POSTGRES=1 but TETHER_TEST_POSTGRES is not set: no PostgreSQL to test against"
            );
            eprintln!("{test}: no PostgreSQL (set TETHER_TEST_POSTGRES=postgres://…): not run on this backend");
            return None;
        };
        let name = format!("tether_test_{test}_{}", std::process::id());
        let admin = connect(&server).await;
        drop_left_over(&admin).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let url = with_database(&server, &name);
        Some(Self { server, name, url })
    }

    /// A connection to the server's own database, for what a test does beside the store.
    pub async fn admin(&self) -> tokio_postgres::Client {
        connect(&self.server).await
    }

    /// A connection to the test's database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The URL of another database on the same server.
    pub fn url_of(&self, database: &str) -> String {
        with_database(&self.server, database)
    }

    /// Drops the database (ending any connection still open to it).
    pub async fn drop_database(self) {
        let admin = connect(&self.server).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await.unwrap();
    }
}

/// Drops the databases of test processes that ended without dropping theirs (a failed
/// test): each name ends in its process id.
async fn drop_left_over(admin: &tokio_postgres::Client) {
    let rows =
        admin.query("SELECT datname FROM pg_database WHERE datname LIKE 'tether\\_test\\_%'", &[]).await.unwrap();
    for row in rows {
        let name: String = row.get(0);
        let pid = name.rsplit('_').find_map(|part| part.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            // Another test process may be dropping it at the same moment.
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// `url` with its database replaced by `database` (`postgres://…/database[?…]`).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// `attempt()` until it succeeds, for what the server notices a moment late (a closed
/// connection's locks and sessions); fails after `within` with the last error.
pub async fn retry<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    within: std::time::Duration,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) => assert!(std::time::Instant::now() < deadline, "still failing after {within:?}: {err:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
