//! One DTLS 1.2 association with one peer, driven without I/O.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{Ssl, SslSession};

use super::config::{
    check_psk_identity, connection_id_index, psk_override_index, verified_cookie_index, CipherSuite, ConnectionIds,
    DtlsContext, PskKey, PskOverride, Role, VerifiedCookie,
};
use super::error::{AlertDescription, CloseReason, ConfigError, SendError};
use super::ffi;
use super::handshake::{Handshake, Progress};
use super::keys::RecordCipher;
use super::record::{self, ContentType};
use super::record_layer::{Inbound, RecordLayer, SealError};

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
    /// Retransmission timer expiries that re-sent a flight, and last flights repeated for a
    /// peer that repeated its own.
    pub retransmissions: u64,
    /// Datagrams dropped: not DTLS records, or records that did not authenticate, were
    /// replays, or belonged to no epoch of this session.
    pub datagrams_dropped: u64,
}

#[derive(Debug)]
enum State {
    Handshaking { deadline: Instant },
    Established,
    Closed(CloseReason),
}

/// Where the session's records are handled: OpenSSL during the handshake, tether's own
/// record layer after it.
enum Engine {
    Handshake(Box<Handshake>),
    Records(RecordLayer),
}

/// A DTLS 1.2 session with one peer, with no I/O and no clock of its own.
///
/// Drive it in this order: inputs ([`handle_datagram`](Self::handle_datagram),
/// [`handle_timeout`](Self::handle_timeout)) and commands ([`send`](Self::send),
/// [`close`](Self::close)); then drain every output: [`poll_transmit`](Self::poll_transmit)
/// until `None`, [`poll_event`](Self::poll_event) until `None`, and
/// [`poll_timeout`](Self::poll_timeout) to learn when to call `handle_timeout` next.
/// An early or repeated `handle_timeout` is harmless.
///
/// OpenSSL performs the handshake. Once it completes, the session's keys, sequence numbers
/// and replay window move into a compact record layer in Rust and OpenSSL's connection is
/// freed: an established session holds a few hundred bytes, can be saved
/// ([`snapshot`](Self::snapshot)) and restored after a restart, and can carry a DTLS
/// Connection ID (RFC 9146).
///
/// Input from the network never fails and never panics: datagrams that do not authenticate
/// are dropped (DTLS discards them silently). Fatal conditions end the session with a
/// sticky [`CloseReason`], reported once as [`Event::Closed`].
///
/// Time: the handshake deadline follows the `now` passed in. OpenSSL's retransmission timer
/// runs on the wall clock inside libssl; `poll_timeout` maps the time it has left onto the
/// caller's `now`, so a caller on virtual time must also let real time pass for a
/// retransmission to happen. An established session has no timer.
pub struct Session {
    engine: Engine,
    context: Arc<DtlsContext>,
    role: Role,
    state: State,
    last_now: Instant,
    outgoing: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    identity: Option<PeerIdentity>,
    resumed: bool,
    /// Restored from a snapshot, not handshaken in this process.
    restored: bool,
    /// A client's session, to offer for resumption.
    saved: Option<SslSession>,
    /// The last datagram held a record that authenticated and was the newest yet.
    advanced: bool,
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

    /// Starts a client handshake with its own PSK identity and key instead of the context's
    /// (the context must be a PSK client): a fleet of devices shares one context. Offers
    /// `saved` for resumption if given.
    pub fn client_with_psk(
        context: &Arc<DtlsContext>,
        now: Instant,
        saved: Option<&SavedSession>,
        identity: &[u8],
        key: &PskKey,
    ) -> Result<Self, ConfigError> {
        check_psk_identity(identity)?;
        let own = PskOverride { identity: identity.to_vec(), key: key.clone() };
        Self::start_client_with(context, now, saved, Some(own))
    }

    fn start_client(
        context: &Arc<DtlsContext>,
        now: Instant,
        saved: Option<&SavedSession>,
    ) -> Result<Self, ConfigError> {
        Self::start_client_with(context, now, saved, None)
    }

