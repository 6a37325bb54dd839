//! `SessionPool`: one authenticated session per peer, reused for every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};
use tether_proto::dtls::{DtlsContext, SavedSession, SessionHandle};
use tether_proto::pool::{
    Generation, PoolConfig, PoolConfigError, PoolEvent, PoolState, PoolStats, SessionRole, Traffic,
};
use tokio::sync::{mpsc, Notify};

use crate::client::{sleep_until, ConnectError, DtlsClient};
use crate::clock;
use crate::server::{identity_name, DtlsServer, ServerSendError, ServerStats};
use crate::socket::MemoryNetwork;

/// How the pool dials peers.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// Over UDP, one socket per connection.
    Udp,
    /// Over an in-memory network (tests on paused time).
    Memory(MemoryNetwork),
}

type SharedConnect = Shared<BoxFuture<'static, Result<Arc<DtlsClient>, ConnectError>>>;

enum Connection {
    Connecting { generation: Generation, handshake: SharedConnect },
    Ready { generation: Generation, client: Arc<DtlsClient> },
}

struct Shared_ {
    state: PoolState,
    connections: HashMap<SocketAddr, Connection>,
    /// Sessions of peers that left the pool (evicted, expired), offered on the next connect.
    resumable: HashMap<SocketAddr, SavedSession>,
}

struct Inner {
    context: Option<Arc<DtlsContext>>,
    dialer: Dialer,
    server: Option<Arc<DtlsServer>>,
    shared: Mutex<Shared_>,
    wake: Arc<Notify>,
    closed_tx: mpsc::UnboundedSender<(SocketAddr, Generation)>,
}

/// A pooled session: dialled by the pool, or accepted by its server. Cheap to clone.
#[derive(Clone)]
pub enum PooledSession {
    /// A session the pool dialled.
    Connected {
        /// The pool.
        pool: SessionPool,
        /// The peer.
        peer: SocketAddr,
        /// Its generation.
        generation: Generation,
        /// The connection.
        client: Arc<DtlsClient>,
    },
    /// A session the peer opened to the pool's server.
    Accepted {
        /// The server.
        server: Arc<DtlsServer>,
        /// The peer.
        peer: SocketAddr,
        /// The session: a later session of the same address is another one.
        handle: SessionHandle,
    },
}

impl std::fmt::Debug for PooledSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledSession").field("peer", &self.peer()).field("role", &self.role()).finish()
    }
}

impl PooledSession {
    /// The peer.
    pub fn peer(&self) -> SocketAddr {
        match self {
            Self::Connected { peer, .. } | Self::Accepted { peer, .. } => *peer,
        }
    }

    /// Who opened it.
    pub fn role(&self) -> SessionRole {
        match self {
            Self::Connected { .. } => SessionRole::Connected,
            Self::Accepted { .. } => SessionRole::Accepted,
        }
    }

    /// Sends one request (a datagram of application data), counted in the pool's statistics.
    pub async fn send(&self, data: &[u8]) -> Result<(), ServerSendError> {
        match self {
            Self::Connected { pool, peer, generation, client } => {
                client.send(data).await.map_err(ServerSendError::Send)?;
                let traffic = Traffic { bytes_out: data.len() as u64, requests: 1, ..Traffic::default() };
                pool.lock().state.record(clock::now(), *peer, *generation, traffic);
                Ok(())
            }
            Self::Accepted { server, handle, .. } => server.send_to(*handle, data).await,
        }
    }

    /// The next datagram from a dialled peer (accepted sessions deliver on the server's
    /// `recv`); `None` once closed.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        match self {
            Self::Connected { pool, peer, generation, client } => {
                let data = client.recv().await?;
                let traffic = Traffic { bytes_in: data.len() as u64, ..Traffic::default() };
                pool.lock().state.record(clock::now(), *peer, *generation, traffic);
                Some(data)
            }
            Self::Accepted { .. } => None,
        }
    }

    /// Whether the session resumed an earlier one (dialled sessions).
    pub fn is_resumed(&self) -> bool {
        match self {
            Self::Connected { client, .. } => client.connection().resumed,
            Self::Accepted { .. } => false,
        }
    }
}

/// One authenticated DTLS session per peer, reused for every request. See DESIGN.md
/// ("Session pool semantics").
///
/// - [`get_or_connect`](Self::get_or_connect) is single-flight: concurrent callers for a new
///   peer share one handshake and all receive its result, its error included.
/// - Sessions peers open to the attached [`DtlsServer`] are in the pool from their handshake
///   on; the server applies the same policy to them (it sees their traffic).
/// - Idle sessions close after `idle_timeout` (checked every `check_interval`); at capacity
///   the least recently active session is evicted and stays resumable: the next connection
///   to that peer offers its saved session.
/// - Generations make every late event harmless: a close during a handshake is never undone
///   by its completion, and an old session's close never removes a newer one.
#[derive(Clone)]
pub struct SessionPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool").field("sessions", &self.lock().state.len()).finish_non_exhaustive()
    }
}

