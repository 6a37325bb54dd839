//! The real binaries through the loopback impairment proxy: `tether device` devices reach
//! `tether serve` over a path that drops, duplicates, reorders and delays.

#[path = "../../tether/tests/support/proxy.rs"]
mod proxy;
mod support;

use std::time::Duration;

use proxy::{Impairment, Proxy};
use support::{http, wait_registered, Fleet, Server};

const DEVICES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_device_fleet_registers_and_is_read_through_ten_percent_loss() {
    let data = std::env::temp_dir().join(format!("tether-impaired-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let security = Fleet::security_file(&data, "p", DEVICES);
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let proxy = Proxy::start(server.coaps, Impairment::lossy(0.10, tether_sim::seed_from_env(11))).await;
    let _fleet = Fleet::start(proxy.addr(), "p", DEVICES, &["--retry-timer", "1", "--jitter"]);
    wait_registered(&server, DEVICES, Duration::from_secs(120)).await;

    // Every read completes, or fails naming a timeout (504 from the REST API).
    let mut reads = Vec::new();
    for i in 0..DEVICES {
        let http_addr = server.http;
        reads.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let (status, body) = http(http_addr, "GET", &format!("/api/clients/p-{i}/3/0/0"), None).await;
                match status {
                    200 => assert_eq!(body["values"]["/3/0/0"].as_str(), Some("tether"), "{body}"),
                    504 => assert!(body["error"].as_str().unwrap().contains("timed out"), "{body}"),
                    other => panic!("p-{i}: {other} {body}"),
                }
                statuses.push(status);
            }
            statuses
        }));
    }
    let mut answered = 0;
    for read in reads {
        answered += read.await.unwrap().iter().filter(|s| **s == 200).count();
    }
    assert!(answered >= DEVICES, "{answered} of {} reads answered", 2 * DEVICES);
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients.as_array().unwrap().len(), DEVICES, "no registration lost");
    let dropped = proxy.stats.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 0, "the proxy did drop datagrams");
    println!("{answered} of {} reads answered through 10 % loss; the proxy dropped {dropped}", 2 * DEVICES);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
