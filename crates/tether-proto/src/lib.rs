//! The sans-IO core of tether.
//!
//! Nothing here opens a socket, spawns a task, sleeps or reads a clock: every state machine
//! takes `now` as an argument and returns what to send and when to be woken. The tokio
//! drivers live in the `tether` crate.
//!
//! - [`dtls`]: DTLS 1.2 sessions over OpenSSL and the many-peer server endpoint.
//! - [`pool`]: the session pool policy (generations, idle expiry, LRU, statistics).
//! - [`resilience`]: exponential backoff with jitter, and a circuit breaker.
//! - [`cluster`]: the authenticated frames a cluster's nodes forward records in.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod dtls;
pub mod pool;
pub mod resilience;
