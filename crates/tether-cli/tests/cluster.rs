//! Three `tether serve` nodes on one PostgreSQL database behind nginx (UDP, hashed by the
//! client's address and port), with real `tether device` fleets:
//!
//! - devices with and without a Connection ID register through the balancer; every node
//!   lists the whole fleet and reads any device, whichever node holds it;
//! - CID devices change their source port before every read (a NAT proxy in front of
//!   nginx), so their records land on any node: no new handshake, records forwarded;
//! - SIGKILL of the node holding the most sessions: every CID device it held answers a
//!   read again with no handshake (takeover time measured), no sequence number is used
//!   twice on the wire, no registration is lost; devices without CID on it handshake once
//!   with a survivor and keep their registration;
//! - the killed node restarted rejoins and holds nothing it lost.
//!
//! Needs PostgreSQL (`TETHER_TEST_POSTGRES`) and nginx's stream module; `.ci/run` installs
//! both.

#[path = "support/nginx.rs"]
mod nginx;
#[path = "../../tether/tests/support/postgres.rs"]
mod postgres;
#[path = "../../tether/tests/support/proxy.rs"]
mod proxy;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nginx::Nginx;
use proxy::{assert_unique_nonces, Behaviour, Impairment, Proxy};
use serde_json::Value;
use support::{http, Fleet, Server};

/// CID devices, and devices without a CID.
const WITH_CID: usize = 45;
const WITHOUT_CID: usize = 15;

fn data_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What every node of one test's cluster shares: its database, the fleets it knows and its
/// key (each test's own: two clusters on one machine must not take each other's frames,
/// even where one reuses a port the other let go).
struct Setup {
    dir: std::path::PathBuf,
    store: String,
    security: std::path::PathBuf,
    key: String,
}

impl Setup {
    fn new(dir: &Path, store: &str, security: &Path) -> Self {
        let key: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
        Self { dir: dir.to_path_buf(), store: store.to_string(), security: security.to_path_buf(), key }
    }

    /// Node `node`.
    fn node(&self, node: u8) -> Server {
        self.node_at("127.0.0.1:0", node)
    }

    /// Node `node` with CoAPs on `coaps` (where the load balancer sends, for a restart).
    fn node_at(&self, coaps: &str, node: u8) -> Server {
        let data = self.dir.join(format!("node-{node}"));
        let node = node.to_string();
        let security = self.security.to_str().unwrap();
        let flags = ["--store", &self.store, "--node", &node, "--channel", "127.0.0.1:0", "--security", security];
        // RUST_LOG=info shows what each node did (when a run needs explaining).
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        Server::start_node_at(coaps, &data, &flags, &[("TETHER_CLUSTER_KEY", &self.key), ("RUST_LOG", &log)])
    }
}

async fn clients(server: &Server) -> Vec<Value> {
    let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200, "{clients}");
    clients.as_array().cloned().unwrap_or_default()
}

async fn pool(server: &Server) -> Value {
    http(server.http, "GET", "/api/pool", None).await.1
}

/// Handshakes completed by the nodes, all together.
async fn handshakes(nodes: &[&Server]) -> u64 {
    let mut total = 0;
    for node in nodes {
        total += pool(node).await["handshakes_total"].as_u64().unwrap();
    }
    total
}

