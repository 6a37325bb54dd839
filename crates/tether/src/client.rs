//! `DtlsClient`: one DTLS session to one server, driven by its own task.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tether_proto::dtls::{
    CloseReason, ConfigError, DtlsContext, Event, PeerIdentity, PskKey, SavedSession, SendError, Session,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock;
use crate::socket::Socket;

/// Why a connection could not be made. Cloneable, so every caller sharing one handshake
/// receives the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No handshake within the context's handshake timeout (or OpenSSL gave up
    /// retransmitting): the peer is unreachable or not answering.
    #[error("handshake with {peer} timed out")]
    Timeout {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer refused the connection (ICMP port unreachable).
    #[error("connection refused by {peer}")]
    Refused {
        /// The peer.
        peer: SocketAddr,
    },
    /// Authentication failed (unknown identity, wrong key, certificate rejected, alert).
    #[error("authentication with {peer} failed: {reason}")]
    Authentication {
        /// The peer.
        peer: SocketAddr,
        /// The session's close reason.
        reason: CloseReason,
    },
    /// The handshake failed for another reason.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// The session's close reason.
        reason: CloseReason,
    },
    /// The connection was closed (by `SessionPool::close`, say) before it completed.
    #[error("connection to {peer} was closed before its handshake completed")]
    Cancelled {
        /// The peer.
        peer: SocketAddr,
    },
    /// The pool is full of handshakes in progress.
    #[error("session pool is full")]
    PoolFull,
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The context cannot make a client session.
    #[error("invalid configuration: {0}")]
    Config(#[source] Arc<ConfigError>),
}

impl ConnectError {
    fn from_close(peer: SocketAddr, reason: CloseReason) -> Self {
        match reason {
            CloseReason::HandshakeTimeout | CloseReason::RetransmissionLimit => Self::Timeout { peer },
            CloseReason::UnknownPskIdentity
            | CloseReason::KeyMismatch
            | CloseReason::CertificateRejected(_)
            | CloseReason::NoPeerCertificate
            | CloseReason::AlertReceived(_) => Self::Authentication { peer, reason },
            CloseReason::Local => Self::Cancelled { peer },
            reason => Self::Handshake { peer, reason },
        }
    }
}

/// What a completed handshake established.
#[derive(Debug, Clone)]
pub struct Connected {
    /// The server's identity (certificate CN), if it has one.
    pub identity: Option<PeerIdentity>,
    /// Whether the handshake resumed a saved session.
    pub resumed: bool,
    /// The session to offer next time, for an abbreviated handshake.
    pub saved_session: Option<SavedSession>,
    /// Largest plaintext one `send` accepts.
    pub max_payload: usize,
}

/// Traffic counters of a client.
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Application bytes received.
    pub bytes_in: AtomicU64,
    /// Application bytes sent.
    pub bytes_out: AtomicU64,
    /// Application datagrams dropped because `recv` was not keeping up.
    pub dropped: AtomicU64,
}

enum Command {
    Send(Vec<u8>),
    Close(oneshot::Sender<()>),
    Abandon(oneshot::Sender<()>),
}

/// Received application data waiting for [`DtlsClient::recv`].
const RECV_QUEUE: usize = 1024;

/// A DTLS client connection. `connect` returns only once the handshake has finished; a task
/// drives the session's timers and socket until the connection closes.
#[derive(Debug)]
pub struct DtlsClient {
    peer: SocketAddr,
    commands: mpsc::Sender<Command>,
    data: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    closed: watch::Receiver<Option<CloseReason>>,
    connected: Connected,
    counters: Arc<ClientCounters>,
}

impl DtlsClient {
    /// Connects to `peer` from a fresh UDP socket.
    pub async fn connect(peer: SocketAddr, context: &Arc<DtlsContext>) -> Result<Self, ConnectError> {
        Self::connect_resuming(peer, context, None).await
    }

    /// Connects to `peer`, offering `saved` for an abbreviated handshake.
    pub async fn connect_resuming(
        peer: SocketAddr,
        context: &Arc<DtlsContext>,
        saved: Option<&SavedSession>,
    ) -> Result<Self, ConnectError> {
        let socket = Socket::bind_udp(local_for(peer), None).await.map_err(|e| ConnectError::Io(Arc::new(e)))?;
        socket.connect(peer).await.map_err(|e| ConnectError::Io(Arc::new(e)))?;
        Self::connect_on(socket, peer, context, saved).await
    }

    /// Connects to `peer` over `socket` (any [`Socket`], an in-memory one included).
    pub async fn connect_on(
        socket: Socket,
        peer: SocketAddr,
        context: &Arc<DtlsContext>,
        saved: Option<&SavedSession>,
    ) -> Result<Self, ConnectError> {
        Self::connect_on_as(socket, peer, context, saved, None).await
    }

