//! `tether serve`: the LwM2M server with its REST API, on embedded defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::api::auth::{Access, Role};
pub use crate::limits::Limits;
use crate::stores::StoreSetting;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tether::lwm2m::{EndpointBindings, Lwm2mServer, Lwm2mServerConfig};
use tether::{DtlsServer, DtlsServerConfig};
use tether_coap::model::Models;
use tether_proto::dtls::{
    CipherSuite, ClientAuth, DtlsContext, NodeCids, NodeId, PskKey, ServerConfig, SessionConfig, StaticPskStore,
};

/// The development PSK entry used when none is configured. Its key is public (README).
pub const DEV_IDENTITY: &str = "identity";
/// The development key, hex ("secretPSK").
pub const DEV_KEY_HEX: &str = "73656372657450534b";
/// The endpoint name the development identity may register.
pub const DEV_ENDPOINT: &str = "tether-dev";

/// Flags of `tether serve`; each overrides `tether.toml`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// CoAPs (DTLS) address. Default 127.0.0.1:5684.
    #[arg(long, value_name = "ADDR:PORT")]
    pub coaps: Option<SocketAddr>,
    /// HTTP (REST API, /metrics) address. Default 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Option<SocketAddr>,
    /// Directory of the server's own files: the SQLite databases (by default), its lock,
    /// its API token. Default ./tether-data.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where registrations and DTLS sessions are kept: "sqlite" (files in the data
    /// directory, the default) or postgres://user:password@host:port/database
    /// (`sslmode=require` for TLS). A password here shows in `ps`: give the URL in
    /// `TETHER_STORE` or tether.toml (`store = "…"`) instead.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Configuration file. Default ./tether.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Security store (TOML with `[[psk]]` entries: identity, key (hex), endpoint).
    #[arg(long, value_name = "FILE")]
    pub security: Option<PathBuf>,
    /// A PSK entry; repeatable. Replaces the development entry. A key on the command line
    /// shows in `ps`: give entries in `TETHER_PSK` (separated by spaces) or a `--security`
    /// file (mode 0600) instead.
    #[arg(long = "psk", value_name = "IDENTITY:HEXKEY:ENDPOINT")]
    pub psk: Vec<String>,
    /// A directory of OMA DDF XML object definitions (as the OMA registry publishes them) to
    /// know besides the built-in objects; values of those objects decode to typed, named
    /// values in the REST API and writes to them are checked.
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Log lines (on stderr) as text or as one JSON object per line. Levels: `RUST_LOG`
    /// (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// API tokens (TOML: `[[token]]` entries with `role = "admin"` or `"read"` and `token`).
    /// Default: one admin token in the data directory's `api-token` file, made (mode 0600)
    /// on first start.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Serve the REST API and web UI without authentication: only on a loopback HTTP address.
    #[arg(long, conflicts_with = "api_token_file")]
    pub no_api_auth: bool,
    /// A node of a cluster.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Sends `tracing` to stderr at `RUST_LOG`'s levels (default `default_level`).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coaps: Option<SocketAddr>,
    http: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    /// Where registrations and sessions are kept (see `--store`).
    store: Option<String>,
    security: Option<PathBuf>,
    models: Option<PathBuf>,
    /// DTLS cipher suites offered, by OpenSSL name, in order of preference.
    ciphers: Option<Vec<String>>,
    /// API tokens file (see `--api-token-file`).
    api_token_file: Option<PathBuf>,
    /// `false`: no API authentication (loopback only).
    api_auth: Option<bool>,
    /// Names the HTTP server answers to besides its addresses and localhost (the `Host` a
    /// browser sends; any other name is refused, against DNS rebinding).
    #[serde(default)]
    http_hosts: Vec<String>,
    #[serde(default)]
    psk: Vec<PskEntryFile>,
    /// Limits (`[limits]`): what one source, one identity and all together may hold.
    #[serde(default)]
    limits: Limits,
    /// `[cluster]`: this server as one node of several.
    #[serde(default)]
    cluster: crate::cluster::ClusterFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityFile {
    #[serde(default)]
    psk: Vec<PskEntryFile>,
    x509: Option<X509File>,
    /// What `tether bootstrap` gives each endpoint; `tether serve` only checks its shape.
    #[serde(default)]
    #[allow(dead_code, reason = "read by tether bootstrap; here the file is only checked")]
    bootstrap: Vec<crate::bootstrap::BootstrapEntryFile>,
}

