//! One peer's CoAP message layer (RFC 7252 §4, RFC 7641 notifications), sans-IO.
//!
//! Drive it like tether's other state machines: inputs [`MessageLayer::handle_datagram`] and
//! [`MessageLayer::handle_timeout`], commands [`MessageLayer::request`] and
//! [`MessageLayer::respond`], then drain [`MessageLayer::poll_transmit`],
//! [`MessageLayer::poll_event`] and read [`MessageLayer::poll_timeout`].
//!
//! Over DTLS one layer serves one session: message IDs, tokens and the deduplication cache
//! are per peer.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::small_map::SmallMap;

/// Transmission parameters (RFC 7252 §4.8).
#[derive(Debug, Clone, PartialEq)]
pub struct CoapConfig {
    /// ACK_TIMEOUT. Default 2 s.
    pub ack_timeout: Duration,
    /// ACK_RANDOM_FACTOR. Default 1.5.
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT. Default 4.
    pub max_retransmit: u32,
    /// EXCHANGE_LIFETIME: how long message IDs are remembered for deduplication. Default 247 s.
    pub exchange_lifetime: Duration,
    /// How long a request waits for its response in all (a separate response included).
    /// Default 93 s (MAX_TRANSMIT_WAIT).
    pub request_timeout: Duration,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            exchange_lifetime: Duration::from_secs(247),
            request_timeout: Duration::from_secs(93),
        }
    }
}

/// Identifies one of our requests (its 8-byte token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

impl Token {
    fn bytes(self) -> Vec<u8> {
        self.0.to_be_bytes().to_vec()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(u64::from_be_bytes(bytes.try_into().ok()?)))
    }
}

/// A request from the peer, to answer with [`MessageLayer::respond`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingRequest {
    message_id: u16,
    token: Vec<u8>,
    confirmable: bool,
}

impl IncomingRequest {
    /// The peer's token (what its notifications and cancellations are keyed by).
    pub fn token(&self) -> &[u8] {
        &self.token
    }
}

/// Why one of our requests failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestFailure {
    /// No acknowledgement after MAX_RETRANSMIT retransmissions, or no response in time.
    #[error("request timed out")]
    Timeout,
    /// The peer rejected the message with a reset.
    #[error("peer reset the request")]
    Reset,
    /// Cancelled locally.
    #[error("request cancelled")]
    Cancelled,
}

/// A command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoapError {
    /// The message could not be encoded (too large for one datagram, bad option).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The request was already answered.
    #[error("request already answered")]
    AlreadyAnswered,
}

/// Something that happened on the layer.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CoapEvent {
    /// The peer sent a request (duplicates are filtered out).
    Request {
        /// Answer with this.
        id: IncomingRequest,
        /// The request.
        request: Packet,
    },
    /// The response to one of our requests.
    Response {
        /// Our request.
        token: Token,
        /// The response.
        response: Packet,
    },
    /// A later notification of an observation established by one of our requests.
    Notification {
        /// The observing request.
        token: Token,
        /// The notification.
        response: Packet,
    },
    /// The peer rejected one of our notifications with a reset: it no longer observes
    /// (RFC 7641 §3.6). Stop notifying on `token`.
    ObservationCancelled {
        /// The observation's token (the peer's).
        token: Vec<u8>,
    },
    /// One of our requests failed.
    RequestFailed {
        /// Our request.
        token: Token,
        /// Why.
        reason: RequestFailure,
    },
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoapStats {
    /// Datagrams that did not parse as CoAP.
    pub malformed: u64,
    /// Duplicate messages filtered out.
    pub duplicates: u64,
    /// Confirmable messages retransmitted.
    pub retransmissions: u64,
    /// Resets sent.
    pub resets_sent: u64,
}

struct Outgoing {
    datagram: Vec<u8>,
    token: Option<Token>,
    /// The peer's token, for notifications we sent.
    notification: Option<Vec<u8>>,
    retransmits: u32,
    timeout: Duration,
    next_at: Instant,
}

