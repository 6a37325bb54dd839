//! What a new operator meets in the first hour, against the real binaries: devices that say
//! why they fail, no silent waits, REST errors that are JSON and quick, safe defaults.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{http, wait_registered, Fleet, Server, KEY};
use tether::lwm2m::build;
use tether::DtlsClient;
use tether_coap::coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey};

fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-first-hour-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tether device` with `args`, one attempt, run to its end.
fn device(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", server, "--retry-count", "1", "--retry-timer", "0.2", "--duration", "20"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test]
async fn a_device_says_why_it_cannot_register_and_exits_with_that_cause() {
    let data = data_dir("causes");
    let server = Server::start(&data);
    let url = format!("coaps://{}", server.coaps);
    let cases: [(&[&str], &str); 3] = [
        (&["--psk-identity", "device-0", "--endpoint", "urn:dev:0", "--psk-key", "00112233"], "PSK key mismatch"),
        (&["--psk-identity", "nobody", "--endpoint", "urn:dev:0", "--psk-key", KEY], "unknown PSK identity"),
        (&["--psk-identity", "device-0", "--endpoint", "urn:dev:1", "--psk-key", KEY], "4.03 Forbidden"),
    ];
    for (args, cause) in cases {
        let output = device(&url, args);
        let printed = text(&output);
        assert_eq!(output.status.code(), Some(1), "{printed}");
        let line = |start: &str| printed.lines().find(|l| l.contains(start)).unwrap_or_default().to_string();
        assert!(line("attempt 1 failed: ").contains(cause), "{cause:?} while it runs: {printed}");
        assert!(line("Error: no device registered: ").contains(cause), "{cause:?} at exit: {printed}");
    }
    // Nothing listens: said as such, with the next attempt soon.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{closed}"), "--duration", "2.5"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(printed.contains("failed: port unreachable: nothing listens on udp"), "{printed}");
    assert!(printed.contains("next attempt in 1.0 s"), "retried soon: {printed}");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_device_started_before_its_server_registers_within_seconds() {
    let data = data_dir("early");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // The Server object's default schedule (Retry Timer 60 s): only the quick retries after
    // a refused port bring it in soon.
    let mut early = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{port}"), "--psk-identity", "device-0"])
        .args(["--endpoint", "urn:dev:0", "--psk-key", KEY, "--duration", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let server = Server::start_on(&port.to_string(), &data, &[]);
    let started = Instant::now();
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    eprintln!("registered {:.1} s after the server started", started.elapsed().as_secs_f64());
    let _ = early.kill();
    let _ = early.wait();
    let _ = std::fs::remove_dir_all(&data);
}

/// Registers `endpoint` over a raw session and returns it (the device answers nothing).
async fn register_silently(server: &Server, identity: &str, endpoint: &str) -> DtlsClient {
    let context = DtlsContext::client(ClientConfig::psk(identity, PskKey::from_hex(KEY).unwrap())).unwrap();
    let client = DtlsClient::connect(server.coaps, &context).await.unwrap();
    let mut register = build(RequestType::Post, "/rd", Some(40), b"</1/0>,</3/0>".to_vec());
    register.header.set_type(MessageType::Confirmable);
    register.header.message_id = 7;
    register.set_token(vec![1, 2, 3, 4]);
    register.add_option(CoapOption::UriQuery, format!("ep={endpoint}").into_bytes());
    register.add_option(CoapOption::UriQuery, b"lt=300".to_vec());
    client.send(&register.to_bytes().unwrap()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), client.recv()).await.unwrap().unwrap();
    let answer = Packet::from_bytes(&answer).unwrap();
    assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Created));
    client
}

#[tokio::test]
async fn rest_answers_predictably() {
    let data = data_dir("rest");
    let server = Server::start(&data);

    // A device that stops answering: a read with ?timeout=1 gives up in about a second.
    let silent = register_silently(&server, "device-0", "urn:dev:0").await;
    let started = Instant::now();
    let (status, body) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0?timeout=1", None).await;
    let waited = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    assert!(body["error"].as_str().unwrap().contains("within 1.0 s"), "{body}");

    // A device whose session closed (close_notify, no de-registration) is offline, and a
    // request to it fails at once.
    let closing = register_silently(&server, "device-1", "urn:dev:1").await;
    closing.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let offline = loop {
        let (_, client) = http(server.http, "GET", "/api/clients/urn:dev:1", None).await;
        if client["online"] == false || Instant::now() > deadline {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(offline["online"], false, "{offline}");
    let (_, online) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert_eq!(online["online"], true, "{online}");
    let started = Instant::now();
    let (status, body) = http(server.http, "GET", "/api/clients/urn:dev:1/3/0/0", None).await;
    assert_eq!(status, 504, "{body}");
    assert!(body["error"].as_str().unwrap().contains("offline"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Every error is one JSON shape, unknown routes and methods included.
    for (method, path, body, expected) in [
        ("GET", "/api/nothing", None, 404),
        ("GET", "/nothing", None, 404),
        ("PATCH", "/api/clients", None, 405),
        ("DELETE", "/api/pool", None, 405),
        ("GET", "/api/clients/urn:dev:0/3/0/0/1/2", None, 400),
        ("GET", "/api/clients/urn:dev:0/3/x", None, 400),
        ("GET", "/api/clients/urn:dev:0/3/0/0?timeout=0", None, 400),
        ("GET", "/api/clients/urn:dev:0/3/0/0?timeout=9999", None, 400),
        ("GET", "/api/clients/urn:dev:0/3/0/0?format=xml", None, 400),
        ("GET", "/api/clients/urn:dev:0/3/0/0?bogus=1", None, 400),
        ("GET", "/api/clients/nobody/3/0/0", None, 404),
        ("GET", "/api/observations/abc", None, 400),
        ("PUT", "/api/clients/urn:dev:0/1/0/1", Some(r#"{"value": "abc"}"#), 400),
        ("PUT", "/api/clients/urn:dev:0/3/0/0", Some(r#"{"value": "x"}"#), 405),
        ("POST", "/api/clients/urn:dev:0/3/0/0", Some(""), 405),
    ] {
        let (status, json) = http(server.http, method, path, body).await;
        assert_eq!(status, expected, "{method} {path}: {json}");
        assert!(json["error"].is_string() && json.get("coap_code").is_some(), "{method} {path}: {json}");
    }
    let (_, typed) = http(server.http, "PUT", "/api/clients/urn:dev:0/1/0/1", Some(r#"{"value": "abc"}"#)).await;
    assert!(typed["error"].as_str().unwrap().contains("expects an Integer"), "{typed}");
    drop(silent);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn clients_are_listed_in_numeric_order() {
    let data = data_dir("order");
    let security = Fleet::security_file(&data, "n", 12);
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let _fleet = Fleet::start(server.coaps, "n", 12, &[]);
    wait_registered(&server, 12, Duration::from_secs(30)).await;
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    let names: Vec<&str> = clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..12).map(|i| format!("n-{i}")).collect();
    assert_eq!(names, expected);
    let _ = std::fs::remove_dir_all(&data);
}

fn tether(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether")).args(args).current_dir(data).env("RUST_BACKTRACE", "0").output().unwrap()
}

#[tokio::test]
async fn safe_defaults() {
    let data = data_dir("defaults");

    // --write-security: a random key per device, a private file, and a fleet that reads it.
    let output = tether(
        &["device", "--count", "3", "--endpoint", "s", "--psk-identity", "s", "--write-security", "fleet.toml"],
        &data,
    );
    assert!(output.status.success(), "{}", text(&output));
    let file = std::fs::read_to_string(data.join("fleet.toml")).unwrap();
    let keys: std::collections::BTreeSet<&str> = file.lines().filter(|l| l.starts_with("key = ")).collect();
    assert_eq!(keys.len(), 3, "three different keys: {file}");
    assert!(!file.contains(KEY), "not the development key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("fleet.toml")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let server = Server::start_with(&data.join("db"), &["--security", data.join("fleet.toml").to_str().unwrap()]);
    let mut fleet = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--count", "3", "--endpoint", "s", "--psk-identity", "s", "--security"])
        .arg(data.join("fleet.toml"))
        .args(["--server", &format!("coaps://{}", server.coaps), "--duration", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_registered(&server, 3, Duration::from_secs(20)).await;
    let _ = fleet.kill();
    let _ = fleet.wait();

    // A second server on the same data directory is refused, naming the lock.
    let second = tether(
        &["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir", data.join("db").to_str().unwrap()],
        &data,
    );
    assert_eq!(second.status.code(), Some(1));
    assert!(text(&second).contains("is in use by another tether serve"), "{}", text(&second));
    drop(server);

    // Flags with mistakes name them.
    for (psk, problem) in [
        ("a:0011:b:c", "got 4 fields"),
        ("a:0011", "got 2"),
        ("a:00zz:b", "character 3 of 4 is not a hex digit"),
        ("a:001:b", "odd number of hex digits (3)"),
    ] {
        let output = tether(&["serve", "--psk", psk, "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0"], &data);
        assert_eq!(output.status.code(), Some(1));
        assert!(text(&output).contains(problem), "--psk {psk}: {}", text(&output));
    }
    // A data directory that cannot be made says why.
    std::fs::write(data.join("plain-file"), b"").unwrap();
    let output =
        tether(&["serve", "--data-dir", "plain-file/sub", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0"], &data);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output).contains("cannot create the data directory plain-file/sub"), "{}", text(&output));
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", "coaps://127.0.0.1:9", "--duration", "2"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // as `| head` does
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(1), "ends with its cause: {stderr}");
}
