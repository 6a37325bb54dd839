//! The many-peer endpoint: cookies, routing, re-handshake, hostile input, limits.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant and drive real sockets")]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::endpoint::{addr, connected_handle, exchange};
use support::*;
use tether_proto::dtls::{
    record, CloseReason, DropReason, Endpoint, EndpointConfig, EndpointEvent, Event, PeerIdentity, Session,
};

fn endpoint(now: Instant) -> Endpoint {
    Endpoint::new(psk_server(fast_session()), EndpointConfig::new([7; 32]), now).unwrap()
}

fn connect(now: Instant, ep: &mut Endpoint, at: SocketAddr) -> (Session, Vec<EndpointEvent>) {
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let (events, client_events) = exchange(now, ep, &mut client, at);
    assert!(client.is_established(), "{client_events:?} {events:?}");
    (client, events)
}

#[test]
fn a_client_connects_through_the_cookie_exchange_and_talks() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(1);
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    // First ClientHello: answered statelessly.
    ep.handle(now, at, &client.poll_transmit().unwrap().contents);
    assert_eq!(ep.session_count(), 0);
    assert_eq!(ep.stats().hello_verify_requests_sent, 1);
    let hvr = ep.poll_transmit().unwrap();
    assert_eq!(record::handshake_messages(&hvr.contents), vec![Some(3)]);
    client.handle_datagram(now, &hvr.contents);
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    let handle = connected_handle(&events);
    assert!(events.iter().any(|e| matches!(e, EndpointEvent::Connected { identity: Some(PeerIdentity::Psk(id)), .. } if id == IDENTITY.as_bytes())));
    assert_eq!(ep.established(at), Some(handle));
    client.send(now, b"hello").unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    assert_eq!(events, vec![EndpointEvent::Data { handle, peer: at, data: b"hello".to_vec() }]);
    ep.send(now, handle, b"world").unwrap();
    let (_, client_events) = exchange(now, &mut ep, &mut client, at);
    assert_eq!(client_events, vec![Event::Data(b"world".to_vec())]);
    assert_eq!(ep.stats().handshakes_completed, 1);
}

#[test]
fn a_rebooted_device_on_the_same_address_replaces_its_session() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(2);
    let (mut old_client, events) = connect(now, &mut ep, at);
    let old = connected_handle(&events);

    // A forged ClientHello for that address with a bad cookie: only a HelloVerifyRequest.
    let mut forger = Session::client(&psk_client(fast_session()), now).unwrap();
    let hello = forger.poll_transmit().unwrap().contents;
    let forged = with_cookie(&hello, &[0xAA; 32]);
    ep.handle(now, at, &forged);
    assert_eq!(ep.stats().cookies_rejected, 1);
    assert_eq!(ep.session_count(), 1);
    assert!(ep.poll_event().is_none());
    while ep.poll_transmit().is_some() {}
    old_client.send(now, b"still here").unwrap();
    let (events, _) = exchange(now, &mut ep, &mut old_client, at);
    assert_eq!(events, vec![EndpointEvent::Data { handle: old, peer: at, data: b"still here".to_vec() }]);

    // The device reboots: a new client from the same address and port.
    let (mut new_client, events) = connect(now, &mut ep, at);
    let new = connected_handle(&events);
    assert_ne!(new, old);
    assert!(events.contains(&EndpointEvent::Connected {
        handle: new,
        peer: at,
        identity: Some(PeerIdentity::Psk(IDENTITY.into())),
        resumed: false,
        replaced: Some(old),
    }));
    assert!(events.contains(&EndpointEvent::Closed {
        handle: old,
        peer: at,
        was_established: true,
        reason: CloseReason::Replaced
    }));
    assert_eq!(ep.session_count(), 1);
    assert_eq!(ep.established(at), Some(new));
    assert_eq!(ep.stats().sessions_replaced, 1);
    new_client.send(now, b"after reboot").unwrap();
    let (events, _) = exchange(now, &mut ep, &mut new_client, at);
    assert_eq!(events, vec![EndpointEvent::Data { handle: new, peer: at, data: b"after reboot".to_vec() }]);
}

