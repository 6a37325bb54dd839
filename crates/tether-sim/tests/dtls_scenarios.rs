//! DTLS over the simulated network: every suite, and handshakes under loss.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether_proto::dtls::pki::{CertificateAuthority, Validity};
use tether_proto::dtls::{
    CipherSuite, ClientAuth, ClientConfig, CloseReason, DtlsContext, EndpointConfig, PskKey, ServerConfig,
    SessionConfig, StaticPskStore,
};
use tether_sim::dtls::{ClientNode, DtlsNode, ServerNode};
use tether_sim::{seed_from_env, Clock, LinkConfig, Loss, Network, NodeId};

const SERVER: &str = "127.0.0.1:5684";

fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

fn client_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, (i / 250) as u8 + 1, (i % 250) as u8 + 1], 40_000 + (i % 1000) as u16))
}

fn psk() -> PskKey {
    PskKey::from_hex("73656372657450534b").unwrap()
}

fn session(initial_rto: Duration) -> SessionConfig {
    SessionConfig::default().retransmit(initial_rto, initial_rto * 8).handshake_timeout(Duration::from_secs(10))
}

struct Contexts {
    server: Arc<DtlsContext>,
    client: Arc<DtlsContext>,
}

fn contexts(suite: CipherSuite, session: SessionConfig) -> Contexts {
    let session = session.cipher_suites(&[suite]);
    if suite.is_psk() {
        let store = StaticPskStore::new().with("identity", psk());
        return Contexts {
            server: DtlsContext::server(ServerConfig::psk(store).session(session.clone())).unwrap(),
            client: DtlsContext::client(ClientConfig::psk("identity", psk()).session(session)).unwrap(),
        };
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let validity = Validity::days_around(now, 30);
    let mut ca = CertificateAuthority::generate("sim ca", validity).unwrap();
    let server_cert = ca.issue("server.test", validity).unwrap();
    let client_cert = ca.issue("device-1", validity).unwrap();
    let server = ServerConfig::x509(server_cert)
        .client_auth(ClientAuth::Required(vec![ca.certificate.clone()]))
        .session(session.clone());
    let client = ClientConfig::x509(vec![ca.certificate.clone()])
        .certificate(client_cert)
        .server_name("server.test")
        .session(session);
    Contexts { server: DtlsContext::server(server).unwrap(), client: DtlsContext::client(client).unwrap() }
}

#[test]
fn every_suite_handshakes_and_echoes_over_the_simulator() {
    for suite in CipherSuite::ALL {
        let seed = seed_from_env(1);
        let ctx = contexts(suite, session(Duration::from_millis(50)));
        let mut net: Network<DtlsNode> = Network::new(seed, Clock::FollowWallClock, LinkConfig::default());
        let now = net.now();
        let server = ServerNode::new(ctx.server, shared_identity(EndpointConfig::new([1; 32])), now).unwrap();
        net.add(server_addr(), DtlsNode::Server(server));
        let payload = format!("hello over {suite:?}").into_bytes();
        let client = ClientNode::new(&ctx.client, server_addr(), now, Some(payload.clone())).unwrap();
        let id = net.add(client_addr(0), DtlsNode::Client(client));
        let done =
            net.run_until(Duration::from_secs(5), |net| net.node(id).client().is_some_and(|c| !c.received.is_empty()));
        let client = net.node(id).client().unwrap();
        assert!(done, "{suite:?}: {:?}", client.closed);
        assert_eq!(client.received, vec![payload], "{suite:?}");
        assert_eq!(client.session.cipher_suite(), Some(suite));
    }
}

struct Profile {
    label: String,
    link: LinkConfig,
}

/// Median and 95th percentile of a sorted list.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[rank])
}