async fn read(server: &Server, endpoint: &str) -> (u16, Value) {
    http(server.http, "GET", &format!("/api/clients/{endpoint}/3/0/0"), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_nginx_forward_take_over_and_lose_no_handshake() {
    let Some(db) = postgres::TestDatabase::create("cluster").await else { return };
    let dir = data_dir("three");
    let security = dir.join("fleets.toml");
    let cid_fleet = Fleet::security_file(&dir, "c", WITH_CID);
    let plain_fleet = Fleet::security_file(&dir, "p", WITHOUT_CID);
    let joined =
        format!("{}\n{}", std::fs::read_to_string(&cid_fleet).unwrap(), std::fs::read_to_string(&plain_fleet).unwrap());
    std::fs::write(&security, joined).unwrap();

    let setup = Setup::new(&dir, &db.url, &security);
    let mut nodes: Vec<Option<Server>> = (1..=3).map(|n| Some(setup.node(n))).collect();
    let coaps: Vec<SocketAddr> = nodes.iter().flatten().map(|n| n.coaps).collect();
    let balancer = Nginx::start(&dir.join("nginx"), &coaps);
    let nat = Proxy::start_with(balancer.addr, Impairment::none(), Behaviour { capture: true }).await;
    let device_flags = ["--lifetime", "300", "--send-interval", "1", "--retry-timer", "1"];
    let cid_flags: Vec<&str> = device_flags.iter().copied().chain(["--cid"]).collect();
    let _cid_devices = Fleet::start(nat.addr(), "c", WITH_CID, &cid_flags);
    let _plain_devices = Fleet::start(balancer.addr, "p", WITHOUT_CID, &device_flags);

    // Every node lists the whole fleet, and reads any device.
    let fleet = WITH_CID + WITHOUT_CID;
    let deadline = Instant::now() + Duration::from_secs(120);
    for node in nodes.iter().flatten() {
        loop {
            let listed = clients(node).await.len();
            if listed == fleet {
                break;
            }
            assert!(Instant::now() < deadline, "{listed} of {fleet} listed on {}", node.http);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let endpoints: Vec<String> =
        (0..WITH_CID).map(|i| format!("c-{i}")).chain((0..WITHOUT_CID).map(|i| format!("p-{i}"))).collect();
    for node in nodes.iter().flatten() {
        for endpoint in &endpoints {
            let (status, body) = read(node, endpoint).await;
            assert_eq!(status, 200, "{endpoint} through {}: {body}", node.http);
        }
    }
    let live: Vec<&Server> = nodes.iter().flatten().collect();
    let registered_handshakes = handshakes(&live).await;
    assert_eq!(registered_handshakes, fleet as u64, "one handshake per device");

    // NAT rebinding: a new source port before every read; the records land on any node.
    for round in 0..5 {
        for (i, endpoint) in endpoints.iter().take(WITH_CID).enumerate() {
            nat.rebind_all();
            let node = live[(i + round) % live.len()];
            let (status, body) = read(node, endpoint).await;
            assert_eq!(status, 200, "round {round}, {endpoint}: {body}");
        }
    }
    assert_eq!(handshakes(&live).await, registered_handshakes, "no handshake for a new port");
    let mut forwarded = 0;
    for node in &live {
        forwarded += pool(node).await["cluster"]["forwarding"]["forwarded"].as_u64().unwrap();
    }
    assert!(forwarded > 0, "records reached nodes that did not hold their session");

    // SIGKILL the node holding the most registrations.
    let listed = clients(live[0]).await;
    let mut by_node: HashMap<u64, Vec<String>> = HashMap::new();
    for client in &listed {
        by_node.entry(client["node"].as_u64().unwrap()).or_default().push(client["endpoint"].as_str().unwrap().into());
    }
    let (victim, held) = by_node.iter().max_by_key(|(_, held)| held.len()).map(|(n, h)| (*n, h.clone())).unwrap();
    let victim_index = usize::try_from(victim).unwrap() - 1;
    let held_cid: Vec<String> = held.iter().filter(|e| e.starts_with("c-")).cloned().collect();
    let held_plain = held.len() - held_cid.len();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim_index).collect();
    let before_kill = {
        let survivors: Vec<&Server> = survivors.iter().map(|i| nodes[*i].as_ref().unwrap()).collect();
        handshakes(&survivors).await
    };
    let before_captured = nat.captured().len();
    nodes[victim_index].take().unwrap().sigkill();
    let killed = Instant::now();

    // Every CID device it held answers a read through a survivor, with no handshake: each
    // is read over and over from the kill on, all at once, until it answers.
    let survivor = nodes[survivors[0]].as_ref().unwrap();
    let reads = held_cid.iter().map(|endpoint| async move {
        loop {
            let (status, body) = read(survivor, endpoint).await;
            if status == 200 {
                return killed.elapsed();
            }
            assert!(killed.elapsed() < Duration::from_secs(150), "{endpoint} after the kill: {status} {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut takeover = futures::future::join_all(reads).await;
    // Devices without a CID on the dead node find their session gone (their Sends go
    // unanswered), handshake once with a survivor and keep their registration.
    let registration_ids: HashMap<String, Value> =
        listed.iter().map(|c| (c["endpoint"].as_str().unwrap().to_string(), c["registration_id"].clone())).collect();
    for endpoint in held.iter().filter(|e| e.starts_with("p-")) {
        loop {
            let (status, body) = read(survivor, endpoint).await;
            if status == 200 {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(150), "{endpoint} after the kill: {status} {body}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // No registration is lost, and none is made anew.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = clients(survivor).await;
        let online = listed.iter().filter(|c| c["online"].as_bool() == Some(true)).count();
        if listed.len() == fleet && online == fleet {
            for client in &listed {
                let endpoint = client["endpoint"].as_str().unwrap();
                assert_eq!(client["registration_id"], registration_ids[endpoint], "{endpoint} registered anew");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{} listed, {online} online of {fleet}", listed.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let survivor_nodes: Vec<&Server> = survivors.iter().map(|i| nodes[*i].as_ref().unwrap()).collect();
    let new_handshakes = handshakes(&survivor_nodes).await - before_kill;
    assert!(
        new_handshakes <= held_plain as u64,
        "{new_handshakes} handshakes after the kill; only the {held_plain} devices without a CID may handshake"
    );
    for endpoint in &endpoints {
        let (status, body) = read(survivor, endpoint).await;
        if status != 200 {
            let mut seen = String::new();
            for node in &survivor_nodes {
                let entry = clients(node).await.into_iter().find(|c| c["endpoint"] == endpoint.as_str());
                seen += &format!("\n{}: {entry:?}\n  {}", node.http, pool(node).await["cluster"]);
            }
            panic!(
                "{endpoint} after the takeover (victim {victim}, held {held:?}): {status} {body}{seen}\nnginx: {}",
                balancer.log()
            );
        }
    }
    let captured = nat.captured();
    let records = assert_unique_nonces(&captured);
    assert!(records > 1000, "{records} records checked");

    // The killed node comes back: it rejoins and holds nothing it lost.
    nodes[victim_index] = Some(setup.node(u8::try_from(victim).unwrap()));
    let back = nodes[victim_index].as_ref().unwrap();
    let cluster = pool(back).await["cluster"].clone();
    let me = cluster["nodes"].as_array().unwrap().iter().find(|n| n["node"].as_u64() == Some(victim)).unwrap().clone();
    assert_eq!((me["alive"].as_bool(), me["sessions"].as_u64()), (Some(true), Some(0)), "{cluster}");

    takeover.sort();
    let percentile = |p: f64| takeover[((takeover.len() as f64 - 1.0) * p).round() as usize].as_secs_f64();
    let report = format!(
        "cluster of 3 nodes behind nginx, {WITH_CID} CID + {WITHOUT_CID} plain tether devices: {} forwarded records \
         over 5 rounds of NAT rebinding with 0 new handshakes; SIGKILL of node {victim} ({} CID, {held_plain} plain \
         devices): CID devices answered again after p50 {:.1} s, p99 {:.1} s, max {:.1} s with 0 handshakes; \
         {new_handshakes} handshakes in all after the kill; {records} records checked ({} after the kill), no \
         sequence number used twice\n",
        forwarded,
        held_cid.len(),
        percentile(0.5),
        percentile(0.99),
        takeover.last().map_or(0.0, Duration::as_secs_f64),
        captured.len() - before_captured,
    );
    let _ = std::fs::create_dir_all("../../target/reports");
    let _ = std::fs::write("../../target/reports/cluster.txt", &report);
    print!("{report}");
    drop(nodes);
    drop(balancer);
    db.drop_database().await;
    let _ = std::fs::remove_dir_all(&dir);
}
