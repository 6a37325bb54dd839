//! One DTLS 1.2 association with one peer, driven without I/O.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::nid::Nid;
use openssl::ssl::{ErrorCode, Ssl, SslRef, SslSession, SslStream};

use super::config::{verified_cookie_index, CipherSuite, DtlsContext, Role, VerifiedCookie};
use super::error::{AlertDescription, CloseReason, ConfigError, SendError};
use super::ffi;
use super::record::{self, ContentType};

/// A datagram to send to the session's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// One whole datagram.
    pub contents: Vec<u8>,
}

/// Something that happened on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake finished; the session can carry application data.
    Connected {
        /// Whether this was an abbreviated handshake resuming an earlier session.
        resumed: bool,
    },
    /// Application data arrived.
    Data(Vec<u8>),
    /// The session ended. Always the last event.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Who the authenticated peer is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerIdentity {
    /// A PSK client's identity (seen by the server).
    Psk(Vec<u8>),
    /// The common name of the peer's verified certificate.
    Certificate {
        /// Subject CN.
        common_name: String,
    },
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Psk(id) => write!(f, "psk:{}", String::from_utf8_lossy(id)),
            Self::Certificate { common_name } => write!(f, "cn:{common_name}"),
        }
    }
}

/// A session saved after a handshake, for resuming later with an abbreviated handshake.
#[derive(Clone)]
pub struct SavedSession {
    session: SslSession,
    context: Arc<DtlsContext>,
}

impl fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedSession").finish_non_exhaustive()
    }
}

/// Traffic counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Datagrams handed in.
    pub datagrams_received: u64,
    /// Bytes of those datagrams.
    pub bytes_received: u64,
    /// Datagrams handed out.
    pub datagrams_sent: u64,
    /// Bytes of those datagrams.
    pub bytes_sent: u64,
    /// Retransmission timer expiries that re-sent a flight.
    pub retransmissions: u64,
    /// Datagrams dropped before OpenSSL saw them: not DTLS records, or an encrypted record
    /// too short to hold the cipher's nonce and tag.
    pub datagrams_dropped: u64,
}

#[derive(Debug)]
enum State {
    Handshaking { deadline: Instant },
    Established,
    Closed(CloseReason),
}

/// A DTLS 1.2 session with one peer, over OpenSSL, with no I/O and no clock of its own.
///
/// Drive it in this order: inputs ([`handle_datagram`](Self::handle_datagram),
/// [`handle_timeout`](Self::handle_timeout)) and commands ([`send`](Self::send),
/// [`close`](Self::close)); then drain every output: [`poll_transmit`](Self::poll_transmit)
/// until `None`, [`poll_event`](Self::poll_event) until `None`, and
/// [`poll_timeout`](Self::poll_timeout) to learn when to call `handle_timeout` next.
/// An early or repeated `handle_timeout` is harmless.
///
/// Input from the network never fails and never panics: datagrams that do not authenticate
/// are dropped (DTLS discards them silently). Fatal conditions end the session with a
/// sticky [`CloseReason`], reported once as [`Event::Closed`].
///
/// Time: the handshake deadline follows the `now` passed in. OpenSSL's retransmission timer
/// runs on the wall clock inside libssl; `poll_timeout` maps the time it has left onto the
/// caller's `now`, so a caller on virtual time must also let real time pass for a
/// retransmission to happen.
pub struct Session {
    stream: SslStream<DatagramPipe>,
    role: Role,
    state: State,
    last_now: Instant,
    events: VecDeque<Event>,
    identity: Option<PeerIdentity>,
    resumed: bool,
    stats: SessionStats,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a client handshake; the ClientHello is ready in `poll_transmit`.
    pub fn client(context: &Arc<DtlsContext>, now: Instant) -> Result<Self, ConfigError> {
        Self::start_client(context, now, None)
    }

    /// Starts a client handshake that offers to resume `saved`. If the server no longer
    /// knows the session, a full handshake follows.
    pub fn client_resuming(
        context: &Arc<DtlsContext>,
        now: Instant,
        saved: &SavedSession,
    ) -> Result<Self, ConfigError> {
        Self::start_client(context, now, Some(saved))
    }

