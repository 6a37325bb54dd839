//! `tether demo`: an LwM2M server and three devices in one process on loopback, showing one
//! DTLS handshake per device serving every request that follows, with figures measured in
//! the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether::lwm2m::{Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, DtlsServerConfig, Lwm2mDevice, Lwm2mDeviceConfig};
use tether_coap::content::{self, Path};
use tether_coap::device::ClientConfig as DeviceConfig;
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, ServerConfig, StaticPskStore};

use crate::bench::lwm2m::{read_after_new_handshake, Waiters};
use crate::bench::percentiles_us;

/// Devices in the demo.
const DEVICES: usize = 3;
/// Resources read from each device.
const PATHS: [&str; 3] = ["/3/0/0", "/3/0/1", "/3/0/2"];
/// Key of the demo's devices (a demo, not a secret).
const KEY: &str = "64656d6f2d6b6579";

/// Runs the demo: `rounds` rounds of reads, then `samples` latency samples per mode.
pub fn run(rounds: usize, samples: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(demo(rounds, samples))
}

async fn demo(rounds: usize, samples: usize) -> Result<()> {
    let key = PskKey::from_hex(KEY)?;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("demo-sensor-{i}")).collect();
    let mut store = StaticPskStore::new();
    let mut authorizer = HashMap::new();
    for name in &names {
        store.insert(name.clone(), key.clone());
        authorizer.insert(format!("psk:{name}"), name.clone());
    }
    let context = DtlsContext::server(ServerConfig::psk(store))?;
    let dtls = Arc::new(DtlsServer::bind("127.0.0.1:0".parse()?, context, DtlsServerConfig::default()).await?);
    let server =
        Lwm2mServer::start(Arc::clone(&dtls), Arc::new(authorizer), None, Lwm2mServerConfig::default()).await?;
    let addr = dtls.local_addr();
    say!("tether demo: LwM2M server on coaps://{addr} (DTLS 1.2, PSK), {DEVICES} devices on loopback\n");

    let mut devices = Vec::new();
    for name in &names {
        let context = DtlsContext::client(ClientConfig::psk(name.clone(), key.clone()))?;
        let mut config =
            Lwm2mDeviceConfig::new(DeviceConfig::new(name.clone(), format!("coaps://{addr}")), addr, context);
        // Every new handshake of the demo is a full one, so the comparison below is plain.
        config.resume = false;
        let device = Lwm2mDevice::start(config)?;
        let location = tokio::time::timeout(Duration::from_secs(10), device.registered())
            .await
            .ok()
            .flatten()
            .with_context(|| format!("{name} did not register"))?;
        say!(
            "  {name} registered at {location} from {} (handshakes so far: {})",
            device.local_addr(),
            handshakes(&dtls).await
        );
        devices.push(device);
    }
    say!();

    let mut requests = 0;
    let mut reused = 0;
    for round in 0..rounds {
        for name in &names {
            for path in PATHS {
                let before = handshakes(&dtls).await;
                let began = Instant::now();
                let answer = server.read(name, path).await?;
                let took = began.elapsed();
                let after = handshakes(&dtls).await;
                requests += 1;
                let same = after == before;
                reused += usize::from(same);
                let value = answer
                    .content_format
                    .and_then(|cf| content::decode(cf, &Path::parse(path).ok()?, &answer.payload).ok())
                    .and_then(|entries| entries.into_iter().next())
                    .map_or_else(|| String::from_utf8_lossy(&answer.payload).into_owned(), |e| content::text(&e.value));
                say!(
                    "  round {} {name} READ {path:<7} -> {:<18} {:>7.2} ms  reused session: {}  (handshakes so far: {after})",
                    round + 1,
                    format!("{value:?}"),
                    took.as_secs_f64() * 1e3,
                    if same { "yes" } else { "NO" },
                );
            }
        }
    }
    let total_handshakes = handshakes(&dtls).await;
    say!(
        "\n  {requests} reads of {DEVICES} devices: {reused} reused their device's session; {total_handshakes} handshakes in \
         all, one per device, made when it registered\n"
    );
    if reused != requests || total_handshakes != DEVICES as u64 {
        bail!("a read needed a new handshake: pooling is broken");
    }

    // Latency: pooled reads versus reads that need a new handshake, measured now.
    let peers: Vec<(String, SocketAddr)> =
        server.registrations().await.into_iter().map(|r| (r.endpoint, r.peer)).collect();
    let mut pooled = Vec::new();
    for i in 0..samples {
        let (name, _) = &peers[i % peers.len()];
        let began = Instant::now();
        server.read(name, PATHS[0]).await?;
        pooled.push(began.elapsed());
    }
    let waiters = Waiters::listen(&server);
    let mut fresh = Vec::new();
    for i in 0..samples {
        let (name, _) = &peers[i % peers.len()];
        let began = Instant::now();
        read_after_new_handshake(&server, &waiters, name).await?;
        fresh.push(began.elapsed());
    }
    let (p50, p99) = percentiles_us(&mut pooled);
    let (f50, f99) = percentiles_us(&mut fresh);
    let stats = dtls.stats().await.context("server stats")?;

    say!("  measured in this run                       value");
    say!("  handshakes : requests (reads above)        {total_handshakes} : {requests}");
    say!("  pooled read latency p50 / p99              {:.2} ms / {:.2} ms  ({samples} reads)", p50 / 1e3, p99 / 1e3);
    say!(
        "  read needing a new handshake p50 / p99     {:.2} ms / {:.2} ms  ({samples} reads: close, full handshake, Update, read)",
        f50 / 1e3,
        f99 / 1e3
    );
    say!("  a new handshake costs the read            {:.1}x its pooled latency (p50)", f50 / p50);
    say!("\n  pool after the latency samples (each sample above closed a session and opened another)");
    say!(
        "  sessions {}  handshakes {}  requests {}  closed {}",
        stats.pool.sessions,
        stats.pool.handshakes_total,
        stats.pool.requests_total,
        stats.pool.closed_total
    );
    for session in &stats.pool.per_session {
        say!(
            "    {:<22} {:<15} requests {:>4}  in {:>6} B  out {:>6} B  idle {:>5.2} s",
            session.peer,
            session.identity.as_deref().unwrap_or("-"),
            session.requests,
            session.bytes_in,
            session.bytes_out,
            session.idle.as_secs_f64()
        );
    }
    for device in &devices {
        device.deregister().await;
    }
    dtls.shutdown().await;
    Ok(())
}

async fn handshakes(dtls: &DtlsServer) -> u64 {
    dtls.stats().await.map_or(0, |s| s.endpoint.handshakes_completed)
}
