//! `tether device`: one LwM2M device, or a fleet of them in one process (one UDP socket per
//! device, one shared runtime), against a server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tether::{Lwm2mDevice, Lwm2mDeviceConfig};
use tether_coap::bootstrap::ServerAccount;
use tether_coap::device::{ClientConfig as DeviceConfig, ClientStats, DeviceEvent, RetryTimers, SecurityMode};
use tether_proto::dtls::{CertifiedKey, ClientConfig, DtlsContext, PskKey, X509};
use tether_proto::resilience::Jitter;
use tokio::sync::{broadcast, mpsc};

use crate::serve::{parse_key, read_psk_entries, DEV_ENDPOINT, DEV_IDENTITY, DEV_KEY_HEX};

/// Flags of `tether device`.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// The server, `coaps://HOST:PORT` (HOST an IP address).
    #[arg(long, default_value = "coaps://127.0.0.1:5684")]
    pub server: String,
    /// Endpoint name; with `--count N`, devices are NAME-0 … NAME-(N-1). Default: the
    /// certificate's CN with `--certificate`, else `tether-dev` (the development device).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// PSK identity; with `--count N`, identities are ID-0 … ID-(N-1), all with the same key.
    #[arg(long, default_value = DEV_IDENTITY)]
    pub psk_identity: String,
    /// PSK key in hex, for every device. Default: each device's key from `--security FILE`,
    /// else the public development key `tether serve` accepts. A key on the command line
    /// shows in `ps`: give it in `TETHER_PSK_KEY` or a `--security` file instead.
    #[arg(long, env = "TETHER_PSK_KEY", hide_env_values = true)]
    pub psk_key: Option<String>,
    /// Take each device's PSK from this security file (its `[[psk]]` entries, as
    /// `--write-security` writes them), by identity.
    #[arg(long, value_name = "FILE", conflicts_with = "psk_key")]
    pub security: Option<PathBuf>,
    /// Authenticate with this certificate (PEM) instead of a PSK; its CN is the endpoint name.
    #[arg(long, value_name = "FILE", requires_all = ["private_key", "server_ca"])]
    pub certificate: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// Name the server's certificate must carry. Default: none checked beyond the chain.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Devices to run.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Devices started per second (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Registration lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    pub lifetime: u64,
    /// Communication Retry Timer (/1/0/18) in seconds: attempt n waits this · 2^(n−1).
    #[arg(long, default_value_t = 60.0)]
    pub retry_timer: f64,
    /// Communication Retry Count (/1/0/17): attempts per sequence.
    #[arg(long, default_value_t = 5)]
    pub retry_count: u32,
    /// Communication Sequence Delay Timer (/1/0/19) in seconds.
    #[arg(long, default_value_t = 86_400.0)]
    pub sequence_delay: f64,
    /// Communication Sequence Retry Count (/1/0/20).
    #[arg(long, default_value_t = 1)]
    pub sequence_retry_count: u32,
    /// Randomise retry delays (full jitter), so a fleet does not return in lockstep.
    #[arg(long)]
    pub jitter: bool,
    /// Re-handshake before sending after this many seconds of silence (NAT timeout).
    #[arg(long, value_name = "SECONDS")]
    pub nat_timeout: Option<f64>,
    /// Never resume a session: every handshake is a full one.
    #[arg(long)]
    pub no_resume: bool,
    /// Local address of the devices' sockets: an IP (a port each), or IP:PORT for one device
    /// on a port of its choosing. On loopback a fleet beyond ~25,000 devices runs out of
    /// ports on one address; give each fleet its own (127.0.1.1, 127.0.2.1, …).
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_bind)]
    pub bind: Option<SocketAddr>,
    /// Offer a DTLS Connection ID (RFC 9146): the server routes this device's records by
    /// it, so the session survives a new address or port (NAT rebinding) with no handshake.
    #[arg(long)]
    pub cid: bool,
    /// Send (LwM2M 1.1 `POST /dp`) the temperature (/3303/0/5700) and battery level (/3/0/9)
    /// every this many seconds while registered.
    #[arg(long, value_name = "SECONDS")]
    pub send_interval: Option<f64>,
    /// Bootstrap first from this bootstrap server (`coaps://HOST:PORT`, LwM2M client-initiated
    /// bootstrap), authenticating with the PSK identity and key given (`--psk-identity` with
    /// `--psk-key` or `--security`): it says which LwM2M server to register with, and with
    /// which PSK. `--server` is then not used.
    #[arg(long, value_name = "URI", conflicts_with_all = ["certificate", "write_security"])]
    pub bootstrap: Option<String>,
    /// Run this many seconds, then de-register and exit (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Write the `[[psk]]` entries of this fleet (identity, a new random key per device,
    /// endpoint) to FILE (mode 0600), for `tether serve --security FILE` and `tether device
    /// --security FILE`, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "security")]
    pub write_security: Option<PathBuf>,
}

