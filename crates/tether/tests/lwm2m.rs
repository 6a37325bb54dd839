//! The LwM2M server over real DTLS on 127.0.0.1, with a minimal scripted device.

#[path = "support/device.rs"]
mod device;
mod support;
use device::device;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::lwm2m::{build, Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsClient, DtlsServer};
use tether_coap::coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer};
use tether_coap::registration::RegistryEvent;
use tether_proto::dtls::{ClientConfig, DtlsContext, ServerConfig, StaticPskStore};
use tether_proto::pool::PoolConfig;
use tokio::sync::mpsc;

fn store() -> StaticPskStore {
    StaticPskStore::new().with("identity", key()).with("other", key())
}

async fn lwm2m_server() -> Lwm2mServer {
    let context = DtlsContext::server(ServerConfig::psk(store()).session(session())).unwrap();
    let dtls =
        DtlsServer::bind("127.0.0.1:0".parse().unwrap(), context, server_config(PoolConfig::default())).await.unwrap();
    let authorizer: HashMap<String, String> = [("psk:identity", "urn:dev:1"), ("psk:other", "urn:dev:2")]
        .into_iter()
        .map(|(a, b)| (a.into(), b.into()))
        .collect();
    Lwm2mServer::start(
        Arc::new(dtls),
        Arc::new(authorizer),
        None,
        Lwm2mServerConfig { coap: CoapConfig::default(), seed: 1, ..Lwm2mServerConfig::default() },
    )
    .await
    .unwrap()
}

async fn connect(server: &Lwm2mServer, identity: &str) -> DtlsClient {
    let context = DtlsContext::client(ClientConfig::psk(identity, key()).session(session())).unwrap();
    DtlsClient::connect(server.dtls().local_addr(), &context).await.unwrap()
}

#[tokio::test]
async fn a_hundred_server_initiated_reads_ride_on_the_devices_one_session() {
    let server = lwm2m_server().await;
    let mut events = server.events();
    let (registered_tx, mut registered) = mpsc::channel(4);
    tokio::spawn(device(connect(&server, "identity").await, "urn:dev:1", "tether", registered_tx));
    let (code, location) = tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();
    assert_eq!(code, ResponseType::Created);
    assert_eq!(location[0], "rd");
    assert!(matches!(events.recv().await.unwrap(), RegistryEvent::Registered { .. }));

    for _ in 0..100 {
        let answer =
            tokio::time::timeout(Duration::from_secs(10), server.read("urn:dev:1", "/3/0/0")).await.unwrap().unwrap();
        assert_eq!(answer.code, ResponseType::Content);
        assert_eq!(answer.payload, b"tether");
        assert_eq!(answer.content_format, Some(0));
    }
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 1, "one handshake for registration and 100 reads");
    assert_eq!(stats.pool.handshakes_total, 1);
    assert_eq!(stats.pool.sessions, 1);
    let session = &stats.pool.per_session[0];
    assert_eq!(session.identity.as_deref(), Some("urn:dev:1"), "the session is indexed by endpoint name");
    assert_eq!(session.requests, 100 + 1, "100 reads and the registration's response went out on it");
    let registrations = server.registrations().await;
    assert_eq!(registrations.len(), 1);
    assert_eq!(registrations[0].peer, session.peer);
}

#[tokio::test]
async fn an_identity_cannot_register_as_another_endpoint() {
    let server = lwm2m_server().await;
    let (tx, mut registered) = mpsc::channel(4);
    tokio::spawn(device(connect(&server, "identity").await, "urn:dev:2", "x", tx));
    let (code, _) = tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();
    assert_eq!(code, ResponseType::Forbidden);
    assert!(server.registrations().await.is_empty());
    assert!(matches!(server.read("urn:dev:2", "/3/0/0").await, Err(tether::lwm2m::Lwm2mError::NotRegistered(_))));
}

#[tokio::test]
async fn deregistration_removes_the_registration_and_closes_the_session() {
    let server = lwm2m_server().await;
    let client = connect(&server, "identity").await;
    let mut layer = MessageLayer::new(CoapConfig::default(), 5);
    let mut register = build(RequestType::Post, "/rd", Some(40), b"</3/0>".to_vec());
    register.add_option(CoapOption::UriQuery, b"ep=urn:dev:1".to_vec());
    layer.request(std::time::Instant::now(), register, true, false).unwrap();
    let location = exchange(&client, &mut layer).await;
    assert_eq!(location.header.code, MessageClass::Response(ResponseType::Created));
    let id = String::from_utf8(location.get_option(CoapOption::LocationPath).unwrap().back().unwrap().clone()).unwrap();
    layer
        .request(std::time::Instant::now(), build(RequestType::Delete, &format!("/rd/{id}"), None, vec![]), true, false)
        .unwrap();
    let deleted = exchange(&client, &mut layer).await;
    assert_eq!(deleted.header.code, MessageClass::Response(ResponseType::Deleted));
    assert!(server.registrations().await.is_empty());
    let reason = tokio::time::timeout(Duration::from_secs(10), client.closed()).await.unwrap();
    assert_eq!(reason, tether_proto::dtls::CloseReason::PeerClosed, "the server closed the device's session");
}

