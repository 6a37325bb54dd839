//! `Lwm2mDevice` against the real `Lwm2mServer`: over UDP on 127.0.0.1, and over the
//! in-memory network on paused time for the schedules that take minutes.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::lwm2m::{build, Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, Lwm2mDevice, Lwm2mDeviceConfig, MemoryNetwork, Socket};
use tether_coap::coap_lite::{CoapOption, RequestType, ResponseType};
use tether_coap::content::{self, format, Path, Value};
use tether_coap::device::{ClientConfig as DeviceClientConfig, DeviceEvent, RetryTimers};
use tether_coap::message::CoapConfig;
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, ServerConfig, StaticPskStore};
use tether_proto::pool::PoolConfig;
use tether_proto::resilience::Jitter;

/// A PSK store and authorizer for devices `dev-0`…`dev-{n-1}` (identity = endpoint name).
fn fleet_credentials(n: usize) -> (StaticPskStore, HashMap<String, String>) {
    let mut store = StaticPskStore::new();
    let mut authorizer = HashMap::new();
    for i in 0..n {
        store.insert(format!("dev-{i}"), key());
        authorizer.insert(format!("psk:dev-{i}"), format!("dev-{i}"));
    }
    (store, authorizer)
}

async fn start_server(socket: Socket, n: usize) -> Lwm2mServer {
    let (store, authorizer) = fleet_credentials(n);
    let context = DtlsContext::server(ServerConfig::psk(store).session(session())).unwrap();
    let dtls = DtlsServer::serve(socket, context, server_config(PoolConfig::default())).unwrap();
    let config = Lwm2mServerConfig { coap: CoapConfig::default(), seed: 1, ..Lwm2mServerConfig::default() };
    Lwm2mServer::start(Arc::new(dtls), Arc::new(authorizer), None, config).await.unwrap()
}

fn device_config(i: usize, server: SocketAddr) -> Lwm2mDeviceConfig {
    let identity = format!("dev-{i}");
    let context = DtlsContext::client(ClientConfig::psk(identity.clone(), key()).session(session())).unwrap();
    let mut client = DeviceClientConfig::new(identity, format!("coaps://{server}"));
    client.seed = i as u64;
    Lwm2mDeviceConfig::new(client, server, context)
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future).await.unwrap_or_else(|_| panic!("{what} did not happen"))
}

#[tokio::test]
async fn the_device_answers_every_format_and_the_servers_decoders_agree() {
    let server = start_server(Socket::bind_udp("127.0.0.1:0".parse().unwrap(), None).await.unwrap(), 1).await;
    let device = Lwm2mDevice::start(device_config(0, server.dtls().local_addr())).unwrap();
    let location = within("registration", device.registered()).await.expect("registered");
    assert!(location.starts_with("/rd/"));

    // The server's read negotiates the registered format (SenML CBOR) and decodes it.
    let manufacturer = server.read("dev-0", "/3/0/0").await.unwrap();
    assert_eq!(manufacturer.content_format, Some(format::SENML_CBOR));
    let path = Path::parse("/3/0/0").unwrap();
    let entries = content::decode(format::SENML_CBOR, &path, &manufacturer.payload).unwrap();
    assert_eq!(entries[0].value, Value::String("tether".into()));

    // The whole Device object in each multi-value format decodes to the same fixed values.
    let base = Path::parse("/3/0").unwrap();
    let mut fixed = Vec::new();
    for cf in [format::TLV, format::SENML_JSON, format::SENML_CBOR] {
        let mut request = build(RequestType::Get, "/3/0", None, Vec::new());
        request.add_option(CoapOption::Accept, tether_coap::packet::encode_uint(u32::from(cf)));
        let answer = server.request("dev-0", request).await.unwrap();
        assert_eq!((answer.code, answer.content_format), (ResponseType::Content, Some(cf)));
        let entries = content::decode(cf, &base, &answer.payload).unwrap();
        let values: Vec<_> =
            entries.into_iter().filter(|e| matches!(e.path.resource, Some(0..=3 | 17..=19 | 21))).collect();
        assert_eq!(values.len(), 8);
        fixed.push(values);
    }
    assert_eq!(fixed[0], fixed[1]);
    assert_eq!(fixed[1], fixed[2]);
    // And text for one resource.
    let mut request = build(RequestType::Get, "/3/0/2", None, Vec::new());
    request.add_option(CoapOption::Accept, Vec::new());
    let serial = server.request("dev-0", request).await.unwrap();
    assert_eq!(serial.content_format, Some(format::TEXT));
    assert!(String::from_utf8(serial.payload).unwrap().starts_with("TS-"));

    // Discover, and an observation of the clock that advances.
    let links = server.discover("dev-0", "/3/0").await.unwrap();
    assert!(String::from_utf8(links.payload).unwrap().contains("</3/0/13>"));
    let mut observation = server.observe("dev-0", "/3/0/13").await.unwrap();
    let first = observation.first.payload.clone();
    let notification = within("a notification", observation.notifications.recv()).await.unwrap();
    assert_ne!(notification.payload, first, "the clock moved on");

    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 1, "one handshake for everything");
}

