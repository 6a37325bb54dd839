//! The server's caps under a flood of handshakes that stall after the cookie exchange, over
//! real UDP: one address holds only its share of handshakes, handshakes in progress and
//! sessions never exceed their limits (stalled handshakes yield their slots to new ones),
//! legitimate sessions are untouched, and at capacity the least recently active session is
//! evicted.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::{DepartReason, DtlsClient, DtlsServer, DtlsServerConfig};
use tether_proto::dtls::{ClientConfig, DropReason, DtlsContext, EndpointConfig, Session, SessionConfig};
use tether_proto::pool::PoolConfig;

const MAX_HANDSHAKES: usize = 20;
const MAX_SESSIONS: usize = 65;
const CAPACITY: usize = 50;
/// Handshakes in progress from one address that never held a session.
const PER_ADDRESS: usize = 10;

/// A client that completes the cookie exchange, sends its ClientHello with the cookie, and
/// then falls silent: a handshake slot held until the server's deadline.
fn stall_a_handshake(server: SocketAddr, context: &Arc<DtlsContext>) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    #[allow(clippy::disallowed_methods, reason = "a raw client on the wall clock")]
    let now = std::time::Instant::now();
    let mut session = Session::client(context, now).unwrap();
    let hello = session.poll_transmit().unwrap().contents;
    socket.send_to(&hello, server).unwrap();
    let mut buf = [0u8; 2048];
    if let Ok((n, _)) = socket.recv_from(&mut buf) {
        session.handle_datagram(now, &buf[..n]); // HelloVerifyRequest
        if let Some(with_cookie) = session.poll_transmit() {
            socket.send_to(&with_cookie.contents, server).unwrap();
        }
    }
    socket // kept open, never answering
}

/// 200 stalled handshakes from 4 threads at once, while the server's counters are sampled;
/// returns the sockets (to keep them quiet but open) and the most handshakes in progress and
/// pooled sessions seen.
async fn flood(server: &DtlsServer, context: &Arc<DtlsContext>) -> (Vec<UdpSocket>, usize, usize) {
    let addr = server.local_addr();
    let context = Arc::clone(context);
    let flood = std::thread::spawn(move || {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..50).map(|_| stall_a_handshake(addr, &context)).collect::<Vec<_>>()))
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
        })
    });
    let (mut most_handshaking, mut most_sessions) = (0, 0);
    while !flood.is_finished() {
        let stats = server.stats().await.unwrap();
        most_handshaking = most_handshaking.max(stats.handshakes_in_progress);
        most_sessions = most_sessions.max(stats.pool.sessions);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (flood.join().unwrap(), most_handshaking, most_sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_hold_under_a_handshake_flood_and_the_least_recently_active_session_is_evicted() {
    let session = SessionConfig::default()
        .retransmit(Duration::from_millis(100), Duration::from_millis(400))
        .handshake_timeout(Duration::from_secs(3));
    let server_context = {
        let store = tether_proto::dtls::StaticPskStore::new().with(IDENTITY, key());
        DtlsContext::server(tether_proto::dtls::ServerConfig::psk(store).session(session.clone())).unwrap()
    };
    let config = DtlsServerConfig::default()
        .endpoint(
            // Every client here shares one identity: this test is about the other caps.
            EndpointConfig::new([9; 32])
                .max_handshakes(MAX_HANDSHAKES)
                .max_sessions(MAX_SESSIONS)
                .max_sessions_per_identity(MAX_SESSIONS)
                .handshakes_per_source(PER_ADDRESS, 4 * PER_ADDRESS),
        )
        .pool(PoolConfig::default().capacity(CAPACITY));
    let server = Arc::new(DtlsServer::bind("127.0.0.1:0".parse().unwrap(), server_context, config).await.unwrap());
    let echo = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, data)) = echo.recv().await {
            let _ = echo.send_to(peer, &data).await;
        }
    });
    let addr = server.local_addr();
    let client_context = DtlsContext::client(ClientConfig::psk(IDENTITY, key()).session(session)).unwrap();

    // A flood from an address that never held a session: it holds its share only.
    let per_address = PER_ADDRESS;
    let (stalled, most_handshaking, _) = flood(&server, &client_context).await;
    let stats = server.stats().await.unwrap();
    assert_eq!(stats.handshakes_in_progress, per_address, "one address's share of stalled handshakes");
    assert!(most_handshaking <= per_address, "{most_handshaking} handshakes in progress");
    let over_share = stats.endpoint.dropped(DropReason::SourceLimit);
    assert!(over_share >= 150, "ClientHellos over the address's share dropped: {over_share}");
    assert_eq!(stats.endpoint.sessions_created as usize, per_address, "no state beyond the cap");
    drop(stalled);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.stats().await.unwrap().handshakes_in_progress, 0, "stalled handshakes expire");

    // CAPACITY sessions; then every one but the first is used again, so the first is the
    // least recently active.
    let mut clients = Vec::new();
    for _ in 0..CAPACITY {
        clients.push(DtlsClient::connect(addr, &client_context).await.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for client in &clients[1..] {
        client.send(b"ping").await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), client.recv()).await.unwrap().unwrap(), b"ping");
    }

    // A flood from the same address, which now holds sessions (a known source, not held
    // to a share): the handshake limit binds, and each new ClientHello takes the slot of the
    // oldest stalled handshake. No established session is given up for an unauthenticated
    // handshake.
    let (stalled, most_handshaking, most_sessions) = flood(&server, &client_context).await;
    let stats = server.stats().await.unwrap();
    assert_eq!(stats.handshakes_in_progress, MAX_HANDSHAKES);
    assert!(most_handshaking <= MAX_HANDSHAKES, "{most_handshaking} handshakes in progress");
    assert!(most_sessions <= CAPACITY, "{most_sessions} sessions");
    assert!(stats.endpoint.stalled_handshakes_closed >= 150, "{:?}", stats.endpoint);
    assert_eq!(stats.endpoint.sessions_evicted, 0);
    // The legitimate sessions carried on through it.
    for client in &clients[1..] {
        client.send(b"still").await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), client.recv()).await.unwrap().unwrap(), b"still");
    }

    // The stalled handshakes time out and free their slots; a new client then takes the
    // least recently active session's place.
    drop(stalled);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.stats().await.unwrap().handshakes_in_progress, 0);
    let newcomer = DtlsClient::connect(addr, &client_context).await.unwrap();
    let departed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let departed = server.departed().await.unwrap();
            if departed.reason == DepartReason::Evicted {
                return departed;
            }
        }
    })
    .await
    .unwrap();
    let stats = server.stats().await.unwrap();
    assert_eq!(stats.pool.sessions, CAPACITY);
    let peers: Vec<SocketAddr> = stats.pool.per_session.iter().map(|s| s.peer).collect();
    assert!(!peers.contains(&departed.peer));
    newcomer.send(b"hello").await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), newcomer.recv()).await.unwrap().unwrap(), b"hello");
    // The evicted one was the first client, the one not used again; the others remain.
    assert!(clients[1..].iter().all(|c| !c.is_closed()));
    assert!(tokio::time::timeout(Duration::from_secs(5), clients[0].closed()).await.is_ok(), "the first was evicted");
}
