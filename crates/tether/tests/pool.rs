//! The session pool: one handshake per peer, single flight, generations, idle expiry, LRU.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::{ConnectError, DepartReason, Dialer, DtlsClient, MemoryNetwork, PooledSession, SessionPool};
use tether_proto::dtls::CloseReason;
use tether_proto::pool::{PoolConfig, SessionRole};

fn pool(net: &MemoryNetwork, config: PoolConfig) -> SessionPool {
    SessionPool::new(config, Some(client_context()), Dialer::Memory(net.clone()), None).unwrap()
}

async fn request(pool: &SessionPool, session: &PooledSession, text: &str) -> Vec<u8> {
    session.send(text.as_bytes()).await.unwrap();
    let _ = pool;
    session.recv().await.expect("echo")
}

#[tokio::test(start_paused = true)]
async fn three_requests_to_one_peer_cost_one_handshake() {
    let net = MemoryNetwork::new();
    let server = echo_server(&net, addr(1, 5684), PoolConfig::default());
    let pool = pool(&net, PoolConfig::default());
    for i in 0..3 {
        let session = pool.get_or_connect(addr(1, 5684)).await.unwrap();
        assert_eq!(request(&pool, &session, &format!("request {i}")).await, format!("request {i}").into_bytes());
    }
    let stats = pool.stats().await;
    assert_eq!(stats.handshakes_total, 1);
    assert_eq!(stats.requests_total, 3);
    assert_eq!(server.stats().await.unwrap().endpoint.handshakes_completed, 1, "the server saw one handshake");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_callers_share_one_handshake() {
    let net = MemoryNetwork::new();
    let server = echo_server(&net, addr(2, 5684), PoolConfig::default());
    let pool = pool(&net, PoolConfig::default());
    let calls = (0..100).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get_or_connect(addr(2, 5684)).await })
    });
    let sessions: Vec<PooledSession> =
        futures::future::join_all(calls).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let first = match &sessions[0] {
        PooledSession::Connected { client, .. } => Arc::clone(client),
        other => panic!("{other:?}"),
    };
    for s in &sessions {
        let PooledSession::Connected { client, .. } = s else { panic!() };
        assert!(Arc::ptr_eq(client, &first), "every caller got the same session");
    }
    assert_eq!(pool.stats().await.handshakes_total, 1);
    assert_eq!(server.stats().await.unwrap().endpoint.handshakes_completed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_callers_for_an_unreachable_peer_all_fail_with_the_same_error_at_the_deadline() {
    let net = MemoryNetwork::new();
    let pool = pool(&net, PoolConfig::default());
    let nobody = addr(3, 5684);
    let start = tokio::time::Instant::now();
    let calls = (0..100).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get_or_connect(nobody).await })
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = start.elapsed();
    for r in results {
        match r.unwrap() {
            Err(ConnectError::Timeout { peer }) => assert_eq!(peer, nobody),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    let deadline = session().handshake_timeout;
    assert!(elapsed >= deadline && elapsed < deadline + Duration::from_secs(1), "failed after {elapsed:?}");
    let stats = pool.stats().await;
    assert_eq!(stats.sessions, 0, "a failed handshake leaves nothing behind");
    assert_eq!(stats.handshakes_total, 1, "one attempt for the hundred callers");
}

#[tokio::test]
async fn a_close_during_the_handshake_is_not_undone_by_its_completion() {
    let net = MemoryNetwork::new();
    let at = addr(4, 5684);
    let server = echo_server(&net, at, PoolConfig::default());
    let pool = pool(&net, PoolConfig::default());
    net.set_down(at, true); // the ClientHello is lost: the handshake waits
    let pending = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get_or_connect(at).await })
    };
    while pool.stats().await.connecting == 0 {
        tokio::task::yield_now().await;
    }
    assert!(pool.close(at).await, "the in-flight handshake is closed");
    net.set_down(at, false); // the retransmitted ClientHello gets through; the handshake completes
    let result = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    assert!(matches!(result, Err(ConnectError::Cancelled { .. })), "{result:?}");
    assert!(pool.get(at).await.is_none(), "the completed handshake did not bring the session back");
    assert_eq!(pool.stats().await.sessions, 0);
    // The server saw the handshake complete and the session closed again.
    let departed = tokio::time::timeout(Duration::from_secs(10), server.departed()).await.unwrap().unwrap();
    assert_eq!(departed.reason, DepartReason::Closed(CloseReason::PeerClosed));
}