    fn start_client_with(
        context: &Arc<DtlsContext>,
        now: Instant,
        saved: Option<&SavedSession>,
        psk: Option<PskOverride>,
    ) -> Result<Self, ConfigError> {
        if context.role != Role::Client {
            return Err(ConfigError::NoCredentials("a client session needs a client context"));
        }
        let mut ssl = new_ssl(context)?;
        if let Some(psk) = psk {
            ssl.set_ex_data(psk_override_index(), psk);
        }
        if let Some(saved) = saved.filter(|s| Arc::ptr_eq(&s.context, context)) {
            ffi::set_session(&mut ssl, &saved.session)?;
        }
        if let Some(cid) = &context.connection_id {
            ssl.set_ex_data(connection_id_index(), ConnectionIds { ours: Some(cid.clone()), peer: None });
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
    /// With `connection_id`, the session answers a client that offers RFC 9146 Connection
    /// IDs with this one.
    pub(crate) fn server_after_cookie(
        context: &Arc<DtlsContext>,
        now: Instant,
        client_hello: &[u8],
        cookie: &[u8],
        connection_id: Option<&[u8]>,
    ) -> Result<Self, ConfigError> {
        let mut ssl = new_ssl(context)?;
        ssl.set_ex_data(verified_cookie_index(), VerifiedCookie(cookie.to_vec()));
        if let Some(cid) = connection_id {
            ssl.set_ex_data(connection_id_index(), ConnectionIds { ours: Some(cid.to_vec()), peer: None });
        }
        ssl.set_accept_state();
        let mut session = Self::with_ssl(context, ssl, Role::Server, now)?;
        session.stats.datagrams_received += 1;
        session.stats.bytes_received += client_hello.len() as u64;
        let Engine::Handshake(handshake) = &mut session.engine else {
            unreachable!("a new session is handshaking");
        };
        handshake.deliver(client_hello);
        if !ffi::listen(handshake.ssl()) {
            return Err(ConfigError::OpenSsl(openssl::error::ErrorStack::get()));
        }
        session.drive_handshake();
        Ok(session)
    }

    fn with_ssl(context: &Arc<DtlsContext>, ssl: Ssl, role: Role, now: Instant) -> Result<Self, ConfigError> {
        let mut handshake = Handshake::new(ssl, role)?;
        handshake.set_mtu(context.session.mtu);
        let deadline = now + context.session.handshake_timeout;
        Ok(Self {
            engine: Engine::Handshake(Box::new(handshake)),
            context: Arc::clone(context),
            role,
            state: State::Handshaking { deadline },
            last_now: now,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            identity: None,
            resumed: false,
            restored: false,
            saved: None,
            advanced: false,
            stats: SessionStats::default(),
        })
    }

    /// An established session from its record layer (a restored snapshot).
    pub(crate) fn established(
        context: &Arc<DtlsContext>,
        layer: RecordLayer,
        identity: Option<PeerIdentity>,
        now: Instant,
    ) -> Self {
        Self {
            role: layer.role,
            engine: Engine::Records(layer),
            context: Arc::clone(context),
            state: State::Established,
            last_now: now,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            identity,
            resumed: false,
            restored: true,
            saved: None,
            advanced: false,
            stats: SessionStats::default(),
        }
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

    /// Whether the session was restored from a snapshot ([`Session::restore`]) rather than
    /// handshaken.
    pub fn is_restored(&self) -> bool {
        self.restored
    }

    /// Whether the handshake used Extended Master Secret (RFC 7627); `None` before the
    /// handshake finished.
    pub fn uses_extended_master_secret(&self) -> Option<bool> {
        match (&self.engine, self.is_established()) {
            (Engine::Records(layer), true) => Some(layer.extended_master_secret),
            _ => None,
        }
    }

    /// The negotiated cipher suite, once the ServerHello is through.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        match &self.engine {
            Engine::Handshake(handshake) => handshake.cipher_suite(),
            Engine::Records(layer) => Some(layer.suite),
        }
    }

    /// This side's Connection ID (RFC 9146), the one the peer writes into its records, once
    /// negotiated; `None` without one.
    pub fn connection_id(&self) -> Option<&[u8]> {
        match &self.engine {
            Engine::Handshake(handshake) => handshake.connection_ids().map(|(ours, _)| ours),
            Engine::Records(layer) => Some(&*layer.recv_cid),
        }
        .filter(|cid| !cid.is_empty())
    }

    /// The peer's Connection ID, written into every record sent; `None` without one.
    pub fn peer_connection_id(&self) -> Option<&[u8]> {
        match &self.engine {
            Engine::Handshake(handshake) => handshake.connection_ids().map(|(_, peer)| peer),
            Engine::Records(layer) => Some(&*layer.send_cid),
        }
        .filter(|cid| !cid.is_empty())
    }

    /// The largest plaintext [`send`](Self::send) accepts: what fits into one record at the
    /// configured MTU with the negotiated suite. 0 until established.
    pub fn max_payload(&self) -> usize {
        match (&self.engine, self.is_established()) {
            (Engine::Records(layer), true) => layer.max_payload(),
            _ => 0,
        }
    }

    /// The session to offer for resumption in a later client handshake.
    pub fn saved_session(&self, context: &Arc<DtlsContext>) -> Option<SavedSession> {
        if !self.is_established() && self.close_reason() != Some(&CloseReason::Local) {
            return None;
        }
        let session = self.saved.clone()?;
        Some(SavedSession { session, context: Arc::clone(context) })
    }

    /// Traffic counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Feeds one datagram received from the peer.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        self.last_now = now;
        self.advanced = false;
        if self.is_closed() {
            return;
        }
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        match &self.engine {
            Engine::Handshake(_) => self.handshake_datagram(datagram),
            Engine::Records(_) => self.records_datagram(datagram),
        }
    }

