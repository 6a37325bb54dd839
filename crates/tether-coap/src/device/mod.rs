//! The LwM2M client (device) side, sans-IO: registration, updates before the lifetime runs
//! out, the Server object's retry schedule, answers to the server's requests and
//! notifications of observed values.
//!
//! Drive [`Lwm2mClient`] like tether's other state machines, with time passed in: inputs
//! [`handle_connected`](Lwm2mClient::handle_connected),
//! [`handle_connect_failed`](Lwm2mClient::handle_connect_failed),
//! [`handle_disconnected`](Lwm2mClient::handle_disconnected),
//! [`handle_datagram`](Lwm2mClient::handle_datagram) and
//! [`handle_timeout`](Lwm2mClient::handle_timeout); outputs
//! [`poll_transmit`](Lwm2mClient::poll_transmit) (send all of them first),
//! [`poll_action`](Lwm2mClient::poll_action) (connect or disconnect the DTLS session),
//! [`poll_event`](Lwm2mClient::poll_event) and [`poll_timeout`](Lwm2mClient::poll_timeout).
//! The transport below is the driver's: the client only says when it needs a session and
//! when the one it has must go.

pub mod firmware;
pub mod objects;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_proto::resilience::{Backoff, BackoffConfig, Jitter};

use crate::block::{BlockOption, BlockOutcome, Reassembly};
use crate::content::{format, Path};
use crate::message::{CoapConfig, CoapEvent, IncomingRequest, MessageLayer, Token};
use crate::packet::{encode_uint, request};
pub use objects::{Attributes, DeviceInfo, Effect, Objects, Observed, RetryTimers, SecurityMode};

/// Settings of an [`Lwm2mClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Endpoint name (`ep=`).
    pub endpoint: String,
    /// Registration lifetime (`lt=`, /1/0/1). Default 300 s.
    pub lifetime: Duration,
    /// Fixed resources of the Device object.
    pub info: DeviceInfo,
    /// The server's URI, as the Security object holds it.
    pub server_uri: String,
    /// How the device authenticates (PSK by default).
    pub security: SecurityMode,
    /// The Server object's retry timers (/1/0/17–20).
    pub retry: RetryTimers,
    /// Randomisation of the retry delays, so a fleet does not come back in lockstep; when on,
    /// Updates also come up to half their headroom early, at random.
    pub jitter: Jitter,
    /// CoAP transmission parameters.
    pub coap: CoapConfig,
    /// Format of multi-value reads when the server does not ask (`ct=` in the registration).
    /// Default SenML CBOR.
    pub content_format: u16,
    /// Re-handshake before sending after this much silence: NAT bindings typically expire
    /// after 30–60 s of UDP silence, and a new handshake from the new address/port is
    /// what lets the server reach the device again. `None` (default) never does.
    pub rehandshake_after_idle: Option<Duration>,
    /// How long a reboot (Execute /3/0/4) takes before the device connects again. Default 1 s.
    pub reboot_time: Duration,
    /// Send (LwM2M 1.1 §6.4.2, `POST /dp`) the values of [`send_paths`](Self::send_paths)
    /// this often while registered, in SenML CBOR. `None` (default): never.
    pub send_interval: Option<Duration>,
    /// What a Send carries. Default `/3303/0/5700` (the temperature) and `/3/0/9` (battery).
    pub send_paths: Vec<Path>,
    /// The session does not depend on the path (the driver offers a DTLS Connection ID):
    /// a Send that goes unanswered is a lost path, and the device keeps its session (its
    /// next Update tells whether the server still knows it). Without it (default), an
    /// unanswered Send means the session may be gone (its server died, and another one
    /// behind the same address knows nothing of it): the device connects anew.
    pub session_outlives_path: bool,
    /// Seed of tokens, message IDs and jitter.
    pub seed: u64,
}

