//! `DtlsServer`: one UDP socket, many peers, driven by one task that owns the socket, the
//! [`Endpoint`] and the pool policy of the sessions peers opened to it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::dtls::{
    CloseReason, ConfigError, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, EndpointStats, PeerIdentity,
    SendError, SessionHandle,
};
use tether_proto::pool::{Generation, PoolConfig, PoolConfigError, PoolEvent, PoolState, PoolStats, Traffic};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::client::sleep_until;
use crate::clock;
use crate::oplog::{DropSummary, LogBudget};
use crate::socket::{Socket, SERVER_RECV_BUFFER};
use crate::store::{Applied, SessionStore, SessionWrite, StoreError, StoredSession};

mod relay;

pub use relay::{RelayIn, RelayLink, RelayOut};
use relay::{RelayState, RELAY_QUEUE};

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
    /// Where established sessions are kept across restarts; `None` (the default): they end
    /// with the process.
    pub session_store: Option<Arc<dyn SessionStore>>,
    /// How often sessions whose state changed are checkpointed to the store. Default 1 s:
    /// a crash forgets at most this much replay-window movement.
    pub checkpoint_interval: Duration,
}

/// Record sequence numbers a persisted session reserves at a time: 2^16, so 2^32
/// restarts fit into the 48-bit sequence space.
pub const SEQUENCE_RESERVATION: u64 = 1 << 16;

impl Default for DtlsServerConfig {
    /// Default limits, with cookie secrets seeded from the operating system.
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::new(os_seed()),
            pool: PoolConfig::default(),
            recv_buffer: SERVER_RECV_BUFFER,
            queue: 65_536,
            session_store: None,
            checkpoint_interval: Duration::from_secs(1),
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

    /// Keeps established sessions in `store`: they are restored (no handshake) when a
    /// server starts on the same store.
    pub fn session_store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.session_store = Some(store);
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

/// A peer completed a handshake, or an established session moved to a new address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The session: what every other call names it by.
    pub handle: SessionHandle,
    /// Its address now.
    pub peer: SocketAddr,
    /// Its authenticated identity.
    pub identity: Option<PeerIdentity>,
    /// Whether it resumed an earlier session.
    pub resumed: bool,
    /// How the session came to be at `peer`.
    pub arrival: Arrival,
    /// The name bound to the session with [`DtlsServer::bind_name`] (an LwM2M endpoint
    /// name), for a session that moved; `None` otherwise.
    pub bound_name: Option<Arc<str>>,
}

/// How an [`Accepted`] session came to be at its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Arrival {
    /// A handshake completed.
    Handshake {
        /// The session of the same address it replaced (RFC 6347 §4.2.8: a reboot, a client
        /// that re-handshakes), which departs with [`CloseReason::Replaced`]. The new
        /// session may be of another identity.
        replaced: Option<SessionHandle>,
    },
    /// Restored from the session store after a restart (reported by
    /// [`DtlsServer::sessions`], not by `accept`).
    Restored,
    /// The session's Connection ID brought it here from `from` (RFC 9146): same session,
    /// new address.
    Moved {
        /// The previous address.
        from: SocketAddr,
    },
    /// Adopted from node `from` of the cluster, whose lease ran out: the same session, now
    /// held here.
    Adopted {
        /// The node that held it.
        from: tether_proto::dtls::NodeId,
    },
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
    /// The session.
    pub handle: SessionHandle,
    /// Its peer's last address.
    pub peer: SocketAddr,
    /// Why.
    pub reason: DepartReason,
}

/// A send on the server failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerSendError {
    /// No such established session.
    #[error("no established session {0}")]
    NoSession(SessionHandle),
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
    /// Session store writes that failed.
    pub store_failures: u64,
}

enum Command {
    /// Data for a session, and where to report the outcome (if anyone waits for it).
    SendTo(SessionHandle, Vec<u8>, Option<oneshot::Sender<Result<(), ServerSendError>>>),
    Close(SessionHandle, oneshot::Sender<bool>),
    BindName(SessionHandle, String, oneshot::Sender<bool>),
    Lookup(String, oneshot::Sender<Option<(SessionHandle, SocketAddr)>>),
    SessionAt(SocketAddr, oneshot::Sender<Option<SessionHandle>>),
    Sessions(oneshot::Sender<Vec<Accepted>>),
    Stats(oneshot::Sender<ServerStats>),
    AttachRelay(RelayState),
    Shutdown(oneshot::Sender<()>),
    HandOver(oneshot::Sender<()>),
}

