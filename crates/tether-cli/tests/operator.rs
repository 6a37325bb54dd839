//! The operator interface against the real binaries: every route the OpenAPI description
//! names is routed and needs a token (but the UI's own files and login), read-only tokens
//! cannot change anything, `/metrics` is open only on loopback, and `/api/events` streams a
//! registration and then a notification as they happen (and the recent ones to a late reader).

mod support;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{device_0, http_as, wait_registered, Server};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ADMIN: &str = "4f1c9e07b2d85a3e6c0f7b19d2a4e58c";
const READER: &str = "9d3b7a15e0c48f62b1e9057ac3d6f284";

/// `path` of the description with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{endpoint}", "urn:dev:0")
        .replace("{path}", "3/0/0")
        .replace("{id}", "1")
        .replace("{object}", "3")
        .replace("{file}", "app.js")
}

#[tokio::test]
async fn every_route_needs_a_token_and_read_tokens_change_nothing() {
    let data = std::env::temp_dir().join(format!("tether-operator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let tokens = data.join("tokens.toml");
    let mut file = std::fs::File::create(&tokens).unwrap();
    write!(
        file,
        "[[token]]\nrole = \"admin\"\ntoken = \"{ADMIN}\"\n\n[[token]]\nrole = \"read\"\ntoken = \"{READER}\"\n"
    )
    .unwrap();
    drop(file);
    let server = Server::start_with(&data.join("db"), &["--api-token-file", tokens.to_str().unwrap()]);
    assert!(!data.join("db/api-token").exists(), "no token is made when a token file is given");
    let mut device = device_0(&server, &["--duration", "60"]);
    let addr = server.http;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_as(addr, "GET", "/api/clients", None, Some(READER)).await.1.as_array().is_none_or(Vec::is_empty) {
        assert!(Instant::now() < deadline, "the device registers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, doc) = http_as(addr, "GET", "/api/openapi.json", None, Some(READER)).await;
    assert_eq!(status, 200);
    let mut checked = 0;
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let method = method.to_uppercase();
            let url = concrete(path);
            // The event stream never ends; tests below read it.
            if path == "/api/events" {
                continue;
            }
            let public = operation["security"].as_array().is_some_and(Vec::is_empty);
            let (status, body) = http_as(addr, &method, &url, Some("{}"), None).await;
            if public || path == "/metrics" {
                assert_ne!(status, 401, "{method} {url} is open: {body}");
            } else {
                assert_eq!(status, 401, "{method} {url} without a token: {body}");
                assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
            }
            let admin_only = operation["x-role"] == "admin";
            let (status, body) = http_as(addr, &method, &url, Some("{}"), Some(READER)).await;
            if admin_only {
                assert_eq!(status, 403, "{method} {url} with a read token: {body}");
            } else {
                assert!(![401, 403].contains(&status), "{method} {url} with a read token: {status} {body}");
            }
            // With the admin token, the route exists and takes the method (whatever the
            // device then answers).
            let (status, body) = http_as(addr, &method, &url, Some("{}"), Some(ADMIN)).await;
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                !error.contains("no such route") && !error.contains("is not allowed on"),
                "{method} {url}: {status} {body}"
            );
            assert!(![401, 403].contains(&status), "{method} {url} with the admin token: {status} {body}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations checked");
    // A wrong token is no token.
    let (status, _) = http_as(addr, "GET", "/api/clients", None, Some("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf")).await;
    assert_eq!(status, 401);
    // Bodies are bounded.
    let big = format!("{{\"values\": {{\"/3/0/14\": \"{}\"}}}}", "x".repeat(100 * 1024));
    let (status, body) = http_as(addr, "PUT", "/api/clients/urn:dev:0/composite", Some(&big), Some(ADMIN)).await;
    assert_eq!(status, 413);
    assert!(body["error"].is_string(), "errors stay JSON: {body}");
    let _ = device.kill();
    let _ = device.wait();
    drop(server);

    // On a non-loopback address /metrics needs a token too; traffic still goes to loopback.
    let server = Server::start_on_http("127.0.0.1:0", "0.0.0.0:0", &data.join("db2"), &[]);
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], server.http.port()));
    let (status, _) = http_as(local, "GET", "/metrics", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = http_as(local, "GET", "/metrics", None, server.token.as_deref()).await;
    assert_eq!(status, 200);
    drop(server);
    // Without authentication, only on loopback.
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--coaps", "127.0.0.1:0", "--http", "0.0.0.0:0", "--no-api-auth", "--data-dir"])
        .arg(data.join("db3"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("without authentication"));
    let _ = std::fs::remove_dir_all(&data);
}

/// The events of `/api/events` as (name, data), read from a real connection.
async fn subscribe(addr: std::net::SocketAddr, token: &str) -> tokio::sync::mpsc::UnboundedReceiver<(String, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        let mut name = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            // Chunked transfer: chunk sizes arrive as lines of their own, and are skipped.
            if let Some(event) = line.strip_prefix("event: ") {
                name = event.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let value = serde_json::from_str(data).unwrap_or(Value::Null);
                if tx.send((std::mem::take(&mut name), value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event, within 15 s.
async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Value)>) -> (String, Value) {
    let event = tokio::time::timeout(Duration::from_secs(15), events.recv()).await;
    event.expect("an event in time").expect("the stream is open")
}

#[tokio::test]
async fn events_stream_a_registration_then_a_notification() {
    let data = std::env::temp_dir().join(format!("tether-operator-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let token = server.token.clone().expect("a token made in the data directory");
    let mut events = subscribe(server.http, &token).await;
    let mut device = device_0(&server, &["--duration", "60"]);
    let mut seen = Vec::new();
    loop {
        let (name, data) = next(&mut events).await;
        seen.push(name.clone());
        if name == "registered" {
            assert_eq!(data["endpoint"], "urn:dev:0", "{data}");
            assert_eq!(data["identity"], "psk:device-0", "{data}");
            break;
        }
    }
    assert!(seen.contains(&"session_opened".to_string()), "the handshake came first: {seen:?}");
    wait_registered(&server, 1, Duration::from_secs(5)).await;
    // Current Time (/3/0/13) changes every second: its notifications stream here.
    let (status, observed) = support::http(server.http, "POST", "/api/clients/urn:dev:0/3/0/13/observe", None).await;
    assert_eq!(status, 200, "{observed}");
    let id = observed["observation"].clone();
    loop {
        let (name, data) = next(&mut events).await;
        if name == "notification" {
            assert_eq!(data["observation"], id, "{data}");
            assert_eq!(data["endpoint"], "urn:dev:0");
            assert!(data["values"]["/3/0/13"].is_i64(), "{data}");
            break;
        }
    }
    // A reader connecting later gets the most recent events first: the registration is there.
    let mut late = subscribe(server.http, &token).await;
    loop {
        let (name, data) = next(&mut late).await;
        if name == "registered" {
            assert_eq!(data["endpoint"], "urn:dev:0");
            break;
        }
    }
    let _ = device.kill();
    let _ = device.wait();
    let _ = std::fs::remove_dir_all(&data);
}