#[tokio::test(start_paused = true)]
async fn closing_and_recreating_is_not_undone_by_the_old_sessions_close() {
    let net = MemoryNetwork::new();
    let at = addr(5, 5684);
    let _server = echo_server(&net, at, PoolConfig::default());
    let pool = pool(&net, PoolConfig::default());
    let old = pool.get_or_connect(at).await.unwrap();
    assert!(pool.close(at).await);
    let new = pool.get_or_connect(at).await.unwrap();
    // Let the old connection's close reach the pool's maintenance task.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let PooledSession::Connected { generation: g_old, .. } = old else { panic!() };
    let PooledSession::Connected { generation: g_new, client, .. } = &new else { panic!() };
    assert_ne!(g_old, *g_new);
    assert!(!client.is_closed());
    let stats = pool.stats().await;
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.per_session[0].generation, *g_new);
    assert_eq!(request(&pool, &new, "still pooled").await, b"still pooled");
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_expire_on_the_cleanup_cadence_on_both_sides() {
    let net = MemoryNetwork::new();
    let at = addr(6, 5684);
    let config = PoolConfig::default(); // 5 min idle, checked every minute
    let server = echo_server(&net, at, config.clone());
    let pool = pool(&net, config);
    let session = pool.get_or_connect(at).await.unwrap();
    request(&pool, &session, "last traffic").await;
    let connected_at = tokio::time::Instant::now();

    tokio::time::sleep_until(connected_at + Duration::from_secs(299)).await;
    assert_eq!(pool.stats().await.sessions, 1, "the dialled session is still pooled at 4:59");
    assert_eq!(server.stats().await.unwrap().pool.sessions, 1, "and the server's accepted one");
    // Expiry lands on the first check at or after five idle minutes: by 6:00 at the latest.
    tokio::time::sleep_until(connected_at + Duration::from_secs(361)).await;
    let stats = pool.stats().await;
    assert_eq!(stats.sessions, 0, "{stats:?}");
    assert_eq!(stats.expired_total, 1);
    let server_stats = server.stats().await.unwrap();
    assert_eq!(server_stats.pool.expired_total, 1);
    let departed = server.departed().await.unwrap();
    // Whichever side's check ran first closes the session; the other sees either its own
    // expiry or the peer's close_notify.
    assert!(
        matches!(departed.reason, DepartReason::Expired | DepartReason::Closed(CloseReason::PeerClosed)),
        "{departed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn at_capacity_the_least_recently_active_session_is_evicted_and_resumes_later() {
    let net = MemoryNetwork::new();
    let servers: Vec<_> = (0..3).map(|i| echo_server(&net, addr(7, 6000 + i), PoolConfig::default())).collect();
    let pool = pool(&net, PoolConfig::default().capacity(2));
    let a = pool.get_or_connect(addr(7, 6000)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _b = pool.get_or_connect(addr(7, 6001)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    request(&pool, &a, "a is active again").await; // b is now the least recently active
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _c = pool.get_or_connect(addr(7, 6002)).await.unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let stats = pool.stats().await;
    assert_eq!(stats.sessions, 2);
    assert_eq!(stats.evicted_total, 1);
    assert!(pool.get(addr(7, 6001)).await.is_none(), "b was evicted");
    assert!(pool.get(addr(7, 6000)).await.is_some());
    // b's next connection resumes its evicted session.
    let b_again = pool.get_or_connect(addr(7, 6001)).await.unwrap();
    assert!(b_again.is_resumed(), "evicted sessions stay resumable");
    assert_eq!(servers[1].stats().await.unwrap().endpoint.handshakes_completed, 2);
}

#[tokio::test(start_paused = true)]
async fn the_server_evicts_its_least_recently_active_peer_which_then_resumes() {
    let net = MemoryNetwork::new();
    let at = addr(8, 5684);
    let server = echo_server(&net, at, PoolConfig::default().capacity(2));
    let ctx = client_context();
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let socket = net.bind(addr(9, 7000 + u16::from(i))).unwrap();
        clients.push(DtlsClient::connect_on(socket, at, &ctx, None).await.unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let departed = server.departed().await.unwrap();
    assert_eq!((departed.peer, departed.reason), (addr(9, 7000), DepartReason::Evicted));
    assert_eq!(clients[0].closed().await, CloseReason::PeerClosed, "the evicted peer got close_notify");
    let saved = clients[0].connection().saved_session.clone().unwrap();
    let socket = net.bind(addr(9, 7100)).unwrap();
    let again = DtlsClient::connect_on(socket, at, &ctx, Some(&saved)).await.unwrap();
    assert!(again.connection().resumed, "the evicted session resumes");
    let stats = server.stats().await.unwrap();
    assert!(stats.pool.sessions <= 2, "{:?}", stats.pool);
}

#[tokio::test(start_paused = true)]
async fn a_vanished_peer_is_cleaned_up_by_idle_timeout_and_close_notify_removes_at_once() {
    let net = MemoryNetwork::new();
    let at = addr(10, 5684);
    let server = echo_server(&net, at, PoolConfig::default());
    let ctx = client_context();
    let vanishing = DtlsClient::connect_on(net.bind(addr(11, 7000)).unwrap(), at, &ctx, None).await.unwrap();
    let polite = DtlsClient::connect_on(net.bind(addr(11, 7001)).unwrap(), at, &ctx, None).await.unwrap();
    assert_eq!(server.stats().await.unwrap().pool.sessions, 2);

    polite.close().await;
    let departed = server.departed().await.unwrap();
    assert_eq!((departed.peer, departed.reason), (addr(11, 7001), DepartReason::Closed(CloseReason::PeerClosed)));
    assert_eq!(server.stats().await.unwrap().pool.sessions, 1, "removed at once, no time passed");

    net.set_down(addr(11, 7000), true); // gone without close_notify
    let departed = server.departed().await.unwrap();
    assert_eq!((departed.peer, departed.reason), (addr(11, 7000), DepartReason::Expired));
    assert_eq!(server.stats().await.unwrap().pool.sessions, 0);
    drop(vanishing);
}

#[tokio::test(start_paused = true)]
async fn statistics_match_the_pools_real_state() {
    let net = MemoryNetwork::new();
    let servers: Vec<_> = (0..3).map(|i| echo_server(&net, addr(12, 6000 + i), PoolConfig::default())).collect();
    let pool = pool(&net, PoolConfig::default());
    let sessions: Vec<_> = futures::future::join_all((0..3).map(|i| pool.get_or_connect(addr(12, 6000 + i))))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, s) in sessions.iter().enumerate() {
        for _ in 0..=i {
            request(&pool, s, "12345").await; // 5 bytes each way per request
        }
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    request(&pool, &sessions[2], "12345").await;
    assert!(pool.close(addr(12, 6001)).await);

    let stats = pool.stats().await;
    assert_eq!((stats.sessions, stats.established, stats.connecting), (2, 2, 0));
    assert_eq!(stats.handshakes_total, 3);
    assert_eq!(stats.closed_total, 1);
    assert_eq!(stats.requests_total, 1 + 2 + 3 + 1);
    let by_peer = |p| stats.per_session.iter().find(|s| s.peer == p).unwrap();
    let first = by_peer(addr(12, 6000));
    assert_eq!((first.requests, first.bytes_out, first.bytes_in, first.handshakes), (1, 5, 5, 1));
    assert_eq!(first.role, SessionRole::Connected);
    assert_eq!(first.identity, None, "a PSK server has no identity to show");
    assert!(first.idle >= Duration::from_secs(30));
    let third = by_peer(addr(12, 6002));
    assert_eq!((third.requests, third.bytes_out, third.bytes_in), (4, 20, 20));
    assert!(third.idle < Duration::from_secs(1));
    assert_eq!(stats.per_session[0].peer, addr(12, 6002), "most recently active first");
    let text = tether::metrics::render(&stats, Some(&servers[0].stats().await.unwrap().endpoint));
    assert!(text.contains("tether_pool_sessions 2\n"), "{text}");
    assert!(text.contains("tether_pool_handshakes_total 3\n"));
    assert!(text.contains("tether_dtls_datagrams_dropped_total{reason=\"malformed\"} 0\n"));
}

#[tokio::test(start_paused = true)]
async fn accepted_sessions_are_pooled_and_found_by_identity_or_endpoint_name() {
    let net = MemoryNetwork::new();
    let at = addr(13, 5684);
    let server = echo_server(&net, at, PoolConfig::default());
    let pool =
        SessionPool::new(PoolConfig::default(), None, Dialer::Memory(net.clone()), Some(Arc::clone(&server))).unwrap();
    let device = addr(14, 7000);
    let client = DtlsClient::connect_on(net.bind(device).unwrap(), at, &client_context(), None).await.unwrap();
    let accepted = server.accept().await.unwrap();
    assert_eq!(accepted.peer, device);

    // In the pool from its handshake on, found by its PSK identity.
    assert_eq!(pool.peer_of(IDENTITY).await, Some(device));
    let session = pool.get_or_connect(device).await.expect("the accepted session, no dialling");
    assert_eq!(session.role(), SessionRole::Accepted);
    // Bound to an endpoint name (as LwM2M registration does), found by that too.
    assert!(server.bind_name(accepted.handle, "urn:dev:1").await);
    assert_eq!(pool.peer_of("urn:dev:1").await, Some(device));
    // A server-initiated request rides on the device's own session.
    session.send(b"server to device").await.unwrap();
    assert_eq!(client.recv().await.as_deref(), Some(&b"server to device"[..]));
    let stats = pool.stats().await;
    assert_eq!((stats.sessions, stats.handshakes_total, stats.requests_total), (1, 1, 1));
    assert_eq!(stats.per_session[0].role, SessionRole::Accepted);
    assert_eq!(stats.per_session[0].identity.as_deref(), Some("urn:dev:1"));
    // Explicit close through the pool reaches the device.
    assert!(pool.close(device).await);
    assert_eq!(client.closed().await, CloseReason::PeerClosed);
    assert_eq!(pool.stats().await.sessions, 0);
}
