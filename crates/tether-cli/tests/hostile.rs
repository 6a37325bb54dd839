//! A hostile or unlucky device against the real `tether serve` over loopback: values out of
//! every range, a panic in a server task, a device that inherits another's address, a Send
//! over a session restored after a crash.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{coap_answer, data_dir, device, device_0, http, http_as, wait_for, wait_registered, Scripted, Server};
use tether_coap::coap_lite::{CoapOption, RequestType};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_beyond_the_maximum_get_4_00_and_every_other_device_is_still_served() {
    let data = data_dir("hostile-lifetime");
    let server = Server::start(&data);
    let mut honest = device_0(&server, &["--duration", "60"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;

    // Register with a lifetime of u64::MAX and 2^63 − 1 (each panicked the LwM2M task).
    let mut hostile = Scripted::connect(server.coaps, SocketAddr::from(([127, 0, 0, 1], 0)), "device-1").await;
    for lt in ["18446744073709551615", "9223372036854775807"] {
        let (code, reason) = coap_answer(&hostile.register(&["ep=urn:dev:1", &format!("lt={lt}")]).await);
        assert_eq!(code, "4.00", "lt={lt}: {reason}");
        assert!(reason.contains("out of range: 1 to 4294967295 s"), "the 4.00 says why: {reason}");
    }
    // And an Update with them.
    let created = hostile.register(&["ep=urn:dev:1", "lt=60"]).await;
    assert_eq!(coap_answer(&created).0, "2.01");
    let location: Vec<String> = created
        .get_option(CoapOption::LocationPath)
        .unwrap()
        .iter()
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect();
    for lt in ["18446744073709551615", "9223372036854775807"] {
        let mut update = tether_coap::packet::request(RequestType::Post, &location.join("/"), None, Vec::new());
        update.add_option(CoapOption::UriQuery, format!("lt={lt}").into_bytes());
        let (code, reason) = coap_answer(&hostile.request(update).await);
        assert_eq!((code.as_str(), reason.contains("out of range")), ("4.00", true), "update lt={lt}: {reason}");
    }

    // The server goes on: both registrations listed, the honest device read, health good.
    let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!((status, clients.as_array().map(Vec::len)), (200, Some(2)), "{clients}");
    let dev1 = clients.as_array().unwrap().iter().find(|c| c["endpoint"] == "urn:dev:1").unwrap();
    assert_eq!(dev1["lifetime_s"], 60, "the refused update changed nothing");
    let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
    assert_eq!((status, read["values"]["/3/0/0"].as_str()), (200, Some("tether")), "{read}");
    let (status, health) = http_as(server.http, "GET", "/healthz", None, None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "no token needed: {health}");
    assert_eq!(health["subsystems"]["lwm2m"], "ok");

    // An admin write of an out-of-range lifetime is refused before it reaches the device.
    for value in ["9223372036854775807", "0", "-5"] {
        let body = format!(r#"{{"value": {value}}}"#);
        let (status, refused) = http(server.http, "PUT", "/api/clients/urn:dev:0/1/0/1", Some(&body)).await;
        assert_eq!(status, 400, "{value}: {refused}");
        assert!(refused["error"].as_str().unwrap().contains("must be 1 to 4294967295 s"), "{refused}");
    }
    let (status, lifetime) = http(server.http, "GET", "/api/clients/urn:dev:0/1/0/1", None).await;
    assert_eq!((status, lifetime["values"]["/1/0/1"].as_i64()), (200, Some(300)), "the device keeps its lifetime");
    let (status, _) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
    assert_eq!(status, 200);

    let _ = honest.kill();
    let _ = honest.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_panic_in_a_server_task_ends_the_process_with_status_70() {
    let data = data_dir("hostile-panic");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("TETHER_FAULT_PANIC_AFTER_MS", "1500")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let lines = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tether serve still runs 30 s after a task panicked");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines = lines.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(70), "{lines}");
    assert!(lines.contains("panicked") && lines.contains("injected fault"), "the panic is visible: {lines}");
    assert!(lines.contains("exiting with status 70"), "{lines}");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_only_to_the_session_of_its_endpoints_identity() {
    let data = data_dir("hostile-identity");
    let server = Server::start(&data);
    // Device A (urn:dev:0) with a short lifetime; then it dies without a word (SIGKILL: no
    // close_notify), and its session stays in the server.
    let mut a = device_0(&server, &["--lifetime", "4", "--duration", "60"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    let (_, listed) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    let address = listed["address"].as_str().unwrap().to_string();
    let (status, serial_a) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/2", None).await;
    assert_eq!(status, 200);
    a.kill().unwrap();
    a.wait().unwrap();

    // Device B (urn:dev:1, another identity) gets A's address and port, as CGNAT or a
    // crashed device's reused port gives it: its handshake replaces A's session there.
    let mut b = device(&server, 1, &["--bind", &address, "--duration", "60"]);
    wait_for(&server, "/api/clients/urn:dev:1", Duration::from_secs(10), |status, _| status == 200).await;
    let (_, listed) = http(server.http, "GET", "/api/clients/urn:dev:1", None).await;
    assert_eq!(listed["address"].as_str(), Some(address.as_str()), "B is where A was");

    // A read of A must not reach B: A is offline.
    let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/2?timeout=2", None).await;
    assert_eq!(status, 504, "urn:dev:0's read went to another device: {read} (A's serial: {serial_a})");
    let (_, listed) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert_eq!(listed["online"], false, "{listed}");
    let (status, _) =
        http(server.http, "PUT", "/api/clients/urn:dev:0/1/0/1?timeout=2", Some(r#"{"value": 60}"#)).await;
    assert_eq!(status, 504, "nor a write");

    // A's registration expires: that closes A's session only, never B's at the same address.
    wait_for(&server, "/api/clients/urn:dev:0", Duration::from_secs(15), |status, _| status == 404).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["handshakes_total"], 2, "B was not closed and made to handshake again: {pool}");
    let (status, serial_b) = http(server.http, "GET", "/api/clients/urn:dev:1/3/0/2", None).await;
    assert_eq!(status, 200, "{serial_b}");
    assert!(serial_b["values"]["/3/0/2"].is_string());
    assert_ne!(serial_b["values"]["/3/0/2"], serial_a["values"]["/3/0/2"]);

    let _ = b.kill();
    let _ = b.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_over_a_session_restored_after_a_crash_is_taken_at_once() {
    let data = data_dir("hostile-send");
    let server = Server::start(&data);
    let coaps = server.coaps.to_string();
    let mut dev = device_0(&server, &["--send-interval", "1", "--duration", "90"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    let has_values =
        |status: u16, body: &Value| status == 200 && body["resources"].as_array().is_some_and(|r| !r.is_empty());
    wait_for(&server, "/api/clients/urn:dev:0/sent", Duration::from_secs(10), has_values).await;

    server.sigkill();
    let server = Server::start_on(&coaps, &data, &[]);
    // No handshake and no Update (its lifetime is 300 s): the next Send, over the restored
    // session, is taken.
    wait_for(&server, "/api/clients/urn:dev:0/sent", Duration::from_secs(10), has_values).await;
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["handshakes_total"], 0, "the session was restored, not renewed: {pool}");

    let _ = dev.kill();
    let _ = dev.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
