//! `tether bench lwm2m`: N devices (a `tether device --count N` child process) register with
//! an LwM2M server in this process; the server reads /3/0/0 from all of them as fast as it
//! can for a bounded time, first over each device's pooled session, then with a new
//! handshake for every read (the pre-pooling behaviour, kept only for this comparison).
//!
//! With the devices in their own process, this process's CPU time and memory are the
//! server's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether::lwm2m::{Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, DtlsServerConfig};
use tether_coap::coap_lite::ResponseType;
use tether_coap::registration::RegistryEvent;
use tether_proto::dtls::{DtlsContext, PskKey, ServerConfig, StaticPskStore};
use tokio::sync::oneshot;

use super::{cpu_seconds, heap_in_use_bytes, live_rss_bytes, percentiles_us, rss_bytes, Figure};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Lwm2mBenchOptions {
    /// Devices.
    pub devices: usize,
    /// Seconds per read phase.
    pub seconds: f64,
    /// Reads in flight at once.
    pub concurrency: usize,
    /// tokio worker threads of the server; 1 runs a current-thread runtime.
    pub threads: usize,
}

/// The PSK key of the bench fleet.
const KEY: &str = "62656e63682d6b6579";
/// The read every phase makes.
const PATH: &str = "/3/0/0";

/// Runs the benchmark; the server's tasks run on a runtime of `threads` workers (1: a
/// current-thread runtime, where the server's actors hand work to each other without
/// crossing threads).
pub fn run(options: &Lwm2mBenchOptions) -> Result<Vec<Figure>> {
    let runtime = if options.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(options.threads).enable_all().build()?
    };
    runtime.block_on(measure(options))
}

/// A child process this benchmark started; ended by its PID when dropped.
pub(crate) struct Fleet(pub(crate) Child);

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One phase's reads.
pub struct Phase {
    /// Reads answered 2.05.
    pub reads: usize,
    /// Reads that failed.
    pub failures: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of each answered read.
    pub latencies: Vec<Duration>,
    /// CPU seconds this process spent.
    pub cpu: f64,
}

impl Phase {
    /// Reads per second.
    pub fn rate(&self) -> f64 {
        self.reads as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per read.
    pub fn cpu_per_read_us(&self) -> f64 {
        self.cpu / self.reads.max(1) as f64 * 1e6
    }
}

async fn measure(options: &Lwm2mBenchOptions) -> Result<Vec<Figure>> {
    let openssl_session_kib = super::openssl_baseline::openssl_session_heap_bytes(1000)? / 1024.0;
    let key = PskKey::from_hex(KEY)?;
    let mut store = StaticPskStore::new();
    let mut authorizer = HashMap::new();
    for i in 0..options.devices {
        store.insert(format!("bench-{i}"), key.clone());
        authorizer.insert(format!("psk:bench-{i}"), format!("bench-{i}"));
    }
    let context = DtlsContext::server(ServerConfig::psk(store))?;
    let dtls = Arc::new(DtlsServer::bind("127.0.0.1:0".parse()?, context, DtlsServerConfig::default()).await?);
    let server =
        Lwm2mServer::start(Arc::clone(&dtls), Arc::new(authorizer), None, Lwm2mServerConfig::default()).await?;
    let mut events = server.events();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = live_rss_bytes()?;
    let heap_before = heap_in_use_bytes();

    // Registration: the fleet is started and every device registers once.
    let started = Instant::now();
    let _fleet = Fleet(
        Command::new(std::env::current_exe()?)
            .args(["device", "--server", &format!("coaps://{}", dtls.local_addr())])
            .args(["--count", &options.devices.to_string(), "--endpoint", "bench", "--psk-identity", "bench"])
            .args(["--psk-key", KEY, "--duration", "3600", "--no-resume"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the device fleet (tether device)")?,
    );
    let mut registered = 0;
    while registered < options.devices {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Ok(RegistryEvent::Registered { .. })) => registered += 1,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                registered = server.registrations().await.len();
            }
            Ok(Err(_)) => bail!("server stopped"),
            Err(_) => bail!("only {registered} of {} devices registered within 60 s", options.devices),
        }
    }
    let registration_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let raw_rss_after = rss_bytes()?;
    let rss_after = live_rss_bytes()?;
    let heap_after = heap_in_use_bytes();
    let peers: Vec<(String, SocketAddr)> =
        server.registrations().await.into_iter().map(|r| (r.endpoint, r.peer)).collect();