impl ClientConfig {
    /// Defaults for endpoint `endpoint` of server `server_uri`.
    pub fn new(endpoint: impl Into<String>, server_uri: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        Self {
            info: DeviceInfo::simulated(&endpoint),
            endpoint,
            lifetime: Duration::from_secs(300),
            server_uri: server_uri.into(),
            security: SecurityMode::PreSharedKey,
            retry: RetryTimers::default(),
            jitter: Jitter::None,
            coap: CoapConfig::default(),
            content_format: format::SENML_CBOR,
            rehandshake_after_idle: None,
            reboot_time: Duration::from_secs(1),
            send_interval: None,
            send_paths: ["/3303/0/5700", "/3/0/9"].iter().filter_map(|p| Path::parse(p).ok()).collect(),
            session_outlives_path: false,
            seed: 0,
        }
    }
}

/// Something the driver must do with the DTLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a session (one handshake attempt); report with `handle_connected` or
    /// `handle_connect_failed`.
    Connect,
    /// Close the session (close_notify).
    Disconnect,
    /// Drop the session without a word, as a device losing power does (a reboot): the
    /// server keeps its side until the device's next handshake from the same address
    /// replaces it (RFC 6347 §4.2.8).
    Abandon,
}

/// What happened to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// Registered; the server answered 2.01 with this location (`/rd/<id>`).
    Registered {
        /// The registration's location.
        location: String,
    },
    /// A registration Update was acknowledged.
    Updated,
    /// An attempt (connect + Register or Update) failed; the next follows after `retry_in`.
    AttemptFailed {
        /// Why.
        reason: String,
        /// Sequence (1-based) and attempt within it (1-based).
        sequence: u32,
        /// Attempt within the sequence.
        attempt: u32,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// Every attempt of every sequence failed: the device stops trying.
    GaveUp {
        /// The last failure.
        reason: String,
    },
    /// The session was lost (server closed it or went away).
    ConnectionLost,
    /// Re-handshaking after `idle` of silence (NAT binding presumed gone).
    Rehandshaking {
        /// The silence.
        idle: Duration,
    },
    /// Rebooting on the server's request.
    Rebooting,
    /// De-registered.
    Deregistered,
    /// A Send (`POST /dp`) was acknowledged.
    Sent,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Sessions opened.
    pub connects: u64,
    /// Registrations acknowledged.
    pub registrations: u64,
    /// Updates acknowledged.
    pub updates: u64,
    /// Requests from the server answered.
    pub requests_answered: u64,
    /// Notifications sent.
    pub notifications: u64,
    /// Executes run (a repeated request is answered from the CoAP cache, not run again).
    pub executions: u64,
    /// Failed attempts.
    pub failed_attempts: u64,
    /// Sends (`POST /dp`) acknowledged.
    pub sends: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Register,
    Update,
    Deregister,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started, de-registered, or given up.
    Stopped,
    /// Waiting until the next attempt.
    Waiting(Instant),
    /// The driver is connecting.
    Connecting,
    /// Connected; `Register`/`Update`/`Deregister` outstanding, or idle (`None`) while registered.
    Connected(Option<(Exchange, Token)>),
}

struct Observation {
    request: IncomingRequest,
    target: Observed,
    format: u16,
    last_payload: Vec<u8>,
    last_sent: Instant,
    sequence: u32,
}

/// How often observed values are compared with what was last sent.
const OBSERVE_CHECK: Duration = Duration::from_secs(1);
/// Every n-th notification is confirmable, so a vanished observer is noticed.
const CONFIRMABLE_EVERY: u32 = 10;
/// MAX_TRANSMIT_WAIT with default CoAP parameters: an Update leaves at least this much of
/// the lifetime for its retransmissions.
const UPDATE_HEADROOM: Duration = Duration::from_secs(93);
/// First delay after a refused connect (nothing listens on the server's port: it is
/// starting or restarting); doubled per refusal while it stays below the Server object's
/// own delay for the attempt.
const QUICK_RETRY: Duration = Duration::from_secs(1);
/// A fleet whose server closed every session (close_notify: a graceful restart) comes
/// back spread over this much, or the Retry Timer if shorter, when jitter is on.
const RECONNECT_SPREAD: Duration = Duration::from_secs(5);

