//! The nodes of the cluster as this node last saw them in the store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tether_proto::dtls::NodeId;

use crate::store::{Membership, NodeRecord, StoreError};

/// The nodes as last read from the store; cheap to clone and to ask.
#[derive(Debug, Clone)]
pub struct ClusterView {
    me: NodeId,
    nodes: Arc<RwLock<BTreeMap<NodeId, NodeRecord>>>,
}

impl ClusterView {
    pub(super) fn new(me: NodeId) -> Self {
        Self { me, nodes: Arc::default() }
    }

    /// Reads the nodes again; returns them.
    pub(super) async fn refresh(&self, membership: &dyn Membership) -> Result<Vec<NodeRecord>, StoreError> {
        let nodes = membership.nodes().await?;
        let mut held = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        *held = nodes.iter().map(|n| (n.node, n.clone())).collect();
        Ok(nodes)
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Every node as last seen.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Whether `node`'s lease was current when last seen.
    pub fn alive(&self, node: NodeId) -> bool {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).get(&node).is_some_and(|n| n.alive)
    }

    /// Where `node`'s channel is, if it is alive.
    pub fn channel_of(&self, node: NodeId) -> Option<SocketAddr> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes.get(&node).filter(|n| n.alive).and_then(|n| n.addresses).map(|a| a.channel)
    }

    /// Where `node`'s HTTP API is, if it is alive.
    pub fn http_of(&self, node: NodeId) -> Option<SocketAddr> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes.get(&node).filter(|n| n.alive).and_then(|n| n.addresses).map(|a| a.http)
    }

    /// The node whose channel is at `addr`, if a live one is.
    pub fn node_at(&self, addr: SocketAddr) -> Option<NodeId> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes.values().find(|n| n.alive && n.addresses.is_some_and(|a| a.channel == addr)).map(|n| n.node)
    }
}