/// `[x509]` in the security file: the server's certificate and key (PEM) and, optionally,
/// the CA that client certificates must chain to. A client certificate's CN is the endpoint
/// name it may register.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct X509File {
    certificate: PathBuf,
    private_key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PskEntryFile {
    identity: String,
    key: String,
    endpoint: String,
}

/// One PSK identity, its key and the endpoint name it may register.
#[derive(Debug, Clone)]
pub struct PskEntry {
    /// PSK identity.
    pub identity: String,
    /// Key.
    pub key: PskKey,
    /// Endpoint name.
    pub endpoint: String,
}

/// The resolved configuration.
#[derive(Debug)]
pub struct Settings {
    /// CoAPs address.
    pub coaps: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where registrations and sessions are kept.
    pub store: StoreSetting,
    /// This server as a node of a cluster, if it is one.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// PSK entries.
    pub psk: Vec<PskEntry>,
    /// Whether the development entry is in use.
    pub development_psk: bool,
    /// Server certificate and key, and the client CA, loaded from the security file.
    pub x509: Option<X509Settings>,
    /// Object models: built in, and those of `--models DIR`.
    pub models: Models,
    /// DTLS cipher suites, in order of preference.
    pub cipher_suites: Vec<CipherSuite>,
    /// Who may use the REST API and web UI.
    pub api: ApiAuth,
    /// What one party, and all together, may hold.
    pub limits: Limits,
    /// Names the HTTP server answers to besides its addresses and localhost.
    pub http_hosts: Vec<String>,
}

/// How the REST API and web UI authenticate.
#[derive(Debug, Clone)]
pub enum ApiAuth {
    /// Tokens from this file.
    TokenFile(PathBuf, Vec<(crate::api::auth::Role, String)>),
    /// The admin token of the data directory's `api-token` file (made on first start).
    DataDirToken,
    /// None (loopback only).
    Off,
}

/// Certificate settings.
#[derive(Debug)]
pub struct X509Settings {
    /// The server's certificate chain and key.
    pub certificate: tether_proto::dtls::CertifiedKey,
    /// CAs client certificates must chain to; then a certificate's CN is its endpoint name.
    pub client_ca: Option<Vec<tether_proto::dtls::X509>>,
}

