//! The node channel: records for sessions other nodes hold go to their holder, with the
//! address they came from; the holder's answers come back to be sent from here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::cluster::{ClusterKey, Frame, FrameKind};
use tether_proto::dtls::{ForeignDatagram, NodeId};
use tokio::sync::mpsc;

use super::{unix_ms, ClusterView};
use crate::clock;
use crate::lwm2m::Lwm2mServer;
use crate::server::{RelayIn, RelayLink, RelayOut};
use crate::store::Membership;
use crate::Socket;

/// Frames further than this from the receiver's clock are refused (nodes' clocks are kept
/// by NTP; a captured frame replays only within it).
const MAX_SKEW_MS: u64 = 30_000;
/// How long a looked-up holder is trusted before it is looked up again.
const HOLDER_TTL: Duration = Duration::from_secs(2);
/// The longest registration id a release names (tether's are 10 characters).
const MAX_REGISTRATION_ID: usize = 64;
/// Store lookups in flight at most; records needing one beyond it are dropped (the device
/// retransmits).
const MAX_LOOKUPS: usize = 256;

/// Counters of forwarding, for `/metrics` and `/api/pool`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Records sent to their holder.
    pub forwarded: u64,
    /// Answers sent back through the node a device's flow is bound to.
    pub replies_relayed: u64,
    /// Records and answers that arrived from other nodes.
    pub frames_received: u64,
    /// Frames refused: not authentic, stale or malformed.
    pub frames_refused: u64,
    /// Records no live node holds (yet: a takeover in progress), dropped.
    pub unroutable: u64,
}

struct Forwarder {
    me: NodeId,
    channel: NodeChannel,
    membership: Arc<dyn Membership>,
    to_server: mpsc::Sender<RelayIn>,
    holders: HashMap<Vec<u8>, (NodeId, std::time::Instant)>,
    lookups: usize,
    found: mpsc::Sender<(ForeignDatagram, Option<NodeId>)>,
    stats: Arc<std::sync::Mutex<ForwardStats>>,
    lwm2m: Lwm2mServer,
}

/// The node channel: its socket, the key every frame is sealed with, and the nodes it
/// reaches.
#[derive(Debug, Clone)]
pub(super) struct NodeChannel {
    pub(super) socket: Arc<Socket>,
    pub(super) key: Arc<ClusterKey>,
    pub(super) view: ClusterView,
}

impl NodeChannel {
    /// Sends a frame of `kind` to `node`; `false` if it is not alive.
    pub(super) async fn send(
        &self,
        node: NodeId,
        kind: FrameKind,
        peer: std::net::SocketAddr,
        datagram: &[u8],
    ) -> bool {
        let Some(addr) = self.view.channel_of(node) else { return false };
        let frame = Frame { kind, sender: self.view.me(), sent_unix_ms: unix_ms(), peer, datagram };
        self.socket.send_to(&self.key.seal(&frame), addr).await.is_ok()
    }
}

/// Moves frames between the server's relay and the node channel until the server lets go;
/// releases of registrations that other nodes claimed go to `lwm2m`.
pub(super) async fn run(
    channel: NodeChannel,
    link: RelayLink,
    membership: Arc<dyn Membership>,
    stats: Arc<std::sync::Mutex<ForwardStats>>,
    lwm2m: Lwm2mServer,
) {
    let RelayLink { to_server, mut from_server } = link;
    let (found, mut found_rx) = mpsc::channel(MAX_LOOKUPS);
    let me = channel.view.me();
    let mut forwarder =
        Forwarder { me, channel, membership, to_server, holders: HashMap::new(), lookups: 0, found, stats, lwm2m };
    let channel = Arc::clone(&forwarder.channel.socket);
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            out = from_server.recv() => match out {
                None => return,
                Some(RelayOut::Foreign(foreign)) => forwarder.foreign(foreign).await,
                Some(RelayOut::Reply { via, to, datagram }) => {
                    forwarder.send(via, FrameKind::Reply, to, &datagram).await;
                    forwarder.count(|s| s.replies_relayed += 1);
                }
            },
            received = channel.recv_from(&mut buf) => {
                if let Ok((n, _)) = received {
                    forwarder.frame(&buf[..n]).await;
                }
            }
            Some((foreign, holder)) = found_rx.recv() => {
                forwarder.lookups -= 1;
                match holder {
                    Some(holder) => {
                        forwarder.holders.insert(foreign.cid.clone(), (holder, clock::now()));
                        forwarder.deliver(holder, foreign).await;
                    }
                    None => {
                        tracing::debug!(cid = %hex(&foreign.cid), "no node holds the session of a record");
                        forwarder.count(|s| s.unroutable += 1)
                    }
                }
            }
        }
    }
}

