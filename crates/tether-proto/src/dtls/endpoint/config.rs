//! The settings of an [`Endpoint`](super::Endpoint): limits, cookies, Connection IDs,
//! sequence reservations.

use std::sync::Arc;
use std::time::Duration;

use crate::dtls::cid::{CidGenerator, RandomCids};

/// Limits and cookie settings of an [`Endpoint`](super::Endpoint).
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Sessions held at once, established or handshaking. Default 10,000.
    pub max_sessions: usize,
    /// Handshakes in progress at once. Default 1,000.
    pub max_handshakes: usize,
    /// How often the cookie secret rotates. Default 60 s.
    pub cookie_rotation: Duration,
    /// Seed of the cookie secrets and connection IDs: OS entropy in production, fixed in
    /// tests.
    pub cookie_seed: [u8; 32],
    /// Where the Connection IDs (RFC 9146) given to clients that offer the extension come
    /// from; `None` turns Connection IDs off. Default: random, 6 bytes.
    pub connection_ids: Option<Arc<dyn CidGenerator>>,
    /// Record sequence numbers reserved at a time for sessions whose state is persisted
    /// (see [`super::Endpoint::checkpoint`]); `None` (the default) when nothing is persisted and
    /// sequence numbers need no reservation.
    pub sequence_reservation: Option<u64>,
    /// Handshakes in progress from one IP address at once. Default 32. Sources that hold,
    /// or recently held, an established session are not limited by it.
    pub max_handshakes_per_address: usize,
    /// Handshakes in progress from one network (/24, /64) at once. Default 128.
    pub max_handshakes_per_network: usize,
    /// Handshake slots only known sources may take: addresses that hold or held an
    /// established session within the last hour, and clients resuming a session this
    /// server knows. Default 100 (of 1,000).
    pub reserved_handshakes: usize,
    /// How long a handshake whose client has sent nothing since its ClientHello is kept.
    /// Default 10 s. Once the client is heard from, the session's own handshake timeout
    /// applies.
    pub stalled_handshake_timeout: Duration,
    /// Established sessions one identity holds at once; a new one beyond this closes that
    /// identity's oldest. Default 4.
    pub max_sessions_per_identity: usize,
    /// Where session handles come from (see [`HandleSpace`](super::HandleSpace)).
    pub handles: super::HandleSpace,
    /// In a cluster, another node may hold a session this one made (it adopted it while
    /// this node was down): records with an unknown Connection ID of this node's own are
    /// then handed out for forwarding too ([`Endpoint::poll_foreign`](super::Endpoint::poll_foreign),
    /// naming this node). Default `false`: they are dropped.
    pub relay_unknown_own_ids: bool,
}

impl EndpointConfig {
    /// Default limits with cookie secrets drawn from `cookie_seed`.
    pub fn new(cookie_seed: [u8; 32]) -> Self {
        Self {
            max_sessions: 10_000,
            max_handshakes: 1_000,
            cookie_rotation: Duration::from_secs(60),
            cookie_seed,
            connection_ids: Some(Arc::new(RandomCids::unchecked(6))),
            sequence_reservation: None,
            max_handshakes_per_address: 32,
            max_handshakes_per_network: 128,
            reserved_handshakes: 100,
            stalled_handshake_timeout: Duration::from_secs(10),
            max_sessions_per_identity: 4,
            handles: super::HandleSpace::default(),
            relay_unknown_own_ids: false,
        }
    }

    /// Random Connection IDs of `len` bytes, 1 to 8 (0: off). A length out of range is
    /// refused by [`Endpoint::new`](super::Endpoint::new).
    pub fn connection_id_len(mut self, len: u8) -> Self {
        self.connection_ids = (len > 0).then(|| Arc::new(RandomCids::unchecked(len)) as Arc<dyn CidGenerator>);
        self
    }

    /// Connection IDs from `generator` (in a cluster: [`NodeCids`](crate::dtls::NodeCids), which
    /// name the node).
    pub fn connection_ids(mut self, generator: Arc<dyn CidGenerator>) -> Self {
        self.connection_ids = Some(generator);
        self
    }

    /// Makes session handles in `space`.
    pub fn handles(mut self, space: super::HandleSpace) -> Self {
        self.handles = space;
        self
    }

    /// The length of the Connection IDs issued (0: none).
    pub fn cid_len(&self) -> u8 {
        self.connection_ids.as_ref().map_or(0, |g| g.cid_len())
    }

    /// Reserves record sequence numbers `count` at a time, for persisted sessions.
    pub fn sequence_reservation(mut self, count: u64) -> Self {
        self.sequence_reservation = Some(count);
        self
    }

    /// Sets the session limit.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Sets the handshake limit, and keeps a tenth of it for known sources.
    pub fn max_handshakes(mut self, max: usize) -> Self {
        self.max_handshakes = max;
        self.reserved_handshakes = max / 10;
        self
    }

    /// Sets the cookie rotation period.
    pub fn cookie_rotation(mut self, every: Duration) -> Self {
        self.cookie_rotation = every;
        self
    }

    /// Sets the per-address and per-network handshake limits.
    pub fn handshakes_per_source(mut self, per_address: usize, per_network: usize) -> Self {
        self.max_handshakes_per_address = per_address;
        self.max_handshakes_per_network = per_network;
        self
    }

    /// Sets the handshake slots kept for known sources.
    pub fn reserved_handshakes(mut self, reserved: usize) -> Self {
        self.reserved_handshakes = reserved;
        self
    }

    /// Sets the deadline of a stalled handshake.
    pub fn stalled_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.stalled_handshake_timeout = timeout;
        self
    }

    /// Sets the established sessions one identity may hold.
    pub fn max_sessions_per_identity(mut self, max: usize) -> Self {
        self.max_sessions_per_identity = max;
        self
    }
}
