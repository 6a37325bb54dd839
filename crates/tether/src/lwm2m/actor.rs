//! The task behind an [`Lwm2mServer`](super::Lwm2mServer): the registry, one CoAP message
//! layer per DTLS session (by [`SessionHandle`]), the requests waiting for devices' answers,
//! observations, and queue mode.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_coap::block::{block1_request, BlockOption, DEFAULT_SZX};
use tether_coap::coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_coap::message::{CoapConfig, CoapEvent, IncomingRequest, MessageLayer, RequestFailure, Token};
use tether_coap::packet::{decode_uint, encode_uint};
use tether_coap::registration::{Binding, EndpointAuthorizer, Origin, Registration, Registry, RegistryEvent};
use tether_proto::dtls::{CloseReason, SessionHandle};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    authorization_identity, ClientState, Command, DeviceResponse, Lwm2mError, Lwm2mServerConfig, Observation,
    RegistrationClaims, SessionEvent, MAX_BLOCKWISE_BODY, NOTIFICATION_QUEUE,
};
use crate::client::sleep_until;
use crate::clock;
use crate::oplog::LogBudget;
use crate::server::{Accepted, Arrival, DepartReason, DtlsServer};
use crate::store::{RegistrationStore, RegistrationWrite, StoreError};

/// Refused registrations logged per window at most (any authenticated device can cause them).
const REFUSAL_LOG_BURST: u32 = 10;
/// The window of [`REFUSAL_LOG_BURST`].
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

/// One DTLS session as the LwM2M layer sees it.
struct Session {
    /// Its authenticated identity (`psk:…`, `x509:…`).
    identity: Option<String>,
    /// Where its datagrams come from now (shown; never used to route).
    peer: SocketAddr,
    /// When the peer last sent anything (queue mode).
    last_heard: Option<Instant>,
    /// Adopted from a node of the cluster that died, and not heard from since: the
    /// device's flow through the load balancer was bound to that node, so nothing reaches
    /// it before it sends again (requests wait, as for a sleeping device).
    awaiting_contact: bool,
    /// The CoAP layer's next timer, as filed in the actor's timer set.
    timer: Option<Instant>,
    /// Boxed: the session table stays small and dense with thousands of devices.
    layer: Box<MessageLayer>,
}

type Reply = oneshot::Sender<Result<DeviceResponse, Lwm2mError>>;

