//! `tether serve` as a child process, and a minimal HTTP client.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod browser;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The development key (hex of "secretPSK").
pub const KEY: &str = "73656372657450534b";
/// PSK entries `device-N` → `urn:dev:N` the server is started with.
pub const DEVICES: usize = 5;

/// The admin API token of each server this test started, by HTTP address: [`http`] sends it.
static TOKENS: std::sync::Mutex<Vec<(SocketAddr, String)>> = std::sync::Mutex::new(Vec::new());

/// A `tether serve` process this test started; killed (by its PID) when dropped.
pub struct Server {
    child: Child,
    /// CoAPs address.
    pub coaps: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// The admin API token it made in its data directory.
    pub token: Option<String>,
    /// Its log lines (stderr), when started with [`Server::start_logged`].
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// Starts with `extra` flags after the defaults of [`Server::start`].
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", data_dir, extra)
    }

    /// Starts with CoAPs on `coaps` (to come back on the same port after a kill).
    pub fn start_on(coaps: &str, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_on_http(coaps, "127.0.0.1:0", data_dir, extra)
    }

    /// Starts with CoAPs on `coaps` and HTTP on `http`.
    pub fn start_on_http(coaps: &str, http: &str, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_tether")), coaps, http, data_dir, extra)
    }

    /// Starts as a process whose soft limit of open files is `soft_nofile` (as a shell's
    /// default of 1,024 leaves it), with `extra` flags.
    pub fn start_with_nofile(data_dir: &Path, soft_nofile: u32, extra: &[&str]) -> Self {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("ulimit -Sn {soft_nofile} && exec \"$0\" \"$@\"")]);
        command.arg(env!("CARGO_BIN_EXE_tether"));
        Self::start_command(command, "127.0.0.1:0", "127.0.0.1:0", data_dir, extra)
    }

    /// Starts a node of a cluster: `extra` flags, `env` in its environment (the cluster key),
    /// CoAPs and HTTP on free loopback ports.
    pub fn start_node(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_node_at("127.0.0.1:0", data_dir, extra, env)
    }

    /// [`Server::start_node`] with CoAPs on `coaps` (a node restarted where the load
    /// balancer sends).
    pub fn start_node_at(coaps: &str, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command.envs(env.iter().copied());
        Self::start_command(command, coaps, "127.0.0.1:0", data_dir, extra)
    }

    /// Starts with `extra` flags, keeping its log lines (at `warn`) in [`Server::log`].
    pub fn start_logged(data_dir: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command.stderr(Stdio::piped());
        Self::start_command(command, "127.0.0.1:0", "127.0.0.1:0", data_dir, extra)
    }

    /// Whether a line of its log (see [`Server::start_logged`]) contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|line| line.contains(text))
    }

    fn start_command(mut command: Command, coaps: &str, http: &str, data_dir: &Path, extra: &[&str]) -> Self {
        command.args(["serve", "--coaps", coaps, "--http", http, "--data-dir"]).arg(data_dir);
        command.args(extra);
        // Info lines of hundreds of devices would bury the test output; tests/logs.rs reads them.
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "warn");
        }
        for i in 0..DEVICES {
            command.args(["--psk", &format!("device-{i}:{KEY}:urn:dev:{i}")]);
        }
        let mut child = command.stdout(Stdio::piped()).spawn().expect("tether binary");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let lines = std::sync::Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
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
            if let Some(rest) = line.strip_prefix("tether serve: web UI on http://") {
                http = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        let (coaps, http) = (coaps.unwrap(), http.unwrap());
        let token = std::fs::read_to_string(data_dir.join("api-token")).ok().map(|t| t.trim().to_string());
        if let Some(token) = &token {
            let mut tokens = TOKENS.lock().unwrap_or_else(|e| e.into_inner());
            tokens.retain(|(addr, _)| *addr != http);
            tokens.push((http, token.clone()));
        }
        Self { child, coaps, http, token, log }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn sigkill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn sigterm(mut self) -> std::process::ExitStatus {
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

/// A `tether device` registering `urn:dev:0` (PSK identity `device-0`) with `server`, with
/// `extra` flags (a `--duration` bounds it); the caller ends it by its PID.
pub fn device_0(server: &Server, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{}", server.coaps), "--psk-identity", "device-0"])
        .args(["--endpoint", "urn:dev:0", "--psk-key", KEY])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("tether binary")
}

/// A minimal HTTP/1.1 request with the server's admin token; returns the status and the
/// JSON body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let token =
        TOKENS.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(a, _)| *a == addr).map(|(_, t)| t.clone());
    http_as(addr, method, path, body, token.as_deref()).await
}

