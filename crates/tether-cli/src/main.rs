//! The `tether` command.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// A line on standard output, like `println!`, except that a closed stdout (`tether device
/// | head`) is not a panic: the line is lost and the command goes on.
macro_rules! say {
    () => {
        $crate::say_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}

/// Writes one line to stdout, ignoring a closed pipe. See `say!`.
fn say_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
}

mod api;
mod bench;
mod bootstrap;
mod cluster;
mod demo;
mod device;
mod echo;
mod limits;
mod serve;
mod stores;

/// tether: secure, persistent device links over DTLS.
#[derive(Parser)]
#[command(name = "tether", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The LwM2M server over CoAP over DTLS, with its REST API and web UI, on embedded defaults
    /// (CoAPs 127.0.0.1:5684, HTTP 127.0.0.1:8080, SQLite under ./tether-data).
    Serve(serve::ServeArgs),
    /// An LwM2M device, or a fleet (`--count N`), against a server; by default the
    /// development device of `tether serve`'s embedded defaults.
    Device(device::DeviceArgs),
    /// An LwM2M bootstrap server: devices that ask (`tether device --bootstrap`) are given
    /// the LwM2M server configured for their endpoint in the security file.
    Bootstrap(bootstrap::BootstrapArgs),
    /// An LwM2M server and three devices in one process on loopback: reads of /3/0/0,
    /// /3/0/1 and /3/0/2 on each, whether each reused its session, and what a new handshake
    /// per request would cost, measured in the run.
    Demo {
        /// Rounds of reads (each reads three resources of every device).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Reads measured per mode for the latency comparison.
        #[arg(long, default_value_t = 30)]
        samples: usize,
    },
    /// A DTLS echo server (PSK) for trying peers against tether's engine.
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5684")]
        listen: std::net::SocketAddr,
        /// PSK identity accepted.
        #[arg(long, default_value = "identity")]
        psk_identity: String,
        /// Its key, in hex.
        #[arg(long, default_value = "73656372657450534b")]
        psk_key: String,
    },
    /// Measure tether, each figure beside a baseline from the same run.
    Bench {
        #[command(subcommand)]
        target: BenchTarget,
    },
}