impl Settings {
    /// Defaults, then the configuration file, then the flags.
    pub fn resolve(args: &ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => Some(read_toml::<FileConfig>(path)?),
            None if Path::new("tether.toml").exists() => Some(read_toml::<FileConfig>(Path::new("tether.toml"))?),
            None => None,
        }
        .unwrap_or_default();
        let mut entries = Vec::new();
        for (i, e) in file.psk.iter().enumerate() {
            entries.push(
                entry(&e.identity, &e.key, &e.endpoint).with_context(|| format!("tether.toml psk entry {}", i + 1))?,
            );
        }
        let mut x509 = None;
        if let Some(path) = args.security.as_ref().or(file.security.as_ref()) {
            let security = read_toml::<SecurityFile>(path)?;
            if let Some(section) = &security.x509 {
                x509 = Some(load_x509(path, section)?);
            }
            for (i, e) in security.psk.iter().enumerate() {
                entries.push(
                    entry(&e.identity, &e.key, &e.endpoint)
                        .with_context(|| format!("{}: psk entry {}", path.display(), i + 1))?,
                );
            }
        }
        for flag in &args.psk {
            entries.push(psk_flag(flag)?);
        }
        for entry in std::env::var("TETHER_PSK").unwrap_or_default().split_whitespace() {
            entries.push(psk_flag(entry).context("TETHER_PSK")?);
        }
        let mut seen = HashMap::new();
        for e in &entries {
            if let Some(previous) = seen.insert(e.identity.clone(), e.endpoint.clone()) {
                bail!("PSK identity {:?} is configured twice (for {previous:?} and {:?})", e.identity, e.endpoint);
            }
        }
        file.limits.validate()?;
        let http = args.http.or(file.http).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let store = store_setting(args.store.as_deref(), file.store.as_deref())?;
        let cluster = crate::cluster::ClusterSettings::resolve(&args.cluster, &file.cluster, http)?;
        if let (Some(cluster), StoreSetting::Sqlite) = (&cluster, &store) {
            bail!(
                "--node {}: a cluster's nodes share one PostgreSQL database: give --store postgres://… (or \
                 TETHER_STORE)",
                cluster.node.0
            );
        }
        let api = if args.no_api_auth || file.api_auth == Some(false) {
            if !http.ip().is_loopback() {
                bail!(
                    "refusing to serve the REST API on {http} without authentication: drop --no-api-auth / \
                     api_auth = false (an admin token is then made in the data directory), or bind --http to \
                     127.0.0.1"
                );
            }
            ApiAuth::Off
        } else if let Some(path) = args.api_token_file.as_ref().or(file.api_token_file.as_ref()) {
            ApiAuth::TokenFile(path.clone(), crate::api::auth::read_token_file(path)?)
        } else {
            ApiAuth::DataDirToken
        };
        // Any configured credential, PSK or certificate, turns the public development key off.
        let development_psk = entries.is_empty() && x509.is_none();
        if development_psk {
            entries.push(entry(DEV_IDENTITY, DEV_KEY_HEX, DEV_ENDPOINT)?);
        }
        Ok(Self {
            coaps: args.coaps.or(file.coaps).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5684))),
            http,
            data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("tether-data")),
            store,
            cluster,
            psk: entries,
            development_psk,
            x509,
            cipher_suites: match &file.ciphers {
                Some(names) => cipher_suites(names)?,
                None => CipherSuite::DEFAULT.to_vec(),
            },
            api,
            limits: file.limits.clone(),
            http_hosts: file.http_hosts.clone(),
            models: match args.models.as_ref().or(file.models.as_ref()) {
                Some(dir) => load_models(dir)?,
                None => Models::built_in(),
            },
        })
    }
}

/// `--store`, else `TETHER_STORE`, else `store =` of tether.toml, else SQLite.
fn store_setting(flag: Option<&str>, file: Option<&str>) -> Result<StoreSetting> {
    if let Some(flag) = flag {
        return StoreSetting::parse(flag, "--store");
    }
    if let Ok(env) = std::env::var("TETHER_STORE") {
        return StoreSetting::parse(&env, "TETHER_STORE");
    }
    file.map_or(Ok(StoreSetting::Sqlite), |file| StoreSetting::parse(file, "tether.toml: store"))
}

/// `ciphers = [...]` of tether.toml: names (OpenSSL's, or the LwM2M lists') of suites tether
/// speaks.
fn cipher_suites(names: &[String]) -> Result<Vec<CipherSuite>> {
    if names.is_empty() {
        bail!("tether.toml: ciphers is empty: name at least one suite");
    }
    names
        .iter()
        .map(|name| {
            CipherSuite::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = CipherSuite::ALL.iter().map(|s| s.openssl_name()).collect();
                anyhow::anyhow!("tether.toml: unknown cipher suite {name:?} (known: {})", known.join(", "))
            })
        })
        .collect()
}

