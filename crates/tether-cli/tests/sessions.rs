//! Established sessions outside OpenSSL, with the real binaries on 127.0.0.1:
//!
//! - a `tether device --cid` whose source port changes before every request (a NAT proxy
//!   moves it to a new port before every read) keeps one session and one handshake, and its
//!   registration follows it; a forged or replayed record from a new address moves nothing;
//! - `tether serve` killed with SIGKILL under 200 devices and started again serves every
//!   device over its old session: each device's next Update and a REST read succeed with no
//!   new handshake, and no record sequence number (AEAD nonce) is used twice; on the SQLite
//!   default and on PostgreSQL (`--store`, the server `TETHER_TEST_POSTGRES` names).

#[path = "../../tether/tests/support/postgres.rs"]
mod postgres;
#[path = "../../tether/tests/support/proxy.rs"]
mod proxy;
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxy::{assert_unique_nonces, Behaviour, Impairment, Proxy};
use support::{http, wait_registered, Fleet, Server, KEY};

fn data_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-sessions-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The newest upstream address the proxy used for client-to-server datagrams.
fn newest_upstream(proxy: &Proxy) -> SocketAddr {
    proxy.captured().iter().rev().find(|c| c.to_server).expect("the device has sent something").upstream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_connection_id_keeps_one_session_while_its_port_changes_before_every_request() {
    let data = data_dir("cid");
    let server = Server::start(&data);
    let behaviour = Behaviour { capture: true };
    let proxy = Proxy::start_with(server.coaps, Impairment::none(), behaviour).await;
    let mut device = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--endpoint", "urn:dev:0", "--psk-identity", "device-0", "--psk-key", KEY, "--cid"])
        .args(["--server", &format!("coaps://{}", proxy.addr()), "--duration", "300", "--retry-timer", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_registered(&server, 1, Duration::from_secs(30)).await;

    let mut addresses = HashSet::new();
    for i in 0..100 {
        proxy.rebind_all();
        let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
        assert_eq!(status, 200, "read {i}: {read}");
        assert_eq!(read["values"]["/3/0/0"].as_str(), Some("tether"), "read {i}: {read}");
        let (_, client) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
        let address: SocketAddr = client["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(address, newest_upstream(&proxy), "read {i}: the registration follows the device");
        addresses.insert(address);
    }
    assert!(addresses.len() >= 100, "a new port for every answer: {} addresses", addresses.len());
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["handshakes_total"].as_u64(), Some(1), "one handshake for 100 reads: {pool}");
    assert_eq!(pool["sessions"].as_u64(), Some(1), "{pool}");
    let migrations = pool["dtls"]["migrations"].as_u64().unwrap();
    assert!(migrations >= 100, "{pool}");

    // Records of the device, replayed and forged, from an address of the attacker's.
    let genuine: Vec<Vec<u8>> = proxy
        .captured()
        .iter()
        .filter(|c| c.to_server && c.datagram.first() == Some(&25))
        .map(|c| c.datagram.clone())
        .collect();
    assert!(genuine.len() >= 100, "the device's records carry the server's CID");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let last = genuine.last().unwrap().clone();
    attacker.send_to(&last, server.coaps).await.unwrap();
    let mut forged = last.clone();
    let end = forged.len() - 1;
    forged[end] ^= 0x55;
    attacker.send_to(&forged, server.coaps).await.unwrap();
    let mut later = last.clone();
    later[10] = later[10].wrapping_add(1); // a higher sequence number, same ciphertext
    attacker.send_to(&later, server.coaps).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, client) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    let address: SocketAddr = client["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(address, newest_upstream(&proxy), "nothing moved to {}", attacker.local_addr().unwrap());
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["dtls"]["migrations"].as_u64(), Some(migrations), "{pool}");
    let (status, _) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
    assert_eq!(status, 200, "the device is still reachable");

    let _ = device.kill();
    let _ = device.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_under_200_devices_costs_no_handshake_and_reuses_no_sequence_number() {
    sigkill_and_restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_on_postgres_costs_no_handshake_and_reuses_no_sequence_number() {
    let Some(db) = postgres::TestDatabase::create("serve_kill").await else { return };
    sigkill_and_restart(Some(&db.url)).await;
    db.drop_database().await;
}

/// The scenario on SQLite (`store` `None`) or on the PostgreSQL database at `store`.
async fn sigkill_and_restart(store: Option<&str>) {
    const DEVICES: usize = 200;
    let data = data_dir(if store.is_some() { "kill-postgres" } else { "kill" });
    let security = Fleet::security_file(&data, "s", DEVICES);
    let mut flags = vec!["--security", security.to_str().unwrap()];
    if let Some(url) = store {
        flags.extend(["--store", url]);
    }
    let security_flag = &flags[..];
    let server = Server::start_with(&data, security_flag);
    let coaps = server.coaps.to_string();
    let behaviour = Behaviour { capture: true };
    let proxy = Proxy::start_with(server.coaps, Impairment::none(), behaviour).await;
    // Updates every 5 to 10 s (lifetime 20 s, jittered).
    let _plain = Fleet::start(proxy.addr(), "s", DEVICES, &["--lifetime", "20", "--retry-timer", "1", "--jitter"]);
    wait_registered(&server, DEVICES, Duration::from_secs(60)).await;
    for i in (0..DEVICES).step_by(10) {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/s-{i}/3/0/0"), None).await;
        assert_eq!(status, 200, "s-{i}: {read}");
    }
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["handshakes_total"].as_u64(), Some(DEVICES as u64), "{pool}");
    let before = proxy.captured().len();
    // The session store holds keys: readable by the server's user only, WAL files included.
    let files = if store.is_some() { &[][..] } else { &["sessions.db", "sessions.db-wal", "sessions.db-shm"][..] };
    for file in files {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }

    server.sigkill();
    let killed = Instant::now();
    let server = Server::start_on(&coaps, &data, security_flag);
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["sessions"].as_u64(), Some(DEVICES as u64), "every session restored: {pool}");
    assert_eq!(pool["dtls"]["sessions_restored"].as_u64(), Some(DEVICES as u64), "{pool}");

    // Every device's next Update arrives over its old session and is answered.
    let updated_after = loop {
        let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
        let clients = clients.as_array().unwrap().clone();
        assert_eq!(clients.len(), DEVICES);
        let since_restart = killed.elapsed().as_secs_f64();
        let updated = clients.iter().filter(|c| c["updated_s_ago"].as_f64().unwrap() < since_restart).count();
        if updated == DEVICES {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(40), "{updated} of {DEVICES} updated since the restart");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for i in 0..DEVICES {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/s-{i}/3/0/0"), None).await;
        assert_eq!(status, 200, "s-{i}: {read}");
    }
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["handshakes_total"].as_u64(), Some(0), "no handshake after the restart: {pool}");
    assert_eq!(pool["dtls"]["handshakes_completed"].as_u64(), Some(0), "{pool}");
    assert_eq!(pool["dtls"]["hello_verify_requests_sent"].as_u64(), Some(0), "{pool}");
    assert_eq!(pool["sessions"].as_u64(), Some(DEVICES as u64), "{pool}");

    // No (direction, session) ever repeats a record sequence number, before or after.
    let captured = proxy.captured();
    assert!(captured.len() > before, "traffic after the restart");
    let records = assert_unique_nonces(&captured);
    assert!(records > 1000, "{records} records checked");
    let report = format!(
        "SIGKILL + restart under {DEVICES} tether devices ({}): {} sessions restored, every device updated {:.1} s \
         after the kill, {DEVICES}/{DEVICES} REST reads answered, 0 handshakes; {records} protected records \
         ({} datagrams, {} after the restart) checked: no sequence number used twice\n",
        if store.is_some() { "PostgreSQL" } else { "SQLite" },
        pool["sessions"],
        updated_after.as_secs_f64(),
        captured.len(),
        captured.len() - before
    );
    let _ = std::fs::create_dir_all("../../target/reports");
    let name = if store.is_some() { "sessions_restart_postgres.txt" } else { "sessions_restart.txt" };
    let _ = std::fs::write(format!("../../target/reports/{name}"), &report);
    print!("{report}");
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