    /// Like [`connect_on`](Self::connect_on), authenticating with `psk` (identity, key)
    /// instead of the PSK of `context` when given: a fleet of devices shares one context.
    pub async fn connect_on_as(
        socket: Socket,
        peer: SocketAddr,
        context: &Arc<DtlsContext>,
        saved: Option<&SavedSession>,
        psk: Option<(&[u8], &PskKey)>,
    ) -> Result<Self, ConnectError> {
        let now = clock::now();
        let session = match (psk, saved) {
            (Some((identity, key)), saved) => Session::client_with_psk(context, now, saved, identity, key),
            (None, Some(saved)) => Session::client_resuming(context, now, saved),
            (None, None) => Session::client(context, now),
        }
        .map_err(|e| ConnectError::Config(Arc::new(e)))?;
        let (commands, command_rx) = mpsc::channel(64);
        let (data_tx, data) = mpsc::channel(RECV_QUEUE);
        let (closed_tx, closed) = watch::channel(None);
        let (connected_tx, connected_rx) = oneshot::channel();
        let counters = Arc::new(ClientCounters::default());
        let driver = Driver {
            session,
            context: Arc::clone(context),
            socket,
            peer,
            data: data_tx,
            closed: closed_tx,
            connected: Some(connected_tx),
            counters: Arc::clone(&counters),
        };
        tokio::spawn(driver.run(command_rx));
        let connected = connected_rx.await.unwrap_or(Err(ConnectError::Cancelled { peer }))?;
        Ok(Self { peer, commands, data: tokio::sync::Mutex::new(data), closed, connected, counters })
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// What the handshake established.
    pub fn connection(&self) -> &Connected {
        &self.connected
    }

    /// Traffic counters.
    pub fn counters(&self) -> &ClientCounters {
        &self.counters
    }

    /// Queues one datagram of application data for sending. Everything a send can refuse
    /// is checked here (closed, empty, larger than `max_payload`), so `Ok` means the datagram
    /// goes out; like any UDP datagram it may still be lost on the way.
    pub async fn send(&self, data: &[u8]) -> Result<(), SendError> {
        if let Some(reason) = self.close_reason() {
            return Err(SendError::Closed(reason));
        }
        if data.is_empty() {
            return Err(SendError::Empty);
        }
        let max = self.connected.max_payload;
        if data.len() > max {
            return Err(SendError::TooLarge { len: data.len(), max });
        }
        if self.commands.send(Command::Send(data.to_vec())).await.is_err() {
            return Err(SendError::Closed(self.close_reason().unwrap_or(CloseReason::Local)));
        }
        Ok(())
    }

    /// The next datagram of application data; `None` once the connection has closed and
    /// everything received was read.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        self.data.lock().await.recv().await
    }

    /// Closes the connection (close_notify). Idempotent.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Stops without a word to the peer, as at a power loss: no close_notify, the peer
    /// keeps its side until it times out or a new handshake from this address replaces it.
    /// Whatever was sent before is sent first. Idempotent.
    pub async fn abandon(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Abandon(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// True once closed, by either side.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Why it closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed.borrow().clone()
    }

    /// Waits until the connection closes and returns why. Notices the peer's close_notify
    /// without a send.
    pub async fn closed(&self) -> CloseReason {
        let mut closed = self.closed.clone();
        loop {
            if let Some(reason) = closed.borrow_and_update().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return closed.borrow().clone().unwrap_or(CloseReason::Local);
            }
        }
    }
}

struct Driver {
    session: Session,
    context: Arc<DtlsContext>,
    socket: Socket,
    peer: SocketAddr,
    data: mpsc::Sender<Vec<u8>>,
    closed: watch::Sender<Option<CloseReason>>,
    connected: Option<oneshot::Sender<Result<Connected, ConnectError>>>,
    counters: Arc<ClientCounters>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; 65_536];
        let mut closing: Option<oneshot::Sender<()>> = None;
        loop {
            self.flush().await;
            self.apply_events();
            if self.session.is_closed() {
                break;
            }
            let deadline = self.session.poll_timeout().map(clock::deadline);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) if from == self.peer => self.session.handle_datagram(clock::now(), &buf[..n]),
                    Ok(_) => {}
                    Err(err) => self.socket_error(err),
                },
                _ = sleep_until(deadline), if deadline.is_some() => self.session.handle_timeout(clock::now()),
                command = commands.recv() => match command {
                    Some(Command::Send(data)) => {
                        // Checked by `send`; a failure here closes the session, which
                        // reports why.
                        if self.session.send(clock::now(), &data).is_ok() {
                            self.counters.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                    Some(Command::Close(reply)) => {
                        self.session.close(clock::now());
                        closing = Some(reply);
                    }
                    Some(Command::Abandon(reply)) => {
                        closing = Some(reply);
                        let _ = self.closed.send(Some(CloseReason::Local));
                        break;
                    }
                    None => self.session.close(clock::now()),
                },
            }
        }
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    fn socket_error(&mut self, err: io::Error) {
        if !self.session.is_handshaking() {
            return; // ICMP noise on an established session: DTLS carries on.
        }
        let error = if err.kind() == io::ErrorKind::ConnectionRefused {
            ConnectError::Refused { peer: self.peer }
        } else {
            ConnectError::Io(Arc::new(err))
        };
        if let Some(tx) = self.connected.take() {
            let _ = tx.send(Err(error));
        }
        self.session.close(clock::now());
    }

    async fn flush(&mut self) {
        while let Some(t) = self.session.poll_transmit() {
            // A failed send is a lost datagram; DTLS's timers recover from that.
            let _ = self.socket.send_to(&t.contents, self.peer).await;
        }
    }

    fn apply_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected { resumed } => {
                    let connected = Connected {
                        identity: self.session.peer_identity().cloned(),
                        resumed,
                        saved_session: self.session.saved_session(&self.context),
                        max_payload: self.session.max_payload(),
                    };
                    if let Some(tx) = self.connected.take() {
                        let _ = tx.send(Ok(connected));
                    }
                }
                Event::Data(data) => {
                    self.counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if self.data.try_send(data).is_err() {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Event::Closed { reason } => {
                    if let Some(tx) = self.connected.take() {
                        let _ = tx.send(Err(ConnectError::from_close(self.peer, reason.clone())));
                    }
                    let _ = self.closed.send(Some(reason));
                }
                _ => {}
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
/// The local address to reach `peer` from: loopback for a loopback peer, else any, port 0.
pub(crate) fn local_for(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
