//! The resilient client: reconnect with exponential backoff, a circuit breaker, send with
//! retry, and events; over any [`Transport`] (TCP and DTLS provided).
//!
//! Exactly one loop retries a given failure: `connect` retries connecting;
//! `send_with_retry` retries the whole send (reconnecting with single attempts inside its
//! own loop), so attempts never nest.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_proto::dtls::{DtlsContext, SendError};
use tether_proto::resilience::{
    Backoff, BackoffConfig, BreakerConfig, CircuitBreaker, CircuitOpen, CircuitState, Outcome, Permit,
    ResilienceConfigError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};

use crate::client::{ConnectError, DtlsClient};
use crate::clock;

/// Why a transport operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer refused the connection.
    #[error("connection refused")]
    Refused,
    /// The attempt did not finish within its deadline.
    #[error("attempt timed out after {0:?}")]
    Timeout(Duration),
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The DTLS handshake failed.
    #[error(transparent)]
    Dtls(#[from] ConnectError),
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The transport refused the payload itself (too large, empty): the caller's mistake,
    /// neither retried nor counted against the remote side.
    #[error("payload refused: {0}")]
    Rejected(SendError),
}

impl From<io::Error> for TransportError {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            _ => Self::Io(Arc::new(err)),
        }
    }
}

/// Something that can open connections to one remote service.
pub trait Transport: Send + Sync + 'static {
    /// An open connection.
    type Connection: Connection;
    /// Opens a connection; returns only once it is really usable (TCP connected, DTLS
    /// handshake finished).
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, TransportError>> + Send;
}

/// An open connection.
pub trait Connection: Send + Sync + 'static {
    /// Sends one message.
    fn send(&self, data: &[u8]) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// The next message received; `None` once closed.
    fn recv(&self) -> impl Future<Output = Option<Vec<u8>>> + Send;
    /// Completes when the connection is lost or closed, without a send, with the reason.
    fn closed(&self) -> impl Future<Output = String> + Send;
    /// Closes it.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// TCP to a fixed address.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    /// The server.
    pub addr: SocketAddr,
}

/// A TCP connection: a reader task notices EOF and resets at once.
#[derive(Debug)]
pub struct TcpConnection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    data: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    closed: watch::Receiver<Option<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Transport for TcpTransport {
    type Connection = TcpConnection;

    async fn connect(&self) -> Result<TcpConnection, TransportError> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (mut read, write) = stream.into_split();
        let (data_tx, data) = mpsc::channel(1024);
        let (closed_tx, closed) = watch::channel(None);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let reason = loop {
                match read.read(&mut buf).await {
                    Ok(0) => break "peer closed the connection".to_string(),
                    Ok(n) => {
                        let _ = data_tx.send(buf[..n].to_vec()).await;
                    }
                    Err(err) => break err.to_string(),
                }
            };
            let _ = closed_tx.send(Some(reason));
        });
        Ok(TcpConnection {
            writer: tokio::sync::Mutex::new(write),
            data: tokio::sync::Mutex::new(data),
            closed,
            reader,
        })
    }
}

impl Connection for TcpConnection {
    async fn send(&self, data: &[u8]) -> Result<(), TransportError> {
        if let Some(reason) = self.closed.borrow().clone() {
            return Err(TransportError::Closed(reason));
        }
        let mut writer = self.writer.lock().await;
        writer.write_all(data).await?;
        Ok(())
    }

    async fn recv(&self) -> Option<Vec<u8>> {
        self.data.lock().await.recv().await
    }