    fn start_client(
        context: &Arc<DtlsContext>,
        now: Instant,
        saved: Option<&SavedSession>,
    ) -> Result<Self, ConfigError> {
        if context.role != Role::Client {
            return Err(ConfigError::NoCredentials("a client session needs a client context"));
        }
        let mut ssl = new_ssl(context)?;
        if let Some(saved) = saved.filter(|s| Arc::ptr_eq(&s.context, context)) {
            ffi::set_session(&mut ssl, &saved.session)?;
        }
        ssl.set_connect_state();
        let mut session = Self::with_ssl(context, ssl, Role::Client, now)?;
        session.drive_handshake();
        Ok(session)
    }

    /// A server session that waits for a ClientHello and performs no cookie exchange of its
    /// own. For many peers on one socket use [`Endpoint`](super::Endpoint), which exchanges
    /// cookies statelessly before it creates a session.
    pub fn server(context: &Arc<DtlsContext>, now: Instant) -> Result<Self, ConfigError> {
        if context.role != Role::Server {
            return Err(ConfigError::NoCredentials("a server session needs a server context"));
        }
        let mut ssl = new_ssl(context)?;
        ssl.set_accept_state();
        Self::with_ssl(context, ssl, Role::Server, now)
    }

    /// A server session for a ClientHello whose `cookie` the endpoint has verified: OpenSSL
    /// continues the handshake from it with the sequence numbers RFC 6347 §4.2.1 requires.
    pub(crate) fn server_after_cookie(
        context: &Arc<DtlsContext>,
        now: Instant,
        client_hello: &[u8],
        cookie: &[u8],
    ) -> Result<Self, ConfigError> {
        let mut ssl = new_ssl(context)?;
        ssl.set_ex_data(verified_cookie_index(), VerifiedCookie(cookie.to_vec()));
        ssl.set_accept_state();
        let mut session = Self::with_ssl(context, ssl, Role::Server, now)?;
        session.stream.get_mut().deliver(client_hello);
        session.stats.datagrams_received += 1;
        session.stats.bytes_received += client_hello.len() as u64;
        if !ffi::listen(session.stream.ssl()) {
            return Err(ConfigError::OpenSsl(openssl::error::ErrorStack::get()));
        }
        session.drive_handshake();
        Ok(session)
    }

    fn with_ssl(context: &Arc<DtlsContext>, ssl: Ssl, role: Role, now: Instant) -> Result<Self, ConfigError> {
        let stream = SslStream::new(ssl, DatagramPipe::default())?;
        let deadline = now + context.session.handshake_timeout;
        Ok(Self {
            stream,
            role,
            state: State::Handshaking { deadline },
            last_now: now,
            events: VecDeque::new(),
            identity: None,
            resumed: false,
            stats: SessionStats::default(),
        })
    }

