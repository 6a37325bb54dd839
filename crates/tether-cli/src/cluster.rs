//! `[cluster]` of tether.toml (and its flags): this server as one node of several on one
//! PostgreSQL database, behind a UDP load balancer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tether_proto::cluster::ClusterKey;
use tether_proto::dtls::NodeId;

/// `[cluster]` as written in tether.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// This node's id, 0 to 254, unique in the cluster.
    node: Option<u8>,
    /// Where the node channel listens (UDP), reachable by the other nodes.
    channel: Option<SocketAddr>,
    /// The HTTP address the other nodes reach this node's API at (default: `http`).
    advertise_http: Option<SocketAddr>,
    /// A file holding the cluster key, hex (default: `TETHER_CLUSTER_KEY`).
    key_file: Option<PathBuf>,
}

/// Flags of `tether serve` for a cluster; each overrides `[cluster]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// This node's id in a cluster (0 to 254): turns the cluster on (with `--store
    /// postgres://…` and `--channel`). The key every node shares is read from
    /// `TETHER_CLUSTER_KEY` (hex) or `[cluster] key_file`.
    #[arg(long, value_name = "ID")]
    pub node: Option<u8>,
    /// Where this node's channel to the other nodes listens (UDP).
    #[arg(long, value_name = "ADDR:PORT")]
    pub channel: Option<SocketAddr>,
    /// The address the other nodes reach this node's HTTP API at (default: `--http`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise_http: Option<SocketAddr>,
}

/// A resolved cluster node.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node.
    pub node: NodeId,
    /// The node channel.
    pub channel: SocketAddr,
    /// The HTTP address others reach this node at.
    pub advertise_http: SocketAddr,
    /// The shared key.
    pub key: Arc<ClusterKey>,
}

impl ClusterSettings {
    /// The token nodes present to each other's API, derived from the cluster key (so every
    /// node knows it, and nobody without the key).
    pub fn node_api_token(&self) -> String {
        self.key.derive(b"tether node api token").iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The cluster settings of the flags and `[cluster]`, if a node id is given by either;
    /// `http` is the server's HTTP address.
    pub fn resolve(args: &ClusterArgs, file: &ClusterFile, http: SocketAddr) -> Result<Option<Self>> {
        let Some(node) = args.node.or(file.node) else {
            if args.channel.is_some() || file.channel.is_some() {
                bail!("--channel without --node: give this node an id (0 to 254) to run it in a cluster");
            }
            return Ok(None);
        };
        if node == u8::MAX {
            bail!("--node 255: node ids are 0 to 254");
        }
        let Some(channel) = args.channel.or(file.channel) else {
            bail!("--node {node} without --channel: the other nodes reach this one at its channel (UDP ADDR:PORT)");
        };
        let advertise_http = args.advertise_http.or(file.advertise_http).unwrap_or(http);
        if advertise_http.ip().is_unspecified() || channel.ip().is_unspecified() {
            bail!(
                "a cluster node needs addresses the others can reach: --channel {channel} and the HTTP address \
                 {advertise_http} must not be 0.0.0.0 or [::] (give --advertise-http)"
            );
        }
        let key = match &file.key_file {
            Some(path) => read_key_file(path)?,
            None => std::env::var("TETHER_CLUSTER_KEY").map_err(|_| {
                anyhow::anyhow!(
                    "a cluster node needs the cluster key: TETHER_CLUSTER_KEY (hex, at least 16 random bytes, the same \
                     on every node) or [cluster] key_file"
                )
            })?,
        };
        let key = parse_key(&key).context("the cluster key")?;
        Ok(Some(Self { node: NodeId(node), channel, advertise_http, key: Arc::new(key) }))
    }
}

fn read_key_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read the cluster key file {}", path.display()))
}

/// A key from hex, or what is wrong with the text (never the text).
fn parse_key(hex: &str) -> Result<ClusterKey> {
    let hex = hex.trim();
    if hex.len() % 2 != 0 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("not hex ({} characters): give it as hex digits, e.g. `openssl rand -hex 32`", hex.len());
    }
    let bytes: Vec<u8> =
        (0..hex.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
    ClusterKey::new(&bytes).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Joins this server to the cluster: `http` is where the others reach its API. A lost
/// lease ends the process at once (exit status 75), before another node may adopt its
/// sessions: a restart owns nothing it lost.
pub async fn join(
    settings: &ClusterSettings,
    http: SocketAddr,
    membership: Arc<dyn tether::store::Membership>,
    dtls: Arc<tether::DtlsServer>,
    lwm2m: tether::lwm2m::Lwm2mServer,
) -> Result<tether::cluster::Cluster> {
    let config = tether::cluster::ClusterConfig::new(settings.channel, http, Arc::clone(&settings.key));
    let lost = Box::new(|why: &str| {
        tracing::error!(why, "this node lost its cluster lease: stopping at once (another node adopts its sessions)");
        say!("tether serve: this node lost its cluster lease ({why}): stopping");
        std::process::exit(75);
    });
    let cluster = tether::cluster::Cluster::join(config, membership, dtls, lwm2m, lost)
        .await
        .with_context(|| format!("cannot join the cluster as node {}", settings.node.0))?;
    say!(
        "tether serve: cluster node {} (channel udp {}, API reached at {http}); {} nodes known",
        settings.node.0,
        settings.channel,
        cluster.view().nodes().len()
    );
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_needs_a_channel_reachable_addresses_and_a_strong_key() {
        let http: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let none = ClusterSettings::resolve(&ClusterArgs::default(), &ClusterFile::default(), http).unwrap();
        assert!(none.is_none());
        let args = |node, channel: &str| ClusterArgs { node, channel: channel.parse().ok(), advertise_http: None };
        let err = |args: ClusterArgs, file: ClusterFile| {
            format!("{:#}", ClusterSettings::resolve(&args, &file, http).unwrap_err())
        };
        assert!(err(args(None, "127.0.0.1:5700"), ClusterFile::default()).contains("--channel without --node"));
        assert!(err(args(Some(1), ""), ClusterFile::default()).contains("without --channel"));
        assert!(err(args(Some(255), "127.0.0.1:5700"), ClusterFile::default()).contains("node ids are 0 to 254"));
        assert!(err(args(Some(1), "0.0.0.0:5700"), ClusterFile::default()).contains("must not be 0.0.0.0"));
        let dir = std::env::temp_dir().join(format!("tether-cluster-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |key: &str| {
            std::fs::write(dir.join("key"), key).unwrap();
            ClusterFile { key_file: Some(dir.join("key")), ..ClusterFile::default() }
        };
        assert!(err(args(Some(1), "127.0.0.1:5700"), file("00112233")).contains("at least 16 random bytes"));
        assert!(err(args(Some(1), "127.0.0.1:5700"), file("not hex at all")).contains("not hex"));
        let settings =
            ClusterSettings::resolve(&args(Some(1), "127.0.0.1:5700"), &file(&"ab".repeat(32)), http).unwrap().unwrap();
        assert_eq!((settings.node, settings.advertise_http), (NodeId(1), http));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
