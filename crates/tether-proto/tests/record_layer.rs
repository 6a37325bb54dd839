//! Established sessions after the hand-off from OpenSSL: Connection IDs (RFC 9146) and
//! address migration, snapshots and restore without a handshake, sequence reservations,
//! the last flight repeated for a peer that lost it, and every hostile-input case of the
//! session suite against CID sessions.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant and drive real sockets")]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::endpoint::{addr, connected_handle, exchange};
use support::*;
use tether_proto::dtls::{
    record, CipherSuite, ClientAuth, ClientConfig, CloseReason, DropReason, DtlsContext, Endpoint, EndpointConfig,
    EndpointEvent, Event, SendError, Session, SessionSnapshot,
};

fn cid_client(session: tether_proto::dtls::SessionConfig) -> std::sync::Arc<DtlsContext> {
    DtlsContext::client(ClientConfig::psk(IDENTITY, psk()).session(session).connection_id(Vec::new())).unwrap()
}

fn endpoint(now: Instant, config: EndpointConfig) -> Endpoint {
    Endpoint::new(psk_server(fast_session()), config, now).unwrap()
}

fn data_events(events: &[EndpointEvent]) -> Vec<(SocketAddr, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            EndpointEvent::Data { peer, data, .. } => Some((*peer, data.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_connection_id_is_negotiated_and_every_record_after_the_handshake_carries_it() {
    for suite in [CipherSuite::PskAes128Ccm8, CipherSuite::PskAes128GcmSha256] {
        let now = Instant::now();
        let mut ep = Endpoint::new(psk_server(only(suite)), EndpointConfig::new([1; 32]), now).unwrap();
        let mut client = Session::client(&cid_client(only(suite)), now).unwrap();
        let at = addr(1);
        // Watch every datagram the client sends.
        let mut from_client = Vec::new();
        let mut events = Vec::new();
        for _ in 0..20 {
            while let Some(t) = client.poll_transmit() {
                from_client.push(t.contents.clone());
                ep.handle(now, at, &t.contents);
            }
            while let Some(t) = ep.poll_transmit() {
                client.handle_datagram(now, &t.contents);
            }
            events.extend(std::iter::from_fn(|| ep.poll_event()));
        }
        assert!(client.is_established(), "{suite:?}: {events:?}");
        let handle = connected_handle(&events);
        let server_cid = client.peer_connection_id().expect("the server gave a CID").to_vec();
        assert_eq!(server_cid.len(), 6);
        assert_eq!(client.connection_id(), None, "the client asked for none");
        assert_eq!(ep.session(handle).unwrap().connection_id(), Some(&server_cid[..]));
        // The client's Finished already travelled as a tls12_cid record (RFC 9146 §3).
        let finished = from_client.last().unwrap();
        assert!(finished.windows(1).any(|b| b[0] == 25), "{finished:02x?}");
        client.send(now, b"over cid").unwrap();
        let record = client.poll_transmit().unwrap().contents;
        assert_eq!(record[0], 25, "tls12_cid content type");
        assert_eq!(&record[11..17], &server_cid[..], "the server's CID in the header");
        ep.handle(now, at, &record);
        let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert_eq!(data_events(&got), vec![(at, b"over cid".to_vec())]);
        // The server writes plain records: the client's CID is empty.
        while client.poll_event().is_some() {}
        ep.send(now, handle, b"back").unwrap();
        let reply = ep.poll_transmit().unwrap();
        assert_eq!(reply.contents[0], 23);
        client.handle_datagram(now, &reply.contents);
        assert_eq!(client.poll_event(), Some(Event::Data(b"back".to_vec())));
    }
}

#[test]
fn a_client_that_does_not_offer_a_connection_id_gets_plain_records() {
    let now = Instant::now();
    let mut ep = endpoint(now, EndpointConfig::new([2; 32]));
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, addr(2));
    let handle = connected_handle(&events);
    assert_eq!(ep.session(handle).unwrap().connection_id(), None);
    client.send(now, b"plain").unwrap();
    assert_eq!(client.poll_transmit().unwrap().contents[0], 23);
}

#[test]
fn a_session_follows_its_peer_to_a_new_address_only_on_an_authentic_newer_record() {
    let now = Instant::now();
    let mut ep = endpoint(now, EndpointConfig::new([3; 32]));
    let mut client = Session::client(&cid_client(fast_session()), now).unwrap();
    let home = addr(3);
    let (events, _) = exchange(now, &mut ep, &mut client, home);
    let handle = connected_handle(&events);

    // A NAT rebinding: the same session, a new source port, every request.
    let mut at = home;
    for i in 0..20u16 {
        let next = SocketAddr::new(at.ip(), 20_000 + i);
        client.send(now, format!("request {i}").as_bytes()).unwrap();
        let record = client.poll_transmit().unwrap().contents;
        ep.handle(now, next, &record);
        let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert!(
            got.iter().any(|e| matches!(e, EndpointEvent::Migrated { from, to, .. } if *from == at && *to == next)),
            "{got:?}"
        );
        assert_eq!(data_events(&got), vec![(next, format!("request {i}").into_bytes())]);
        at = next;
        assert_eq!(ep.peer_of(handle), Some(at));
        assert_eq!(ep.established(at), Some(handle));
        ep.send(now, handle, b"answer").unwrap();
        let reply = ep.poll_transmit().unwrap();
        assert_eq!(reply.destination, at, "answers go to the new address");
        client.handle_datagram(now, &reply.contents);
        assert_eq!(client.poll_event(), Some(Event::Data(b"answer".to_vec())));
    }
    assert_eq!(ep.stats().migrations, 20);
    assert_eq!(ep.stats().handshakes_completed, 1);

    // An attacker who saw a record replays it from its own address: nothing moves.
    client.send(now, b"genuine").unwrap();
    let genuine = client.poll_transmit().unwrap().contents;
    ep.handle(now, at, &genuine);
    while ep.poll_event().is_some() {}
    let attacker = SocketAddr::from(([127, 9, 9, 9], 4444));
    ep.handle(now, attacker, &genuine);
    // ...or forges one with the known CID and a higher sequence number.
    let mut forged = genuine.clone();
    forged[10] = forged[10].wrapping_add(7);
    ep.handle(now, attacker, &forged);
    // ...or sends garbage behind the CID.
    let mut garbage = genuine.clone();
    let last = garbage.len() - 1;
    garbage[last] ^= 0xff;
    ep.handle(now, attacker, &garbage);
    assert_eq!(ep.poll_event(), None, "nothing surfaced");
    assert_eq!(ep.peer_of(handle), Some(at), "the session stayed where its peer is");
    assert_eq!(ep.stats().migrations, 20);

    // A reordered older record from an old address authenticates but moves nothing back.
    client.send(now, b"older").unwrap();
    let older = client.poll_transmit().unwrap().contents;
    client.send(now, b"newer").unwrap();
    let newer = client.poll_transmit().unwrap().contents;
    ep.handle(now, at, &newer);
    ep.handle(now, home, &older);
    let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert!(!got.iter().any(|e| matches!(e, EndpointEvent::Migrated { .. })), "{got:?}");
    assert_eq!(ep.peer_of(handle), Some(at));
    // An unknown CID is dropped and counted.
    let mut unknown = newer.clone();
    unknown[11] ^= 0xff;
    ep.handle(now, at, &unknown);
    assert_eq!(ep.stats().dropped(DropReason::UnknownConnectionId), 1);
}

#[test]
fn a_snapshot_restores_the_session_in_a_new_endpoint_without_a_handshake() {
    let now = Instant::now();
    let config = EndpointConfig::new([4; 32]).sequence_reservation(100);
    let context = psk_server(fast_session());
    let mut ep = Endpoint::new(context.clone(), config.clone(), now).unwrap();
    let mut client = Session::client(&cid_client(fast_session()), now).unwrap();
    let at = addr(4);
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    let handle = connected_handle(&events);
    let first = ep.snapshot(handle).expect("an established session has a snapshot");
    let (next, limit) = ep.session(handle).unwrap().write_sequence().unwrap();
    assert_eq!(limit, next + 100, "a new session may use one reservation before its first checkpoint");

    // Use some sequence numbers, checkpoint, use more: then the process dies.
    let mut nonces = Vec::new();
    for i in 0..30 {
        ep.send(now, handle, format!("before {i}").as_bytes()).unwrap();
        let t = ep.poll_transmit().unwrap();
        nonces.push(explicit_nonce(&t.contents));
        client.handle_datagram(now, &t.contents);
    }
    let checkpoint = ep.checkpoint();
    let mut stored = SessionSnapshot::decode(&first.encode()).unwrap();
    assert_eq!(stored, first, "snapshots survive encoding");
    for c in &checkpoint {
        stored.advance(c.write_limit, c.replay_window);
    }
    ep.checkpoint_written(&checkpoint);
    for i in 0..10 {
        ep.send(now, handle, format!("after checkpoint {i}").as_bytes()).unwrap();
        let t = ep.poll_transmit().unwrap();
        nonces.push(explicit_nonce(&t.contents));
        client.handle_datagram(now, &t.contents);
    }
    while client.poll_event().is_some() {}
    drop(ep);

    // A new process: a new context, the stored snapshot, no handshake.
    let context = psk_server(fast_session());
    let mut ep = Endpoint::new(context, config, now).unwrap();
    ep.restore(now, handle, at, &stored).unwrap();
    assert_eq!(ep.send(now, handle, b"too early"), Err(SendError::SequenceReservation));
    let checkpoint = ep.checkpoint();
    assert_eq!(checkpoint.len(), 1);
    ep.checkpoint_written(&checkpoint);
    client.send(now, b"still you?").unwrap();
    ep.handle(now, at, &client.poll_transmit().unwrap().contents);
    let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert_eq!(data_events(&got), vec![(at, b"still you?".to_vec())]);
    for i in 0..20 {
        ep.send(now, handle, format!("restored {i}").as_bytes()).unwrap();
        let t = ep.poll_transmit().unwrap();
        nonces.push(explicit_nonce(&t.contents));
        client.handle_datagram(now, &t.contents);
        assert_eq!(client.poll_event(), Some(Event::Data(format!("restored {i}").into_bytes())));
    }
    let unique: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(unique.len(), nonces.len(), "no sequence number (AEAD nonce) used twice");
    assert_eq!(ep.stats().handshakes_completed, 0);
    assert_eq!(ep.stats().sessions_restored, 1);
    // The CID routes in the new process too.
    let moved = SocketAddr::from(([127, 0, 0, 44], 4444));
    client.send(now, b"from elsewhere").unwrap();
    ep.handle(now, moved, &client.poll_transmit().unwrap().contents);
    assert_eq!(ep.peer_of(handle), Some(moved));
}

#[test]
fn a_session_waits_for_its_reservation_instead_of_reusing_sequence_numbers() {
    let now = Instant::now();
    let mut ep = endpoint(now, EndpointConfig::new([5; 32]).sequence_reservation(4));
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, addr(5));
    let handle = connected_handle(&events);
    let mut sent = 0;
    while ep.send(now, handle, b"x").is_ok() {
        sent += 1;
    }
    assert_eq!(sent, 4, "exactly the reservation");
    assert!(ep.checkpoint_due());
    let checkpoint = ep.checkpoint();
    assert!(ep.send(now, handle, b"x").is_err(), "not before the checkpoint is stored");
    ep.checkpoint_written(&checkpoint);
    assert!(ep.send(now, handle, b"x").is_ok());
    assert!(ep.session(handle).unwrap().is_established());
}

#[test]
fn a_resumed_session_comes_from_the_cache_and_a_restored_server_can_resume_too() {
    let now = Instant::now();
    let cctx = psk_client(fast_session());
    let sctx = psk_server(fast_session());
    let mut ep = Endpoint::new(sctx.clone(), EndpointConfig::new([6; 32]), now).unwrap();
    let mut client = Session::client(&cctx, now).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, addr(6));
    let handle = connected_handle(&events);
    let saved = client.saved_session(&cctx).unwrap();
    let snapshot = ep.snapshot(handle).unwrap();
    assert_eq!(sctx.resumable_sessions(), 1);

    // A restarted server whose cache came back with the snapshot resumes the session.
    let sctx = psk_server(fast_session());
    assert_eq!(sctx.resumable_sessions(), 0);
    let mut ep = Endpoint::new(sctx.clone(), EndpointConfig::new([6; 32]), now).unwrap();
    ep.restore(now, handle, addr(6), &snapshot).unwrap();
    assert_eq!(sctx.resumable_sessions(), 1);
    let mut again = Session::client_resuming(&cctx, now, &saved).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut again, addr(7));
    assert!(again.is_resumed(), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, EndpointEvent::Connected { resumed: true, .. })));
}

