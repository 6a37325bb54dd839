//! Session-level behaviour: suites, authentication failures, MTU, close, resumption.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant and drive real sockets")]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tether_proto::dtls::{record, CipherSuite, ClientAuth, CloseReason, Event, PeerIdentity, SendError, Session};

fn handshake(now: Instant, client: &mut Session, server: &mut Session) -> (Vec<Event>, Vec<Event>) {
    pump(now, client, server)
}

#[test]
fn psk_suites_handshake_and_carry_data_both_ways() {
    for suite in [CipherSuite::PskAes128Ccm8, CipherSuite::PskAes128GcmSha256] {
        let now = Instant::now();
        let (cctx, sctx) = (psk_client(only(suite)), psk_server(only(suite)));
        let mut client = Session::client(&cctx, now).unwrap();
        let mut server = Session::server(&sctx, now).unwrap();
        let (ce, se) = handshake(now, &mut client, &mut server);
        assert!(connected(&ce) && connected(&se), "{suite:?}: {ce:?} {se:?}");
        assert_eq!(client.cipher_suite(), Some(suite));
        assert_eq!(server.cipher_suite(), Some(suite));
        assert_eq!(server.peer_identity(), Some(&PeerIdentity::Psk(IDENTITY.into())));
        client.send(now, b"ping").unwrap();
        server.send(now, b"pong").unwrap();
        let (ce, se) = pump(now, &mut client, &mut server);
        assert_eq!(data(&se), vec![b"ping".to_vec()], "{suite:?}");
        assert_eq!(data(&ce), vec![b"pong".to_vec()], "{suite:?}");
    }
}

#[test]
fn ecdhe_ecdsa_suites_handshake_with_mutual_authentication() {
    let pki = pki();
    for suite in [CipherSuite::EcdheEcdsaAes128Ccm8, CipherSuite::EcdheEcdsaAes128GcmSha256] {
        let now = Instant::now();
        let auth = ClientAuth::Required(vec![pki.ca.certificate.clone()]);
        let sctx = x509_server(&pki, auth, only(suite));
        let cctx = x509_client(&pki, true, only(suite));
        let mut client = Session::client(&cctx, now).unwrap();
        let mut server = Session::server(&sctx, now).unwrap();
        let (ce, se) = handshake(now, &mut client, &mut server);
        assert!(connected(&ce) && connected(&se), "{suite:?}: {ce:?} {se:?}");
        assert_eq!(client.cipher_suite(), Some(suite));
        let cn = |s: &str| PeerIdentity::Certificate { common_name: s.into() };
        assert_eq!(server.peer_identity(), Some(&cn("device-1")));
        assert_eq!(client.peer_identity(), Some(&cn("server.test")));
        client.send(now, b"ping").unwrap();
        server.send(now, b"pong").unwrap();
        let (ce, se) = pump(now, &mut client, &mut server);
        assert_eq!(data(&se), vec![b"ping".to_vec()]);
        assert_eq!(data(&ce), vec![b"pong".to_vec()]);
    }
}

