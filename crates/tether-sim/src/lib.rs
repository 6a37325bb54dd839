//! A seeded simulated network for scenario tests, driven in virtual time.
//!
//! Nodes are sans-IO state machines ([`Node`]); the [`Network`] carries their datagrams over
//! links with latency, jitter, random or bursty loss, duplication, reordering and an MTU, all
//! drawn from one seeded RNG. A failing scenario prints its seed; rerun it with
//! `TETHER_SIM_SEED=<seed>`.
//!
//! Time: in [`Clock::Virtual`] the network jumps from event to event. DTLS retransmission
//! timers run on the wall clock inside OpenSSL, so DTLS scenarios use
//! [`Clock::FollowWallClock`], where reaching a virtual instant waits until as much real time
//! has passed: everything else about the scenario stays seeded.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dtls;
mod link;
mod network;

pub use link::{LinkConfig, Loss};
pub use network::{Clock, Network, NetworkStats, Node, NodeId};

/// The seed from `TETHER_SIM_SEED` if set, else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("TETHER_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
