//! A node of a cluster: several `tether serve` processes on one PostgreSQL database behind a
//! plain UDP load balancer serve one fleet.
//!
//! - **Membership** (`lease.rs`): the node holds a lease in the store and renews it three
//!   times a lease; if it cannot renew in time, it stops serving before any other node may
//!   adopt its sessions (fail-stop: the process ends, and a restart owns nothing it lost).
//! - **Forwarding** (`forward.rs`): a record whose Connection ID names a session another
//!   node holds goes there over the node channel, authenticated with the cluster key and
//!   carrying the address the device's datagram came from; the holder's answers come back
//!   the same way and leave from the node the device's flow is bound to.
//! - **Claims** (`claims.rs`): a device without a Connection ID whose node died
//!   handshakes with a survivor and updates its registration there; the survivor claims
//!   the registration and the node that served it lets go.
//! - **Takeover** (`adopt.rs`): when a node's lease runs out, the live nodes adopt its
//!   sessions (each takes a share, by compare-and-set in the store) and the registrations
//!   bound to them, and serve them on with no handshake, from above the last durable
//!   sequence reservation.
//!
//! Nothing here touches a device's protocol state: the DTLS server routes
//! ([`crate::RelayIn`], [`crate::RelayOut`]), the store decides who holds what.

mod adopt;
mod claims;
mod forward;
mod lease;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::cluster::ClusterKey;
use tether_proto::dtls::NodeId;
use tokio::task::JoinHandle;

use crate::lwm2m::Lwm2mServer;
use crate::store::{Membership, NodeAddresses, NodeRecord, StoreError};
use crate::DtlsServer;
pub use forward::ForwardStats;
pub use view::ClusterView;

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the node channel listens (UDP).
    pub channel: SocketAddr,
    /// The HTTP address the other nodes reach this node's API at.
    pub http: SocketAddr,
    /// The key every node holds.
    pub key: Arc<ClusterKey>,
    /// How long a lease lasts without renewal. Default 3 s: a dead node's sessions are
    /// adopted 3 to 3.5 s after its last renewal.
    pub lease: Duration,
    /// How often the nodes are looked at for dead ones. Default 500 ms.
    pub watch_interval: Duration,
}

impl ClusterConfig {
    /// Defaults, with the node channel on `channel` and the API reached at `http`.
    pub fn new(channel: SocketAddr, http: SocketAddr, key: Arc<ClusterKey>) -> Self {
        Self { channel, http, key, lease: Duration::from_secs(3), watch_interval: Duration::from_millis(500) }
    }
}

/// A cluster could not be joined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node channel's address could not be bound.
    #[error("cannot bind the node channel on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The DTLS server ended.
    #[error("the DTLS server has stopped")]
    ServerStopped,
}

/// This node's part in a cluster, running. Dropping it stops the cluster's tasks; call
/// [`Cluster::leave`] first to hand the sessions over.
#[derive(Debug)]
pub struct Cluster {
    membership: Arc<dyn Membership>,
    dtls: Arc<DtlsServer>,
    view: ClusterView,
    stats: Arc<std::sync::Mutex<ForwardStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Joins: binds the node channel, publishes this node's addresses with a lease, and
    /// starts renewing it, forwarding and watching for dead nodes. `lost` is called once if
    /// the lease is lost (this node must stop serving at once).
    pub async fn join(
        config: ClusterConfig,
        membership: Arc<dyn Membership>,
        dtls: Arc<DtlsServer>,
        lwm2m: Lwm2mServer,
        lost: Box<dyn FnOnce(&str) + Send>,
    ) -> Result<Self, ClusterError> {
        let channel = crate::Socket::bind_udp(config.channel, Some(crate::SERVER_RECV_BUFFER))
            .await
            .map_err(|source| ClusterError::Bind { addr: config.channel, source })?;
        let channel_addr =
            channel.local_addr().map_err(|source| ClusterError::Bind { addr: config.channel, source })?;
        let addresses = NodeAddresses { channel: channel_addr, http: config.http };
        membership.join(addresses, config.lease).await?;
        let link = dtls.relay().await.ok_or(ClusterError::ServerStopped)?;
        let view = ClusterView::new(membership.node());
        view.refresh(&*membership).await?;
        let me = membership.node();
        tracing::info!(node = me.0, channel = %channel_addr, epoch = membership.epoch(), "joined the cluster");
        let stats = Arc::new(std::sync::Mutex::new(ForwardStats::default()));
        let to_server = link.to_server.clone();
        let channel =
            forward::NodeChannel { socket: Arc::new(channel), key: Arc::clone(&config.key), view: view.clone() };
        let claims = claims::Claims { membership: Arc::clone(&membership), channel: channel.clone() };
        lwm2m.claim_with(Arc::new(claims)).await;
        let forwarding = forward::run(channel, link, Arc::clone(&membership), Arc::clone(&stats), lwm2m.clone());
        let tasks = vec![
            tokio::spawn(lease::renew(Arc::clone(&membership), config.lease, lost)),
            tokio::spawn(forwarding),
            tokio::spawn(adopt::watch(Arc::clone(&membership), view.clone(), to_server, lwm2m, config.watch_interval)),
        ];
        Ok(Self { membership, dtls, view, stats, tasks })
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.membership.node()
    }

    /// The nodes as last seen.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// What forwarding did so far.
    pub fn forward_stats(&self) -> ForwardStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What forwarding did, readable while the cluster runs (for an API that outlives the
    /// borrow).
    pub fn forward_stats_source(&self) -> Arc<dyn Fn() -> ForwardStats + Send + Sync> {
        let stats = Arc::clone(&self.stats);
        Arc::new(move || stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Every node, as the store knows it now.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.membership.nodes().await
    }

    /// Leaves the cluster cleanly: every session's state written, nothing more sent on
    /// any, then the lease given up so the other nodes adopt the sessions at once.
    pub async fn leave(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.dtls.hand_over().await;
        if let Err(err) = self.membership.leave().await {
            tracing::warn!(%err, "could not give the lease up: the others adopt when it runs out");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The time now, Unix ms (frames between nodes carry it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
