//! Watching for dead nodes and adopting their sessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ClusterView;
use crate::clock;
use crate::lwm2m::Lwm2mServer;
use crate::server::RelayIn;
use crate::store::{Membership, Share};

/// How long after a node is first seen dead the live nodes stop sharing its sessions out
/// and any one takes what is left (views of who is alive may differ for a moment).
const SHARE_GRACE: Duration = Duration::from_secs(2);

/// Looks at the nodes every `every`; adopts this node's share of each dead node's
/// sessions and registrations.
pub(super) async fn watch(
    membership: Arc<dyn Membership>,
    view: ClusterView,
    to_server: mpsc::Sender<RelayIn>,
    lwm2m: Lwm2mServer,
    every: Duration,
) {
    let me = membership.node();
    let mut dead_since = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let nodes = match view.refresh(&*membership).await {
            Ok(nodes) => nodes,
            Err(err) => {
                tracing::warn!(%err, "cannot read the cluster's nodes");
                continue;
            }
        };
        let alive: Vec<_> = nodes.iter().filter(|n| n.alive).map(|n| n.node).collect();
        let Some(rank) = alive.iter().position(|n| *n == me) else { continue };
        let now = clock::now();
        dead_since.retain(|node, _| nodes.iter().any(|n| n.node == *node && !n.alive));
        for dead in nodes.iter().filter(|n| !n.alive && n.node != me && (n.sessions > 0 || n.registrations > 0)) {
            let since = *dead_since.entry(dead.node).or_insert(now);
            let share = if now.duration_since(since) >= SHARE_GRACE {
                Share { rank: 0, of: 1 }
            } else {
                Share { rank: u32::try_from(rank).unwrap_or(0), of: u32::try_from(alive.len()).unwrap_or(1) }
            };
            let adopted = match membership.adopt(dead.node, share, now).await {
                Ok(adopted) => adopted,
                Err(err) => {
                    tracing::warn!(%err, node = dead.node.0, "adoption failed; trying again");
                    continue;
                }
            };
            let (sessions, registrations) = (adopted.sessions.len(), adopted.registrations.len());
            if sessions == 0 && registrations == 0 {
                continue;
            }
            lwm2m.adopt(adopted.registrations).await;
            let (reply, restored) = oneshot::channel();
            if to_server.send(RelayIn::Adopt(adopted.sessions, dead.node, reply)).await.is_err() {
                return;
            }
            let restored = restored.await.unwrap_or(0);
            tracing::info!(
                from = dead.node.0,
                sessions,
                restored,
                registrations,
                "adopted the sessions of a node whose lease ran out"
            );
        }
    }
}
