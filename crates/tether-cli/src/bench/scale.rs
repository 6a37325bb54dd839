//! `tether bench scale`: an LwM2M server in this process holding N devices' sessions and
//! registrations (N = 100,000 on a 2-core machine), with live memory per device and the read
//! rate across all of them.
//!
//! The devices are `tether device` fleets in child processes (so this process's memory is
//! the server's), each on its own loopback address (one address has ~28,000 ephemeral ports)
//! and below the per-process file limit. They register at a bounded rate, as a fleet
//! returning from an outage would; every handshake is a full one.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether::lwm2m::{Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, DtlsServerConfig};
use tether_coap::registration::RegistryEvent;
use tether_proto::dtls::{DtlsContext, EndpointConfig, PskKey, ServerConfig, StaticPskStore};
use tether_proto::pool::PoolConfig;

use super::lwm2m::{pooled_reads, Fleet};
use super::{heap_in_use_bytes, live_rss_bytes, percentiles_us, rss_bytes, Figure};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ScaleBenchOptions {
    /// Devices held.
    pub devices: usize,
    /// Devices per `tether device` process (each holds about two sockets per device).
    pub per_process: usize,
    /// Registrations started per second, over all processes.
    pub rate: f64,
    /// Seconds of reads.
    pub seconds: f64,
    /// Reads in flight at once.
    pub concurrency: usize,
}

const KEY: &str = "7363616c652d6b6579";

/// Runs the benchmark on a current-thread runtime (the server's actors hand work to each
/// other without crossing threads; the fleets have the other core).
pub fn run(options: &ScaleBenchOptions) -> Result<Vec<Figure>> {
    if options.devices == 0 || options.per_process == 0 || options.rate.is_nan() || options.rate <= 0.0 {
        bail!("--devices, --per-process and --rate must be positive");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(measure(options))
}

async fn measure(options: &ScaleBenchOptions) -> Result<Vec<Figure>> {
    let n = options.devices;
    let openssl_session = super::openssl_baseline::openssl_session_heap_bytes(1000)?;
    let fleets = n.div_ceil(options.per_process);
    if fleets > 250 {
        bail!("{fleets} fleet processes: raise --per-process");
    }
    let key = PskKey::from_hex(KEY)?;
    let mut store = StaticPskStore::new();
    let mut authorizer = HashMap::new();
    let mut counts = Vec::new();
    for k in 0..fleets {
        let count = options.per_process.min(n - k * options.per_process);
        counts.push(count);
        for i in 0..count {
            let name = if count == 1 { format!("scale{k}") } else { format!("scale{k}-{i}") };
            store.insert(name.clone(), key.clone());
            authorizer.insert(format!("psk:{name}"), name);
        }
    }
    let context = DtlsContext::server(ServerConfig::psk(store))?;
    let config = DtlsServerConfig::default()
        .endpoint(EndpointConfig::new(tether::os_seed()).max_sessions(n + 1000))
        .pool(PoolConfig::default().capacity(n + 1000).idle_timeout(Duration::from_secs(3600)));
    let dtls = Arc::new(DtlsServer::bind("127.0.0.1:0".parse()?, context, config).await?);
    let server =
        Lwm2mServer::start(Arc::clone(&dtls), Arc::new(authorizer), None, Lwm2mServerConfig::default()).await?;
    let mut events = server.events();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = live_rss_bytes()?;
    let heap_before = heap_in_use_bytes();

    let started = Instant::now();
    let rate = options.rate / fleets as f64;
    let mut children = Vec::new();
    for (k, count) in counts.iter().enumerate() {
        let bind = format!("127.0.{}.{}", 1 + k / 250, 1 + k % 250);
        let child = Command::new(std::env::current_exe()?)
            .args(["device", "--server", &format!("coaps://{}", dtls.local_addr())])
            .args(["--count", &count.to_string(), "--endpoint", &format!("scale{k}")])
            .args(["--psk-identity", &format!("scale{k}"), "--psk-key", KEY, "--bind", &bind])
            .args(["--rate", &format!("{rate:.3}"), "--lifetime", "86400", "--retry-timer", "5", "--jitter"])
            .args(["--duration", "7200", "--no-resume"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a device fleet (tether device)")?;
        children.push(Fleet(child));
    }
    let budget = Duration::from_secs_f64(60.0 + 3.0 * n as f64 / options.rate);
    let mut registered = 0;
    let mut last_report = Instant::now();
    while registered < n {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(RegistryEvent::Registered { .. })) => registered += 1,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                registered = server.registrations().await.len();
            }
            Ok(Err(_)) => bail!("server stopped"),
            Err(_) => {}
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "tether bench scale: {registered} of {n} registered after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if started.elapsed() > budget {
            bail!("only {registered} of {n} devices registered within {:.0} s", budget.as_secs_f64());
        }
    }
    let registration_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let raw_rss = rss_bytes()?;
    let rss_after = live_rss_bytes()?;
    let heap_after = heap_in_use_bytes();
    let peers: Vec<_> = server.registrations().await.into_iter().map(|r| (r.endpoint, r.peer)).collect();

    // Reads across every device, then across the first 1,000 only: the same server, the
    // same run; the ratio shows what holding N sessions costs each read.
    let phase = Duration::from_secs_f64(options.seconds);
    let all = pooled_reads(&server, &peers, options.concurrency, phase).await;
    let few = pooled_reads(&server, &peers[..peers.len().min(1000)], options.concurrency, phase).await;
    let stats = dtls.stats().await.context("server stats")?;
    drop(children);
    if all.reads == 0 || few.reads == 0 {
        bail!("no read completed");
    }
    let (mut all_lat, mut few_lat) = (all.latencies.clone(), few.latencies.clone());
    let (p50, p99) = percentiles_us(&mut all_lat);
    let (f50, f99) = percentiles_us(&mut few_lat);
    let heap_per_device = (heap_after - heap_before) / n as f64;
    let rss_per_device = (rss_after - rss_before) / n as f64;
    Ok(vec![
        Figure::new(
            format!("server heap per registered device ({n})"),
            heap_per_device / 1024.0,
            "KiB",
            "OpenSSL established session alone (this run)",
            openssl_session / 1024.0,
            format!(
                "live allocations (glibc mallinfo2): DTLS session, resumption cache, pool entry, CoAP layer, \
                 registration; RSS after malloc_trim {:.2} KiB per device ({:.1} -> {:.1} MiB), raw RSS {:.1} MiB",
                rss_per_device / 1024.0,
                rss_before / 1048576.0,
                rss_after / 1048576.0,
                raw_rss / 1048576.0
            ),
        ),
        Figure::new(
            format!("pooled reads/s across {n} devices"),
            all.rate(),
            "reads/s",
            "across 1,000 of them",
            few.rate(),
            format!(
                "{} reads ({} failed), p50 {p50:.0} us p99 {p99:.0} us, CPU {:.1} us/read | {} reads ({} failed), \
                 p50 {f50:.0} us p99 {f99:.0} us, CPU {:.1} us/read; {} in flight",
                all.reads,
                all.failures,
                all.cpu_per_read_us(),
                few.reads,
                few.failures,
                few.cpu_per_read_us(),
                options.concurrency
            ),
        ),
        Figure::alone(
            "registrations/s",
            n as f64 / registration_time.as_secs_f64(),
            "reg/s",
            format!(
                "{n} devices in {fleets} `tether device` processes, started at {:.0}/s, all registered in {:.0} s; \
                 {} handshakes, {} sessions held",
                options.rate,
                registration_time.as_secs_f64(),
                stats.endpoint.handshakes_completed,
                stats.pool.sessions
            ),
        ),
    ])
}
