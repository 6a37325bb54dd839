//! `tether serve` killed or stopped while devices (tether's `Lwm2mDevice`, over UDP) use it.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{http, Fleet, Server, KEY};
use tether::{Lwm2mDevice, Lwm2mDeviceConfig};
use tether_coap::device::{ClientConfig as DeviceConfig, DeviceEvent, RetryTimers};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, SessionConfig};

fn start_device(name: String, server: SocketAddr) -> Lwm2mDevice {
    let session = SessionConfig::default().retransmit(Duration::from_millis(200), Duration::from_secs(2));
    let context =
        DtlsContext::client(ClientConfig::psk(name.clone(), PskKey::from_hex(KEY).unwrap()).session(session)).unwrap();
    let mut client = DeviceConfig::new(name, format!("coaps://{server}"));
    client.retry = RetryTimers { retry_timer: Duration::from_secs(30), ..RetryTimers::default() };
    Lwm2mDevice::start(Lwm2mDeviceConfig::new(client, server, context)).unwrap()
}

fn data_dir(name: &str) -> std::path::PathBuf {
    let data = std::env::temp_dir().join(format!("tether-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    data
}

async fn listed(server: &Server) -> HashSet<String> {
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap().to_string()).collect()
}

/// SIGKILL while 300 devices are registering: every registration a device saw
/// acknowledged (2.01) is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_registration() {
    const DEVICES: usize = 300;
    let data = data_dir("sigkill-load");
    let security = Fleet::security_file(&data, "s", DEVICES);
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut devices = Vec::new();
    let start = |i: usize| {
        let device = start_device(format!("s-{i}"), server.coaps);
        let mut events = device.events();
        let (acknowledged, name) = (Arc::clone(&acknowledged), device.endpoint().to_string());
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if matches!(event, DeviceEvent::Registered { .. }) {
                    acknowledged.lock().unwrap().insert(name.clone());
                }
            }
        });
        device
    };
    // Kill it mid-stream: once some registrations are acknowledged, and just after the last
    // third of the fleet started (on a fast machine the first two thirds may all be done).
    devices.extend((0..DEVICES * 2 / 3).map(start));
    loop {
        let n = acknowledged.lock().unwrap().len();
        if n >= DEVICES / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    devices.extend((DEVICES * 2 / 3..DEVICES).map(start));
    server.sigkill();
    let acknowledged_at_kill: HashSet<String> = acknowledged.lock().unwrap().clone();
    assert!(acknowledged_at_kill.len() < DEVICES, "the kill came while registrations were still in flight");

    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let restored = listed(&server).await;
    let missing: Vec<&String> = acknowledged_at_kill.iter().filter(|e| !restored.contains(*e)).collect();
    println!(
        "SIGKILL with {} of {DEVICES} registrations acknowledged: {} restored, {} missing",
        acknowledged_at_kill.len(),
        restored.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    drop(devices);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

/// SIGTERM: every device hears close_notify at once, the process exits 0, and the store is
/// complete when the server starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_close_notify_to_every_device_flushes_the_store_and_exits_0() {
    const DEVICES: usize = 20;
    let data = data_dir("sigterm");
    let security = Fleet::security_file(&data, "t", DEVICES);
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let devices: Vec<Lwm2mDevice> = (0..DEVICES).map(|i| start_device(format!("t-{i}"), server.coaps)).collect();
    for device in &devices {
        tokio::time::timeout(Duration::from_secs(20), device.registered()).await.unwrap().unwrap();
    }
    let mut events: Vec<_> = devices.iter().map(Lwm2mDevice::events).collect();

    let exit = server.sigterm();
    assert!(exit.success(), "{exit:?}");
    // The devices were silent: only the server's close_notify can tell them this soon.
    for (i, events) in events.iter_mut().enumerate() {
        let lost = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if events.recv().await.unwrap() == DeviceEvent::ConnectionLost {
                    return;
                }
            }
        })
        .await;
        assert!(lost.is_ok(), "t-{i} was not told");
    }
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    assert_eq!(listed(&server).await.len(), DEVICES, "every registration was on disk");
    drop(devices);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
