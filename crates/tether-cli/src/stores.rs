//! Where `tether serve` keeps what must outlive it: SQLite files in the data directory (the
//! default, nothing to install) or a PostgreSQL database (`--store postgres://…`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tether::store::{
    OpenReport, PostgresStore, RegistrationStore, SessionStore, SessionsOpened, SqliteRegistrations, SqliteSessions,
};
use tether_proto::dtls::NodeId;

/// Which backend holds registrations and sessions.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSetting {
    /// `registrations.db` and `sessions.db` in the data directory.
    Sqlite,
    /// A PostgreSQL database, by URL (it may hold a password: never shown).
    Postgres(String),
}

impl std::fmt::Debug for StoreSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres(_) => f.write_str("Postgres(…)"),
        }
    }
}

impl StoreSetting {
    /// `sqlite`, or a `postgres://` / `postgresql://` URL. `source` names where the text
    /// came from, for the error (which never repeats the text: it may hold a password).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("sqlite") {
            return Ok(Self::Sqlite);
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_string()));
        }
        let scheme = text.split_once("://").map_or("", |(scheme, _)| scheme);
        bail!(
            "{source}: expected \"sqlite\" (the default) or postgres://user:password@host:port/database, got a \
             store of scheme {scheme:?}"
        )
    }
}

/// The stores a server runs on, opened.
pub struct Opened {
    /// Registrations.
    pub registrations: Arc<dyn RegistrationStore>,
    /// DTLS sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Where registrations are, for the operator.
    pub registrations_at: String,
    /// Where sessions are, for the operator.
    pub sessions_at: String,
    /// The cluster's membership (PostgreSQL only).
    pub membership: Option<Arc<dyn tether::store::Membership>>,
}

/// Opens the stores `setting` names; `data_dir` holds the SQLite files, or the generation
/// marker of a PostgreSQL node.
pub async fn open(setting: &StoreSetting, data_dir: &Path, node: NodeId) -> Result<Opened> {
    let opened = match setting {
        StoreSetting::Sqlite => {
            let db = data_dir.join("registrations.db");
            let registrations =
                SqliteRegistrations::open(&db).with_context(|| format!("cannot open {}", db.display()))?;
            let sessions_db = data_dir.join("sessions.db");
            let sessions =
                SqliteSessions::open(&sessions_db).with_context(|| format!("cannot open {}", sessions_db.display()))?;
            Opened {
                registrations: Arc::new(registrations),
                sessions: Arc::new(sessions),
                registrations_at: db.display().to_string(),
                sessions_at: sessions_db.display().to_string(),
                membership: None,
            }
        }
        StoreSetting::Postgres(url) => {
            let store = PostgresStore::connect(url, node, Some(data_dir)).await.context("cannot open the store")?;
            let at = store.location().to_string();
            let store = Arc::new(store);
            Opened {
                registrations: Arc::clone(&store) as Arc<dyn RegistrationStore>,
                sessions: Arc::clone(&store) as Arc<dyn SessionStore>,
                registrations_at: at.clone(),
                sessions_at: at,
                membership: Some(store),
            }
        }
    };
    report(&opened, opened.registrations.opened(), opened.sessions.opened());
    Ok(opened)
}

/// Says what opening the stores found: a server that was not shut down (a crash, `kill -9`),
/// and a session store put back from an older copy (whose sessions are ended).
fn report(opened: &Opened, registrations: &OpenReport, sessions: &SessionsOpened) {
    let stores = [(&opened.registrations_at, registrations.unclean), (&opened.sessions_at, sessions.store.unclean)];
    for (store, unclean) in stores {
        if unclean {
            tracing::warn!(
                store = %store,
                "not closed cleanly: the server stopped without shutting down (a crash, kill -9, power loss); \
                 SQLite recovered every committed write from its write-ahead log"
            );
        }
    }
    if let Some(rolled_back) = sessions.rolled_back {
        tracing::warn!(
            store = %opened.sessions_at,
            database_generation = rolled_back.database,
            marker_generation = rolled_back.marker,
            "the session store is older than its generation marker: it was put back from a copy; its sessions are \
             ended rather than reuse their sequence numbers (each device is told and handshakes once)"
        );
        say!(
            "tether serve: {} was put back from an older copy: its sessions are ended, not restored (each device \
             handshakes once); see README.md, \"Backup and restore\"",
            opened.sessions_at
        );
    }
}
