//! A cluster's nodes as the store knows them: who is a member, where it is reached, whose
//! lease is current, and how the sessions of a node whose lease ran out are adopted.
//!
//! Leases run on the store's clock alone, so nodes' clocks need not agree. A node renews
//! its lease well inside its length; one that cannot (a pause, a partition, a lost
//! database) stops serving before anyone may adopt its sessions. Adoption moves a
//! session to a live node by compare-and-set on its holder and epoch: a session is never
//! adopted twice, and its old holder's checkpoints are refused from then on
//! ([`Applied::fenced`](super::Applied::fenced)).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_coap::registration::Registration;
use tether_proto::dtls::NodeId;

use super::{StoreFuture, StoredSession};

/// Where a node is reached by the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Its node-to-node channel (forwarded records and their answers).
    pub channel: SocketAddr,
    /// Its HTTP API (requests for devices it holds).
    pub http: SocketAddr,
}

/// A node as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node.
    pub node: NodeId,
    /// Where it is reached, if it ever joined a cluster.
    pub addresses: Option<NodeAddresses>,
    /// Its lease is current (by the store's clock).
    pub alive: bool,
    /// How many times it started: its fencing epoch.
    pub epoch: u64,
    /// Sessions it holds.
    pub sessions: u64,
    /// Registrations it serves.
    pub registrations: u64,
}

/// Which part of a dead node's sessions an adopter takes: those whose handle modulo
/// `of` is `rank` (`of` = 1: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This adopter's rank among the live nodes, 0-based.
    pub rank: u32,
    /// How many live nodes share the work.
    pub of: u32,
}

/// What an adoption took over.
#[derive(Debug, Clone, Default)]
pub struct Adopted {
    /// Sessions, to restore.
    pub sessions: Vec<StoredSession>,
    /// Registrations, to serve.
    pub registrations: Vec<Registration>,
}

/// Membership, leases and adoption. See the module docs.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// This node.
    fn node(&self) -> NodeId;

    /// This start's fencing epoch (the store's start count of the node).
    fn epoch(&self) -> u64;

    /// Joins the cluster, or joins it again after a restart: publishes `addresses` and
    /// takes a lease of `lease` from now.
    fn join(&self, addresses: NodeAddresses, lease: Duration) -> StoreFuture<'_, ()>;

    /// Extends the lease to `lease` from now. `false`: the lease had run out, or a newer
    /// start of this node holds it: this process must stop serving at once.
    fn renew(&self, lease: Duration) -> StoreFuture<'_, bool>;

    /// Gives the lease up (a clean shutdown, after the last checkpoint): the others adopt
    /// this node's sessions at once.
    fn leave(&self) -> StoreFuture<'_, ()>;

    /// Every node that ever joined.
    fn nodes(&self) -> StoreFuture<'_, Vec<NodeRecord>>;

    /// Adopts `share` of the sessions of `dead`, if its lease has run out, with the
    /// registrations bound to them (and, for `share.rank` 0, its registrations bound to no
    /// stored session), their times mapped onto `now`. Each session comes back with the
    /// reservation and receive window of its last checkpoint: the adopter sends only above
    /// what the dead node could have used.
    fn adopt(&self, dead: NodeId, share: Share, now: Instant) -> StoreFuture<'_, Adopted>;

    /// The node that holds the session whose Connection ID is `cid`, if any does.
    fn holder_of(&self, cid: &[u8]) -> StoreFuture<'_, Option<NodeId>>;

    /// The node that serves the registration of `endpoint`, if it is registered.
    fn registration_node(&self, endpoint: &str) -> StoreFuture<'_, Option<NodeId>>;

    /// Moves registration `id` to this node, if `identity` registered it: its device (one
    /// without a Connection ID, whose node died) handshook with this node and sends an
    /// Update. The registration comes back, its times mapped onto `now`, with the node
    /// that served it until now.
    fn claim_registration(
        &self,
        id: &str,
        identity: &str,
        now: Instant,
    ) -> StoreFuture<'_, Option<(Registration, NodeId)>>;
}
