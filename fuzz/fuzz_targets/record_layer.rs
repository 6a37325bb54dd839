//! Any datagrams into established sessions after the hand-off from OpenSSL: a server
//! endpoint holding a session with a Connection ID (an AEAD suite) and one without (a CBC
//! suite, Encrypt-then-MAC), and the client side of each. Datagrams arrive from the sessions' own addresses and from a stranger's. Never
//! panics, surfaces nothing, moves no session, closes none, and both sessions still carry
//! data afterwards.
//!
//! Input: a sequence of `[target, len_hi, len_lo, bytes…]` chunks.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tether_proto::dtls::{
    CipherSuite, ClientConfig, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, Event, PskKey, ServerConfig, Session,
    SessionConfig, SessionHandle, SessionSnapshot, StaticPskStore,
};

const CID_PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)), 5000);
const PLAIN_PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3)), 5000);
const STRANGER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 4)), 5000);

/// Contexts and the snapshots of two real handshakes (made once).
struct Fixture {
    server: Arc<DtlsContext>,
    cid_client: Arc<DtlsContext>,
    plain_client: Arc<DtlsContext>,
    /// (server side, client side) of the CID session and of the plain one.
    cid: (SessionSnapshot, SessionSnapshot),
    plain: (SessionSnapshot, SessionSnapshot),
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = PskKey::from_hex("73656372657450534b").unwrap();
        let session = SessionConfig::default().handshake_timeout(Duration::from_secs(10));
        let store = StaticPskStore::new().with("identity", key.clone());
        let server =
            DtlsContext::server(ServerConfig::psk(store).session(session.clone().cipher_suites(&CipherSuite::ALL)))
                .unwrap();
        let cbc = session.clone().cipher_suites(&[CipherSuite::PskAes128CbcSha256]);
        let plain_client = DtlsContext::client(ClientConfig::psk("identity", key.clone()).session(cbc)).unwrap();
        let cid_client =
            DtlsContext::client(ClientConfig::psk("identity", key).session(session).connection_id(vec![0xc1, 0xc2]))
                .unwrap();
        let now = Instant::now();
        let mut endpoint = Endpoint::new(server.clone(), EndpointConfig::new([3; 32]), now).unwrap();
        let mut handshake = |client_context: &Arc<DtlsContext>, at: SocketAddr| {
            let mut client = Session::client(client_context, now).unwrap();
            let mut handle = None;
            for _ in 0..50 {
                while let Some(t) = client.poll_transmit() {
                    endpoint.handle(now, at, &t.contents);
                }
                while let Some(t) = endpoint.poll_transmit() {
                    client.handle_datagram(now, &t.contents);
                }
                while let Some(event) = endpoint.poll_event() {
                    if let EndpointEvent::Connected { handle: h, .. } = event {
                        handle = Some(h);
                    }
                }
            }
            let handle = handle.expect("handshake");
            (endpoint.snapshot(handle).unwrap(), client.snapshot().unwrap())
        };
        let cid = handshake(&cid_client, CID_PEER);
        let plain = handshake(&plain_client, PLAIN_PEER);
        Fixture { server, cid_client, plain_client, cid, plain }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let now = Instant::now();
    let mut endpoint = Endpoint::new(f.server.clone(), EndpointConfig::new([3; 32]), now).unwrap();
    let (cid_handle, plain_handle) = (SessionHandle(1), SessionHandle(2));
    endpoint.restore(now, cid_handle, CID_PEER, &f.cid.0).unwrap();
    endpoint.restore(now, plain_handle, PLAIN_PEER, &f.plain.0).unwrap();
    let mut cid_client = Session::restore(&f.cid_client, now, &f.cid.1).unwrap();
    let mut plain_client = Session::restore(&f.plain_client, now, &f.plain.1).unwrap();
    for client in [&mut cid_client, &mut plain_client] {
        client.extend_write_limit(u64::MAX);
    }

    let mut rest = data;
    while rest.len() >= 3 {
        let target = rest[0];
        let len = (usize::from(rest[1]) << 8 | usize::from(rest[2])).min(rest.len() - 3);
        let datagram = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match target % 5 {
            0 => endpoint.handle(now, CID_PEER, datagram),
            1 => endpoint.handle(now, PLAIN_PEER, datagram),
            2 => endpoint.handle(now, STRANGER, datagram),
            3 => cid_client.handle_datagram(now, datagram),
            _ => plain_client.handle_datagram(now, datagram),
        }
    }
    assert_eq!(endpoint.poll_event(), None, "hostile input surfaced an event");
    assert_eq!(endpoint.stats().migrations, 0, "a forged record moved a session");
    assert_eq!(endpoint.peer_of(cid_handle), Some(CID_PEER));
    for client in [&mut cid_client, &mut plain_client] {
        assert!(client.is_established(), "{:?}", client.close_reason());
        assert_eq!(client.poll_event(), None);
    }

    // Both sessions still carry data both ways.
    for (client, handle, at) in [(&mut cid_client, cid_handle, CID_PEER), (&mut plain_client, plain_handle, PLAIN_PEER)] {
        while endpoint.poll_transmit().is_some() {}
        while client.poll_transmit().is_some() {}
        client.send(now, b"ping").unwrap();
        endpoint.handle(now, at, &client.poll_transmit().unwrap().contents);
        assert!(matches!(endpoint.poll_event(), Some(EndpointEvent::Data { data, .. }) if data == b"ping"));
        endpoint.send(now, handle, b"pong").unwrap();
        client.handle_datagram(now, &endpoint.poll_transmit().unwrap().contents);
        assert_eq!(client.poll_event(), Some(Event::Data(b"pong".to_vec())));
    }
});