/// A DTLS server on one socket. Peers' handshakes are accepted automatically (after the
/// stateless cookie exchange); completed ones appear on [`accept`](Self::accept), their data
/// on [`recv`](Self::recv), and sessions that leave on [`departed`](Self::departed). Each of
/// the three is its own queue, so they can be consumed independently.
///
/// Every session is named by its [`SessionHandle`], never reused: data, sends, closes and
/// names all go by handle, so nothing meant for one session reaches another that came to
/// hold its address (a reboot's new handshake, NAT or CGNAT reusing a port).
///
/// With a [`SessionStore`], every established session is written to it (before anything
/// of the session reaches the application) and checkpointed while it lives; a server
/// started on the same store restores them all, with no handshake
/// ([`sessions`](Self::sessions) lists them).
#[derive(Debug)]
pub struct DtlsServer {
    local_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    accepted: Mutex<mpsc::Receiver<Accepted>>,
    received: Mutex<mpsc::Receiver<(SessionHandle, Vec<u8>)>>,
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
        let mut endpoint_config = config.endpoint.clone();
        if let Some(store) = &config.session_store {
            if endpoint_config.sequence_reservation.is_none() {
                endpoint_config.sequence_reservation = Some(SEQUENCE_RESERVATION);
            }
            // Handles of this start never equal one stored before it.
            endpoint_config.handles = store.opened().handles;
        }
        let endpoint = Endpoint::new(context, endpoint_config, now)?;
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
            store: config.session_store.clone(),
            pending: Vec::new(),
            pending_inserts: Vec::new(),
            writing: None,
            held: HashMap::new(),
            checkpoint_interval: config.checkpoint_interval,
            next_checkpoint: now + config.checkpoint_interval,
            store_failures: 0,
            handshake_log: LogBudget::new(HANDSHAKE_LOG_WINDOW, HANDSHAKE_LOG_BURST),
            drop_log: DropSummary::new(now, DROP_SUMMARY_INTERVAL),
            relay: None,
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

    /// The next datagram of application data and the session it came over; `None` after
    /// shutdown.
    pub async fn recv(&self) -> Option<(SessionHandle, Vec<u8>)> {
        self.received.lock().await.recv().await
    }

    /// The next session that left; `None` after shutdown.
    pub async fn departed(&self) -> Option<Departed> {
        self.departed.lock().await.recv().await
    }

