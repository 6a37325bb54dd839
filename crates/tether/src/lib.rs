//! tokio drivers for tether's sans-IO core.
//!
//! - [`DtlsClient`]: one DTLS session to a server, driven by its own task; `connect` returns
//!   once the handshake has finished.
//! - [`DtlsServer`]: one UDP socket, many peers, stateless cookies, accepted sessions pooled
//!   with idle expiry and LRU capacity.
//! - [`SessionPool`]: one authenticated session per peer, reused for every request, with
//!   single-flight connects, generations, idle expiry, LRU eviction that keeps sessions
//!   resumable, and statistics ([`metrics`] renders them for Prometheus).
//! - [`ResilientClient`]: reconnect with backoff, circuit breaker, send with retry and events,
//!   over any [`Transport`] ([`TcpTransport`], [`DtlsTransport`]); [`retry`] for any
//!   operation.
//! - [`lwm2m::Lwm2mServer`]: the LwM2M server runtime: registrations and server-initiated
//!   requests over the session each device opened.
//! - [`Lwm2mDevice`]: an LwM2M device on the resilient client: registration, updates, the
//!   Server object's retry timers, answers and notifications for objects 0, 1 and 3.
//!
//! Time: this crate reads the clock only through `tokio::time::Instant`, so tests with
//! `start_paused = true` drive every timer of the state machines except OpenSSL's own DTLS
//! retransmission timer (wall clock, inside libssl). Paused-time tests therefore run over a
//! lossless [`MemoryNetwork`] where no retransmission is needed.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bootstrap;
mod client;
mod clock;
pub mod cluster;
mod device;
pub mod lwm2m;
pub mod metrics;
pub mod oplog;
mod pool;
mod resilient;
mod send;
mod server;
mod socket;
pub mod store;

pub use client::{ClientCounters, ConnectError, Connected, DtlsClient};
pub use device::{ConnectFailure, DeviceError, DeviceStatus, FixedPortTransport, Lwm2mDevice, Lwm2mDeviceConfig};
pub use pool::{Dialer, PooledSession, SessionPool};
pub use resilient::{
    retry, ClientEvent, Connection, DisconnectReason, DtlsTransport, ResilientClient, ResilientConfig, ResilientError,
    RetryError, TcpConnection, TcpTransport, Transport, TransportError,
};
pub use server::{
    identity_name, os_seed, Accepted, Arrival, DepartReason, Departed, DtlsServer, DtlsServerConfig, RelayIn,
    RelayLink, RelayOut, ServerError, ServerSendError, ServerStats,
};
pub use socket::{MemoryNetwork, MemorySocket, Socket, SERVER_RECV_BUFFER};