#[test]
fn the_last_flight_is_repeated_when_the_peer_repeats_its_own() {
    let session = fast_session().retransmit(Duration::from_millis(50), Duration::from_millis(50));
    // Full handshake: the server sends the last flight (ChangeCipherSpec, Finished).
    let now = Instant::now();
    let (cctx, sctx) = (psk_client(session.clone()), psk_server(session.clone()));
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let mut last_from_server = Vec::new();
    for _ in 0..10 {
        while let Some(t) = client.poll_transmit() {
            server.handle_datagram(now, &t.contents);
        }
        last_from_server.clear();
        while let Some(t) = server.poll_transmit() {
            last_from_server.push(t.contents);
        }
        if server.is_established() {
            break;
        }
        for d in &last_from_server {
            client.handle_datagram(now, d);
        }
    }
    assert!(server.is_established() && client.is_handshaking());
    // The server's last flight is lost; the client's timer repeats its flight.
    let wait = client.retransmit_timer_remaining().unwrap();
    std::thread::sleep(wait + Duration::from_millis(20));
    client.handle_timeout(now + wait + Duration::from_millis(20));
    let repeated: Vec<_> = std::iter::from_fn(|| client.poll_transmit()).collect();
    assert!(!repeated.is_empty(), "the client repeats its flight");
    for t in &repeated {
        server.handle_datagram(now, &t.contents);
    }
    let again: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
    assert_eq!(again.iter().map(|t| t.contents.clone()).collect::<Vec<_>>(), last_from_server);
    assert_eq!(server.stats().retransmissions, 1);
    for t in &again {
        client.handle_datagram(now, &t.contents);
    }
    assert!(client.is_established());
    client.send(now, b"finally").unwrap();
    let (_, se) = pump(now, &mut client, &mut server);
    assert_eq!(data(&se), vec![b"finally".to_vec()]);

    // Abbreviated handshake: the client sends the last flight.
    let saved = client.saved_session(&cctx).unwrap();
    let mut client = Session::client_resuming(&cctx, now, &saved).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    for t in std::iter::from_fn(|| client.poll_transmit()) {
        server.handle_datagram(now, &t.contents);
    }
    for t in std::iter::from_fn(|| server.poll_transmit()) {
        client.handle_datagram(now, &t.contents);
    }
    assert!(client.is_established() && client.is_resumed());
    let lost: Vec<_> = std::iter::from_fn(|| client.poll_transmit()).collect();
    assert!(!lost.is_empty() && server.is_handshaking());
    let wait = server.retransmit_timer_remaining().unwrap();
    std::thread::sleep(wait + Duration::from_millis(20));
    server.handle_timeout(now + wait + Duration::from_millis(20));
    for t in std::iter::from_fn(|| server.poll_transmit()) {
        client.handle_datagram(now, &t.contents);
    }
    let again: Vec<_> = std::iter::from_fn(|| client.poll_transmit()).collect();
    assert_eq!(again, lost, "the client repeats exactly its last flight");
    for t in &again {
        server.handle_datagram(now, &t.contents);
    }
    assert!(server.is_established() && server.is_resumed());
}

