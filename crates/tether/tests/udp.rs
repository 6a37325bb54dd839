//! The tokio drivers on real UDP sockets on 127.0.0.1.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::{ConnectError, DtlsClient, DtlsServer};
use tether_proto::dtls::{ClientConfig, CloseReason, DtlsContext, PskKey};
use tether_proto::pool::PoolConfig;

async fn udp_echo_server() -> Arc<DtlsServer> {
    let server =
        DtlsServer::bind("127.0.0.1:0".parse().unwrap(), server_context(), server_config(PoolConfig::default()))
            .await
            .unwrap();
    let server = Arc::new(server);
    let echo = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, data)) = echo.recv().await {
            let _ = echo.send_to(peer, &data).await;
        }
    });
    server
}

/// The kernel's count of datagrams dropped on the UDP socket bound to `port` on 127.0.0.1
/// (full receive buffer), from /proc/net/udp.
fn kernel_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|d| d.parse().ok())
        .expect("the server socket is listed")
}

#[tokio::test]
async fn a_closed_port_refuses() {
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    match DtlsClient::connect(free, &client_context()).await {
        Err(ConnectError::Refused { peer }) => assert_eq!(peer, free),
        other => panic!("expected refused, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_key_is_an_authentication_error() {
    let server = udp_echo_server().await;
    let wrong =
        DtlsContext::client(ClientConfig::psk(IDENTITY, PskKey::from_hex("00112233").unwrap()).session(session()))
            .unwrap();
    match DtlsClient::connect(server.local_addr(), &wrong).await {
        Err(ConnectError::Authentication { reason, .. }) => {
            assert!(matches!(reason, CloseReason::AlertReceived(a) if a.name() == "decrypt_error"), "{reason}")
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_notices_the_servers_close_notify_without_sending() {
    let server = udp_echo_server().await;
    let context = client_context();
    let clients: Vec<DtlsClient> =
        futures::future::join_all((0..10).map(|_| DtlsClient::connect(server.local_addr(), &context)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    server.shutdown().await;
    for client in &clients {
        let reason = tokio::time::timeout(Duration::from_secs(5), client.closed()).await.unwrap();
        assert_eq!(reason, CloseReason::PeerClosed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_clients_handshake_and_round_trip_without_drops() {
    const CLIENTS: usize = 1_000;
    let server = udp_echo_server().await;
    let addr: SocketAddr = server.local_addr();
    let stats = server.stats().await.unwrap();
    assert!(stats.recv_buffer.unwrap() >= 4 * 1024 * 1024, "receive buffer {:?}", stats.recv_buffer);
    let drops_before = kernel_drops(addr.port());
    // Devices' default timers (RFC 6347: 1 s initial retransmission timeout). A 20 ms timer
    // across 1,000 simultaneous handshakes on two cores re-sends every flight several times
    // before the first copy is served, and that self-inflicted flood fills any buffer.
    let context = DtlsContext::client(ClientConfig::psk(IDENTITY, key())).unwrap();
    let clients = (0..CLIENTS).map(|i| {
        let context = Arc::clone(&context);
        tokio::spawn(async move {
            let client = DtlsClient::connect(addr, &context).await?;
            let message = format!("hello from client {i}").into_bytes();
            client.send(&message).await.expect("send");
            let echo = tokio::time::timeout(Duration::from_secs(30), client.recv()).await.expect("echo in time");
            assert_eq!(echo.as_deref(), Some(&message[..]));
            Ok::<_, ConnectError>(client)
        })
    });
    let results =
        tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(clients)).await.expect("bounded");
    let connected: Vec<DtlsClient> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(connected.len(), CLIENTS);
    let stats = server.stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, CLIENTS as u64);
    assert_eq!(stats.pool.sessions, CLIENTS);
    assert_eq!(kernel_drops(addr.port()) - drops_before, 0, "datagrams dropped for lack of socket buffer");
    println!(
        "1000 clients: {} handshakes, {} HelloVerifyRequests, receive buffer {:?} bytes",
        stats.endpoint.handshakes_completed, stats.endpoint.hello_verify_requests_sent, stats.recv_buffer
    );
}
