//! Any datagrams into a DTLS server endpoint, from the address of an established session,
//! from the address of a handshake in progress, and from strangers: never panics, creates
//! no session without a cookie, and the established session keeps working.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tether_proto::dtls::{
    ClientConfig, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, Event, PskKey, ServerConfig, Session,
    SessionConfig, StaticPskStore,
};

struct Contexts {
    server: Arc<DtlsContext>,
    client: Arc<DtlsContext>,
}

fn contexts() -> &'static Contexts {
    static CONTEXTS: OnceLock<Contexts> = OnceLock::new();
    CONTEXTS.get_or_init(|| {
        let key = PskKey::from_hex("73656372657450534b").unwrap();
        let session = SessionConfig::default().handshake_timeout(Duration::from_secs(10));
        let store = StaticPskStore::new().with("identity", key.clone());
        Contexts {
            server: DtlsContext::server(ServerConfig::psk(store).session(session.clone())).unwrap(),
            client: DtlsContext::client(ClientConfig::psk("identity", key).session(session)).unwrap(),
        }
    })
}

const ESTABLISHED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)), 5000);
const HANDSHAKING: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3)), 5000);
const STRANGER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4)), 5000);

/// Delivers both ways until quiet; `stop_after` limits the client's datagrams delivered.
fn exchange(now: Instant, endpoint: &mut Endpoint, client: &mut Session, addr: SocketAddr, stop_after: usize) -> usize {
    let mut delivered = 0;
    for _ in 0..50 {
        let mut moved = false;
        while let Some(t) = client.poll_transmit() {
            if delivered < stop_after {
                endpoint.handle(now, addr, &t.contents);
                delivered += 1;
                moved = true;
            }
        }
        while let Some(t) = endpoint.poll_transmit() {
            if t.destination == addr {
                client.handle_datagram(now, &t.contents);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    delivered
}

fuzz_target!(|data: &[u8]| {
    let contexts = contexts();
    let now = Instant::now();
    let mut endpoint = Endpoint::new(Arc::clone(&contexts.server), EndpointConfig::new([7; 32]), now).unwrap();
    let mut established = Session::client(&contexts.client, now).unwrap();
    exchange(now, &mut endpoint, &mut established, ESTABLISHED, usize::MAX);
    assert!(established.is_established());
    // A second client gets through the cookie exchange and stops mid-handshake.
    let mut handshaking = Session::client(&contexts.client, now).unwrap();
    exchange(now, &mut endpoint, &mut handshaking, HANDSHAKING, 2);
    while endpoint.poll_event().is_some() {}
    while endpoint.poll_transmit().is_some() {}

    // Real datagrams to mutate: a fresh ClientHello and an application record of the
    // established session (the fuzzer alone rarely builds a record the engine parses deeply).
    let hello = Session::client(&contexts.client, now).unwrap().poll_transmit().unwrap().contents;
    established.send(now, b"fuzz").unwrap();
    let record = established.poll_transmit().unwrap().contents;

    // The input: datagrams of [selector][length][bytes]. The selector picks the source
    // (established peer, peer mid-handshake, stranger) and whether the bytes are sent as
    // they are or XORed into the real ClientHello or application record.
    let mut rest = data;
    while rest.len() >= 2 {
        let source = match rest[0] % 3 {
            0 => ESTABLISHED,
            1 => HANDSHAKING,
            _ => STRANGER,
        };
        let len = usize::from(rest[1]).min(rest.len() - 2);
        let bytes = &rest[2..2 + len];
        let datagram = match (rest[0] / 3) % 3 {
            0 => bytes.to_vec(),
            kind => {
                let mut base = if kind == 1 { hello.clone() } else { record.clone() };
                for (i, b) in bytes.iter().enumerate() {
                    let at = i % base.len();
                    base[at] ^= b;
                }
                if bytes.len() > base.len() {
                    base.truncate(bytes.len() % base.len());
                }
                base
            }
        };
        endpoint.handle(now, source, &datagram);
        rest = &rest[2 + len..];
    }
    while let Some(event) = endpoint.poll_event() {
        if let EndpointEvent::Connected { peer, .. } = event {
            assert_ne!(peer, STRANGER, "a session without a cookie exchange");
        }
    }
    while endpoint.poll_transmit().is_some() {}

    // The established session still carries data both ways.
    established.send(now, b"still here").unwrap();
    exchange(now, &mut endpoint, &mut established, ESTABLISHED, usize::MAX);
    let mut arrived = false;
    while let Some(event) = endpoint.poll_event() {
        if let EndpointEvent::Data { peer, data, .. } = event {
            arrived |= peer == ESTABLISHED && data == b"still here";
        }
    }
    assert!(arrived, "hostile input disturbed an established session");
    let _ = established.poll_event().map(|e| matches!(e, Event::Closed { .. }));
    endpoint.handle_timeout(now + Duration::from_secs(120));
    while endpoint.poll_transmit().is_some() {}
});