impl SessionPool {
    /// A pool that dials with `context` (a client context), if given, and includes the
    /// sessions of `server`, if given.
    pub fn new(
        config: PoolConfig,
        context: Option<Arc<DtlsContext>>,
        dialer: Dialer,
        server: Option<Arc<DtlsServer>>,
    ) -> Result<Self, PoolConfigError> {
        let state = PoolState::new(config, clock::now())?;
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            context,
            dialer,
            server,
            shared: Mutex::new(Shared_ { state, connections: HashMap::new(), resumable: HashMap::new() }),
            wake: Arc::clone(&wake),
            closed_tx,
        });
        tokio::spawn(maintain(Arc::downgrade(&inner), wake, closed_rx));
        Ok(Self { inner })
    }

    fn lock(&self) -> MutexGuard<'_, Shared_> {
        self.inner.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pooled session of `peer`, without connecting.
    pub async fn get(&self, peer: SocketAddr) -> Option<PooledSession> {
        if let Some(session) = self.ready(peer) {
            return Some(session);
        }
        self.accepted(peer).await
    }

    fn ready(&self, peer: SocketAddr) -> Option<PooledSession> {
        match self.lock().connections.get(&peer)? {
            Connection::Ready { generation, client } => Some(PooledSession::Connected {
                pool: self.clone(),
                peer,
                generation: *generation,
                client: Arc::clone(client),
            }),
            Connection::Connecting { .. } => None,
        }
    }

    async fn accepted(&self, peer: SocketAddr) -> Option<PooledSession> {
        let server = self.inner.server.as_ref()?;
        let handle = server.session_at(peer).await?;
        Some(PooledSession::Accepted { server: Arc::clone(server), peer, handle })
    }

    /// The pooled session of `peer`, connecting if there is none. Concurrent callers share
    /// one handshake and its result.
    pub async fn get_or_connect(&self, peer: SocketAddr) -> Result<PooledSession, ConnectError> {
        if let Some(session) = self.get(peer).await {
            return Ok(session);
        }
        let Some(context) = self.inner.context.clone() else {
            return Err(ConnectError::Cancelled { peer });
        };
        let handshake = {
            let mut shared = self.lock();
            match shared.connections.get(&peer) {
                Some(Connection::Connecting { handshake, .. }) => handshake.clone(),
                Some(Connection::Ready { .. }) => {
                    drop(shared);
                    return self.ready(peer).ok_or(ConnectError::Cancelled { peer });
                }
                None => {
                    let generation =
                        shared.state.begin_connect(clock::now(), peer).map_err(|_| ConnectError::PoolFull)?;
                    let saved = shared.resumable.remove(&peer);
                    let dial = dial(Arc::clone(&self.inner), context, peer, generation, saved);
                    let task = tokio::spawn(dial);
                    let handshake =
                        async move { task.await.unwrap_or(Err(ConnectError::Cancelled { peer })) }.boxed().shared();
                    shared
                        .connections
                        .insert(peer, Connection::Connecting { generation, handshake: handshake.clone() });
                    handshake
                }
            }
        };
        self.inner.wake.notify_one();
        let client = handshake.await?;
        let generation = match self.lock().connections.get(&peer) {
            Some(Connection::Ready { generation, client: c }) if Arc::ptr_eq(c, &client) => *generation,
            _ => return Err(ConnectError::Cancelled { peer }),
        };
        Ok(PooledSession::Connected { pool: self.clone(), peer, generation, client })
    }

    /// The peer whose session carries `identity`.
    pub async fn peer_of(&self, identity: &str) -> Option<SocketAddr> {
        if let Some(entry) = self.lock().state.by_identity(identity) {
            return Some(entry.peer);
        }
        Some(self.inner.server.as_ref()?.session_of(identity).await?.1)
    }

    /// Closes `peer`'s session, dialled or accepted, or abandons its handshake. True if there
    /// was one.
    pub async fn close(&self, peer: SocketAddr) -> bool {
        let removed = {
            let mut shared = self.lock();
            match shared.connections.remove(&peer) {
                Some(Connection::Ready { generation, client }) => {
                    shared.state.remove(peer, generation);
                    Some(Some(client))
                }
                Some(Connection::Connecting { generation, .. }) => {
                    // The dial sees its generation gone and closes what it made.
                    shared.state.remove(peer, generation);
                    Some(None)
                }
                None => None,
            }
        };
        match removed {
            Some(Some(client)) => {
                client.close().await;
                true
            }
            Some(None) => true,
            None => match &self.inner.server {
                Some(server) => match server.session_at(peer).await {
                    Some(handle) => server.close(handle).await,
                    None => false,
                },
                None => false,
            },
        }
    }

    /// Statistics of the dialled sessions.
    pub fn connected_stats(&self) -> PoolStats {
        self.lock().state.stats(clock::now())
    }

    /// Statistics of every pooled session: dialled ones and the server's accepted ones.
    pub async fn stats(&self) -> PoolStats {
        let mut stats = self.connected_stats();
        if let Some(server) = self.server_stats().await {
            merge(&mut stats, server.pool);
        }
        stats
    }

    /// The attached server's full counters.
    pub async fn server_stats(&self) -> Option<ServerStats> {
        self.inner.server.as_ref()?.stats().await
    }
}