    async fn closed(&self) -> String {
        let mut closed = self.closed.clone();
        loop {
            if let Some(reason) = closed.borrow_and_update().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return "connection dropped".to_string();
            }
        }
    }

    async fn close(&self) {
        let _ = self.writer.lock().await.shutdown().await;
        self.reader.abort();
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// DTLS to a fixed address with a client context.
#[derive(Debug, Clone)]
pub struct DtlsTransport {
    /// The server.
    pub addr: SocketAddr,
    /// The client context (credentials, timers).
    pub context: Arc<DtlsContext>,
}

impl Transport for DtlsTransport {
    type Connection = DtlsClient;

    async fn connect(&self) -> Result<DtlsClient, TransportError> {
        Ok(DtlsClient::connect(self.addr, &self.context).await?)
    }
}

impl Connection for DtlsClient {
    async fn send(&self, data: &[u8]) -> Result<(), TransportError> {
        match DtlsClient::send(self, data).await {
            Ok(()) => Ok(()),
            Err(SendError::Closed(reason)) => Err(TransportError::Closed(reason.to_string())),
            Err(other) => Err(TransportError::Rejected(other)),
        }
    }

    async fn recv(&self) -> Option<Vec<u8>> {
        DtlsClient::recv(self).await
    }

    async fn closed(&self) -> String {
        DtlsClient::closed(self).await.to_string()
    }

    async fn close(&self) {
        DtlsClient::close(self).await;
    }
}

/// Settings of a [`ResilientClient`].
#[derive(Debug, Clone)]
pub struct ResilientConfig {
    /// Attempts and delays.
    pub backoff: BackoffConfig,
    /// Circuit breaker.
    pub breaker: BreakerConfig,
    /// Deadline of each connection attempt. Default 10 s.
    pub attempt_timeout: Duration,
    /// Seed of the jitter.
    pub seed: u64,
}

impl Default for ResilientConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            breaker: BreakerConfig::default(),
            attempt_timeout: Duration::from_secs(10),
            seed: 0,
        }
    }
}

/// What the client is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// About to make connection attempt `attempt` (1-based), after waiting `delay`.
    Connecting {
        /// Attempt number.
        attempt: u32,
        /// The delay waited before it.
        delay: Duration,
    },
    /// Connected.
    Connected,
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// The circuit breaker changed state.
    CircuitChanged {
        /// From.
        from: CircuitState,
        /// To.
        to: CircuitState,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// `disconnect()` was called.
    Requested,
    /// The transport lost it (peer closed, reset, close_notify).
    Lost(String),
    /// A send on it failed; it was torn down to reconnect.
    SendFailed(String),
}

/// A resilient operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ResilientError {
    /// Every connection attempt failed.
    #[error("connect failed after {attempts} attempts: {last}")]
    ConnectFailed {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: TransportError,
    },
    /// Every send attempt failed.
    #[error("send failed after {attempts} attempts: {last}")]
    SendFailed {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: TransportError,
    },
    /// The circuit is open; nothing was attempted. Never retried.
    #[error(transparent)]
    CircuitOpen(#[from] CircuitOpen),
    /// The caller's mistake (an empty or oversized payload); not a failure of the remote
    /// side, never retried, the breaker untouched.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

struct State<C> {
    connection: Option<(u64, Arc<C>)>,
    next_generation: u64,
    breaker: CircuitBreaker,
    backoff: Backoff,
}

/// A client that keeps a connection to one service through outages. See the module docs.
pub struct ResilientClient<T: Transport> {
    transport: T,
    attempt_timeout: Duration,
    max_attempts: u32,
    state: Arc<Mutex<State<T::Connection>>>,
    events: broadcast::Sender<ClientEvent>,
    connecting: tokio::sync::Mutex<()>,
}

impl<T: Transport> std::fmt::Debug for ResilientClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilientClient").field("connected", &self.is_connected()).finish_non_exhaustive()
    }
}

