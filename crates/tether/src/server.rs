//! `DtlsServer`: one UDP socket, many peers, driven by one task that owns the socket, the
//! [`Endpoint`] and the pool policy of the sessions peers opened to it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tether_proto::dtls::{
    CloseReason, ConfigError, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, EndpointStats, PeerIdentity,
    SendError, SessionHandle,
};
use tether_proto::pool::{Generation, PoolConfig, PoolConfigError, PoolEvent, PoolState, PoolStats, Traffic};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::client::sleep_until;
use crate::clock;
use crate::socket::{Socket, SERVER_RECV_BUFFER};

/// Settings of a [`DtlsServer`].
#[derive(Debug, Clone)]
pub struct DtlsServerConfig {
    /// Endpoint limits and cookie secret seed.
    pub endpoint: EndpointConfig,
    /// Idle timeout, cleanup cadence and capacity of accepted sessions.
    pub pool: PoolConfig,
    /// Socket receive buffer requested. Default 8 MiB.
    pub recv_buffer: usize,
    /// Events (accepted, received, departed) queued for the application; beyond that they
    /// are dropped and counted. Default 65,536.
    pub queue: usize,
}

impl Default for DtlsServerConfig {
    /// Default limits, with cookie secrets seeded from the operating system.
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::new(os_seed()),
            pool: PoolConfig::default(),
            recv_buffer: SERVER_RECV_BUFFER,
            queue: 65_536,
        }
    }
}

impl DtlsServerConfig {
    /// Sets the pool settings.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Sets the endpoint settings.
    pub fn endpoint(mut self, endpoint: EndpointConfig) -> Self {
        self.endpoint = endpoint;
        self
    }
}

/// 32 bytes from the operating system's random source.
pub fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut seed);
    seed
}

/// A server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding or configuring the socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The DTLS configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool configuration was refused.
    #[error(transparent)]
    Pool(#[from] PoolConfigError),
}

/// A peer completed a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its address.
    pub peer: SocketAddr,
    /// Its authenticated identity.
    pub identity: Option<PeerIdentity>,
    /// Whether it resumed an earlier session.
    pub resumed: bool,
    /// The pool generation of the session.
    pub generation: Generation,
}

/// Why a session left the server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DepartReason {
    /// The session closed (close_notify, error, replacement by a new handshake, `close`).
    Closed(CloseReason),
    /// No traffic for the idle timeout.
    Expired,
    /// Evicted to make room (it stays resumable).
    Evicted,
}

/// A session left the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departed {
    /// Its peer.
    pub peer: SocketAddr,
    /// Its generation.
    pub generation: Generation,
    /// Why.
    pub reason: DepartReason,
}

/// A send on the server failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerSendError {
    /// No established session with that peer.
    #[error("no established session with {0}")]
    NoSession(SocketAddr),
    /// The session refused the payload.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The server has shut down.
    #[error("server shut down")]
    ShutDown,
}

/// A server's counters.
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// Endpoint counters (cookies, handshakes, drops by reason).
    pub endpoint: EndpointStats,
    /// Pool of accepted sessions.
    pub pool: PoolStats,
    /// Handshakes in progress.
    pub handshakes_in_progress: usize,
    /// Application events dropped because the application did not keep up.
    pub events_dropped: u64,
    /// The socket receive buffer the kernel granted.
    pub recv_buffer: Option<usize>,
}

enum Command {
    /// Data for a peer, and where to report the outcome (if anyone waits for it).
    SendTo(SocketAddr, Vec<u8>, Option<oneshot::Sender<Result<(), ServerSendError>>>),
    Close(SocketAddr, oneshot::Sender<bool>),
    SetIdentity(SocketAddr, String, oneshot::Sender<bool>),
    Lookup(String, oneshot::Sender<Option<SocketAddr>>),
    Stats(oneshot::Sender<ServerStats>),
    Shutdown(oneshot::Sender<()>),
}

/// A DTLS server on one socket. Peers' handshakes are accepted automatically (after the
/// stateless cookie exchange); completed ones appear on [`accept`](Self::accept), their data
/// on [`recv`](Self::recv), and sessions that leave on [`departed`](Self::departed). Each of
/// the three is its own queue, so they can be consumed independently.
#[derive(Debug)]
pub struct DtlsServer {
    local_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    accepted: Mutex<mpsc::Receiver<Accepted>>,
    received: Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
    departed: Mutex<mpsc::Receiver<Departed>>,
}

impl DtlsServer {
    /// Binds a UDP socket at `addr` (with the configured receive buffer) and serves on it.
    pub async fn bind(
        addr: SocketAddr,
        context: Arc<DtlsContext>,
        config: DtlsServerConfig,
    ) -> Result<Self, ServerError> {
        let socket = Socket::bind_udp(addr, Some(config.recv_buffer))
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Self::serve(socket, context, config)
    }