#[test]
fn close_notify_ends_a_compact_session_which_stays_resumable() {
    let now = Instant::now();
    let (cctx, sctx) = (psk_client(fast_session()), psk_server(fast_session()));
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    pump(now, &mut client, &mut server);
    server.close(now);
    let (ce, _) = pump(now, &mut client, &mut server);
    assert!(ce.contains(&Event::Closed { reason: CloseReason::PeerClosed }), "{ce:?}");
    assert_eq!(server.close_reason(), Some(&CloseReason::Local));
    assert_eq!(sctx.resumable_sessions(), 1, "a clean close keeps the session resumable");
}

#[test]
fn hostile_datagrams_against_connection_id_sessions_change_nothing() {
    use rand::{Rng, SeedableRng};
    for suite in [CipherSuite::PskAes128Ccm8, CipherSuite::PskAes128GcmSha256] {
        let now = Instant::now();
        let mut ep = Endpoint::new(psk_server(only(suite)), EndpointConfig::new([8; 32]), now).unwrap();
        let cctx =
            DtlsContext::client(ClientConfig::psk(IDENTITY, psk()).session(only(suite)).connection_id(vec![7, 7]))
                .unwrap();
        let mut client = Session::client(&cctx, now).unwrap();
        let at = addr(8);
        let (events, _) = exchange(now, &mut ep, &mut client, at);
        let handle = connected_handle(&events);
        client.send(now, b"genuine").unwrap();
        let genuine = client.poll_transmit().unwrap().contents;
        ep.handle(now, at, &genuine);
        while ep.poll_event().is_some() {}
        ep.send(now, handle, b"to client").unwrap();
        let to_client = ep.poll_transmit().unwrap().contents;
        assert_eq!(to_client[0], 25, "the client asked for a CID: the server writes CID records");
        client.handle_datagram(now, &to_client);
        assert_eq!(client.poll_event(), Some(Event::Data(b"to client".to_vec())));

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let mut hostile: Vec<Vec<u8>> = (0..20_000)
            .map(|_| {
                let len = rng.gen_range(0..200);
                let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if len >= 19 && rng.gen_bool(0.6) {
                    // A CID record header with the session's real CID and random contents.
                    d[..19].copy_from_slice(&genuine[..19]);
                    d[5..11].copy_from_slice(&rng.gen::<[u8; 6]>());
                    if rng.gen_bool(0.5) {
                        d[17..19].copy_from_slice(&((len - 19) as u16).to_be_bytes());
                    }
                }
                d
            })
            .collect();
        hostile.extend((0..genuine.len()).map(|cut| genuine[..cut].to_vec()));
        hostile.extend((0..genuine.len()).map(|i| {
            let mut d = genuine.clone();
            d[i] ^= 0x01;
            d
        }));
        hostile.extend((0..to_client.len()).map(|i| {
            let mut d = to_client.clone();
            d[i] ^= 0x40;
            d
        }));
        hostile.extend(std::iter::repeat_n(genuine.clone(), 5));
        let stranger = SocketAddr::from(([127, 0, 0, 99], 9999));
        for (i, d) in hostile.iter().enumerate() {
            ep.handle(now, if i % 2 == 0 { at } else { stranger }, d);
            client.handle_datagram(now, d);
            assert!(client.is_established(), "{suite:?} datagram {i}: {:?}", client.close_reason());
        }
        let events: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert!(events.is_empty(), "{suite:?}: hostile input surfaced {events:?}");
        assert_eq!(client.poll_event(), None);
        assert_eq!(ep.peer_of(handle), Some(at));
        assert!(ep.session(handle).unwrap().is_established());
        ep.send(now, handle, b"still here").unwrap();
        client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
        assert_eq!(client.poll_event(), Some(Event::Data(b"still here".to_vec())));
    }
}

