//! The resilient client against real TCP and DTLS servers on 127.0.0.1 that the tests stop
//! and restart.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tether::{
    ClientEvent, DisconnectReason, DtlsServer, DtlsTransport, ResilientClient, ResilientConfig, ResilientError,
    TcpTransport, Transport, TransportError,
};
use tether_proto::dtls::{ClientConfig, DtlsContext};
use tether_proto::pool::PoolConfig;
use tether_proto::resilience::{BackoffConfig, BreakerConfig, CircuitState};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// A TCP server that records every line it receives; stopping it closes its connections.
struct LineServer {
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LineServer {
    async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lines);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = Arc::clone(&seen);
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=end).collect();
                            seen.lock().unwrap().push(String::from_utf8_lossy(&line[..end]).into_owned());
                        }
                    }
                });
            }
        });
        Self { lines, task }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Stops accepting and closes every connection (the JoinSet aborts them on drop).
    async fn stop(self) -> Vec<String> {
        self.task.abort();
        let _ = self.task.await;
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

fn free_tcp_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn config(attempts: u32, breaker: BreakerConfig) -> ResilientConfig {
    ResilientConfig { backoff: BackoffConfig::default().max_attempts(attempts), breaker, ..ResilientConfig::default() }
}

async fn next_matching(
    events: &mut broadcast::Receiver<ClientEvent>,
    want: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.unwrap();
            if want(&event) {
                return event;
            }
        }
    })
    .await
    .expect("event in time")
}

#[tokio::test(start_paused = true)]
async fn connect_to_a_closed_port_fails_after_max_attempts_with_the_configured_delays() {
    let closed = free_tcp_port();
    let client = ResilientClient::new(TcpTransport { addr: closed }, config(3, BreakerConfig::default())).unwrap();
    let mut events = client.events();
    let start = tokio::time::Instant::now();
    let err = client.connect().await.unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, ResilientError::ConnectFailed { attempts: 3, last: TransportError::Refused }), "{err:?}");
    let mut attempts = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let ClientEvent::Connecting { attempt, delay } = event {
            attempts.push((attempt, delay.as_secs()));
        }
    }
    assert_eq!(attempts, [(1, 0), (2, 1), (3, 2)], "every attempt reported with its delay");
    assert_eq!(elapsed, Duration::from_secs(3), "1 s + 2 s, and no sleep after the last attempt");
    assert!(!client.is_connected());
}