/// A request sent to a device, waiting for its answer.
enum Waiting {
    /// A response, possibly arriving in Block2 blocks: the request to repeat for the next
    /// block and what has arrived so far.
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

pub(super) struct Actor {
    dtls: Arc<DtlsServer>,
    authorizer: Arc<dyn EndpointAuthorizer>,
    store: Option<Arc<dyn RegistrationStore>>,
    /// Registry changes gathered for the next write, with the answers they hold back.
    gathering: Batch,
    /// The batch being written, and where its outcome arrives.
    writing: Option<(Batch, oneshot::Receiver<Result<(), StoreError>>)>,
    /// Registry changes to act on (durable, or needing no store).
    pending_effects: Vec<RegistryEvent>,
    /// For each endpoint whose registration or de-registration is not yet durable, what was
    /// last acknowledged of it (`None`: not registered): what the API shows, so a listing
    /// never holds a registration a crash could still take back. (Updates and moves show at
    /// once: an address or a lifetime is not an acknowledgement.)
    acknowledged: HashMap<String, Option<Registration>>,
    registry: Registry,
    config: Arc<CoapConfig>,
    seed: u64,
    sessions: HashMap<SessionHandle, Session>,
    /// Each session's next CoAP timer, ordered: the loop finds the earliest and the due ones
    /// without looking at every session.
    timers: BTreeSet<(Instant, SessionHandle)>,
    pending: HashMap<(SessionHandle, Token), Waiting>,
    observations: HashMap<(SessionHandle, Token), (u64, mpsc::Sender<DeviceResponse>)>,
    next_observation: u64,
    /// Requests held for sleeping queue-mode endpoints, with their deadlines.
    queued: HashMap<String, VecDeque<(Instant, Command)>>,
    queue_awake: Duration,
    queue_limit: usize,
    events: broadcast::Sender<RegistryEvent>,
    session_events: broadcast::Sender<SessionEvent>,
    /// The latest values devices sent (LwM2M Send).
    sent: crate::send::SentStore,
    refusal_log: LogBudget,
    /// In a cluster: how registrations of devices that moved here are claimed, and where
    /// the claims' outcomes come back.
    claims: Option<(Arc<dyn RegistrationClaims>, mpsc::WeakSender<Command>)>,
    /// Updates held while their registration is claimed, by registration id.
    claiming: HashMap<String, Vec<(SessionHandle, IncomingRequest, Packet)>>,
}

/// Claims in flight at most; an Update beyond it is answered 4.04 (the device registers
/// anew).
const MAX_CLAIMS: usize = 1024;
/// Retransmissions of one Update held while its claim runs.
const MAX_HELD_PER_CLAIM: usize = 4;

impl Actor {
    pub(super) fn new(
        dtls: Arc<DtlsServer>,
        authorizer: Arc<dyn EndpointAuthorizer>,
        store: Option<Arc<dyn RegistrationStore>>,
        registry: Registry,
        config: &Lwm2mServerConfig,
        events: broadcast::Sender<RegistryEvent>,
        session_events: broadcast::Sender<SessionEvent>,
    ) -> Self {
        Self {
            dtls,
            authorizer,
            store,
            gathering: Batch::default(),
            writing: None,
            pending_effects: Vec::new(),
            acknowledged: HashMap::new(),
            registry,
            config: Arc::new(config.coap.clone()),
            seed: config.seed,
            sessions: HashMap::new(),
            timers: BTreeSet::new(),
            pending: HashMap::new(),
            observations: HashMap::new(),
            next_observation: 1,
            queued: HashMap::new(),
            queue_awake: config.queue_awake,
            queue_limit: config.queue_limit,
            events,
            session_events,
            sent: crate::send::SentStore::default(),
            refusal_log: LogBudget::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_BURST),
            claims: None,
            claiming: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let dtls = Arc::clone(&self.dtls);
        // Sessions restored from the session store: their devices are registered already
        // (each registration names its session) and go on talking over them.
        for accepted in dtls.sessions().await {
            self.open_session(&accepted);
            if let Some(registration) = self.registry.by_session(accepted.handle) {
                self.dtls.bind_name(accepted.handle, registration.endpoint.clone()).await;
            }
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
                    self.accepted(&accepted);
                    if let Arrival::Adopted { .. } = accepted.arrival {
                        if let Some(registration) = self.registry.by_session(accepted.handle) {
                            self.dtls.bind_name(accepted.handle, registration.endpoint.clone()).await;
                        }
                    }
                }
                received = dtls.recv() => {
                    let Some((handle, data)) = received else { return };
                    let now = clock::now();
                    if let Some(session) = self.sessions.get_mut(&handle) {
                        session.last_heard = Some(now);
                        session.awaiting_contact = false;
                        session.layer.handle_datagram(now, &data);
                        self.drive(handle).await;
                    }
                    self.flush_queue(handle).await;
                }
                departed = dtls.departed() => {
                    let Some(departed) = departed else { return };
                    if self.sessions.contains_key(&departed.handle) {
                        self.forget_session(departed.handle);
                        self.fail_pending(departed.handle);
                        if departed.reason == DepartReason::Closed(CloseReason::HandedOver) {
                            // Another node adopted the session, and its registration with it.
                            if let Some(registration) = self.registry.hand_over(departed.handle) {
                                self.acknowledged.remove(&registration.endpoint);
                                tracing::info!(endpoint = %registration.endpoint, "registration handed over");
                            }
                        }
                        let reason = match &departed.reason {
                            DepartReason::Closed(reason) => reason.to_string(),
                            DepartReason::Expired => "idle timeout".to_string(),
                            _ => "evicted".to_string(),
                        };
                        let event = SessionEvent::Closed { session: departed.handle, peer: departed.peer, reason };
                        let _ = self.session_events.send(event);
                    }
                }
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => self.command(command).await,
                },
                outcome = written(&mut self.writing), if self.writing.is_some() => self.written(outcome).await,
                _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => {
                    let now = clock::now();
                    self.expire_queued(now);
                    self.registry.handle_timeout(now);
                    while let Some(&(at, handle)) = self.timers.first() {
                        if at > now {
                            break;
                        }
                        self.timers.pop_first();
                        let Some(session) = self.sessions.get_mut(&handle).filter(|s| s.timer == Some(at)) else {
                            continue; // superseded
                        };
                        session.timer = None;
                        session.layer.handle_timeout(now);
                        self.drive(handle).await;
                    }
                }
            }
            self.gather();
            self.take_effect().await;
            self.start_write();
        }
    }

    /// A session opened, was restored, or moved.
    fn accepted(&mut self, accepted: &Accepted) {
        let handle = accepted.handle;
        match accepted.arrival {
            Arrival::Moved { from } => {
                if let Some(session) = self.sessions.get_mut(&handle) {
                    session.peer = accepted.peer;
                }
                self.registry.session_moved(handle, accepted.peer);
                let _ = self.session_events.send(SessionEvent::Moved { session: handle, from, to: accepted.peer });
            }
            Arrival::Handshake { replaced } => {
                self.open_session(accepted);
                if let Some(old) = replaced {
                    // The old session is going: what waited on it fails, and its
                    // registration follows only a session of its own identity.
                    self.fail_pending(old);
                    if let Some(identity) = self.sessions.get(&handle).and_then(|s| s.identity.clone()) {
                        let origin = Origin { session: handle, peer: accepted.peer, identity: &identity };
                        self.registry.session_replaced(old, origin);
                    }
                }
                let _ = self.session_events.send(SessionEvent::Opened {
                    session: handle,
                    peer: accepted.peer,
                    identity: accepted.identity.as_ref().map(authorization_identity),
                    resumed: accepted.resumed,
                    replaced: replaced.is_some(),
                });
            }
            Arrival::Adopted { from } => {
                self.open_session(accepted);
                let _ = self.session_events.send(SessionEvent::Adopted { session: handle, peer: accepted.peer, from });
            }
            _ => self.open_session(accepted),
        }
    }

    fn open_session(&mut self, accepted: &Accepted) {
        let identity = accepted.identity.as_ref().map(authorization_identity);
        self.seed = self.seed.wrapping_add(1);
        let layer = Box::new(MessageLayer::new(Arc::clone(&self.config), self.seed));
        let awaiting_contact = matches!(accepted.arrival, Arrival::Adopted { .. });
        let session = Session { identity, peer: accepted.peer, last_heard: None, awaiting_contact, timer: None, layer };
        self.forget_session(accepted.handle);
        self.sessions.insert(accepted.handle, session);
    }

    /// Every registration as last acknowledged: the registry, but for changes not yet
    /// durable, which show as they were before.
    fn acknowledged_registrations(&self) -> Vec<Registration> {
        let current = self.registry.registrations().filter(|r| !self.acknowledged.contains_key(&r.endpoint));
        current.chain(self.acknowledged.values().flatten()).cloned().collect()
    }

    /// The session requests to `registration` go over: the one it is bound to, if it is
    /// open and of the registration's identity. `None`: the device is offline.
    fn route(&self, registration: &Registration) -> Option<SessionHandle> {
        let handle = registration.session?;
        let session = self.sessions.get(&handle)?;
        (session.identity.as_deref() == Some(registration.identity.as_str())).then_some(handle)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let layers = self.timers.first().map(|(at, _)| *at);
        let queued = self.queued.values().filter_map(|q| q.front().map(|(at, _)| *at)).min();
        [self.registry.poll_timeout(), layers, queued].into_iter().flatten().min()
    }

    /// Holds `command` if `endpoint` is a sleeping queue-mode device. Returns it back if it
    /// can go now.
    fn hold_if_asleep(&mut self, endpoint: &str, command: Command) -> Option<Command> {
        let Some(registration) = self.registry.get(endpoint) else { return Some(command) };
        let session = self.route(registration).and_then(|handle| self.sessions.get(&handle));
        let unreachable = session.is_some_and(|s| s.awaiting_contact);
        if registration.binding != Binding::UdpQueue && !unreachable {
            return Some(command);
        }
        let now = clock::now();
        let heard = session.and_then(|s| s.last_heard).unwrap_or(registration.last_update);
        if !unreachable && now.saturating_duration_since(heard) < self.queue_awake {
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

    /// Sends what waits for the endpoint registered over `handle`, now that it was heard
    /// from.
    async fn flush_queue(&mut self, handle: SessionHandle) {
        if self.queued.is_empty() {
            return;
        }
        let Some(endpoint) = self.registry.by_session(handle).map(|r| r.endpoint.clone()) else { return };
        let Some(queue) = self.queued.remove(&endpoint) else { return };
        for (_, command) in queue {
            self.command(command).await;
        }
    }

    fn expire_queued(&mut self, now: Instant) {
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
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::Adopt(registrations, reply) => {
                for registration in registrations {
                    let session = registration.session;
                    tracing::info!(endpoint = %registration.endpoint, "registration adopted");
                    self.registry.restore(registration);
                    // A session adopted before its registration: bind it now.
                    if let Some(handle) = session.filter(|h| self.sessions.contains_key(h)) {
                        if let Some(registration) = self.registry.by_session(handle) {
                            self.dtls.bind_name(handle, registration.endpoint.clone()).await;
                        }
                    }
                }
                let _ = reply.send(());
            }
            Command::ClaimWith(claims, commands) => self.claims = Some((claims, commands)),
            Command::Claimed(id, claimed) => self.claimed(id, claimed).await,
            Command::Release(id) => {
                if let Some(registration) = self.registry.release(&id) {
                    self.acknowledged.remove(&registration.endpoint);
                    tracing::info!(endpoint = %registration.endpoint, "registration claimed by another node");
                }
            }
            Command::Registrations(reply) => {
                let _ = reply.send(self.acknowledged_registrations());
            }
            Command::Sent(endpoint, reply) => {
                let values = self.registry.get(&endpoint).map(|_| self.sent.values(&endpoint));
                let _ = reply.send(values);
            }
            Command::Clients(reply) => {
                let clients = self
                    .acknowledged_registrations()
                    .into_iter()
                    .map(|registration| {
                        let session = self.route(&registration).and_then(|handle| self.sessions.get(&handle));
                        let (online, last_heard) = (session.is_some(), session.and_then(|s| s.last_heard));
                        ClientState { registration, online, last_heard }
                    })
                    .collect();
                let _ = reply.send(clients);
            }
            Command::Request { endpoint, mut request, negotiate, reply } => {
                let Some(registration) = self.registry.get(&endpoint) else {
                    let _ = reply.send(Err(Lwm2mError::NotRegistered(endpoint)));
                    return;
                };
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
                let Some(handle) = self.route(registration) else {
                    let _ = reply.send(Err(Lwm2mError::SessionClosed));
                    return;
                };
                let Some(session) = self.sessions.get_mut(&handle) else { return };
                let block_size = 16 << DEFAULT_SZX;
                let (first, waiting) = if request.payload.len() > block_size {
                    let first = block1_request(&request, 0, DEFAULT_SZX);
                    (first, Waiting::Upload { reply, request, sent: block_size, szx: DEFAULT_SZX })
                } else {
                    (request.clone(), Waiting::Blocks { reply, request, received: Vec::new() })
                };
                match session.layer.request(clock::now(), first, true, false) {
                    Ok(token) => {
                        self.pending.insert((handle, token), waiting);
                        self.drive(handle).await;
                    }
                    Err(err) => waiting.fail(Lwm2mError::InvalidRequest(err.to_string())),
                }
            }
            Command::Observe { endpoint, request, reply } => {
                let Some(registration) = self.registry.get(&endpoint) else {
                    let _ = reply.send(Err(Lwm2mError::NotRegistered(endpoint)));
                    return;
                };
                let Some(handle) = self.route(registration) else {
                    let _ = reply.send(Err(Lwm2mError::SessionClosed));
                    return;
                };
                let Some(session) = self.sessions.get_mut(&handle) else { return };
                match session.layer.request(clock::now(), request, true, true) {
                    Ok(token) => {
                        self.pending.insert((handle, token), Waiting::Observe(reply));
                        self.drive(handle).await;
                    }
                    Err(err) => {
                        let _ = reply.send(Err(Lwm2mError::InvalidRequest(err.to_string())));
                    }
                }
            }
            Command::CancelObservation(id, reply) => {
                let key = self.observations.iter().find(|(_, (i, _))| *i == id).map(|(k, _)| *k);
                if let Some((handle, token)) = key {
                    self.stop_observing(handle, token);
                }
                let _ = reply.send(key.is_some());
            }
        }
    }

    /// Sends a session's datagrams, acts on its CoAP events, and files its next timer.
    async fn drive(&mut self, handle: SessionHandle) {
        self.drive_events(handle).await;
        let Some(session) = self.sessions.get_mut(&handle) else { return };
        let next = session.layer.poll_timeout();
        if next == session.timer {
            return;
        }
        if let Some(old) = std::mem::replace(&mut session.timer, next) {
            self.timers.remove(&(old, handle));
        }
        if let Some(at) = next {
            self.timers.insert((at, handle));
        }
    }

    /// Drops session `handle` and its timer.
    fn forget_session(&mut self, handle: SessionHandle) {
        if let Some(at) = self.sessions.remove(&handle).and_then(|s| s.timer) {
            self.timers.remove(&(at, handle));
        }
    }

    async fn drive_events(&mut self, handle: SessionHandle) {
        loop {
            let Some(session) = self.sessions.get_mut(&handle) else { return };
            let mut outgoing = Vec::new();
            while let Some(datagram) = session.layer.poll_transmit() {
                outgoing.push(datagram);
            }
            let event = session.layer.poll_event();
            for datagram in outgoing {
                // A refused send is a lost datagram; CoAP retransmission covers it.
                let _ = self.dtls.queue_to(handle, datagram).await;
            }
            let Some(event) = event else { return };
            match event {
                CoapEvent::Request { id, request } => {
                    let Some(response) = self.device_request(handle, &id, &request) else { continue };
                    let Some(session) = self.sessions.get_mut(&handle) else { return };
                    let _ = session.layer.respond(clock::now(), &id, response);
                }
                CoapEvent::Response { token, response } => self.device_response(handle, token, response),
                CoapEvent::Notification { token, response } => {
                    let closed = match self.observations.get(&(handle, token)) {
                        // A full queue drops this notification; a dropped receiver ends it.
                        Some((_, tx)) => {
                            matches!(tx.try_send(device_response(response)), Err(mpsc::error::TrySendError::Closed(_)))
                        }
                        None => false,
                    };
                    if closed {
                        self.stop_observing(handle, token);
                    }
                }
                CoapEvent::RequestFailed { token, reason } => {
                    if let Some(waiting) = self.pending.remove(&(handle, token)) {
                        waiting.fail(Lwm2mError::NoAnswer(reason));
                    }
                }
                _ => {}
            }
        }
    }

    /// The answer to a request a device sent over session `handle`: a Send (only over the
    /// session its registration is bound to) or the registration interface. `None`: the
    /// answer waits until the change it acknowledges is durable ([`written`](Self::written)).
    fn device_request(&mut self, handle: SessionHandle, id: &IncomingRequest, request: &Packet) -> Option<Packet> {
        let Some(session) = self.sessions.get(&handle) else {
            return Some(tether_coap::registration::response(ResponseType::Forbidden));
        };
        if crate::send::is_send(request) {
            let registration = self.registry.by_session(handle);
            return Some(match registration.filter(|r| session.identity.as_deref() == Some(r.identity.as_str())) {
                Some(registration) => self.sent.accept(clock::now(), &registration.endpoint.clone(), request),
                None => tether_coap::registration::response(ResponseType::Forbidden),
            });
        }
        let Some(identity) = session.identity.clone() else {
            return Some(tether_coap::registration::response(ResponseType::Forbidden));
        };
        if self.hold_for_claim(handle, id, request, &identity) {
            return None;
        }
        self.registration_request(handle, id, request, &identity)
    }

    /// A request on the registration interface from session `handle` of `identity`.
    fn registration_request(
        &mut self,
        handle: SessionHandle,
        id: &IncomingRequest,
        request: &Packet,
        identity: &str,
    ) -> Option<Packet> {
        let Some(session) = self.sessions.get(&handle) else {
            return Some(tether_coap::registration::response(ResponseType::Forbidden));
        };
        let origin = Origin { session: handle, peer: session.peer, identity };
        let response = self.registry.handle_request(clock::now(), origin, self.authorizer.as_ref(), request);
        // Nothing is acknowledged before it is durable: a change waits in the batch being
        // gathered, its answer with it.
        if !self.gather() {
            return Some(response);
        }
        self.gathering.answers.push(HeldAnswer { session: handle, request: id.clone(), response });
        None
    }

    /// An Update for a registration this node does not serve, from a device that moved here
    /// (a cluster's node died, and the load balancer's flow for the device ends here now):
    /// held while the registration is claimed, answered once it is here (or 4.04 if there is
    /// none of this identity). `false`: not such a request; answer it now.
    fn hold_for_claim(
        &mut self,
        handle: SessionHandle,
        incoming: &IncomingRequest,
        request: &Packet,
        identity: &str,
    ) -> bool {
        let Some((claims, commands)) = &self.claims else { return false };
        if request.header.code != MessageClass::Request(RequestType::Post) {
            return false;
        }
        let path = tether_coap::registration::uri_path(request);
        let [rd, id] = path.as_slice() else { return false };
        if rd != "rd" || self.registry.contains_id(id) {
            return false;
        }
        if let Some(waiting) = self.claiming.get_mut(id.as_str()) {
            // A retransmission while the claim runs: answered with the first.
            if waiting.len() < MAX_HELD_PER_CLAIM {
                waiting.push((handle, incoming.clone(), request.clone()));
            }
            return true;
        }
        if self.claiming.len() >= MAX_CLAIMS {
            return false;
        }
        self.claiming.insert(id.clone(), vec![(handle, incoming.clone(), request.clone())]);
        let (claims, commands) = (Arc::clone(claims), commands.clone());
        let (id, identity) = (id.clone(), identity.to_string());
        tokio::spawn(async move {
            let claimed = claims.claim(id.clone(), identity).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(Command::Claimed(id, claimed)).await;
            }
        });
        true
    }

    /// A claim's outcome: the registration served here if it was claimed, and the Updates
    /// held for it answered.
    async fn claimed(&mut self, id: String, claimed: Option<Registration>) {
        let waiting = self.claiming.remove(&id).unwrap_or_default();
        if let Some(registration) = claimed {
            tracing::info!(endpoint = %registration.endpoint, "registration claimed: its device moved to this node");
            self.registry.restore(registration);
        }
        for (handle, incoming, request) in waiting {
            let Some(identity) = self.sessions.get(&handle).and_then(|s| s.identity.clone()) else { continue };
            let Some(response) = self.registration_request(handle, &incoming, &request, &identity) else { continue };
            if let Some(session) = self.sessions.get_mut(&handle) {
                let _ = session.layer.respond(clock::now(), &incoming, response);
            }
            self.drive(handle).await;
        }
    }

    /// A device answered a request of ours over session `handle`.
    fn device_response(&mut self, handle: SessionHandle, token: Token, response: Packet) {
        match self.pending.remove(&(handle, token)) {
            Some(Waiting::Blocks { reply, request, mut received }) => {
                let block = response.get_first_option(CoapOption::Block2).and_then(|v| BlockOption::parse(v));
                let Some(BlockOption { number, more, szx }) = block else {
                    let mut answer = device_response(response);
                    if !received.is_empty() {
                        received.extend_from_slice(&answer.payload);
                        answer.payload = received;
                    }
                    let _ = reply.send(Ok(answer));
                    return;
                };
                received.extend_from_slice(&response.payload);
                if !more {
                    let mut answer = device_response(response);
                    answer.payload = received;
                    let _ = reply.send(Ok(answer));
                    return;
                }
                if received.len() > MAX_BLOCKWISE_BODY {
                    let _ = reply.send(Err(Lwm2mError::InvalidRequest("blockwise response too large".into())));
                    return;
                }
                // Ask for the next block with the same request.
                let mut next = request.clone();
                next.clear_option(CoapOption::Block2);
                next.add_option(CoapOption::Block2, encode_uint(((number + 1) << 4) | u32::from(szx)));
                self.request_next(handle, next, Waiting::Blocks { reply, request, received });
            }
            Some(Waiting::Upload { reply, request, sent, szx }) => {
                let proceed = response.header.code == MessageClass::Response(ResponseType::Continue);
                if !proceed || sent >= request.payload.len() {
                    let _ = reply.send(Ok(device_response(response)));
                    return;
                }
                // The device may ask for smaller blocks (RFC 7959 §2.5); never larger.
                let szx = response
                    .get_first_option(CoapOption::Block1)
                    .and_then(|v| BlockOption::parse(v))
                    .map_or(szx, |b| b.szx.min(szx));
                let next = block1_request(&request, sent, szx);
                let sent = (sent + (16 << szx)).min(request.payload.len());
                self.request_next(handle, next, Waiting::Upload { reply, request, sent, szx });
            }
            Some(Waiting::Observe(reply)) => {
                let accepted = response.get_first_option(CoapOption::Observe).is_some();
                let (tx, notifications) = mpsc::channel(NOTIFICATION_QUEUE);
                let id = self.next_observation;
                self.next_observation += 1;
                if accepted {
                    self.observations.insert((handle, token), (id, tx));
                }
                let observation = Observation { id, first: device_response(response), notifications };
                if reply.send(Ok(observation)).is_err() {
                    self.stop_observing(handle, token);
                }
            }
            None => {}
        }
    }

    /// Sends the next request of a blockwise exchange; `waiting` waits for its answer.
    fn request_next(&mut self, handle: SessionHandle, next: Packet, waiting: Waiting) {
        let Some(session) = self.sessions.get_mut(&handle) else {
            waiting.fail(Lwm2mError::SessionClosed);
            return;
        };
        match session.layer.request(clock::now(), next, true, false) {
            Ok(token) => {
                self.pending.insert((handle, token), waiting);
            }
            Err(err) => waiting.fail(Lwm2mError::InvalidRequest(err.to_string())),
        }
    }

    /// Takes the registry's new events: refusals (nothing to store) are acted on at once;
    /// changes join the batch being gathered, or, with no store, are acted on at once. True
    /// if a change joined the batch.
    fn gather(&mut self) -> bool {
        let mut gathered = false;
        while let Some(event) = self.registry.poll_event() {
            if self.store.is_none() || matches!(event, RegistryEvent::Refused { .. }) {
                self.pending_effects.push(event);
                continue;
            }
            let before = match &event {
                RegistryEvent::Registered { registration, replaced } => {
                    Some((&registration.endpoint, replaced.as_deref().cloned()))
                }
                RegistryEvent::Deregistered { registration } => {
                    Some((&registration.endpoint, Some(registration.clone())))
                }
                _ => None,
            };
            if let Some((endpoint, before)) = before {
                self.acknowledged.entry(endpoint.clone()).or_insert(before);
            }
            self.gathering.events.push(event);
            gathered = true;
        }
        gathered
    }

    /// Hands the gathered batch to the store, unless one is being written: one transaction
    /// for every change gathered meanwhile (a burst of registrations costs a few commits, not
    /// one each), and the loop goes on serving while it is written.
    fn start_write(&mut self) {
        let Some(store) = self.store.clone() else { return };
        if self.writing.is_some() || self.gathering.events.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.gathering);
        let writes = batch.events.iter().filter_map(write_for).collect();
        let (done, outcome) = oneshot::channel();
        tokio::spawn(async move {
            let _ = done.send(store.apply(writes, clock::now()).await);
        });
        self.writing = Some((batch, outcome));
    }

    /// The batch being written is durable, or failed. Durable: its changes take effect
    /// (sessions bound and closed, events published) and its answers go out. Failed: it and
    /// the batch gathered since (which may build on it) are taken back, newest first, so the
    /// registry is again what was last acknowledged, and their answers are 5.03 (the devices
    /// try again).
    async fn written(&mut self, outcome: Result<(), StoreError>) {
        let Some((batch, _)) = self.writing.take() else { return };
        match outcome {
            Ok(()) => {
                // What is durable now, per endpoint: the last change of this batch, unless
                // a newer one is already gathered.
                for event in &batch.events {
                    let (endpoint, after) = match event {
                        RegistryEvent::Registered { registration, .. } => {
                            (&registration.endpoint, Some(registration.clone()))
                        }
                        RegistryEvent::Deregistered { registration } => (&registration.endpoint, None),
                        _ => continue,
                    };
                    if self.gathering.touches(endpoint) {
                        self.acknowledged.insert(endpoint.clone(), after);
                    } else {
                        self.acknowledged.remove(endpoint);
                    }
                }
                self.pending_effects.extend(batch.events);
                self.take_effect().await;
                self.answer(batch.answers, None).await;
            }
            Err(err) => {
                tracing::error!(%err, "registration store write failed; withholding acknowledgement");
                let gathered = std::mem::take(&mut self.gathering);
                for event in gathered.events.iter().rev().chain(batch.events.iter().rev()) {
                    self.registry.undo(event);
                }
                self.acknowledged.clear();
                let unavailable = Some(tether_coap::registration::response(ResponseType::ServiceUnavailable));
                self.answer(batch.answers, unavailable.clone()).await;
                self.answer(gathered.answers, unavailable).await;
            }
        }
    }

    /// Sends held answers (or `instead` of each).
    async fn answer(&mut self, answers: Vec<HeldAnswer>, instead: Option<Packet>) {
        let now = clock::now();
        for HeldAnswer { session, request, response } in answers {
            let Some(open) = self.sessions.get_mut(&session) else { continue };
            let _ = open.layer.respond(now, &request, instead.clone().unwrap_or(response));
            self.drive(session).await;
        }
    }

    /// Acts on registry changes that are durable (or need no store).
    async fn take_effect(&mut self) {
        for event in std::mem::take(&mut self.pending_effects) {
            self.log_registry_event(&event);
            match &event {
                RegistryEvent::Registered { registration, replaced } => {
                    if let Some(session) = registration.session {
                        self.dtls.bind_name(session, registration.endpoint.clone()).await;
                    }
                    // Registered again over another session: the old one is dead weight.
                    if let Some(old) = replaced.as_ref().and_then(|old| old.session) {
                        if registration.session != Some(old) {
                            self.dtls.close(old).await;
                        }
                    }
                }
                RegistryEvent::Updated { registration, previous } if registration.session != previous.session => {
                    if let Some(session) = registration.session {
                        self.dtls.bind_name(session, registration.endpoint.clone()).await;
                    }
                }
                RegistryEvent::Deregistered { registration } | RegistryEvent::Expired { registration } => {
                    self.sent.forget(&registration.endpoint);
                    // Only the registration's own session: never one that merely holds an
                    // address it once had.
                    if let Some(session) = registration.session {
                        self.dtls.close(session).await;
                    }
                }
                _ => {}
            }
            let _ = self.events.send(event);
        }
    }

    /// One line per registry change: what an operator follows a fleet by.
    fn log_registry_event(&mut self, event: &RegistryEvent) {
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
            RegistryEvent::Updated { registration: r, .. } => tracing::info!(
                endpoint = %r.endpoint,
                identity = %r.identity,
                peer = %r.peer,
                lifetime_s = r.lifetime.as_secs(),
                binding = r.binding.as_str(),
                objects = object_count(r),
                moved_from = event.moved_from().map(|a| a.to_string()),
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
            RegistryEvent::Refused { endpoint, identity, peer, code, reason } => {
                if let Some(held_back) = self.refusal_log.allow(clock::now()) {
                    tracing::warn!(
                        endpoint = endpoint.as_deref().unwrap_or("-"),
                        %identity,
                        %peer,
                        code = %MessageClass::Response(*code),
                        %reason,
                        held_back,
                        "registration refused"
                    );
                }
            }
            _ => {}
        }
    }

    /// Fails what waits on session `handle` and ends its observations.
    fn fail_pending(&mut self, handle: SessionHandle) {
        let keys: Vec<_> = self.pending.keys().filter(|(h, _)| *h == handle).copied().collect();
        for key in keys {
            if let Some(waiting) = self.pending.remove(&key) {
                waiting.fail(Lwm2mError::SessionClosed);
            }
        }
        self.observations.retain(|(h, _), _| *h != handle);
    }

    fn stop_observing(&mut self, handle: SessionHandle, token: Token) {
        self.observations.remove(&(handle, token));
        if let Some(session) = self.sessions.get_mut(&handle) {
            session.layer.cancel(token);
        }
    }
}

