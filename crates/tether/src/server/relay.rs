//! The DTLS server's side of a cluster: records for sessions other nodes hold go out to be
//! forwarded; records forwarded here are served as if they had arrived here, and their
//! answers go back through the node that received them (the load balancer's flow for the
//! device is bound to that node); sessions adopted from a dead node are restored.
//!
//! The cluster room ([`crate::cluster`]) holds the other ends: it moves frames between
//! nodes and decides who holds what. The server only routes.

use std::collections::HashMap;
use std::net::SocketAddr;

use tether_proto::dtls::{ForeignDatagram, NodeId};
use tokio::sync::{mpsc, oneshot};

use super::{Actor, Arrival};
use crate::clock;
use crate::store::StoredSession;

/// What the server hands the cluster room.
#[derive(Debug)]
pub enum RelayOut {
    /// A datagram whose Connection ID names a session this node does not hold.
    Foreign(ForeignDatagram),
    /// A datagram for a device whose flow is bound to node `via`: it sends it to `to`.
    Reply {
        /// The node the device's datagrams arrive at.
        via: NodeId,
        /// The device's address, as `via` sees it.
        to: SocketAddr,
        /// The datagram.
        datagram: Vec<u8>,
    },
}

/// What the cluster room hands the server.
#[derive(Debug)]
pub enum RelayIn {
    /// A datagram node `via` received from `from` for a session this node holds.
    Forwarded {
        /// The node it arrived at.
        via: NodeId,
        /// The device's address, as `via` saw it.
        from: SocketAddr,
        /// The datagram.
        datagram: Vec<u8>,
    },
    /// A datagram another node's session sends to a device whose flow is bound here.
    Send {
        /// The device's address.
        to: SocketAddr,
        /// The datagram.
        datagram: Vec<u8>,
    },
    /// Sessions adopted from a node whose lease ran out: restored here, reported to the
    /// application as [`Arrival::Adopted`]; the answer says how many were restored.
    Adopt(Vec<StoredSession>, NodeId, oneshot::Sender<usize>),
}

/// The cluster room's ends of a server's relay.
#[derive(Debug)]
pub struct RelayLink {
    /// To the server.
    pub to_server: mpsc::Sender<RelayIn>,
    /// From the server.
    pub from_server: mpsc::Receiver<RelayOut>,
}

/// Datagrams waiting between the server and the cluster room, each way; beyond it they are
/// dropped (the device's retransmission covers them).
pub(super) const RELAY_QUEUE: usize = 4096;

/// The server's ends, and where its answers to forwarded devices go.
pub(super) struct RelayState {
    pub(super) outbound: mpsc::Sender<RelayOut>,
    pub(super) inbound: mpsc::Receiver<RelayIn>,
    /// Devices whose datagrams arrive through another node, by address: their answers go
    /// back through it. A datagram straight from the address takes it off.
    routes: HashMap<SocketAddr, NodeId>,
    /// Datagrams dropped because the cluster room was behind.
    pub(super) dropped: u64,
}

/// Routes kept at most; beyond it the table starts over (answers then go straight to the
/// device until its next datagram is forwarded again).
const MAX_ROUTES: usize = 200_000;

impl RelayState {
    pub(super) fn new(outbound: mpsc::Sender<RelayOut>, inbound: mpsc::Receiver<RelayIn>) -> Self {
        Self { outbound, inbound, routes: HashMap::new(), dropped: 0 }
    }
}

impl Actor {
    /// A datagram straight from `from`: answers to it go straight back.
    pub(super) fn heard_directly(&mut self, from: SocketAddr) {
        if let Some(relay) = self.relay.as_mut() {
            if !relay.routes.is_empty() {
                relay.routes.remove(&from);
            }
        }
    }

    /// Hands the endpoint's datagrams for other nodes' sessions to the cluster room.
    pub(super) fn hand_out_foreign(&mut self) {
        while let Some(foreign) = self.endpoint.poll_foreign() {
            let Some(relay) = self.relay.as_mut() else { continue };
            if relay.outbound.try_send(RelayOut::Foreign(foreign)).is_err() {
                relay.dropped += 1;
            }
        }
    }

    /// Where a datagram to `to` goes: `None` straight from the socket, else through a node.
    pub(super) fn route_of(&self, to: SocketAddr) -> Option<NodeId> {
        self.relay.as_ref()?.routes.get(&to).copied()
    }

    /// Sends `datagram` to `to` through node `via`.
    pub(super) fn relay_reply(&mut self, via: NodeId, to: SocketAddr, datagram: Vec<u8>) {
        let Some(relay) = self.relay.as_mut() else { return };
        if relay.outbound.try_send(RelayOut::Reply { via, to, datagram }).is_err() {
            relay.dropped += 1;
        }
    }

    /// Acts on what the cluster room sent.
    pub(super) async fn relay_in(&mut self, message: RelayIn) {
        let now = clock::now();
        match message {
            RelayIn::Forwarded { via, from, datagram } => {
                if let Some(relay) = self.relay.as_mut() {
                    if relay.routes.len() >= MAX_ROUTES {
                        relay.routes.clear();
                    }
                    relay.routes.insert(from, via);
                }
                self.endpoint.handle(now, from, &datagram);
                // Forwarded once at most: a record this node does not hold either goes no
                // further (the store named a holder that has not restored it yet).
                while let Some(foreign) = self.endpoint.poll_foreign() {
                    tracing::debug!(node = foreign.node.0, from = %from, "a forwarded record's session is not here");
                    if let Some(relay) = self.relay.as_mut() {
                        relay.dropped += 1;
                    }
                }
            }
            RelayIn::Send { to, datagram } => {
                let _ = self.socket.send_to(&datagram, to).await;
            }
            RelayIn::Adopt(sessions, from, reply) => {
                let mut restored = 0;
                for stored in sessions {
                    if self.restore_one(now, &stored, Arrival::Adopted { from }) {
                        restored += 1;
                    }
                }
                // Fresh reservations for all of them in the next write, before they send.
                self.next_checkpoint = now;
                let _ = reply.send(restored);
            }
        }
    }
}