#[test]
fn certificate_sessions_hand_off_and_restore_too() {
    let pki = pki();
    let now = Instant::now();
    let suite = CipherSuite::EcdheEcdsaAes128Ccm8;
    let sctx = x509_server(&pki, ClientAuth::Required(vec![pki.ca.certificate.clone()]), only(suite));
    let mut ep = Endpoint::new(sctx, EndpointConfig::new([9; 32]), now).unwrap();
    let mut client = Session::client(&x509_client(&pki, true, only(suite)), now).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, addr(9));
    let handle = connected_handle(&events);
    let snapshot = SessionSnapshot::decode(&ep.snapshot(handle).unwrap().encode()).unwrap();
    assert!(
        matches!(snapshot.identity(), Some(tether_proto::dtls::PeerIdentity::Certificate { common_name }) if common_name == "device-1")
    );
    let sctx = x509_server(&pki, ClientAuth::Required(vec![pki.ca.certificate.clone()]), only(suite));
    let mut ep = Endpoint::new(sctx, EndpointConfig::new([9; 32]), now).unwrap();
    ep.restore(now, handle, addr(9), &snapshot).unwrap();
    assert_eq!(ep.session(handle).unwrap().peer_identity(), snapshot.identity());
    client.send(now, b"cert").unwrap();
    ep.handle(now, addr(9), &client.poll_transmit().unwrap().contents);
    let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert_eq!(data_events(&got), vec![(addr(9), b"cert".to_vec())]);
}