impl DeviceArgs {
    /// Endpoint name and PSK identity of device `i`.
    fn names(&self, i: usize) -> (String, String) {
        let endpoint = self.endpoint.as_deref().unwrap_or(DEV_ENDPOINT);
        if self.count == 1 {
            (endpoint.to_string(), self.psk_identity.clone())
        } else {
            (format!("{endpoint}-{i}"), format!("{}-{i}", self.psk_identity))
        }
    }

    /// The key of each device, by index: `--psk-key`, the security file's entry for its
    /// identity, or the development key.
    fn keys(&self) -> Result<Keys> {
        if let Some(hex) = &self.psk_key {
            return Ok(Keys::Shared(parse_key(hex).context("--psk-key")?));
        }
        let Some(path) = &self.security else {
            return Ok(Keys::Shared(parse_key(DEV_KEY_HEX)?));
        };
        let entries: HashMap<String, PskKey> =
            read_psk_entries(path)?.into_iter().map(|e| (e.identity, e.key)).collect();
        let mut keys = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let (_, identity) = self.names(i);
            match entries.get(&identity) {
                Some(key) => keys.push(key.clone()),
                None => bail!("{}: no [[psk]] entry for identity {identity:?}", path.display()),
            }
        }
        Ok(Keys::PerDevice(keys))
    }

    fn validate(&self) -> Result<SocketAddr> {
        if self.count == 0 || self.count > 100_000 {
            bail!("--count must be between 1 and 100000, got {}", self.count);
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a non-negative number of devices per second");
        }
        if self.send_interval.is_some_and(|s| !(0.1..=86_400.0).contains(&s)) {
            bail!("--send-interval must be between 0.1 and 86400 seconds");
        }
        if let Err(err) = tether_coap::registration::Lifetime::from_secs(self.lifetime) {
            bail!("--lifetime: {err}");
        }
        if self.retry_count == 0 || self.sequence_retry_count == 0 {
            bail!("--retry-count and --sequence-retry-count must be at least 1");
        }
        for (name, value) in [
            ("--retry-timer", Some(self.retry_timer)),
            ("--sequence-delay", Some(self.sequence_delay)),
            ("--nat-timeout", self.nat_timeout),
            ("--duration", self.duration),
        ] {
            if let Some(value) = value.filter(|v| !(0.0..=1e7).contains(v)) {
                bail!("{name} must be between 0 and 10000000 seconds, got {value}");
            }
        }
        if self.bind.is_some_and(|b| b.port() != 0) && self.count > 1 {
            bail!("--bind with a port names one device's address; a fleet (--count > 1) binds an IP only");
        }
        if self.certificate.is_some() && self.count > 1 {
            bail!("--certificate names one device; a fleet (--count > 1) authenticates with PSK identities");
        }
        if let Some(uri) = &self.bootstrap {
            coaps_address("--bootstrap", uri)?;
        }
        coaps_address("--server", &self.server)
    }

    /// The fleet's one DTLS context: its certificate, or device 0's PSK (every PSK device
    /// brings its own identity and key to its sessions).
    fn context(&self, identity: &str, key: &PskKey) -> Result<Arc<DtlsContext>> {
        let config = match (&self.certificate, &self.private_key, &self.server_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
                let certified = CertifiedKey::from_pem(&read(cert)?, &read(key)?)
                    .map_err(|e| anyhow::anyhow!("--certificate/--private-key: {e}"))?;
                let anchors = X509::stack_from_pem(&read(ca)?).map_err(|e| anyhow::anyhow!("--server-ca: {e}"))?;
                let mut config = ClientConfig::x509(anchors).certificate(certified);
                if let Some(name) = &self.server_name {
                    config = config.server_name(name.clone());
                }
                config
            }
            _ => ClientConfig::psk(identity, key.clone()),
        };
        let config = if self.cid { config.connection_id(Vec::new()) } else { config };
        Ok(DtlsContext::client(config)?)
    }

    fn device_config(&self, i: usize, server: SocketAddr, context: Arc<DtlsContext>) -> Lwm2mDeviceConfig {
        let (endpoint, _) = self.names(i);
        let mut client = DeviceConfig::new(endpoint, self.server.clone());
        client.lifetime = Duration::from_secs(self.lifetime);
        if self.certificate.is_some() {
            client.security = SecurityMode::Certificate;
        }
        client.retry = RetryTimers {
            retry_count: self.retry_count,
            retry_timer: Duration::from_secs_f64(self.retry_timer),
            sequence_delay: Duration::from_secs_f64(self.sequence_delay),
            sequence_retry_count: self.sequence_retry_count,
        };
        client.jitter = if self.jitter { Jitter::Full } else { Jitter::None };
        client.rehandshake_after_idle = self.nat_timeout.map(Duration::from_secs_f64);
        client.send_interval = self.send_interval.map(Duration::from_secs_f64);
        client.session_outlives_path = self.cid;
        client.seed = rand::random::<u64>() ^ i as u64;
        let mut config = Lwm2mDeviceConfig::new(client, server, context);
        config.resume = !self.no_resume;
        config.local = self.bind;
        config
    }
}