#[test]
fn the_old_session_keeps_working_until_the_new_handshake_completes() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(3);
    let (mut old_client, events) = connect(now, &mut ep, at);
    let old = connected_handle(&events);
    // A new handshake gets as far as the cookie and its first server flight, then stalls.
    let mut new_client = Session::client(&psk_client(fast_session()), now).unwrap();
    ep.handle(now, at, &new_client.poll_transmit().unwrap().contents);
    new_client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
    ep.handle(now, at, &new_client.poll_transmit().unwrap().contents);
    assert_eq!(ep.handshakes_in_progress(), 1);
    while ep.poll_transmit().is_some() {}
    old_client.send(now, b"old traffic").unwrap();
    let (events, _) = exchange(now, &mut ep, &mut old_client, at);
    assert_eq!(events, vec![EndpointEvent::Data { handle: old, peer: at, data: b"old traffic".to_vec() }]);
    // The stalled handshake hits its deadline: the old session is untouched.
    ep.handle_timeout(now + Duration::from_secs(11));
    let events: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert!(
        matches!(
            &events[..],
            [EndpointEvent::Closed { was_established: false, reason: CloseReason::HandshakeTimeout, .. }]
        ),
        "{events:?}"
    );
    assert_eq!(ep.established(at), Some(old));
    assert_eq!(ep.handshakes_in_progress(), 0);
}

/// Rewrites a first ClientHello to carry `cookie`.
fn with_cookie(hello: &[u8], cookie: &[u8]) -> Vec<u8> {
    // record(13) + handshake header(12) + version(2) + random(32) + session id.
    let sid_len = hello[13 + 12 + 34] as usize;
    let cookie_at = 13 + 12 + 34 + 1 + sid_len;
    assert_eq!(hello[cookie_at], 0, "a first ClientHello has no cookie");
    let mut out = hello[..cookie_at].to_vec();
    out.push(cookie.len() as u8);
    out.extend_from_slice(cookie);
    out.extend_from_slice(&hello[cookie_at + 1..]);
    let grow = cookie.len();
    let rec_len = u16::from_be_bytes([out[11], out[12]]) as usize + grow;
    out[11..13].copy_from_slice(&(rec_len as u16).to_be_bytes());
    for at in [14, 22] {
        let len = u32::from_be_bytes([0, out[at], out[at + 1], out[at + 2]]) as usize + grow;
        out[at..at + 3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    }
    out
}

#[test]
fn hostile_datagrams_never_close_a_legitimate_session() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(4);
    let (mut client, events) = connect(now, &mut ep, at);
    let handle = connected_handle(&events);
    client.send(now, b"record to replay").unwrap();
    let genuine = client.poll_transmit().unwrap().contents;
    ep.handle(now, at, &genuine);
    assert_eq!(ep.poll_event(), Some(EndpointEvent::Data { handle, peer: at, data: b"record to replay".to_vec() }));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut hostile: Vec<Vec<u8>> = Vec::new();
    for _ in 0..2_000 {
        let len = rng.gen_range(0..200);
        hostile.push((0..len).map(|_| rng.gen()).collect());
    }
    for cut in 0..genuine.len() {
        hostile.push(genuine[..cut].to_vec()); // truncated
    }
    for i in 13..genuine.len() {
        let mut bad_mac = genuine.clone();
        bad_mac[i] ^= 0x40;
        hostile.push(bad_mac); // bad MAC (any ciphertext or tag bit)
    }
    for _ in 0..10 {
        hostile.push(genuine.clone()); // replays
    }
    for epoch_byte in [0u8, 2, 255] {
        let mut wrong_epoch = genuine.clone();
        wrong_epoch[4] = epoch_byte;
        hostile.push(wrong_epoch);
    }
    hostile.push(record::fatal_alert(40, 1)); // spoofed plaintext fatal alert
    for datagram in &hostile {
        ep.handle(now, at, datagram);
    }
    let events: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert!(events.is_empty(), "hostile input produced {events:?}");
    assert!(ep.session(handle).unwrap().is_established());
    client.send(now, b"still fine").unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    assert_eq!(events, vec![EndpointEvent::Data { handle, peer: at, data: b"still fine".to_vec() }]);
    // The same garbage from unknown addresses creates nothing.
    for (i, datagram) in hostile.iter().enumerate() {
        ep.handle(now, addr(100 + i as u32), datagram);
    }
    assert_eq!(ep.session_count(), 1);
    assert!(ep.stats().dropped(DropReason::Malformed) > 0);
    assert!(ep.stats().dropped(DropReason::UnknownPeer) > 0);
}

