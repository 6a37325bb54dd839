//! Nobody unauthenticated locks devices out, and no identity fills the server: the real
//! `tether serve` under 3,300 cookie-verified but silent ClientHellos from one address and
//! 1,200 more from 30 networks, and under one PSK identity opening session after session
//! without registering.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{data_dir, device, http, wait_for, Scripted, Server, KEY};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, Session};

/// `count` clients at `from` that pass the cookie exchange and then say nothing more: each
/// holds a handshake in the server until it gives up on it. Returns them (kept open).
fn stalled_handshakes(target: SocketAddr, from: IpAddr, count: usize) -> Vec<(UdpSocket, Session)> {
    let context = DtlsContext::client(ClientConfig::psk("device-4", PskKey::from_hex(KEY).unwrap())).unwrap();
    #[allow(clippy::disallowed_methods, reason = "throwaway client sessions' clock")]
    let now = std::time::Instant::now();
    let mut buf = vec![0u8; 2048];
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut client = Session::client(&context, now).unwrap();
        socket.send_to(&client.poll_transmit().unwrap().contents, target).unwrap();
        let n = socket.recv(&mut buf).expect("a HelloVerifyRequest");
        client.handle_datagram(now, &buf[..n]);
        socket.send_to(&client.poll_transmit().unwrap().contents, target).unwrap();
        held.push((socket, client));
    }
    held
}