/// `--bind IP` (port 0) or `--bind IP:PORT`.
fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT"))
}

/// Runs the devices until `--duration` or a signal; prints progress and a summary.
pub fn run(mut args: DeviceArgs) -> Result<()> {
    let server = args.validate()?;
    if let (Some(certificate), None) = (&args.certificate, &args.endpoint) {
        // The server binds a certificate to the endpoint named by its CN: register as that.
        args.endpoint = Some(common_name(certificate)?);
    }
    if let Some(path) = &args.write_security {
        return write_security(&args, path);
    }
    // One UDP socket per device (two while a session is open): lift the soft limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(fleet(args, server))
}

fn write_security(args: &DeviceArgs, path: &PathBuf) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(hex) = &args.psk_key {
        parse_key(hex).context("--psk-key")?;
    }
    let mut text = String::from(
        "# PSK entries of a tether device fleet, for `tether serve --security` and\n\
         # `tether device --security`. The keys are secrets: keep this file private.\n",
    );
    for i in 0..args.count {
        let (endpoint, identity) = args.names(i);
        // A new random 128-bit key per device, unless one shared key was asked for.
        let key = args.psk_key.clone().unwrap_or_else(|| encode_hex(&rand::random::<[u8; 16]>()));
        text.push_str(&format!("\n[[psk]]\nidentity = {identity:?}\nkey = {key:?}\nendpoint = {endpoint:?}\n"));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()).map(|()| file))
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.flush()?;
    let keys = if args.psk_key.is_some() { "one shared key (--psk-key)" } else { "a random key each" };
    say!("tether device: wrote {} PSK entries ({keys}) to {} (mode 0600)", args.count, path.display());
    Ok(())
}

/// The address of a `coaps://HOST:PORT` URI given as `flag`.
fn coaps_address(flag: &str, uri: &str) -> Result<SocketAddr> {
    let Some(rest) = uri.strip_prefix("coaps://") else {
        bail!("{flag} {uri:?}: expected coaps://HOST:PORT");
    };
    rest.trim_end_matches('/').parse().with_context(|| format!("{flag} {uri:?}: HOST:PORT with HOST an IP address"))
}