/// The built-in models and every `*.xml` DDF file in `dir`.
pub fn load_models(dir: &Path) -> Result<Models> {
    let mut models = Models::built_in();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("--models: cannot read directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("xml")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("--models: no *.xml DDF file in {}", dir.display());
    }
    for file in &files {
        let xml = std::fs::read_to_string(file).with_context(|| format!("--models: cannot read {}", file.display()))?;
        models.load_ddf(&xml).with_context(|| format!("--models: {}", file.display()))?;
    }
    Ok(models)
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

fn load_x509(security: &Path, section: &X509File) -> Result<X509Settings> {
    let relative = |p: &PathBuf| security.parent().map_or(p.clone(), |dir| dir.join(p));
    let read = |p: &PathBuf| {
        let path = relative(p);
        std::fs::read(&path).with_context(|| format!("{}: cannot read {}", security.display(), path.display()))
    };
    let certificate =
        tether_proto::dtls::CertifiedKey::from_pem(&read(&section.certificate)?, &read(&section.private_key)?)
            .map_err(|e| anyhow::anyhow!("{}: [x509] certificate/private_key: {e}", security.display()))?;
    let client_ca = match &section.client_ca {
        Some(p) => Some(
            tether_proto::dtls::X509::stack_from_pem(&read(p)?)
                .map_err(|e| anyhow::anyhow!("{}: [x509] client_ca: {e}", security.display()))?,
        ),
        None => None,
    };
    Ok(X509Settings { certificate, client_ca })
}

/// `--psk IDENTITY:HEXKEY:ENDPOINT`. The endpoint may itself hold ':' only as a URN
/// (`urn:imei:…`, the usual LwM2M endpoint names); any other extra field is a mistake.
fn psk_flag(flag: &str) -> Result<PskEntry> {
    let fields: Vec<&str> = flag.splitn(3, ':').collect();
    let [identity, key, endpoint] = fields[..] else {
        bail!("--psk: expected IDENTITY:HEXKEY:ENDPOINT (three fields separated by ':'), got {}", fields.len());
    };
    if endpoint.contains(':') && !endpoint.starts_with("urn:") {
        bail!(
            "--psk: expected IDENTITY:HEXKEY:ENDPOINT, got {} fields (an endpoint name holds ':' only as a URN, \
             urn:…)",
            flag.split(':').count()
        );
    }
    entry(identity, key, endpoint).with_context(|| format!("--psk {identity}:…:{endpoint}"))
}

fn entry(identity: &str, key: &str, endpoint: &str) -> Result<PskEntry> {
    if identity.is_empty() || endpoint.is_empty() {
        bail!("identity and endpoint must not be empty");
    }
    let key = parse_key(key)?;
    Ok(PskEntry { identity: identity.to_string(), key, endpoint: endpoint.to_string() })
}

/// A PSK from hex, or an error that says exactly what is wrong with the text (never the
/// text itself: it is a secret, or nearly one).
pub fn parse_key(hex: &str) -> Result<PskKey> {
    let hex = hex.trim();
    if hex.is_empty() {
        bail!("the key is empty: give it as hex digits, e.g. 16 random bytes = 32 hex digits");
    }
    if let Some((position, _)) = hex.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        bail!("the key is not hex: character {} of {} is not a hex digit (0-9, a-f)", position + 1, hex.len());
    }
    if hex.len() % 2 != 0 {
        bail!("the key has an odd number of hex digits ({}): two digits per byte", hex.len());
    }
    PskKey::from_hex(hex).map_err(|e| anyhow::anyhow!("the key is not usable: {e}"))
}

/// Reads the `[[psk]]` entries of a security file (as `tether device --write-security`
/// writes it).
pub fn read_psk_entries(path: &Path) -> Result<Vec<PskEntry>> {
    let security = read_toml::<SecurityFile>(path)?;
    security
        .psk
        .iter()
        .enumerate()
        .map(|(i, e)| {
            entry(&e.identity, &e.key, &e.endpoint).with_context(|| format!("{}: psk entry {}", path.display(), i + 1))
        })
        .collect()
}

