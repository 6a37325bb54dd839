//! Holding the lease: renewed three times a lease; a node that cannot renew in time stops.

use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::store::Membership;

/// Renews the lease every third of `lease` until it cannot: `lost` is told why, once, in
/// time for this node to stop before any other may adopt its sessions (by the store's clock,
/// the lease runs at least until `lease` after the start of the last renewal that
/// succeeded; here it is given up a sixth of a lease before that).
pub(super) async fn renew(membership: Arc<dyn Membership>, lease: Duration, lost: Box<dyn FnOnce(&str) + Send>) {
    let every = lease / 3;
    let margin = lease / 6;
    let mut valid_until = clock::now() + lease - margin;
    loop {
        tokio::time::sleep(every).await;
        let started = clock::now();
        if started >= valid_until {
            lost("the lease could not be renewed in time");
            return;
        }
        match tokio::time::timeout(valid_until - started, membership.renew(lease)).await {
            Ok(Ok(true)) => valid_until = started + lease - margin,
            Ok(Ok(false)) => {
                lost("the lease ran out or a newer start of this node holds it");
                return;
            }
            Ok(Err(err)) => tracing::warn!(%err, "lease renewal failed; trying again"),
            Err(_) => {
                lost("the store did not answer before the lease ran out");
                return;
            }
        }
    }
}
