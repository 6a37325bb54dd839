//! `Lwm2mDevice`: an LwM2M device over DTLS, on the resilient client.
//!
//! The protocol is [`tether_coap::device::Lwm2mClient`] (sans-IO); this task drives it over
//! a [`ResilientClient`] whose transport keeps one local UDP port for the device's whole
//! life, as a deployed device does: a new handshake (after a reboot, a lost session, or a
//! NAT timeout) comes from the same port, and the server replaces the old session with it
//! (RFC 6347 §4.2.8). The Server object's retry timers are the only retry loop: the
//! resilient client makes one attempt per `connect` and its breaker never second-guesses
//! the LwM2M schedule.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_coap::device::{Action, ClientConfig, ClientStats, DeviceEvent, Lwm2mClient};
use tether_proto::dtls::{CloseReason, DtlsContext, PskKey, SavedSession};
use tether_proto::resilience::{BackoffConfig, BreakerConfig, ResilienceConfigError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::client::{sleep_until, ConnectError, DtlsClient};
use crate::clock;
use crate::resilient::{ResilientClient, ResilientConfig, ResilientError, Transport, TransportError};
use crate::socket::{MemoryNetwork, Socket};

/// DTLS to the server from one fixed local port, resuming the last session when it can.
#[derive(Debug)]
pub struct FixedPortTransport {
    server: SocketAddr,
    context: Arc<DtlsContext>,
    /// This device's own PSK identity and key over a shared context.
    psk: Option<(Vec<u8>, PskKey)>,
    local: LocalPort,
    /// The session to resume next time; `None` inside when resumption is off.
    saved: Option<Mutex<Option<SavedSession>>>,
}

#[derive(Debug)]
enum LocalPort {
    /// A UDP socket bound once; each session gets a handle to it.
    Udp(std::net::UdpSocket),
    /// An address on an in-memory network, bound again for each session.
    Memory(MemoryNetwork, SocketAddr),
}

impl FixedPortTransport {
    /// Binds `local` (port 0 picks one) for talking to `server` over UDP.
    pub fn bind(local: SocketAddr, server: SocketAddr, context: Arc<DtlsContext>) -> std::io::Result<Self> {
        let socket = std::net::UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        // Connected, so ICMP port-unreachable surfaces as a refused handshake.
        socket.connect(server)?;
        Ok(Self { server, context, psk: None, local: LocalPort::Udp(socket), saved: Some(Mutex::new(None)) })
    }

    /// Takes a port on an in-memory network (tests on paused time).
    pub fn bind_memory(
        network: &MemoryNetwork,
        local: SocketAddr,
        server: SocketAddr,
        context: Arc<DtlsContext>,
    ) -> std::io::Result<Self> {
        let addr = network.bind(local)?.local_addr()?;
        Ok(Self {
            server,
            context,
            psk: None,
            local: LocalPort::Memory(network.clone(), addr),
            saved: Some(Mutex::new(None)),
        })
    }

    /// Authenticates with this PSK identity and key instead of the context's (a fleet of
    /// devices on one PSK client context).
    pub fn psk(mut self, identity: impl Into<Vec<u8>>, key: PskKey) -> Self {
        self.psk = Some((identity.into(), key));
        self
    }

    /// Whether a new handshake offers the last session for an abbreviated handshake
    /// (default on).
    pub fn resume(mut self, resume: bool) -> Self {
        self.saved = resume.then(|| Mutex::new(None));
        self
    }

    /// The local address every handshake comes from.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            LocalPort::Udp(socket) => socket.local_addr(),
            LocalPort::Memory(_, addr) => Ok(*addr),
        }
    }
}

impl Transport for FixedPortTransport {
    type Connection = DtlsClient;

    async fn connect(&self) -> Result<DtlsClient, TransportError> {
        // The previous session's task has ended before a new connect (the device closed or
        // lost it), so the port has one reader at a time.
        let socket = match &self.local {
            LocalPort::Udp(socket) => Socket::Udp(tokio::net::UdpSocket::from_std(socket.try_clone()?)?),
            LocalPort::Memory(network, addr) => {
                let socket = network.bind(*addr)?;
                socket.connect(self.server).await?;
                socket
            }
        };
        let saved = self.saved.as_ref().and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let psk = self.psk.as_ref().map(|(identity, key)| (&identity[..], key));
        let client = DtlsClient::connect_on_as(socket, self.server, &self.context, saved.as_ref(), psk).await?;
        if let Some(slot) = &self.saved {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = client.connection().saved_session.clone();
        }
        Ok(client)
    }
}

