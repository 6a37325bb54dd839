//! `GET /healthz`: whether each part of the server answers, for a supervisor or a load
//! balancer. Open without a token, and it shows no data: only each subsystem's state.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tether::lwm2m::Lwm2mServer;

/// How long a subsystem may take to answer before it counts as down.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// `{"status": "ok", "subsystems": {"dtls": "ok", "lwm2m": "ok", "http": "ok"}}` with 200, or
/// `"down"` for any that did not answer within two seconds, with 503.
pub async fn healthz(State(server): State<Lwm2mServer>) -> Response {
    let dtls = tokio::time::timeout(ANSWER_WITHIN, server.dtls().stats()).await.is_ok_and(|s| s.is_some());
    let lwm2m = tokio::time::timeout(ANSWER_WITHIN, server.is_alive()).await.unwrap_or(false);
    let state = |up: bool| if up { "ok" } else { "down" };
    let status = if dtls && lwm2m { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": state(dtls && lwm2m),
        "subsystems": { "dtls": state(dtls), "lwm2m": state(lwm2m), "http": "ok" },
    });
    (status, Json(body)).into_response()
}
