//! What an [`Endpoint`](super::Endpoint) counts: datagrams dropped by reason, handshakes,
//! sessions.

/// Why the endpoint dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Not a DTLS datagram (bad framing, unknown content type or version).
    Malformed,
    /// Not a ClientHello, and no session exists for the sender.
    UnknownPeer,
    /// A ClientHello with a valid cookie while `max_handshakes` are in progress.
    HandshakeLimit,
    /// A ClientHello with a valid cookie while `max_sessions` exist.
    SessionLimit,
    /// OpenSSL refused to start a session for a ClientHello with a valid cookie.
    SessionSetupFailed,
    /// A late copy of the ClientHello that started a live session of the same address (same
    /// client random): a duplicate or reordered datagram, not a new handshake.
    StaleClientHello,
    /// A `tls12_cid` record whose Connection ID names no session.
    UnknownConnectionId,
    /// A ClientHello with a valid cookie from an address or network that already has its
    /// share of handshakes in progress.
    SourceLimit,
    /// A record for another node's session while too many wait to be forwarded.
    ForeignBacklog,
}

impl DropReason {
    /// Every reason, for reports.
    pub const ALL: [DropReason; 9] = [
        Self::Malformed,
        Self::UnknownPeer,
        Self::HandshakeLimit,
        Self::SessionLimit,
        Self::SessionSetupFailed,
        Self::StaleClientHello,
        Self::UnknownConnectionId,
        Self::SourceLimit,
        Self::ForeignBacklog,
    ];

    /// A short snake_case name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownPeer => "unknown_peer",
            Self::HandshakeLimit => "handshake_limit",
            Self::SessionLimit => "session_limit",
            Self::SessionSetupFailed => "session_setup_failed",
            Self::StaleClientHello => "stale_client_hello",
            Self::UnknownConnectionId => "unknown_connection_id",
            Self::SourceLimit => "source_limit",
            Self::ForeignBacklog => "foreign_backlog",
        }
    }

    pub(super) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Counters of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams handed to [`super::Endpoint::handle`].
    pub datagrams_received: u64,
    /// HelloVerifyRequests sent (ClientHellos without a valid cookie).
    pub hello_verify_requests_sent: u64,
    /// ClientHellos whose non-empty cookie did not verify.
    pub cookies_rejected: u64,
    /// Sessions created (ClientHellos with a valid cookie, within limits).
    pub sessions_created: u64,
    /// Handshakes that completed.
    pub handshakes_completed: u64,
    /// Of those, abbreviated handshakes that resumed a session.
    pub handshakes_resumed: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
    /// Sessions replaced by a new handshake from the same address.
    pub sessions_replaced: u64,
    /// Sessions that followed their peer to a new address by Connection ID.
    pub migrations: u64,
    /// Sessions restored from snapshots.
    pub sessions_restored: u64,
    /// Handshakes closed to make room (stalled ones, when the table was full), or because
    /// their client stayed silent past the stalled-handshake deadline.
    pub stalled_handshakes_closed: u64,
    /// Established sessions closed to make room (unused ones, when the table was full) or
    /// because their identity opened more than its share.
    pub sessions_evicted: u64,
    /// Datagrams whose Connection ID names another node, handed out to be forwarded.
    pub foreign_records: u64,
    pub(super) dropped: [u64; DropReason::ALL.len()],
}

impl EndpointStats {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Datagrams dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}