/// Sends what the layer has queued and returns the next response.
async fn exchange(client: &DtlsClient, layer: &mut MessageLayer) -> Packet {
    loop {
        while let Some(d) = layer.poll_transmit() {
            client.send(&d).await.unwrap();
        }
        if let Some(CoapEvent::Response { response, .. }) = layer.poll_event() {
            return response;
        }
        let data = tokio::time::timeout(Duration::from_secs(10), client.recv()).await.unwrap().unwrap();
        layer.handle_datagram(std::time::Instant::now(), &data);
    }
}

#[tokio::test]
async fn observe_delivers_notifications_until_cancelled() {
    let server = lwm2m_server().await;
    let (tx, mut registered) = mpsc::channel(4);
    tokio::spawn(device(connect(&server, "identity").await, "urn:dev:1", "90", tx));
    tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();

    let mut observation = server.observe("urn:dev:1", "/3/0/9").await.unwrap();
    assert_eq!(observation.first.payload, b"90");
    for seq in 2..5 {
        let n = tokio::time::timeout(Duration::from_secs(10), observation.notifications.recv()).await.unwrap().unwrap();
        assert_eq!(String::from_utf8(n.payload).unwrap(), format!("90#{seq}"));
    }
    assert!(server.cancel_observation(observation.id).await);
    // The channel closes once what was already queued has been read.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while observation.notifications.recv().await.is_some() {}
    })
    .await;
    assert!(drained.is_ok(), "the notification channel closed");
    assert!(!server.cancel_observation(observation.id).await, "already cancelled");
    // The session is still good for plain requests.
    assert_eq!(server.read("urn:dev:1", "/3/0/9").await.unwrap().payload, b"90");
}

async fn memory_lwm2m_server(net: &tether::MemoryNetwork, at: std::net::SocketAddr) -> Lwm2mServer {
    let context = DtlsContext::server(ServerConfig::psk(store()).session(session())).unwrap();
    let dtls = DtlsServer::serve(net.bind(at).unwrap(), context, server_config(PoolConfig::default())).unwrap();
    let authorizer: HashMap<String, String> =
        [("psk:identity".to_string(), "urn:dev:1".to_string())].into_iter().collect();
    Lwm2mServer::start(
        Arc::new(dtls),
        Arc::new(authorizer),
        None,
        Lwm2mServerConfig { coap: CoapConfig::default(), seed: 2, ..Lwm2mServerConfig::default() },
    )
    .await
    .unwrap()
}

/// Registers `urn:dev:1` with lifetime `lt` from `from` over the memory network.
async fn register_from(
    net: &tether::MemoryNetwork,
    server: std::net::SocketAddr,
    from: std::net::SocketAddr,
    lt: u32,
) -> DtlsClient {
    register_with(net, server, from, lt, "U").await.0
}

/// Registers with binding `b`; returns the client, its CoAP layer and the registration id.
async fn register_with(
    net: &tether::MemoryNetwork,
    server: std::net::SocketAddr,
    from: std::net::SocketAddr,
    lt: u32,
    binding: &str,
) -> (DtlsClient, MessageLayer, String) {
    let context = DtlsContext::client(ClientConfig::psk("identity", key()).session(session())).unwrap();
    let client = DtlsClient::connect_on(net.bind(from).unwrap(), server, &context, None).await.unwrap();
    let mut layer = MessageLayer::new(CoapConfig::default(), u64::from(from.port()));
    let mut register = build(RequestType::Post, "/rd", Some(40), b"</3/0>".to_vec());
    register.add_option(CoapOption::UriQuery, b"ep=urn:dev:1".to_vec());
    register.add_option(CoapOption::UriQuery, format!("lt={lt}").into_bytes());
    register.add_option(CoapOption::UriQuery, format!("b={binding}").into_bytes());
    layer.request(std::time::Instant::now(), register, true, false).unwrap();
    let created = exchange(&client, &mut layer).await;
    assert_eq!(created.header.code, MessageClass::Response(ResponseType::Created));
    let id = String::from_utf8(created.get_option(CoapOption::LocationPath).unwrap().back().unwrap().clone()).unwrap();
    (client, layer, id)
}