#[tokio::test]
async fn reboot_re_handshakes_from_the_same_port_and_registers_anew() {
    let server = start_server(Socket::bind_udp("127.0.0.1:0".parse().unwrap(), None).await.unwrap(), 1).await;
    let device = Lwm2mDevice::start(device_config(0, server.dtls().local_addr())).unwrap();
    let first = within("registration", device.registered()).await.unwrap();
    let mut events = device.events();
    let answer = server.execute("dev-0", "/3/0/4", "").await.unwrap();
    assert_eq!(answer.code, ResponseType::Changed);
    loop {
        if let DeviceEvent::Registered { location } = within("re-registration", events.recv()).await.unwrap() {
            assert_ne!(location, first);
            break;
        }
    }
    let registration = server.registrations().await.into_iter().find(|r| r.endpoint == "dev-0").unwrap();
    assert_eq!(registration.peer, device.local_addr(), "the same port");
    let read = server.read("dev-0", "/3/0/1").await.unwrap();
    assert_eq!(read.code, ResponseType::Content);
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 2);
    assert_eq!(stats.pool.sessions, 1, "the new session replaced the old one");
}

/// Paused time, in-memory network: the device stays silent past a NAT timeout, then
/// re-handshakes from its port before its Update, and the server carries on with it.
#[tokio::test(start_paused = true)]
async fn after_nat_silence_the_device_re_handshakes_before_updating() {
    let net = MemoryNetwork::new();
    let at = addr(1, 5684);
    let server = start_server(net.bind(at).unwrap(), 1).await;
    let mut config = device_config(0, at);
    config.memory = Some(net.clone());
    config.client.lifetime = Duration::from_secs(120);
    config.client.rehandshake_after_idle = Some(Duration::from_secs(40));
    let device = Lwm2mDevice::start(config).unwrap();
    within("registration", device.registered()).await.unwrap();
    let mut events = device.events();
    let start = tokio::time::Instant::now();
    let mut seen = Vec::new();
    while !seen.contains(&"Updated") {
        let event = events.recv().await.unwrap();
        seen.push(match event {
            DeviceEvent::Rehandshaking { .. } => "Rehandshaking",
            DeviceEvent::Updated => "Updated",
            _ => "other",
        });
    }
    assert_eq!(seen, ["Rehandshaking", "Updated"]);
    // Lifetime 120 s: the Update is due at 60 s; the silence then is over 40 s.
    assert_eq!(start.elapsed().as_secs(), 60);
    let stats = server.dtls().stats().await.unwrap();
    assert_eq!(stats.endpoint.handshakes_completed, 2);
    let read = server.read("dev-0", "/3/0/0").await.unwrap();
    assert_eq!(read.code, ResponseType::Content, "the server reaches the device over its new session");
}

struct Outage {
    busiest_second: usize,
    reregistered: usize,
    last_after_restart: Duration,
}