    /// Which end of the handshake this session plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True while the handshake runs.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshaking { .. })
    }

    /// True once the handshake finished and until the session closes.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// The authenticated peer: a PSK client's identity or the CN of a verified certificate.
    /// `None` before the handshake finishes, and on a PSK client (the server has no identity).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref()
    }

    /// Whether the handshake resumed an earlier session.
    pub fn is_resumed(&self) -> bool {
        self.resumed
    }

    /// Whether the handshake used Extended Master Secret (RFC 7627); `None` before the
    /// handshake finished.
    pub fn uses_extended_master_secret(&self) -> Option<bool> {
        if !self.is_established() {
            return None;
        }
        self.stream.ssl().extms_support()
    }

    /// The negotiated cipher suite, once established.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        let cipher = self.stream.ssl().current_cipher()?;
        CipherSuite::from_openssl_name(cipher.name())
    }

    /// The largest plaintext [`send`](Self::send) accepts: what fits into one record at the
    /// configured MTU with the negotiated suite. 0 until established.
    pub fn max_payload(&self) -> usize {
        if !self.is_established() {
            return 0;
        }
        ffi::data_mtu(self.stream.ssl())
    }

    /// The session to offer for resumption in a later client handshake.
    pub fn saved_session(&self, context: &Arc<DtlsContext>) -> Option<SavedSession> {
        if !self.is_established() && self.close_reason() != Some(&CloseReason::Local) {
            return None;
        }
        let session = self.stream.ssl().session()?.to_owned();
        Some(SavedSession { session, context: Arc::clone(context) })
    }

    /// Traffic counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Feeds one datagram received from the peer.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        self.last_now = now;
        if self.is_closed() {
            return;
        }
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        if !self.is_plausible(datagram) {
            self.stats.datagrams_dropped += 1;
            return;
        }
        self.stream.get_mut().deliver(datagram);
        if self.is_handshaking() {
            let carried_finished = carries_encrypted_handshake(datagram);
            self.drive_handshake();
            if carried_finished && self.is_handshaking() && self.awaits_finished() {
                // The peer's Finished arrived and OpenSSL discarded it: it did not decrypt,
                // so the two sides derived different keys. DTLS would stay silent until the
                // deadline; name the cause now and tell the peer (RFC 6347 §4.1.2.7).
                self.abort_with_alert(AlertDescription::DECRYPT_ERROR, CloseReason::KeyMismatch);
            }
        }
        if self.is_established() {
            self.read_application_data();
        }
        self.stream.get_mut().incoming = None;
    }

    /// Runs the timers: the handshake deadline and OpenSSL's retransmission timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        match self.state {
            State::Closed(_) => return,
            State::Handshaking { deadline } if now >= deadline => {
                self.set_closed(CloseReason::HandshakeTimeout);
                return;
            }
            _ => {}
        }
        match ffi::handle_dtls_timeout(self.stream.ssl()) {
            Ok(true) => self.stats.retransmissions += 1,
            Ok(false) => {}
            Err(()) => {
                let reason = classify_failure(self.stream.ssl(), None);
                self.set_closed(reason);
            }
        }
    }

    /// Encrypts `plaintext` into one record.
    pub fn send(&mut self, now: Instant, plaintext: &[u8]) -> Result<(), SendError> {
        self.last_now = now;
        match &self.state {
            State::Handshaking { .. } => return Err(SendError::NotEstablished),
            State::Closed(reason) => return Err(SendError::Closed(reason.clone())),
            State::Established => {}
        }
        if plaintext.is_empty() {
            return Err(SendError::Empty);
        }
        let max = self.max_payload();
        if plaintext.len() > max {
            return Err(SendError::TooLarge { len: plaintext.len(), max });
        }
        match self.stream.ssl_write(plaintext) {
            Ok(_) => Ok(()),
            Err(err) => {
                let reason = CloseReason::Protocol(describe(&err));
                self.set_closed(reason.clone());
                Err(SendError::Closed(reason))
            }
        }
    }

    /// Closes the session: sends close_notify if established. Idempotent.
    pub fn close(&mut self, now: Instant) {
        self.last_now = now;
        match self.state {
            State::Closed(_) => return,
            State::Established => {
                // With DTLS and a pipe that always accepts writes, the first call sends
                // close_notify and reports it sent; the peer's answer is not awaited.
                let _ = self.stream.shutdown();
            }
            State::Handshaking { .. } => {}
        }
        self.set_closed(CloseReason::Local);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let contents = self.stream.get_mut().outgoing.pop_front()?;
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += contents.len() as u64;
        Some(Transmit { contents })
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match self.state {
            State::Closed(_) => return None,
            State::Handshaking { deadline } => Some(deadline),
            State::Established => None,
        };
        let retransmit = ffi::dtls_timeout(self.stream.ssl()).map(|left| self.last_now + left);
        match (deadline, retransmit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Time OpenSSL's retransmission timer has left on the wall clock, if it runs. For
    /// drivers on virtual time that must let real time pass before a retransmission.
    pub fn retransmit_timer_remaining(&self) -> Option<Duration> {
        if self.is_closed() {
            return None;
        }
        ffi::dtls_timeout(self.stream.ssl())
    }

    /// Whether a datagram is worth handing to OpenSSL: whole DTLS records only, and no
    /// encrypted record shorter than the AEAD's explicit nonce plus tag. OpenSSL 3.0 treats
    /// such a short record as a fatal error instead of discarding it, so one spoofed 21-byte
    /// datagram could otherwise end an established session.
    fn is_plausible(&self, datagram: &[u8]) -> bool {
        let Some(records) = record::parse_records(datagram) else {
            return false;
        };
        let min = self.cipher_suite().map_or(MIN_AEAD_CIPHERTEXT, min_ciphertext);
        records.iter().all(|r| r.epoch == 0 || r.fragment.len() >= min)
    }

    /// The epoch-0 record sequence numbers this side has used, for plaintext alerts.
    fn next_plaintext_sequence(&self) -> u64 {
        self.stream.get_ref().next_epoch0_sequence
    }

    fn drive_handshake(&mut self) {
        match self.stream.do_handshake() {
            Ok(()) => self.on_established(),
            Err(err) if err.code() == ErrorCode::WANT_READ || err.code() == ErrorCode::WANT_WRITE => {}
            Err(err) => {
                let reason = classify_failure(self.stream.ssl(), Some(&err));
                self.set_closed(reason);
            }
        }
    }

    fn on_established(&mut self) {
        let ssl = self.stream.ssl();
        self.resumed = ssl.session_reused();
        self.identity = peer_identity(ssl, self.role);
        self.state = State::Established;
        self.events.push_back(Event::Connected { resumed: self.resumed });
    }

    fn read_application_data(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.ssl_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.events.push_back(Event::Data(buf[..n].to_vec())),
                Err(err) if err.code() == ErrorCode::WANT_READ => return,
                Err(err) if err.code() == ErrorCode::ZERO_RETURN => {
                    // Answer close_notify with ours, then end.
                    let _ = self.stream.shutdown();
                    self.set_closed(CloseReason::PeerClosed);
                    return;
                }
                Err(err) => {
                    let reason = match alert_in(&err) {
                        Some(alert) => CloseReason::AlertReceived(alert),
                        None => CloseReason::Protocol(describe(&err)),
                    };
                    self.set_closed(reason);
                    return;
                }
            }
        }
    }

    /// True if OpenSSL has read the peer's ChangeCipherSpec and waits for its Finished.
    fn awaits_finished(&self) -> bool {
        // SSL_state_string: "TRCCS" is TLS_ST_{CR,SR}_CHANGE (ChangeCipherSpec read).
        self.stream.ssl().state_string() == "TRCCS"
    }

    fn abort_with_alert(&mut self, alert: AlertDescription, reason: CloseReason) {
        let sequence = self.next_plaintext_sequence();
        self.stream.get_mut().outgoing.push_back(record::fatal_alert(alert.0, sequence));
        self.set_closed(reason);
    }

    fn set_closed(&mut self, reason: CloseReason) {
        if self.is_closed() {
            return;
        }
        self.events.push_back(Event::Closed { reason: reason.clone() });
        self.state = State::Closed(reason);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SSL_free discards the session from the cache unless the connection was shut down;
        // a session that ended cleanly (or is dropped while established, e.g. evicted) must
        // stay resumable.
        let clean = match &self.state {
            State::Established => true,
            State::Closed(reason) => matches!(reason, CloseReason::Local | CloseReason::PeerClosed),
            State::Handshaking { .. } => false,
        };
        if clean {
            ffi::mark_shut_down(self.stream.ssl());
        }
    }
}

