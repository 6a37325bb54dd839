//! Shared helpers for the DTLS tests: credentials and a lossless in-memory pump.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_proto::dtls::pki::{CertificateAuthority, Validity};
use tether_proto::dtls::{
    CertifiedKey, CipherSuite, ClientAuth, ClientConfig, DtlsContext, Event, PskKey, ServerConfig, Session,
    SessionConfig, StaticPskStore,
};

pub const IDENTITY: &str = "identity";
pub const KEY_HEX: &str = "73656372657450534b";

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

pub fn psk() -> PskKey {
    PskKey::from_hex(KEY_HEX).unwrap()
}

/// Settings for the lossless in-memory exchanges of these tests: a 10 s handshake deadline
/// on the caller's clock, and OpenSSL's own retransmission timer (wall clock, inside libssl)
/// long enough never to fire between two steps of an exchange, even under valgrind, where a
/// 20 ms timer did and added flights the assertions did not expect. Tests of retransmission
/// set their own timer.
pub fn fast_session() -> SessionConfig {
    SessionConfig::default()
        .retransmit(Duration::from_secs(2), Duration::from_secs(4))
        .handshake_timeout(Duration::from_secs(10))
}

pub fn psk_server(session: SessionConfig) -> Arc<DtlsContext> {
    let store = StaticPskStore::new().with(IDENTITY, psk());
    DtlsContext::server(ServerConfig::psk(store).session(session)).unwrap()
}

pub fn psk_client(session: SessionConfig) -> Arc<DtlsContext> {
    DtlsContext::client(ClientConfig::psk(IDENTITY, psk()).session(session)).unwrap()
}

/// A CA, a server certificate for "server.test" and a client certificate for "device-1".
pub struct Pki {
    pub ca: CertificateAuthority,
    pub server: CertifiedKey,
    pub client: CertifiedKey,
}

pub fn pki() -> Pki {
    let validity = Validity::days_around(unix_now(), 30);
    let mut ca = CertificateAuthority::generate("tether test ca", validity).unwrap();
    let server = ca.issue("server.test", validity).unwrap();
    let client = ca.issue("device-1", validity).unwrap();
    Pki { ca, server, client }
}

pub fn x509_server(pki: &Pki, auth: ClientAuth, session: SessionConfig) -> Arc<DtlsContext> {
    DtlsContext::server(ServerConfig::x509(pki.server.clone()).client_auth(auth).session(session)).unwrap()
}

pub fn x509_client(pki: &Pki, with_cert: bool, session: SessionConfig) -> Arc<DtlsContext> {
    let mut config = ClientConfig::x509(vec![pki.ca.certificate.clone()]).session(session).server_name("server.test");
    if with_cert {
        config = config.certificate(pki.client.clone());
    }
    DtlsContext::client(config).unwrap()
}

pub fn only(suite: CipherSuite) -> SessionConfig {
    fast_session().cipher_suites(&[suite])
}

/// Moves datagrams between two sessions until neither has anything to send; returns the
/// events each saw. Lossless, so no retransmission timer is needed.
pub fn pump(now: Instant, a: &mut Session, b: &mut Session) -> (Vec<Event>, Vec<Event>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            b.handle_datagram(now, &t.contents);
            moved = true;
        }
        while let Some(t) = b.poll_transmit() {
            a.handle_datagram(now, &t.contents);
            moved = true;
        }
        while let Some(e) = a.poll_event() {
            ea.push(e);
        }
        while let Some(e) = b.poll_event() {
            eb.push(e);
        }
        if !moved {
            break;
        }
    }
    (ea, eb)
}

pub fn connected(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Connected { .. }))
}

pub fn data(events: &[Event]) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Data(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}
pub mod endpoint;
pub mod udp;