/// Bootstraps every device from the bootstrap server at `uri` (at most 256 at once); each
/// device's account, or `None` where its bootstrap failed (the cause is printed).
async fn bootstrap_fleet(
    args: &DeviceArgs,
    uri: &str,
    context: &Arc<DtlsContext>,
    keys: &Keys,
) -> Result<Vec<Option<ServerAccount>>> {
    let address = coaps_address("--bootstrap", uri)?;
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let attempts = (0..args.count).map(|i| {
        let (endpoint, identity) = args.names(i);
        let key = keys.of(i).clone();
        let (context, limit) = (Arc::clone(context), Arc::clone(&limit));
        let retry = (args.retry_count, Duration::from_secs_f64(args.retry_timer));
        async move {
            let _permit = limit.acquire().await;
            let result = bootstrap_one(address, &context, &identity, &key, &endpoint, retry).await;
            (endpoint, identity, result)
        }
    });
    let results = futures::future::join_all(attempts).await;
    let mut accounts = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    for (endpoint, identity, result) in results {
        match result {
            Ok(account) => {
                if args.count == 1 {
                    say!(
                        "tether device: {endpoint} bootstrapped from {uri} (bootstrap identity {identity:?}): \
                         registering with {} as PSK identity {:?}, lifetime {} s",
                        account.uri,
                        String::from_utf8_lossy(&account.psk_identity),
                        account.lifetime.as_secs()
                    );
                }
                accounts.push(Some(account));
            }
            Err(cause) => {
                say!("tether device: {endpoint}: bootstrap from {uri} failed: {cause}");
                failed.push(cause);
                accounts.push(None);
            }
        }
    }
    if failed.len() == args.count {
        bail!("no device bootstrapped: {}", failed.last().map(String::as_str).unwrap_or("-"));
    }
    if args.count > 1 {
        say!("tether device: {}/{} bootstrapped from {uri}", args.count - failed.len(), args.count);
    }
    Ok(accounts)
}

