//! The LwM2M server and devices end to end over real UDP through the loopback impairment
//! proxy: loss, duplication, reordering and delay in both directions.

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy::{Impairment, Proxy};
use support::*;
use tether::lwm2m::{Lwm2mError, Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, Lwm2mDevice, Lwm2mDeviceConfig, Socket};
use tether_coap::coap_lite::ResponseType;
use tether_coap::device::{ClientConfig as DeviceClientConfig, DeviceEvent, RetryTimers};
use tether_coap::message::{CoapConfig, RequestFailure};
use tether_proto::dtls::{ClientConfig, DtlsContext, ServerConfig, Session, SessionConfig, StaticPskStore};
use tether_proto::pool::PoolConfig;

/// CoAP timers for a lossy loopback: 200 ms first timeout, 4 retransmissions.
fn coap() -> CoapConfig {
    CoapConfig {
        ack_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_secs(15),
        ..CoapConfig::default()
    }
}

fn dtls_session() -> SessionConfig {
    SessionConfig::default()
        .retransmit(Duration::from_millis(100), Duration::from_millis(1600))
        .handshake_timeout(Duration::from_secs(20))
}

async fn server(n: usize) -> Lwm2mServer {
    let mut store = StaticPskStore::new();
    let mut authorizer = HashMap::new();
    for i in 0..n {
        store.insert(format!("dev-{i}"), key());
        authorizer.insert(format!("psk:dev-{i}"), format!("dev-{i}"));
    }
    let context = DtlsContext::server(ServerConfig::psk(store).session(dtls_session())).unwrap();
    let socket = Socket::bind_udp("127.0.0.1:0".parse().unwrap(), Some(tether::SERVER_RECV_BUFFER)).await.unwrap();
    let dtls = DtlsServer::serve(socket, context, server_config(PoolConfig::default())).unwrap();
    let config = Lwm2mServerConfig { coap: coap(), seed: 3, ..Lwm2mServerConfig::default() };
    Lwm2mServer::start(Arc::new(dtls), Arc::new(authorizer), None, config).await.unwrap()
}

fn device(i: usize, at: SocketAddr) -> Lwm2mDevice {
    let identity = format!("dev-{i}");
    let context = DtlsContext::client(ClientConfig::psk(identity.clone(), key()).session(dtls_session())).unwrap();
    let mut client = DeviceClientConfig::new(identity, format!("coaps://{at}"));
    client.coap = coap();
    client.seed = 1000 + i as u64;
    client.jitter = tether_proto::resilience::Jitter::Full;
    client.retry = RetryTimers {
        retry_count: 6,
        retry_timer: Duration::from_millis(500),
        sequence_delay: Duration::from_secs(1),
        sequence_retry_count: 3,
    };
    Lwm2mDevice::start(Lwm2mDeviceConfig::new(client, at, context)).unwrap()
}

struct Outcome {
    reads_ok: usize,
    reads_timed_out: usize,
    executes_ok: usize,
    executes_timed_out: usize,
    report: String,
}