impl<T: Transport> ResilientClient<T> {
    /// A client over `transport`; it does not connect until asked.
    pub fn new(transport: T, config: ResilientConfig) -> Result<Self, ResilienceConfigError> {
        let backoff = Backoff::new(config.backoff.clone(), config.seed)?;
        let breaker = CircuitBreaker::new(config.breaker.clone(), clock::now())?;
        if config.attempt_timeout.is_zero() {
            return Err(ResilienceConfigError("attempt_timeout must be positive"));
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            transport,
            attempt_timeout: config.attempt_timeout,
            max_attempts: config.backoff.max_attempts,
            state: Arc::new(Mutex::new(State { connection: None, next_generation: 1, breaker, backoff })),
            events,
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Subscribes to events (each subscriber sees those after it subscribed).
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        lock(&self.state).connection.is_some()
    }

    /// The breaker's state now.
    pub fn circuit_state(&self) -> CircuitState {
        let mut state = lock(&self.state);
        state.breaker.handle_timeout(clock::now());
        let state_now = state.breaker.state();
        self.emit_transitions(&mut state);
        state_now
    }

    /// The open connection (the reference's `get_client`).
    pub fn connection(&self) -> Option<Arc<T::Connection>> {
        lock(&self.state).connection.as_ref().map(|(_, c)| Arc::clone(c))
    }

    /// Connects, retrying with backoff; returns once really connected, or after
    /// `max_attempts` with the last cause. An event precedes every attempt.
    pub async fn connect(&self) -> Result<(), ResilientError> {
        let _one_at_a_time = self.connecting.lock().await;
        if self.is_connected() {
            return Ok(());
        }
        lock(&self.state).backoff.reset();
        let mut delay = Duration::ZERO;
        let mut last = None;
        for attempt in 1..=self.max_attempts {
            let permit = self.acquire()?;
            match self.connect_once(attempt, delay).await {
                Ok(_) => {
                    permit.finish(Outcome::Success);
                    return Ok(());
                }
                Err(err) => {
                    permit.finish(Outcome::Failure);
                    last = Some(err);
                }
            }
            let Some(next) = lock(&self.state).backoff.delay(attempt) else {
                break;
            };
            tokio::time::sleep(next).await;
            delay = next;
        }
        Err(ResilientError::ConnectFailed {
            attempts: self.max_attempts,
            last: last.unwrap_or(TransportError::Closed("no attempt made".into())),
        })
    }

    /// Sends `data`, retrying with backoff: each attempt checks the breaker, reconnects if
    /// needed (one connection attempt), and sends; a failed attempt tears the connection
    /// down. Fails fast while the circuit is open.
    pub async fn send_with_retry(&self, data: &[u8]) -> Result<(), ResilientError> {
        if data.is_empty() {
            return Err(ResilientError::InvalidArgument("empty payload".into()));
        }
        lock(&self.state).backoff.reset();
        let mut delay = Duration::ZERO;
        let mut last = None;
        for attempt in 1..=self.max_attempts {
            // The breaker is asked first: while open (or half-open with every probe slot
            // taken) the call fails at once instead of queueing for a connection.
            let permit = self.acquire()?;
            let connection = match self.connection() {
                Some(connection) => Ok(connection),
                None => {
                    let _one_at_a_time = self.connecting.lock().await;
                    match self.connection() {
                        Some(connection) => Ok(connection),
                        None => self.connect_once(attempt, delay).await,
                    }
                }
            };
            match connection {
                Err(err) => {
                    permit.finish(Outcome::Failure);
                    last = Some(err);
                }
                Ok(connection) => match connection.send(data).await {
                    Ok(()) => {
                        permit.finish(Outcome::Success);
                        return Ok(());
                    }
                    Err(TransportError::Rejected(err)) => {
                        permit.finish(Outcome::Ignored);
                        return Err(ResilientError::InvalidArgument(err.to_string()));
                    }
                    Err(err) => {
                        permit.finish(Outcome::Failure);
                        self.tear_down(&connection, DisconnectReason::SendFailed(err.to_string())).await;
                        last = Some(err);
                    }
                },
            }
            let Some(next) = lock(&self.state).backoff.delay(attempt) else {
                break;
            };
            tokio::time::sleep(next).await;
            delay = next;
        }
        Err(ResilientError::SendFailed {
            attempts: self.max_attempts,
            last: last.unwrap_or(TransportError::Closed("no attempt made".into())),
        })
    }

    /// The next message from the current connection; `None` if there is none or it closed.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        self.connection()?.recv().await
    }

    /// Closes the connection, if any.
    pub async fn disconnect(&self) {
        if let Some(connection) = self.connection() {
            self.tear_down(&connection, DisconnectReason::Requested).await;
        }
    }

