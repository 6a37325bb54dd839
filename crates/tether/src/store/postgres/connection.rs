//! Connections: the pool, TLS, and errors in the server's words.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, Pool, Runtime};
use openssl::ssl::{SslConnector, SslMethod};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use crate::store::StoreError;

/// Connections a store keeps open at most.
const POOL_SIZE: usize = 8;
/// How long connecting may take (unless the URL says `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

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

/// A pool of connections to the database at `url`. `sslmode=require` encrypts and verifies
/// the server's certificate and name against the system's trust store (stricter than
/// libpq's `require`); otherwise connections are plain, as on a private network or loopback.
pub(super) fn pool(url: &str) -> Result<(Pool, String), StoreError> {
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