    /// Sends application data on the established session `handle`.
    pub async fn send_to(&self, handle: SessionHandle, data: &[u8]) -> Result<(), ServerSendError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::SendTo(handle, data.to_vec(), Some(tx))).await?;
        rx.await.unwrap_or(Err(ServerSendError::ShutDown))
    }

    /// Queues application data for session `handle` without waiting for the outcome, for
    /// protocols that recover lost datagrams themselves (CoAP retransmits): a refused send is
    /// a lost datagram. Waits only while the server's command queue is full.
    pub async fn queue_to(&self, handle: SessionHandle, data: Vec<u8>) -> Result<(), ServerSendError> {
        self.command(Command::SendTo(handle, data, None)).await
    }

    /// Closes session `handle` (close_notify). False if there was no such session.
    pub async fn close(&self, handle: SessionHandle) -> bool {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Close(handle, tx)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// Binds a name (the LwM2M endpoint registered over it) to session `handle`, for lookups
    /// and statistics; a session with a name is one a device uses, kept over those without
    /// one when room is short.
    pub async fn bind_name(&self, handle: SessionHandle, name: impl Into<String>) -> bool {
        let (tx, rx) = oneshot::channel();
        self.command(Command::BindName(handle, name.into(), tx)).await.is_ok() && rx.await.unwrap_or(false)
    }

    /// The session that carries `identity` (PSK identity, certificate CN, or a name bound
    /// with [`bind_name`](Self::bind_name)), and its address now.
    pub async fn session_of(&self, identity: &str) -> Option<(SessionHandle, SocketAddr)> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Lookup(identity.to_string(), tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// The established session of the address `peer` now, if any.
    pub async fn session_at(&self, peer: SocketAddr) -> Option<SessionHandle> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::SessionAt(peer, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Every established session: those restored from the session store at start, and
    /// those accepted since.
    pub async fn sessions(&self) -> Vec<Accepted> {
        let (tx, rx) = oneshot::channel();
        if self.command(Command::Sessions(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Counters and pool statistics.
    pub async fn stats(&self) -> Option<ServerStats> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Stats(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Joins the server to a cluster's forwarding: records for sessions other nodes hold go
    /// out on the returned link, and what comes in on it is served here (see
    /// [`RelayIn`]).
    pub async fn relay(&self) -> Option<RelayLink> {
        let (out_tx, out_rx) = mpsc::channel(RELAY_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(RELAY_QUEUE);
        self.command(Command::AttachRelay(RelayState::new(out_tx, in_rx))).await.ok()?;
        Some(RelayLink { to_server: in_tx, from_server: out_rx })
    }

    /// Leaves a cluster: writes every session's state, then the task ends without a word to
    /// any device, so that the nodes that adopt the sessions serve them on (a rolling
    /// restart costs no handshake).
    pub async fn hand_over(&self) {
        let (tx, rx) = oneshot::channel();
        if self.command(Command::HandOver(tx)).await.is_ok() {
            let _ = rx.await;
        }
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
    received: mpsc::Sender<(SessionHandle, Vec<u8>)>,
    departed: mpsc::Sender<Departed>,
    events_dropped: u64,
    store: Option<Arc<dyn SessionStore>>,
    /// Writes gathered for the next batch, and the new sessions among them.
    pending: Vec<SessionWrite>,
    pending_inserts: Vec<SessionHandle>,
    /// The batch being written.
    writing: Option<Writing>,
    /// Events of new sessions whose first write is not durable yet, in order: nothing of a
    /// session reaches the application (so nothing it says is acknowledged) before the
    /// session could be restored after a crash.
    held: HashMap<SessionHandle, Vec<EndpointEvent>>,
    checkpoint_interval: Duration,
    next_checkpoint: std::time::Instant,
    store_failures: u64,
    /// Failed handshakes are logged within a budget: anyone can cause them.
    handshake_log: LogBudget,
    drop_log: DropSummary,
    /// A cluster's forwarding, once attached.
    relay: Option<RelayState>,
}

/// A batch of session writes handed to the store: what it checkpoints, the new sessions in
/// it, and where its outcome arrives.
struct Writing {
    checkpoints: Vec<tether_proto::dtls::Checkpoint>,
    inserted: Vec<SessionHandle>,
    outcome: oneshot::Receiver<Result<Applied, StoreError>>,
}

impl Writing {
    /// The outcome of the batch in `writing` (which must hold one).
    async fn outcome(writing: &mut Option<Writing>) -> Result<Applied, StoreError> {
        match writing.as_mut() {
            Some(writing) => (&mut writing.outcome).await.unwrap_or(Err(StoreError::Interrupted)),
            None => std::future::pending().await,
        }
    }
}

/// The next message of the relay (which must be attached); `None` when the cluster room
/// let go of it.
async fn relay_message(relay: &mut Option<RelayState>) -> Option<RelayIn> {
    match relay.as_mut() {
        Some(relay) => relay.inbound.recv().await,
        None => std::future::pending().await,
    }
}

/// Failed handshakes logged per window at most; the rest are counted in the next line.
const HANDSHAKE_LOG_BURST: u32 = 10;
/// The window of [`HANDSHAKE_LOG_BURST`].
const HANDSHAKE_LOG_WINDOW: Duration = Duration::from_secs(10);
/// How often dropped datagrams are summarised in the log (when any were dropped).
const DROP_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Datagrams read per wake-up before outputs are flushed.
const RECV_BATCH: usize = 64;

impl Actor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.restore().await;
        let mut buf = vec![0u8; 65_536];
        loop {
            self.process_events();
            self.hand_out_foreign();
            self.start_write();
            self.flush().await;
            let checkpoint = (self.store.is_some() && self.writing.is_none() && self.endpoint.dirty_sessions() > 0)
                .then_some(self.next_checkpoint);
            let drop_summary = self.drop_log.deadline(self.endpoint.stats());
            let deadline = [self.endpoint.poll_timeout(), self.pool.poll_timeout(), checkpoint, drop_summary]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    self.heard_directly(from);
                    self.endpoint.handle(clock::now(), from, &buf[..n]);
                    for _ in 1..RECV_BATCH {
                        let Ok((n, from)) = self.socket.try_recv_from(&mut buf) else { break };
                        self.heard_directly(from);
                        self.endpoint.handle(clock::now(), from, &buf[..n]);
                    }
                }
                message = relay_message(&mut self.relay), if self.relay.is_some() => match message {
                    Some(message) => self.relay_in(message).await,
                    None => self.relay = None,
                },
                outcome = Writing::outcome(&mut self.writing), if self.writing.is_some() => self.written(outcome),
                _ = sleep_until(deadline.map(clock::deadline)), if deadline.is_some() => {
                    let now = clock::now();
                    self.endpoint.handle_timeout(now);
                    self.pool.handle_timeout(now);
                }
                command = commands.recv() => match command {
                    Some(Command::HandOver(done)) => {
                        self.hand_over_all().await;
                        drop(self);
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Shutdown(done)) => {
                        self.stop().await;
                        // Release the socket before answering, so the address can be bound
                        // again as soon as `shutdown` returns.
                        drop(self);
                        let _ = done.send(());
                        return;
                    }
                    Some(command) => self.command(command),
                    None => {
                        self.stop().await;
                        return;
                    }
                },
            }
        }
    }

    /// Closes every session (close_notify), and waits until what that changed is stored.
    async fn stop(&mut self) {
        self.endpoint.close_all(clock::now());
        loop {
            self.process_events();
            self.start_write();
            self.flush().await;
            if self.writing.is_none() {
                return;
            }
            let outcome = Writing::outcome(&mut self.writing).await;
            self.written(outcome);
        }
    }

    /// Brings back the sessions of the store, then reserves sequence numbers for all of
    /// them in one write, before serving anything.
    async fn restore(&mut self) {
        let Some(store) = self.store.clone() else { return };
        let loaded = match store.load().await {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::error!(%err, "session store could not be read; starting without stored sessions");
                return;
            }
        };
        let now = clock::now();
        let mut unusable = Vec::new();
        let rolled_back = store.opened().rolled_back.is_some();
        for stored in loaded {
            if rolled_back {
                // Put back from an older copy: the session may have gone on after the copy.
                // Its device is told (on a sequence number it cannot have used) and
                // handshakes again.
                let _ = self.endpoint.farewell(now, stored.peer, &stored.snapshot);
                unusable.push(SessionWrite::Delete(stored.handle));
                continue;
            }
            if !self.restore_one(now, &stored, Arrival::Restored) {
                unusable.push(SessionWrite::Delete(stored.handle));
            }
        }
        let restored = self.generations.len();
        // Reservations for every restored session, in one write, before serving anything.
        self.pending.extend(unusable);
        self.next_checkpoint = now;
        self.start_write();
        if self.writing.is_some() {
            let outcome = Writing::outcome(&mut self.writing).await;
            self.written(outcome);
        }
        if restored > 0 {
            tracing::info!(restored, "sessions restored from the session store");
        }
    }

    /// Restores one stored session into the endpoint and the pool; an adopted one is
    /// reported to the application. `false`: it could not be restored.
    fn restore_one(&mut self, now: std::time::Instant, stored: &StoredSession, arrival: Arrival) -> bool {
        if let Err(err) = self.endpoint.restore(now, stored.handle, stored.peer, &stored.snapshot) {
            tracing::warn!(handle = %stored.handle, %err, "stored session not restored");
            return false;
        }
        let name = stored.snapshot.identity().map(identity_name);
        match self.pool.insert_restored(now, stored.peer, name) {
            Ok((generation, _)) => {
                self.generations.insert(stored.handle, generation);
                self.handles.insert(generation, stored.handle);
            }
            Err(_full) => {
                self.endpoint.close(now, stored.handle);
                return true;
            }
        }
        if let Arrival::Adopted { .. } = arrival {
            let accepted = Accepted {
                handle: stored.handle,
                peer: stored.peer,
                identity: stored.snapshot.identity().cloned(),
                resumed: false,
                arrival,
                bound_name: None,
            };
            if self.accepted.try_send(accepted).is_err() {
                self.events_dropped += 1;
            }
        }
        true
    }

    /// Writes every session's state (a final checkpoint of them all, and whatever waits to
    /// be written) and sends nothing more: another node adopts them.
    async fn hand_over_all(&mut self) {
        self.endpoint.checkpoint_all();
        loop {
            self.process_events();
            self.next_checkpoint = clock::now();
            self.start_write();
            if self.writing.is_none() {
                return;
            }
            let outcome = Writing::outcome(&mut self.writing).await;
            self.written(outcome);
        }
    }

    /// Hands the writes gathered so far (new sessions, ended ones, and, when due,
    /// checkpoints) to the store as one batch, unless a batch is being written. The outcome
    /// comes back as an input ([`written`](Self::written)): the loop never waits for the
    /// store, so a slow disk or database does not stall every datagram.
    fn start_write(&mut self) {
        let Some(store) = self.store.clone() else { return };
        if self.writing.is_some() {
            return;
        }
        let now = clock::now();
        let due = self.endpoint.checkpoint_due() || now >= self.next_checkpoint;
        let checkpoints = if due && self.endpoint.dirty_sessions() > 0 {
            self.next_checkpoint = now + self.checkpoint_interval;
            self.endpoint.checkpoint()
        } else {
            Vec::new()
        };
        if self.pending.is_empty() && checkpoints.is_empty() {
            return;
        }
        let mut writes = std::mem::take(&mut self.pending);
        writes.extend(checkpoints.iter().copied().map(SessionWrite::Checkpoint));
        let (done, outcome) = oneshot::channel();
        tokio::spawn(async move {
            let _ = done.send(store.apply(writes).await);
        });
        let inserted = std::mem::take(&mut self.pending_inserts);
        self.writing = Some(Writing { checkpoints, inserted, outcome });
    }

    /// The batch being written is stored, or failed: checkpointed sessions may use their new
    /// reservations, and the new sessions in it reach the application.
    fn written(&mut self, outcome: Result<Applied, StoreError>) {
        let Some(mut writing) = self.writing.take() else { return };
        match outcome {
            Ok(applied) if applied.fenced.is_empty() => self.endpoint.checkpoint_written(&writing.checkpoints),
            Ok(applied) => {
                // Another node adopted these sessions (this one was thought dead): they are
                // its now, and nothing more is sent on them from here.
                writing.checkpoints.retain(|c| !applied.fenced.contains(&c.handle));
                self.endpoint.checkpoint_written(&writing.checkpoints);
                tracing::warn!(sessions = applied.fenced.len(), "sessions adopted by another node: handed over");
                let now = clock::now();
                for handle in applied.fenced {
                    self.endpoint.hand_over(now, handle);
                }
            }
            Err(err) => {
                // Sessions keep their current reservations; once used up they wait.
                self.store_failures += 1;
                tracing::error!(%err, "session store write failed");
            }
        }
        for handle in writing.inserted {
            for event in self.held.remove(&handle).unwrap_or_default() {
                self.deliver(event);
            }
        }
    }

    fn command(&mut self, command: Command) {
        let now = clock::now();
        match command {
            Command::SendTo(handle, data, reply) => {
                let result = match self.established_peer(handle) {
                    None => Err(ServerSendError::NoSession(handle)),
                    Some(_) => self.endpoint.send(now, handle, &data).map_err(ServerSendError::from),
                };
                if let (Ok(()), Some(peer), Some(generation)) =
                    (&result, self.endpoint.peer_of(handle), self.generations.get(&handle))
                {
                    let traffic = Traffic { bytes_out: data.len() as u64, requests: 1, ..Traffic::default() };
                    self.pool.record(now, peer, *generation, traffic);
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Close(handle, reply) => {
                let open = self.endpoint.session(handle).is_some();
                self.endpoint.close(now, handle);
                let _ = reply.send(open);
            }
            Command::BindName(handle, name, reply) => {
                let bound = match (self.established_peer(handle), self.generations.get(&handle)) {
                    (Some(peer), Some(generation)) => self.pool.set_identity(peer, *generation, name),
                    _ => false,
                };
                if bound {
                    self.endpoint.bind(handle);
                }
                let _ = reply.send(bound);
            }
            Command::Lookup(identity, reply) => {
                let found =
                    self.pool.by_identity(&identity).and_then(|e| Some((*self.handles.get(&e.generation)?, e.peer)));
                let _ = reply.send(found);
            }
            Command::AttachRelay(relay) => self.relay = Some(relay),
            Command::SessionAt(peer, reply) => {
                let _ = reply.send(self.endpoint.established(peer));
            }
            Command::Sessions(reply) => {
                let sessions = self
                    .generations
                    .iter()
                    .filter_map(|(handle, generation)| {
                        let session = self.endpoint.session(*handle).filter(|s| s.is_established())?;
                        let restored = session.is_restored();
                        Some(Accepted {
                            handle: *handle,
                            peer: self.endpoint.peer_of(*handle)?,
                            identity: session.peer_identity().cloned(),
                            resumed: session.is_resumed(),
                            arrival: if restored { Arrival::Restored } else { Arrival::Handshake { replaced: None } },
                            bound_name: self
                                .pool
                                .get(self.endpoint.peer_of(*handle)?)
                                .filter(|e| e.generation == *generation)
                                .and_then(|e| e.identity.clone()),
                        })
                    })
                    .collect();
                let _ = reply.send(sessions);
            }
            Command::Stats(reply) => {
                let _ = reply.send(ServerStats {
                    endpoint: self.endpoint.stats().clone(),
                    pool: self.pool.stats(now),
                    handshakes_in_progress: self.endpoint.handshakes_in_progress(),
                    events_dropped: self.events_dropped,
                    recv_buffer: self.socket.recv_buffer_size(),
                    store_failures: self.store_failures,
                });
            }
            Command::Shutdown(_) | Command::HandOver(_) => unreachable!("handled in run"),
        }
    }

    /// Acts on the endpoint's and the pool's events. With a store, new sessions are stored
    /// first: their events wait in `held` until the write is durable.
    fn process_events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            if let Some(event) = self.hold(event) {
                self.deliver(event);
            }
        }
        let now = clock::now();
        while let Some(event) = self.pool.poll_event() {
            let (peer, generation, reason) = match event {
                PoolEvent::Expired { peer, generation } => (peer, generation, DepartReason::Expired),
                PoolEvent::Evicted { peer, generation } => (peer, generation, DepartReason::Evicted),
                _ => continue,
            };
            match reason {
                DepartReason::Expired => tracing::info!(%peer, "session expired (idle)"),
                _ => tracing::info!(%peer, "session evicted (the pool is at capacity)"),
            }
            if let Some(handle) = self.handles.get(&generation) {
                self.endpoint.close(now, *handle);
            }
            self.depart_generation(generation, peer, reason);
        }
        if let Some((summary, over)) = self.drop_log.poll(now, self.endpoint.stats()) {
            tracing::info!(over_s = over.as_secs(), "datagrams dropped: {summary}");
        }
    }

    /// Acts on one event of the endpoint: the pool and the application hear of it.
    fn deliver(&mut self, event: EndpointEvent) {
        let now = clock::now();
        match event {
            EndpointEvent::Connected { handle, peer, identity, resumed, replaced } => {
                let name = identity.as_ref().map(identity_name);
                match self.pool.insert_accepted(now, peer, name) {
                    Ok((generation, displaced)) => {
                        if let Some(old) = displaced {
                            self.depart_generation(old, peer, DepartReason::Closed(CloseReason::Replaced));
                        }
                        self.generations.insert(handle, generation);
                        self.handles.insert(generation, handle);
                        let arrival = Arrival::Handshake { replaced };
                        let accepted = Accepted { handle, peer, identity, resumed, arrival, bound_name: None };
                        if self.accepted.try_send(accepted).is_err() {
                            self.events_dropped += 1;
                        }
                    }
                    Err(_full) => self.endpoint.close(now, handle),
                }
            }
            EndpointEvent::Migrated { handle, from, to } => {
                let Some(generation) = self.generations.get(&handle).copied() else { return };
                if let Some(displaced) = self.pool.move_peer(from, to, generation) {
                    self.depart_generation(displaced, to, DepartReason::Closed(CloseReason::Replaced));
                }
                let session = self.endpoint.session(handle);
                let accepted = Accepted {
                    handle,
                    peer: to,
                    identity: session.and_then(|s| s.peer_identity().cloned()),
                    resumed: session.is_some_and(|s| s.is_resumed()),
                    arrival: Arrival::Moved { from },
                    bound_name: self.pool.get(to).and_then(|e| e.identity.clone()),
                };
                if self.accepted.try_send(accepted).is_err() {
                    self.events_dropped += 1;
                }
            }
            EndpointEvent::Data { handle, peer, data } => {
                if let Some(generation) = self.generations.get(&handle) {
                    let traffic = Traffic { bytes_in: data.len() as u64, ..Traffic::default() };
                    self.pool.record(now, peer, *generation, traffic);
                }
                if self.received.try_send((handle, data)).is_err() {
                    self.events_dropped += 1;
                }
            }
            EndpointEvent::Closed { handle, peer, reason, was_established } => {
                if !was_established {
                    if let Some(held_back) = self.handshake_log.allow(now) {
                        tracing::warn!(%peer, %reason, held_back, "handshake failed");
                    }
                }
                let Some(generation) = self.generations.remove(&handle) else {
                    return;
                };
                self.handles.remove(&generation);
                let identity = self.pool.get(peer).and_then(|e| e.identity.clone());
                if self.pool.remove(peer, generation).is_some() {
                    let identity = identity.as_deref().unwrap_or("-");
                    match reason {
                        CloseReason::Local => tracing::debug!(%peer, identity, "session closed by the server"),
                        _ => tracing::info!(%peer, identity, %reason, "session closed"),
                    }
                    self.depart(handle, peer, DepartReason::Closed(reason));
                }
            }
            _ => {}
        }
    }

    /// With a store: notes the writes `event` calls for (a new session's first snapshot, an
    /// ended session's deletion), and holds it back while its session's first write is not
    /// durable. Returns it if it can be delivered now.
    fn hold(&mut self, event: EndpointEvent) -> Option<EndpointEvent> {
        if self.store.is_none() {
            return Some(event);
        }
        let handle = match &event {
            EndpointEvent::Connected { handle, peer, .. } => {
                let snapshot = self.endpoint.snapshot(*handle)?;
                self.pending.push(SessionWrite::Insert { handle: *handle, peer: *peer, snapshot: Box::new(snapshot) });
                self.pending_inserts.push(*handle);
                self.held.insert(*handle, vec![event]);
                return None;
            }
            EndpointEvent::Closed { handle, was_established: true, .. } => {
                self.pending.push(SessionWrite::Delete(*handle));
                *handle
            }
            EndpointEvent::Data { handle, .. } | EndpointEvent::Migrated { handle, .. } => *handle,
            EndpointEvent::Closed { handle, .. } => *handle,
            _ => return Some(event),
        };
        match self.held.get_mut(&handle) {
            Some(held) => {
                held.push(event);
                None
            }
            None => Some(event),
        }
    }

    /// Reports the session of pool generation `generation` gone.
    fn depart_generation(&mut self, generation: Generation, peer: SocketAddr, reason: DepartReason) {
        if let Some(handle) = self.handles.get(&generation).copied() {
            self.depart(handle, peer, reason);
        }
    }

    /// Reports session `handle` gone.
    fn depart(&mut self, handle: SessionHandle, peer: SocketAddr, reason: DepartReason) {
        if self.departed.try_send(Departed { handle, peer, reason }).is_err() {
            self.events_dropped += 1;
        }
    }

    /// The address of `handle` if it is an established session.
    fn established_peer(&self, handle: SessionHandle) -> Option<SocketAddr> {
        let peer = self.endpoint.peer_of(handle)?;
        (self.endpoint.established(peer) == Some(handle)).then_some(peer)
    }

    async fn flush(&mut self) {
        while let Some(t) = self.endpoint.poll_transmit() {
            match self.route_of(t.destination) {
                Some(via) => self.relay_reply(via, t.destination, t.contents),
                None => {
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
            }
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