    let phase = Duration::from_secs_f64(options.seconds);
    let pooled = pooled_reads(&server, &peers, options.concurrency, phase).await;
    let before = dtls.stats().await.context("server stats")?.endpoint;
    let waiters = Waiters::listen(&server);
    let fresh = fresh_session_reads(&server, &waiters, &peers, options.concurrency, phase).await;
    let stats = dtls.stats().await.context("server stats")?;
    let baseline_handshakes = stats.endpoint.handshakes_completed - before.handshakes_completed;
    let baseline_resumed = stats.endpoint.handshakes_resumed - before.handshakes_resumed;
    if pooled.reads == 0 || fresh.reads == 0 {
        bail!("no read completed (pooled {}, new-handshake {})", pooled.reads, fresh.reads);
    }

    let (mut pooled_lat, mut fresh_lat) = (pooled.latencies.clone(), fresh.latencies.clone());
    let (p50, p99) = percentiles_us(&mut pooled_lat);
    let (f50, f99) = percentiles_us(&mut fresh_lat);
    let n = options.devices;
    let heap_per_device = (heap_after - heap_before) / n as f64 / 1024.0;
    let rss_per_device = (rss_after - rss_before) / n as f64 / 1024.0;
    let pooled_label = format!("pooled reads/s ({n} devices)");
    Ok(vec![
        Figure::new(
            pooled_label,
            pooled.rate(),
            "reads/s",
            "reads/s, new full handshake per read",
            fresh.rate(),
            format!(
                "{} pooled reads ({} failed) in {:.1} s, {} in flight, {} | {} new-handshake reads ({} failed) in {:.1} s: \
                 {} PSK handshakes, {} of them resumed",
                pooled.reads,
                pooled.failures,
                pooled.elapsed.as_secs_f64(),
                options.concurrency,
                if options.threads <= 1 { "current-thread runtime".to_string() } else { format!("{}-thread runtime", options.threads) },
                fresh.reads,
                fresh.failures,
                fresh.elapsed.as_secs_f64(),
                baseline_handshakes,
                baseline_resumed,
            ),
        ),
        Figure::new("read latency p50, pooled", p50, "us", "p50, new full handshake per read", f50, ""),
        Figure::new("read latency p99, pooled", p99, "us", "p99, new full handshake per read", f99, ""),
        Figure::new(
            "server CPU per pooled read",
            pooled.cpu_per_read_us(),
            "us",
            "per read with a new handshake",
            fresh.cpu_per_read_us(),
            format!("CPU time of this process (the server; devices run in their own) {:.2} s and {:.2} s", pooled.cpu, fresh.cpu),
        ),
        Figure::alone(
            "registrations/s",
            n as f64 / registration_time.as_secs_f64(),
            "reg/s",
            format!(
                "{n} devices started together by `tether device --count {n}`, all registered in {:.2} s (handshake + Register each)",
                registration_time.as_secs_f64()
            ),
        ),
        Figure::new(
            "server heap per registered device",
            heap_per_device,
            "KiB",
            "OpenSSL established session alone (this run)",
            openssl_session_kib,
            format!(
                "heap in live allocations (glibc mallinfo2): DTLS session, pool entry, CoAP layer, registration; \
                 RSS after malloc_trim {rss_per_device:.1} KiB per device ({:.1} -> {:.1} MiB), raw RSS {:.1} MiB \
                 (glibc keeps the handshakes' freed memory)",
                rss_before / 1048576.0,
                rss_after / 1048576.0,
                raw_rss_after / 1048576.0
            ),
        ),
    ])
}

