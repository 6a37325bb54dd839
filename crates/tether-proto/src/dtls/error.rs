//! Errors and close reasons of the DTLS layer, named by who is at fault.

use std::fmt;

/// A configuration was refused when a context was built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No credentials: a client needs a PSK or trust anchors, a server a PSK store or a
    /// certificate.
    #[error("no credentials configured: {0}")]
    NoCredentials(&'static str),
    /// No cipher suite usable with the configured credentials.
    #[error("no cipher suite is usable with the configured credentials")]
    NoUsableCipherSuite,
    /// A PSK identity or key is empty or too long.
    #[error("invalid pre-shared key: {0}")]
    InvalidPsk(&'static str),
    /// A Connection ID setting is out of range.
    #[error("invalid connection id: {0}")]
    InvalidConnectionId(&'static str),
    /// A limit is out of range.
    #[error("invalid {name}: {reason}")]
    InvalidLimit {
        /// The setting.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MTU is outside 256..=65507 bytes.
    #[error("mtu {0} is outside 256..=65507 bytes")]
    InvalidMtu(u16),
    /// A duration setting is out of range.
    #[error("invalid {name}: {reason}")]
    InvalidDuration {
        /// The setting.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// OpenSSL refused a setting (certificate and key that do not match, for example).
    #[error("openssl refused the configuration: {0}")]
    OpenSsl(#[source] openssl::error::ErrorStack),
}

impl From<openssl::error::ErrorStack> for ConfigError {
    fn from(err: openssl::error::ErrorStack) -> Self {
        Self::OpenSsl(err)
    }
}

/// An application-data send was refused. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The handshake has not finished yet.
    #[error("the session is not established yet")]
    NotEstablished,
    /// The session is closed; the reason is the session's close reason.
    #[error("the session is closed: {0}")]
    Closed(CloseReason),
    /// The plaintext does not fit into one record at the configured MTU.
    #[error("payload of {len} bytes exceeds the {max}-byte maximum for one record at this MTU")]
    TooLarge {
        /// The plaintext's length.
        len: usize,
        /// `Session::max_payload()`.
        max: usize,
    },
    /// The payload is empty; DTLS would send an empty record no peer can act on.
    #[error("empty payload")]
    Empty,
    /// The record sequence numbers reserved on disk are used up until the next checkpoint
    /// writes a new reservation (a restored session never reuses a sequence number). The
    /// session stays open; try again after the checkpoint.
    #[error("record sequence numbers await a durable reservation")]
    SequenceReservation,
}

/// Why a session ended. Sticky: once set it never changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// Closed by this side (`Session::close`); close_notify was sent.
    #[error("closed locally")]
    Local,
    /// The peer sent close_notify.
    #[error("peer closed the session")]
    PeerClosed,
    /// The handshake did not finish before its deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// OpenSSL gave up retransmitting (too many timeouts without progress).
    #[error("handshake abandoned after too many retransmissions")]
    RetransmissionLimit,
    /// The client's PSK identity is unknown to the server.
    #[error("unknown psk identity")]
    UnknownPskIdentity,
    /// The peer's Finished did not authenticate: both sides hold different keys (for PSK,
    /// the pre-shared key is wrong on one side).
    #[error("peer's finished message failed to authenticate: the keys differ (wrong psk?)")]
    KeyMismatch,
    /// We rejected the peer's certificate.
    #[error("peer certificate rejected: {0}")]
    CertificateRejected(String),
    /// Mutual authentication is required and the client sent no certificate.
    #[error("peer sent no certificate but one is required")]
    NoPeerCertificate,
    /// The peer aborted with a fatal alert.
    #[error("peer sent fatal alert: {0}")]
    AlertReceived(AlertDescription),
    /// The handshake failed for another reason, as OpenSSL reported it.
    #[error("handshake failed: {0}")]
    HandshakeFailed(String),
    /// A new handshake from the same address completed and took this session's place
    /// (RFC 6347 §4.2.8: the device rebooted, or a NAT reused the port).
    #[error("replaced by a new handshake from the same address")]
    Replaced,
    /// The endpoint closed the session to stay within its limits.
    #[error("evicted")]
    Evicted,
    /// A newer session of the same identity took its place: the identity holds as many
    /// sessions as it may.
    #[error("superseded by a newer session of the same identity")]
    Superseded,
    /// Another node of the cluster holds the session now (it adopted it): this one forgot
    /// it and sent nothing more on it.
    #[error("handed over to another node")]
    HandedOver,
    /// A fatal error on an established session, as OpenSSL reported it.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A TLS alert description (RFC 5246 §7.2, RFC 4279 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AlertDescription(pub u8);

impl AlertDescription {
    /// `unknown_psk_identity` (115).
    pub const UNKNOWN_PSK_IDENTITY: Self = Self(115);
    /// `decrypt_error` (51).
    pub const DECRYPT_ERROR: Self = Self(51);
    /// `bad_record_mac` (20).
    pub const BAD_RECORD_MAC: Self = Self(20);

    /// The RFC name of the alert.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "close_notify",
            10 => "unexpected_message",
            20 => "bad_record_mac",
            22 => "record_overflow",
            40 => "handshake_failure",
            42 => "bad_certificate",
            43 => "unsupported_certificate",
            44 => "certificate_revoked",
            45 => "certificate_expired",
            46 => "certificate_unknown",
            47 => "illegal_parameter",
            48 => "unknown_ca",
            49 => "access_denied",
            50 => "decode_error",
            51 => "decrypt_error",
            70 => "protocol_version",
            71 => "insufficient_security",
            80 => "internal_error",
            90 => "user_canceled",
            100 => "no_renegotiation",
            110 => "unsupported_extension",
            115 => "unknown_psk_identity",
            116 => "certificate_required",
            _ => "unknown_alert",
        }
    }
}

impl fmt::Display for AlertDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}