/// The explicit nonce of the first record of a datagram (epoch and sequence number in
/// tether's records), plain or CID.
fn explicit_nonce(datagram: &[u8]) -> u64 {
    let records = record::parse_records_with_cid(datagram, Some(0)).unwrap();
    u64::from_be_bytes(records[0].fragment[..8].try_into().unwrap())
}

#[test]
fn bad_connection_id_and_reservation_settings_are_named() {
    let now = Instant::now();
    let err =
        Endpoint::new(psk_server(fast_session()), EndpointConfig::new([1; 32]).connection_id_len(9), now).unwrap_err();
    assert!(err.to_string().contains("connection ids are 1 to 8 bytes"), "{err}");
    let err = Endpoint::new(psk_server(fast_session()), EndpointConfig::new([1; 32]).sequence_reservation(1), now)
        .unwrap_err();
    assert!(err.to_string().contains("sequence_reservation"), "{err}");
    let long = vec![1u8; 256];
    let err = DtlsContext::client(ClientConfig::psk(IDENTITY, psk()).connection_id(long)).unwrap_err();
    assert!(err.to_string().contains("connection id"), "{err}");
}

/// The CBC suites (off by default, Encrypt-then-MAC only) hand off, carry data both ways,
/// take no Connection ID, and restore from a snapshot with their MAC keys.
#[test]
fn cbc_suites_hand_off_without_a_connection_id_and_restore() {
    let now = Instant::now();
    for suite in [CipherSuite::PskAes128CbcSha256, CipherSuite::EcdhePskAes128CbcSha256] {
        let config = EndpointConfig::new([5; 32]);
        let mut ep = Endpoint::new(psk_server(only(suite)), config.clone(), now).unwrap();
        // The client offers a CID: a server that chose a CBC suite does not take it.
        let mut client = Session::client(&cid_client(only(suite)), now).unwrap();
        let at = addr(5);
        let (events, _) = exchange(now, &mut ep, &mut client, at);
        let handle = connected_handle(&events);
        assert_eq!(client.cipher_suite(), Some(suite));
        assert_eq!(client.peer_connection_id(), None, "{suite:?}: no CID with CBC");
        assert_eq!(ep.session(handle).unwrap().connection_id(), None);
        client.send(now, b"over cbc").unwrap();
        let record = client.poll_transmit().unwrap().contents;
        assert_eq!(record[0], 23, "a plain application_data record");
        assert_eq!((record.len() - 13 - 32) % 16, 0, "IV and whole blocks, then the MAC");
        ep.handle(now, at, &record);
        let got: Vec<_> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert_eq!(data_events(&got), vec![(at, b"over cbc".to_vec())]);
        // A replay, and a record with one bit flipped, are dropped.
        let mut flipped = record.clone();
        *flipped.last_mut().unwrap() ^= 1;
        for bad in [&record, &flipped] {
            ep.handle(now, at, bad);
            assert!(data_events(&std::iter::from_fn(|| ep.poll_event()).collect::<Vec<_>>()).is_empty());
        }
        while client.poll_event().is_some() {}
        // Restored in a new endpoint, with the MAC keys, no handshake.
        let snapshot = SessionSnapshot::decode(&ep.snapshot(handle).unwrap().encode()).unwrap();
        let mut ep = Endpoint::new(psk_server(only(suite)), config.sequence_reservation(100), now).unwrap();
        ep.restore(now, handle, at, &snapshot).unwrap();
        let checkpoint = ep.checkpoint();
        ep.checkpoint_written(&checkpoint);
        ep.send(now, handle, b"after restore").unwrap();
        client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
        assert_eq!(client.poll_event(), Some(Event::Data(b"after restore".to_vec())), "{suite:?}");
    }
    // With certificates too.
    let pki = pki();
    let suite = CipherSuite::EcdheEcdsaAes128CbcSha256;
    let sctx = x509_server(&pki, ClientAuth::None, only(suite));
    let mut ep = Endpoint::new(sctx, EndpointConfig::new([6; 32]), now).unwrap();
    let mut client = Session::client(&x509_client(&pki, false, only(suite)), now).unwrap();
    let (events, _) = exchange(now, &mut ep, &mut client, addr(6));
    let handle = connected_handle(&events);
    assert_eq!(client.cipher_suite(), Some(suite));
    ep.send(now, handle, b"ecdsa over cbc").unwrap();
    client.handle_datagram(now, &ep.poll_transmit().unwrap().contents);
    assert_eq!(client.poll_event(), Some(Event::Data(b"ecdsa over cbc".to_vec())));
}