fn closed_reason(events: &[Event]) -> Option<CloseReason> {
    events.iter().find_map(|e| match e {
        Event::Closed { reason } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn unknown_psk_identity_is_named_on_both_sides() {
    let now = Instant::now();
    let sctx = psk_server(fast_session());
    let cctx = tether_proto::dtls::DtlsContext::client(
        tether_proto::dtls::ClientConfig::psk("stranger", psk()).session(fast_session()),
    )
    .unwrap();
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert_eq!(closed_reason(&se), Some(CloseReason::UnknownPskIdentity), "{se:?}");
    assert_eq!(closed_reason(&ce), Some(CloseReason::UnknownPskIdentity), "{ce:?}");
}

#[test]
fn wrong_psk_key_is_named_on_both_sides() {
    let now = Instant::now();
    let sctx = psk_server(fast_session());
    let cctx = tether_proto::dtls::DtlsContext::client(
        tether_proto::dtls::ClientConfig::psk(IDENTITY, tether_proto::dtls::PskKey::from_hex("0102030405").unwrap())
            .session(fast_session()),
    )
    .unwrap();
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert_eq!(closed_reason(&se), Some(CloseReason::KeyMismatch), "server: {se:?}");
    assert!(
        matches!(closed_reason(&ce), Some(CloseReason::AlertReceived(a)) if a.name() == "decrypt_error"),
        "client: {ce:?}"
    );
}

#[test]
fn untrusted_and_expired_server_certificates_are_named() {
    let pki = pki();
    let now = Instant::now();
    // Untrusted: the client trusts another CA only.
    let validity = tether_proto::dtls::pki::Validity::days_around(unix_now(), 30);
    let rogue = tether_proto::dtls::pki::CertificateAuthority::generate("rogue ca", validity).unwrap();
    let sctx = x509_server(&pki, ClientAuth::None, fast_session());
    let cctx = tether_proto::dtls::DtlsContext::client(
        tether_proto::dtls::ClientConfig::x509(vec![rogue.certificate.clone()]).session(fast_session()),
    )
    .unwrap();
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert!(
        matches!(closed_reason(&ce), Some(CloseReason::CertificateRejected(ref why)) if why.contains("local issuer")),
        "{ce:?}"
    );
    assert!(matches!(closed_reason(&se), Some(CloseReason::AlertReceived(a)) if a.name() == "unknown_ca"), "{se:?}");

    // Expired: issued by the trusted CA, but its validity ended yesterday.
    let mut pki = pki;
    let expired =
        tether_proto::dtls::pki::Validity { not_before: unix_now() - 10 * 86_400, not_after: unix_now() - 86_400 };
    let old = pki.ca.issue("server.test", expired).unwrap();
    let sctx =
        tether_proto::dtls::DtlsContext::server(tether_proto::dtls::ServerConfig::x509(old).session(fast_session()))
            .unwrap();
    let cctx = x509_client(&pki, false, fast_session());
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert!(
        matches!(closed_reason(&ce), Some(CloseReason::CertificateRejected(ref why)) if why.contains("expired")),
        "{ce:?}"
    );
    assert!(
        matches!(closed_reason(&se), Some(CloseReason::AlertReceived(a)) if a.name() == "certificate_expired"),
        "{se:?}"
    );
}

#[test]
fn missing_client_certificate_under_mutual_authentication_is_named() {
    let pki = pki();
    let now = Instant::now();
    let sctx = x509_server(&pki, ClientAuth::Required(vec![pki.ca.certificate.clone()]), fast_session());
    let cctx = x509_client(&pki, false, fast_session());
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert_eq!(closed_reason(&se), Some(CloseReason::NoPeerCertificate), "{se:?}");
    assert!(matches!(closed_reason(&ce), Some(CloseReason::AlertReceived(_))), "{ce:?}");
}

#[test]
fn mtu_bounds_handshake_datagrams_and_payloads() {
    let pki = pki();
    let now = Instant::now();
    let session = fast_session().mtu(400);
    let sctx = x509_server(&pki, ClientAuth::Required(vec![pki.ca.certificate.clone()]), session.clone());
    let cctx = x509_client(&pki, true, session);
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let mut largest = 0;
    for _ in 0..20 {
        while let Some(t) = client.poll_transmit() {
            largest = largest.max(t.contents.len());
            server.handle_datagram(now, &t.contents);
        }
        while let Some(t) = server.poll_transmit() {
            largest = largest.max(t.contents.len());
            client.handle_datagram(now, &t.contents);
        }
    }
    assert!(client.is_established() && server.is_established());
    assert!(largest <= 400, "a handshake datagram of {largest} bytes exceeds the 400-byte mtu");
    let max = client.max_payload();
    assert!(max > 300 && max < 400, "max_payload {max}");
    assert_eq!(client.send(now, &vec![0u8; max + 1]), Err(SendError::TooLarge { len: max + 1, max }));
    assert!(client.poll_transmit().is_none(), "nothing is sent for a refused payload");
    client.send(now, &vec![7u8; max]).unwrap();
    let t = client.poll_transmit().unwrap();
    assert!(t.contents.len() <= 400);
    assert_eq!(client.send(now, b""), Err(SendError::Empty));
}

#[test]
fn close_notify_closes_the_peer_at_once() {
    let now = Instant::now();
    let (cctx, sctx) = (psk_client(fast_session()), psk_server(fast_session()));
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    handshake(now, &mut client, &mut server);
    client.close(now);
    let (ce, se) = pump(now, &mut client, &mut server);
    assert_eq!(closed_reason(&ce), Some(CloseReason::Local));
    assert_eq!(closed_reason(&se), Some(CloseReason::PeerClosed));
    assert_eq!(client.send(now, b"x"), Err(SendError::Closed(CloseReason::Local)));
    assert!(server.poll_timeout().is_none());
}

#[test]
fn a_saved_session_resumes_with_an_abbreviated_handshake() {
    let now = Instant::now();
    let (cctx, sctx) = (psk_client(fast_session()), psk_server(fast_session()));
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    handshake(now, &mut client, &mut server);
    assert!(!client.is_resumed());
    let saved = client.saved_session(&cctx).expect("a session to save");
    client.close(now);
    pump(now, &mut client, &mut server);
    drop((client, server));

    let mut client = Session::client_resuming(&cctx, now, &saved).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    let (ce, se) = handshake(now, &mut client, &mut server);
    assert!(ce.contains(&Event::Connected { resumed: true }), "{ce:?}");
    assert!(se.contains(&Event::Connected { resumed: true }), "{se:?}");
    assert!(client.is_resumed() && server.is_resumed());
}

#[test]
fn a_session_dropped_while_established_stays_resumable() {
    let now = Instant::now();
    let (cctx, sctx) = (psk_client(fast_session()), psk_server(fast_session()));
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    handshake(now, &mut client, &mut server);
    let saved = client.saved_session(&cctx).unwrap();
    drop((client, server)); // no close_notify: an evicted session
    let mut client = Session::client_resuming(&cctx, now, &saved).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    handshake(now, &mut client, &mut server);
    assert!(server.is_resumed());
}

#[test]
fn the_handshake_deadline_follows_the_callers_clock() {
    let now = Instant::now();
    let cctx = psk_client(fast_session().handshake_timeout(Duration::from_secs(5)));
    let mut client = Session::client(&cctx, now).unwrap();
    assert!(client.poll_transmit().is_some());
    let at = client.poll_timeout().unwrap();
    assert!(at <= now + Duration::from_secs(5));
    client.handle_timeout(now + Duration::from_secs(5));
    assert_eq!(client.close_reason(), Some(&CloseReason::HandshakeTimeout));
    assert_eq!(client.poll_event(), Some(Event::Closed { reason: CloseReason::HandshakeTimeout }));
    assert!(client.poll_timeout().is_none());
}

#[test]
fn one_expired_timer_produces_exactly_one_retransmitted_flight() {
    let now = Instant::now();
    let pki = pki();
    // A certificate flight spans several handshake messages: the server's second flight.
    let session = fast_session().retransmit(Duration::from_millis(50), Duration::from_millis(50));
    let sctx = x509_server(&pki, ClientAuth::None, session.clone());
    let cctx = x509_client(&pki, false, session);
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    server.handle_datagram(now, &client.poll_transmit().unwrap().contents);
    let mut flight = Vec::new();
    while let Some(t) = server.poll_transmit() {
        flight.extend(record::handshake_messages(&t.contents));
    }
    assert!(flight.len() >= 4, "ServerHello..ServerHelloDone: {flight:?}");
    // The flight is lost. Let OpenSSL's wall-clock timer run out.
    let wait = server.retransmit_timer_remaining().unwrap();
    std::thread::sleep(wait + Duration::from_millis(20));
    let later = now + wait + Duration::from_millis(20);
    server.handle_timeout(later);
    let mut again = Vec::new();
    while let Some(t) = server.poll_transmit() {
        again.extend(record::handshake_messages(&t.contents));
    }
    assert_eq!(again, flight, "exactly the lost flight, once");
    server.handle_timeout(later);
    assert!(server.poll_transmit().is_none(), "a repeated handle_timeout re-sends nothing");
    assert_eq!(server.stats().retransmissions, 1);
    let _ = client;
}

#[test]
fn extended_master_secret_is_used_when_offered_and_not_required() {
    let now = Instant::now();
    let sctx = psk_server(fast_session());
    for offer in [true, false] {
        let mut config = tether_proto::dtls::ClientConfig::psk(IDENTITY, psk()).session(fast_session());
        config.offer_extended_master_secret = offer;
        let cctx = tether_proto::dtls::DtlsContext::client(config).unwrap();
        let mut client = Session::client(&cctx, now).unwrap();
        let mut server = Session::server(&sctx, now).unwrap();
        handshake(now, &mut client, &mut server);
        assert!(server.is_established(), "offer {offer}");
        assert_eq!(server.uses_extended_master_secret(), Some(offer));
        assert_eq!(client.uses_extended_master_secret(), Some(offer));
    }
}

#[test]
fn no_psk_identity_hint_is_sent_by_default() {
    let now = Instant::now();
    let sctx = psk_server(fast_session().cipher_suites(&[CipherSuite::PskAes128Ccm8]));
    let cctx = psk_client(fast_session());
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    // Flight 1 and 2 (ClientHello, ServerHello..ServerHelloDone) in plaintext: a PSK suite
    // without a hint sends no ServerKeyExchange (handshake type 12) at all (RFC 4279 §2).
    let mut server_types = Vec::new();
    for _ in 0..4 {
        while let Some(t) = client.poll_transmit() {
            server.handle_datagram(now, &t.contents);
        }
        while let Some(t) = server.poll_transmit() {
            server_types.extend(record::handshake_messages(&t.contents));
            client.handle_datagram(now, &t.contents);
        }
    }
    assert!(client.is_established());
    assert!(server_types.contains(&Some(2)) && server_types.contains(&Some(14)), "{server_types:?}");
    assert!(!server_types.contains(&Some(12)), "a ServerKeyExchange carried an identity hint: {server_types:?}");
}

#[test]
fn the_server_session_cache_is_bounded() {
    let now = Instant::now();
    let sctx = tether_proto::dtls::DtlsContext::server(
        tether_proto::dtls::ServerConfig::psk(tether_proto::dtls::StaticPskStore::new().with(IDENTITY, psk()))
            .session(fast_session())
            .session_cache_size(1),
    )
    .unwrap();
    let cctx = psk_client(fast_session());
    let mut saved = Vec::new();
    for _ in 0..2 {
        let mut client = Session::client(&cctx, now).unwrap();
        let mut server = Session::server(&sctx, now).unwrap();
        handshake(now, &mut client, &mut server);
        saved.push(client.saved_session(&cctx).unwrap());
    }
    // Only the newest of the two fits in a cache of one.
    let resumes = |saved: &tether_proto::dtls::SavedSession| {
        let mut client = Session::client_resuming(&cctx, now, saved).unwrap();
        let mut server = Session::server(&sctx, now).unwrap();
        handshake(now, &mut client, &mut server);
        assert!(client.is_established());
        client.is_resumed()
    };
    assert!(resumes(&saved[1]));
    assert!(!resumes(&saved[0]), "an evicted cache entry falls back to a full handshake");
}

#[test]
fn dtls_1_0_is_refused() {
    // A DTLS 1.0 ClientHello: take ours and lower client_version to 0xfeff.
    let now = Instant::now();
    let cctx = psk_client(fast_session());
    let mut hello = Session::client(&cctx, now).unwrap().poll_transmit().unwrap().contents;
    hello[13 + 12] = 0xfe;
    hello[13 + 12 + 1] = 0xff;
    let mut server = Session::server(&psk_server(fast_session()), now).unwrap();
    server.handle_datagram(now, &hello);
    assert!(
        matches!(server.close_reason(), Some(CloseReason::HandshakeFailed(why)) if why.contains("unsupported protocol")),
        "{:?}",
        server.close_reason()
    );
}

#[test]
fn hostile_datagrams_fed_straight_to_established_sessions_change_nothing() {
    for suite in CipherSuite::ALL {
        hostile_datagrams_against(suite);
    }
}

fn hostile_datagrams_against(suite: CipherSuite) {
    use rand::{Rng, SeedableRng};
    let now = Instant::now();
    let pki = pki();
    let (cctx, sctx) = if suite.is_psk() {
        (psk_client(only(suite)), psk_server(only(suite)))
    } else {
        (x509_client(&pki, false, only(suite)), x509_server(&pki, ClientAuth::None, only(suite)))
    };
    let mut client = Session::client(&cctx, now).unwrap();
    let mut server = Session::server(&sctx, now).unwrap();
    handshake(now, &mut client, &mut server);
    client.send(now, b"genuine").unwrap();
    let genuine = client.poll_transmit().unwrap().contents;
    server.handle_datagram(now, &genuine);
    assert_eq!(server.poll_event(), Some(Event::Data(b"genuine".to_vec())));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut hostile: Vec<Vec<u8>> = (0..20_000)
        .map(|_| {
            let len = rng.gen_range(0..300);
            let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if len >= 13 && rng.gen_bool(0.5) {
                // Plausible DTLS framing so that OpenSSL's record layer is exercised.
                d[0] = rng.gen_range(20..=23);
                d[1..3].copy_from_slice(&[0xfe, 0xfd]);
                d[3..5].copy_from_slice(&[0, rng.gen_range(0..=2)]);
                if rng.gen_bool(0.3) {
                    // A whole record at the current epoch: short ones probe OpenSSL's AEAD checks.
                    let body = rng.gen_range(0..40).min(len - 13);
                    d.truncate(13 + body);
                    d[11..13].copy_from_slice(&(body as u16).to_be_bytes());
                    return d;
                }
                d[11..13].copy_from_slice(&((len - 13) as u16).to_be_bytes());
            }
            d
        })
        .collect();
    hostile.extend((0..genuine.len()).map(|cut| genuine[..cut].to_vec()));
    hostile.extend((13..genuine.len()).map(|i| {
        let mut d = genuine.clone();
        d[i] ^= 0x01;
        d
    }));
    hostile.extend(std::iter::repeat_n(genuine.clone(), 5));
    for (i, d) in hostile.iter().enumerate() {
        server.handle_datagram(now, d);
        client.handle_datagram(now, d);
        if !server.is_established() || !client.is_established() {
            let head: Vec<u8> = d.iter().take(16).copied().collect();
            panic!(
                "{suite:?}: datagram {i} (len {}, head {head:02x?}) closed: server {:?} client {:?}",
                d.len(),
                server.close_reason(),
                client.close_reason()
            );
        }
    }
    for session in [&mut client, &mut server] {
        assert!(session.is_established(), "{:?}", session.close_reason());
        assert_eq!(session.poll_event(), None, "hostile input surfaced an event");
    }
    server.send(now, b"still here").unwrap();
    let (ce, _) = pump(now, &mut client, &mut server);
    assert_eq!(data(&ce), vec![b"still here".to_vec()]);
}