/// The device. See the module docs.
pub struct Lwm2mClient {
    config: ClientConfig,
    objects: Objects,
    layer: MessageLayer,
    layers_made: u64,
    phase: Phase,
    location: Option<String>,
    next_update: Option<Instant>,
    /// Send an Update as soon as connected and idle (execute /1/0/8, lifetime written).
    update_wanted: bool,
    sequence: u32,
    attempt: u32,
    /// Refused connects in a row (reset by any other outcome).
    refused: u32,
    backoff: Backoff,
    /// Spreads Update times when jitter is on.
    rng: rand_chacha::ChaCha8Rng,
    last_traffic: Instant,
    observations: Vec<Observation>,
    /// A request body arriving in Block1 blocks (a firmware package).
    upload: Reassembly,
    next_observe_check: Option<Instant>,
    /// When the next Send is due, while registered.
    next_send: Option<Instant>,
    /// The Send in flight.
    send_token: Option<Token>,
    actions: VecDeque<Action>,
    events: VecDeque<DeviceEvent>,
    stats: ClientStats,
}

impl std::fmt::Debug for Lwm2mClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lwm2mClient")
            .field("endpoint", &self.config.endpoint)
            .field("phase", &self.phase)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Lwm2mClient {
    /// A device that booted at `now` (Unix time `unix_now`, for the Current Time resource).
    pub fn new(
        config: ClientConfig,
        now: Instant,
        unix_now: i64,
    ) -> Result<Self, tether_proto::resilience::ResilienceConfigError> {
        let objects = Objects::new(
            config.info.clone(),
            config.server_uri.clone(),
            config.security,
            config.lifetime,
            config.retry,
            now,
            unix_now,
        );
        let backoff = Backoff::new(backoff_config(&config.retry, config.jitter), config.seed)?;
        Ok(Self {
            layer: MessageLayer::new(config.coap.clone(), config.seed),
            layers_made: 1,
            objects,
            phase: Phase::Stopped,
            location: None,
            next_update: None,
            update_wanted: false,
            sequence: 1,
            attempt: 1,
            refused: 0,
            backoff,
            rng: rand::SeedableRng::seed_from_u64(config.seed ^ 0x05ee_d0f0_da7e),
            last_traffic: now,
            observations: Vec::new(),
            upload: Reassembly::default(),
            next_observe_check: None,
            next_send: None,
            send_token: None,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            config,
        })
    }

    /// The endpoint name.
    pub fn endpoint(&self) -> &str {
        &self.config.endpoint
    }

    /// The objects (values, attributes, timers).
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The registration location while registered.
    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }

    /// Whether the device is registered and connected.
    pub fn is_registered(&self) -> bool {
        self.location.is_some() && matches!(self.phase, Phase::Connected(_))
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Starts registering: asks for a session.
    pub fn start(&mut self, now: Instant) {
        if self.phase == Phase::Stopped {
            self.reset_schedule();
            self.phase = Phase::Waiting(now);
        }
    }

    /// De-registers (`DELETE /rd/<id>`) if registered and connected; otherwise just stops.
    /// [`DeviceEvent::Deregistered`] follows the server's answer (or its absence).
    pub fn deregister(&mut self, now: Instant) {
        match (&self.location, self.phase) {
            (Some(location), Phase::Connected(_)) => {
                let request = request(RequestType::Delete, location, None, Vec::new());
                self.exchange(now, Exchange::Deregister, request);
            }
            _ => {
                let registered = self.location.is_some();
                self.stop();
                if !registered {
                    self.events.push_back(DeviceEvent::Deregistered);
                }
            }
        }
    }

    /// The driver connected a session.
    pub fn handle_connected(&mut self, now: Instant) {
        if self.phase != Phase::Connecting {
            // Stopped meanwhile: the session is not wanted.
            self.actions.push_back(Action::Disconnect);
            return;
        }
        self.stats.connects += 1;
        self.refused = 0;
        self.send_token = None;
        self.layer = MessageLayer::new(self.config.coap.clone(), self.config.seed.wrapping_add(self.layers_made));
        self.layers_made += 1;
        self.last_traffic = now;
        self.phase = Phase::Connected(None);
        match self.location.clone() {
            Some(location) => self.send_update(now, &location),
            None => self.send_register(now),
        }
    }

    /// The driver's connection attempt failed.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: impl Into<String>) {
        if self.phase == Phase::Connecting {
            self.refused = 0;
            self.attempt_failed(now, reason.into());
        }
    }

    /// The driver's connection attempt was refused: nothing listens on the server's port
    /// (ICMP port unreachable), so the server is starting or restarting. The device tries
    /// again soon — after 1 s, 2 s, 4 s… (jittered when jitter is on) — for as long as that
    /// is sooner than the Server object's delay for the attempt, without using the attempt
    /// up; from then on (until a session opens) refusals count as ordinary failed attempts
    /// on the Server object's schedule.
    pub fn handle_connect_refused(&mut self, now: Instant, reason: impl Into<String>) {
        if self.phase != Phase::Connecting {
            return;
        }
        let reason = reason.into();
        self.refused = self.refused.saturating_add(1);
        let quick = QUICK_RETRY.saturating_mul(1 << (self.refused - 1).min(20));
        let scheduled = self.objects.retry.retry_timer.saturating_mul(1 << (self.attempt - 1).min(20));
        if quick >= scheduled {
            self.attempt_failed(now, reason);
            return;
        }
        let retry_in = match self.config.jitter {
            Jitter::None => quick,
            // Within the upper half, so a fleet spreads out but still comes back soon.
            _ => quick.mul_f64(rand::Rng::gen_range(&mut self.rng, 0.5..=1.0)),
        };
        self.stats.failed_attempts += 1;
        self.events.push_back(DeviceEvent::AttemptFailed {
            reason,
            sequence: self.sequence,
            attempt: self.attempt,
            retry_in,
        });
        self.phase = Phase::Waiting(now + retry_in);
    }

    /// The session ended without the client asking (server close_notify, fatal alert).
    pub fn handle_disconnected(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Connected(_)) {
            return;
        }
        self.observations.clear();
        if let Phase::Connected(Some((Exchange::Deregister, _))) = self.phase {
            self.stop();
            return;
        }
        self.events.push_back(DeviceEvent::ConnectionLost);
        // Reconnect now, or with jitter within a few seconds (never later than the first
        // retry delay), so a fleet that lost its server at one instant does not come back
        // at one instant; a server still restarting refuses, and the device retries soon.
        self.reset_schedule();
        self.refused = 0;
        let spread = RECONNECT_SPREAD.min(self.objects.retry.retry_timer);
        let delay = match self.config.jitter {
            Jitter::None => Duration::ZERO,
            _ => spread.mul_f64(rand::Rng::gen_range(&mut self.rng, 0.0..=1.0)),
        };
        self.phase = Phase::Waiting(now + delay);
    }

    /// A datagram of application data from the session.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if !matches!(self.phase, Phase::Connected(_)) {
            return;
        }
        self.last_traffic = now;
        self.layer.handle_datagram(now, datagram);
        self.process(now);
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Waiting(at) = self.phase {
            if at <= now {
                self.phase = Phase::Connecting;
                self.actions.push_back(Action::Connect);
            }
        }
        if matches!(self.phase, Phase::Connected(_)) {
            self.layer.handle_timeout(now);
            self.process(now);
        }
        if self.next_update.is_some_and(|at| at <= now) {
            self.update_wanted = true;
        }
        self.update_if_wanted(now);
        if self.next_observe_check.is_some_and(|at| at <= now) {
            self.notify_changes(now);
        }
        if self.next_send.is_some_and(|at| at <= now) {
            self.send_values(now);
        }
    }

    /// The next datagram to send on the session.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let datagram = self.layer.poll_transmit()?;
        Some(datagram)
    }

    /// The next action for the driver, after every datagram from `poll_transmit` was sent.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waiting = match self.phase {
            Phase::Waiting(at) => Some(at),
            _ => None,
        };
        let connected = matches!(self.phase, Phase::Connected(_));
        let update = match (self.phase, self.location.is_some()) {
            (Phase::Connected(None), true) => self.next_update,
            _ => None,
        };
        let send = self.next_send.filter(|_| self.is_registered());
        [waiting, connected.then(|| self.layer.poll_timeout()).flatten(), update, self.next_observe_check, send]
            .into_iter()
            .flatten()
            .min()
    }

    /// The device's datagrams must be sent on the session now; called by the driver after
    /// it sent one (for the NAT idle timer).
    pub fn note_sent(&mut self, now: Instant) {
        self.last_traffic = now;
    }

    fn stop(&mut self) {
        if matches!(self.phase, Phase::Connected(_)) {
            self.actions.push_back(Action::Disconnect);
        }
        if self.location.take().is_some() {
            self.events.push_back(DeviceEvent::Deregistered);
        }
        self.phase = Phase::Stopped;
        self.update_wanted = false;
        self.next_update = None;
        self.next_send = None;
        self.observations.clear();
        self.next_observe_check = None;
    }

    fn reset_schedule(&mut self) {
        self.sequence = 1;
        self.attempt = 1;
        self.backoff = Backoff::new(
            backoff_config(&self.objects.retry, self.config.jitter),
            self.config.seed ^ self.stats.failed_attempts,
        )
        .unwrap_or_else(|_| self.backoff.clone());
    }

    fn send_register(&mut self, now: Instant) {
        let mut request = request(RequestType::Post, "/rd", None, Vec::new());
        for query in [
            format!("ep={}", self.config.endpoint),
            format!("lt={}", self.objects.lifetime.as_secs()),
            "lwm2m=1.1".to_string(),
            format!("b={}", self.objects.binding()),
        ] {
            request.add_option(CoapOption::UriQuery, query.into_bytes());
        }
        request.add_option(CoapOption::ContentFormat, encode_uint(u32::from(format::LINK)));
        request.payload = self.objects.registration_links(self.config.content_format).into_bytes();
        self.exchange(now, Exchange::Register, request);
    }

    fn send_update(&mut self, now: Instant, location: &str) {
        // Due again only once this one is answered (`registered`).
        self.next_update = None;
        let mut request = request(RequestType::Post, location, None, Vec::new());
        request.add_option(CoapOption::UriQuery, format!("lt={}", self.objects.lifetime.as_secs()).into_bytes());
        self.exchange(now, Exchange::Update, request);
    }

    fn exchange(&mut self, now: Instant, kind: Exchange, request: Packet) {
        match self.layer.request(now, request, true, false) {
            Ok(token) => {
                self.last_traffic = now;
                self.phase = Phase::Connected(Some((kind, token)));
            }
            // Only an oversized request fails to encode; an endpoint name that long is a
            // configuration mistake the schedule cannot fix.
            Err(err) => {
                self.events.push_back(DeviceEvent::GaveUp { reason: err.to_string() });
                self.stop();
            }
        }
    }

    /// Sends the wanted Update once no other exchange is outstanding.
    fn update_if_wanted(&mut self, now: Instant) {
        let (Phase::Connected(None), Some(location), true) = (self.phase, self.location.clone(), self.update_wanted)
        else {
            return;
        };
        self.update_wanted = false;
        if !self.rehandshake_if_idle(now) {
            self.send_update(now, &location);
        }
    }

    /// Before a send after long silence: re-handshake (same port) instead, then Update.
    fn rehandshake_if_idle(&mut self, now: Instant) -> bool {
        let Some(limit) = self.config.rehandshake_after_idle else { return false };
        let idle = now.saturating_duration_since(self.last_traffic);
        if idle < limit {
            return false;
        }
        self.events.push_back(DeviceEvent::Rehandshaking { idle });
        self.actions.push_back(Action::Disconnect);
        self.observations.clear();
        self.phase = Phase::Connecting;
        self.actions.push_back(Action::Connect);
        true
    }

    fn attempt_failed(&mut self, now: Instant, reason: String) {
        self.stats.failed_attempts += 1;
        if matches!(self.phase, Phase::Connected(_)) {
            // The session may be what is broken (a server that restarted has forgotten it).
            self.actions.push_back(Action::Disconnect);
            self.observations.clear();
        }
        let (sequence, attempt) = (self.sequence, self.attempt);
        let retry_in = match self.backoff.delay(attempt) {
            Some(delay) => {
                self.attempt += 1;
                delay
            }
            None if sequence < self.objects.retry.sequence_retry_count => {
                self.sequence += 1;
                self.attempt = 1;
                self.backoff.reset();
                self.objects.retry.sequence_delay
            }
            None => {
                self.events.push_back(DeviceEvent::AttemptFailed {
                    reason: reason.clone(),
                    sequence,
                    attempt,
                    retry_in: Duration::ZERO,
                });
                self.events.push_back(DeviceEvent::GaveUp { reason });
                self.location = None;
                self.phase = Phase::Stopped;
                return;
            }
        };
        self.events.push_back(DeviceEvent::AttemptFailed { reason, sequence, attempt, retry_in });
        self.phase = Phase::Waiting(now + retry_in);
    }

    fn registered(&mut self, now: Instant) {
        let lifetime = self.objects.lifetime;
        let mut headroom = (lifetime / 10).max(UPDATE_HEADROOM.min(lifetime / 2));
        if self.config.jitter != Jitter::None {
            // Earlier by up to half the headroom, never later: devices that registered in
            // the same second do not all update in the same second ever after.
            headroom += headroom.mul_f64(rand::Rng::gen_range(&mut self.rng, 0.0..0.5));
        }
        self.next_update = Some(now + lifetime.saturating_sub(headroom));
        if let (Some(interval), None) = (self.config.send_interval, self.next_send) {
            self.next_send = Some(now + interval);
        }
        self.reset_schedule();
        self.phase = Phase::Connected(None);
        self.update_if_wanted(now);
    }

    fn process(&mut self, now: Instant) {
        while let Some(event) = self.layer.poll_event() {
            match event {
                CoapEvent::Response { token, response } => self.on_response(now, token, &response),
                CoapEvent::RequestFailed { token, reason } if self.send_token == Some(token) => {
                    self.send_token = None;
                    if !self.config.session_outlives_path {
                        // No answer through every retransmission: the session may be what
                        // is broken (a server without it cannot say so), as for an Update.
                        self.attempt_failed(now, format!("no answer to a Send from the server ({reason})"));
                    }
                }
                CoapEvent::RequestFailed { token, reason } => {
                    if let Phase::Connected(Some((kind, t))) = self.phase {
                        if t == token {
                            if kind == Exchange::Deregister {
                                self.stop();
                            } else {
                                let reason = format!("no answer to {kind:?} from the server ({reason})");
                                self.attempt_failed(now, reason);
                            }
                        }
                    }
                }
                CoapEvent::Request { id, request } => self.on_request(now, id, &request),
                CoapEvent::ObservationCancelled { token } => self.observations.retain(|o| o.request.token() != token),
                _ => {}
            }
        }
    }

    fn on_response(&mut self, now: Instant, token: Token, response: &Packet) {
        if self.send_token == Some(token) {
            self.send_token = None;
            if response.header.code == MessageClass::Response(ResponseType::Changed) {
                self.stats.sends += 1;
                self.events.push_back(DeviceEvent::Sent);
            }
            return;
        }
        let Phase::Connected(Some((kind, expected))) = self.phase else { return };
        if token != expected {
            return;
        }
        let code = match response.header.code {
            MessageClass::Response(code) => code,
            _ => ResponseType::UnKnown,
        };
        match (kind, code) {
            (Exchange::Register, ResponseType::Created) => {
                let location = response
                    .get_option(CoapOption::LocationPath)
                    .map(|segments| {
                        segments.iter().map(|s| format!("/{}", String::from_utf8_lossy(s))).collect::<String>()
                    })
                    .unwrap_or_default();
                if location.is_empty() {
                    self.attempt_failed(now, "2.01 without Location-Path".into());
                    return;
                }
                self.stats.registrations += 1;
                self.location = Some(location.clone());
                self.registered(now);
                self.events.push_back(DeviceEvent::Registered { location });
            }
            (Exchange::Update, ResponseType::Changed) => {
                self.stats.updates += 1;
                self.registered(now);
                self.events.push_back(DeviceEvent::Updated);
            }
            // The server no longer knows the registration (expired, or lost in a restart
            // without a store): register anew on this session.
            (Exchange::Update, ResponseType::NotFound | ResponseType::BadRequest | ResponseType::Forbidden) => {
                self.location = None;
                self.send_register(now);
            }
            (Exchange::Deregister, _) => self.stop(),
            (Exchange::Register, ResponseType::Forbidden) => {
                let reason = format!(
                    "the server refused to register endpoint {:?} (4.03 Forbidden): this identity may not \
                     register that endpoint name",
                    self.config.endpoint
                );
                self.attempt_failed(now, reason);
            }
            (kind, code) => {
                let code = MessageClass::Response(code);
                self.attempt_failed(now, format!("the server answered {kind:?} with {code}"));
            }
        }
    }

    fn on_request(&mut self, now: Instant, id: IncomingRequest, request: &Packet) {
        let block = request.get_first_option(CoapOption::Block1).map(|v| BlockOption::parse(v));
        let (request, last_block) = match block {
            None => (std::borrow::Cow::Borrowed(request), None),
            Some(None) => return self.answer_only(now, &id, crate::registration::response(ResponseType::BadOption)),
            Some(Some(block)) => {
                let firmware = is_firmware_package(request);
                match self.upload.accept(request, block, firmware::MAX_PACKAGE) {
                    BlockOutcome::Continue(answer) => {
                        self.objects.set_firmware_downloading(firmware);
                        return self.answer_only(now, &id, answer);
                    }
                    BlockOutcome::Refused(answer) => {
                        self.objects.set_firmware_downloading(false);
                        return self.answer_only(now, &id, answer);
                    }
                    BlockOutcome::Complete(whole, block) => (std::borrow::Cow::Owned(whole), Some(block)),
                }
            }
        };
        let mut answer = objects::answer(&mut self.objects, now, &request, self.config.content_format);
        if let Some(block) = last_block {
            answer.response.add_option(CoapOption::Block1, block.encode());
        }
        if answer.cancel_observation {
            self.observations.retain(|o| o.request.token() != id.token());
        }
        if let Some((target, format)) =
            answer.observe.filter(|_| answer.response.header.code == MessageClass::Response(ResponseType::Content))
        {
            self.observations.retain(|o| o.request.token() != id.token());
            answer.response.set_observe_value(0);
            self.observations.push(Observation {
                request: id.clone(),
                target,
                format,
                last_payload: answer.response.payload.clone(),
                last_sent: now,
                sequence: 0,
            });
            self.next_observe_check.get_or_insert(now + OBSERVE_CHECK);
        }
        if self.layer.respond(now, &id, answer.response).is_ok() {
            self.stats.requests_answered += 1;
        }
        self.stats.executions += u64::from(answer.executed);
        match answer.effect {
            Some(Effect::Reboot) => self.reboot(now),
            Some(Effect::UpdateRegistration) => {
                self.update_wanted = true;
                self.update_if_wanted(now);
            }
            None => {}
        }
    }

    /// Answers a request with `response` and nothing else (a block of a larger body).
    fn answer_only(&mut self, now: Instant, id: &IncomingRequest, response: Packet) {
        if self.layer.respond(now, id, response).is_ok() {
            self.stats.requests_answered += 1;
        }
    }

    fn reboot(&mut self, now: Instant) {
        self.events.push_back(DeviceEvent::Rebooting);
        // The response is already queued: the driver sends it before going dark.
        self.actions.push_back(Action::Abandon);
        self.observations.clear();
        self.upload = Reassembly::default();
        self.next_observe_check = None;
        self.location = None;
        self.next_update = None;
        self.next_send = None;
        self.update_wanted = false;
        self.objects.reboot(now);
        self.reset_schedule();
        self.phase = Phase::Waiting(now + self.config.reboot_time);
    }

    /// Sends (`POST /dp`, SenML CBOR) the current values of the configured paths, when
    /// registered and no other Send is in flight; then schedules the next.
    fn send_values(&mut self, now: Instant) {
        let Some(interval) = self.config.send_interval else { return };
        if !self.is_registered() {
            self.next_send = None; // scheduled again once registered
            return;
        }
        self.next_send = Some(now + interval);
        if self.send_token.is_some() {
            return;
        }
        let entries: Vec<_> =
            self.config.send_paths.iter().filter_map(|path| self.objects.read(now, path).ok()).flatten().collect();
        let Some(first) = entries.first() else { return };
        let base = Path { instance: None, resource: None, resource_instance: None, ..first.path };
        let Ok(payload) = crate::content::encode(format::SENML_CBOR, &base, &entries) else { return };
        let request = request(RequestType::Post, "/dp", Some(format::SENML_CBOR), payload);
        if let Ok(token) = self.layer.request(now, request, true, false) {
            self.send_token = Some(token);
            self.last_traffic = now;
        }
    }

    /// Sends a notification for each observation whose value changed (respecting `pmin`)
    /// or whose `pmax` elapsed.
    fn notify_changes(&mut self, now: Instant) {
        self.next_observe_check = None;
        if !matches!(self.phase, Phase::Connected(_)) || self.observations.is_empty() {
            self.observations.clear();
            return;
        }
        let mut due = Vec::new();
        for (index, observation) in self.observations.iter().enumerate() {
            // A composite observation takes no attributes of its own: it notifies on change.
            let attributes = match &observation.target {
                Observed::Path(path) => self.objects.attributes(path),
                Observed::Composite(_) => Attributes::default(),
            };
            let since = now.saturating_duration_since(observation.last_sent);
            if attributes.pmin.is_some_and(|pmin| since < pmin) {
                continue;
            }
            let Ok(packet) = observation.target.read(&self.objects, now, observation.format) else {
                continue;
            };
            let changed = packet.payload != observation.last_payload;
            let overdue = attributes.pmax.is_some_and(|pmax| since >= pmax);
            if changed || overdue {
                due.push((index, packet));
            }
        }
        if !due.is_empty() && self.rehandshake_if_idle(now) {
            return;
        }
        for (index, mut packet) in due {
            let observation = &mut self.observations[index];
            observation.sequence = (observation.sequence + 1) & 0xFF_FFFF;
            packet.set_observe_value(observation.sequence);
            let confirmable = observation.sequence % CONFIRMABLE_EVERY == 0;
            observation.last_payload = packet.payload.clone();
            observation.last_sent = now;
            if self.layer.notify(now, &observation.request, packet, confirmable).is_ok() {
                self.stats.notifications += 1;
                self.last_traffic = now;
            }
        }
        self.next_observe_check = Some(now + OBSERVE_CHECK);
    }
}

/// A Write of the Firmware Update object's Package (/5/0/0).
fn is_firmware_package(request: &Packet) -> bool {
    let segments: Vec<&[u8]> =
        request.get_option(CoapOption::UriPath).map(|s| s.iter().map(Vec::as_slice).collect()).unwrap_or_default();
    segments == [b"5".as_slice(), b"0", b"0"]
}

fn backoff_config(retry: &RetryTimers, jitter: Jitter) -> BackoffConfig {
    BackoffConfig::default()
        // Capped at 2^32 − 1 s like the timers a server may write: a delay is always
        // something an Instant can be moved by.
        .delays(retry.retry_timer.max(Duration::from_millis(1)), Duration::from_secs(u32::MAX.into()))
        .max_attempts(retry.retry_count.max(1))
        .jitter(jitter)
}