#[test]
fn with_short_connection_ids_all_taken_a_session_goes_without_one() {
    // 1-byte Connection IDs: 256 of them. Sessions past that (still holding theirs) must
    // neither hang the endpoint looking for a free one nor fail: they work by address.
    let now = Instant::now();
    let config = EndpointConfig::new([4; 32]).connection_id_len(1).max_sessions_per_identity(1000);
    let mut ep = endpoint(now, config.handshakes_per_source(1000, 1000));
    let context = cid_client(fast_session());
    let mut with_cid = 0;
    for i in 0..270u16 {
        let at = SocketAddr::from(([127, 0, (i / 200) as u8 + 1, (i % 200) as u8 + 1], 6000 + i));
        let mut client = Session::client(&context, now).unwrap();
        let (events, _) = exchange(now, &mut ep, &mut client, at);
        let handle = connected_handle(&events);
        with_cid += usize::from(ep.session(handle).unwrap().connection_id().is_some());
        client.send(now, b"ping").unwrap();
        let (events, _) = exchange(now, &mut ep, &mut client, at);
        assert_eq!(data_events(&events), vec![(at, b"ping".to_vec())], "session {i}");
    }
    assert_eq!(ep.session_count(), 270);
    assert!((200..=256).contains(&with_cid), "{with_cid} of 270 have a 1-byte Connection ID");
}