/// Makes `dir` (which holds keys and tokens) the owner's alone: mode 0700, said if it was
/// wider.
fn narrow_to_owner(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make the data directory {} private (mode 0700)", dir.display()))?;
        tracing::info!(dir = %dir.display(), was = format!("{:o}", mode & 0o777), "data directory narrowed to mode 0700");
    }
    Ok(())
}

/// Holds the data directory for this process: a second `tether serve` on the same
/// directory would write the same databases and answer with the same sessions.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Creates the directory if needed, checks it is writable and takes its lock file
    /// (`tether.lock`, released when the process ends, however it ends).
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        narrow_to_owner(dir)?;
        let path = dir.join("tether.lock");
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).with_context(
                || format!("the data directory {} is not writable (cannot open {})", dir.display(), path.display()),
            )?;
        // SAFETY: flock on a file descriptor this function owns; no memory is shared.
        #[allow(unsafe_code, reason = "flock(2): std's File::try_lock needs Rust 1.89, tether builds on 1.85")]
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            bail!(
                "the data directory {} is in use by another tether serve{holder}: each server needs its own \
                 --data-dir (lock {})",
                dir.display(),
                path.display()
            );
        }
        let write_pid =
            file.set_len(0).and_then(|()| file.rewind()).and_then(|()| write!(file, "{}", std::process::id()));
        write_pid.with_context(|| format!("the data directory {} is not writable", dir.display()))?;
        Ok(Self { _file: file })
    }
}