fn new_ssl(context: &DtlsContext) -> Result<Ssl, ConfigError> {
    let mut ssl = Ssl::new(&context.ssl)?;
    ssl.set_mtu(u32::from(context.session.mtu))?;
    ffi::install_retransmit_timer(&ssl);
    Ok(ssl)
}

/// 8-byte explicit nonce plus the shortest tag (CCM8's 8 bytes).
const MIN_AEAD_CIPHERTEXT: usize = 16;

/// The shortest valid ciphertext of a record under `suite`: explicit nonce, tag, and for the
/// handshake-less empty plaintext nothing more.
fn min_ciphertext(suite: CipherSuite) -> usize {
    match suite {
        CipherSuite::PskAes128Ccm8 | CipherSuite::EcdheEcdsaAes128Ccm8 => 8 + 8,
        _ => 8 + 16,
    }
}

fn carries_encrypted_handshake(datagram: &[u8]) -> bool {
    record::parse_records(datagram)
        .is_some_and(|records| records.iter().any(|r| r.epoch > 0 && r.content_type == ContentType::Handshake))
}

fn peer_identity(ssl: &SslRef, role: Role) -> Option<PeerIdentity> {
    if let Some(cert) = ssl.peer_certificate() {
        let common_name = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned())
            .unwrap_or_default();
        return Some(PeerIdentity::Certificate { common_name });
    }
    if role == Role::Server {
        return ssl.psk_identity().map(|id| PeerIdentity::Psk(id.to_vec()));
    }
    None
}

