//! The server side for many peers on one UDP socket, sans-IO.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::cid::{cid_bytes, cid_number, CidOwner, NodeId, MAX_CID_LEN};
use super::config::DtlsContext;
use super::cookie::CookieKeys;
use super::error::{CloseReason, ConfigError, SendError};
use super::record;
use super::session::{Event, PeerIdentity, Session};

mod admission;
mod checkpoint;
mod config;
mod stats;

use admission::Admission;
pub use checkpoint::{Checkpoint, RestoreError};
pub use config::EndpointConfig;
pub use stats::{DropReason, EndpointStats};

/// Names one session of an endpoint. Never reused, so a stale handle cannot reach a newer
/// session of the same peer; in a cluster, never made by two nodes.
///
/// Its bits: the node that made it (8), that node's start count (20, see [`HandleSpace`]),
/// a counter (36: 68 billion sessions a start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionHandle(pub u64);

/// Bits of a [`SessionHandle`] that count within one start of one node.
const HANDLE_COUNTER_BITS: u32 = 36;
/// Bits of a [`SessionHandle`] that count the node's starts.
const HANDLE_BOOT_BITS: u32 = 20;

impl SessionHandle {
    /// The node that made this handle (whoever holds the session now).
    pub fn node(self) -> NodeId {
        NodeId((self.0 >> (HANDLE_COUNTER_BITS + HANDLE_BOOT_BITS)) as u8)
    }
}

/// Where an endpoint's session handles come from: the node that makes them and which of its
/// starts this is. A store counts a node's starts, so handles made after a restart, or by
/// another node, never equal one made before (a registration naming an old session never
/// reaches a new one). Default: node 0, start 0 (nothing stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandleSpace {
    /// The node.
    pub node: NodeId,
    /// Its start count (the low 20 bits are used: a million starts before they repeat).
    pub boot: u64,
}

impl HandleSpace {
    /// The first handle of the space.
    fn first(self) -> u64 {
        let boot = self.boot & ((1 << HANDLE_BOOT_BITS) - 1);
        (u64::from(self.node.0) << (HANDLE_COUNTER_BITS + HANDLE_BOOT_BITS)) | (boot << HANDLE_COUNTER_BITS) | 1
    }

    /// Whether `handle` was made in this space.
    fn holds(self, handle: SessionHandle) -> bool {
        handle.0 >> HANDLE_COUNTER_BITS == self.first() >> HANDLE_COUNTER_BITS
    }
}

impl fmt::Display for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
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

/// A datagram for a session another node holds: its first record's Connection ID names
/// `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignDatagram {
    /// The node the Connection ID names.
    pub node: NodeId,
    /// The Connection ID.
    pub cid: Vec<u8>,
    /// Where the datagram came from (the peer's address, as this node saw it).
    pub from: SocketAddr,
    /// The whole datagram.
    pub contents: Vec<u8>,
}

