//! `tether bench pool`: requests to one peer through the session pool versus a new
//! handshake per request (the pre-pooling behaviour, kept here only for this comparison),
//! and pooled DTLS round trips versus plain UDP on the same path. Real tokio drivers, real
//! UDP sockets on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether::{Dialer, DtlsClient, DtlsServer, DtlsServerConfig, SessionPool};
use tether_proto::dtls::{CipherSuite, ClientConfig, DtlsContext, PskKey, ServerConfig, SessionConfig, StaticPskStore};
use tether_proto::pool::PoolConfig;
use tokio::net::UdpSocket;

use super::{percentiles_us, Figure};

/// What to measure.
#[derive(Debug, Clone)]
pub struct PoolBenchOptions {
    /// Requests per mode.
    pub requests: usize,
    /// Bytes per request.
    pub payload: usize,
    /// Upper bound on the time spent per mode.
    pub max_duration: Duration,
    /// tokio worker threads; 1 runs a current-thread runtime.
    pub threads: usize,
}

struct Run {
    count: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    handshakes: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs the pool benchmark on a tokio runtime of its own.
pub fn run(options: &PoolBenchOptions) -> Result<Vec<Figure>> {
    let runtime = if options.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(options.threads).enable_all().build()?
    };
    runtime.block_on(measure(options))
}

async fn measure(options: &PoolBenchOptions) -> Result<Vec<Figure>> {
    let key = PskKey::from_hex("73656372657450534b")?;
    let session = SessionConfig::default().cipher_suites(&[CipherSuite::PskAes128Ccm8]);
    let server_ctx = DtlsContext::server(
        ServerConfig::psk(StaticPskStore::new().with("bench", key.clone())).session(session.clone()),
    )?;
    let client_ctx = DtlsContext::client(ClientConfig::psk("bench", key).session(session))?;
    let config = DtlsServerConfig::default();
    let config = DtlsServerConfig { endpoint: super::capacity_limits(config.endpoint.clone()), ..config };
    let server = Arc::new(DtlsServer::bind("127.0.0.1:0".parse()?, server_ctx, config).await?);
    let echo = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some((peer, data)) = echo.recv().await {
            let _ = echo.send_to(peer, &data).await;
        }
    });
    let peer = server.local_addr();
    let payload = vec![0x42u8; options.payload];

    let pooled = pooled(&client_ctx, peer, &payload, options).await?;
    let per_request = per_request(&client_ctx, peer, &payload, options).await?;
    let udp = plain_udp(&payload, options).await?;
    let server_handshakes = server.stats().await.map_or(0, |s| s.endpoint.handshakes_completed);
    server.shutdown().await;

    let mut pooled_lat = pooled.latencies.clone();
    let mut per_lat = per_request.latencies.clone();
    let mut udp_lat = udp.latencies.clone();
    let (p50, p99) = percentiles_us(&mut pooled_lat);
    let (h50, h99) = percentiles_us(&mut per_lat);
    let (u50, u99) = percentiles_us(&mut udp_lat);
    Ok(vec![
        Figure::new(
            "pooled requests/s (PSK)",
            pooled.rate(),
            "req/s",
            "handshake-per-request req/s",
            per_request.rate(),
            format!(
                "tokio {} | pooled: {} requests, {} handshake(s), p50 {p50:.0} us p99 {p99:.0} us | per-request: {} requests, {} handshakes, p50 {h50:.0} us p99 {h99:.0} us | server saw {server_handshakes} handshakes",
                runtime_label(options.threads), pooled.count, pooled.handshakes, per_request.count, per_request.handshakes
            ),
        ),
        Figure::new(
            "pooled DTLS round trips/s",
            pooled.rate(),
            "rt/s",
            "plain UDP round trips/s",
            udp.rate(),
            format!("{}-byte payload; UDP p50 {u50:.0} us p99 {u99:.0} us (same tokio runtime, same loopback path)", options.payload),
        ),
    ])
}

async fn pooled(
    context: &Arc<DtlsContext>,
    peer: SocketAddr,
    payload: &[u8],
    options: &PoolBenchOptions,
) -> Result<Run> {
    let pool = SessionPool::new(PoolConfig::default(), Some(Arc::clone(context)), Dialer::Udp, None)?;
    let mut latencies = Vec::with_capacity(options.requests);
    let start = Instant::now();
    while latencies.len() < options.requests && start.elapsed() < options.max_duration {
        let began = Instant::now();
        let session = pool.get_or_connect(peer).await?;
        session.send(payload).await?;
        let echo = tokio::time::timeout(Duration::from_secs(5), session.recv()).await.context("pooled echo")?;
        if echo.as_deref() != Some(payload) {
            bail!("pooled echo mismatch");
        }
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed();
    let handshakes = pool.stats().await.handshakes_total;
    Ok(Run { count: latencies.len(), elapsed, latencies, handshakes })
}

async fn per_request(
    context: &Arc<DtlsContext>,
    peer: SocketAddr,
    payload: &[u8],
    options: &PoolBenchOptions,
) -> Result<Run> {
    let mut latencies = Vec::with_capacity(options.requests);
    let start = Instant::now();
    while latencies.len() < options.requests && start.elapsed() < options.max_duration {
        let began = Instant::now();
        let client = DtlsClient::connect(peer, context).await?;
        client.send(payload).await?;
        let echo = tokio::time::timeout(Duration::from_secs(5), client.recv()).await.context("per-request echo")?;
        if echo.as_deref() != Some(payload) {
            bail!("per-request echo mismatch");
        }
        client.close().await;
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed();
    let count = latencies.len();
    Ok(Run { count, elapsed, latencies, handshakes: count as u64 })
}

async fn plain_udp(payload: &[u8], options: &PoolBenchOptions) -> Result<Run> {
    let server = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.connect(addr).await?;
    let mut buf = vec![0u8; 65_536];
    let mut latencies = Vec::with_capacity(options.requests);
    let start = Instant::now();
    while latencies.len() < options.requests && start.elapsed() < options.max_duration {
        let began = Instant::now();
        client.send(payload).await?;
        tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.context("udp echo")??;
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed();
    echo.abort();
    Ok(Run { count: latencies.len(), elapsed, latencies, handshakes: 0 })
}

fn runtime_label(threads: usize) -> String {
    if threads <= 1 {
        "current-thread runtime".to_string()
    } else {
        format!("{threads}-thread runtime")
    }
}