/// Runs the server until SIGINT or SIGTERM; then closes every session (close_notify) and
/// returns.
pub async fn run(settings: Settings) -> Result<()> {
    let mut store = StaticPskStore::new();
    let mut authorizer = EndpointBindings::default();
    for e in &settings.psk {
        store.insert(e.identity.clone(), e.key.clone());
        authorizer.psk.insert(e.identity.clone(), e.endpoint.clone());
    }
    let session = SessionConfig::default().cipher_suites(&settings.cipher_suites);
    let mut server_config = ServerConfig::psk(store).session(session);
    let x509_configured = settings.x509.is_some();
    if let Some(x509) = settings.x509 {
        server_config = server_config.certificate(x509.certificate);
        if let Some(cas) = x509.client_ca {
            server_config = server_config.client_auth(ClientAuth::Required(cas));
            authorizer.certificate_cn_is_endpoint = true;
        }
    }
    let context = DtlsContext::server(server_config)?;
    let _lock = DataDirLock::acquire(&settings.data_dir)?;
    // Every connection and socket is bounded by the limits, not by the soft descriptor limit
    // (1,024 by default): take what the hard limit allows.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%err, "could not raise the open-file limit");
    }
    let node = settings.cluster.as_ref().map_or(NodeId(0), |c| c.node);
    let stores = crate::stores::open(&settings.store, &settings.data_dir, node).await?;
    let sessions = Arc::clone(&stores.sessions);
    let stored_sessions = sessions.count().await?;
    let mut dtls_config = DtlsServerConfig::default().session_store(sessions);
    dtls_config.endpoint = settings.limits.endpoint(dtls_config.endpoint);
    dtls_config.pool.capacity = settings.limits.max_sessions;
    if let Some(cluster) = &settings.cluster {
        // Connection IDs name this node, so any node can forward a record to its holder;
        // unknown ones of this node's own may be held by a node that adopted them.
        let cids = NodeCids::new(6, 0, cluster.node).context("connection ids")?;
        dtls_config.endpoint = dtls_config.endpoint.connection_ids(Arc::new(cids));
        dtls_config.endpoint.relay_unknown_own_ids = true;
    }
    let dtls = Arc::new(DtlsServer::bind(settings.coaps, context, dtls_config).await?);
    let lwm2m = Lwm2mServer::start(
        Arc::clone(&dtls),
        Arc::new(authorizer),
        Some(Arc::clone(&stores.registrations)),
        Lwm2mServerConfig::default(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(settings.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http))?;
    let cluster = match (&settings.cluster, &stores.membership) {
        (Some(cluster), Some(membership)) => {
            let http = if settings.http.port() == 0 { listener.local_addr()? } else { cluster.advertise_http };
            Some(crate::cluster::join(cluster, http, Arc::clone(membership), Arc::clone(&dtls), lwm2m.clone()).await?)
        }
        _ => None,
    };
    let restored = lwm2m.registrations().await.len();
    tracing::info!(
        coaps = %dtls.local_addr(),
        http = %listener.local_addr()?,
        data_dir = %settings.data_dir.display(),
        store = %stores.sessions_at,
        psk_identities = settings.psk.len(),
        x509 = x509_configured,
        development_psk = settings.development_psk,
        registrations_restored = restored,
        sessions_restored = stored_sessions,
        "tether serve started"
    );
    let shutdown = shutdown_signal();
    say!("tether serve: CoAPs (DTLS 1.2) on udp {}", dtls.local_addr());
    let http = listener.local_addr()?;
    let loopback = http.ip().is_loopback();
    let access = match &settings.api {
        ApiAuth::Off => {
            say!("tether serve: REST API without authentication (--no-api-auth; loopback only)");
            Access::open()
        }
        ApiAuth::TokenFile(path, tokens) => {
            let admins = tokens.iter().filter(|(role, _)| *role == Role::Admin).count();
            say!(
                "tether serve: API tokens from {} ({admins} admin, {} read-only; not shown)",
                path.display(),
                tokens.len() - admins
            );
            Access::tokens(tokens.clone(), loopback)
        }
        ApiAuth::DataDirToken => {
            let (token, path, made) = crate::api::auth::data_dir_token(&settings.data_dir)?;
            let made = if made { "made now" } else { "kept from before" };
            say!("tether serve: admin API token in {} (mode 0600, {made})", path.display());
            Access::tokens(vec![(Role::Admin, token)], loopback)
        }
    };
    say!("tether serve: web UI on http://{http}/ ; REST API on http://{http}/api/clients, metrics on /metrics");
    say!("tether serve: registrations in {} ({restored} restored)", stores.registrations_at);
    say!("tether serve: DTLS sessions in {} ({stored_sessions} restored, no handshake needed)", stores.sessions_at);
    if settings.development_psk {
        say!(
            "tether serve: development PSK entry: identity {DEV_IDENTITY:?} may register endpoint {DEV_ENDPOINT:?}; \
             its key is the public development key in README.md. Configure your own with --psk before exposing the server."
        );
    } else {
        say!("tether serve: {} PSK identities configured (keys not shown)", settings.psk.len());
    }
    say!(
        "tether serve: {} object models known ({} built in, {} from DDF files)",
        settings.models.len(),
        tether_coap::model::BUILT_IN.len(),
        settings.models.loaded()
    );
    inject_panic();
    return_freed_memory(Arc::clone(&dtls));
    let (access, cluster_api) = match (&cluster, &settings.cluster, &stores.membership) {
        (Some(cluster), Some(cluster_settings), Some(membership)) => {
            let token = cluster_settings.node_api_token();
            let api = crate::api::cluster::ClusterApi::new(cluster, Arc::clone(membership), &token);
            (access.and_token(token), Some(api))
        }
        _ => (access, None),
    };
    let api = crate::api::ApiSettings {
        access,
        hosts: crate::api::guard::Hosts::new(&settings.http_hosts),
        event_readers: settings.limits.event_readers,
        cluster: cluster_api,
    };
    let app = crate::api::router(lwm2m.clone(), Arc::new(settings.models), api);
    let limits = crate::api::listener::HttpLimits {
        connections: settings.limits.http_connections,
        connections_per_address: settings.limits.http_connections_per_address,
        header_timeout: std::time::Duration::from_secs_f64(settings.limits.http_header_timeout_s),
    };
    crate::api::listener::serve(listener, app, limits, shutdown).await?;
    if let Some(cluster) = cluster {
        tracing::info!("leaving the cluster: every session handed over to the other nodes");
        say!("tether serve: leaving the cluster: sessions handed over, nothing closed");
        cluster.leave().await;
        return Ok(());
    }
    tracing::info!("shutting down: close_notify to every device");
    say!("tether serve: shutting down: close_notify to every peer");
    dtls.shutdown().await;
    Ok(())
}