#[test]
fn two_hundred_handshakes_per_loss_level_complete_or_time_out() {
    const PER_PROFILE: usize = 200;
    let seed = seed_from_env(2026);
    let profiles: Vec<Profile> =
        [Loss::None, Loss::Random(0.05), Loss::Random(0.20), Loss::Random(0.50), Loss::bursty(0.20, 4.0)]
            .into_iter()
            .map(|loss| Profile { label: loss.label(), link: LinkConfig::default().loss(loss) })
            .collect();

    let ctx = contexts(CipherSuite::PskAes128Ccm8, session(Duration::from_millis(30)));
    let deadline = ctx.client.session_config().handshake_timeout;
    let mut net: Network<DtlsNode> = Network::new(seed, Clock::FollowWallClock, LinkConfig::default());
    let start = net.now();
    let server = ServerNode::new(ctx.server, shared_identity(EndpointConfig::new([2; 32])), start).unwrap();
    let server_id = net.add(server_addr(), DtlsNode::Server(server));
    let mut clients: Vec<Vec<NodeId>> = Vec::new();
    for (p, profile) in profiles.iter().enumerate() {
        let mut ids = Vec::new();
        for i in 0..PER_PROFILE {
            let addr = client_addr(p * PER_PROFILE + i);
            net.set_links(addr, server_addr(), profile.link.clone());
            let client = ClientNode::new(&ctx.client, server_addr(), start, None).unwrap();
            ids.push(net.add(addr, DtlsNode::Client(client)));
        }
        clients.push(ids);
    }
    let all: Vec<NodeId> = clients.iter().flatten().copied().collect();
    let settled = net.run_until(deadline + Duration::from_secs(1), |net| {
        all.iter().all(|id| net.node(*id).client().is_some_and(ClientNode::is_settled))
    });
    assert!(settled, "a handshake neither completed nor failed by its deadline (a hang)");

    let mut table = format!(
        "DTLS PSK-AES128-CCM8 handshakes over tether-sim (seed {seed}, {PER_PROFILE} concurrent per level, \
         RTO 30 ms doubling to 240 ms, deadline {deadline:?}, one-way latency 10 ms)\n\
         {:<26} {:>6} {:>10} {:>8} {:>12} {:>12}\n",
        "loss", "count", "completed", "failed", "median", "p95"
    );
    for (profile, ids) in profiles.iter().zip(&clients) {
        let mut times: Vec<Duration> = Vec::new();
        let mut failed = 0;
        for id in ids {
            let client = net.node(*id).client().unwrap();
            match (&client.handshake_time(), &client.closed) {
                (Some(t), _) => times.push(*t),
                (None, Some(reason)) => {
                    failed += 1;
                    assert!(
                        matches!(reason, CloseReason::HandshakeTimeout | CloseReason::RetransmissionLimit),
                        "{}: failed for a reason other than a timeout: {reason}",
                        profile.label
                    );
                }
                (None, None) => unreachable!("checked settled above"),
            }
            if let Some(t) = client.handshake_time() {
                assert!(t <= deadline, "completed after its deadline: {t:?}");
            }
        }
        times.sort();
        let fmt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
        table += &format!(
            "{:<26} {:>6} {:>9.1}% {:>8} {:>12} {:>12}\n",
            profile.label,
            ids.len(),
            times.len() as f64 * 100.0 / ids.len() as f64,
            failed,
            fmt(percentile(&times, 0.5)),
            fmt(percentile(&times, 0.95)),
        );
        if profile.link.loss == Loss::None {
            assert_eq!(times.len(), ids.len(), "lossless handshakes all complete");
        }
    }
    table += &format!("network: {:?}\n", net.stats());
    print!("{table}");
    write_report("dtls_loss_table.txt", &table);
    // The server sheds the half-open handshakes of clients that gave up, by its own deadline.
    net.run_for(deadline + Duration::from_secs(1));
    let endpoint = &net.node(server_id).server().unwrap().endpoint;
    assert_eq!(endpoint.handshakes_in_progress(), 0, "{:?}", endpoint.stats());
}

#[test]
fn certificate_handshakes_survive_duplication_reordering_and_a_small_mtu() {
    const CLIENTS: usize = 40;
    let seed = seed_from_env(7);
    // The link drops anything over 600 bytes; the sessions are told the same MTU, so the
    // certificate flights must be fragmented to fit.
    let session = session(Duration::from_millis(40)).mtu(600);
    let ctx = contexts(CipherSuite::EcdheEcdsaAes128Ccm8, session);
    let link = LinkConfig::default()
        .latency(Duration::from_millis(10), Duration::from_millis(20))
        .chaos(0.10, 0.20)
        .loss(Loss::Random(0.05))
        .mtu(600);
    let mut net: Network<DtlsNode> = Network::new(seed, Clock::FollowWallClock, link);
    let now = net.now();
    let server = ServerNode::new(ctx.server, shared_identity(EndpointConfig::new([3; 32])), now).unwrap();
    net.add(server_addr(), DtlsNode::Server(server));
    let ids: Vec<NodeId> = (0..CLIENTS)
        .map(|i| {
            let payload = format!("payload {i}").into_bytes();
            let client = ClientNode::new(&ctx.client, server_addr(), now, Some(payload)).unwrap();
            net.add(client_addr(i), DtlsNode::Client(client))
        })
        .collect();
    let settled = |net: &Network<DtlsNode>, id: &NodeId| net.node(*id).client().is_some_and(ClientNode::is_settled);
    assert!(net.run_until(Duration::from_secs(11), |net| ids.iter().all(|id| settled(net, id))));
    // Echoes ride on application data, which DTLS does not retransmit; let the last ones in.
    net.run_for(Duration::from_millis(300));
    let stats = net.stats();
    assert_eq!(stats.too_big, 0, "no datagram exceeded the mtu: {stats:?}");
    assert!(stats.duplicated > 0 && stats.reordered > 0, "{stats:?}");
    let mut completed = 0;
    let server_events = &net.nodes().find_map(|(_, n)| n.server()).unwrap().events;
    for e in server_events {
        if let tether_proto::dtls::EndpointEvent::Closed { was_established: false, .. } = e {
            eprintln!("server: {e:?}");
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let c = net.node(*id).client().unwrap();
        if c.connected_at.is_some() {
            completed += 1;
            for data in &c.received {
                assert_eq!(data, format!("payload {i}").as_bytes(), "echo is intact");
            }
        } else {
            assert!(
                matches!(c.closed, Some(CloseReason::HandshakeTimeout | CloseReason::RetransmissionLimit)),
                "client {i}: {:?}",
                c.closed
            );
        }
    }
    assert!(completed >= CLIENTS * 9 / 10, "only {completed}/{CLIENTS} completed at 5% loss: {stats:?}");
}

/// An endpoint's settings for clients that all present one identity (these scenarios are
/// about handshakes on a bad network, not about the per-identity cap).
fn shared_identity(config: EndpointConfig) -> EndpointConfig {
    config.max_sessions_per_identity(10_000).handshakes_per_source(10_000, 10_000)
}

/// Writes a report under target/reports/, which `.ci/run` prints after the tests.
fn write_report(name: &str, text: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/reports");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}