#[test]
fn a_session_that_must_not_be_restored_is_ended_on_a_sequence_number_it_never_used() {
    let now = Instant::now();
    let config = EndpointConfig::new([13; 32]).sequence_reservation(100);
    let mut ep = Endpoint::new(psk_server(fast_session()), config.clone(), now).unwrap();
    let mut client = Session::client(&psk_client(fast_session()), now).unwrap();
    let at = addr(13);
    let (events, _) = exchange(now, &mut ep, &mut client, at);
    let handle = connected_handle(&events);
    // A copy of the session's state is put aside; the session goes on after it.
    let copy = ep.snapshot(handle).unwrap();
    let mut nonces = std::collections::HashSet::new();
    for i in 0..50 {
        ep.send(now, handle, format!("after the copy {i}").as_bytes()).unwrap();
        let t = ep.poll_transmit().unwrap();
        nonces.insert(explicit_nonce(&t.contents));
        client.handle_datagram(now, &t.contents);
    }
    while client.poll_event().is_some() {}
    drop(ep);

    // Started on the copy: the session is not restored; its peer is told it ended.
    let mut ep = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    ep.farewell(now, at, &copy).unwrap();
    assert_eq!(ep.session_count(), 0);
    let farewell = ep.poll_transmit().expect("a close_notify");
    assert_eq!(farewell.destination, at);
    assert!(nonces.insert(explicit_nonce(&farewell.contents)), "a nonce never used before");
    assert_eq!(explicit_nonce(&farewell.contents) & ((1 << 48) - 1), (1 << 48) - 1, "the last sequence number");
    client.handle_datagram(now, &farewell.contents);
    assert_eq!(client.close_reason(), Some(&CloseReason::PeerClosed), "the device knows to handshake again");
}