/// Datagrams for other nodes held until polled; beyond it they are dropped and counted.
const MAX_FOREIGN_QUEUED: usize = 4096;

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
    /// An established session's peer moved: a record carrying the session's Connection ID
    /// authenticated from a new address and was newer than every record before it (RFC
    /// 9146 §6). Records go to `to` from now on. A session another peer held at `to` is
    /// closed ([`CloseReason::Replaced`]).
    Migrated {
        /// The session.
        handle: SessionHandle,
        /// Its previous address.
        from: SocketAddr,
        /// Its new address.
        to: SocketAddr,
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

struct Entry {
    session: Session,
    peer: SocketAddr,
    /// The ClientHello random of the handshake, to tell a retransmission from a new one.
    client_random: RandomDigest,
    /// The deadline registered in the timer heap, if any.
    timer: Option<Instant>,
    /// Whether its handshake completed.
    established: bool,
    /// The Connection ID the session was given, registered for routing.
    cid: Option<u64>,
    /// Its state changed since the last checkpoint.
    dirty: bool,
    /// When its handshake began (the cookie-verified ClientHello), for admission.
    started: Instant,
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
    /// Boxed entries: the table stays dense (a few words a bucket) with 100,000 sessions.
    sessions: HashMap<SessionHandle, Box<Entry>>,
    peers: HashMap<SocketAddr, PeerSlot>,
    timers: BinaryHeap<Reverse<(Instant, SessionHandle)>>,
    /// Sessions by the Connection ID they were given (its bytes as a big-endian number).
    cids: HashMap<u64, SessionHandle>,
    cid_rng: ChaCha20Rng,
    next_handle: u64,
    handshakes: usize,
    transmits: VecDeque<EndpointTransmit>,
    foreign: VecDeque<ForeignDatagram>,
    events: VecDeque<EndpointEvent>,
    stats: EndpointStats,
    /// Sessions to checkpoint, and whether one of them is about to run out of reserved
    /// sequence numbers.
    dirty: Vec<SessionHandle>,
    checkpoint_urgent: bool,
    admission: Admission,
    /// The latest `now` an input or command gave.
    last_now: Instant,
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
        if config.connection_ids.as_ref().is_some_and(|g| !(1..=MAX_CID_LEN).contains(&g.cid_len())) {
            return Err(ConfigError::InvalidConnectionId("an endpoint's connection ids are 1 to 8 bytes (or off)"));
        }
        if config.max_handshakes == 0
            || config.max_handshakes_per_address == 0
            || config.max_handshakes_per_network == 0
        {
            return Err(ConfigError::InvalidLimit {
                name: "max_handshakes",
                reason: "every handshake limit must be positive",
            });
        }
        if config.reserved_handshakes >= config.max_handshakes {
            return Err(ConfigError::InvalidLimit {
                name: "reserved_handshakes",
                reason: "must leave unknown sources at least one handshake slot",
            });
        }
        if config.max_sessions_per_identity == 0 {
            return Err(ConfigError::InvalidLimit { name: "max_sessions_per_identity", reason: "must be positive" });
        }
        if config.stalled_handshake_timeout.is_zero() {
            return Err(ConfigError::InvalidDuration { name: "stalled_handshake_timeout", reason: "must be positive" });
        }
        if config.sequence_reservation.is_some_and(|n| n < 2) {
            return Err(ConfigError::InvalidLimit { name: "sequence_reservation", reason: "must be at least 2" });
        }
        let cookies = CookieKeys::new(config.cookie_seed, config.cookie_rotation, now);
        // Connection IDs come from their own stream, so they reveal nothing of the cookies.
        let mut cid_seed = config.cookie_seed;
        cid_seed[0] ^= 0x5a;
        let cid_rng = ChaCha20Rng::from_seed(cid_seed);
        let first_handle = config.handles.first();
        Ok(Self {
            context,
            config,
            cookies,
            sessions: HashMap::new(),
            peers: HashMap::new(),
            timers: BinaryHeap::new(),
            cids: HashMap::new(),
            cid_rng,
            next_handle: first_handle,
            handshakes: 0,
            transmits: VecDeque::new(),
            foreign: VecDeque::new(),
            events: VecDeque::new(),
            stats: EndpointStats::default(),
            dirty: Vec::new(),
            checkpoint_urgent: false,
            admission: Admission::default(),
            last_now: now,
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
        self.last_now = now;
        self.stats.datagrams_received += 1;
        if datagram.first() == Some(&record::ContentType::Tls12Cid.byte()) {
            self.handle_cid_datagram(now, from, datagram);
            return;
        }
        let cid_len = Some(usize::from(self.config.cid_len())).filter(|n| *n > 0);
        let Some(epoch) = record::first_record_epoch_with_cid(datagram, cid_len) else {
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
        if let Some(handle) = slot.handshaking {
            if let Some(entry) = self.sessions.get(&handle) {
                self.admission.heard(handle, entry.started);
            }
        }
    }

    /// An application uses session `handle` (an LwM2M endpoint registered over it): when
    /// the session table is full, sessions nobody uses are closed before it.
    pub fn bind(&mut self, handle: SessionHandle) {
        if self.sessions.get(&handle).is_some_and(|e| e.established) {
            self.admission.bound(handle);
        }
    }

    /// A datagram whose first record carries a Connection ID: routed by the CID, whatever
    /// its source address; if it authenticates as the session's newest record from a new
    /// address, the session follows its peer there. A CID another node issued is handed out
    /// ([`poll_foreign`](Self::poll_foreign)) for the cluster to forward.
    fn handle_cid_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some(generator) = self.config.connection_ids.as_ref() else {
            self.drop_datagram(DropReason::Malformed);
            return;
        };
        let Some(cid) = record::leading_cid(datagram, usize::from(generator.cid_len())) else {
            self.drop_datagram(DropReason::Malformed);
            return;
        };
        let Some(handle) = self.cids.get(&cid_number(cid)).copied() else {
            let owner = match generator.owner(cid) {
                // Another node may have adopted a session this one made (and forgot).
                CidOwner::Local if self.config.relay_unknown_own_ids => Some(self.config.handles.node),
                CidOwner::Node(node) => Some(node),
                CidOwner::Local | CidOwner::Unknown => None,
            };
            match owner {
                Some(node) if self.foreign.len() < MAX_FOREIGN_QUEUED => {
                    self.stats.foreign_records += 1;
                    let foreign = ForeignDatagram { node, cid: cid.to_vec(), from, contents: datagram.to_vec() };
                    self.foreign.push_back(foreign);
                }
                Some(_) => self.drop_datagram(DropReason::ForeignBacklog),
                None => self.drop_datagram(DropReason::UnknownConnectionId),
            }
            return;
        };
        let Some(entry) = self.sessions.get_mut(&handle) else {
            self.drop_datagram(DropReason::UnknownConnectionId);
            return;
        };
        entry.session.handle_datagram(now, datagram);
        if entry.session.advanced() {
            let moved = entry.peer != from && entry.established;
            self.mark_dirty(handle);
            if moved {
                self.migrate(handle, from);
            }
        }
        self.drain(handle);
    }

    /// Moves an established session to `to` (see [`EndpointEvent::Migrated`]).
    fn migrate(&mut self, handle: SessionHandle, to: SocketAddr) {
        let Some(entry) = self.sessions.get_mut(&handle) else { return };
        let from = std::mem::replace(&mut entry.peer, to);
        if let Some(slot) = self.peers.get_mut(&from) {
            if slot.established == Some(handle) {
                slot.established = None;
            }
            if slot.established.is_none() && slot.handshaking.is_none() {
                self.peers.remove(&from);
            }
        }
        let displaced = self.peers.entry(to).or_default().established.replace(handle);
        self.admission.moved(from.ip(), to.ip(), self.last_now);
        self.stats.migrations += 1;
        self.events.push_back(EndpointEvent::Migrated { handle, from, to });
        if let Some(other) = displaced.filter(|other| *other != handle) {
            // The address is the mover's now; whatever held it has moved on.
            self.remove(other, CloseReason::Replaced);
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
            handle
                .and_then(|h| self.sessions.get(&h))
                .is_some_and(|e| e.client_random == RandomDigest::of(hello.random))
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
            if self.sessions.get(&handle).is_some_and(|e| e.client_random == RandomDigest::of(hello.random)) {
                // A retransmission of the ClientHello that started this handshake.
                self.feed(now, handle, datagram);
                return;
            }
            // The client started over (it restarted mid-handshake): drop the stale attempt.
            self.remove(handle, CloseReason::HandshakeTimeout);
        }
        if !self.admit(now, from, hello, slot.established.is_some()) {
            return;
        }
        let cid = self.new_connection_id();
        let cid_bytes = cid.map(|c| cid_bytes(c, self.config.cid_len()));
        let session =
            match Session::server_after_cookie(&self.context, now, datagram, hello.cookie, cid_bytes.as_deref()) {
                Ok(session) => session,
                Err(_) => {
                    self.drop_datagram(DropReason::SessionSetupFailed);
                    return;
                }
            };
        if !self.config.handles.holds(SessionHandle(self.next_handle)) {
            // 2^36 sessions since this start: the space is spent until the node restarts.
            self.drop_datagram(DropReason::SessionSetupFailed);
            return;
        }
        let handle = SessionHandle(self.next_handle);
        self.next_handle += 1;
        let client_random = RandomDigest::of(hello.random);
        let entry = Entry {
            session,
            peer: from,
            client_random,
            timer: None,
            established: false,
            cid,
            dirty: false,
            started: now,
        };
        self.admission.handshake_started(handle, from.ip(), now);
        self.sessions.insert(handle, Box::new(entry));
        if let Some(cid) = cid {
            self.cids.insert(cid, handle);
        }
        self.peers.entry(from).or_default().handshaking = Some(handle);
        self.handshakes += 1;
        self.stats.sessions_created += 1;
        self.drain(handle);
    }

    /// Whether a verified ClientHello from `from` gets a session now, making room if the
    /// rules allow (see the `admission` module); counts the drop if not. `replacing`: the
    /// address has an established session the new one would replace.
    fn admit(&mut self, now: Instant, from: SocketAddr, hello: &record::ClientHello<'_>, replacing: bool) -> bool {
        let resuming = !hello.session_id.is_empty() && self.context.knows_session(hello.session_id);
        let known = resuming || self.admission.is_known(from.ip(), now);
        if !known {
            let (address, network) = self.admission.handshakes_from(from.ip());
            if address as usize >= self.config.max_handshakes_per_address
                || network as usize >= self.config.max_handshakes_per_network
            {
                self.drop_datagram(DropReason::SourceLimit);
                return false;
            }
        }
        let slots = if known {
            self.config.max_handshakes
        } else {
            self.config.max_handshakes - self.config.reserved_handshakes
        };
        if self.handshakes >= slots {
            // The oldest handshake whose client went silent yields its slot.
            match self.admission.oldest_stalled() {
                Some(stalled) => {
                    self.stats.stalled_handshakes_closed += 1;
                    self.remove(stalled, CloseReason::Evicted);
                }
                None => {
                    self.drop_datagram(DropReason::HandshakeLimit);
                    return false;
                }
            }
        }
        // At the session limit, a handshake starts only if a session nobody uses (no endpoint
        // registered over it) is left to make room when the newcomer authenticates.
        let held = self.sessions.len() - usize::from(replacing);
        let promised = held.saturating_sub(self.config.max_sessions);
        if held >= self.config.max_sessions && self.admission.unbound_count() <= promised {
            self.drop_datagram(DropReason::SessionLimit);
            return false;
        }
        true
    }

    /// Over the session limit once `handle` authenticated: the oldest sessions nobody uses
    /// make room (close_notify: their peers know to come back).
    fn make_room_for(&mut self, handle: SessionHandle) {
        while self.sessions.len() > self.config.max_sessions {
            let Some(unused) = self.admission.oldest_unbound(handle) else { return };
            let Some(entry) = self.sessions.get_mut(&unused) else { return };
            self.stats.sessions_evicted += 1;
            entry.session.close_because(self.last_now, CloseReason::Evicted);
            self.drain(unused);
        }
    }

    /// Runs due timers: cookie rotation, retransmissions and handshake deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        self.cookies.handle_timeout(now);
        if let Some(started_before) = now.checked_sub(self.config.stalled_handshake_timeout) {
            for stalled in self.admission.stalled_since(started_before) {
                self.stats.stalled_handshakes_closed += 1;
                self.remove(stalled, CloseReason::HandshakeTimeout);
            }
        }
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
        // Handshake timers leave the heap long after a burst of handshakes; its storage
        // should not stay sized for the burst.
        if self.timers.capacity() > 1024 && self.timers.len() < self.timers.capacity() / 4 {
            self.timers.shrink_to(self.timers.len() * 2);
        }
    }

    /// Sends application data on an established session.
    pub fn send(&mut self, now: Instant, handle: SessionHandle, data: &[u8]) -> Result<(), SendError> {
        self.last_now = now;
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return Err(SendError::Closed(CloseReason::Local));
        };
        let result = entry.session.send(now, data);
        if let (Some(reservation), Some((next, limit))) =
            (self.config.sequence_reservation, entry.session.write_sequence())
        {
            // Half the reservation used: extend it well before the session must wait.
            if next + reservation / 2 >= limit {
                self.checkpoint_urgent = true;
                self.mark_dirty(handle);
            }
        }
        self.drain(handle);
        result
    }

    /// Closes a session (close_notify if established). Its `Closed` event follows.
    pub fn close(&mut self, now: Instant, handle: SessionHandle) {
        self.last_now = now;
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return;
        };
        entry.session.close(now);
        self.drain(handle);
    }

    /// Forgets session `handle` without sending anything more on it: another node holds it
    /// now. It ends with [`CloseReason::HandedOver`].
    pub fn hand_over(&mut self, now: Instant, handle: SessionHandle) {
        self.last_now = now;
        self.remove(handle, CloseReason::HandedOver);
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

    /// The next datagram that arrived for a session of another node (its Connection ID
    /// names that node), to forward there with the address it came from.
    pub fn poll_foreign(&mut self) -> Option<ForeignDatagram> {
        self.foreign.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rotation = self.cookies.poll_timeout();
        let session = self.timers.peek().map(|Reverse((at, _))| *at);
        let stalled = self
            .admission
            .oldest_stalled()
            .and_then(|handle| self.sessions.get(&handle))
            .and_then(|entry| entry.started.checked_add(self.config.stalled_handshake_timeout));
        [Some(rotation), session, stalled].into_iter().flatten().min()
    }

    fn feed(&mut self, now: Instant, handle: SessionHandle, datagram: &[u8]) {
        let Some(entry) = self.sessions.get_mut(&handle) else {
            return;
        };
        entry.session.handle_datagram(now, datagram);
        if entry.session.advanced() {
            self.mark_dirty(handle);
        }
        self.drain(handle);
    }

    fn mark_dirty(&mut self, handle: SessionHandle) {
        if let Some(entry) = self.sessions.get_mut(&handle).filter(|e| !e.dirty && e.established) {
            entry.dirty = true;
            self.dirty.push(handle);
        }
    }

    /// A Connection ID no session has, if Connection IDs are on and one is found in
    /// [`CID_ATTEMPTS`] draws: with short IDs nearly all taken, the session goes without one
    /// (the client then works by address) rather than the endpoint searching forever.
    fn new_connection_id(&mut self) -> Option<u64> {
        let generator = self.config.connection_ids.as_ref()?;
        (0..CID_ATTEMPTS).map(|_| generator.generate(self.cid_rng.next_u64())).find(|cid| !self.cids.contains_key(cid))
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
        if let Some(entry) = self.sessions.get_mut(&handle) {
            self.admission.handshake_ended(handle, peer.ip(), entry.started);
            // A client that did not take the Connection ID offered: free it.
            if entry.session.connection_id().is_none() {
                if let Some(cid) = entry.cid.take() {
                    self.cids.remove(&cid);
                }
            }
            // A new session has no row yet: until its first snapshot is stored, nothing
            // restored can reuse its sequence numbers, so it may use a whole reservation.
            if let Some(reservation) = self.config.sequence_reservation {
                let next = entry.session.write_sequence().map_or(0, |(next, _)| next);
                entry.session.set_write_limit(next + reservation);
            }
        }
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
        // An identity past its share: its oldest sessions make way for the new one.
        let identity = self.sessions.get(&handle).and_then(|e| e.session.peer_identity().cloned());
        let per_identity = self.config.max_sessions_per_identity;
        for old in self.admission.established(handle, peer.ip(), identity.as_ref(), per_identity) {
            if let Some(entry) = self.sessions.get_mut(&old) {
                self.stats.sessions_evicted += 1;
                entry.session.close_because(self.last_now, CloseReason::Superseded);
                self.drain(old);
            }
        }
        self.make_room_for(handle);
    }

    /// Removes a session exactly once and reports it.
    fn remove(&mut self, handle: SessionHandle, reason: CloseReason) {
        let Some(entry) = self.sessions.remove(&handle) else {
            return;
        };
        if let Some(cid) = entry.cid {
            self.cids.remove(&cid);
        }
        let peer = entry.peer;
        let was_established = entry.established;
        if was_established {
            let identity = entry.session.peer_identity();
            self.admission.session_ended(handle, peer.ip(), identity, self.last_now);
        }
        if let Some(slot) = self.peers.get_mut(&peer) {
            if slot.handshaking == Some(handle) {
                slot.handshaking = None;
                self.handshakes -= 1;
                self.stats.handshakes_failed += 1;
                self.admission.handshake_ended(handle, peer.ip(), entry.started);
            }
            if slot.established == Some(handle) {
                slot.established = None;
            }
            if slot.handshaking.is_none() && slot.established.is_none() {
                self.peers.remove(&peer);
            }
        }
        // Tell the peer only about sessions it can still read; a replaced session's peer
        // has moved on to the new one, and a session handed over goes on at another node.
        if !matches!(reason, CloseReason::Replaced | CloseReason::HandedOver) {
            let mut session = entry.session;
            while let Some(t) = session.poll_transmit() {
                self.transmits.push_back(EndpointTransmit { destination: peer, contents: t.contents });
            }
        }
        self.events.push_back(EndpointEvent::Closed { handle, peer, was_established, reason });
    }
}

/// Random draws for a free Connection ID before a session goes without one: with 90 % of
/// the ID space taken, 64 draws all miss once in a thousand.
const CID_ATTEMPTS: usize = 64;

/// The ClientHello random of a session, folded to 8 bytes: enough to tell a copy of the
/// ClientHello that started it from a new one (the random is 28 or 32 unpredictable bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RandomDigest(u64);

impl RandomDigest {
    fn of(random: &[u8]) -> Self {
        Self(random.chunks(8).fold(0u64, |acc, chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            acc.rotate_left(17) ^ u64::from_be_bytes(word)
        }))
    }
}