/// 100 devices register through the proxy; then each is read twice and executed once.
async fn lossy_fleet(loss: f64, seed: u64) -> Outcome {
    const DEVICES: usize = 100;
    let server = server(DEVICES).await;
    let proxy = Proxy::start(server.dtls().local_addr(), Impairment::lossy(loss, seed)).await;
    let devices: Vec<Lwm2mDevice> = (0..DEVICES).map(|i| device(i, proxy.addr())).collect();
    let started = Instant::now();
    for device in &devices {
        let location = tokio::time::timeout(Duration::from_secs(120), device.registered()).await;
        assert!(matches!(location, Ok(Some(_))), "{} did not register at {loss} loss", device.endpoint());
    }
    let registered_in = started.elapsed();

    // Reads and an Execute per device, all at once; each completes or names a timeout.
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let endpoint = format!("dev-{i}");
            let mut results = Vec::new();
            for _ in 0..2 {
                results.push(("read", server.read(&endpoint, "/3/0/0").await.map(|r| r.code)));
            }
            results.push(("execute", server.execute(&endpoint, "/3/0/12", "").await.map(|r| r.code)));
            results
        }));
    }
    let mut outcome =
        Outcome { reads_ok: 0, reads_timed_out: 0, executes_ok: 0, executes_timed_out: 0, report: String::new() };
    let mut executes_acknowledged = [false; DEVICES];
    for (i, task) in tasks.into_iter().enumerate() {
        for (kind, result) in task.await.unwrap() {
            match (kind, result) {
                ("read", Ok(ResponseType::Content)) => outcome.reads_ok += 1,
                ("execute", Ok(ResponseType::Changed)) => {
                    outcome.executes_ok += 1;
                    executes_acknowledged[i] = true;
                }
                ("read", Err(Lwm2mError::NoAnswer(RequestFailure::Timeout))) => outcome.reads_timed_out += 1,
                ("execute", Err(Lwm2mError::NoAnswer(RequestFailure::Timeout))) => outcome.executes_timed_out += 1,
                (kind, other) => panic!("dev-{i}: {kind} neither completed nor timed out: {other:?}"),
            }
        }
    }
    // No Execute ran twice, however often the proxy duplicated it or CoAP retransmitted it;
    // every acknowledged one ran once.
    for (i, device) in devices.iter().enumerate() {
        let executions = device.status().stats.executions;
        assert!(executions <= 1, "dev-{i} ran its Execute {executions} times");
        if executes_acknowledged[i] {
            assert_eq!(executions, 1, "dev-{i}: acknowledged but not run");
        }
    }
    // No registration lost.
    assert_eq!(server.registrations().await.len(), DEVICES);
    assert!(devices.iter().all(|d| !d.status().gave_up));
    let stats = &proxy.stats;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    outcome.report = format!(
        "{:>3.0} % loss, 5 % duplication, 10 % reordering, both ways: {DEVICES} devices registered in {:.1} s; \
         reads {} ok / {} timed out; executes {} ok / {} timed out, none run twice; proxy saw {} datagrams, dropped {}, \
         duplicated {}, reordered {}\n",
        loss * 100.0,
        registered_in.as_secs_f64(),
        outcome.reads_ok,
        outcome.reads_timed_out,
        outcome.executes_ok,
        outcome.executes_timed_out,
        stats.received.load(relaxed),
        stats.dropped.load(relaxed),
        stats.duplicated.load(relaxed),
        stats.reordered.load(relaxed),
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_through_10_and_30_percent_loss_with_duplication_and_reordering() {
    let seed = tether_sim::seed_from_env(20_261_122);
    println!("seed {seed} (TETHER_SIM_SEED replays the proxy's decisions)");
    let mut report = String::new();
    for loss in [0.10, 0.30] {
        let outcome = lossy_fleet(loss, seed).await;
        print!("{}", outcome.report);
        report.push_str(&outcome.report);
        assert_eq!(outcome.reads_ok + outcome.reads_timed_out, 200);
        assert!(outcome.reads_ok > 0 && outcome.executes_ok > 0);
    }
    let _ = std::fs::create_dir_all("../../target/reports");
    let _ = std::fs::write("../../target/reports/impaired_fleet.txt", report);
}

/// A ClientHello as a real client sends it first (no cookie), and one with a made-up cookie.
fn forged_client_hellos() -> Vec<Vec<u8>> {
    let context = DtlsContext::client(ClientConfig::psk("dev-0", key())).unwrap();
    #[allow(clippy::disallowed_methods, reason = "a throwaway session's clock")]
    let now = std::time::Instant::now();
    let mut session = Session::client(&context, now).unwrap();
    let hello = session.poll_transmit().unwrap().contents;
    // Record header 13 bytes, handshake header 12, version 2, random 32, session id.
    let mut with_cookie = hello.clone();
    let sid = usize::from(with_cookie[13 + 12 + 34]);
    let cookie_at = 13 + 12 + 35 + sid;
    if with_cookie.get(cookie_at) == Some(&0) {
        with_cookie[cookie_at] = 0; // keep the length: a cookie of the wrong bytes needs room
        let forged = [0x5a; 16];
        with_cookie.splice(cookie_at..=cookie_at, std::iter::once(16u8).chain(forged));
        // Fix the three lengths: record, handshake, fragment.
        let body = (with_cookie.len() - 13) as u16;
        with_cookie[11..13].copy_from_slice(&body.to_be_bytes());
        let hs = (body as u32 - 12).to_be_bytes();
        with_cookie[14..17].copy_from_slice(&hs[1..]);
        with_cookie[22..25].copy_from_slice(&hs[1..]);
    }
    vec![hello, with_cookie]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_device_gets_back_in_and_forged_client_hellos_from_its_address_change_nothing() {
    let server = server(1).await;
    let proxy = Proxy::start(server.dtls().local_addr(), Impairment::lossy(0.0, 1)).await;
    let device = device(0, proxy.addr());
    let first = tokio::time::timeout(Duration::from_secs(20), device.registered()).await.unwrap().unwrap();
    let seen_as = proxy.upstream_addr_of(device.local_addr()).unwrap();
    assert_eq!(server.registrations().await[0].peer, seen_as);

    // Reboot: the device re-handshakes from the same address and port and registers anew.
    let mut events = device.events();
    assert_eq!(server.execute("dev-0", "/3/0/4", "").await.unwrap().code, ResponseType::Changed);
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.unwrap().unwrap();
        if let DeviceEvent::Registered { location } = event {
            assert_ne!(location, first);
            break;
        }
    }
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 2);
    assert_eq!(stats.endpoint.sessions_replaced, 1, "the new handshake replaced the old session (RFC 6347 §4.2.8)");

    // Forged ClientHellos from the device's address: answered statelessly, nothing replaced.
    for forged in forged_client_hellos() {
        for _ in 0..10 {
            proxy.inject_upstream(device.local_addr(), &forged).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server.dtls().stats().await.unwrap();
    assert_eq!(after.endpoint.sessions_created, stats.endpoint.sessions_created, "no state for a forged ClientHello");
    assert_eq!(after.pool.sessions, 1);
    // Its next Update succeeds and the server still reads it over the same session.
    assert_eq!(server.execute("dev-0", "/1/0/8", "").await.unwrap().code, ResponseType::Changed);
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.unwrap().unwrap();
        if event == DeviceEvent::Updated {
            break;
        }
    }
    assert_eq!(server.read("dev-0", "/3/0/0").await.unwrap().code, ResponseType::Content);
    assert_eq!(server.dtls().stats().await.unwrap().endpoint.handshakes_completed, 2);
}
