//! Registrations of devices that moved to this node: a device without a Connection ID whose
//! node died handshakes with this one (the load balancer's flow for it ends here now) and
//! sends an Update; its registration is claimed in the store, by compare-and-set and only
//! for the identity that registered it, and the node that served it is told to let go.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use tether_coap::registration::Registration;
use tether_proto::cluster::FrameKind;

use super::forward::NodeChannel;
use crate::clock;
use crate::lwm2m::RegistrationClaims;
use crate::store::Membership;

/// Claims through the store, releases over the node channel.
#[derive(Debug, Clone)]
pub(super) struct Claims {
    pub(super) membership: Arc<dyn Membership>,
    pub(super) channel: NodeChannel,
}

impl RegistrationClaims for Claims {
    fn claim(&self, id: String, identity: String) -> BoxFuture<'static, Option<Registration>> {
        let claims = self.clone();
        Box::pin(async move {
            let (registration, previous) =
                match claims.membership.claim_registration(&id, &identity, clock::now()).await {
                    Ok(claimed) => claimed?,
                    Err(err) => {
                        tracing::warn!(%err, "cannot claim a registration; the device registers anew");
                        return None;
                    }
                };
            if previous != claims.channel.view.me() {
                // Lost on the way, the other node keeps a copy it no longer serves; the
                // store (and so every node's API) names this node from now.
                let unused = SocketAddr::from(([0, 0, 0, 0], 0));
                claims.channel.send(previous, FrameKind::Release, unused, id.as_bytes()).await;
            }
            Some(registration)
        })
    }
}