#[test]
fn hostile_datagrams_mid_handshake_do_not_break_it() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(5);
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for _ in 0..20 {
        let mut moved = false;
        while let Some(t) = client.poll_transmit() {
            ep.handle(now, at, &t.contents);
            let len = rng.gen_range(13..120);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            junk[..3].copy_from_slice(&[22, 0xfe, 0xfd]); // looks like DTLS handshake
            let body = (len - 13) as u16;
            junk[11..13].copy_from_slice(&body.to_be_bytes());
            ep.handle(now, at, &junk);
            moved = true;
        }
        while let Some(t) = ep.poll_transmit() {
            client.handle_datagram(now, &t.contents);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(client.is_established());
}

/// A client that completed the cookie exchange and sent its verified ClientHello from `at`,
/// then went silent: a handshake in progress, stalled.
fn stalled_at(now: Instant, ep: &mut Endpoint, at: SocketAddr) -> Session {
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    ep.handle(now, at, &client.poll_transmit().unwrap().contents);
    client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
    ep.handle(now, at, &client.poll_transmit().unwrap().contents);
    while ep.poll_transmit().is_some() {}
    client
}

/// An address in the network 10.`net`.0.0/24.
fn host(net: u8, i: u8) -> SocketAddr {
    SocketAddr::from(([10, net, 0, i], 5000))
}

#[test]
fn handshake_and_session_limits_hold() {
    let now = Instant::now();
    let config = EndpointConfig::new([7; 32]).max_handshakes(2).max_sessions(3);
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    // Two handshakes fill the table. Their clients keep talking (not stalled), so a third
    // finds no slot it may take.
    for i in 0..2 {
        let at = host(i, 1);
        let _client = stalled_at(now, &mut ep, at);
        ep.handle(now, at, &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]); // the client is heard from
    }
    let _third = stalled_at(now, &mut ep, host(2, 1));
    assert_eq!(ep.handshakes_in_progress(), 2);
    assert_eq!(ep.stats().dropped(DropReason::HandshakeLimit), 1);
    // Fill up to the session limit with sessions applications use: the fourth is refused.
    let mut ep = Endpoint::new(psk_server(fast_session()), EndpointConfig::new([7; 32]).max_sessions(3), now).unwrap();
    let mut handles = Vec::new();
    for i in 0..3 {
        let (_, events) = connect(now, &mut ep, addr(20 + i));
        handles.push(connected_handle(&events));
        ep.bind(*handles.last().unwrap());
    }
    let mut late = Session::client(&psk_client(fast_session()), now).unwrap();
    exchange(now, &mut ep, &mut late, addr(30));
    assert!(!late.is_established());
    assert_eq!(ep.session_count(), 3);
    assert_eq!(ep.stats().dropped(DropReason::SessionLimit), 1);
    // A device that reboots still gets back in at the limit: its session is replaced.
    connect(now, &mut ep, addr(20));
    assert_eq!(ep.session_count(), 3);
}

