//! `tether serve` as a child process, and a minimal HTTP client.
#![allow(dead_code, reason = "each test binary uses a different subset")]

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
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command.args(["serve", "--coaps", coaps, "--http", http, "--data-dir"]).arg(data_dir);
        command.args(extra);
        // Info lines of hundreds of devices would bury the test output; tests/logs.rs reads them.
        command.env("RUST_LOG", "warn");
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
        Self { child, coaps, http, token }
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