impl Forwarder {
    fn count(&self, change: impl FnOnce(&mut ForwardStats)) {
        change(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A record for a session this node does not hold: to the node its ID names while that
    /// node is alive and not this one; else to the holder the store names.
    async fn foreign(&mut self, foreign: ForeignDatagram) {
        let now = clock::now();
        if let Some((holder, at)) = self.holders.get(&foreign.cid) {
            if now.duration_since(*at) < HOLDER_TTL && self.channel.view.alive(*holder) {
                let holder = *holder;
                return self.deliver(holder, foreign).await;
            }
        }
        if foreign.node != self.me && self.channel.view.alive(foreign.node) {
            return self.deliver(foreign.node, foreign).await;
        }
        if self.lookups >= MAX_LOOKUPS {
            self.count(|s| s.unroutable += 1);
            return;
        }
        self.lookups += 1;
        let membership = Arc::clone(&self.membership);
        let found = self.found.clone();
        tokio::spawn(async move {
            let holder = membership.holder_of(&foreign.cid).await.ok().flatten();
            let _ = found.send((foreign, holder)).await;
        });
    }

    async fn deliver(&mut self, holder: NodeId, foreign: ForeignDatagram) {
        tracing::debug!(cid = %hex(&foreign.cid), holder = holder.0, from = %foreign.from, "forwarding a record");
        if holder == self.me {
            // The store says this node holds it, but the session is not here (yet: it is
            // being adopted): the device's retransmission will find it.
            self.count(|s| s.unroutable += 1);
            return;
        }
        if self.send(holder, FrameKind::Forward, foreign.from, &foreign.contents).await {
            self.count(|s| s.forwarded += 1);
        } else {
            self.count(|s| s.unroutable += 1);
        }
    }

    /// Sends a frame to `node`'s channel; `false` if it is not alive.
    async fn send(&self, node: NodeId, kind: FrameKind, peer: std::net::SocketAddr, datagram: &[u8]) -> bool {
        self.channel.send(node, kind, peer, datagram).await
    }

    /// A frame from another node.
    async fn frame(&mut self, bytes: &[u8]) {
        let frame = match self.channel.key.open(bytes, unix_ms(), MAX_SKEW_MS) {
            Ok(frame) if frame.sender != self.me => frame,
            Ok(_) | Err(_) => {
                self.count(|s| s.frames_refused += 1);
                return;
            }
        };
        self.count(|s| s.frames_received += 1);
        let message = match frame.kind {
            FrameKind::Forward => {
                RelayIn::Forwarded { via: frame.sender, from: frame.peer, datagram: frame.datagram.to_vec() }
            }
            FrameKind::Reply => RelayIn::Send { to: frame.peer, datagram: frame.datagram.to_vec() },
            FrameKind::Release => {
                if let Ok(id) = std::str::from_utf8(frame.datagram) {
                    if id.len() <= MAX_REGISTRATION_ID {
                        let (lwm2m, id) = (self.lwm2m.clone(), id.to_string());
                        tokio::spawn(async move { lwm2m.release(id).await });
                    }
                }
                return;
            }
        };
        // Behind: dropped, as a full socket buffer would (the device retransmits).
        let _ = self.to_server.try_send(message);
    }
}

/// A Connection ID as hex, for logs.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
