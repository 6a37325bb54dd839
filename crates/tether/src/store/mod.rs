//! Where a server keeps what must survive it: registrations, and its established DTLS
//! sessions (snapshots, checkpoints, sequence reservations).
//!
//! Two interfaces, [`RegistrationStore`] and [`SessionStore`], each with two backends:
//! embedded SQLite (the default: files in the data directory) and PostgreSQL
//! ([`PostgresStore`], the store a cluster's nodes share). Both take writes in batches, one
//! durable transaction a batch, and answer with futures: the LwM2M and DTLS tasks hand a
//! batch over and go on serving; the write's outcome comes back to them as an input, and
//! nothing a batch holds is acknowledged to a device before it is durable.
//!
//! No backend's own types appear here: errors name the backend and keep its message.

mod generation;
mod membership;
mod postgres;
mod sqlite;
mod wall_clock;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use tether_coap::registration::Registration;
use tether_proto::dtls::{Checkpoint, HandleSpace, SessionHandle, SessionSnapshot};

pub use membership::{Adopted, Membership, NodeAddresses, NodeRecord, Share};
pub use postgres::PostgresStore;
pub use sqlite::{SqliteRegistrations, SqliteSessions};

/// A store's answer, to await.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend refused (SQLite, PostgreSQL): its message.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What it said.
        message: String,
    },
    /// A file could not be created or given its permissions.
    #[error("cannot create {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The integrity check found the store damaged: nothing is served from it.
    #[error("{file} is damaged ({detail}): {remedy}")]
    Damaged {
        /// The file.
        file: String,
        /// What the check said, first lines.
        detail: String,
        /// What the operator can do.
        remedy: &'static str,
    },
    /// The task that ran the write ended before it answered (the runtime is shutting down).
    #[error("the store's task ended before it answered")]
    Interrupted,
}

/// What opening a store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The store was not closed cleanly: a server stopped without shutting down (a crash,
    /// `kill -9`, power loss). Every committed write was recovered.
    pub unclean: bool,
}

/// One change to the stored registrations.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistrationWrite {
    /// Insert or replace a registration.
    Save(Box<Registration>),
    /// Delete the registration of `endpoint` if its ID is still `id` (a newer one stays).
    Remove {
        /// The endpoint.
        endpoint: String,
        /// The registration ID.
        id: String,
    },
}

/// Registrations that outlive the server: written (a batch at a time) before they are
/// acknowledged, loaded when it starts.
pub trait RegistrationStore: Send + Sync + std::fmt::Debug {
    /// Applies `writes` in one durable transaction. A registration's times are `Instant`s;
    /// `now` is the present they are measured against, stored as wall-clock times.
    fn apply(&self, writes: Vec<RegistrationWrite>, now: Instant) -> StoreFuture<'_, ()>;

    /// Every stored registration, its times mapped onto `now`.
    fn load(&self, now: Instant) -> StoreFuture<'_, Vec<Registration>>;

    /// What opening the store found.
    fn opened(&self) -> &OpenReport;
}

/// One change to the stored sessions.
#[derive(Debug, Clone)]
pub enum SessionWrite {
    /// A new session (its first snapshot).
    Insert {
        /// Its handle, stable across restarts.
        handle: SessionHandle,
        /// Its peer's address.
        peer: SocketAddr,
        /// Its snapshot (boxed: the other writes, the many, are small).
        snapshot: Box<SessionSnapshot>,
    },
    /// A checkpoint of a stored session.
    Checkpoint(Checkpoint),
    /// A session that ended.
    Delete(SessionHandle),
}

/// What a batch of session writes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Sessions another node holds now: nothing of theirs was written, and this node must
    /// not send on them again.
    pub fenced: Vec<SessionHandle>,
}

/// A session loaded from the store.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Its handle.
    pub handle: SessionHandle,
    /// Where its peer last was.
    pub peer: SocketAddr,
    /// Its state, with the last checkpoint applied.
    pub snapshot: SessionSnapshot,
}

/// What opening a session store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionsOpened {
    /// Left without a clean close.
    pub store: OpenReport,
    /// The store was put back from an older copy: its sessions must be ended, not restored.
    pub rolled_back: Option<RolledBack>,
    /// Where this start's session handles come from: the store's node, and its start count
    /// (counted up at every open), so no handle made now equals one stored before.
    pub handles: HandleSpace,
}

/// A session store put back from an older copy: none of its sessions may be restored (they
/// may have used sequence numbers, and seen records, after the copy was taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The generation the store holds.
    pub database: u64,
    /// The generation its marker holds: the last one written.
    pub marker: u64,
}

/// Established DTLS sessions that outlive the server, so it serves them again with no
/// handshake: written before anything of a new session reaches the application, then
/// checkpointed while it lives. A session only writes sequence numbers below a limit
/// already stored (see `tether_proto::dtls::Checkpoint`).
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Applies `writes` in one durable transaction. Checkpoints of sessions this node no
    /// longer holds (another node adopted them) change nothing and come back as
    /// [`Applied::fenced`].
    fn apply(&self, writes: Vec<SessionWrite>) -> StoreFuture<'_, Applied>;

    /// Every stored session, its last checkpoint applied. Records that no longer decode are
    /// deleted (their devices handshake again).
    fn load(&self) -> StoreFuture<'_, Vec<StoredSession>>;

    /// How many sessions are stored.
    fn count(&self) -> StoreFuture<'_, usize>;

    /// What opening the store found.
    fn opened(&self) -> &SessionsOpened;
}