#[derive(Subcommand)]
enum BenchTarget {
    /// The DTLS engine over real UDP on 127.0.0.1: handshakes/s (full PSK, resumed,
    /// ECDHE-ECDSA), record round trips versus plain UDP, memory per session.
    Dtls {
        /// Seconds spent on each rate measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Sessions held at once for the memory figure.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Bytes per record in the round-trip figure.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// LwM2M end to end: N devices (a `tether device` child process) register; the server
    /// reads /3/0/0 from all of them over their pooled sessions, then with a new handshake
    /// per read, each for a bounded time. Reports registrations/s, reads/s, latency, server
    /// CPU per read and server memory per device.
    Lwm2m {
        /// Devices in the fleet.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Seconds per read phase.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Reads in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// tokio worker threads of the server (1: a current-thread runtime).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// N devices held at once by an LwM2M server in this process (the fleets in child
    /// processes): live memory per device (sessions, CoAP layers, registrations) and the read
    /// rate across all of them beside the rate across 1,000.
    Scale {
        /// Devices held.
        #[arg(long, default_value_t = 100_000)]
        devices: usize,
        /// Devices per `tether device` process (each holds about two file descriptors per
        /// device, within the per-process limit).
        #[arg(long, default_value_t = 8_000)]
        per_process: usize,
        /// Registrations started per second, over all processes.
        #[arg(long, default_value_t = 1_500.0)]
        rate: f64,
        /// Seconds per read phase.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Reads in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// `tether serve` killed with SIGKILL under a fleet and started again: handshakes until
    /// every device is back, with the session store and (baseline) without it.
    Restart {
        /// Devices in the fleet.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Registration lifetime in seconds (devices update at about half of it).
        #[arg(long, default_value_t = 20)]
        lifetime: u64,
        /// Longest wait, in seconds, for the fleet after each restart.
        #[arg(long, default_value_t = 180)]
        patience: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The session pool over real UDP on 127.0.0.1: requests to one peer through the pool
    /// versus a new handshake per request, and pooled round trips versus plain UDP.
    Pool {
        /// Requests per mode.
        #[arg(long, default_value_t = 3_000)]
        requests: usize,
        /// Bytes per request.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Most seconds spent per mode.
        #[arg(long, default_value_t = 10.0)]
        max_seconds: f64,
        /// tokio worker threads (1: a current-thread runtime, where both modes pay the least
        /// scheduling overhead).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The exit status after a panic (EX_SOFTWARE, sysexits.h).
const EXIT_PANIC: i32 = 70;

/// Makes a panic in any thread or task fatal and visible: it is printed and logged, and the
/// process exits with [`EXIT_PANIC`]. A server whose LwM2M task died would otherwise answer
/// HTTP with an empty fleet and look healthy; a supervisor restarts an exited one, and the
/// stored registrations and sessions bring every device back.
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        tracing::error!(panic = %info, "a task panicked: exiting with status {EXIT_PANIC}");
        std::process::exit(EXIT_PANIC);
    }));
}

fn main() -> Result<()> {
    exit_on_panic();
    match Cli::parse().command {
        Command::Serve(args) => {
            serve::init_logging(args.log_format, "info");
            let settings = serve::Settings::resolve(&args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve::run(settings))
        }
        Command::Bootstrap(args) => {
            serve::init_logging(args.log_format, "info");
            bootstrap::run(args)
        }
        Command::Device(args) => {
            serve::init_logging(serve::LogFormat::Text, "error");
            device::run(args)
        }
        Command::Demo { rounds, samples } => {
            if rounds == 0 || rounds > 1000 || samples == 0 || samples > 100_000 {
                anyhow::bail!("--rounds must be between 1 and 1000 and --samples between 1 and 100000");
            }
            demo::run(rounds, samples)
        }
        Command::Echo { listen, psk_identity, psk_key } => echo(listen, &psk_identity, &psk_key),
        Command::Bench { target } => bench(target),
    }
}

fn bench(target: BenchTarget) -> Result<()> {
    match target {
        BenchTarget::Dtls { seconds, sessions, payload, json } => {
            if !(seconds > 0.0 && seconds <= 600.0) {
                anyhow::bail!("--seconds must be between 0 and 600, got {seconds}");
            }
            if sessions == 0 || payload == 0 || payload > 1000 {
                anyhow::bail!("--sessions must be positive and --payload between 1 and 1000 bytes");
            }
            let options =
                bench::dtls::DtlsBenchOptions { duration: Duration::from_secs_f64(seconds), sessions, payload };
            let figures = bench::dtls::run(&options)?;
            report(json, "tether bench dtls (loopback, this machine, this run)", &figures)
        }
        BenchTarget::Lwm2m { devices, seconds, concurrency, threads, json } => {
            if devices == 0 || devices > 20_000 {
                anyhow::bail!("--devices must be between 1 and 20000, got {devices}");
            }
            if !(seconds > 0.0 && seconds <= 600.0) {
                anyhow::bail!("--seconds must be between 0 and 600, got {seconds}");
            }
            if concurrency == 0 || concurrency > 10_000 {
                anyhow::bail!("--concurrency must be between 1 and 10000, got {concurrency}");
            }
            if threads == 0 || threads > 64 {
                anyhow::bail!("--threads must be between 1 and 64, got {threads}");
            }
            let options = bench::lwm2m::Lwm2mBenchOptions { devices, seconds, concurrency, threads };
            let figures = bench::lwm2m::run(&options)?;
            report(json, "tether bench lwm2m (loopback, this machine, this run)", &figures)
        }
        BenchTarget::Scale { devices, per_process, rate, seconds, concurrency, json } => {
            if devices == 0 || devices > 1_000_000 || per_process == 0 || per_process > 9_000 {
                anyhow::bail!("--devices must be between 1 and 1000000 and --per-process between 1 and 9000");
            }
            if !(rate > 0.0 && rate <= 100_000.0 && seconds > 0.0 && seconds <= 600.0) || concurrency == 0 {
                anyhow::bail!("--rate must be in (0, 100000], --seconds in (0, 600] and --concurrency positive");
            }
            let options = bench::scale::ScaleBenchOptions { devices, per_process, rate, seconds, concurrency };
            let figures = bench::scale::run(&options)?;
            report(json, "tether bench scale (loopback, this machine, this run)", &figures)
        }
        BenchTarget::Restart { devices, lifetime, patience, json } => {
            if devices == 0 || devices > 9_000 || lifetime < 10 || patience == 0 {
                anyhow::bail!("--devices must be between 1 and 9000, --lifetime at least 10, --patience positive");
            }
            let patience = Duration::from_secs(patience);
            let options = bench::restart::RestartBenchOptions { devices, lifetime, patience };
            let figures = bench::restart::run(&options)?;
            report(json, "tether bench restart (loopback, this machine, this run)", &figures)
        }
        BenchTarget::Pool { requests, payload, max_seconds, threads, json } => {
            if requests == 0 || payload == 0 || payload > 1000 {
                anyhow::bail!("--requests must be positive and --payload between 1 and 1000 bytes");
            }
            if !(max_seconds > 0.0 && max_seconds <= 600.0) {
                anyhow::bail!("--max-seconds must be between 0 and 600, got {max_seconds}");
            }
            if threads == 0 || threads > 64 {
                anyhow::bail!("--threads must be between 1 and 64, got {threads}");
            }
            let options = bench::pool::PoolBenchOptions {
                requests,
                payload,
                max_duration: Duration::from_secs_f64(max_seconds),
                threads,
            };
            let figures = bench::pool::run(&options)?;
            report(json, "tether bench pool (loopback, this machine, this run)", &figures)
        }
    }
}

fn report(json: bool, title: &str, figures: &[bench::Figure]) -> Result<()> {
    if json {
        say!("{}", serde_json::to_string_pretty(figures)?);
    } else {
        bench::print_table(title, figures);
    }
    Ok(())
}

fn echo(listen: std::net::SocketAddr, identity: &str, key_hex: &str) -> Result<()> {
    use tether_proto::dtls::{
        DtlsContext, Endpoint, EndpointConfig, EndpointEvent, PskKey, ServerConfig, StaticPskStore,
    };

    let key = PskKey::from_hex(key_hex).map_err(|e| anyhow::anyhow!("--psk-key: {e}"))?;
    let store = StaticPskStore::new().with(identity, key);
    let context = DtlsContext::server(ServerConfig::psk(store))?;
    let endpoint = Endpoint::new(context, EndpointConfig::new(echo::os_seed()), std::time::Instant::now())?;
    let socket = std::net::UdpSocket::bind(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    say!("tether echo: DTLS 1.2 on udp {} with PSK identity {identity:?} (key not shown)", socket.local_addr()?);
    say!(
        "try: openssl s_client -dtls1_2 -psk_identity {identity} -psk <key> -cipher PSK-AES128-CCM8 -connect {}",
        socket.local_addr()?
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    echo::serve(&socket, endpoint, &stop, |event| match event {
        EndpointEvent::Connected { peer, identity, resumed, .. } => {
            let who = identity.as_ref().map_or("-".to_string(), ToString::to_string);
            say!("connected {peer} {who} resumed={resumed}");
        }
        EndpointEvent::Closed { peer, reason, .. } => say!("closed {peer}: {reason}"),
        EndpointEvent::Data { peer, data, .. } => say!("echo {} bytes to {peer}", data.len()),
        _ => {}
    })?;
    Ok(())
}