/// Registry changes written together, and the answers that wait for them.
#[derive(Default)]
struct Batch {
    events: Vec<RegistryEvent>,
    answers: Vec<HeldAnswer>,
}

impl Batch {
    /// Whether a registration or de-registration of `endpoint` is in the batch.
    fn touches(&self, endpoint: &str) -> bool {
        self.events.iter().any(|event| match event {
            RegistryEvent::Registered { registration, .. } | RegistryEvent::Deregistered { registration } => {
                registration.endpoint == endpoint
            }
            _ => false,
        })
    }
}

/// An answer to a device that acknowledges a change, sent once the change is durable.
struct HeldAnswer {
    session: SessionHandle,
    request: IncomingRequest,
    response: Packet,
}

/// The outcome of the batch being written (there must be one).
async fn written(writing: &mut Option<(Batch, oneshot::Receiver<Result<(), StoreError>>)>) -> Result<(), StoreError> {
    match writing.as_mut() {
        Some((_, outcome)) => outcome.await.unwrap_or(Err(StoreError::Interrupted)),
        None => std::future::pending().await,
    }
}

/// What storing `event` takes.
fn write_for(event: &RegistryEvent) -> Option<RegistrationWrite> {
    match event {
        RegistryEvent::Registered { registration, .. } | RegistryEvent::Updated { registration, .. } => {
            Some(RegistrationWrite::Save(Box::new(registration.clone())))
        }
        RegistryEvent::Deregistered { registration } | RegistryEvent::Expired { registration } => {
            Some(RegistrationWrite::Remove { endpoint: registration.endpoint.clone(), id: registration.id.clone() })
        }
        _ => None,
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