struct Pending {
    observe: bool,
    deadline: Instant,
    answered: bool,
}

struct Seen {
    message_id: u16,
    expires: Instant,
    response: Option<Box<[u8]>>,
}

/// Message IDs remembered per peer for deduplication. A device sends far fewer within
/// EXCHANGE_LIFETIME; a peer that sends more loses deduplication of its oldest, not the
/// server its memory.
pub const MAX_REMEMBERED: usize = 1024;

/// One peer's message layer. See the module docs.
pub struct MessageLayer {
    /// Shared by every peer's layer of a server.
    config: std::sync::Arc<CoapConfig>,
    /// Message IDs, tokens and retransmission jitter: nothing secret (the DTLS session
    /// authenticates every message), so a small fast generator (32 bytes per peer).
    rng: SmallRng,
    next_message_id: u16,
    outgoing: SmallMap<u16, Outgoing>,
    pending: SmallMap<Token, Pending>,
    observations: SmallMap<Token, ()>,
    /// Message IDs received within EXCHANGE_LIFETIME, oldest first (all expire after the
    /// same lifetime), with the answer sent; at most [`MAX_REMEMBERED`].
    seen: VecDeque<Seen>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<CoapEvent>,
    stats: CoapStats,
}

impl std::fmt::Debug for MessageLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageLayer")
            .field("outgoing", &self.outgoing.len())
            .field("pending", &self.pending.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl MessageLayer {
    /// A layer whose message IDs, tokens and retransmission jitter draw from `seed`.
    pub fn new(config: impl Into<std::sync::Arc<CoapConfig>>, seed: u64) -> Self {
        let config = config.into();
        let mut rng = SmallRng::seed_from_u64(seed);
        let next_message_id = rng.gen();
        Self {
            config,
            rng,
            next_message_id,
            outgoing: SmallMap::default(),
            pending: SmallMap::default(),
            observations: SmallMap::default(),
            seen: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: CoapStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> CoapStats {
        self.stats
    }

    /// Requests awaiting their response.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Observations established and not cancelled.
    pub fn observations(&self) -> usize {
        self.observations.len()
    }

    /// Sends a request (its code, options and payload as given; type, message ID and token
    /// are set here). `observe` keeps the token open for notifications after the response.
    pub fn request(
        &mut self,
        now: Instant,
        mut request: Packet,
        confirmable: bool,
        observe: bool,
    ) -> Result<Token, CoapError> {
        let token = Token(self.rng.gen());
        request.set_token(token.bytes());
        request.header.set_type(if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable });
        let message_id = self.message_id();
        request.header.message_id = message_id;
        let datagram = request.to_bytes().map_err(|e| CoapError::Encode(e.to_string()))?;
        if confirmable {
            self.send_confirmable(now, message_id, datagram, Some(token));
        } else {
            self.transmits.push_back(datagram);
        }
        self.pending.insert(token, Pending { observe, deadline: now + self.config.request_timeout, answered: false });
        Ok(token)
    }

    /// Forgets a request or an observation; a later response or notification for it is
    /// answered with a reset (RFC 7641 §3.6).
    pub fn cancel(&mut self, token: Token) {
        self.pending.remove(&token);
        self.observations.remove(&token);
        self.outgoing.retain(|_, o| o.token != Some(token));
    }

    /// Answers a request: piggybacked on the ACK of a confirmable request, else as a
    /// non-confirmable response. The answer is remembered and sent again if the request is
    /// repeated within EXCHANGE_LIFETIME.
    pub fn respond(&mut self, _now: Instant, id: &IncomingRequest, mut response: Packet) -> Result<(), CoapError> {
        let Some(seen) = self.seen.iter().find(|s| s.message_id == id.message_id) else {
            return Err(CoapError::AlreadyAnswered);
        };
        if seen.response.is_some() {
            return Err(CoapError::AlreadyAnswered);
        }
        response.set_token(id.token.clone());
        if id.confirmable {
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = id.message_id;
        } else {
            response.header.set_type(MessageType::NonConfirmable);
            response.header.message_id = self.message_id();
        }
        let datagram = response.to_bytes().map_err(|e| CoapError::Encode(e.to_string()))?;
        if let Some(seen) = self.seen.iter_mut().find(|s| s.message_id == id.message_id) {
            seen.response = Some(datagram.clone().into_boxed_slice());
        }
        self.transmits.push_back(datagram);
        Ok(())
    }

    /// Sends a notification (RFC 7641) for an observation the peer opened with the request
    /// `observed` (answered with an Observe option): `response` should carry the next Observe
    /// sequence number. A confirmable notification is retransmitted until acknowledged; a
    /// reset cancels the observation ([`CoapEvent::ObservationCancelled`]).
    pub fn notify(
        &mut self,
        now: Instant,
        observed: &IncomingRequest,
        mut response: Packet,
        confirmable: bool,
    ) -> Result<(), CoapError> {
        response.set_token(observed.token.clone());
        response.header.set_type(if confirmable { MessageType::Confirmable } else { MessageType::NonConfirmable });
        let message_id = self.message_id();
        response.header.message_id = message_id;
        let datagram = response.to_bytes().map_err(|e| CoapError::Encode(e.to_string()))?;
        if confirmable {
            self.send_confirmable(now, message_id, datagram, None);
            if let Some(out) = self.outgoing.get_mut(&message_id) {
                out.notification = Some(observed.token.clone());
            }
        } else {
            self.transmits.push_back(datagram);
        }
        Ok(())
    }

    /// Feeds one datagram from the peer. Never fails: what does not parse is counted (and a
    /// confirmable message whose header is readable is answered with a reset).
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let packet = match Packet::from_bytes(datagram) {
            Ok(packet) => packet,
            Err(_) => {
                self.stats.malformed += 1;
                if datagram.len() >= 4 && datagram[0] >> 6 == 1 && (datagram[0] >> 4) & 0b11 == 0 {
                    self.reset(u16::from_be_bytes([datagram[2], datagram[3]]));
                }
                return;
            }
        };
        let message_id = packet.header.message_id;
        match (packet.header.get_type(), packet.header.code) {
            (MessageType::Reset, _) => self.on_reset(message_id),
            (MessageType::Acknowledgement, MessageClass::Empty) => self.on_empty_ack(message_id),
            (MessageType::Confirmable, MessageClass::Empty) => self.reset(message_id), // CoAP ping
            (MessageType::Acknowledgement, MessageClass::Response(_)) => {
                self.on_empty_ack(message_id);
                self.on_response(now, packet);
            }
            (kind @ (MessageType::Confirmable | MessageType::NonConfirmable), MessageClass::Request(_)) => {
                if self.is_duplicate(now, message_id) {
                    return;
                }
                let id = IncomingRequest {
                    message_id,
                    token: packet.get_token().to_vec(),
                    confirmable: kind == MessageType::Confirmable,
                };
                self.events.push_back(CoapEvent::Request { id, request: packet });
            }
            (kind @ (MessageType::Confirmable | MessageType::NonConfirmable), MessageClass::Response(_)) => {
                let confirmable = kind == MessageType::Confirmable;
                if self.is_duplicate(now, message_id) {
                    return;
                }
                let known = Token::from_bytes(packet.get_token())
                    .is_some_and(|t| self.pending.contains_key(&t) || self.observations.contains_key(&t));
                if !known {
                    // A response nobody waits for (a cancelled observation): reject it, so
                    // the peer stops notifying (RFC 7641 §3.6), NON included.
                    self.reset(message_id);
                    return;
                }
                if confirmable {
                    self.ack(message_id);
                }
                self.on_response(now, packet);
            }
            _ => self.stats.malformed += 1,
        }
    }

    /// Retransmits due confirmable messages, fails requests that ran out of time, forgets
    /// old message IDs.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u16> = self.outgoing.iter().filter(|(_, o)| o.next_at <= now).map(|(id, _)| *id).collect();
        for message_id in due {
            let Some(out) = self.outgoing.get_mut(&message_id) else {
                continue;
            };
            if out.retransmits >= self.config.max_retransmit {
                let token = out.token;
                self.outgoing.remove(&message_id);
                if let Some(token) = token {
                    self.fail(token, RequestFailure::Timeout);
                }
                continue;
            }
            out.retransmits += 1;
            out.timeout *= 2;
            out.next_at = now + out.timeout;
            self.stats.retransmissions += 1;
            self.transmits.push_back(out.datagram.clone());
        }
        let expired: Vec<Token> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now && !p.answered).map(|(t, _)| *t).collect();
        for token in expired {
            self.outgoing.retain(|_, o| o.token != Some(token));
            self.fail(token, RequestFailure::Timeout);
        }
        while self.seen.front().is_some_and(|s| s.expires <= now) {
            self.seen.pop_front();
        }
        if self.seen.is_empty() {
            self.seen.shrink_to_fit();
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let datagram = self.transmits.pop_front();
        if self.transmits.is_empty() {
            // Thousands of layers wait idle between exchanges: none keeps a buffer.
            self.transmits.shrink_to_fit();
        }
        datagram
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<CoapEvent> {
        let event = self.events.pop_front();
        if self.events.is_empty() {
            self.events.shrink_to_fit();
        }
        event
    }

    /// When `handle_timeout` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retransmit = self.outgoing.values().map(|o| o.next_at).min();
        let deadline = self.pending.values().filter(|p| !p.answered).map(|p| p.deadline).min();
        let forget = self.seen.front().map(|s| s.expires);
        [retransmit, deadline, forget].into_iter().flatten().min()
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        id
    }

    fn send_confirmable(&mut self, now: Instant, message_id: u16, datagram: Vec<u8>, token: Option<Token>) {
        let factor = 1.0 + self.rng.gen::<f64>() * (self.config.ack_random_factor - 1.0).max(0.0);
        let timeout = self.config.ack_timeout.mul_f64(factor);
        self.transmits.push_back(datagram.clone());
        self.outgoing.insert(
            message_id,
            Outgoing { datagram, token, notification: None, retransmits: 0, timeout, next_at: now + timeout },
        );
    }

    fn is_duplicate(&mut self, now: Instant, message_id: u16) -> bool {
        if let Some(seen) = self.seen.iter().find(|s| s.message_id == message_id) {
            self.stats.duplicates += 1;
            if let Some(response) = &seen.response {
                self.transmits.push_back(response.to_vec());
            }
            return true;
        }
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.pop_front();
        }
        if self.seen.is_empty() {
            // Most peers have one exchange open at a time: room for exactly that.
            self.seen.reserve_exact(1);
        }
        let expires = now + self.config.exchange_lifetime;
        self.seen.push_back(Seen { message_id, expires, response: None });
        false
    }

    fn on_empty_ack(&mut self, message_id: u16) {
        self.outgoing.remove(&message_id);
    }

    fn on_reset(&mut self, message_id: u16) {
        if let Some(out) = self.outgoing.remove(&message_id) {
            if let Some(token) = out.token {
                self.fail(token, RequestFailure::Reset);
            }
            if let Some(token) = out.notification {
                self.events.push_back(CoapEvent::ObservationCancelled { token });
            }
        }
    }

    fn on_response(&mut self, _now: Instant, response: Packet) {
        let Some(token) = Token::from_bytes(response.get_token()) else {
            return;
        };
        if self.observations.contains_key(&token) {
            self.events.push_back(CoapEvent::Notification { token, response });
            return;
        }
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        self.outgoing.retain(|_, o| o.token != Some(token));
        let observing = pending.observe
            && response.get_first_option(CoapOption::Observe).is_some()
            && matches!(response.header.code, MessageClass::Response(r) if !r.is_error());
        if observing {
            self.observations.insert(token, ());
        }
        self.events.push_back(CoapEvent::Response { token, response });
    }

    fn fail(&mut self, token: Token, reason: RequestFailure) {
        if self.pending.remove(&token).is_some() {
            self.events.push_back(CoapEvent::RequestFailed { token, reason });
        }
    }

    fn ack(&mut self, message_id: u16) {
        self.transmits.push_back(empty(MessageType::Acknowledgement, message_id));
    }

    fn reset(&mut self, message_id: u16) {
        self.stats.resets_sent += 1;
        self.transmits.push_back(empty(MessageType::Reset, message_id));
    }
}