    /// Serves on `socket` (UDP or in-memory).
    pub fn serve(socket: Socket, context: Arc<DtlsContext>, config: DtlsServerConfig) -> Result<Self, ServerError> {
        let local_addr = socket
            .local_addr()
            .map_err(|source| ServerError::Bind { addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
        let now = clock::now();
        let endpoint = Endpoint::new(context, config.endpoint.clone(), now)?;
        let pool = PoolState::new(config.pool.clone(), now)?;
        let (commands, command_rx) = mpsc::channel(1024);
        let (accepted_tx, accepted) = mpsc::channel(config.queue);
        let (received_tx, received) = mpsc::channel(config.queue);
        let (departed_tx, departed) = mpsc::channel(config.queue);
        let actor = Actor {
            socket,
            endpoint,
            pool,
            generations: HashMap::new(),
            handles: HashMap::new(),
            accepted: accepted_tx,
            received: received_tx,
            departed: departed_tx,
            events_dropped: 0,
        };
        tokio::spawn(actor.run(command_rx));
        Ok(Self {
            local_addr,
            commands,
            accepted: Mutex::new(accepted),
            received: Mutex::new(received),
            departed: Mutex::new(departed),
        })
    }

    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next peer that completed a handshake; `None` after shutdown.
    pub async fn accept(&self) -> Option<Accepted> {
        self.accepted.lock().await.recv().await
    }

    /// The next datagram of application data and its sender; `None` after shutdown.
    pub async fn recv(&self) -> Option<(SocketAddr, Vec<u8>)> {
        self.received.lock().await.recv().await
    }

    /// The next session that left; `None` after shutdown.
    pub async fn departed(&self) -> Option<Departed> {
        self.departed.lock().await.recv().await
    }

    /// Sends application data to `peer` on its established session.
    pub async fn send_to(&self, peer: SocketAddr, data: &[u8]) -> Result<(), ServerSendError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::SendTo(peer, data.to_vec(), Some(tx))).await?;
        rx.await.unwrap_or(Err(ServerSendError::ShutDown))
    }

    /// Queues application data for `peer` without waiting for the outcome, for protocols
    /// that recover lost datagrams themselves (CoAP retransmits): a refused send is a lost
    /// datagram. Waits only while the server's command queue is full.
    pub async fn queue_to(&self, peer: SocketAddr, data: Vec<u8>) -> Result<(), ServerSendError> {
        self.command(Command::SendTo(peer, data, None)).await
    }

