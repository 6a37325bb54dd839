//! `tether bootstrap`: an LwM2M bootstrap server (client-initiated bootstrap over DTLS,
//! OMA LwM2M 1.1 §5.2.7). A device authenticates with its bootstrap PSK (`[[psk]]` of the
//! security file, bound to its endpoint name) and is given the LwM2M server configured for
//! its endpoint (`[[bootstrap]]`): URI, security mode, PSK identity and key, Short Server ID,
//! lifetime, binding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tether::bootstrap::BootstrapServer;
use tether::lwm2m::EndpointBindings;
use tether::{DtlsServer, DtlsServerConfig};
use tether_coap::bootstrap::ServerAccount;
use tether_coap::message::CoapConfig;
use tether_proto::dtls::{DtlsContext, ServerConfig, StaticPskStore};

use crate::serve::{parse_key, read_psk_entries, LogFormat, PskEntry};

/// Flags of `tether bootstrap`.
#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// CoAPs (DTLS) address of the bootstrap server.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:5784")]
    pub coaps: SocketAddr,
    /// Security file: `[[psk]]` entries (each device's bootstrap identity, key and endpoint
    /// name) and `[[bootstrap]]` entries (per endpoint, the LwM2M server it is given).
    #[arg(long, value_name = "FILE")]
    pub security: PathBuf,
    /// Log lines (on stderr) as text or as one JSON object per line. Levels: `RUST_LOG`
    /// (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `[[bootstrap]]` in the security file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapEntryFile {
    endpoint: String,
    server_uri: String,
    #[serde(default = "default_security_mode")]
    security_mode: String,
    psk_identity: String,
    psk_key: String,
    #[serde(default = "default_short_server_id")]
    short_server_id: u16,
    #[serde(default = "default_lifetime")]
    lifetime: u64,
    #[serde(default = "default_binding")]
    binding: String,
}

fn default_security_mode() -> String {
    "psk".into()
}

fn default_short_server_id() -> u16 {
    1
}

fn default_lifetime() -> u64 {
    300
}

fn default_binding() -> String {
    "U".into()
}

impl BootstrapEntryFile {
    /// The account it describes, or what is wrong with it.
    fn account(&self) -> Result<ServerAccount> {
        if self.endpoint.is_empty() {
            bail!("endpoint is empty");
        }
        if self.security_mode != "psk" {
            bail!("security_mode {:?}: only \"psk\" is supported (tether hands out PSK accounts)", self.security_mode);
        }
        let Some(address) = self.server_uri.strip_prefix("coaps://") else {
            bail!("server_uri {:?}: expected coaps://HOST:PORT", self.server_uri);
        };
        address
            .trim_end_matches('/')
            .parse::<SocketAddr>()
            .with_context(|| format!("server_uri {:?}: HOST:PORT with HOST an IP address", self.server_uri))?;
        if self.psk_identity.is_empty() {
            bail!("psk_identity is empty");
        }
        let key = parse_key(&self.psk_key).context("psk_key")?;
        if !(1..u16::MAX).contains(&self.short_server_id) {
            bail!("short_server_id must be between 1 and 65534");
        }
        if let Err(err) = tether_coap::registration::Lifetime::from_secs(self.lifetime) {
            bail!("{err}");
        }
        if !matches!(self.binding.as_str(), "U" | "UQ") {
            bail!("binding {:?}: \"U\" or \"UQ\"", self.binding);
        }
        Ok(ServerAccount {
            uri: self.server_uri.trim_end_matches('/').to_string(),
            psk_identity: self.psk_identity.clone().into_bytes(),
            psk_key: key.expose().to_vec(),
            short_server_id: self.short_server_id,
            lifetime: Duration::from_secs(self.lifetime),
            binding: self.binding.clone(),
        })
    }
}

#[derive(Debug, Deserialize)]
struct BootstrapFile {
    #[serde(default)]
    bootstrap: Vec<BootstrapEntryFile>,
}

