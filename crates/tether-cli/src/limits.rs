//! `[limits]` of tether.toml: what one source, one identity and everyone together may hold
//! of a server (DTLS sessions and handshakes, HTTP connections, event readers).

use anyhow::{bail, Result};
use serde::Deserialize;

/// `[limits]` of tether.toml: how much of the server one party may hold, and all together.
/// Every field has a default; see README.md ("Limits").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// DTLS sessions at once, established or handshaking.
    pub max_sessions: usize,
    /// DTLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Handshakes in progress from one IP address (one that held a session is not limited).
    pub handshakes_per_address: usize,
    /// Handshakes in progress from one /24 (IPv4) or /64 (IPv6) network.
    pub handshakes_per_network: usize,
    /// DTLS sessions one identity holds at once; a new one closes its oldest.
    pub sessions_per_identity: usize,
    /// Seconds a handshake whose client said nothing after its ClientHello is kept.
    pub stalled_handshake_timeout_s: f64,
    /// HTTP connections at once.
    pub http_connections: usize,
    /// HTTP connections from one IP address at once.
    pub http_connections_per_address: usize,
    /// Seconds a connection has to send a request's headers, counted from when the server
    /// waits for them (a new connection, or a kept-alive one between requests): slow and
    /// silent clients are cut.
    pub http_header_timeout_s: f64,
    /// `/api/events` readers at once.
    pub event_readers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_handshakes: 1_000,
            handshakes_per_address: 32,
            handshakes_per_network: 128,
            sessions_per_identity: 4,
            stalled_handshake_timeout_s: 10.0,
            http_connections: 512,
            http_connections_per_address: 64,
            http_header_timeout_s: 10.0,
            event_readers: 64,
        }
    }
}

impl Limits {
    /// Checks every limit is usable, naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        let counts = [
            ("max_sessions", self.max_sessions),
            ("max_handshakes", self.max_handshakes),
            ("handshakes_per_address", self.handshakes_per_address),
            ("handshakes_per_network", self.handshakes_per_network),
            ("sessions_per_identity", self.sessions_per_identity),
            ("http_connections", self.http_connections),
            ("http_connections_per_address", self.http_connections_per_address),
            ("event_readers", self.event_readers),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, value)| *value == 0) {
            bail!("tether.toml [limits]: {name} must be at least 1");
        }
        let seconds = [
            ("stalled_handshake_timeout_s", self.stalled_handshake_timeout_s),
            ("http_header_timeout_s", self.http_header_timeout_s),
        ];
        if let Some((name, value)) = seconds.iter().find(|(_, value)| !(0.1..=86_400.0).contains(value)) {
            bail!("tether.toml [limits]: {name} must be between 0.1 and 86400 seconds, got {value}");
        }
        Ok(())
    }

    /// The DTLS endpoint's limits.
    pub fn endpoint(&self, config: tether_proto::dtls::EndpointConfig) -> tether_proto::dtls::EndpointConfig {
        config
            .max_sessions(self.max_sessions)
            .max_handshakes(self.max_handshakes)
            .handshakes_per_source(self.handshakes_per_address, self.handshakes_per_network)
            .max_sessions_per_identity(self.sessions_per_identity)
            .stalled_handshake_timeout(std::time::Duration::from_secs_f64(self.stalled_handshake_timeout_s))
    }
}