/// One device's bootstrap, tried up to `retry.0` times: a server not (yet) there is tried
/// again after 1, 2, 4 … s (never more than the retry timer `retry.1`); a refusal is final.
async fn bootstrap_one(
    address: SocketAddr,
    context: &Arc<DtlsContext>,
    identity: &str,
    key: &PskKey,
    endpoint: &str,
    (attempts, retry_timer): (u32, Duration),
) -> Result<ServerAccount, String> {
    use tether::bootstrap::{bootstrap, BootstrapFailure};
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=attempts.max(1) {
        let coap = tether_coap::message::CoapConfig::default();
        match bootstrap(address, context, Some((identity.as_bytes(), key)), endpoint, coap).await {
            Ok(account) => return Ok(account),
            Err(err) => {
                let cause = match &err {
                    BootstrapFailure::Connect(tether::ConnectError::Authentication { .. }) => {
                        format!("{err} (the bootstrap server does not know identity {identity:?} with this key)")
                    }
                    _ => err.to_string(),
                };
                let last_try = matches!(
                    err,
                    BootstrapFailure::Bootstrap(
                        tether_coap::bootstrap::BootstrapError::Refused { .. }
                            | tether_coap::bootstrap::BootstrapError::Unusable(_)
                    ) | BootstrapFailure::Connect(tether::ConnectError::Authentication { .. })
                );
                if last_try || attempt >= attempts {
                    return Err(cause);
                }
                let wait = delay.min(retry_timer.max(Duration::from_secs(1)));
                say!(
                    "tether device: {endpoint}: bootstrap attempt {attempt} failed: {cause}; next in {} s",
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                delay *= 2;
            }
        }
    }
    Err("no bootstrap attempt".into())
}

/// The subject CN of the certificate (PEM) at `path`.
fn common_name(path: &PathBuf) -> Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certificate =
        openssl::x509::X509::from_pem(&pem).with_context(|| format!("{} is not a PEM certificate", path.display()))?;
    let cn = certificate.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next();
    // Read as the server reads it (the bytes of the first CN).
    match cn.map(|entry| String::from_utf8_lossy(entry.data().as_slice()).into_owned()) {
        Some(cn) if !cn.is_empty() => Ok(cn),
        _ => bail!("{} has no subject CN: give the endpoint name with --endpoint", path.display()),
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The devices' PSKs.
enum Keys {
    /// One key for every device.
    Shared(PskKey),
    /// Device `i`'s key at `i`.
    PerDevice(Vec<PskKey>),
}

impl Keys {
    fn of(&self, i: usize) -> &PskKey {
        match self {
            Self::Shared(key) => key,
            Self::PerDevice(keys) => &keys[i],
        }
    }
}

async fn fleet(args: DeviceArgs, server: SocketAddr) -> Result<()> {
    let started = Instant::now();
    let mut devices = Vec::with_capacity(args.count);
    // One DTLS context for the whole fleet; PSK devices bring their own identity.
    let keys = args.keys()?;
    let context = args.context(&args.names(0).1, keys.of(0))?;
    let accounts = match &args.bootstrap {
        Some(uri) => Some(bootstrap_fleet(&args, uri, &context, &keys).await?),
        None => None,
    };
    for i in 0..args.count {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut config = args.device_config(i, server, Arc::clone(&context));
        if args.certificate.is_none() {
            config.psk = Some((args.names(i).1.into_bytes(), keys.of(i).clone()));
        }
        match accounts.as_ref().map(|accounts| accounts[i].as_ref()) {
            None => {}
            Some(None) => continue, // its bootstrap failed, and said why
            Some(Some(account)) => {
                config.server = coaps_address("the bootstrapped server URI", &account.uri)?;
                config.client.server_uri = account.uri.clone();
                config.client.lifetime = account.lifetime;
                let key = PskKey::new(account.psk_key.clone()).map_err(|e| anyhow::anyhow!("bootstrapped key: {e}"))?;
                config.psk = Some((account.psk_identity.clone(), key));
            }
        }
        devices.push(Lwm2mDevice::start(config)?);
    }
    let count = devices.len();
    let against = match &args.bootstrap {
        Some(_) => "the servers they were given".to_string(),
        None => server.to_string(),
    };
    say!("tether device: {count} device(s) started against {against}");

    let progress = indicatif::ProgressBar::new(count as u64).with_style(
        indicatif::ProgressStyle::with_template("{spinner} registering {pos}/{len} [{bar:40}] {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let watches: Vec<_> = devices.iter().map(Lwm2mDevice::watch_status).collect();
    let mut reporter = Reporter::new(args.count == 1);
    let mut device_events = forward_events(&devices);
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let mut signals = Signals::new();
    let mut all_registered_at = None;
    let mut stopped_by = "duration";
    let report_progress = |all_registered_at: &mut Option<Duration>| {
        let registered = watches.iter().filter(|w| w.borrow().registered).count();
        let gave_up = watches.iter().filter(|w| w.borrow().gave_up).count();
        progress.set_position(registered as u64);
        if gave_up > 0 {
            progress.set_message(format!("{gave_up} gave up"));
        }
        if all_registered_at.is_none() && registered == count {
            let elapsed = started.elapsed();
            *all_registered_at = Some(elapsed);
            progress.finish_and_clear();
            let rate = if args.count > 1 {
                format!(" ({:.0} registrations/s)", registered as f64 / elapsed.as_secs_f64())
            } else {
                String::new()
            };
            say!("tether device: {registered}/{count} registered in {:.2} s{rate}", elapsed.as_secs_f64());
        }
        gave_up
    };
    let mut all_gave_up_at: Option<Instant> = None;
    loop {
        let gave_up = report_progress(&mut all_registered_at);
        if gave_up == count {
            // Stop once the reporter has heard every device give up (so each one's causes
            // are printed first), or a second later if some events were lost.
            let since = *all_gave_up_at.get_or_insert_with(Instant::now);
            if reporter.gave_up >= count || since.elapsed() > Duration::from_secs(1) {
                stopped_by = "every device gave up";
                break;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            Some((endpoint, event)) = device_events.recv() => {
                progress.suspend(|| reporter.report(&endpoint, &event));
            }
            _ = signals.recv() => { stopped_by = "signal"; break; }
        }
    }
    while let Ok((endpoint, event)) = device_events.try_recv() {
        reporter.report(&endpoint, &event);
    }
    report_progress(&mut all_registered_at);
    progress.finish_and_clear();

    // Leave politely, within bounds: de-register every device, 10 s at most.
    let before = summary(&devices);
    let leaving: Vec<_> = devices.iter().map(|d| d.deregister()).collect();
    let _ = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(leaving)).await;
    print_summary(&args, &before, all_registered_at, started.elapsed(), stopped_by);
    reporter.print_causes();
    if before.registered == 0 {
        match reporter.last_cause {
            Some(cause) => bail!("no device registered: {cause}"),
            None => bail!("no device registered"),
        }
    }
    Ok(())
}

/// Every device's events on one channel, with its endpoint name.
fn forward_events(devices: &[Lwm2mDevice]) -> mpsc::UnboundedReceiver<(Arc<str>, DeviceEvent)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for device in devices {
        let mut events = device.events_from_start();
        let endpoint: Arc<str> = device.endpoint().into();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if tx.send((Arc::clone(&endpoint), event)).is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    rx
}

/// Prints what devices go through as it happens: a single device's every failure (with its
/// cause and when it tries next), registration and lost session; for a fleet, the first
/// failure of each cause, the rest counted for the summary.
struct Reporter {
    single: bool,
    causes: std::collections::BTreeMap<String, u64>,
    last_cause: Option<String>,
    /// Devices heard giving up.
    gave_up: usize,
}

impl Reporter {
    fn new(single: bool) -> Self {
        Self { single, causes: std::collections::BTreeMap::new(), last_cause: None, gave_up: 0 }
    }

    fn report(&mut self, endpoint: &str, event: &DeviceEvent) {
        match event {
            DeviceEvent::AttemptFailed { reason, attempt, retry_in, .. } => {
                let seen = self.causes.entry(reason.clone()).or_default();
                *seen += 1;
                self.last_cause = Some(reason.clone());
                if self.single || *seen == 1 {
                    let next = if retry_in.is_zero() {
                        "no attempt left".to_string()
                    } else {
                        format!("next attempt in {}", seconds(*retry_in))
                    };
                    let more = if self.single { "" } else { " (more of this cause are counted in the summary)" };
                    say!("tether device: {endpoint}: attempt {attempt} failed: {reason}; {next}{more}");
                }
            }
            DeviceEvent::GaveUp { reason } => {
                self.gave_up += 1;
                self.last_cause = Some(reason.clone());
                if self.single {
                    say!("tether device: {endpoint}: gave up: {reason}");
                }
            }
            DeviceEvent::Registered { location } if self.single => {
                say!("tether device: {endpoint}: registered as {location}");
            }
            DeviceEvent::ConnectionLost if self.single => {
                say!("tether device: {endpoint}: the session was closed by the server; connecting again");
            }
            _ => {}
        }
    }

    fn print_causes(&self) {
        if self.causes.is_empty() {
            return;
        }
        say!("  failures by cause");
        for (cause, count) in &self.causes {
            say!("    {count:>8}  {cause}");
        }
    }
}

/// `1.5 s`, `2 min 30 s`, `3 h 5 min`.
fn seconds(duration: Duration) -> String {
    let s = duration.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{} h {} min", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

struct Summary {
    registered: usize,
    gave_up: usize,
    stats: ClientStats,
}

fn summary(devices: &[Lwm2mDevice]) -> Summary {
    let mut total = Summary { registered: 0, gave_up: 0, stats: ClientStats::default() };
    for device in devices {
        let status = device.status();
        total.registered += usize::from(status.registered);
        total.gave_up += usize::from(status.gave_up);
        let s = status.stats;
        total.stats.connects += s.connects;
        total.stats.registrations += s.registrations;
        total.stats.updates += s.updates;
        total.stats.requests_answered += s.requests_answered;
        total.stats.notifications += s.notifications;
        total.stats.failed_attempts += s.failed_attempts;
        total.stats.executions += s.executions;
        total.stats.sends += s.sends;
    }
    total
}

fn print_summary(args: &DeviceArgs, s: &Summary, all_at: Option<Duration>, ran: Duration, stopped_by: &str) {
    say!("tether device: summary after {:.1} s (stopped by {stopped_by})", ran.as_secs_f64());
    say!("  devices                {}", args.count);
    say!("  registered at the end  {}", s.registered);
    match all_at {
        Some(at) => say!("  all registered after   {:.2} s", at.as_secs_f64()),
        None => say!("  all registered after   never ({} gave up)", s.gave_up),
    }
    say!("  handshakes             {}", s.stats.connects);
    say!("  registrations          {}", s.stats.registrations);
    say!("  updates                {}", s.stats.updates);
    say!("  failed attempts        {}", s.stats.failed_attempts);
    say!("  requests answered      {}", s.stats.requests_answered);
    say!("  notifications sent     {}", s.stats.notifications);
    say!("  sends acknowledged     {}", s.stats.sends);
}

/// SIGINT and SIGTERM.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Listens for both.
    pub fn new() -> Self {
        Self { term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok() }
    }

    /// The next one.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match self.term.as_mut() {
                    Some(term) => { term.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}