/// 1,000 devices on paused time. The server goes away, comes back 10 s later with no
/// registrations, and the fleet finds it again through the Server object's retry timers.
/// Killed: its address goes dark without a word, and devices notice through their next
/// Update's CoAP timeout. Shut down: every device gets a close_notify at the same instant
/// (the thundering herd that jitter exists for).
async fn fleet_outage(jitter: Jitter, killed: bool) -> Outage {
    const DEVICES: usize = 1000;
    let net = MemoryNetwork::new();
    let at = addr(1, 5684);
    let server = start_server(net.bind(at).unwrap(), DEVICES).await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let mut config = device_config(i, at);
        config.memory = Some(net.clone());
        config.client.jitter = jitter;
        config.client.retry = RetryTimers { retry_timer: Duration::from_secs(10), ..RetryTimers::default() };
        devices.push(Lwm2mDevice::start(config).unwrap());
    }
    for device in &devices {
        within("registration", device.registered()).await.unwrap();
    }
    assert_eq!(server.registrations().await.len(), DEVICES);

    // Kill: the address goes dark (nothing more in or out, no close_notify) and the server's
    // state is gone.
    let mut watchers = Vec::new();
    for device in &devices {
        let mut events = device.events();
        watchers.push(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(DeviceEvent::Registered { .. }) => return tokio::time::Instant::now(),
                    Ok(_) => {}
                    Err(err) => panic!("events lost: {err}"),
                }
            }
        }));
    }
    if killed {
        net.set_down(at, true);
    } else {
        server.dtls().shutdown().await;
    }
    drop(server);
    tokio::time::sleep(Duration::from_secs(10)).await;
    net.set_down(at, false);
    let restarted = tokio::time::Instant::now();
    let server = loop {
        match net.bind(at) {
            Ok(socket) => break start_server(socket, DEVICES).await,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut times = Vec::new();
    for watcher in watchers {
        times.push(tokio::time::timeout(Duration::from_secs(3600), watcher).await.expect("re-registered").unwrap());
    }
    assert_eq!(server.registrations().await.len(), DEVICES);
    let mut per_second: HashMap<u64, usize> = HashMap::new();
    for t in &times {
        *per_second.entry(t.duration_since(restarted).as_secs()).or_default() += 1;
    }
    Outage {
        busiest_second: per_second.values().copied().max().unwrap_or(0),
        reregistered: times.len(),
        last_after_restart: times.iter().map(|t| t.duration_since(restarted)).max().unwrap_or_default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_fleet_of_1000_re_registers_after_a_server_crash_or_restart_spread_by_jitter() {
    let mut report = String::new();
    for (killed, how) in [(true, "killed (no close_notify)"), (false, "shut down (close_notify to all)")] {
        let jittered = fleet_outage(Jitter::Full, killed).await;
        let lockstep = fleet_outage(Jitter::None, killed).await;
        let line = format!(
            "server {how} under 1,000 devices, back after 10 s: all {} re-registered, the last {:.0} s after the \
             restart; busiest second {} devices ({:.1} %) with full jitter, {} ({:.1} %) without\n",
            jittered.reregistered,
            jittered.last_after_restart.as_secs_f64(),
            jittered.busiest_second,
            jittered.busiest_second as f64 / 10.0,
            lockstep.busiest_second,
            lockstep.busiest_second as f64 / 10.0,
        );
        print!("{line}");
        report.push_str(&line);
        assert_eq!(jittered.reregistered, 1000);
        assert!(jittered.busiest_second < 250, "{line}");
        // Within the schedule. Killed: the Update is due 207 s after registering, times out
        // within MAX_TRANSMIT_WAIT (93 s), then the first retry waits at most the 10 s retry
        // timer. Shut down: attempts are refused at once while the server is down (port
        // unreachable) and spaced by the doubling 10 s retry timer.
        let bound = if killed { 207 + 93 + 10 } else { 10 + 10 + 20 + 40 + 80 };
        assert!(jittered.last_after_restart <= Duration::from_secs(bound), "{line}");
    }
    let _ = std::fs::create_dir_all("../../target/reports");
    let _ = std::fs::write("../../target/reports/fleet_restart.txt", report);
}

#[tokio::test]
async fn an_unreachable_server_is_retried_per_the_server_object_then_given_up() {
    // A port with nothing behind it: every handshake is refused at once (ICMP).
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut config = device_config(0, closed);
    config.client.retry = RetryTimers {
        retry_count: 3,
        retry_timer: Duration::from_millis(50),
        sequence_delay: Duration::from_millis(200),
        sequence_retry_count: 2,
    };
    let device = Lwm2mDevice::start(config).unwrap();
    let mut events = device.events();
    let mut delays = Vec::new();
    loop {
        match within("an event", events.recv()).await.unwrap() {
            DeviceEvent::AttemptFailed { retry_in, reason, .. } => {
                assert!(reason.contains("port unreachable"), "{reason}");
                delays.push(retry_in.as_millis());
            }
            DeviceEvent::GaveUp { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delays, [50, 100, 200, 50, 100, 0]);
    assert!(device.registered().await.is_none());
    assert!(device.status().gave_up);
}

#[tokio::test]
async fn a_wrong_key_is_an_attempt_failure_not_a_hang() {
    let server = start_server(Socket::bind_udp("127.0.0.1:0".parse().unwrap(), None).await.unwrap(), 1).await;
    let mut config = device_config(0, server.dtls().local_addr());
    config.context =
        DtlsContext::client(ClientConfig::psk("dev-0", PskKey::new(vec![9; 16]).unwrap()).session(session())).unwrap();
    config.client.retry =
        RetryTimers { retry_count: 2, retry_timer: Duration::from_millis(10), ..RetryTimers::default() };
    config.client.retry.sequence_retry_count = 1;
    let device = Lwm2mDevice::start(config).unwrap();
    assert!(within("giving up", device.registered()).await.is_none());
    assert!(server.registrations().await.is_empty());
}