/// Settings of an [`Lwm2mDevice`].
#[derive(Debug, Clone)]
pub struct Lwm2mDeviceConfig {
    /// The LwM2M client: endpoint, lifetime, objects, retry timers, jitter.
    pub client: ClientConfig,
    /// The server's CoAPs address.
    pub server: SocketAddr,
    /// The DTLS client context (PSK or certificate).
    pub context: Arc<DtlsContext>,
    /// Local address to bind; port 0 picks one. Default `127.0.0.1:0` for a loopback server,
    /// else `0.0.0.0:0`.
    pub local: Option<SocketAddr>,
    /// Run on this in-memory network instead of UDP (tests on paused time).
    pub memory: Option<MemoryNetwork>,
    /// Resume the last session on a new handshake (abbreviated handshake). Default true.
    pub resume: bool,
    /// This device's PSK identity and key, over a PSK `context` shared by a fleet; `None`:
    /// the context's own.
    pub psk: Option<(Vec<u8>, PskKey)>,
}

impl Lwm2mDeviceConfig {
    /// A device described by `client` for the server at `server`, over UDP.
    pub fn new(client: ClientConfig, server: SocketAddr, context: Arc<DtlsContext>) -> Self {
        Self { client, server, context, local: None, memory: None, resume: true, psk: None }
    }
}

/// What a device is doing, for dashboards and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The registration location while registered.
    pub location: Option<String>,
    /// Whether it is registered and connected.
    pub registered: bool,
    /// Whether it has given up (every retry sequence failed).
    pub gave_up: bool,
    /// Counters.
    pub stats: ClientStats,
}

enum Command {
    Deregister(oneshot::Sender<()>),
}

/// A running device. Dropping it stops the device at once (no de-registration); use
/// [`deregister`](Self::deregister) to leave politely.
#[derive(Debug)]
pub struct Lwm2mDevice {
    endpoint: String,
    local_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<DeviceEvent>,
    /// Subscribed before the device started, for the first `events()` call: it misses
    /// nothing the device did before it was asked.
    first_events: Mutex<Option<broadcast::Receiver<DeviceEvent>>>,
    status: watch::Receiver<DeviceStatus>,
    task: tokio::task::JoinHandle<()>,
}

/// Events buffered per subscriber.
const EVENT_QUEUE: usize = 32;