fn empty(kind: MessageType, message_id: u16) -> Vec<u8> {
    let kind = match kind {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    };
    let [hi, lo] = message_id.to_be_bytes();
    vec![0x40 | (kind << 4), 0x00, hi, lo]
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;
    use coap_lite::{RequestType, ResponseType};

    fn get(path: &str) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(RequestType::Get);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p
    }

    fn content(payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Response(ResponseType::Content);
        p.payload = payload.to_vec();
        p
    }

    fn answer_all(now: Instant, server: &mut MessageLayer, payload: &[u8]) -> usize {
        let mut n = 0;
        while let Some(CoapEvent::Request { id, .. }) = server.poll_event() {
            server.respond(now, &id, content(payload)).unwrap();
            n += 1;
        }
        n
    }

    #[test]
    fn a_piggybacked_response_completes_a_request() {
        let now = Instant::now();
        let (mut client, mut server) =
            (MessageLayer::new(CoapConfig::default(), 1), MessageLayer::new(CoapConfig::default(), 2));
        let token = client.request(now, get("/3/0/0"), true, false).unwrap();
        server.handle_datagram(now, &client.poll_transmit().unwrap());
        assert_eq!(answer_all(now, &mut server, b"tether"), 1);
        client.handle_datagram(now, &server.poll_transmit().unwrap());
        match client.poll_event() {
            Some(CoapEvent::Response { token: t, response }) => {
                assert_eq!(t, token);
                assert_eq!(response.payload, b"tether");
                assert_eq!(response.header.get_type(), MessageType::Acknowledgement);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(client.pending_requests(), 0);
        assert_eq!(client.poll_timeout(), None, "nothing left to retransmit, wait for or forget");
    }

    #[test]
    fn a_lost_request_is_retransmitted_with_doubling_timeouts_then_fails() {
        let now = Instant::now();
        let mut client = MessageLayer::new(CoapConfig::default(), 3);
        let token = client.request(now, get("/3/0/0"), true, false).unwrap();
        let first = client.poll_transmit().unwrap();
        let mut at = client.poll_timeout().unwrap();
        let initial = at - now;
        assert!(initial >= Duration::from_secs(2) && initial <= Duration::from_secs(3), "{initial:?}");
        let mut gaps = vec![initial];
        for _ in 0..4 {
            client.handle_timeout(at);
            assert_eq!(client.poll_transmit().as_deref(), Some(&first[..]), "the same message again");
            let next = client.poll_timeout().unwrap();
            gaps.push(next - at);
            at = next;
        }
        for pair in gaps.windows(2) {
            assert_eq!(pair[1], pair[0] * 2);
        }
        client.handle_timeout(at);
        assert!(client.poll_transmit().is_none(), "MAX_RETRANSMIT reached");
        assert_eq!(client.poll_event(), Some(CoapEvent::RequestFailed { token, reason: RequestFailure::Timeout }));
        assert_eq!(client.stats().retransmissions, 4);
    }

    #[test]
    fn a_duplicated_request_is_handled_once_and_answered_again() {
        let now = Instant::now();
        let (mut client, mut server) =
            (MessageLayer::new(CoapConfig::default(), 4), MessageLayer::new(CoapConfig::default(), 5));
        client.request(now, get("/3/0/4"), true, false).unwrap();
        let request = client.poll_transmit().unwrap();
        server.handle_datagram(now, &request);
        assert_eq!(answer_all(now, &mut server, b"executed"), 1);
        let response = server.poll_transmit().unwrap();
        // The ACK was lost; the client repeats the request.
        server.handle_datagram(now + Duration::from_secs(2), &request);
        assert!(server.poll_event().is_none(), "not delivered twice (an Execute must not run twice)");
        assert_eq!(server.poll_transmit(), Some(response), "the cached response goes out again");
        assert_eq!(server.stats().duplicates, 1);
        // Forgotten after EXCHANGE_LIFETIME.
        server.handle_timeout(now + Duration::from_secs(248));
        server.handle_datagram(now + Duration::from_secs(248), &request);
        assert!(matches!(server.poll_event(), Some(CoapEvent::Request { .. })));
    }

    #[test]
    fn a_separate_response_is_acknowledged_and_delivered() {
        let now = Instant::now();
        let (mut client, mut server) =
            (MessageLayer::new(CoapConfig::default(), 6), MessageLayer::new(CoapConfig::default(), 7));
        let token = client.request(now, get("/3/0/0"), true, false).unwrap();
        let request = Packet::from_bytes(&client.poll_transmit().unwrap()).unwrap();
        // The peer acknowledges at once (empty ACK) and answers later in a CON of its own.
        client.handle_datagram(now, &empty(MessageType::Acknowledgement, request.header.message_id));
        client.handle_timeout(now + Duration::from_secs(5));
        assert!(client.poll_transmit().is_none(), "acknowledged: no retransmission");
        let mut separate = content(b"later");
        separate.header.set_type(MessageType::Confirmable);
        separate.header.message_id = 999;
        separate.set_token(request.get_token().to_vec());
        client.handle_datagram(now + Duration::from_secs(6), &separate.to_bytes().unwrap());
        assert_eq!(client.poll_transmit(), Some(empty(MessageType::Acknowledgement, 999)));
        assert!(matches!(client.poll_event(), Some(CoapEvent::Response { token: t, .. }) if t == token));
        let _ = &mut server;
    }

    #[test]
    fn observe_notifications_flow_until_cancelled_then_are_reset() {
        let now = Instant::now();
        let mut client = MessageLayer::new(CoapConfig::default(), 8);
        let mut observe = get("/3/0/9");
        observe.set_observe_value(0);
        let token = client.request(now, observe, true, true).unwrap();
        let request = Packet::from_bytes(&client.poll_transmit().unwrap()).unwrap();
        let notify = |seq: u32, mid: u16, kind: MessageType, payload: &[u8]| {
            let mut n = content(payload);
            n.set_observe_value(seq);
            n.header.set_type(kind);
            n.header.message_id = mid;
            n.set_token(request.get_token().to_vec());
            n.to_bytes().unwrap()
        };
        let first = notify(1, request.header.message_id, MessageType::Acknowledgement, b"90");
        client.handle_datagram(now, &first);
        assert!(matches!(client.poll_event(), Some(CoapEvent::Response { token: t, .. }) if t == token));
        assert_eq!(client.observations(), 1);
        client.handle_datagram(now, &notify(2, 500, MessageType::Confirmable, b"89"));
        assert_eq!(client.poll_transmit(), Some(empty(MessageType::Acknowledgement, 500)));
        assert!(
            matches!(client.poll_event(), Some(CoapEvent::Notification { token: t, response }) if t == token && response.payload == b"89")
        );
        client.handle_datagram(now, &notify(3, 501, MessageType::NonConfirmable, b"88"));
        assert!(matches!(client.poll_event(), Some(CoapEvent::Notification { .. })));
        client.cancel(token);
        client.handle_datagram(now, &notify(4, 502, MessageType::Confirmable, b"87"));
        assert_eq!(client.poll_transmit(), Some(empty(MessageType::Reset, 502)), "a cancelled observation is reset");
        assert!(client.poll_event().is_none());
    }

    #[test]
    fn a_reset_fails_the_request_and_pings_are_answered() {
        let now = Instant::now();
        let mut client = MessageLayer::new(CoapConfig::default(), 9);
        let token = client.request(now, get("/x"), true, false).unwrap();
        let request = Packet::from_bytes(&client.poll_transmit().unwrap()).unwrap();
        client.handle_datagram(now, &empty(MessageType::Reset, request.header.message_id));
        assert_eq!(client.poll_event(), Some(CoapEvent::RequestFailed { token, reason: RequestFailure::Reset }));
        client.handle_datagram(now, &empty(MessageType::Confirmable, 77));
        assert_eq!(client.poll_transmit(), Some(empty(MessageType::Reset, 77)));
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let now = Instant::now();
        let mut layer = MessageLayer::new(CoapConfig::default(), 10);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for _ in 0..50_000 {
            let len = rng.gen_range(0..64);
            let d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            layer.handle_datagram(now, &d);
            while layer.poll_transmit().is_some() {}
            while layer.poll_event().is_some() {}
        }
        assert!(layer.stats().malformed > 0);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod notify_tests {
    use super::*;
    use coap_lite::{RequestType, ResponseType};

    #[test]
    fn notifications_reach_the_observer_and_a_reset_cancels_them() {
        let now = Instant::now();
        let (mut server, mut device) =
            (MessageLayer::new(CoapConfig::default(), 1), MessageLayer::new(CoapConfig::default(), 2));
        let mut observe = Packet::new();
        observe.header.code = MessageClass::Request(RequestType::Get);
        observe.add_option(CoapOption::UriPath, b"3".to_vec());
        observe.set_observe_value(0);
        let token = server.request(now, observe, true, true).unwrap();
        device.handle_datagram(now, &server.poll_transmit().unwrap());
        let Some(CoapEvent::Request { id, .. }) = device.poll_event() else { panic!() };
        let value = |seq: u32, v: &str| {
            let mut p = Packet::new();
            p.header.code = MessageClass::Response(ResponseType::Content);
            p.set_observe_value(seq);
            p.payload = v.as_bytes().to_vec();
            p
        };
        device.respond(now, &id, value(1, "a")).unwrap();
        server.handle_datagram(now, &device.poll_transmit().unwrap());
        assert!(matches!(server.poll_event(), Some(CoapEvent::Response { token: t, .. }) if t == token));
        for (seq, v, confirmable) in [(2, "b", true), (3, "c", false)] {
            device.notify(now, &id, value(seq, v), confirmable).unwrap();
            server.handle_datagram(now, &device.poll_transmit().unwrap());
            assert!(
                matches!(server.poll_event(), Some(CoapEvent::Notification { response, .. }) if response.payload == v.as_bytes())
            );
            if let Some(ack) = server.poll_transmit() {
                device.handle_datagram(now, &ack);
            }
        }
        device.handle_timeout(now + Duration::from_secs(10));
        assert!(device.poll_transmit().is_none(), "the CON notification was acknowledged");
        server.cancel(token);
        device.notify(now, &id, value(4, "d"), true).unwrap();
        server.handle_datagram(now, &device.poll_transmit().unwrap());
        device.handle_datagram(now, &server.poll_transmit().unwrap());
        assert_eq!(
            device.poll_event(),
            Some(CoapEvent::ObservationCancelled { token: token.0.to_be_bytes().to_vec() })
        );
    }
}
