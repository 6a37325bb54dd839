//! LwM2M bootstrap over DTLS (OMA LwM2M 1.1 §5.2.7): [`BootstrapServer`] configures devices
//! that ask it (client-initiated bootstrap), and [`bootstrap`] is a device's side.
//!
//! The protocol is [`tether_coap::bootstrap`] (sans-IO); this drives it over a
//! [`DtlsServer`] and a [`DtlsClient`]. A device authenticates to the bootstrap server with
//! its bootstrap PSK; the server hands an endpoint only the account configured for it, and
//! only to a DTLS identity bound to that endpoint.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_coap::bootstrap::{
    bootstrap_request_endpoint, bootstrap_requests, BootstrapClient, BootstrapError, ServerAccount,
};
use tether_coap::coap_lite::{MessageClass, Packet, ResponseType};
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer, Token};
use tether_coap::registration::{response, EndpointAuthorizer};
use tether_proto::dtls::{DtlsContext, PskKey, SessionHandle};
use tokio::sync::broadcast;

use crate::client::{local_for, sleep_until, ConnectError, DtlsClient};
use crate::clock;
use crate::lwm2m::authorization_identity;
use crate::server::DtlsServer;
use crate::socket::Socket;

/// What the bootstrap server did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapEvent {
    /// `endpoint` at `peer` finished bootstrap (answered Finish with 2.04).
    Bootstrapped {
        /// The endpoint name.
        endpoint: String,
        /// Its address.
        peer: SocketAddr,
    },
    /// A Bootstrap-Request was refused, or a bootstrap did not finish.
    Failed {
        /// The endpoint name, if the request named one.
        endpoint: Option<String>,
        /// Its address.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// A bootstrap server on a [`DtlsServer`]. See the module docs.
#[derive(Debug, Clone)]
pub struct BootstrapServer {
    events: broadcast::Sender<BootstrapEvent>,
    dtls: Arc<DtlsServer>,
}

impl BootstrapServer {
    /// Starts answering Bootstrap-Requests on `dtls`: endpoint names are authorized with
    /// `authorizer` (a DTLS identity may bootstrap only as its own endpoint), and each gets
    /// its entry of `accounts`. The server's `accept`, `recv` and `departed` queues belong
    /// to it from now.
    pub fn start(
        dtls: Arc<DtlsServer>,
        authorizer: Arc<dyn EndpointAuthorizer>,
        accounts: HashMap<String, ServerAccount>,
        coap: CoapConfig,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        let actor = Actor {
            dtls: Arc::clone(&dtls),
            authorizer,
            accounts,
            coap: Arc::new(coap),
            seed: rand::random(),
            sessions: HashMap::new(),
            events: events.clone(),
        };
        tokio::spawn(actor.run());
        Self { events, dtls }
    }

    /// What happens, as it happens.
    pub fn events(&self) -> broadcast::Receiver<BootstrapEvent> {
        self.events.subscribe()
    }

    /// The DTLS server underneath.
    pub fn dtls(&self) -> &Arc<DtlsServer> {
        &self.dtls
    }
}

struct Session {
    identity: Option<String>,
    /// Where its datagrams come from (logged).
    peer: SocketAddr,
    layer: MessageLayer,
    /// A bootstrap in progress: the endpoint, the requests still to send, the one waited on.
    running: Option<(String, VecDeque<Packet>, Token)>,
}

struct Actor {
    dtls: Arc<DtlsServer>,
    authorizer: Arc<dyn EndpointAuthorizer>,
    accounts: HashMap<String, ServerAccount>,
    coap: Arc<CoapConfig>,
    seed: u64,
    sessions: HashMap<SessionHandle, Session>,
    events: broadcast::Sender<BootstrapEvent>,
}

impl Actor {
    async fn run(mut self) {
        let dtls = Arc::clone(&self.dtls);
        loop {
            // Few sessions bootstrap at once, and each briefly: the earliest timer is found
            // by looking at each.
            let deadline = self.sessions.values().filter_map(|s| s.layer.poll_timeout()).min();
            tokio::select! {
                biased;
                accepted = dtls.accept() => {
                    let Some(accepted) = accepted else { return };
                    self.seed = self.seed.wrapping_add(1);
                    let identity = accepted.identity.as_ref().map(authorization_identity);
                    let layer = MessageLayer::new(Arc::clone(&self.coap), self.seed);
                    self.sessions.insert(accepted.handle, Session { identity, peer: accepted.peer, layer, running: None });
                }
                received = dtls.recv() => {
                    let Some((handle, data)) = received else { return };
                    if let Some(session) = self.sessions.get_mut(&handle) {
                        session.layer.handle_datagram(clock::now(), &data);
                        self.drive(handle).await;
                    }
                }
                departed = dtls.departed() => {
                    let Some(departed) = departed else { return };
                    if let Some(Session { running: Some((endpoint, ..)), .. }) = self.sessions.remove(&departed.handle) {
                        self.failed(Some(endpoint), departed.peer, "the session closed before Finish".into());
                    }
                }
                _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => {
                    let now = clock::now();
                    let due: Vec<SessionHandle> = self
                        .sessions
                        .iter()
                        .filter(|(_, s)| s.layer.poll_timeout().is_some_and(|at| at <= now))
                        .map(|(handle, _)| *handle)
                        .collect();
                    for handle in due {
                        if let Some(session) = self.sessions.get_mut(&handle) {
                            session.layer.handle_timeout(now);
                        }
                        self.drive(handle).await;
                    }
                }
            }
        }
    }

    /// Sends a session's datagrams and acts on its CoAP events.
    async fn drive(&mut self, handle: SessionHandle) {
        loop {
            let Some(session) = self.sessions.get_mut(&handle) else { return };
            let peer = session.peer;
            let mut outgoing = Vec::new();
            while let Some(datagram) = session.layer.poll_transmit() {
                outgoing.push(datagram);
            }
            let event = session.layer.poll_event();
            for datagram in outgoing {
                let _ = self.dtls.queue_to(handle, datagram).await;
            }
            let Some(event) = event else { return };
            match event {
                CoapEvent::Request { id, request } => {
                    let answer = self.bootstrap_request(handle, &request);
                    let Some(session) = self.sessions.get_mut(&handle) else { return };
                    let _ = session.layer.respond(clock::now(), &id, response(answer));
                    if answer == ResponseType::Changed {
                        self.send_next(handle);
                    }
                }
                CoapEvent::Response { token, response } => {
                    let Some(session) = self.sessions.get_mut(&handle) else { return };
                    let Some((endpoint, remaining, waited)) = session.running.take() else { continue };
                    if waited != token {
                        session.running = Some((endpoint, remaining, waited));
                        continue;
                    }
                    let code = response.header.code;
                    if matches!(code, MessageClass::Response(c) if c.is_error()) {
                        self.failed(Some(endpoint), peer, format!("the device answered {code}"));
                    } else if remaining.is_empty() {
                        tracing::info!(endpoint = %endpoint, %peer, "bootstrapped");
                        let _ = self.events.send(BootstrapEvent::Bootstrapped { endpoint, peer });
                    } else {
                        session.running = Some((endpoint, remaining, waited));
                        self.send_next(handle);
                    }
                }
                CoapEvent::RequestFailed { token, reason } => {
                    let Some(session) = self.sessions.get_mut(&handle) else { return };
                    if let Some((endpoint, _, waited)) = session.running.take() {
                        if waited == token {
                            self.failed(Some(endpoint), peer, format!("no answer from the device ({reason})"));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Answers a request from a device: 2.04 to a Bootstrap-Request this identity may make
    /// for an endpoint with an account (and the bootstrap starts), else why not.
    fn bootstrap_request(&mut self, handle: SessionHandle, request: &Packet) -> ResponseType {
        let Some(endpoint) = bootstrap_request_endpoint(request) else {
            return ResponseType::MethodNotAllowed;
        };
        let Some(session) = self.sessions.get_mut(&handle) else { return ResponseType::InternalServerError };
        let peer = session.peer;
        if session.running.is_some() {
            return ResponseType::ServiceUnavailable;
        }
        let allowed = session.identity.as_deref().is_some_and(|identity| self.authorizer.allows(identity, &endpoint));
        if !allowed {
            let reason = "this DTLS identity may not bootstrap that endpoint (4.03)".to_string();
            self.failed(Some(endpoint), peer, reason);
            return ResponseType::Forbidden;
        }
        let Some(account) = self.accounts.get(&endpoint) else {
            self.failed(Some(endpoint), peer, "no bootstrap configuration for it (4.04)".into());
            return ResponseType::NotFound;
        };
        let requests: VecDeque<Packet> = bootstrap_requests(account).into();
        tracing::info!(endpoint = %endpoint, %peer, server = %account.uri, "bootstrap request");
        session.running = Some((endpoint, requests, Token(0)));
        ResponseType::Changed
    }

    /// Sends the next request of the running bootstrap over session `handle`.
    fn send_next(&mut self, handle: SessionHandle) {
        let Some(session) = self.sessions.get_mut(&handle) else { return };
        let peer = session.peer;
        let Some((endpoint, mut remaining, _)) = session.running.take() else { return };
        let Some(next) = remaining.pop_front() else { return };
        match session.layer.request(clock::now(), next, true, false) {
            Ok(token) => session.running = Some((endpoint, remaining, token)),
            Err(err) => self.failed(Some(endpoint), peer, err.to_string()),
        }
    }

    fn failed(&self, endpoint: Option<String>, peer: SocketAddr, reason: String) {
        tracing::warn!(endpoint = endpoint.as_deref().unwrap_or("-"), %peer, %reason, "bootstrap failed");
        let _ = self.events.send(BootstrapEvent::Failed { endpoint, peer, reason });
    }
}

/// Why a device's bootstrap failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BootstrapFailure {
    /// No DTLS session with the bootstrap server.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The bootstrap itself failed.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// The session closed before Finish.
    #[error("the bootstrap server closed the session before Finish")]
    Closed,
}

/// Bootstraps device `endpoint` from the bootstrap server at `server` (a DTLS session over
/// `context`, with `psk` as its identity and key when given), and returns the LwM2M server
/// account it was given. The session is closed (close_notify) afterwards.
pub async fn bootstrap(
    server: SocketAddr,
    context: &Arc<DtlsContext>,
    psk: Option<(&[u8], &PskKey)>,
    endpoint: &str,
    coap: CoapConfig,
) -> Result<ServerAccount, BootstrapFailure> {
    let io = |e: std::io::Error| BootstrapFailure::Connect(ConnectError::Io(Arc::new(e)));
    let socket = Socket::bind_udp(local_for(server), None).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    let session = DtlsClient::connect_on_as(socket, server, context, None, psk).await?;
    let mut client = BootstrapClient::new(endpoint, Arc::new(coap), rand::random());
    client.start(clock::now());
    let outcome = loop {
        while let Some(datagram) = client.poll_transmit() {
            if session.send(&datagram).await.is_err() {
                break;
            }
        }
        if let Some(outcome) = client.outcome() {
            break outcome.clone().map_err(BootstrapFailure::from);
        }
        let deadline = client.poll_timeout();
        tokio::select! {
            datagram = session.recv() => match datagram {
                Some(datagram) => client.handle_datagram(clock::now(), &datagram),
                None => break Err(BootstrapFailure::Closed),
            },
            _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => client.handle_timeout(clock::now()),
        }
    };
    // The answer to Finish is out; a short grace lets a lost one be asked for again.
    if outcome.is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Some(datagram) = session.recv().await {
                client.handle_datagram(clock::now(), &datagram);
                while let Some(answer) = client.poll_transmit() {
                    let _ = session.send(&answer).await;
                }
            }
        })
        .await;
    }
    session.close().await;
    outcome
}
