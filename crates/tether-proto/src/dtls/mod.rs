//! DTLS 1.2 over OpenSSL, sans-IO.
//!
//! - [`Session`]: one association with one peer (client or server), fed datagrams and
//!   drained of datagrams, events and a timeout.
//! - [`Endpoint`]: the server side for many peers on one socket: stateless cookie exchange
//!   (RFC 6347 §4.2.1) before any per-peer state, routing by address, same-address
//!   re-handshake (§4.2.8), limits and drop counters.
//! - [`DtlsContext`]: a compiled [`ClientConfig`] or [`ServerConfig`], shared by sessions.

mod cbc;
pub mod cid;
mod config;
mod cookie;
mod endpoint;
mod error;
#[allow(unsafe_code, reason = "the one module that calls libssl functions the crate lacks")]
mod ffi;
mod handshake;
pub mod keys;
pub mod pki;
pub mod record;
mod record_layer;
mod replay;
mod resumption;
mod session;
mod snapshot;

pub use cid::{CidGenerator, CidOwner, NodeCids, NodeId, RandomCids};
pub use config::{
    CertifiedKey, CipherSuite, ClientAuth, ClientConfig, DtlsContext, PskKey, PskStore, RetransmitPolicy, Role,
    ServerConfig, SessionConfig, StaticPskStore,
};
pub use cookie::CookieKeys;
pub use endpoint::{
    Checkpoint, DropReason, Endpoint, EndpointConfig, EndpointEvent, EndpointStats, EndpointTransmit, ForeignDatagram,
    HandleSpace, RestoreError, SessionHandle,
};
pub use error::{AlertDescription, CloseReason, ConfigError, SendError};
pub use session::{Event, PeerIdentity, SavedSession, Session, SessionStats, Transmit};
pub use snapshot::{SessionSnapshot, SnapshotError};

/// Certificates, as the configs take them (OpenSSL's `X509`).
pub use openssl::x509::X509;