fn merge(into: &mut PoolStats, other: PoolStats) {
    into.sessions += other.sessions;
    into.established += other.established;
    into.connecting += other.connecting;
    into.handshakes_total += other.handshakes_total;
    into.requests_total += other.requests_total;
    into.expired_total += other.expired_total;
    into.evicted_total += other.evicted_total;
    into.closed_total += other.closed_total;
    into.capacity += other.capacity;
    into.per_session.extend(other.per_session);
    into.per_session.sort_by(|a, b| a.idle.cmp(&b.idle).then(a.peer.cmp(&b.peer)));
}

/// One handshake of the pool. Runs as its own task, so callers that give up waiting do not
/// abandon it half-way.
async fn dial(
    inner: Arc<Inner>,
    context: Arc<DtlsContext>,
    peer: SocketAddr,
    generation: Generation,
    saved: Option<SavedSession>,
) -> Result<Arc<DtlsClient>, ConnectError> {
    let result = match &inner.dialer {
        Dialer::Udp => DtlsClient::connect_resuming(peer, &context, saved.as_ref()).await,
        Dialer::Memory(network) => {
            let local = SocketAddr::from(([127, 0, 0, 1], 0));
            match network.bind(local) {
                Ok(socket) => DtlsClient::connect_on(socket, peer, &context, saved.as_ref()).await,
                Err(e) => Err(ConnectError::Io(Arc::new(e))),
            }
        }
    };
    let kept = {
        let mut shared = inner.shared.lock().unwrap_or_else(|e| e.into_inner());
        let current = matches!(
            shared.connections.get(&peer),
            Some(Connection::Connecting { generation: g, .. }) if *g == generation
        );
        match result {
            Err(err) => {
                shared.state.remove(peer, generation);
                if current {
                    shared.connections.remove(&peer);
                }
                return Err(err);
            }
            Ok(client) => {
                let client = Arc::new(client);
                let identity = client.connection().identity.as_ref().map(identity_name);
                let kept = current && shared.state.established(clock::now(), peer, generation, identity);
                if kept {
                    shared.connections.insert(peer, Connection::Ready { generation, client: Arc::clone(&client) });
                }
                (kept, client)
            }
        }
    };
    let (kept, client) = kept;
    if !kept {
        // Closed while the handshake ran: the completion must not bring the session back.
        client.close().await;
        return Err(ConnectError::Cancelled { peer });
    }
    let watcher = Arc::clone(&client);
    let closed_tx = inner.closed_tx.clone();
    tokio::spawn(async move {
        watcher.closed().await;
        let _ = closed_tx.send((peer, generation));
    });
    inner.wake.notify_one();
    Ok(client)
}

/// The pool's one maintenance task: idle checks on the pool's timer, removal of sessions
/// that closed by themselves, and closing what the policy expired or evicted.
async fn maintain(
    pool: std::sync::Weak<Inner>,
    wake: Arc<Notify>,
    mut closed: mpsc::UnboundedReceiver<(SocketAddr, Generation)>,
) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let deadline = {
            let shared = inner.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.state.poll_timeout()
        };
        drop(inner);
        let wake = wake.notified();
        let removed = tokio::select! {
            _ = sleep_until(deadline.map(clock::deadline)) => None,
            _ = wake => None,
            gone = closed.recv() => match gone {
                Some(gone) => Some(gone),
                None => return,
            },
        };
        let Some(inner) = pool.upgrade() else { return };
        let mut to_close = Vec::new();
        {
            let mut shared = inner.shared.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((peer, generation)) = removed {
                // The connection closed on its own (close_notify, error): remove it once.
                if shared.state.remove(peer, generation).is_some() {
                    shared.connections.remove(&peer);
                }
            }
            shared.state.handle_timeout(clock::now());
            while let Some(event) = shared.state.poll_event() {
                let (peer, generation) = match event {
                    PoolEvent::Expired { peer, generation } | PoolEvent::Evicted { peer, generation } => {
                        (peer, generation)
                    }
                    _ => continue,
                };
                let owned = matches!(shared.connections.get(&peer), Some(Connection::Ready { generation: g, .. }) if *g == generation);
                if owned {
                    if let Some(Connection::Ready { client, .. }) = shared.connections.remove(&peer) {
                        if let Some(saved) = client.connection().saved_session.clone() {
                            shared.resumable.insert(peer, saved);
                        }
                        to_close.push(client);
                    }
                }
            }
            let limit = shared.state.config().capacity;
            if shared.resumable.len() > limit {
                let extra: Vec<SocketAddr> =
                    shared.resumable.keys().take(shared.resumable.len() - limit).copied().collect();
                for peer in extra {
                    shared.resumable.remove(&peer);
                }
            }
        }
        for client in to_close {
            client.close().await;
        }
    }
}