#[tokio::test(start_paused = true)]
async fn lifetime_expiry_removes_the_registration_and_closes_its_session() {
    let net = tether::MemoryNetwork::new();
    let at = addr(20, 5684);
    let server = memory_lwm2m_server(&net, at).await;
    let mut events = server.events();
    let client = register_from(&net, at, addr(21, 7000), 60).await;
    assert!(matches!(events.recv().await.unwrap(), RegistryEvent::Registered { .. }));
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(server.registrations().await.len(), 1, "still registered before its lifetime ends");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(events.recv().await.unwrap(), RegistryEvent::Expired { .. }));
    assert!(server.registrations().await.is_empty());
    assert_eq!(client.closed().await, tether_proto::dtls::CloseReason::PeerClosed, "its session was closed");
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.pool.sessions, 0);
}

#[tokio::test(start_paused = true)]
async fn re_registration_from_a_new_address_moves_the_registration_to_the_new_session() {
    let net = tether::MemoryNetwork::new();
    let at = addr(22, 5684);
    let server = memory_lwm2m_server(&net, at).await;
    let old = register_from(&net, at, addr(23, 7000), 300).await;
    // The NAT gives the device a new public address: a new handshake, a new registration.
    let new = register_from(&net, at, addr(23, 7999), 300).await;
    let registrations = server.registrations().await;
    assert_eq!(registrations.len(), 1);
    assert_eq!(registrations[0].peer, addr(23, 7999), "moved to the new session");
    assert_eq!(old.closed().await, tether_proto::dtls::CloseReason::PeerClosed, "the old session was closed");
    assert!(!new.is_closed());
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.pool.sessions, 1);
    assert_eq!(stats.pool.per_session[0].peer, addr(23, 7999));
}

#[tokio::test(start_paused = true)]
async fn queue_mode_holds_requests_until_the_device_is_heard_from() {
    let net = tether::MemoryNetwork::new();
    let at = addr(24, 5684);
    let server = memory_lwm2m_server(&net, at).await;
    let (client, mut layer, id) = register_with(&net, at, addr(25, 7000), 3600, "UQ").await;
    // Awake right after registering: a request goes at once.
    let read = {
        let server = server.clone();
        tokio::spawn(async move { server.read("urn:dev:1", "/3/0/0").await })
    };
    let request = tokio::time::timeout(Duration::from_secs(5), client.recv()).await.unwrap().unwrap();
    layer.handle_datagram(std::time::Instant::now(), &request);
    let Some(CoapEvent::Request { id: rid, .. }) = layer.poll_event() else { panic!() };
    let mut answer = tether_coap::registration::response(ResponseType::Content);
    answer.payload = b"awake".to_vec();
    layer.respond(std::time::Instant::now(), &rid, answer).unwrap();
    client.send(&layer.poll_transmit().unwrap()).await.unwrap();
    assert_eq!(read.await.unwrap().unwrap().payload, b"awake");

    // Asleep (not heard from for longer than queue_awake): the request waits.
    tokio::time::sleep(Duration::from_secs(94)).await;
    let read = {
        let server = server.clone();
        tokio::spawn(async move { server.read("urn:dev:1", "/3/0/0").await })
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), client.recv()).await.is_err(),
        "nothing sent to a sleeping device"
    );
    // The device wakes and sends an Update: the held request follows it.
    layer
        .request(std::time::Instant::now(), build(RequestType::Post, &format!("/rd/{id}"), None, vec![]), true, false)
        .unwrap();
    client.send(&layer.poll_transmit().unwrap()).await.unwrap();
    let mut answered = false;
    while !answered {
        let datagram = tokio::time::timeout(Duration::from_secs(5), client.recv()).await.unwrap().unwrap();
        layer.handle_datagram(std::time::Instant::now(), &datagram);
        while let Some(event) = layer.poll_event() {
            if let CoapEvent::Request { id: rid, .. } = event {
                let mut answer = tether_coap::registration::response(ResponseType::Content);
                answer.payload = b"woke".to_vec();
                layer.respond(std::time::Instant::now(), &rid, answer).unwrap();
                answered = true;
            }
        }
        while let Some(d) = layer.poll_transmit() {
            client.send(&d).await.unwrap();
        }
    }
    assert_eq!(read.await.unwrap().unwrap().payload, b"woke");
}

#[tokio::test]
async fn a_large_value_arrives_in_block2_blocks_and_is_reassembled() {
    let server = lwm2m_server().await;
    let (tx, mut registered) = mpsc::channel(4);
    let big: &'static str = Box::leak("0123456789".repeat(70).into_boxed_str()); // 700 bytes, 11 blocks
    tokio::spawn(device(connect(&server, "identity").await, "urn:dev:1", big, tx));
    tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();
    let answer =
        tokio::time::timeout(Duration::from_secs(10), server.read("urn:dev:1", "/3/0/0")).await.unwrap().unwrap();
    assert_eq!(answer.payload.len(), 700);
    assert_eq!(answer.payload, big.as_bytes());
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.pool.per_session[0].requests, 11 + 1, "eleven block requests and the registration answer");
}