/// Handshakes that end in a burst (a flood of silent ones, a fleet reconnecting) free
/// tens of kilobytes each, which glibc keeps for the process; after such a burst the free
/// memory is handed back to the system, so the server's RSS returns to what its sessions
/// need. Checked every 5 s; a trim after at least 64 handshakes ended since the last one.
fn return_freed_memory(dtls: Arc<DtlsServer>) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    const BURST: u64 = 64;
    tokio::spawn(async move {
        let mut trimmed_at = 0;
        loop {
            tokio::time::sleep(EVERY).await;
            let Some(stats) = dtls.stats().await else { return };
            let ended = stats.endpoint.handshakes_completed + stats.endpoint.handshakes_failed;
            if ended.saturating_sub(trimmed_at) >= BURST && stats.handshakes_in_progress < BURST as usize {
                trimmed_at = ended;
                trim_heap();
            }
        }
    });
}

/// Returns the heap's free memory to the system (glibc `malloc_trim`).
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only reorganises the allocator's own free
    // lists; it is safe to call from any thread at any time.
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code, reason = "glibc's malloc_trim has no safe wrapper")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Test builds only: `TETHER_FAULT_PANIC_AFTER_MS=N` makes a server task panic N ms after
/// start, so a test can see that a panic ends the process (see `exit_on_panic` in main.rs).
fn inject_panic() {
    #[cfg(debug_assertions)]
    if let Some(after) = std::env::var("TETHER_FAULT_PANIC_AFTER_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(after)).await;
            panic!("injected fault (TETHER_FAULT_PANIC_AFTER_MS)");
        });
    }
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when it is first
/// awaited: a signal that comes right after the addresses are printed (a supervisor, a test)
/// still ends the server cleanly instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn received(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let (term, interrupt) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
    async move {
        tokio::select! {
            _ = received(term) => {}
            _ = received(interrupt) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::dtls::pki::{CertificateAuthority, Validity};

    fn args(security: Option<PathBuf>, psk: &[&str]) -> ServeArgs {
        ServeArgs {
            coaps: None,
            http: None,
            data_dir: None,
            store: None,
            // A file that exists and is empty: no tether.toml of the working directory.
            config: Some(PathBuf::from("/dev/null")),
            security,
            psk: psk.iter().map(ToString::to_string).collect(),
            log_format: LogFormat::Text,
            models: None,
            api_token_file: None,
            no_api_auth: false,
            cluster: crate::cluster::ClusterArgs::default(),
        }
    }

    #[test]
    fn no_api_auth_is_refused_off_loopback() {
        let mut open = args(None, &[]);
        open.no_api_auth = true;
        assert!(matches!(Settings::resolve(&open).unwrap().api, ApiAuth::Off));
        open.http = Some(SocketAddr::from(([0, 0, 0, 0], 8080)));
        let err = format!("{:#}", Settings::resolve(&open).unwrap_err());
        assert!(err.contains("refusing to serve the REST API on 0.0.0.0:8080 without authentication"), "{err}");
        assert!(matches!(Settings::resolve(&args(None, &[])).unwrap().api, ApiAuth::DataDirToken));
    }

    #[test]
    fn the_store_is_sqlite_unless_a_postgres_url_is_given_and_anything_else_is_named() {
        assert_eq!(store_setting(None, None).unwrap(), StoreSetting::Sqlite);
        assert_eq!(store_setting(Some("sqlite"), None).unwrap(), StoreSetting::Sqlite);
        let url = "postgres://tether:secret@db:5432/tether";
        assert_eq!(store_setting(None, Some(url)).unwrap(), StoreSetting::Postgres(url.into()));
        assert_eq!(store_setting(Some("sqlite"), Some(url)).unwrap(), StoreSetting::Sqlite, "the flag wins");
        let err = format!("{:#}", store_setting(None, Some("mysql://root:secret@db/tether")).unwrap_err());
        assert!(err.contains("tether.toml: store") && err.contains("\"mysql\""), "{err}");
        assert!(!err.contains("secret"), "the URL's password is never repeated: {err}");
        assert!(!format!("{:?}", StoreSetting::Postgres(url.into())).contains("secret"));
    }

    #[test]
    fn any_configured_credential_turns_the_development_psk_off() {
        assert!(Settings::resolve(&args(None, &[])).unwrap().development_psk, "nothing configured: on");
        let settings = Settings::resolve(&args(None, &["dev-1:0011:urn:dev:1"])).unwrap();
        assert!(!settings.development_psk);
        assert_eq!(settings.psk[0].endpoint, "urn:dev:1", "a URN endpoint keeps its ':'");

        let dir = std::env::temp_dir().join(format!("tether-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let validity = Validity::days_around(1_800_000_000, 1);
        let mut ca = CertificateAuthority::generate("ca", validity).unwrap();
        let server = ca.issue("localhost", validity).unwrap();
        std::fs::write(dir.join("s.pem"), server.chain[0].to_pem().unwrap()).unwrap();
        std::fs::write(dir.join("s.key"), server.key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        std::fs::write(dir.join("security.toml"), "[x509]\ncertificate = \"s.pem\"\nprivate_key = \"s.key\"\n")
            .unwrap();
        let settings = Settings::resolve(&args(Some(dir.join("security.toml")), &[])).unwrap();
        assert!(!settings.development_psk, "a certificate alone turns it off");
        assert!(settings.psk.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn models_load_from_a_directory_and_a_bad_file_is_named() {
        let dir = std::env::temp_dir().join(format!("tether-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(format!("{:#}", load_models(&dir).unwrap_err()).contains("no *.xml DDF file"));
        std::fs::write(
            dir.join("33333.xml"),
            "<LWM2M><Object><Name>Widget</Name><ObjectID>33333</ObjectID><MultipleInstances>Multiple\
             </MultipleInstances><Resources><Item ID=\"1\"><Name>Spin</Name><Operations>RW</Operations>\
             <MultipleInstances>Single</MultipleInstances><Type>Float</Type><Units>Hz</Units></Item>\
             </Resources></Object></LWM2M>",
        )
        .unwrap();
        let models = load_models(&dir).unwrap();
        assert_eq!(models.loaded(), 1);
        assert_eq!(models.resource(33333, 1).map(|r| r.name.to_string()), Some("Spin".into()));
        assert!(models.resource(3303, 5700).is_some(), "built-ins stay");
        std::fs::write(dir.join("broken.xml"), "<LWM2M>").unwrap();
        let err = format!("{:#}", load_models(&dir).unwrap_err());
        assert!(err.contains("broken.xml") && err.contains("not XML"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn psk_flags_with_mistakes_say_which() {
        for (flag, problem) in [
            ("a:0011:b:c", "got 4 fields"),
            ("a:0011", "got 2"),
            ("a:00zz:b", "character 3 of 4 is not a hex digit"),
            ("a:001:b", "odd number of hex digits (3)"),
            (":0011:b", "must not be empty"),
        ] {
            let err = format!("{:#}", Settings::resolve(&args(None, &[flag])).unwrap_err());
            assert!(err.contains(problem), "{flag}: {err}");
            assert!(!err.contains("00zz"), "the key is not echoed: {err}");
        }
    }
}
