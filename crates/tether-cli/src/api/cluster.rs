//! The API of a cluster's node: every node answers for the whole fleet. A request about a
//! device registered with another node is carried to that node (its answer comes back to
//! the caller); the list of clients gathers every live node's.
//!
//! Nodes call each other's API with a token derived from the cluster key, and mark the
//! call (`x-tether-forwarded`), so a node answers it from what it holds itself and never
//! passes it on again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tether::cluster::{Cluster, ClusterView, ForwardStats};
use tether::store::Membership;

use super::{error, Api};

/// Marks a call one node makes to another's API.
pub const FORWARDED: &str = "x-tether-forwarded";
/// How long a call to another node may take (a device's answer included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a node's API needs to answer for the cluster.
#[derive(Clone)]
pub struct ClusterApi {
    view: ClusterView,
    membership: Arc<dyn Membership>,
    /// `Bearer <token>`, as every node accepts it from another.
    authorization: HeaderValue,
    client: Client<HttpConnector, Body>,
    forward_stats: Arc<dyn Fn() -> ForwardStats + Send + Sync>,
}

impl std::fmt::Debug for ClusterApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterApi").field("node", &self.view.me()).finish_non_exhaustive()
    }
}

impl ClusterApi {
    /// The API of node `view.me()`; `token` is the one nodes present to each other.
    pub fn new(cluster: &Cluster, membership: Arc<dyn Membership>, token: &str) -> Self {
        let authorization = HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or(HeaderValue::from_static(""));
        let client = Client::builder(TokioExecutor::new()).build_http();
        let forward_stats = cluster.forward_stats_source();
        Self { view: cluster.view().clone(), membership, authorization, client, forward_stats }
    }

    /// This node's id.
    pub fn node(&self) -> u8 {
        self.view.me().0
    }

    /// This node, the nodes as last seen and what forwarding did, for `/api/pool`.
    pub fn summary(&self) -> Value {
        let nodes: Vec<Value> = self
            .view
            .nodes()
            .iter()
            .map(|n| {
                json!({
                    "node": n.node.0,
                    "alive": n.alive,
                    "epoch": n.epoch,
                    "sessions": n.sessions,
                    "registrations": n.registrations,
                    "channel": n.addresses.map(|a| a.channel.to_string()),
                    "http": n.addresses.map(|a| a.http.to_string()),
                })
            })
            .collect();
        let f = (self.forward_stats)();
        json!({
            "node": self.view.me().0,
            "nodes": nodes,
            "forwarding": {
                "forwarded": f.forwarded,
                "replies_relayed": f.replies_relayed,
                "frames_received": f.frames_received,
                "frames_refused": f.frames_refused,
                "unroutable": f.unroutable,
            },
        })
    }

    /// Where the API of the node serving `endpoint` is, if that is another live node.
    async fn holder(&self, endpoint: &str) -> Option<SocketAddr> {
        let node = self.membership.registration_node(endpoint).await.ok().flatten()?;
        (node != self.view.me()).then(|| self.view.http_of(node)).flatten()
    }

    /// `request` carried to the API at `to`, and its answer.
    async fn call(&self, to: SocketAddr, mut request: Request) -> Result<Response, String> {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        *request.uri_mut() = format!("http://{to}{path}").parse().map_err(|e| format!("{e}"))?;
        let headers = request.headers_mut();
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(header::HOST, HeaderValue::from_str(&to.to_string()).map_err(|e| format!("{e}"))?);
        headers.insert(FORWARDED, HeaderValue::from(u16::from(self.view.me().0)));
        headers.remove(header::COOKIE);
        headers.remove(header::ORIGIN);
        let answer = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("no answer within {} s", CALL_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())?;
        Ok(answer.map(Body::new).into_response())
    }

    /// The clients every other live node serves, as their APIs list them.
    pub async fn others_clients(&self) -> Vec<Value> {
        let others: Vec<_> = self
            .view
            .nodes()
            .into_iter()
            .filter(|n| n.alive && n.node != self.view.me())
            .filter_map(|n| Some((n.node, n.addresses?.http)))
            .collect();
        let calls = others.into_iter().map(|(node, http)| async move {
            let request = Request::get("/api/clients").body(Body::empty()).ok()?;
            let response = self.call(http, request).await.ok()?;
            if !response.status().is_success() {
                tracing::warn!(node = node.0, status = %response.status(), "a node did not list its clients");
                return None;
            }
            let body = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024).await.ok()?;
            serde_json::from_slice::<Vec<Value>>(&body).ok()
        });
        futures::future::join_all(calls).await.into_iter().flatten().flatten().collect()
    }
}

/// `/api/clients/{endpoint}/…` of a device another node serves: carried there.
pub(super) async fn to_holder(State(api): State<Api>, request: Request, next: Next) -> Response {
    let Some(cluster) = api.cluster.as_ref() else { return next.run(request).await };
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let Some(endpoint) = endpoint_of(request.uri().path()) else { return next.run(request).await };
    // The store names the node that serves it (a copy kept here a moment after the device
    // moved on does not).
    let Some(holder) = cluster.holder(&endpoint).await else { return next.run(request).await };
    match cluster.call(holder, request).await {
        Ok(response) => response,
        Err(err) => error(
            StatusCode::BAD_GATEWAY,
            None,
            format!("{endpoint} is served by the node at {holder}, which did not answer: {err}"),
        ),
    }
}

/// The endpoint of `/api/clients/{endpoint}[/…]`, percent-decoded.
fn endpoint_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/clients/")?;
    let raw = rest.split('/').next().filter(|e| !e.is_empty())?;
    percent_encoding::percent_decode_str(raw).decode_utf8().ok().map(|e| e.into_owned())
}

#[cfg(test)]
mod tests {
    use super::endpoint_of;

    #[test]
    fn the_endpoint_is_the_first_segment_decoded() {
        assert_eq!(endpoint_of("/api/clients/urn%3Adev%3A1/3/0/0").as_deref(), Some("urn:dev:1"));
        assert_eq!(endpoint_of("/api/clients/dev-1").as_deref(), Some("dev-1"));
        assert_eq!(endpoint_of("/api/clients/"), None);
        assert_eq!(endpoint_of("/api/pool"), None);
    }
}