/// The `[[psk]]` and `[[bootstrap]]` entries of a security file, checked.
fn read_accounts(path: &Path) -> Result<(Vec<PskEntry>, HashMap<String, ServerAccount>)> {
    let psk = read_psk_entries(path)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: BootstrapFile = toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    if file.bootstrap.is_empty() {
        bail!(
            "{}: no [[bootstrap]] entries: give each endpoint the LwM2M server it is to use (see README)",
            path.display()
        );
    }
    let mut accounts = HashMap::new();
    for (i, entry) in file.bootstrap.iter().enumerate() {
        let account = entry.account().with_context(|| format!("{}: bootstrap entry {}", path.display(), i + 1))?;
        if accounts.insert(entry.endpoint.clone(), account).is_some() {
            bail!("{}: endpoint {:?} has two [[bootstrap]] entries", path.display(), entry.endpoint);
        }
    }
    if psk.is_empty() {
        bail!(
            "{}: no [[psk]] entries: devices authenticate to the bootstrap server with a bootstrap PSK",
            path.display()
        );
    }
    Ok((psk, accounts))
}

/// Runs the bootstrap server until SIGINT or SIGTERM.
pub fn run(args: BootstrapArgs) -> Result<()> {
    let (psk, accounts) = read_accounts(&args.security)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args.coaps, psk, accounts))
}

async fn serve(coaps: SocketAddr, psk: Vec<PskEntry>, accounts: HashMap<String, ServerAccount>) -> Result<()> {
    let mut store = StaticPskStore::new();
    let mut authorizer = EndpointBindings::default();
    for entry in &psk {
        store.insert(entry.identity.clone(), entry.key.clone());
        authorizer.psk.insert(entry.identity.clone(), entry.endpoint.clone());
    }
    let context = DtlsContext::server(ServerConfig::psk(store))?;
    let dtls = Arc::new(
        DtlsServer::bind(coaps, context, DtlsServerConfig::default())
            .await
            .with_context(|| format!("cannot listen on {coaps}"))?,
    );
    let endpoints = accounts.len();
    let server = BootstrapServer::start(Arc::clone(&dtls), Arc::new(authorizer), accounts, CoapConfig::default());
    tracing::info!(coaps = %dtls.local_addr(), psk_identities = psk.len(), endpoints, "tether bootstrap started");
    say!("tether bootstrap: CoAPs (DTLS 1.2) on udp {}", dtls.local_addr());
    say!(
        "tether bootstrap: {endpoints} endpoint(s) configured, {} bootstrap PSK identities (keys not shown)",
        psk.len()
    );
    let mut events = server.events();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(tether::bootstrap::BootstrapEvent::Bootstrapped { endpoint, peer }) => {
                    say!("tether bootstrap: {endpoint} ({peer}) bootstrapped");
                }
                Ok(tether::bootstrap::BootstrapEvent::Failed { endpoint, peer, reason }) => {
                    say!("tether bootstrap: {} ({peer}) not bootstrapped: {reason}", endpoint.as_deref().unwrap_or("-"));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    say!("tether bootstrap: shutting down");
    dtls.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> Result<ServerAccount> {
        let file: BootstrapFile = toml::from_str(text).unwrap();
        file.bootstrap[0].account()
    }

    #[test]
    fn entries_with_mistakes_say_which() {
        let good = r#"[[bootstrap]]
endpoint = "urn:dev:0"
server_uri = "coaps://127.0.0.1:5684"
psk_identity = "device-0"
psk_key = "00112233445566778899aabbccddeeff"
"#;
        let account = entry(good).unwrap();
        assert_eq!((account.short_server_id, account.lifetime.as_secs(), account.binding.as_str()), (1, 300, "U"));
        let cases = [
            (good.replace("coaps://127.0.0.1:5684", "coap://127.0.0.1:5683"), "expected coaps://"),
            (good.replace("127.0.0.1:5684", "localhost:5684"), "HOST an IP address"),
            (good.replace("00112233", "0011223x"), "not hex"),
            (format!("{good}security_mode = \"x509\"\n"), "only \"psk\""),
            (format!("{good}binding = \"T\"\n"), "binding"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", entry(&text).unwrap_err());
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
