//! `tether serve` as a real process: REST API, SIGKILL and restart, SIGTERM.

#[path = "../../tether/tests/support/device.rs"]
mod device;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde_json::Value;
use tether::DtlsClient;
use tether_coap::coap_lite::ResponseType;
use tether_proto::dtls::{ClientConfig, CloseReason, DtlsContext, PskKey, SessionConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const KEY: &str = "73656372657450534b";
const DEVICES: usize = 5;

/// A `tether serve` process this test started; killed (by its PID) when dropped.
struct Server {
    child: Child,
    coaps: SocketAddr,
    http: SocketAddr,
}

impl Server {
    fn start(data_dir: &Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command.args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"]).arg(data_dir);
        for i in 0..DEVICES {
            command.args(["--psk", &format!("device-{i}:{KEY}:urn:dev:{i}")]);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("tether binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut coaps, mut http) = (None, None);
        while coaps.is_none() || http.is_none() {
            let line = rx.recv_timeout(Duration::from_secs(30)).expect("tether serve prints its addresses");
            if let Some(addr) = line.strip_prefix("tether serve: CoAPs (DTLS 1.2) on udp ") {
                coaps = addr.trim().parse().ok();
            }
            if let Some(rest) = line.strip_prefix("tether serve: REST API on http://") {
                http = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        Self { child, coaps: coaps.unwrap(), http: http.unwrap() }
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn sigterm(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        std::mem::forget(self);
        exit
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request; returns the status and the JSON body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let json = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

async fn register_devices(server: &Server) -> Vec<DtlsClient> {
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let identity = format!("device-{i}");
        let config = ClientConfig::psk(identity, PskKey::from_hex(KEY).unwrap())
            .session(SessionConfig::default().retransmit(Duration::from_millis(50), Duration::from_millis(400)));
        let context = DtlsContext::client(config).unwrap();
        let client = DtlsClient::connect(server.coaps, &context).await.unwrap();
        handles.push(client);
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_sigkill_restart_and_sigterm() {
    let data = std::env::temp_dir().join(format!("tether-serve-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);

    // Five devices register; each answers reads with its own name.
    let clients = register_devices(&server).await;
    let (tx, mut registered) = mpsc::channel(DEVICES);
    let names: Vec<&'static str> = (0..DEVICES).map(|i| &*Box::leak(format!("urn:dev:{i}").into_boxed_str())).collect();
    for (client, name) in clients.into_iter().zip(&names) {
        tokio::spawn(device::device(client, name, name, tx.clone()));
    }
    for _ in 0..DEVICES {
        let (code, _) = tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();
        assert_eq!(code, ResponseType::Created);
    }

    let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap()).collect();
    assert_eq!(listed, names);
    let (status, one) = http(server.http, "GET", "/api/clients/urn:dev:3", None).await;
    assert_eq!((status, one["lifetime_s"].as_u64()), (200, Some(300)));

    // Reads of a resource, an instance and an object travel over each device's session.
    for path in ["3/0/0", "3/0", "3"] {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/urn:dev:2/{path}"), None).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!((read["coap_code"].as_str(), read["value"].as_str()), (Some("2.05"), Some("urn:dev:2")));
    }
    let (status, written) = http(server.http, "PUT", "/api/clients/urn:dev:1/1/0/1", Some(r#"{"value": 600}"#)).await;
    assert_eq!((status, written["coap_code"].as_str()), (200, Some("2.05")), "{written}");
    let (status, executed) = http(server.http, "POST", "/api/clients/urn:dev:1/3/0/4", Some("")).await;
    assert_eq!(status, 200, "{executed}");
    // Errors are JSON and say what is wrong.
    let (status, missing) = http(server.http, "GET", "/api/clients/urn:nobody/3/0/0", None).await;
    assert_eq!(status, 404);
    assert!(missing["error"].as_str().unwrap().contains("not registered"));
    let (status, bad) = http(server.http, "GET", "/api/clients/urn:dev:1/three/0", None).await;
    assert_eq!(status, 400);
    assert!(bad["error"].as_str().unwrap().contains("not an LwM2M path"));

    // One handshake per device however many requests.
    let (status, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(status, 200);
    assert_eq!(pool["sessions"].as_u64(), Some(DEVICES as u64));
    assert_eq!(pool["handshakes_total"].as_u64(), Some(DEVICES as u64));
    assert!(pool["requests_total"].as_u64().unwrap() >= 5 + 3, "{pool}");

    // SIGKILL, then start again on the same data: every registration is still listed.
    server.sigkill();
    let server = Server::start(&data);
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    let listed: Vec<&str> = clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap()).collect();
    assert_eq!(listed, names, "no acknowledged registration lost");

    // SIGTERM: close_notify to every peer, exit 0.
    let survivors = register_devices(&server).await;
    let exit = server.sigterm();
    assert!(exit.success(), "{exit:?}");
    for client in &survivors {
        let reason = tokio::time::timeout(Duration::from_secs(10), client.closed()).await.unwrap();
        assert_eq!(reason, CloseReason::PeerClosed);
    }
    let _ = std::fs::remove_dir_all(&data);
}