    /// Runs the timers: the handshake deadline and OpenSSL's retransmission timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        match self.state {
            State::Handshaking { deadline } if now >= deadline => {
                self.set_closed(CloseReason::HandshakeTimeout);
                return;
            }
            State::Handshaking { .. } => {}
            State::Established | State::Closed(_) => return,
        }
        let Engine::Handshake(handshake) = &mut self.engine else { return };
        match handshake.handle_timeout(&mut self.outgoing) {
            Ok(true) => self.stats.retransmissions += 1,
            Ok(false) => {}
            Err(reason) => self.set_closed(reason),
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
        let Engine::Records(layer) = &mut self.engine else {
            return Err(SendError::NotEstablished);
        };
        match layer.seal_application_data(plaintext) {
            Ok(record) => {
                self.outgoing.push_back(record);
                Ok(())
            }
            Err(SealError::ReservationExhausted) => Err(SendError::SequenceReservation),
            Err(SealError::SequenceExhausted) => {
                let reason = CloseReason::Protocol("record sequence numbers exhausted".into());
                self.set_closed(reason.clone());
                Err(SendError::Closed(reason))
            }
        }
    }

    /// Closes the session: sends close_notify if established. Idempotent.
    pub fn close(&mut self, now: Instant) {
        self.close_because(now, CloseReason::Local);
    }

    /// [`close`](Self::close), with the reason the close is reported with.
    pub(crate) fn close_because(&mut self, now: Instant, reason: CloseReason) {
        self.last_now = now;
        if self.is_closed() {
            return;
        }
        let established = self.is_established();
        if let (Engine::Records(layer), true) = (&mut self.engine, established) {
            // Past the reserved sequence numbers no record may go out; the peer learns of the
            // end from its idle timeout instead.
            if let Ok(record) = layer.seal_close_notify() {
                self.outgoing.push_back(record);
            }
        }
        self.set_closed(reason);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let contents = self.outgoing.pop_front()?;
        if self.outgoing.is_empty() {
            // An idle session holds no buffer: thousands of them wait between requests.
            self.outgoing.shrink_to_fit();
        }
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += contents.len() as u64;
        Some(Transmit { contents })
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let State::Handshaking { deadline } = self.state else {
            return None;
        };
        let retransmit = self.retransmit_timer_remaining().map(|left| self.last_now + left);
        Some(retransmit.map_or(deadline, |at| at.min(deadline)))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        if self.events.is_empty() {
            self.events.shrink_to_fit();
        }
        Some(event)
    }

    /// Time OpenSSL's retransmission timer has left on the wall clock, if it runs. For
    /// drivers on virtual time that must let real time pass before a retransmission.
    pub fn retransmit_timer_remaining(&self) -> Option<Duration> {
        match (&self.engine, self.is_handshaking()) {
            (Engine::Handshake(handshake), true) => handshake.retransmit_timer(),
            _ => None,
        }
    }

    /// Whether the last datagram held a record that authenticated and was newer than every
    /// record before it (RFC 9146 §6: the condition to follow the peer to a new address).
    pub(crate) fn advanced(&self) -> bool {
        self.advanced
    }

    /// The record layer of an established session.
    pub(crate) fn record_layer(&self) -> Option<&RecordLayer> {
        match &self.engine {
            Engine::Records(layer) => Some(layer),
            Engine::Handshake(_) => None,
        }
    }

    pub(crate) fn record_layer_mut(&mut self) -> Option<&mut RecordLayer> {
        match &mut self.engine {
            Engine::Records(layer) => Some(layer),
            Engine::Handshake(_) => None,
        }
    }

    pub(crate) fn context(&self) -> &Arc<DtlsContext> {
        &self.context
    }

    /// A datagram during the handshake: to OpenSSL, in runs of records it can read, with the
    /// peer's `tls12_cid` records turned into plain ones; what follows the completion of the
    /// handshake in the same datagram goes to the record layer.
    fn handshake_datagram(&mut self, datagram: &[u8]) {
        let Engine::Handshake(handshake) = &self.engine else { return };
        let cid_len = handshake.expected_cid_len();
        let Some(records) = record::parse_records_with_cid(datagram, cid_len) else {
            self.stats.datagrams_dropped += 1;
            return;
        };
        if !self.is_plausible(&records) {
            self.stats.datagrams_dropped += 1;
            return;
        }
        let mut run: Vec<u8> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if !self.is_handshaking() {
                // Established (or failed) mid-datagram: the rest is for the record layer.
                if self.is_established() {
                    let rest: Vec<u8> = records[i..].iter().flat_map(|r| r.raw.iter().copied()).collect();
                    self.records_datagram(&rest);
                }
                return;
            }
            if r.content_type != ContentType::Tls12Cid {
                run.extend_from_slice(r.raw);
                continue;
            }
            if !run.is_empty() {
                self.feed_openssl(&std::mem::take(&mut run));
            }
            let Engine::Handshake(handshake) = &self.engine else { return };
            match handshake.translate_incoming(r) {
                Some(plain) if self.is_handshaking() => self.feed_openssl(&plain),
                _ => self.stats.datagrams_dropped += 1,
            }
        }
        if !run.is_empty() && self.is_handshaking() {
            self.feed_openssl(&run);
        }
    }

    /// Whether records are worth handing to OpenSSL: no encrypted record shorter than the
    /// AEAD's explicit nonce plus tag. OpenSSL 3.0 treats such a short record as a fatal
    /// error instead of discarding it, so one spoofed 21-byte datagram could otherwise end
    /// a handshake.
    fn is_plausible(&self, records: &[record::Record<'_>]) -> bool {
        let min = self.cipher_suite().map_or(MIN_AEAD_CIPHERTEXT, |s| RecordCipher::of(s).min_fragment());
        records.iter().all(|r| r.epoch == 0 || r.fragment.len() >= min)
    }

    fn feed_openssl(&mut self, chunk: &[u8]) {
        let Engine::Handshake(handshake) = &mut self.engine else { return };
        handshake.deliver(chunk);
        let carried_finished = carries_encrypted_handshake(chunk);
        self.drive_handshake();
        let handshaking = self.is_handshaking();
        if let Engine::Handshake(handshake) = &mut self.engine {
            handshake.clear_input();
            if carried_finished && handshaking && handshake.awaits_finished() {
                // The peer's Finished arrived and OpenSSL discarded it: it did not decrypt,
                // so the two sides derived different keys. DTLS would stay silent until the
                // deadline; name the cause now and tell the peer (RFC 6347 §4.1.2.7).
                let alert = handshake.fatal_alert(AlertDescription::DECRYPT_ERROR);
                self.outgoing.push_back(alert);
                self.set_closed(CloseReason::KeyMismatch);
            }
        }
    }

    fn drive_handshake(&mut self) {
        let Engine::Handshake(handshake) = &mut self.engine else { return };
        let sent_before = self.outgoing.len();
        match handshake.drive(&mut self.outgoing) {
            Progress::Continue => {}
            Progress::Failed(reason) => self.set_closed(reason),
            Progress::Complete => {
                let sent_last_flight = self.outgoing.len() > sent_before;
                self.hand_off(sent_last_flight);
            }
        }
    }

    /// The handshake completed: read what OpenSSL buffered behind it, then move the session
    /// into the record layer and free OpenSSL's connection.
    fn hand_off(&mut self, sent_last_flight: bool) {
        let Engine::Handshake(handshake) = &mut self.engine else { return };
        let (data, closed) = handshake.drain();
        if let Some(reason) = closed {
            self.set_closed(reason);
            return;
        }
        match handshake.finish(self.context.session.mtu, sent_last_flight) {
            Ok(hand_off) => {
                if let Some((id, der)) = hand_off.resumption {
                    self.context.insert_resumption_entry(&id, der);
                }
                self.engine = Engine::Records(hand_off.layer);
                self.identity = hand_off.identity;
                self.resumed = hand_off.resumed;
                self.saved = hand_off.saved;
                self.state = State::Established;
                self.events.push_back(Event::Connected { resumed: self.resumed });
                self.events.extend(data.into_iter().map(Event::Data));
            }
            Err(reason) => self.set_closed(reason),
        }
    }

    fn records_datagram(&mut self, datagram: &[u8]) {
        let Engine::Records(layer) = &mut self.engine else { return };
        let mut inbound = Vec::new();
        let mut again = Vec::new();
        let outcome = layer.handle_datagram(datagram, &mut inbound, &mut again);
        self.advanced = outcome.advanced;
        if outcome.dropped > 0 && inbound.is_empty() && !outcome.advanced {
            self.stats.datagrams_dropped += 1;
        }
        if outcome.retransmitted {
            self.stats.retransmissions += 1;
            self.outgoing.extend(again);
        }
        for item in inbound {
            match item {
                Inbound::Data(data) => self.events.push_back(Event::Data(data)),
                Inbound::CloseNotify => {
                    // Answer close_notify with ours, then end.
                    if let Engine::Records(layer) = &mut self.engine {
                        if let Ok(record) = layer.seal_close_notify() {
                            self.outgoing.push_back(record);
                        }
                    }
                    self.set_closed(CloseReason::PeerClosed);
                    return;
                }
                Inbound::FatalAlert(alert) => {
                    // A session ended by a fatal alert must not be resumed (RFC 5246 §7.2.2).
                    if let Engine::Records(layer) = &self.engine {
                        self.context.forget_resumption_entry(layer.session_id());
                    }
                    self.set_closed(CloseReason::AlertReceived(alert));
                    return;
                }
            }
        }
    }

    fn set_closed(&mut self, reason: CloseReason) {
        if self.is_closed() {
            return;
        }
        self.events.push_back(Event::Closed { reason: reason.clone() });
        self.state = State::Closed(reason);
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

fn carries_encrypted_handshake(datagram: &[u8]) -> bool {
    record::parse_records(datagram)
        .is_some_and(|records| records.iter().any(|r| r.epoch > 0 && r.content_type == ContentType::Handshake))
}
