//! `Lwm2mServer`: the LwM2M server runtime over a [`DtlsServer`].
//!
//! One task owns the registry and one CoAP message layer per DTLS session. Devices register
//! over the session they opened; every server-initiated request (Read, Write, Execute, …)
//! goes back over that same session: the server never dials out and never opens a second
//! handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_coap::coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer, RequestFailure, Token};
use tether_coap::registration::{EndpointAuthorizer, Registration, Registry, RegistryEvent};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::client::sleep_until;
use crate::clock;
pub use crate::send::SentValue;
use crate::server::{Accepted, Arrival, DtlsServer, ServerSendError};
use crate::store::RegistrationStore;
use tether_proto::dtls::PeerIdentity;

/// Settings of an [`Lwm2mServer`].
#[derive(Debug, Clone)]
pub struct Lwm2mServerConfig {
    /// CoAP transmission parameters.
    pub coap: CoapConfig,
    /// Seed of message IDs, tokens and registration IDs.
    pub seed: u64,
    /// Queue mode (`b=UQ`): how long after its last message a device is taken to be awake.
    /// Requests made later wait until it is next heard from. Default 93 s (MAX_TRANSMIT_WAIT).
    pub queue_awake: Duration,
    /// Queue mode: requests held per endpoint at most; more are refused. Default 32.
    pub queue_limit: usize,
}

impl Default for Lwm2mServerConfig {
    fn default() -> Self {
        Self {
            coap: CoapConfig::default(),
            seed: rand::random(),
            queue_awake: Duration::from_secs(93),
            queue_limit: 32,
        }
    }
}

/// A device's answer to a server-initiated request.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceResponse {
    /// The CoAP response code.
    pub code: ResponseType,
    /// Its Content-Format, if any.
    pub content_format: Option<u16>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A server-initiated request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Lwm2mError {
    /// No registration with that endpoint name.
    #[error("endpoint {0:?} is not registered")]
    NotRegistered(String),
    /// The device did not answer in time (CoAP retransmissions exhausted).
    #[error("device did not answer: {0}")]
    NoAnswer(RequestFailure),
    /// The device's session ended before it answered.
    #[error("the device's session closed")]
    SessionClosed,
    /// The request could not be sent.
    #[error(transparent)]
    Send(#[from] ServerSendError),
    /// The request could not be encoded.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The endpoint is in queue mode and its queue is full.
    #[error("queue of endpoint {0:?} is full")]
    QueueFull(String),
    /// The server has shut down.
    #[error("server shut down")]
    ShutDown,
}

/// An observation: the first response, then notifications until cancelled or the device's
/// session ends (the channel then closes).
#[derive(Debug)]
pub struct Observation {
    /// Identifies it for [`Lwm2mServer::cancel_observation`].
    pub id: u64,
    /// The response to the observe request.
    pub first: DeviceResponse,
    /// Notifications; closes when the observation ends. If the device did not accept the
    /// observation (no Observe option in its answer) it is closed at once.
    pub notifications: mpsc::Receiver<DeviceResponse>,
}

/// Session events kept for slow readers of [`Lwm2mServer::session_events`].
const SESSION_EVENT_BACKLOG: usize = 512;

/// Notifications queued per observation before the oldest unread are dropped.
const NOTIFICATION_QUEUE: usize = 256;

enum Command {
    Request {
        endpoint: String,
        request: Packet,
        /// Ask for the content format the device registered with (`Accept`).
        negotiate: bool,
        reply: oneshot::Sender<Result<DeviceResponse, Lwm2mError>>,
    },
    Observe {
        endpoint: String,
        /// A `GET` or `FETCH` with Observe 0.
        request: Packet,
        reply: oneshot::Sender<Result<Observation, Lwm2mError>>,
    },
    CancelObservation(u64, oneshot::Sender<bool>),
    Registrations(oneshot::Sender<Vec<Registration>>),
    Clients(oneshot::Sender<Vec<ClientState>>),
    Sent(String, oneshot::Sender<Option<Vec<SentValue>>>),
}

/// A registration, and whether its device can be reached now.
#[derive(Debug, Clone)]
pub struct ClientState {
    /// The registration.
    pub registration: Registration,
    /// Whether the device's DTLS session is open. A registration outlives its session
    /// (close_notify, a fatal alert, idle expiry): until the device connects again it is
    /// offline, and requests to it fail at once.
    pub online: bool,
    /// When the device was last heard from over its current session.
    pub last_heard: Option<std::time::Instant>,
}

/// A device's DTLS session as it changes, for live views (the web UI, `/api/events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A handshake completed. `resumed`: an abbreviated one; `replaced`: the new session took
    /// the place of the one its peer had (a reboot, RFC 6347 §4.2.8).
    Opened {
        /// The device's address.
        peer: SocketAddr,
        /// Its DTLS identity (`psk:…`, `x509:…`).
        identity: Option<String>,
        /// An abbreviated handshake.
        resumed: bool,
        /// It replaced the peer's previous session.
        replaced: bool,
    },
    /// The session followed its Connection ID to a new address.
    Moved {
        /// The old address.
        from: SocketAddr,
        /// The new one.
        to: SocketAddr,
    },
    /// The session ended.
    Closed {
        /// The device's address.
        peer: SocketAddr,
        /// Why: the close reason, `idle timeout` or `evicted`.
        reason: String,
    },
}