/// A minimal HTTP/1.1 request with `token` (none: no Authorization header).
pub async fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{authorization}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let json = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// `tether device` fleet of `count` devices named `name-i` (PSK identity the same), as a
/// child process ended by its PID when dropped.
pub struct Fleet {
    pub child: Child,
}

impl Fleet {
    /// Writes the fleet's security file into `dir` and returns its path.
    pub fn security_file(dir: &Path, name: &str, count: usize) -> std::path::PathBuf {
        let path = dir.join(format!("{name}.toml"));
        let status = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "device",
                "--count",
                &count.to_string(),
                "--endpoint",
                name,
                "--psk-identity",
                name,
                "--psk-key",
                KEY,
            ])
            .arg("--write-security")
            .arg(&path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    /// Starts the fleet against `server` with `extra` flags.
    pub fn start(server: SocketAddr, name: &str, count: usize, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "device",
                "--count",
                &count.to_string(),
                "--endpoint",
                name,
                "--psk-identity",
                name,
                "--psk-key",
                KEY,
            ])
            .args(["--server", &format!("coaps://{server}"), "--duration", "600"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self { child }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `server` lists `count` registrations.
pub async fn wait_registered(server: &Server, count: usize, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
        let n = clients.as_array().map_or(0, Vec::len);
        if n == count {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{n} of {count} registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A scripted LwM2M client over a real DTLS session (tether's own client, PSK): it sends
/// exactly the requests a test writes, as a hostile or broken device would.
pub struct Scripted {
    pub session: tether::DtlsClient,
    next_id: u16,
}

impl Scripted {
    /// A DTLS session with `server` as PSK `identity` (the development key), from `local`.
    pub async fn connect(server: SocketAddr, local: SocketAddr, identity: &str) -> Self {
        use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey};
        let key = PskKey::from_hex(KEY).unwrap();
        let context = DtlsContext::client(ClientConfig::psk(identity, key)).unwrap();
        let socket = tether::Socket::bind_udp(local, None).await.unwrap();
        socket.connect(server).await.unwrap();
        let session = tether::DtlsClient::connect_on(socket, server, &context, None).await.unwrap();
        Self { session, next_id: 1 }
    }

    /// Sends `request` as a confirmable message and returns the response to it (piggybacked
    /// or separate), within 10 s.
    pub async fn request(&mut self, mut request: tether_coap::coap_lite::Packet) -> tether_coap::coap_lite::Packet {
        use tether_coap::coap_lite::{MessageType, Packet};
        self.next_id = self.next_id.wrapping_add(1);
        request.header.message_id = self.next_id;
        request.header.set_type(MessageType::Confirmable);
        let token = self.next_id.to_be_bytes().to_vec();
        request.set_token(token.clone());
        self.session.send(&request.to_bytes().unwrap()).await.unwrap();
        let answer = async {
            loop {
                let datagram = self.session.recv().await.expect("the session stays open");
                let Ok(packet) = Packet::from_bytes(&datagram) else { continue };
                let response = matches!(packet.header.code, tether_coap::coap_lite::MessageClass::Response(_));
                if response && packet.get_token() == token.as_slice() {
                    return packet;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), answer).await.expect("an answer within 10 s")
    }

    /// `POST /rd` with `query` items and a small link-format body.
    pub async fn register(&mut self, query: &[&str]) -> tether_coap::coap_lite::Packet {
        use tether_coap::coap_lite::{CoapOption, RequestType};
        let mut register = tether_coap::packet::request(RequestType::Post, "rd", Some(40), b"</1/0>,</3/0>".to_vec());
        for item in query {
            register.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
        }
        self.request(register).await
    }
}

/// The code of a CoAP response as text (`4.00`) and its payload as text.
pub fn coap_answer(packet: &tether_coap::coap_lite::Packet) -> (String, String) {
    (packet.header.code.to_string(), String::from_utf8_lossy(&packet.payload).to_string())
}

/// A fresh data directory for a test, named after it and this process.
pub fn data_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `tether device` as `urn:dev:{i}` (PSK identity `device-{i}`, the test key) against
/// `server`, with `extra` flags; the caller ends it by its PID.
pub fn device(server: &Server, i: usize, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{}", server.coaps)])
        .args(["--psk-identity", &format!("device-{i}"), "--endpoint", &format!("urn:dev:{i}"), "--psk-key", KEY])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("tether binary")
}

/// Polls `GET path` on `server` until `done` holds for its answer (up to `within`), and
/// returns that answer.
pub async fn wait_for(server: &Server, path: &str, within: Duration, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (status, body) = http(server.http, "GET", path, None).await;
        if done(status, &body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "GET {path}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process this test started, ended (by its PID) however the test ends.
pub struct Ended(pub Child);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
