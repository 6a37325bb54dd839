//! `tether bench restart`: `tether serve` killed with SIGKILL under a fleet of N
//! `tether device`s and started again on the same port and data directory, twice: once with
//! its session store (sessions restored), once with the store deleted before the restart
//! (the behaviour before sessions were persisted), as the baseline. Counts the handshakes
//! each restart costs until every device has updated its registration again, and how long
//! that takes.
//!
//! Every process here is a real `tether` process on 127.0.0.1, started and ended by this
//! one (by PID).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lwm2m::Fleet;
use super::Figure;

/// What to measure.
#[derive(Debug, Clone)]
pub struct RestartBenchOptions {
    /// Devices in the fleet.
    pub devices: usize,
    /// Registration lifetime of the devices (they update at about half of it).
    pub lifetime: u64,
    /// Longest wait for the fleet after a restart.
    pub patience: Duration,
}

const KEY: &str = "726573746172742d6b6579";

/// Runs the benchmark.
pub fn run(options: &RestartBenchOptions) -> Result<Vec<Figure>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(measure(options))
}

/// A `tether serve` child process.
struct Serve {
    child: Child,
    coaps: SocketAddr,
    http: SocketAddr,
}

impl Serve {
    fn start(coaps: &str, data: &Path, security: &Path) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            // Loopback, and the bench's own server: no API token to pass around.
            .args(["serve", "--coaps", coaps, "--http", "127.0.0.1:0", "--no-api-auth", "--data-dir"])
            .arg(data)
            .arg("--security")
            .arg(security)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start tether serve")?;
        let stdout = child.stdout.take().context("serve stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut coaps, mut http) = (None, None);
        while coaps.is_none() || http.is_none() {
            let Some(Ok(line)) = lines.next() else { bail!("tether serve exited before it listened") };
            if let Some(addr) = line.strip_prefix("tether serve: CoAPs (DTLS 1.2) on udp ") {
                coaps = addr.trim().parse().ok();
            }
            if let Some(rest) = line.strip_prefix("tether serve: web UI on http://") {
                http = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, coaps: coaps.context("coaps")?, http: http.context("http")? })
    }

    fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one restart cost.
struct Recovery {
    handshakes: u64,
    restored: u64,
    updated: usize,
    elapsed: Duration,
    reads_ok: usize,
}

async fn measure(options: &RestartBenchOptions) -> Result<Vec<Figure>> {
    let n = options.devices;
    let data = std::env::temp_dir().join(format!("tether-bench-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let result = run_phases(options, &data).await;
    let _ = std::fs::remove_dir_all(&data);
    let (kept, lost) = result?;
    let detail = |r: &Recovery| {
        format!(
            "{} restored sessions; {}/{n} devices updated in {:.1} s; {}/{n} REST reads answered",
            r.restored,
            r.updated,
            r.elapsed.as_secs_f64(),
            r.reads_ok
        )
    };
    Ok(vec![
        Figure::new(
            format!("handshakes after a SIGKILL restart ({n} devices)"),
            kept.handshakes as f64,
            "hs",
            "restart without stored sessions",
            lost.handshakes as f64,
            format!("{} | baseline: {}", detail(&kept), detail(&lost)),
        ),
        Figure::new(
            "time until every device updated again",
            kept.elapsed.as_secs_f64(),
            "s",
            "restart without stored sessions",
            lost.elapsed.as_secs_f64(),
            format!("devices update every ~{} s (lifetime {} s)", options.lifetime / 2, options.lifetime),
        ),
    ])
}

async fn run_phases(options: &RestartBenchOptions, data: &Path) -> Result<(Recovery, Recovery)> {
    let n = options.devices;
    let security = data.join("fleet.toml");
    let status = Command::new(std::env::current_exe()?)
        .args(["device", "--count", &n.to_string(), "--endpoint", "r", "--psk-identity", "r", "--psk-key", KEY])
        .arg("--write-security")
        .arg(&security)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("tether device --write-security failed");
    }
    let server = Serve::start("127.0.0.1:0", data, &security)?;
    let coaps = server.coaps.to_string();
    let _fleet = Fleet(
        Command::new(std::env::current_exe()?)
            .args(["device", "--count", &n.to_string(), "--endpoint", "r", "--psk-identity", "r", "--psk-key", KEY])
            .args(["--server", &format!("coaps://{coaps}"), "--duration", "3600", "--jitter"])
            .args(["--lifetime", &options.lifetime.to_string(), "--retry-timer", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let started = Instant::now();
    while clients(server.http).await?.len() < n {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the fleet did not register within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    server.sigkill();
    let server = Serve::start(&coaps, data, &security)?;
    let kept = recover(&server, options, Instant::now()).await?;

    server.sigkill();
    for file in ["sessions.db", "sessions.db-wal", "sessions.db-shm"] {
        let _ = std::fs::remove_file(data.join(file));
    }
    let server = Serve::start(&coaps, data, &security)?;
    let lost = recover(&server, options, Instant::now()).await?;
    drop(server);
    Ok((kept, lost))
}

/// Waits until every device has updated (or registered) since `restarted`, then reads
/// /3/0/0 from each and reads the server's handshake counter.
async fn recover(server: &Serve, options: &RestartBenchOptions, restarted: Instant) -> Result<Recovery> {
    let (_, pool) = http(server.http, "GET", "/api/pool").await?;
    let restored = pool["dtls"]["sessions_restored"].as_u64().unwrap_or(0);
    let updated = loop {
        let since = restarted.elapsed().as_secs_f64();
        let list = clients(server.http).await?;
        let updated = list.iter().filter(|c| c["updated_s_ago"].as_f64().is_some_and(|ago| ago < since)).count();
        if updated >= options.devices || restarted.elapsed() > options.patience {
            break updated;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = restarted.elapsed();
    let mut reads_ok = 0;
    for c in clients(server.http).await? {
        let endpoint = c["endpoint"].as_str().unwrap_or_default();
        let path = format!("/api/clients/{endpoint}/3/0/0");
        let read = http(server.http, "GET", &path);
        if let Ok(Ok((200, _))) = tokio::time::timeout(Duration::from_secs(10), read).await {
            reads_ok += 1;
        }
    }
    let (_, pool) = http(server.http, "GET", "/api/pool").await?;
    let handshakes = pool["dtls"]["handshakes_completed"].as_u64().unwrap_or(0);
    Ok(Recovery { handshakes, restored, updated, elapsed, reads_ok })
}

async fn clients(addr: SocketAddr) -> Result<Vec<Value>> {
    let (_, list) = http(addr, "GET", "/api/clients").await?;
    Ok(list.as_array().cloned().unwrap_or_default())
}

/// A minimal HTTP/1.1 request to the server's REST API; the status and the JSON body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.get(9..12).and_then(|s| s.parse().ok()).context("HTTP status")?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}
