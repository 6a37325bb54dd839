//! The server side for many peers on one UDP socket, sans-IO.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::DtlsContext;
use super::cookie::CookieKeys;
use super::error::{CloseReason, ConfigError, SendError};
use super::record;
use super::session::{Event, PeerIdentity, Session};

/// Names one session of an endpoint. Never reused, so a stale handle cannot reach a newer
/// session of the same peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionHandle(pub u64);

impl fmt::Display for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Limits and cookie settings of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Sessions held at once, established or handshaking. Default 10,000.
    pub max_sessions: usize,
    /// Handshakes in progress at once. Default 1,000.
    pub max_handshakes: usize,
    /// How often the cookie secret rotates. Default 60 s.
    pub cookie_rotation: Duration,
    /// Seed of the cookie secrets: OS entropy in production, fixed in tests.
    pub cookie_seed: [u8; 32],
}

impl EndpointConfig {
    /// Default limits with cookie secrets drawn from `cookie_seed`.
    pub fn new(cookie_seed: [u8; 32]) -> Self {
        Self { max_sessions: 10_000, max_handshakes: 1_000, cookie_rotation: Duration::from_secs(60), cookie_seed }
    }

    /// Sets the session limit.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Sets the handshake limit.
    pub fn max_handshakes(mut self, max: usize) -> Self {
        self.max_handshakes = max;
        self
    }

    /// Sets the cookie rotation period.
    pub fn cookie_rotation(mut self, every: Duration) -> Self {
        self.cookie_rotation = every;
        self
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTransmit {
    /// Where to.
    pub destination: SocketAddr,
    /// One whole datagram.
    pub contents: Vec<u8>,
}

/// Something that happened on the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointEvent {
    /// A handshake finished: a new authenticated session.
    Connected {
        /// The new session.
        handle: SessionHandle,
        /// Its peer.
        peer: SocketAddr,
        /// The authenticated identity.
        identity: Option<PeerIdentity>,
        /// Whether it resumed an earlier session.
        resumed: bool,
        /// The session from the same address it replaced, if any (closed with
        /// [`CloseReason::Replaced`] in a `Closed` event that follows).
        replaced: Option<SessionHandle>,
    },
    /// Application data arrived on a session.
    Data {
        /// The session.
        handle: SessionHandle,
        /// Its peer.
        peer: SocketAddr,
        /// The plaintext.
        data: Vec<u8>,
    },
    /// A session ended and is gone from the endpoint. Reported exactly once per session,
    /// including for handshakes that failed.
    Closed {
        /// The session.
        handle: SessionHandle,
        /// Its peer.
        peer: SocketAddr,
        /// Whether it had completed its handshake.
        was_established: bool,
        /// Why.
        reason: CloseReason,
    },
}

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
}

impl DropReason {
    /// Every reason, for reports.
    pub const ALL: [DropReason; 6] = [
        Self::Malformed,
        Self::UnknownPeer,
        Self::HandshakeLimit,
        Self::SessionLimit,
        Self::SessionSetupFailed,
        Self::StaleClientHello,
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
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Counters of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams handed to [`Endpoint::handle`].
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
    dropped: [u64; DropReason::ALL.len()],
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

struct Entry {
    session: Session,
    peer: SocketAddr,
    /// The ClientHello random of the handshake, to tell a retransmission from a new one.
    client_random: [u8; 32],
    /// The deadline registered in the timer heap, if any.
    timer: Option<Instant>,
    /// Whether its handshake completed.
    established: bool,
}

/// The sessions of one address: the established one and a handshake that may replace it.
#[derive(Default, Clone, Copy)]
struct PeerSlot {
    established: Option<SessionHandle>,
    handshaking: Option<SessionHandle>,
}

/// A DTLS server for many peers on one socket, with no I/O and no clock of its own.
///
/// Drive it like a [`Session`]: inputs ([`handle`](Self::handle),
/// [`handle_timeout`](Self::handle_timeout)) and commands ([`send`](Self::send),
/// [`close`](Self::close)), then drain [`poll_transmit`](Self::poll_transmit),
/// [`poll_event`](Self::poll_event) and read [`poll_timeout`](Self::poll_timeout).
///
/// A ClientHello without a valid cookie is answered with a HelloVerifyRequest computed from
/// the datagram alone: no state is kept for it. Only a ClientHello whose cookie verifies
/// (proving the sender receives at its address) creates a session, within `max_handshakes`
/// and `max_sessions`. A verified ClientHello from the address of an established session
/// starts a second handshake; the old session keeps working until that handshake completes
/// and only then is replaced (RFC 6347 §4.2.8). Every other datagram goes to the session of
/// its address or is dropped and counted.
pub struct Endpoint {
    context: Arc<DtlsContext>,
    config: EndpointConfig,
    cookies: CookieKeys,
    sessions: HashMap<SessionHandle, Entry>,
    peers: HashMap<SocketAddr, PeerSlot>,
    timers: BinaryHeap<Reverse<(Instant, SessionHandle)>>,
    next_handle: u64,
    handshakes: usize,
    transmits: VecDeque<EndpointTransmit>,
    events: VecDeque<EndpointEvent>,
    stats: EndpointStats,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("sessions", &self.sessions.len())
            .field("handshakes", &self.handshakes)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint serving sessions of the server `context`.
    pub fn new(context: Arc<DtlsContext>, config: EndpointConfig, now: Instant) -> Result<Self, ConfigError> {
        if context.role() != super::Role::Server {
            return Err(ConfigError::NoCredentials("an endpoint needs a server context"));
        }
        if config.cookie_rotation.is_zero() {
            return Err(ConfigError::InvalidDuration { name: "cookie_rotation", reason: "must be positive" });
        }
        let cookies = CookieKeys::new(config.cookie_seed, config.cookie_rotation, now);
        Ok(Self {
            context,
            config,
            cookies,
            sessions: HashMap::new(),
            peers: HashMap::new(),
            timers: BinaryHeap::new(),
            next_handle: 1,
            handshakes: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
        })
    }

    /// Sessions held, established or handshaking.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Handshakes in progress.
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes
    }

    /// Addresses with at least one session.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// The limits.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// A session, established or handshaking.
    pub fn session(&self, handle: SessionHandle) -> Option<&Session> {
        self.sessions.get(&handle).map(|e| &e.session)
    }

    /// The peer address of a session.
    pub fn peer_of(&self, handle: SessionHandle) -> Option<SocketAddr> {
        self.sessions.get(&handle).map(|e| e.peer)
    }

    /// The established session of `peer`.
    pub fn established(&self, peer: SocketAddr) -> Option<SessionHandle> {
        self.peers.get(&peer).and_then(|slot| slot.established)
    }

    /// Handles of every session, established or handshaking.
    pub fn handles(&self) -> impl Iterator<Item = SessionHandle> + '_ {
        self.sessions.keys().copied()
    }