impl Lwm2mDevice {
    /// Starts a device: binds its port and begins registering.
    pub fn start(config: Lwm2mDeviceConfig) -> Result<Self, DeviceError> {
        let local = config.local.unwrap_or_else(|| {
            if config.server.ip().is_loopback() {
                SocketAddr::new(config.server.ip(), 0)
            } else if config.server.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
            }
        });
        let transport = match &config.memory {
            Some(network) => {
                FixedPortTransport::bind_memory(network, local, config.server, Arc::clone(&config.context))?
            }
            None => FixedPortTransport::bind(local, config.server, Arc::clone(&config.context))?,
        }
        .resume(config.resume);
        let transport = match &config.psk {
            Some((identity, key)) => transport.psk(identity.clone(), key.clone()),
            None => transport,
        };
        let local_addr = transport.local_addr()?;
        // One attempt per connect: the Server object's schedule is the retry loop; a breaker
        // that opens after n failures would skip attempts the schedule promises.
        let handshake_timeout = config.context.session_config().handshake_timeout;
        let resilient = ResilientClient::new(
            transport,
            ResilientConfig {
                backoff: BackoffConfig::default().max_attempts(1),
                breaker: BreakerConfig { failure_threshold: u32::MAX, ..BreakerConfig::default() },
                // Longer than the handshake's own deadline, so the handshake ends itself
                // (and releases the socket) before the attempt is abandoned.
                attempt_timeout: handshake_timeout + Duration::from_secs(1),
                seed: config.client.seed,
            },
        )?;
        let endpoint = config.client.endpoint.clone();
        let unix_now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let client = Lwm2mClient::new(config.client, clock::now(), unix_now)?;
        let (commands, command_rx) = mpsc::channel(8);
        let (events, first_events) = broadcast::channel(EVENT_QUEUE);
        let (status_tx, status) = watch::channel(DeviceStatus::default());
        let identity = config.psk.as_ref().map(|(identity, _)| String::from_utf8_lossy(identity).into_owned());
        let driver =
            Driver { client, server: config.server, identity, resilient, events: events.clone(), status: status_tx };
        let task = tokio::spawn(driver.run(command_rx));
        let first_events = Mutex::new(Some(first_events));
        Ok(Self { endpoint, local_addr, commands, events, first_events, status, task })
    }

    /// The endpoint name.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The local UDP address every handshake comes from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<DeviceEvent> {
        self.events.subscribe()
    }

    /// Events since the device started (the last 32 of them at most) and on: the first call
    /// gets the receiver subscribed at the start, later calls behave as [`events`](Self::events).
    pub fn events_from_start(&self) -> broadcast::Receiver<DeviceEvent> {
        let first = self.first_events.lock().unwrap_or_else(|e| e.into_inner()).take();
        first.unwrap_or_else(|| self.events.subscribe())
    }

    /// The status now.
    pub fn status(&self) -> DeviceStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    /// Waits until registered (or given up); returns the location, `None` if it gave up.
    pub async fn registered(&self) -> Option<String> {
        let mut status = self.status.clone();
        let result = status.wait_for(|s| s.registered || s.gave_up).await.ok()?;
        result.location.clone().filter(|_| result.registered)
    }

    /// De-registers (`DELETE /rd/<id>`), closes the session and stops.
    pub async fn deregister(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Deregister(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl Drop for Lwm2mDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A device could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The local socket could not be bound.
    #[error("cannot bind the device's socket: {0}")]
    Io(#[from] std::io::Error),
    /// The retry timers are invalid.
    #[error(transparent)]
    Config(#[from] ResilienceConfigError),
}

struct Driver {
    client: Lwm2mClient,
    server: SocketAddr,
    /// The PSK identity, for naming it when the server does not know it.
    identity: Option<String>,
    resilient: ResilientClient<FixedPortTransport>,
    events: broadcast::Sender<DeviceEvent>,
    status: watch::Sender<DeviceStatus>,
}

/// Why a connection attempt failed, in an operator's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    /// The cause: port unreachable, timeout, unknown identity, key mismatch, certificate…
    pub cause: String,
    /// Nothing listens on the server's port (ICMP port unreachable): a server starting or
    /// restarting, worth trying again soon.
    pub refused: bool,
}

impl ConnectFailure {
    /// Explains `err`, an attempt to reach `server` as PSK `identity` (if PSK).
    pub fn of(err: &ResilientError, server: SocketAddr, identity: Option<&str>) -> Self {
        let transport = match err {
            ResilientError::ConnectFailed { last, .. } | ResilientError::SendFailed { last, .. } => last,
            other => return Self { cause: other.to_string(), refused: false },
        };
        let refused = |cause: String| Self { cause, refused: true };
        let failed = |cause: String| Self { cause, refused: false };
        let unreachable =
            format!("port unreachable: nothing listens on udp {server} (server not running, or restarting)");
        let timed_out = format!(
            "no answer from {server}: the DTLS handshake timed out (server unreachable, UDP blocked, or — with a PSK — \
             a key the server does not share)"
        );
        match transport {
            TransportError::Refused | TransportError::Dtls(ConnectError::Refused { .. }) => refused(unreachable),
            TransportError::Timeout(_) | TransportError::Dtls(ConnectError::Timeout { .. }) => failed(timed_out),
            TransportError::Dtls(ConnectError::Authentication { reason, .. }) => failed(match reason {
                CloseReason::UnknownPskIdentity => match identity {
                    Some(identity) => format!("unknown PSK identity: the server does not know identity {identity:?}"),
                    None => "unknown PSK identity: the server does not know this device's identity".into(),
                },
                CloseReason::AlertReceived(alert) if alert.0 == 115 => match identity {
                    Some(identity) => format!("unknown PSK identity: the server does not know identity {identity:?}"),
                    None => "unknown PSK identity: the server does not know this device's identity".into(),
                },
                CloseReason::AlertReceived(alert) if matches!(alert.0, 20 | 51) => {
                    format!("PSK key mismatch: the server could not verify this device's handshake ({alert})")
                }
                CloseReason::KeyMismatch => {
                    "PSK key mismatch: the server's Finished did not verify with this device's key".into()
                }
                CloseReason::AlertReceived(alert) if matches!(alert.0, 42..=46 | 48 | 116) => {
                    format!("the server rejected this device's certificate ({alert})")
                }
                CloseReason::AlertReceived(alert) if alert.0 == 40 => {
                    format!("the server refused the handshake ({alert}): no cipher suite or credential in common")
                }
                CloseReason::CertificateRejected(why) => format!("the server's certificate was rejected: {why}"),
                other => format!("authentication failed: {other}"),
            }),
            other => failed(other.to_string()),
        }
    }
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.client.start(clock::now());
        let mut deregistering: Option<oneshot::Sender<()>> = None;
        let mut gave_up = false;
        loop {
            self.client.handle_timeout(clock::now());
            self.flush().await;
            while let Some(event) = self.client.poll_event() {
                match &event {
                    DeviceEvent::GaveUp { reason } => {
                        tracing::warn!(endpoint = self.client.endpoint(), %reason, "registration gave up");
                        gave_up = true;
                    }
                    DeviceEvent::Deregistered => {
                        if let Some(done) = deregistering.take() {
                            let _ = done.send(());
                        }
                    }
                    _ => {}
                }
                let _ = self.events.send(event);
            }
            self.publish_status(gave_up);
            if gave_up && deregistering.is_some() {
                deregistering = None;
            }
            let connection = self.resilient.connection();
            let deadline = self.client.poll_timeout().map(clock::deadline);
            tokio::select! {
                received = async { connection.as_ref()?.recv().await }, if connection.is_some() => match received {
                    Some(datagram) => self.client.handle_datagram(clock::now(), &datagram),
                    None => {
                        self.resilient.disconnect().await;
                        self.client.handle_disconnected(clock::now());
                    }
                },
                _ = sleep_until(deadline) => {}
                command = commands.recv() => match command {
                    Some(Command::Deregister(done)) => {
                        deregistering = Some(done);
                        self.client.deregister(clock::now());
                    }
                    None => {
                        self.resilient.disconnect().await;
                        return;
                    }
                },
            }
        }
    }

    /// Sends the client's datagrams and carries out its actions, datagrams first: a
    /// response (to a reboot, say) goes out before the disconnect that follows it.
    async fn flush(&mut self) {
        loop {
            match self.resilient.connection() {
                Some(connection) => {
                    while let Some(datagram) = self.client.poll_transmit() {
                        // Lost like any datagram if the session just closed; CoAP retransmits.
                        let _ = connection.send(&datagram).await;
                        self.client.note_sent(clock::now());
                    }
                }
                None => while self.client.poll_transmit().is_some() {},
            }
            let Some(action) = self.client.poll_action() else { return };
            match action {
                Action::Disconnect => self.resilient.disconnect().await,
                Action::Abandon => {
                    if let Some(connection) = self.resilient.connection() {
                        connection.abandon().await;
                    }
                    self.resilient.disconnect().await;
                }
                Action::Connect => {
                    // A lost session may still be the current one; let it go first.
                    self.resilient.disconnect().await;
                    match self.resilient.connect().await {
                        Ok(()) => self.client.handle_connected(clock::now()),
                        Err(err) => {
                            let failure = ConnectFailure::of(&err, self.server, self.identity.as_deref());
                            if failure.refused {
                                self.client.handle_connect_refused(clock::now(), failure.cause);
                            } else {
                                self.client.handle_connect_failed(clock::now(), failure.cause);
                            }
                        }
                    }
                }
            }
        }
    }

    fn publish_status(&self, gave_up: bool) {
        let status = DeviceStatus {
            location: self.client.location().map(str::to_string),
            registered: self.client.is_registered(),
            gave_up,
            stats: self.client.stats(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }
}
