//! `tether serve` under 200,000 spoofed ClientHellos and 200,000 random datagrams from 1,000
//! loopback addresses, while 100 real devices (`tether device`) keep being read.

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::{http, wait_registered, Fleet, Server};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, Session};

const DEVICES: usize = 100;
const SOURCES: usize = 1000;
const HELLOS: usize = 200_000;
const RANDOM: usize = 200_000;

/// A real first ClientHello (no cookie), to vary per datagram.
fn client_hello() -> Vec<u8> {
    let context = DtlsContext::client(ClientConfig::psk("spoofed", PskKey::new(vec![1; 16]).unwrap())).unwrap();
    #[allow(clippy::disallowed_methods, reason = "a throwaway session's clock")]
    let now = std::time::Instant::now();
    Session::client(&context, now).unwrap().poll_transmit().unwrap().contents
}

/// Sends the flood from `SOURCES` addresses in 127.1.0.0/16; returns how long it took.
fn flood(target: SocketAddr, seed: u64) -> Duration {
    let sockets: Vec<UdpSocket> = (0..SOURCES)
        .map(|i| {
            UdpSocket::bind(SocketAddr::from((Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8), 0))).unwrap()
        })
        .collect();
    let hello = client_hello();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    for n in 0..HELLOS + RANDOM {
        let socket = &sockets[n % SOURCES];
        let datagram = if n % 2 == 0 {
            // Distinct ClientHellos: a new client random each time (bytes 27..59).
            let mut h = hello.clone();
            rng.fill(&mut h[27..59]);
            h
        } else {
            let len = rng.gen_range(1..1200);
            (0..len).map(|_| rng.gen()).collect()
        };
        let _ = socket.send_to(&datagram, target);
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_spoofed_and_random_datagrams_leaves_no_state_and_every_read_succeeds() {
    let data = std::env::temp_dir().join(format!("tether-flood-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let security = Fleet::security_file(&data, "f", DEVICES);
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let _fleet = Fleet::start(server.coaps, "f", DEVICES, &[]);
    wait_registered(&server, DEVICES, Duration::from_secs(60)).await;
    let rss_before = server.rss_kib();

    let target = server.coaps;
    let flooder = std::thread::spawn(move || flood(target, 7));
    // Every device is read, round after round, until the flood is over (and once more).
    let (mut reads, mut rounds) = (0, 0);
    loop {
        let flooding = !flooder.is_finished();
        for i in 0..DEVICES {
            let (status, read) = http(server.http, "GET", &format!("/api/clients/f-{i}/3/0/0"), None).await;
            assert_eq!(status, 200, "f-{i} during the flood: {read}");
            reads += 1;
        }
        rounds += 1;
        if !flooding {
            break;
        }
    }
    let took = flooder.join().unwrap();
    let rss_after = server.rss_kib();

    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["sessions"].as_u64(), Some(DEVICES as u64), "no session for a spoofed source: {pool}");
    assert_eq!(pool["handshakes_total"].as_u64(), Some(DEVICES as u64), "{pool}");
    let metrics = {
        let mut stream = tokio::net::TcpStream::connect(server.http).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    };
    let counter = |name: &str| {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    let report = format!(
        "tether serve under {HELLOS} spoofed ClientHellos + {RANDOM} random datagrams from {SOURCES} addresses \
         (sent in {:.1} s) while {DEVICES} devices were read: {reads} REST reads in {rounds} rounds, all answered; \
         sessions {DEVICES} (0 for spoofed sources); HelloVerifyRequests sent {}; datagrams received {}; \
         server RSS {rss_before} KiB -> {rss_after} KiB ({:+} KiB)\n",
        took.as_secs_f64(),
        counter("tether_dtls_hello_verify_requests_total").unwrap_or(f64::NAN),
        counter("tether_dtls_datagrams_received_total").unwrap_or(f64::NAN),
        rss_after as i64 - rss_before as i64,
    );
    print!("{report}");
    let _ = std::fs::create_dir_all("../../target/reports");
    let _ = std::fs::write("../../target/reports/flood_serve.txt", &report);
    // Bounded: no per-source state, so growth is allocator noise, not 400,000 of anything.
    assert!(rss_after < rss_before + 16 * 1024, "{report}");
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