    /// One connection attempt with its own deadline. The caller holds the breaker permit.
    async fn connect_once(&self, attempt: u32, delay: Duration) -> Result<Arc<T::Connection>, TransportError> {
        let _ = self.events.send(ClientEvent::Connecting { attempt, delay });
        match tokio::time::timeout(self.attempt_timeout, self.transport.connect()).await {
            Ok(Ok(connection)) => Ok(self.install(connection)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(TransportError::Timeout(self.attempt_timeout)),
        }
    }

    fn acquire(&self) -> Result<PermitGuard<T::Connection>, ResilientError> {
        let mut state = lock(&self.state);
        let result = state.breaker.acquire(clock::now());
        self.emit_transitions(&mut state);
        let permit = result?;
        Ok(PermitGuard { state: Arc::clone(&self.state), events: self.events.clone(), permit: Some(permit) })
    }

    fn install(&self, connection: T::Connection) -> Arc<T::Connection> {
        let connection = Arc::new(connection);
        let generation = {
            let mut state = lock(&self.state);
            let generation = state.next_generation;
            state.next_generation += 1;
            state.connection = Some((generation, Arc::clone(&connection)));
            generation
        };
        let _ = self.events.send(ClientEvent::Connected);
        // Notice the transport's own loss of the connection, without a send.
        let watched = Arc::clone(&connection);
        let state = Arc::clone(&self.state);
        let events = self.events.clone();
        tokio::spawn(async move {
            let reason = watched.closed().await;
            let lost = {
                let mut state = lock(&state);
                let current = matches!(&state.connection, Some((g, _)) if *g == generation);
                if current {
                    state.connection = None;
                }
                current
            };
            if lost {
                let _ = events.send(ClientEvent::Disconnected { reason: DisconnectReason::Lost(reason) });
            }
        });
        connection
    }

    async fn tear_down(&self, connection: &Arc<T::Connection>, reason: DisconnectReason) {
        let removed = {
            let mut state = lock(&self.state);
            let current = matches!(&state.connection, Some((_, c)) if Arc::ptr_eq(c, connection));
            if current {
                state.connection = None;
            }
            current
        };
        connection.close().await;
        if removed {
            let _ = self.events.send(ClientEvent::Disconnected { reason });
        }
    }

    fn emit_transitions(&self, state: &mut State<T::Connection>) {
        emit_transitions(&self.events, state);
    }
}

fn emit_transitions<C>(events: &broadcast::Sender<ClientEvent>, state: &mut State<C>) {
    while let Some(t) = state.breaker.poll_event() {
        let _ = events.send(ClientEvent::CircuitChanged { from: t.from, to: t.to });
    }
}

fn lock<C>(state: &Mutex<State<C>>) -> MutexGuard<'_, State<C>> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A breaker permit that reports `Ignored` if dropped unreported (the call was cancelled),
/// so a cancelled probe frees its slot at once.
struct PermitGuard<C> {
    state: Arc<Mutex<State<C>>>,
    events: broadcast::Sender<ClientEvent>,
    permit: Option<Permit>,
}

impl<C> PermitGuard<C> {
    fn finish(mut self, outcome: Outcome) {
        self.report(outcome);
    }

    fn report(&mut self, outcome: Outcome) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut state = lock(&self.state);
        state.breaker.record(clock::now(), permit, outcome);
        emit_transitions(&self.events, &mut state);
    }
}

impl<C> Drop for PermitGuard<C> {
    fn drop(&mut self) {
        self.report(Outcome::Ignored);
    }
}

/// Runs `operation` up to `backoff.max_attempts()` times, sleeping the backoff's delay
/// between failed attempts and not after the last. Dropping the returned future cancels it,
/// sleep included. `operation` gets the 1-based attempt number.
pub async fn retry<F, Fut, T, E: std::fmt::Display>(backoff: &mut Backoff, mut operation: F) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    backoff.reset();
    let mut attempt = 1;
    loop {
        match operation(attempt).await {
            Ok(value) => return Ok(value),
            Err(last) => match backoff.delay(attempt) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(RetryError { attempts: attempt, last }),
            },
        }
        attempt += 1;
    }
}

/// Every attempt of [`retry`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed after {attempts} attempts: {last}")]
pub struct RetryError<E: std::fmt::Display> {
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub last: E,
}