/// OpenSSL reports a received fatal alert as reason `SSL_AD_REASON_OFFSET + description`.
const ALERT_REASON_OFFSET: i32 = 1000;
const REASON_CERTIFICATE_VERIFY_FAILED: i32 = 134;
const REASON_PEER_DID_NOT_RETURN_A_CERTIFICATE: i32 = 199;
const REASON_PSK_IDENTITY_NOT_FOUND: i32 = 223;
const REASON_READ_TIMEOUT_EXPIRED: i32 = 312;

fn alert_in(err: &openssl::ssl::Error) -> Option<AlertDescription> {
    let stack = err.ssl_error()?;
    stack.errors().iter().find_map(|e| {
        let code = e.reason_code() - ALERT_REASON_OFFSET;
        u8::try_from(code).ok().map(AlertDescription)
    })
}

/// Names the cause of a failed handshake from OpenSSL's error queue.
fn classify_failure(ssl: &SslRef, err: Option<&openssl::ssl::Error>) -> CloseReason {
    let owned_stack;
    let stack = match err.and_then(|e| e.ssl_error()) {
        Some(stack) => stack,
        None => {
            owned_stack = openssl::error::ErrorStack::get();
            &owned_stack
        }
    };
    for e in stack.errors() {
        match e.reason_code() {
            REASON_PSK_IDENTITY_NOT_FOUND => return CloseReason::UnknownPskIdentity,
            REASON_PEER_DID_NOT_RETURN_A_CERTIFICATE => return CloseReason::NoPeerCertificate,
            REASON_READ_TIMEOUT_EXPIRED => return CloseReason::RetransmissionLimit,
            REASON_CERTIFICATE_VERIFY_FAILED => {
                let why = ssl.verify_result().error_string().to_string();
                return CloseReason::CertificateRejected(why);
            }
            code if (ALERT_REASON_OFFSET..ALERT_REASON_OFFSET + 256).contains(&code) => {
                let alert = AlertDescription((code - ALERT_REASON_OFFSET) as u8);
                if alert == AlertDescription::UNKNOWN_PSK_IDENTITY {
                    return CloseReason::UnknownPskIdentity;
                }
                return CloseReason::AlertReceived(alert);
            }
            _ => {}
        }
    }
    let text = match err {
        Some(err) => describe(err),
        None => stack.to_string(),
    };
    CloseReason::HandshakeFailed(text)
}

fn describe(err: &openssl::ssl::Error) -> String {
    match err.ssl_error() {
        Some(stack) => {
            stack.errors().iter().map(|e| e.reason().unwrap_or("unknown").to_string()).collect::<Vec<_>>().join("; ")
        }
        None => err.to_string(),
    }
}

/// The `Read + Write` OpenSSL runs on: one read yields one whole datagram (or WouldBlock),
/// one write is one datagram. Datagrams are never concatenated.
#[derive(Default)]
struct DatagramPipe {
    incoming: Option<Vec<u8>>,
    spare: Vec<u8>,
    outgoing: VecDeque<Vec<u8>>,
    next_epoch0_sequence: u64,
}

impl DatagramPipe {
    fn deliver(&mut self, datagram: &[u8]) {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.extend_from_slice(datagram);
        self.incoming = Some(buf);
    }
}

impl io::Read for DatagramPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A datagram socket has no end of stream: an empty datagram (legal on the wire) must
        // not read as Ok(0), which OpenSSL takes for EOF and a fatal error.
        let Some(datagram) = self.incoming.take().filter(|d| !d.is_empty()) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        self.spare = datagram;
        Ok(n)
    }
}

impl io::Write for DatagramPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(records) = record::parse_records(buf) {
            for r in records.iter().filter(|r| r.epoch == 0) {
                self.next_epoch0_sequence = self.next_epoch0_sequence.max(r.sequence + 1);
            }
        }
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
