//! tokio drivers for tether's sans-IO core.
//!
//! - [`DtlsClient`]: one DTLS session to a server, driven by its own task; `connect` returns
//!   once the handshake has finished.
//! - [`DtlsServer`]: one UDP socket, many peers, stateless cookies, accepted sessions pooled
//!   with idle expiry and LRU capacity.
//! - [`SessionPool`]: one authenticated session per peer, reused for every request, with
//!   single-flight connects, generations, idle expiry, LRU eviction that keeps sessions
//!   resumable, and statistics ([`metrics`] renders them for Prometheus).
//!
//! Time: this crate reads the clock only through `tokio::time::Instant`, so tests with
//! `start_paused = true` drive every timer of the state machines except OpenSSL's own DTLS
//! retransmission timer (wall clock, inside libssl). Paused-time tests therefore run over a
//! lossless [`MemoryNetwork`] where no retransmission is needed.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod clock;
pub mod metrics;
mod pool;
mod server;
mod socket;

pub use client::{handshake_timeout, ClientCounters, ConnectError, Connected, DtlsClient};
pub use pool::{send_request, Dialer, PooledSession, RequestError, SessionPool};
pub use server::{
    identity_name, os_seed, Accepted, DepartReason, Departed, DtlsServer, DtlsServerConfig,
    ServerError, ServerSendError, ServerStats,
};
pub use socket::{MemoryNetwork, MemorySocket, Socket, SERVER_RECV_BUFFER};