/// The LwM2M server. See the module docs.
#[derive(Debug, Clone)]
pub struct Lwm2mServer {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<RegistryEvent>,
    session_events: broadcast::Sender<SessionEvent>,
    dtls: Arc<DtlsServer>,
}

impl Lwm2mServer {
    /// Starts serving the registration interface on `dtls`, authorizing endpoint names with
    /// `authorizer`. The server's `accept`, `recv` and `departed` queues belong to it from now.
    /// With a `store`, registrations are loaded from it now and written to it before they
    /// are acknowledged.
    pub fn start(
        dtls: Arc<DtlsServer>,
        authorizer: Arc<dyn EndpointAuthorizer>,
        store: Option<Arc<RegistrationStore>>,
        config: Lwm2mServerConfig,
    ) -> Result<Self, crate::store::StoreError> {
        let (commands, command_rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        // For live views only (a reader that falls behind is told it lagged): a small ring,
        // allocated up front whether anyone listens or not.
        let (session_events, _) = broadcast::channel(SESSION_EVENT_BACKLOG);
        let mut registry = Registry::new(config.seed);
        if let Some(store) = &store {
            for registration in store.load(clock::now())? {
                registry.restore(registration);
            }
        }
        let actor = Actor {
            dtls: Arc::clone(&dtls),
            authorizer,
            store,
            unapplied: Vec::new(),
            registry,
            config: Arc::new(config.coap.clone()),
            seed: config.seed,
            sessions: HashMap::new(),
            timers: std::collections::BTreeSet::new(),
            pending: HashMap::new(),
            observations: HashMap::new(),
            next_observation: 1,
            queued: HashMap::new(),
            queue_awake: config.queue_awake,
            queue_limit: config.queue_limit,
            events: events.clone(),
            session_events: session_events.clone(),
            sent: crate::send::SentStore::default(),
        };
        tokio::spawn(actor.run(command_rx));
        Ok(Self { commands, events, session_events, dtls })
    }

    /// The DTLS server underneath (pool statistics, shutdown).
    pub fn dtls(&self) -> &Arc<DtlsServer> {
        &self.dtls
    }

    /// Registry changes, for persistence and observers.
    pub fn events(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// Devices' DTLS sessions opening, moving and closing.
    pub fn session_events(&self) -> broadcast::Receiver<SessionEvent> {
        self.session_events.subscribe()
    }

    /// Every registration.
    pub async fn registrations(&self) -> Vec<Registration> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Registrations(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Every registration with its device's session state.
    pub async fn clients(&self) -> Vec<ClientState> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Clients(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The latest value of each resource `endpoint` sent (LwM2M Send, `POST /dp`); `None`
    /// if it is not registered.
    pub async fn sent(&self, endpoint: &str) -> Option<Vec<SentValue>> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Sent(endpoint.to_string(), tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Read (`GET`) `path` (`/3/0/0`) on `endpoint`.
    /// The request asks (`Accept`) for the content format the device registered with
    /// (`ct=` on its `</>` link) when tether decodes it (TLV, SenML JSON, SenML CBOR).
    pub async fn read(&self, endpoint: &str, path: &str) -> Result<DeviceResponse, Lwm2mError> {
        self.send(endpoint, build(RequestType::Get, path, None, Vec::new()), true).await
    }

    /// Read-Composite (LwM2M 1.1): the values of several `paths` in one `FETCH`, the paths as
    /// SenML-ETCH JSON, the answer in `accept` (SenML JSON or CBOR).
    pub async fn read_composite(
        &self,
        endpoint: &str,
        paths: &[tether_coap::content::Path],
        accept: u16,
    ) -> Result<DeviceResponse, Lwm2mError> {
        self.send(endpoint, composite_fetch(paths, accept)?, false).await
    }

    /// Write (`PUT`) `payload` in `content_format` to `path`.
    pub async fn write(
        &self,
        endpoint: &str,
        path: &str,
        content_format: u16,
        payload: Vec<u8>,
    ) -> Result<DeviceResponse, Lwm2mError> {
        self.request(endpoint, build(RequestType::Put, path, Some(content_format), payload)).await
    }

    /// Execute (`POST`) `path` with optional arguments.
    pub async fn execute(&self, endpoint: &str, path: &str, arguments: &str) -> Result<DeviceResponse, Lwm2mError> {
        let content_format = (!arguments.is_empty()).then_some(0);
        self.request(endpoint, build(RequestType::Post, path, content_format, arguments.as_bytes().to_vec())).await
    }

    /// Discover (`GET` with `Accept: application/link-format`): the objects, instances and
    /// resources under `path`, with their attributes.
    pub async fn discover(&self, endpoint: &str, path: &str) -> Result<DeviceResponse, Lwm2mError> {
        let mut request = build(RequestType::Get, path, None, Vec::new());
        request.add_option(CoapOption::Accept, encode_uint(u32::from(tether_coap::content::format::LINK)));
        self.send(endpoint, request, false).await
    }

    /// Create (`POST` to an object): a new instance from `payload` in `content_format`.
    pub async fn create(
        &self,
        endpoint: &str,
        object: &str,
        content_format: u16,
        payload: Vec<u8>,
    ) -> Result<DeviceResponse, Lwm2mError> {
        self.send(endpoint, build(RequestType::Post, object, Some(content_format), payload), false).await
    }

    /// Delete (`DELETE`) an object instance.
    pub async fn delete(&self, endpoint: &str, path: &str) -> Result<DeviceResponse, Lwm2mError> {
        self.send(endpoint, build(RequestType::Delete, path, None, Vec::new()), false).await
    }

    /// Write-Attributes (`PUT` with only query parameters): `pmin`, `pmax`, `gt`, `lt`, `st`…
    pub async fn write_attributes(
        &self,
        endpoint: &str,
        path: &str,
        attributes: &[(String, String)],
    ) -> Result<DeviceResponse, Lwm2mError> {
        let mut request = build(RequestType::Put, path, None, Vec::new());
        for (name, value) in attributes {
            let item = if value.is_empty() { name.clone() } else { format!("{name}={value}") };
            request.add_option(CoapOption::UriQuery, item.into_bytes());
        }
        self.send(endpoint, request, false).await
    }

    /// Observe `path` on `endpoint` (`GET` with Observe 0).
    pub async fn observe(&self, endpoint: &str, path: &str) -> Result<Observation, Lwm2mError> {
        let mut request = build(RequestType::Get, path, None, Vec::new());
        request.set_observe_value(0);
        self.start_observation(endpoint, request).await
    }

    /// Observe-Composite (LwM2M 1.1): one observation of several `paths` (`FETCH` with
    /// Observe 0 and the paths as SenML-ETCH JSON); the first answer and every
    /// notification carry all of their values in `accept` (SenML JSON or CBOR).
    pub async fn observe_composite(
        &self,
        endpoint: &str,
        paths: &[tether_coap::content::Path],
        accept: u16,
    ) -> Result<Observation, Lwm2mError> {
        let mut request = composite_fetch(paths, accept)?;
        request.set_observe_value(0);
        self.start_observation(endpoint, request).await
    }

    async fn start_observation(&self, endpoint: &str, request: Packet) -> Result<Observation, Lwm2mError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Observe { endpoint: endpoint.to_string(), request, reply };
        self.commands.send(command).await.map_err(|_| Lwm2mError::ShutDown)?;
        answer.await.unwrap_or(Err(Lwm2mError::ShutDown))
    }

    /// Write-Composite (LwM2M 1.1): `entries` (resources of any objects) in one `iPATCH`, as
    /// SenML `content_format` (JSON or CBOR). The device applies all of them or none.
    pub async fn write_composite(
        &self,
        endpoint: &str,
        entries: &[tether_coap::content::Entry],
        content_format: u16,
    ) -> Result<DeviceResponse, Lwm2mError> {
        use tether_coap::content::{encode, format, Path};
        if !matches!(content_format, format::SENML_JSON | format::SENML_CBOR) {
            return Err(Lwm2mError::InvalidRequest("a composite write is sent as SenML JSON or CBOR".into()));
        }
        let root = Path { object: 0, instance: None, resource: None, resource_instance: None };
        let payload = encode(content_format, &root, entries).map_err(|e| Lwm2mError::InvalidRequest(e.to_string()))?;
        self.send(endpoint, build(RequestType::IPatch, "", Some(content_format), payload), false).await
    }

    /// Cancels an observation: its channel closes, and the device's next notification is
    /// answered with a reset (RFC 7641 §3.6). False if it was not active.
    pub async fn cancel_observation(&self, id: u64) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::CancelObservation(id, reply)).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Any request to `endpoint` over its session.
    pub async fn request(&self, endpoint: &str, request: Packet) -> Result<DeviceResponse, Lwm2mError> {
        self.send(endpoint, request, false).await
    }

    async fn send(&self, endpoint: &str, request: Packet, negotiate: bool) -> Result<DeviceResponse, Lwm2mError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Request { endpoint: endpoint.to_string(), request, negotiate, reply };
        self.commands.send(command).await.map_err(|_| Lwm2mError::ShutDown)?;
        answer.await.unwrap_or(Err(Lwm2mError::ShutDown))
    }
}

/// `FETCH /` of `paths` (SenML-ETCH JSON), answered in `accept`.
fn composite_fetch(paths: &[tether_coap::content::Path], accept: u16) -> Result<Packet, Lwm2mError> {
    use tether_coap::content::{encode_paths, format};
    let payload =
        encode_paths(format::SENML_ETCH_JSON, paths).map_err(|e| Lwm2mError::InvalidRequest(e.to_string()))?;
    let mut request = build(RequestType::Fetch, "", Some(format::SENML_ETCH_JSON), payload);
    request.add_option(CoapOption::Accept, encode_uint(u32::from(accept)));
    Ok(request)
}

/// One info line per registry change: what an operator follows a fleet by.
fn log_registry_event(event: &RegistryEvent) {
    match event {
        RegistryEvent::Registered { registration: r, replaced } => tracing::info!(
            endpoint = %r.endpoint,
            identity = %r.identity,
            peer = %r.peer,
            lifetime_s = r.lifetime.as_secs(),
            binding = r.binding.as_str(),
            objects = object_count(r),
            replaced = replaced.is_some(),
            "registered"
        ),
        RegistryEvent::Updated { registration: r, moved_from } => tracing::info!(
            endpoint = %r.endpoint,
            identity = %r.identity,
            peer = %r.peer,
            lifetime_s = r.lifetime.as_secs(),
            binding = r.binding.as_str(),
            objects = object_count(r),
            moved_from = moved_from.map(|a| a.to_string()),
            "updated"
        ),
        RegistryEvent::Deregistered { registration: r } => {
            tracing::info!(endpoint = %r.endpoint, identity = %r.identity, peer = %r.peer, "deregistered")
        }
        RegistryEvent::Expired { registration: r } => tracing::info!(
            endpoint = %r.endpoint,
            identity = %r.identity,
            peer = %r.peer,
            lifetime_s = r.lifetime.as_secs(),
            "registration expired"
        ),
        _ => {}
    }
}

/// How many distinct objects a registration lists.
fn object_count(registration: &Registration) -> usize {
    let mut objects: Vec<u16> = registration
        .links
        .to_vec()
        .iter()
        .filter_map(|link| link.target.trim_start_matches('/').split('/').next()?.parse().ok())
        .collect();
    objects.sort_unstable();
    objects.dedup();
    objects.len()
}

/// A request with `path`'s segments as Uri-Path options (`tether_coap::packet::request`).
pub use tether_coap::packet::request as build;
use tether_coap::packet::{decode_uint, encode_uint};

use tether_coap::block::{block1_request, BlockOption, DEFAULT_SZX};

struct Session {
    /// The DTLS session's generation: a departure of an older session of the same peer
    /// (replaced by a re-handshake from the same address) must not remove this one.
    generation: tether_proto::pool::Generation,
    identity: Option<String>,
    /// The endpoint registered over this session, once it is (a Send must come from one).
    endpoint: Option<Box<str>>,
    /// When the peer last sent anything (queue mode).
    last_heard: Option<std::time::Instant>,
    /// The CoAP layer's next timer, as filed in the actor's timer set.
    timer: Option<std::time::Instant>,
    /// Boxed: the session table stays small and dense with thousands of devices.
    layer: Box<MessageLayer>,
}

type Reply = oneshot::Sender<Result<DeviceResponse, Lwm2mError>>;

enum Waiting {
    /// A response, possibly arriving in Block2 blocks arriving in Block2 blocks: the request to repeat for the next block and
    /// what has arrived so far.
    Blocks {
        reply: Reply,
        request: Packet,
        received: Vec<u8>,
    },
    Observe(oneshot::Sender<Result<Observation, Lwm2mError>>),
    /// A request whose body goes in Block1 blocks (RFC 7959): the whole request, how much
    /// of its body is out, and the block size the device accepts.
    Upload {
        reply: Reply,
        request: Packet,
        sent: usize,
        szx: u8,
    },
}

/// Largest response reassembled from Block2 blocks.
pub const MAX_BLOCKWISE_BODY: usize = 1024 * 1024;

impl Waiting {
    fn fail(self, error: Lwm2mError) {
        match self {
            Self::Blocks { reply, .. } | Self::Upload { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Observe(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

struct Actor {
    dtls: Arc<DtlsServer>,
    authorizer: Arc<dyn EndpointAuthorizer>,
    store: Option<Arc<RegistrationStore>>,
    /// Registry events written to the store but not yet acted on.
    unapplied: Vec<RegistryEvent>,
    registry: Registry,
    config: Arc<CoapConfig>,
    seed: u64,
    sessions: HashMap<SocketAddr, Session>,
    /// Each session's next CoAP timer, ordered: the loop finds the earliest and the due ones
    /// without looking at every session.
    timers: std::collections::BTreeSet<(std::time::Instant, SocketAddr)>,
    pending: HashMap<(SocketAddr, Token), Waiting>,
    observations: HashMap<(SocketAddr, Token), (u64, mpsc::Sender<DeviceResponse>)>,
    next_observation: u64,
    /// Requests held for sleeping queue-mode endpoints, with their deadlines.
    queued: HashMap<String, std::collections::VecDeque<(std::time::Instant, Command)>>,
    queue_awake: Duration,
    queue_limit: usize,
    events: broadcast::Sender<RegistryEvent>,
    session_events: broadcast::Sender<SessionEvent>,
    /// The latest values devices sent (LwM2M Send).
    sent: crate::send::SentStore,
}

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let dtls = Arc::clone(&self.dtls);
        // Sessions restored from the session store: their devices are registered already
        // and go on talking over them.
        for accepted in dtls.sessions().await {
            self.open_session(&accepted);
        }
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                // Sessions before their data: a session's identity is known before its
                // first request is authorized. Data before departures: what a device sent
                // just before closing (the 2.04 to a Reboot) is read before its session is
                // forgotten.
                biased;
                accepted = dtls.accept() => {
                    let Some(accepted) = accepted else { return };
                    match accepted.arrival {
                        Arrival::Moved { from } => {
                            self.move_session(from, accepted.peer, accepted.bound_name.as_deref());
                            let _ = self.session_events.send(SessionEvent::Moved { from, to: accepted.peer });
                        }
                        _ => {
                            let replaced = self.sessions.contains_key(&accepted.peer);
                            self.fail_pending(accepted.peer);
                            self.open_session(&accepted);
                            let _ = self.session_events.send(SessionEvent::Opened {
                                peer: accepted.peer,
                                identity: accepted.identity.as_ref().map(authorization_identity),
                                resumed: accepted.resumed,
                                replaced,
                            });
                        }
                    }
                }
                received = dtls.recv() => {
                    let Some((peer, data)) = received else { return };
                    let now = clock::now();
                    if let Some(session) = self.sessions.get_mut(&peer) {
                        session.last_heard = Some(now);
                        session.layer.handle_datagram(now, &data);
                        self.drive(peer).await;
                    }
                    self.flush_queue(peer).await;
                }
                departed = dtls.departed() => {
                    let Some(departed) = departed else { return };
                    if self.sessions.get(&departed.peer).is_some_and(|s| s.generation == departed.generation) {
                        self.forget_session(departed.peer);
                        self.fail_pending(departed.peer);
                        let reason = match &departed.reason {
                            crate::server::DepartReason::Closed(reason) => reason.to_string(),
                            crate::server::DepartReason::Expired => "idle timeout".to_string(),
                            _ => "evicted".to_string(),
                        };
                        let _ = self.session_events.send(SessionEvent::Closed { peer: departed.peer, reason });
                    }
                }
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => self.command(command).await,
                },
                _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => {
                    let now = clock::now();
                    self.expire_queued(now);
                    self.registry.handle_timeout(now);
                    while let Some(&(at, peer)) = self.timers.first() {
                        if at > now {
                            break;
                        }
                        self.timers.pop_first();
                        let Some(session) = self.sessions.get_mut(&peer).filter(|s| s.timer == Some(at)) else {
                            continue; // superseded
                        };
                        session.timer = None;
                        session.layer.handle_timeout(now);
                        self.drive(peer).await;
                    }
                }
            }
            self.apply_registry_events().await;
        }
    }

    fn open_session(&mut self, accepted: &Accepted) {
        let identity = accepted.identity.as_ref().map(authorization_identity);
        self.seed = self.seed.wrapping_add(1);
        let layer = Box::new(MessageLayer::new(Arc::clone(&self.config), self.seed));
        let endpoint = accepted.bound_name.as_deref().map(Box::from);
        let session =
            Session { generation: accepted.generation, identity, endpoint, last_heard: None, timer: None, layer };
        self.forget_session(accepted.peer);
        self.sessions.insert(accepted.peer, session);
    }

    /// A session's peer moved from `from` to `to` (DTLS Connection ID): everything keyed by
    /// the address follows it, and so does the registration.
    fn move_session(&mut self, from: SocketAddr, to: SocketAddr, endpoint: Option<&str>) {
        let Some(session) = self.sessions.remove(&from) else { return };
        // Whatever was at `to` is gone (the DTLS server closed it).
        self.forget_session(to);
        self.fail_pending(to);
        if let Some(at) = session.timer {
            self.timers.remove(&(at, from));
            self.timers.insert((at, to));
        }
        self.sessions.insert(to, session);
        let rekey = |map_keys: Vec<(SocketAddr, Token)>| map_keys.into_iter().filter(|(p, _)| *p == from);
        for key in rekey(self.pending.keys().copied().collect()) {
            if let Some(waiting) = self.pending.remove(&key) {
                self.pending.insert((to, key.1), waiting);
            }
        }
        for key in rekey(self.observations.keys().copied().collect()) {
            if let Some(observation) = self.observations.remove(&key) {
                self.observations.insert((to, key.1), observation);
            }
        }
        self.registry.move_peer(from, to, endpoint);
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let layers = self.timers.first().map(|(at, _)| *at);
        let queued = self.queued.values().filter_map(|q| q.front().map(|(at, _)| *at)).min();
        [self.registry.poll_timeout(), layers, queued].into_iter().flatten().min()
    }

    /// Holds `command` if `endpoint` is a sleeping queue-mode device. Returns it back if it
    /// can go now.
    fn hold_if_asleep(&mut self, endpoint: &str, command: Command) -> Option<Command> {
        let Some(registration) = self.registry.get(endpoint) else { return Some(command) };
        if registration.binding != tether_coap::registration::Binding::UdpQueue {
            return Some(command);
        }
        let now = clock::now();
        let heard =
            self.sessions.get(&registration.peer).and_then(|s| s.last_heard).unwrap_or(registration.last_update);
        if now.saturating_duration_since(heard) < self.queue_awake {
            return Some(command);
        }
        let queue = self.queued.entry(endpoint.to_string()).or_default();
        if queue.len() >= self.queue_limit {
            fail_command(command, Lwm2mError::QueueFull(endpoint.to_string()));
            return None;
        }
        queue.push_back((now + self.config.request_timeout, command));
        None
    }

    /// Sends what waits for the endpoint registered at `peer`, now that it was heard from.
    async fn flush_queue(&mut self, peer: SocketAddr) {
        if self.queued.is_empty() {
            return;
        }
        let endpoints: Vec<String> =
            self.registry.registrations().filter(|r| r.peer == peer).map(|r| r.endpoint.clone()).collect();
        for endpoint in endpoints {
            let Some(queue) = self.queued.remove(&endpoint) else { continue };
            for (_, command) in queue {
                self.command(command).await;
            }
        }
    }

    fn expire_queued(&mut self, now: std::time::Instant) {
        for queue in self.queued.values_mut() {
            while queue.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, command)) = queue.pop_front() {
                    fail_command(command, Lwm2mError::NoAnswer(RequestFailure::Timeout));
                }
            }
        }
        self.queued.retain(|_, q| !q.is_empty());
    }

    async fn command(&mut self, command: Command) {
        let endpoint = match &command {
            Command::Request { endpoint, .. } | Command::Observe { endpoint, .. } => Some(endpoint.clone()),
            _ => None,
        };
        let command = match endpoint {
            Some(endpoint) => match self.hold_if_asleep(&endpoint, command) {
                Some(command) => command,
                None => return,
            },
            None => command,
        };
        match command {
            Command::Registrations(reply) => {
                let _ = reply.send(self.registry.registrations().cloned().collect());
            }
            Command::Sent(endpoint, reply) => {
                let values = self.registry.get(&endpoint).map(|_| self.sent.values(&endpoint));
                let _ = reply.send(values);
            }
            Command::Clients(reply) => {
                let clients = self
                    .registry
                    .registrations()
                    .map(|registration| {
                        let session = self.sessions.get(&registration.peer);
                        ClientState {
                            registration: registration.clone(),
                            online: session.is_some(),
                            last_heard: session.and_then(|s| s.last_heard),
                        }
                    })
                    .collect();
                let _ = reply.send(clients);
            }
            Command::Request { endpoint, mut request, negotiate, reply } => {
                let Some(registration) = self.registry.get(&endpoint) else {
                    let _ = reply.send(Err(Lwm2mError::NotRegistered(endpoint)));
                    return;
                };
                let peer = registration.peer;
                let preferred = registration.content_format.filter(|cf| {
                    [
                        tether_coap::content::format::TLV,
                        tether_coap::content::format::SENML_JSON,
                        tether_coap::content::format::SENML_CBOR,
                    ]
                    .contains(cf)
                });
                if let (true, Some(cf)) = (negotiate, preferred) {
                    if request.get_first_option(CoapOption::Accept).is_none() {
                        request.add_option(CoapOption::Accept, encode_uint(u32::from(cf)));
                    }
                }
                let Some(session) = self.sessions.get_mut(&peer) else {
                    let _ = reply.send(Err(Lwm2mError::SessionClosed));
                    return;
                };
                let block_size = 16 << DEFAULT_SZX;
                let (first, waiting) = if request.payload.len() > block_size {
                    let first = block1_request(&request, 0, DEFAULT_SZX);
                    (first, Waiting::Upload { reply, request, sent: block_size, szx: DEFAULT_SZX })
                } else {
                    (request.clone(), Waiting::Blocks { reply, request, received: Vec::new() })
                };
                match session.layer.request(clock::now(), first, true, false) {
                    Ok(token) => {
                        self.pending.insert((peer, token), waiting);
                        self.drive(peer).await;
                    }
                    Err(err) => waiting.fail(Lwm2mError::InvalidRequest(err.to_string())),
                }
            }
            Command::Observe { endpoint, request, reply } => {
                let Some(peer) = self.registry.get(&endpoint).map(|r| r.peer) else {
                    let _ = reply.send(Err(Lwm2mError::NotRegistered(endpoint)));
                    return;
                };
                let Some(session) = self.sessions.get_mut(&peer) else {
                    let _ = reply.send(Err(Lwm2mError::SessionClosed));
                    return;
                };
                match session.layer.request(clock::now(), request, true, true) {
                    Ok(token) => {
                        self.pending.insert((peer, token), Waiting::Observe(reply));
                        self.drive(peer).await;
                    }
                    Err(err) => {
                        let _ = reply.send(Err(Lwm2mError::InvalidRequest(err.to_string())));
                    }
                }
            }
            Command::CancelObservation(id, reply) => {
                let key = self.observations.iter().find(|(_, (i, _))| *i == id).map(|(k, _)| *k);
                if let Some((peer, token)) = key {
                    self.observations.remove(&(peer, token));
                    if let Some(session) = self.sessions.get_mut(&peer) {
                        session.layer.cancel(token);
                    }
                }
                let _ = reply.send(key.is_some());
            }
        }
    }

    /// Sends a session's datagrams, acts on its CoAP events, and files its next timer.
    async fn drive(&mut self, peer: SocketAddr) {
        self.drive_events(peer).await;
        let Some(session) = self.sessions.get_mut(&peer) else { return };
        let next = session.layer.poll_timeout();
        if next == session.timer {
            return;
        }
        if let Some(old) = std::mem::replace(&mut session.timer, next) {
            self.timers.remove(&(old, peer));
        }
        if let Some(at) = next {
            self.timers.insert((at, peer));
        }
    }

    /// Drops the session of `peer` and its timer.
    fn forget_session(&mut self, peer: SocketAddr) {
        if let Some(at) = self.sessions.remove(&peer).and_then(|s| s.timer) {
            self.timers.remove(&(at, peer));
        }
    }

    async fn drive_events(&mut self, peer: SocketAddr) {
        loop {
            let Some(session) = self.sessions.get_mut(&peer) else {
                return;
            };
            let mut outgoing = Vec::new();
            while let Some(datagram) = session.layer.poll_transmit() {
                outgoing.push(datagram);
            }
            let event = session.layer.poll_event();
            for datagram in outgoing {
                // A refused send is a lost datagram; CoAP retransmission covers it.
                let _ = self.dtls.queue_to(peer, datagram).await;
            }
            let Some(event) = event else { return };
            match event {
                CoapEvent::Request { id, request } if crate::send::is_send(&request) => {
                    let Some(session) = self.sessions.get_mut(&peer) else { return };
                    // Only over the session the endpoint registered on, while registered.
                    let endpoint = session
                        .endpoint
                        .as_deref()
                        .filter(|ep| self.registry.get(ep).is_some_and(|registration| registration.peer == peer));
                    let response = match endpoint {
                        Some(endpoint) => self.sent.accept(clock::now(), endpoint, &request),
                        None => tether_coap::registration::response(ResponseType::Forbidden),
                    };
                    let _ = session.layer.respond(clock::now(), &id, response);
                }
                CoapEvent::Request { id, request } => {
                    let Some(session) = self.sessions.get_mut(&peer) else {
                        return;
                    };
                    let mut response = match &session.identity {
                        Some(identity) => self.registry.handle_request(
                            clock::now(),
                            peer,
                            identity,
                            self.authorizer.as_ref(),
                            &request,
                        ),
                        None => tether_coap::registration::response(ResponseType::Forbidden),
                    };
                    // Nothing is acknowledged before it is durable: the registry's changes
                    // are written before the answer exists. A failed write withholds the
                    // 2.01/2.04 (the device retries).
                    if !self.persist().await {
                        response = tether_coap::registration::response(ResponseType::ServiceUnavailable);
                    }
                    let Some(session) = self.sessions.get_mut(&peer) else {
                        return;
                    };
                    let _ = session.layer.respond(clock::now(), &id, response);
                }
                CoapEvent::Response { token, response } => match self.pending.remove(&(peer, token)) {
                    Some(Waiting::Blocks { reply, request, mut received }) => {
                        let block = response.get_first_option(CoapOption::Block2).and_then(|v| BlockOption::parse(v));
                        let Some(BlockOption { number, more, szx }) = block else {
                            let mut answer = device_response(response);
                            if !received.is_empty() {
                                received.extend_from_slice(&answer.payload);
                                answer.payload = received;
                            }
                            let _ = reply.send(Ok(answer));
                            continue;
                        };
                        received.extend_from_slice(&response.payload);
                        if !more {
                            let mut answer = device_response(response);
                            answer.payload = received;
                            let _ = reply.send(Ok(answer));
                            continue;
                        }
                        if received.len() > MAX_BLOCKWISE_BODY {
                            let _ = reply.send(Err(Lwm2mError::InvalidRequest("blockwise response too large".into())));
                            continue;
                        }
                        // Ask for the next block with the same request.
                        let mut next = request.clone();
                        next.clear_option(CoapOption::Block2);
                        next.add_option(CoapOption::Block2, encode_uint(((number + 1) << 4) | u32::from(szx)));
                        let Some(session) = self.sessions.get_mut(&peer) else { return };
                        match session.layer.request(clock::now(), next, true, false) {
                            Ok(token) => {
                                self.pending.insert((peer, token), Waiting::Blocks { reply, request, received });
                            }
                            Err(err) => {
                                let _ = reply.send(Err(Lwm2mError::InvalidRequest(err.to_string())));
                            }
                        }
                    }
                    Some(Waiting::Upload { reply, request, sent, szx }) => {
                        let proceed = response.header.code == MessageClass::Response(ResponseType::Continue);
                        if !proceed || sent >= request.payload.len() {
                            let _ = reply.send(Ok(device_response(response)));
                            continue;
                        }
                        // The device may ask for smaller blocks (RFC 7959 §2.5); never larger.
                        let szx = response
                            .get_first_option(CoapOption::Block1)
                            .and_then(|v| BlockOption::parse(v))
                            .map_or(szx, |b| b.szx.min(szx));
                        let next = block1_request(&request, sent, szx);
                        let sent = (sent + (16 << szx)).min(request.payload.len());
                        let Some(session) = self.sessions.get_mut(&peer) else { return };
                        match session.layer.request(clock::now(), next, true, false) {
                            Ok(token) => {
                                self.pending.insert((peer, token), Waiting::Upload { reply, request, sent, szx });
                            }
                            Err(err) => {
                                let _ = reply.send(Err(Lwm2mError::InvalidRequest(err.to_string())));
                            }
                        }
                    }
                    Some(Waiting::Observe(reply)) => {
                        let accepted = response.get_first_option(CoapOption::Observe).is_some();
                        let (tx, notifications) = mpsc::channel(NOTIFICATION_QUEUE);
                        let id = self.next_observation;
                        self.next_observation += 1;
                        if accepted {
                            self.observations.insert((peer, token), (id, tx));
                        }
                        let observation = Observation { id, first: device_response(response), notifications };
                        if reply.send(Ok(observation)).is_err() {
                            self.stop_observing(peer, token);
                        }
                    }
                    None => {}
                },
                CoapEvent::Notification { token, response } => {
                    let closed = match self.observations.get(&(peer, token)) {
                        // A full queue drops this notification; a dropped receiver ends it.
                        Some((_, tx)) => {
                            matches!(tx.try_send(device_response(response)), Err(mpsc::error::TrySendError::Closed(_)))
                        }
                        None => false,
                    };
                    if closed {
                        self.stop_observing(peer, token);
                    }
                }
                CoapEvent::RequestFailed { token, reason } => {
                    if let Some(waiting) = self.pending.remove(&(peer, token)) {
                        waiting.fail(Lwm2mError::NoAnswer(reason));
                    }
                }
                _ => {}
            }
        }
    }

    /// Writes the registry's new events to the store. False if a write failed: the
    /// registrations it concerned are discarded and must not be acknowledged.
    async fn persist(&mut self) -> bool {
        let mut durable = true;
        while let Some(event) = self.registry.poll_event() {
            let Some(store) = self.store.clone() else {
                self.unapplied.push(event);
                continue;
            };
            let now = clock::now();
            let write = event.clone();
            let written = tokio::task::spawn_blocking(move || match &write {
                RegistryEvent::Registered { registration, .. } | RegistryEvent::Updated { registration, .. } => {
                    store.save(registration, now)
                }
                RegistryEvent::Deregistered { registration } | RegistryEvent::Expired { registration } => {
                    store.remove(&registration.endpoint, &registration.id)
                }
                _ => Ok(()),
            })
            .await;
            match written {
                Ok(Ok(())) => self.unapplied.push(event),
                failed => {
                    tracing::error!(?failed, "registration store write failed; withholding acknowledgement");
                    durable = false;
                    if let RegistryEvent::Registered { registration, .. } = &event {
                        self.registry.discard(&registration.endpoint, &registration.id);
                    }
                }
            }
        }
        durable
    }

    async fn apply_registry_events(&mut self) {
        self.persist().await;
        for event in std::mem::take(&mut self.unapplied) {
            log_registry_event(&event);
            match &event {
                RegistryEvent::Registered { registration, replaced } => {
                    self.bind_endpoint(registration);
                    self.dtls.set_identity(registration.peer, registration.endpoint.clone()).await;
                    if let Some(old) = replaced.as_ref().filter(|old| old.peer != registration.peer) {
                        // Re-registered from a new address: the old session is dead weight.
                        self.dtls.close(old.peer).await;
                    }
                }
                RegistryEvent::Updated { registration, moved_from: Some(_) } => {
                    self.bind_endpoint(registration);
                    self.dtls.set_identity(registration.peer, registration.endpoint.clone()).await;
                }
                RegistryEvent::Updated { registration, moved_from: None } => self.bind_endpoint(registration),
                RegistryEvent::Deregistered { registration } | RegistryEvent::Expired { registration } => {
                    self.sent.forget(&registration.endpoint);
                    self.dtls.close(registration.peer).await;
                }
                _ => {}
            }
            let _ = self.events.send(event);
        }
    }

    /// Notes which endpoint registered over the session at its address.
    fn bind_endpoint(&mut self, registration: &Registration) {
        if let Some(session) = self.sessions.get_mut(&registration.peer) {
            if session.endpoint.as_deref() != Some(registration.endpoint.as_str()) {
                session.endpoint = Some(registration.endpoint.as_str().into());
            }
        }
    }

    /// Fails what waits on `peer`'s session and ends its observations.
    fn fail_pending(&mut self, peer: SocketAddr) {
        let keys: Vec<_> = self.pending.keys().filter(|(p, _)| *p == peer).copied().collect();
        for key in keys {
            if let Some(waiting) = self.pending.remove(&key) {
                waiting.fail(Lwm2mError::SessionClosed);
            }
        }
        self.observations.retain(|(p, _), _| *p != peer);
    }

    fn stop_observing(&mut self, peer: SocketAddr, token: Token) {
        self.observations.remove(&(peer, token));
        if let Some(session) = self.sessions.get_mut(&peer) {
            session.layer.cancel(token);
        }
    }
}

