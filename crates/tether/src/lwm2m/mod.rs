//! `Lwm2mServer`: the LwM2M server runtime over a [`DtlsServer`].
//!
//! One task (the actor, `actor.rs`) owns the registry and one CoAP message layer per DTLS
//! session. Devices register over the session they opened; every server-initiated request
//! (Read, Write, Execute, …) goes back over that same session: the server never dials out and
//! never opens a second handshake. Sessions are named by their [`SessionHandle`]: a request
//! goes to the session the endpoint's registration is bound to, which is always one of the
//! registration's own identity, never to whatever session now holds the device's last
//! address.

mod actor;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_coap::coap_lite::{CoapOption, Packet, RequestType, ResponseType};
use tether_coap::message::{CoapConfig, RequestFailure};
use tether_coap::registration::{EndpointAuthorizer, Registration, Registry, RegistryEvent};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::clock;
pub use crate::send::SentValue;
use crate::server::{DtlsServer, ServerSendError};
use crate::store::RegistrationStore;
use tether_proto::dtls::{PeerIdentity, SessionHandle};

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

/// Largest response reassembled from Block2 blocks.
pub const MAX_BLOCKWISE_BODY: usize = 1024 * 1024;

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
    Ping(oneshot::Sender<()>),
    /// Registrations another node served, adopted with their sessions (already stored).
    Adopt(Vec<Registration>, oneshot::Sender<()>),
    /// From now, Updates for registrations this node does not serve are claimed through
    /// these; the claims' outcomes come back on the sender.
    ClaimWith(Arc<dyn RegistrationClaims>, mpsc::WeakSender<Command>),
    /// A claim's outcome: registration id, and the registration if it is this node's now.
    Claimed(String, Option<Registration>),
    /// Another node claimed registration id: let it go.
    Release(String),
}

/// How a node of a cluster takes over the registration of a device that moved to it (one
/// without a Connection ID, whose node died and whose load balancer flow now ends here):
/// when it sends an Update for a registration this node does not serve, the registration
/// is claimed from the store, if the device's identity registered it, and served here.
pub trait RegistrationClaims: Send + Sync + std::fmt::Debug {
    /// Moves registration `id` of `identity` to this node (and tells the node that served
    /// it to let go); `None` if there is none such.
    fn claim(&self, id: String, identity: String) -> futures::future::BoxFuture<'static, Option<Registration>>;
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
        /// The session.
        session: SessionHandle,
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
        /// The session.
        session: SessionHandle,
        /// The old address.
        from: SocketAddr,
        /// The new one.
        to: SocketAddr,
    },
    /// Adopted from a node of the cluster whose lease ran out: the same session, held here
    /// now.
    Adopted {
        /// The session.
        session: SessionHandle,
        /// The device's address.
        peer: SocketAddr,
        /// The node that held it.
        from: tether_proto::dtls::NodeId,
    },
    /// The session ended.
    Closed {
        /// The session.
        session: SessionHandle,
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
    pub async fn start(
        dtls: Arc<DtlsServer>,
        authorizer: Arc<dyn EndpointAuthorizer>,
        store: Option<Arc<dyn RegistrationStore>>,
        config: Lwm2mServerConfig,
    ) -> Result<Self, crate::store::StoreError> {
        let (commands, command_rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        // For live views only (a reader that falls behind is told it lagged): a small ring,
        // allocated up front whether anyone listens or not.
        let (session_events, _) = broadcast::channel(SESSION_EVENT_BACKLOG);
        let mut registry = Registry::new(config.seed);
        if let Some(store) = &store {
            for registration in store.load(clock::now()).await? {
                registry.restore(registration);
            }
        }
        let actor = actor::Actor::new(
            Arc::clone(&dtls),
            authorizer,
            store,
            registry,
            &config,
            events.clone(),
            session_events.clone(),
        );
        tokio::spawn(actor.run(command_rx));
        Ok(Self { commands, events, session_events, dtls })
    }

    /// Whether the server's task answers: false once it has ended (it never ends while the
    /// server is up).
    pub async fn is_alive(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Ping(tx)).await.is_ok() && rx.await.is_ok()
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

    /// Serves `registrations`, adopted (already stored) from a node of the cluster whose
    /// lease ran out, with their sessions; call before the sessions are adopted.
    pub async fn adopt(&self, registrations: Vec<Registration>) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Adopt(registrations, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Claims registrations through `claims` when a device that moved here from another
    /// node sends an Update (see [`RegistrationClaims`]).
    pub async fn claim_with(&self, claims: Arc<dyn RegistrationClaims>) {
        let _ = self.commands.send(Command::ClaimWith(claims, self.commands.downgrade())).await;
    }

    /// Lets go of registration `id` without an event: another node claimed it.
    pub async fn release(&self, id: String) {
        let _ = self.commands.send(Command::Release(id)).await;
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

use tether_coap::packet::encode_uint;
/// A request with `path`'s segments as Uri-Path options (`tether_coap::packet::request`).
pub use tether_coap::packet::request as build;

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