/// Reads `PATH` round-robin over every device, `concurrency` at once, for `duration`.
pub async fn pooled_reads(
    server: &Lwm2mServer,
    peers: &[(String, SocketAddr)],
    concurrency: usize,
    duration: Duration,
) -> Phase {
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency.min(peers.len()) {
        let server = server.clone();
        let endpoints: Vec<String> = peers.iter().skip(w).step_by(concurrency).map(|(e, _)| e.clone()).collect();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
            for endpoint in endpoints.iter().cycle() {
                if start.elapsed() >= duration {
                    break;
                }
                let began = Instant::now();
                match server.read(endpoint, PATH).await {
                    Ok(answer) if answer.code == ResponseType::Content => {
                        ok += 1;
                        latencies.push(began.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, latencies)
        }));
    }
    collect(workers, start, cpu_before).await
}

/// Reads that each need a new handshake: the server closes the device's session, the
/// device re-handshakes and sends an Update, then the server reads.
/// The latency runs from the close to the read's answer.
pub async fn fresh_session_reads(
    server: &Lwm2mServer,
    waiters: &Waiters,
    peers: &[(String, SocketAddr)],
    concurrency: usize,
    duration: Duration,
) -> Phase {
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency.min(peers.len()) {
        let server = server.clone();
        let waiters = waiters.clone();
        let mine: Vec<(String, SocketAddr)> = peers.iter().skip(w).step_by(concurrency).cloned().collect();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
            for (endpoint, _) in mine.iter().cycle() {
                if start.elapsed() >= duration {
                    break;
                }
                let began = Instant::now();
                match read_after_new_handshake(&server, &waiters, endpoint).await {
                    Ok(()) => {
                        ok += 1;
                        latencies.push(began.elapsed());
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed, latencies)
        }));
    }
    collect(workers, start, cpu_before).await
}

/// One read over a session opened for it: the endpoint's session is closed, and the read
/// waits for the device to come back over a new one.
pub async fn read_after_new_handshake(server: &Lwm2mServer, waiters: &Waiters, endpoint: &str) -> Result<()> {
    let updated = waiters.expect(endpoint);
    if let Some((session, _)) = server.dtls().session_of(endpoint).await {
        server.dtls().close(session).await;
    }
    tokio::time::timeout(Duration::from_secs(10), updated)
        .await
        .context("the device did not come back")?
        .context("server stopped")?;
    let answer = server.read(endpoint, PATH).await?;
    if answer.code != ResponseType::Content {
        bail!("read answered {:?}", answer.code);
    }
    Ok(())
}

type WorkerResult = (usize, usize, Vec<Duration>);

async fn collect(workers: Vec<tokio::task::JoinHandle<WorkerResult>>, start: Instant, cpu_before: f64) -> Phase {
    let mut phase = Phase { reads: 0, failures: 0, elapsed: Duration::ZERO, latencies: Vec::new(), cpu: 0.0 };
    for worker in workers {
        if let Ok((ok, failed, latencies)) = worker.await {
            phase.reads += ok;
            phase.failures += failed;
            phase.latencies.extend(latencies);
        }
    }
    phase.elapsed = start.elapsed();
    phase.cpu = cpu_seconds().unwrap_or(0.0) - cpu_before;
    phase
}

/// Who waits for which endpoint's next Register or Update.
#[derive(Clone, Default)]
pub struct Waiters {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

impl Waiters {
    /// Dispatches the server's registry events to waiters.
    pub fn listen(server: &Lwm2mServer) -> Self {
        let waiters = Self::default();
        let waiting = Arc::clone(&waiters.waiting);
        let mut events = server.events();
        tokio::spawn(async move {
            loop {
                let endpoint = match events.recv().await {
                    Ok(
                        RegistryEvent::Registered { registration, .. } | RegistryEvent::Updated { registration, .. },
                    ) => registration.endpoint,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if let Some(waiter) = waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&endpoint) {
                    let _ = waiter.send(());
                }
            }
        });
        waiters
    }

    /// Resolves at `endpoint`'s next Register or Update.
    pub fn expect(&self, endpoint: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(endpoint.to_string(), tx);
        rx
    }
}
