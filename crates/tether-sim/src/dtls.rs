//! Ready-made simulator nodes for DTLS scenarios: a client [`Session`] and a server
//! [`Endpoint`] that echoes application data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::dtls::{
    CloseReason, ConfigError, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, Event, Session,
};

use crate::network::Node;

/// A DTLS client that sends `payload` once connected and records what comes back.
#[derive(Debug)]
pub struct ClientNode {
    /// The session.
    pub session: Session,
    server: SocketAddr,
    started: Instant,
    /// When the handshake finished.
    pub connected_at: Option<Instant>,
    /// Why the session closed, if it did.
    pub closed: Option<CloseReason>,
    payload: Option<Vec<u8>>,
    /// Application data received.
    pub received: Vec<Vec<u8>>,
}

impl ClientNode {
    /// A client that starts its handshake with `server` at `now`.
    pub fn new(
        context: &Arc<DtlsContext>,
        server: SocketAddr,
        now: Instant,
        payload: Option<Vec<u8>>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            session: Session::client(context, now)?,
            server,
            started: now,
            connected_at: None,
            closed: None,
            payload,
            received: Vec::new(),
        })
    }

    /// How long the handshake took, if it finished.
    pub fn handshake_time(&self) -> Option<Duration> {
        self.connected_at.map(|at| at - self.started)
    }

    /// True once the handshake finished or failed.
    pub fn is_settled(&self) -> bool {
        self.connected_at.is_some() || self.closed.is_some()
    }

    fn after_input(&mut self, now: Instant) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected { .. } => {
                    self.connected_at = Some(now);
                    if let Some(payload) = self.payload.take() {
                        // Fits: payloads in scenarios are far below the MTU.
                        let _ = self.session.send(now, &payload);
                    }
                }
                Event::Data(data) => self.received.push(data),
                Event::Closed { reason } => self.closed = Some(reason),
                _ => {}
            }
        }
    }
}

/// A DTLS server endpoint that echoes every application datagram back on its session.
#[derive(Debug)]
pub struct ServerNode {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Every event the endpoint reported, in order.
    pub events: Vec<EndpointEvent>,
}

impl ServerNode {
    /// An echo server for `context`.
    pub fn new(context: Arc<DtlsContext>, config: EndpointConfig, now: Instant) -> Result<Self, ConfigError> {
        Ok(Self { endpoint: Endpoint::new(context, config, now)?, events: Vec::new() })
    }

    fn after_input(&mut self, now: Instant) {
        while let Some(event) = self.endpoint.poll_event() {
            if let EndpointEvent::Data { handle, data, .. } = &event {
                let _ = self.endpoint.send(now, *handle, data);
            }
            self.events.push(event);
        }
    }
}

/// A client or a server.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "nodes live in one Vec; boxing buys nothing")]
pub enum DtlsNode {
    /// A client.
    Client(ClientNode),
    /// A server.
    Server(ServerNode),
}

impl DtlsNode {
    /// The client, if this is one.
    pub fn client(&self) -> Option<&ClientNode> {
        match self {
            Self::Client(c) => Some(c),
            Self::Server(_) => None,
        }
    }

    /// The server, if this is one.
    pub fn server(&self) -> Option<&ServerNode> {
        match self {
            Self::Server(s) => Some(s),
            Self::Client(_) => None,
        }
    }
}

impl Node for DtlsNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        match self {
            Self::Client(c) => {
                if from == c.server {
                    c.session.handle_datagram(now, datagram);
                }
                c.after_input(now);
            }
            Self::Server(s) => {
                s.endpoint.handle(now, from, datagram);
                s.after_input(now);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Client(c) => {
                c.session.handle_timeout(now);
                c.after_input(now);
            }
            Self::Server(s) => {
                s.endpoint.handle_timeout(now);
                s.after_input(now);
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        match self {
            Self::Client(c) => c.session.poll_transmit().map(|t| (c.server, t.contents)),
            Self::Server(s) => s.endpoint.poll_transmit().map(|t| (t.destination, t.contents)),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Client(c) => c.session.poll_timeout(),
            Self::Server(s) => s.endpoint.poll_timeout(),
        }
    }
}