#[test]
fn at_the_session_limit_a_session_nobody_uses_makes_room() {
    let now = Instant::now();
    let mut ep = Endpoint::new(psk_server(fast_session()), EndpointConfig::new([8; 32]).max_sessions(3), now).unwrap();
    let mut handles = Vec::new();
    for i in 0..3 {
        let (_, events) = connect(now, &mut ep, host(1, i + 1));
        handles.push(connected_handle(&events));
    }
    // The first and third carry a registration; the second never registered.
    ep.bind(handles[0]);
    ep.bind(handles[2]);
    let (newcomer, events) = connect(now, &mut ep, host(2, 1));
    assert!(newcomer.is_established());
    let closed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            EndpointEvent::Closed { handle, reason, .. } => Some((*handle, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(closed, [(handles[1], CloseReason::Evicted)]);
    assert_eq!((ep.session_count(), ep.stats().sessions_evicted), (3, 1));
}

#[test]
fn one_source_holds_only_its_share_of_handshakes() {
    let now = Instant::now();
    let config = EndpointConfig::new([9; 32]).handshakes_per_source(4, 6);
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    // One address: four handshakes, then no more.
    let _held: Vec<_> =
        (0..10).map(|i| stalled_at(now, &mut ep, SocketAddr::from(([10, 1, 0, 1], 6000 + i)))).collect();
    assert_eq!(ep.handshakes_in_progress(), 4);
    assert_eq!(ep.stats().dropped(DropReason::SourceLimit), 6);
    // Its network: six in all.
    let _more: Vec<_> = (2..6).map(|i| stalled_at(now, &mut ep, host(1, i))).collect();
    assert_eq!(ep.handshakes_in_progress(), 6);
    // Another network is not held back, and completes its handshake.
    let (other, _) = connect(now, &mut ep, host(2, 1));
    assert!(other.is_established());
    // A source that holds an established session is not limited: a device that reboots
    // behind the busy network gets its handshake.
    let mut ep =
        Endpoint::new(psk_server(fast_session()), EndpointConfig::new([9; 32]).handshakes_per_source(1, 1), now)
            .unwrap();
    let device = host(3, 1);
    connect(now, &mut ep, device);
    let _flood: Vec<_> =
        (0..3).map(|i| stalled_at(now, &mut ep, SocketAddr::from(([10, 3, 0, 1], 7000 + i)))).collect();
    assert_eq!(ep.stats().dropped(DropReason::SourceLimit), 0, "a known address");
    let (rebooted, _) = connect(now, &mut ep, device);
    assert!(rebooted.is_established());
}

#[test]
fn stalled_handshakes_end_early_and_yield_when_the_table_is_full() {
    let now = Instant::now();
    let config = EndpointConfig::new([10; 32])
        .max_handshakes(10)
        .reserved_handshakes(3)
        .handshakes_per_source(100, 100)
        .stalled_handshake_timeout(Duration::from_secs(5));
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    // Unknown sources fill the seven slots not kept back.
    let _silent: Vec<_> = (1..=7).map(|i| stalled_at(now, &mut ep, host(1, i))).collect();
    assert_eq!(ep.handshakes_in_progress(), 7);
    // Another one: the oldest silent handshake yields.
    let (fresh, _) = connect(now + Duration::from_secs(1), &mut ep, host(2, 1));
    assert!(fresh.is_established());
    assert_eq!(ep.stats().stalled_handshakes_closed, 1);
    assert_eq!(ep.stats().dropped(DropReason::HandshakeLimit), 0);
    // Silent ones end at their short deadline, not the session's 30 s.
    assert!(ep.poll_timeout().unwrap() <= now + Duration::from_secs(5));
    ep.handle_timeout(now + Duration::from_secs(5));
    assert_eq!(ep.handshakes_in_progress(), 0);
    assert_eq!(ep.stats().stalled_handshakes_closed, 7);
    assert!(ep.poll_event().is_some(), "each is reported closed");
}

#[test]
fn slots_are_kept_for_sources_that_held_a_session() {
    let now = Instant::now();
    let config = EndpointConfig::new([11; 32]).max_handshakes(4).reserved_handshakes(2).handshakes_per_source(100, 100);
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    let device = host(9, 9);
    let (mut old, events) = connect(now, &mut ep, device);
    let handle = connected_handle(&events);
    // The device's session ends; a flood of silent ClientHellos whose clients keep talking
    // (so none of them yields) takes every slot unknown sources may use.
    old.close(now);
    exchange(now, &mut ep, &mut old, device);
    assert!(ep.session(handle).is_none());
    for i in 1..=4 {
        let _ = stalled_at(now, &mut ep, host(1, i));
        ep.handle(now, host(1, i), &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
    assert_eq!(ep.handshakes_in_progress(), 2);
    assert_eq!(ep.stats().dropped(DropReason::HandshakeLimit), 2);
    // The device that held a session within the hour comes back into a kept slot.
    let (back, _) = connect(now, &mut ep, device);
    assert!(back.is_established());
}

#[test]
fn one_identity_holds_at_most_its_share_of_sessions() {
    let now = Instant::now();
    let config = EndpointConfig::new([12; 32]).max_sessions_per_identity(2);
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    let mut handles = Vec::new();
    let mut all_events = Vec::new();
    for i in 1..=4 {
        let (_, events) = connect(now, &mut ep, host(1, i));
        handles.push(connected_handle(&events));
        all_events.extend(events);
    }
    assert_eq!(ep.session_count(), 2, "the identity's two newest");
    assert!(ep.session(handles[2]).is_some() && ep.session(handles[3]).is_some());
    let superseded = all_events
        .iter()
        .filter(|e| matches!(e, EndpointEvent::Closed { reason: CloseReason::Superseded, .. }))
        .count();
    assert_eq!(superseded, 2);
    assert_eq!(ep.stats().sessions_evicted, 2);
}

#[test]
fn resumption_through_the_endpoint() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let cctx = psk_client(fast_session());
    let mut client = Session::client(&cctx, now).unwrap();
    exchange(now, &mut ep, &mut client, addr(40));
    let saved = client.saved_session(&cctx).unwrap();
    let mut again = Session::client_resuming(&cctx, now, &saved).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut again, addr(41));
    assert!(again.is_resumed());
    assert!(events.iter().any(|e| matches!(e, EndpointEvent::Connected { resumed: true, .. })));
}

#[test]
fn close_all_sends_close_notify_and_reports_each_session_once() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let mut clients: Vec<_> = (0..3).map(|i| (addr(50 + i), connect(now, &mut ep, addr(50 + i)).0)).collect();
    ep.close_all(now);
    let closed: Vec<_> = std::iter::from_fn(|| ep.poll_event())
        .filter(|e| matches!(e, EndpointEvent::Closed { reason: CloseReason::Local, .. }))
        .collect();
    assert_eq!(closed.len(), 3);
    assert_eq!(ep.session_count(), 0);
    while let Some(t) = ep.poll_transmit() {
        let (_, client) = clients.iter_mut().find(|(a, _)| *a == t.destination).unwrap();
        client.handle_datagram(now, &t.contents);
    }
    for (_, client) in &clients {
        assert_eq!(client.close_reason(), Some(&CloseReason::PeerClosed));
    }
}

/// Runs a handshake in which the network delivers `stale` (an earlier ClientHello of the
/// same client) once more, after the server's flight has gone out.
fn handshake_with_stale_hello(pick_stale: usize) -> (Session, Endpoint, Vec<EndpointEvent>) {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(60);
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let mut hellos = Vec::new();
    let first = client.poll_transmit().unwrap().contents;
    hellos.push(first.clone());
    ep.handle(now, at, &first);
    client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
    let second = client.poll_transmit().unwrap().contents;
    hellos.push(second.clone());
    ep.handle(now, at, &second);
    let flight: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    // The reordered copy arrives now; whatever the endpoint answers reaches the client first.
    ep.handle(now, at, &hellos[pick_stale]);
    while let Some(t) = ep.poll_transmit() {
        client.handle_datagram(now, &t.contents);
    }
    for t in flight {
        client.handle_datagram(now, &t.contents);
    }
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    (client, ep, events)
}

#[test]
fn a_reordered_first_client_hello_does_not_restart_the_handshake() {
    let (client, ep, events) = handshake_with_stale_hello(0);
    assert!(client.is_established(), "{:?} {events:?}", client.close_reason());
    assert_eq!(ep.stats().sessions_created, 1);
    assert_eq!(ep.stats().dropped(DropReason::StaleClientHello), 1);
}

#[test]
fn a_duplicated_cookie_client_hello_after_completion_creates_no_second_session() {
    let now = Instant::now();
    let mut ep = endpoint(now);
    let at = addr(61);
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let first = client.poll_transmit().unwrap().contents;
    ep.handle(now, at, &first);
    client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
    let with_cookie = client.poll_transmit().unwrap().contents;
    ep.handle(now, at, &with_cookie);
    let (_events, _) = exchange(now, &mut ep, &mut client, at);
    assert!(client.is_established());
    // A late duplicate of the cookie-bearing ClientHello.
    ep.handle(now, at, &with_cookie);
    assert_eq!(ep.stats().dropped(DropReason::StaleClientHello), 1);
    assert_eq!(ep.stats().sessions_created, 1);
    assert_eq!(ep.handshakes_in_progress(), 0);
    assert!(ep.poll_transmit().is_none());
    // The same copy while the handshake is still running is a retransmission: harmless.
    let (client, ep, events) = handshake_with_stale_hello(1);
    assert!(client.is_established(), "{events:?}");
    assert_eq!(ep.stats().sessions_created, 1);
}

/// RFC 6347 §4.1: a client may put any {254, x} record version on its initial ClientHello
/// (Mbed TLS 2.x with a low minimum version sends {254, 0}); the handshake's own version
/// decides. Both ClientHellos, the cookieless and the cookie one, carry it here.
#[test]
fn a_client_hello_with_any_254_x_record_version_is_answered_and_completes() {
    for minor in [0x00, 0x01, 0xfd, 0xfe, 0xff] {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let at = addr(40);
        let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
        let mut hello = client.poll_transmit().unwrap().contents;
        hello[1..3].copy_from_slice(&[0xfe, minor]);
        ep.handle(now, at, &hello);
        let hvr = ep.poll_transmit().expect("a HelloVerifyRequest");
        client.handle_datagram(now, &hvr.contents);
        let mut hello = client.poll_transmit().unwrap().contents;
        hello[1..3].copy_from_slice(&[0xfe, minor]);
        ep.handle(now, at, &hello);
        let (events, _) = exchange(now, &mut ep, &mut client, at);
        assert!(client.is_established(), "{{254, {minor}}}: {events:?}");
        connected_handle(&events);
    }
    // Only the initial ClientHello: another version on any other record is still not DTLS.
    let server_hello = [22, 0xfe, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2];
    assert!(record::parse_records(&server_hello).is_none(), "a {{254, 0}} record that is not a ClientHello");
    let mut client_hello = server_hello;
    client_hello[13] = 1;
    assert!(record::parse_records(&client_hello).is_some());
    client_hello[3] = 1; // epoch 1
    assert!(record::parse_records(&client_hello).is_none(), "a {{254, 0}} ClientHello outside epoch 0");
    client_hello[3] = 0;
    client_hello[1] = 0x03; // TLS
    assert!(record::parse_records(&client_hello).is_none());
}