#[tokio::test]
async fn send_with_retry_survives_a_server_restart_and_delivers_each_message_once() {
    let addr = free_tcp_port();
    let first = LineServer::start(addr).await;
    let client = ResilientClient::new(TcpTransport { addr }, config(5, BreakerConfig::default())).unwrap();
    let mut events = client.events();
    client.connect().await.unwrap();
    client.send_with_retry(b"one\n").await.unwrap();
    while first.lines().is_empty() {
        tokio::task::yield_now().await;
    }
    let seen_by_first = first.stop().await;
    // The client notices the loss by itself, without sending.
    let lost = next_matching(&mut events, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
    assert!(matches!(lost, ClientEvent::Disconnected { reason: DisconnectReason::Lost(_) }), "{lost:?}");
    assert!(!client.is_connected());

    let second = LineServer::start(addr).await;
    client.send_with_retry(b"two\n").await.unwrap();
    assert!(client.is_connected());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while second.lines().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(seen_by_first, ["one"]);
    assert_eq!(second.stop().await, ["two"], "each message exactly once");
}

/// Counts the connection attempts that reach the network.
struct Counting<T> {
    inner: T,
    attempts: Arc<AtomicU32>,
}

impl<T: Transport> Transport for Counting<T> {
    type Connection = T::Connection;

    async fn connect(&self) -> Result<T::Connection, TransportError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.inner.connect().await
    }
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_without_touching_the_network() {
    let attempts = Arc::new(AtomicU32::new(0));
    let transport = Counting { inner: TcpTransport { addr: free_tcp_port() }, attempts: Arc::clone(&attempts) };
    let breaker = BreakerConfig { failure_threshold: 3, ..BreakerConfig::default() };
    let client = ResilientClient::new(transport, config(1, breaker)).unwrap();
    let mut events = client.events();
    for _ in 0..3 {
        let err = client.send_with_retry(b"x").await.unwrap_err();
        assert!(matches!(err, ResilientError::SendFailed { attempts: 1, last: TransportError::Refused }), "{err:?}");
    }
    assert_eq!(client.circuit_state(), CircuitState::Open);
    let opened = next_matching(&mut events, |e| matches!(e, ClientEvent::CircuitChanged { .. })).await;
    assert_eq!(opened, ClientEvent::CircuitChanged { from: CircuitState::Closed, to: CircuitState::Open });
    for _ in 0..10 {
        match client.send_with_retry(b"x").await {
            Err(ResilientError::CircuitOpen(open)) => {
                assert_eq!(open.retry_after, Duration::from_secs(30))
            }
            other => panic!("expected a fast failure, got {other:?}"),
        }
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "no connection attempt while open");
    // After the open timeout a probe goes through (and fails again: the port is still closed).
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(client.circuit_state(), CircuitState::HalfOpen);
    assert!(client.send_with_retry(b"x").await.is_err());
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    assert_eq!(client.circuit_state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn an_empty_payload_is_an_invalid_argument_and_leaves_the_breaker_alone() {
    let attempts = Arc::new(AtomicU32::new(0));
    let transport = Counting { inner: TcpTransport { addr: free_tcp_port() }, attempts: Arc::clone(&attempts) };
    let breaker = BreakerConfig { failure_threshold: 1, ..BreakerConfig::default() };
    let client = ResilientClient::new(transport, config(3, breaker)).unwrap();
    let mut events = client.events();
    for _ in 0..5 {
        assert!(matches!(client.send_with_retry(b"").await, Err(ResilientError::InvalidArgument(_))));
    }
    assert_eq!(client.circuit_state(), CircuitState::Closed);
    assert_eq!(attempts.load(Ordering::SeqCst), 0, "nothing touched the network");
    assert!(events.try_recv().is_err(), "no events");
}

#[tokio::test]
async fn zero_attempts_is_refused_at_construction() {
    let err =
        ResilientClient::new(TcpTransport { addr: free_tcp_port() }, config(0, BreakerConfig::default())).unwrap_err();
    assert!(err.to_string().contains("max_attempts"), "{err}");
}

#[tokio::test]
async fn over_dtls_a_restarted_server_gets_a_new_handshake_and_the_payload() {
    let addr = SocketAddr::from((
        [127, 0, 0, 1],
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
    ));
    let start =
        || async move { DtlsServer::bind(addr, server_context(), server_config(PoolConfig::default())).await.unwrap() };
    let first = start().await;
    let context = DtlsContext::client(ClientConfig::psk(IDENTITY, key()).session(session())).unwrap();
    let client = ResilientClient::new(DtlsTransport { addr, context }, config(5, BreakerConfig::default())).unwrap();
    let mut events = client.events();
    client.send_with_retry(b"before restart").await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), first.recv()).await.unwrap().unwrap().1,
        b"before restart"
    );

    first.shutdown().await; // close_notify to the client
    let lost = next_matching(&mut events, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
    assert!(
        matches!(lost, ClientEvent::Disconnected { reason: DisconnectReason::Lost(ref r) } if r.contains("peer closed")),
        "{lost:?}"
    );

    let second = start().await;
    client.send_with_retry(b"after restart").await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), second.recv()).await.unwrap().unwrap().1,
        b"after restart"
    );
    let stats = second.stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 1, "a new handshake with the restarted server");
}