    /// Closes `peer`'s session (close_notify). False if it had none.
    pub async fn close(&self, peer: SocketAddr) -> bool {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Close(peer, tx)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Binds an identity (an LwM2M endpoint name) to `peer`'s session for lookups.
    pub async fn set_identity(&self, peer: SocketAddr, identity: impl Into<String>) -> bool {
        let (tx, rx) = oneshot::channel();
        self.command(Command::SetIdentity(peer, identity.into(), tx)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// The peer whose session carries `identity` (PSK identity, certificate CN, or a name
    /// bound with [`set_identity`](Self::set_identity)).
    pub async fn peer_of(&self, identity: &str) -> Option<SocketAddr> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Lookup(identity.to_string(), tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Counters and pool statistics.
    pub async fn stats(&self) -> Option<ServerStats> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Stats(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Graceful shutdown: close_notify to every peer, then the task ends.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.command(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn command(&self, command: Command) -> Result<(), ServerSendError> {
        self.commands.send(command).await.map_err(|_| ServerSendError::ShutDown)
    }
}

struct Actor {
    socket: Socket,
    endpoint: Endpoint,
    pool: PoolState,
    generations: HashMap<SessionHandle, Generation>,
    handles: HashMap<Generation, SessionHandle>,
    accepted: mpsc::Sender<Accepted>,
    received: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    departed: mpsc::Sender<Departed>,
    events_dropped: u64,
}

/// Datagrams read per wake-up before outputs are flushed.
const RECV_BATCH: usize = 64;

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; 65_536];
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            self.apply_events();
            self.flush().await;
            if let Some(done) = shutdown.take() {
                // Release the socket before answering, so the address can be bound again
                // as soon as `shutdown` returns.
                drop(self);
                let _ = done.send(());
                return;
            }
            let deadline = [self.endpoint.poll_timeout(), self.pool.poll_timeout()].into_iter().flatten().min();
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    self.endpoint.handle(clock::now(), from, &buf[..n]);
                    for _ in 1..RECV_BATCH {
                        let Ok((n, from)) = self.socket.try_recv_from(&mut buf) else { break };
                        self.endpoint.handle(clock::now(), from, &buf[..n]);
                        self.apply_events();
                    }
                }
                _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => {
                    let now = clock::now();
                    self.endpoint.handle_timeout(now);
                    self.pool.handle_timeout(now);
                }
                command = commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        self.endpoint.close_all(clock::now());
                        shutdown = Some(done);
                    }
                    Some(command) => self.command(command),
                    None => {
                        self.endpoint.close_all(clock::now());
                        self.apply_events();
                        self.flush().await;
                        return;
                    }
                },
            }
        }
    }

    fn command(&mut self, command: Command) {
        let now = clock::now();
        match command {
            Command::SendTo(peer, data, reply) => {
                let result = match self.endpoint.established(peer) {
                    None => Err(ServerSendError::NoSession(peer)),
                    Some(handle) => self.endpoint.send(now, handle, &data).map_err(ServerSendError::from),
                };
                if result.is_ok() {
                    if let Some(generation) = self.endpoint.established(peer).and_then(|h| self.generations.get(&h)) {
                        let traffic = Traffic { bytes_out: data.len() as u64, requests: 1, ..Traffic::default() };
                        self.pool.record(now, peer, *generation, traffic);
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Close(peer, reply) => {
                let handle = self.endpoint.established(peer);
                if let Some(handle) = handle {
                    self.endpoint.close(now, handle);
                }
                let _ = reply.send(handle.is_some());
            }
            Command::SetIdentity(peer, identity, reply) => {
                let bound = self
                    .pool
                    .get(peer)
                    .map(|e| e.generation)
                    .is_some_and(|generation| self.pool.set_identity(peer, generation, identity));
                let _ = reply.send(bound);
            }
            Command::Lookup(identity, reply) => {
                let _ = reply.send(self.pool.by_identity(&identity).map(|e| e.peer));
            }
            Command::Stats(reply) => {
                let _ = reply.send(ServerStats {
                    endpoint: self.endpoint.stats().clone(),
                    pool: self.pool.stats(now),
                    handshakes_in_progress: self.endpoint.handshakes_in_progress(),
                    events_dropped: self.events_dropped,
                    recv_buffer: self.socket.recv_buffer_size(),
                });
            }
            Command::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    fn apply_events(&mut self) {
        let now = clock::now();
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                EndpointEvent::Connected { handle, peer, identity, resumed, .. } => {
                    let name = identity.as_ref().map(identity_name);
                    match self.pool.insert_accepted(now, peer, name) {
                        Ok((generation, replaced)) => {
                            if let Some(old) = replaced {
                                self.depart(peer, old, DepartReason::Closed(CloseReason::Replaced));
                            }
                            self.generations.insert(handle, generation);
                            self.handles.insert(generation, handle);
                            let accepted = Accepted { peer, identity, resumed, generation };
                            if self.accepted.try_send(accepted).is_err() {
                                self.events_dropped += 1;
                            }
                        }
                        Err(_full) => self.endpoint.close(now, handle),
                    }
                }
                EndpointEvent::Data { handle, peer, data } => {
                    if let Some(generation) = self.generations.get(&handle) {
                        let traffic = Traffic { bytes_in: data.len() as u64, ..Traffic::default() };
                        self.pool.record(now, peer, *generation, traffic);
                    }
                    if self.received.try_send((peer, data)).is_err() {
                        self.events_dropped += 1;
                    }
                }
                EndpointEvent::Closed { handle, peer, reason, .. } => {
                    let Some(generation) = self.generations.remove(&handle) else {
                        continue;
                    };
                    self.handles.remove(&generation);
                    if self.pool.remove(peer, generation).is_some() {
                        self.depart(peer, generation, DepartReason::Closed(reason));
                    }
                }
                _ => {}
            }
        }
        while let Some(event) = self.pool.poll_event() {
            let (peer, generation, reason) = match event {
                PoolEvent::Expired { peer, generation } => (peer, generation, DepartReason::Expired),
                PoolEvent::Evicted { peer, generation } => (peer, generation, DepartReason::Evicted),
                _ => continue,
            };
            if let Some(handle) = self.handles.get(&generation) {
                self.endpoint.close(now, *handle);
            }
            self.depart(peer, generation, reason);
        }
    }

    fn depart(&mut self, peer: SocketAddr, generation: Generation, reason: DepartReason) {
        if self.departed.try_send(Departed { peer, generation, reason }).is_err() {
            self.events_dropped += 1;
        }
    }

    async fn flush(&mut self) {
        while let Some(t) = self.endpoint.poll_transmit() {
            let _ = self.socket.send_to(&t.contents, t.destination).await;
        }
    }
}

/// The name a pool indexes a peer identity by.
pub fn identity_name(identity: &PeerIdentity) -> String {
    match identity {
        PeerIdentity::Psk(id) => String::from_utf8_lossy(id).into_owned(),
        PeerIdentity::Certificate { common_name } => common_name.clone(),
        _ => identity.to_string(),
    }
}