async fn pool(server: &Server) -> Value {
    http(server.http, "GET", "/api/pool", None).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_handshakes_lock_no_device_out_and_leave_no_memory_behind() {
    let data = data_dir("flood-silent");
    let server = Server::start(&data);
    // A device that will reboot during the flood, on an address of its own.
    let mut before = device(&server, 1, &["--bind", "127.0.3.1", "--duration", "120"]);
    let first = wait_for(&server, "/api/clients/urn:dev:1", Duration::from_secs(15), |s, _| s == 200).await;
    let address = first["address"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_kib();

    // 3 × 1,100 cookie-verified ClientHellos from one address, never followed up: it holds
    // its share only.
    let target = server.coaps;
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let one_address = tokio::task::spawn_blocking(move || {
        (0..3).flat_map(|_| stalled_handshakes(target, attacker, 1_100)).collect::<Vec<_>>()
    });
    let mut held = one_address.await.unwrap();
    let stats = pool(&server).await;
    let from_one = stats["handshakes_in_progress"].as_u64().unwrap();
    let refused = stats["dtls"]["dropped_by_reason"]["source_limit"].as_u64().unwrap();
    assert!(from_one <= 32, "one address holds its share only: {from_one}");
    assert!(refused >= 3_300 - 3 * 32, "the rest were refused: {stats}");
    // Then 40 from each of 30 networks: the slots unknown sources may take fill up, and from
    // then on each new ClientHello takes the place of the oldest silent one.
    let many = tokio::task::spawn_blocking(move || {
        (10..40u8)
            .flat_map(|net| stalled_handshakes(target, IpAddr::V4(Ipv4Addr::new(127, 0, net, 2)), 40))
            .collect::<Vec<_>>()
    });
    held.extend(many.await.unwrap());
    let stats = pool(&server).await;
    let in_progress = stats["handshakes_in_progress"].as_u64().unwrap();
    let rss_flood = server.rss_kib();
    assert!(in_progress <= 1_000, "{stats}");
    assert!(stats["dtls"]["stalled_handshakes_closed"].as_u64().unwrap() > 0, "silent ones yielded: {stats}");

    // While the flood's handshakes are held: a new device registers, and the rebooted
    // device, from its old address and port, gets a new handshake and registration.
    let newcomer = device(&server, 0, &["--bind", "127.0.2.1", "--duration", "120"]);
    wait_for(&server, "/api/clients/urn:dev:0", Duration::from_secs(15), |s, _| s == 200).await;
    before.kill().unwrap();
    before.wait().unwrap();
    let rebooted = device(&server, 1, &["--bind", &address, "--duration", "120"]);
    let old_id = first["registration_id"].clone();
    wait_for(&server, "/api/clients/urn:dev:1", Duration::from_secs(15), |s, body| {
        s == 200 && body["registration_id"] != old_id
    })
    .await;

    // The flood's handshakes end at their short deadline, and their memory goes back.
    let stats =
        wait_for(&server, "/api/pool", Duration::from_secs(30), |_, body| body["handshakes_in_progress"] == 0).await;
    assert!(stats["dtls"]["handshakes_failed"].as_u64().unwrap() >= in_progress, "{stats}");
    // The server hands memory freed by a burst of handshakes back within seconds (it looks
    // every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_after = server.rss_kib();
    eprintln!(
        "silent handshakes: 3,300 from one address ({from_one} held, {refused} refused: source_limit), then \
         1,200 from 30 networks ({in_progress} held); server RSS {rss_before} KiB before, {rss_flood} KiB \
         during, {rss_after} KiB after"
    );
    assert!(
        (rss_after as f64) <= rss_before as f64 * 1.10,
        "RSS {rss_after} KiB after the flood, {rss_before} KiB before"
    );

    for mut child in [newcomer, rebooted] {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_fill_the_server_and_unused_sessions_go_first() {
    let data = data_dir("flood-identity");
    // A small server: 24 sessions. Hostile identities h-0 … h-29 and the devices' own.
    let mut security = String::new();
    for i in 0..30 {
        security.push_str(&format!("[[psk]]\nidentity = \"h-{i}\"\nkey = \"{KEY}\"\nendpoint = \"urn:h:{i}\"\n"));
    }
    std::fs::write(data.join("hostile.toml"), security).unwrap();
    std::fs::write(data.join("tether.toml"), "[limits]\nmax_sessions = 24\n").unwrap();
    let config = data.join("tether.toml");
    let hostile = data.join("hostile.toml");
    let server = Server::start_with(
        &data.join("server"),
        &["--config", config.to_str().unwrap(), "--security", hostile.to_str().unwrap()],
    );
    let local = SocketAddr::from(([127, 0, 4, 1], 0));

    // One identity opens 30 sessions and registers none: it holds 4 (its newest).
    let mut one = Vec::new();
    for _ in 0..30 {
        one.push(Scripted::connect(server.coaps, local, "h-0").await);
    }
    // (A session reaches the pool once it is stored.)
    let stats = wait_for(&server, "/api/pool", Duration::from_secs(5), |_, stats| stats["sessions"] == 4).await;
    assert_eq!(stats["sessions"], 4, "one identity's share: {stats}");
    let closed = one.iter().filter(|s| s.session.is_closed()).count();
    assert!(closed >= 25, "its older sessions were told to go (close_notify): {closed}");

    // Many identities fill the table without registering; a real device still gets in, and
    // the oldest unused session makes room for it.
    let mut many = Vec::new();
    for i in 1..30 {
        many.push(Scripted::connect(server.coaps, local, &format!("h-{i}")).await);
    }
    wait_for(&server, "/api/pool", Duration::from_secs(5), |_, stats| stats["sessions"] == 24).await;
    let mut dev = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{}", server.coaps), "--duration", "60"])
        .args(["--psk-identity", "device-0", "--endpoint", "urn:dev:0", "--psk-key", KEY])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&server, "/api/clients/urn:dev:0", Duration::from_secs(15), |s, _| s == 200).await;
    let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
    assert_eq!(status, 200, "{read}");
    let stats = pool(&server).await;
    assert!(stats["dtls"]["sessions_evicted"].as_u64().unwrap() >= 27, "{stats}");
    assert_eq!(stats["dtls"]["dropped_by_reason"]["session_limit"], 0, "nobody was turned away: {stats}");

    let _ = dev.kill();
    let _ = dev.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