/// The identity the authorizer and the registry see: its kind and its name, `psk:<identity>`
/// or `x509:<CN>`, so that a certificate whose CN equals a PSK identity is not mistaken for it.
pub fn authorization_identity(identity: &PeerIdentity) -> String {
    match identity {
        PeerIdentity::Psk(id) => format!("psk:{}", String::from_utf8_lossy(id)),
        PeerIdentity::Certificate { common_name } => format!("x509:{common_name}"),
        other => format!("other:{other}"),
    }
}

/// Authorization for `tether serve`: PSK identities bound to endpoint names, and
/// certificates whose CN is the endpoint name (when certificates are accepted at all).
#[derive(Debug, Clone, Default)]
pub struct EndpointBindings {
    /// PSK identity → the endpoint it may register.
    pub psk: HashMap<String, String>,
    /// Whether a client certificate's CN may register as that endpoint name.
    pub certificate_cn_is_endpoint: bool,
}

impl EndpointAuthorizer for EndpointBindings {
    fn allows(&self, identity: &str, endpoint: &str) -> bool {
        if let Some(psk) = identity.strip_prefix("psk:") {
            return self.psk.get(psk).is_some_and(|e| e == endpoint);
        }
        if let Some(cn) = identity.strip_prefix("x509:") {
            return self.certificate_cn_is_endpoint && cn == endpoint;
        }
        false
    }
}

fn fail_command(command: Command, error: Lwm2mError) {
    match command {
        Command::Request { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        Command::Observe { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        _ => {}
    }
}

fn device_response(response: Packet) -> DeviceResponse {
    let code = match response.header.code {
        MessageClass::Response(code) => code,
        _ => ResponseType::UnKnown,
    };
    let content_format = response.get_first_option(CoapOption::ContentFormat).and_then(|v| decode_uint(v));
    DeviceResponse { code, content_format, payload: response.payload }
}