    /// Feeds one datagram received from `from`.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        let Some(epoch) = record::first_record_epoch(datagram) else {
            self.drop_datagram(DropReason::Malformed);
            return;
        };
        if let Some(hello) = record::parse_client_hello(datagram) {
            self.handle_client_hello(now, from, datagram, &hello);
            return;
        }
        let Some(slot) = self.peers.get(&from).copied() else {
            self.drop_datagram(DropReason::UnknownPeer);
            return;
        };
        match (slot.handshaking, slot.established) {
            (Some(new), Some(old)) => {
                // During a replacement handshake the new session takes plaintext records;
                // encrypted ones may belong to either, and a session silently discards
                // records it cannot authenticate, so both see them.
                self.feed(now, new, datagram);
                if epoch > 0 {
                    self.feed(now, old, datagram);
                }
            }
            (Some(handle), None) | (None, Some(handle)) => self.feed(now, handle, datagram),
            (None, None) => self.drop_datagram(DropReason::UnknownPeer),
        }
    }

    fn handle_client_hello(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        hello: &record::ClientHello<'_>,
    ) {
        let slot = self.peers.get(&from).copied().unwrap_or_default();
        let started = |handle: Option<SessionHandle>| {
            handle.and_then(|h| self.sessions.get(&h)).is_some_and(|e| e.client_random == hello.random)
        };
        let cookie_ok = self.cookies.verify(from, hello);
        // A copy of the ClientHello that began a live session is a duplicate or a reordered
        // datagram. Answering it would either restart the client or, after the handshake,
        // open a second session that steals the client's retransmitted final flight.
        if started(slot.established) || (started(slot.handshaking) && !cookie_ok) {
            self.drop_datagram(DropReason::StaleClientHello);
            return;
        }
        if !cookie_ok {
            if !hello.cookie.is_empty() {
                self.stats.cookies_rejected += 1;
            }
            let cookie = self.cookies.issue(from, hello);
            let mut contents = Vec::new();
            record::write_hello_verify_request(hello, &cookie, &mut contents);
            self.stats.hello_verify_requests_sent += 1;
            self.transmits.push_back(EndpointTransmit { destination: from, contents });
            return;
        }
        let slot = self.peers.get(&from).copied().unwrap_or_default();
        if let Some(handle) = slot.handshaking {
            if self.sessions.get(&handle).is_some_and(|e| e.client_random == hello.random) {
                // A retransmission of the ClientHello that started this handshake.
                self.feed(now, handle, datagram);
                return;
            }
            // The client started over (it restarted mid-handshake): drop the stale attempt.
            self.remove(handle, CloseReason::HandshakeTimeout);
        }
        if self.handshakes >= self.config.max_handshakes {
            self.drop_datagram(DropReason::HandshakeLimit);
            return;
        }
        let replacing = usize::from(slot.established.is_some());
        if self.sessions.len() - replacing >= self.config.max_sessions {
            self.drop_datagram(DropReason::SessionLimit);
            return;
        }
        let session = match Session::server_after_cookie(&self.context, now, datagram, hello.cookie) {
            Ok(session) => session,
            Err(_) => {
                self.drop_datagram(DropReason::SessionSetupFailed);
                return;
            }
        };
        let handle = SessionHandle(self.next_handle);
        self.next_handle += 1;
        let mut client_random = [0u8; 32];
        client_random.copy_from_slice(hello.random);
        self.sessions.insert(handle, Entry { session, peer: from, client_random, timer: None, established: false });
        self.peers.entry(from).or_default().handshaking = Some(handle);
        self.handshakes += 1;
        self.stats.sessions_created += 1;
        self.drain(handle);
    }

    /// Runs due timers: cookie rotation, retransmissions and handshake deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.cookies.handle_timeout(now);
        while let Some(Reverse((at, handle))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.sessions.get_mut(&handle) else {
                continue;
            };
            if entry.timer != Some(at) {
                continue; // superseded
            }
            entry.timer = None;
            entry.session.handle_timeout(now);
            self.drain(handle);
        }
    }

    /// Sends application data on an established session.
    pub fn send(&mut self, now: Instant, handle: SessionHandle, data: &[u8]) -> Result<(), SendError> {
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return Err(SendError::Closed(CloseReason::Local));
        };
        let result = entry.session.send(now, data);
        self.drain(handle);
        result
    }

    /// Closes a session (close_notify if established). Its `Closed` event follows.
    pub fn close(&mut self, now: Instant, handle: SessionHandle) {
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return;
        };
        entry.session.close(now);
        self.drain(handle);
    }

    /// Closes every session, sending close_notify to each established peer.
    pub fn close_all(&mut self, now: Instant) {
        let handles: Vec<_> = self.sessions.keys().copied().collect();
        for handle in handles {
            self.close(now, handle);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<EndpointTransmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rotation = self.cookies.poll_timeout();
        let session = self.timers.peek().map(|Reverse((at, _))| *at);
        Some(session.map_or(rotation, |at| at.min(rotation)))
    }

    fn feed(&mut self, now: Instant, handle: SessionHandle, datagram: &[u8]) {
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return;
        };
        entry.session.handle_datagram(now, datagram);
        self.drain(handle);
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        self.stats.dropped[reason.index()] += 1;
    }

    /// Moves a session's outputs to the endpoint's and applies its events.
    fn drain(&mut self, handle: SessionHandle) {
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return;
        };
        let peer = entry.peer;
        while let Some(t) = entry.session.poll_transmit() {
            self.transmits.push_back(EndpointTransmit { destination: peer, contents: t.contents });
        }
        let mut closed = None;
        while let Some(event) = entry.session.poll_event() {
            match event {
                Event::Connected { resumed } => {
                    let identity = entry.session.peer_identity().cloned();
                    self.events.push_back(EndpointEvent::Connected { handle, peer, identity, resumed, replaced: None });
                }
                Event::Data(data) => self.events.push_back(EndpointEvent::Data { handle, peer, data }),
                Event::Closed { reason } => closed = Some(reason),
            }
        }
        let timer = entry.session.poll_timeout();
        if timer != entry.timer {
            entry.timer = timer;
            if let Some(at) = timer {
                self.timers.push(Reverse((at, handle)));
            }
        }
        if entry.session.is_established() && !entry.established {
            entry.established = true;
            self.promote(handle, peer);
        }
        if let Some(reason) = closed {
            self.remove(handle, reason);
        }
    }

    /// A handshake of `peer` completed: it becomes the established session, replacing the
    /// previous one.
    fn promote(&mut self, handle: SessionHandle, peer: SocketAddr) {
        let Some(slot) = self.peers.get_mut(&peer) else {
            return;
        };
        if slot.handshaking != Some(handle) {
            return;
        }
        slot.handshaking = None;
        let replaced = slot.established.replace(handle);
        self.handshakes -= 1;
        self.stats.handshakes_completed += 1;
        if let Some(EndpointEvent::Connected { replaced: r, resumed, .. }) = self
            .events
            .iter_mut()
            .rev()
            .find(|e| matches!(e, EndpointEvent::Connected { handle: h, .. } if *h == handle))
        {
            *r = replaced;
            self.stats.handshakes_resumed += u64::from(*resumed);
        }
        if let Some(old) = replaced {
            self.stats.sessions_replaced += 1;
            self.remove(old, CloseReason::Replaced);
        }
    }

    /// Removes a session exactly once and reports it.
    fn remove(&mut self, handle: SessionHandle, reason: CloseReason) {
        let Some(entry) = self.sessions.remove(&handle) else {
            return;
        };
        let peer = entry.peer;
        let was_established = entry.established;
        if let Some(slot) = self.peers.get_mut(&peer) {
            if slot.handshaking == Some(handle) {
                slot.handshaking = None;
                self.handshakes -= 1;
                self.stats.handshakes_failed += 1;
            }
            if slot.established == Some(handle) {
                slot.established = None;
            }
            if slot.handshaking.is_none() && slot.established.is_none() {
                self.peers.remove(&peer);
            }
        }
        // Tell the peer only about sessions it can still read; a replaced session's peer
        // has moved on to the new one.
        if reason != CloseReason::Replaced {
            let mut session = entry.session;
            while let Some(t) = session.poll_transmit() {
                self.transmits.push_back(EndpointTransmit { destination: peer, contents: t.contents });
            }
        }
        self.events.push_back(EndpointEvent::Closed { handle, peer, was_established, reason });
    }
}