#[tokio::test(start_paused = true)]
async fn retry_sleeps_between_attempts_only_and_can_be_cancelled() {
    let mut backoff = tether_proto::resilience::Backoff::new(BackoffConfig::default().max_attempts(4), 0).unwrap();
    let start = tokio::time::Instant::now();
    let calls = AtomicU32::new(0);
    let result: Result<(), _> = tether::retry(&mut backoff, |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), &str>("down") }
    })
    .await;
    assert_eq!(result.unwrap_err(), tether::RetryError { attempts: 4, last: "down" });
    assert_eq!(start.elapsed(), Duration::from_secs(1 + 2 + 4));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // Cancelled during its first sleep: no further attempt.
    let calls = AtomicU32::new(0);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(500),
        tether::retry(&mut backoff, |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), &str>("down") }
        }),
    )
    .await;
    assert!(cancelled.is_err());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A transport whose connects wait at a gate the test opens, then succeed or fail as told.
#[derive(Clone)]
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
    succeed: Arc<std::sync::atomic::AtomicBool>,
    attempts: Arc<AtomicU32>,
}

struct Loopback;

impl tether::Connection for Loopback {
    async fn send(&self, _: &[u8]) -> Result<(), TransportError> {
        Ok(())
    }
    async fn recv(&self) -> Option<Vec<u8>> {
        None
    }
    async fn closed(&self) -> String {
        std::future::pending().await
    }
    async fn close(&self) {}
}

impl Transport for Gate {
    type Connection = Loopback;

    async fn connect(&self) -> Result<Loopback, TransportError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.open.acquire().await.unwrap().forget();
        if self.succeed.load(Ordering::SeqCst) {
            Ok(Loopback)
        } else {
            Err(TransportError::Refused)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn half_open_probes_are_bounded_under_concurrency_and_cancelled_probes_free_their_slots() {
    let gate = Gate {
        open: Arc::new(tokio::sync::Semaphore::new(0)),
        succeed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        attempts: Arc::new(AtomicU32::new(0)),
    };
    let breaker = BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() }; // 3 probes, 2 successes
    let client = Arc::new(ResilientClient::new(gate.clone(), config(1, breaker)).unwrap());
    // Two failures open the circuit.
    gate.open.add_permits(2);
    for _ in 0..2 {
        assert!(client.send_with_retry(b"x").await.is_err());
    }
    assert_eq!(client.circuit_state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(client.circuit_state(), CircuitState::HalfOpen);

    // Ten concurrent callers: three probes reach the transport and wait at the gate; the
    // other seven are refused at once.
    let before = gate.attempts.load(Ordering::SeqCst);
    let mut calls = Vec::new();
    for _ in 0..10 {
        let client = Arc::clone(&client);
        calls.push(tokio::spawn(async move { client.send_with_retry(b"probe").await }));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(gate.attempts.load(Ordering::SeqCst) - before, 1, "connects are serialised: one probe connecting");
    let mut refused = 0;
    let mut waiting = Vec::new();
    for call in calls {
        if call.is_finished() {
            match call.await.unwrap() {
                Err(ResilientError::CircuitOpen(open)) => {
                    assert_eq!(open.state, CircuitState::HalfOpen);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        } else {
            waiting.push(call);
        }
    }
    assert_eq!(waiting.len(), 3, "the probe limit");
    assert_eq!(refused, 7);

    // Cancel all three probes: their slots free at once, and a new caller gets through.
    for call in &waiting {
        call.abort();
    }
    for call in waiting {
        let _ = call.await;
    }
    gate.succeed.store(true, Ordering::SeqCst);
    gate.open.add_permits(10);
    client.send_with_retry(b"probe after cancel").await.expect("a freed slot");
    assert_eq!(client.circuit_state(), CircuitState::HalfOpen, "one success of the two needed");
    client.send_with_retry(b"second success").await.unwrap();
    assert_eq!(client.circuit_state(), CircuitState::Closed, "the success threshold closes it");
}
