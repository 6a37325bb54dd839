//! The REST API (Leshan-like) and `/metrics`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRef, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use tether::lwm2m::{build, DeviceResponse, Lwm2mError, Lwm2mServer};
use tether_coap::coap_lite::{MessageClass, RequestType, ResponseType};
use tether_coap::content;
use tether_coap::registration::Registration;
use tokio::sync::mpsc;

/// Observations started through the API, by id, with their notification queues.
type Observations = Arc<Mutex<HashMap<u64, mpsc::Receiver<DeviceResponse>>>>;

#[derive(Clone)]
struct Api {
    server: Lwm2mServer,
    observations: Observations,
    /// The path each observation watches, for decoding its notifications.
    paths: Arc<Mutex<HashMap<u64, String>>>,
}

impl FromRef<Api> for Lwm2mServer {
    fn from_ref(api: &Api) -> Self {
        api.server.clone()
    }
}

/// The API's routes.
pub fn router(server: Lwm2mServer) -> Router {
    let api = Api { server, observations: Arc::default(), paths: Arc::default() };
    Router::new()
        .route("/api/clients", get(clients))
        .route("/api/clients/{endpoint}", get(client))
        .route("/api/clients/{endpoint}/{*path}", get(read).put(write).post(execute_or_observe).delete(delete))
        .route("/api/observations/{id}", get(notifications).delete(cancel))
        .route("/api/pool", get(pool))
        .route("/metrics", get(metrics))
        .with_state(api)
}

#[derive(Serialize)]
struct ClientView {
    endpoint: String,
    registration_id: String,
    address: String,
    lifetime_s: u64,
    binding: &'static str,
    lwm2m_version: String,
    objects: String,
    expires_in_s: u64,
    /// Seconds since the device last registered or updated.
    updated_s_ago: f64,
}

fn view(r: &Registration) -> ClientView {
    ClientView {
        endpoint: r.endpoint.clone(),
        registration_id: r.id.clone(),
        address: r.peer.to_string(),
        lifetime_s: r.lifetime.as_secs(),
        binding: r.binding.as_str(),
        lwm2m_version: r.version.clone(),
        objects: r.links.as_str().to_string(),
        expires_in_s: r.expires_at().saturating_duration_since(std::time::Instant::now()).as_secs(),
        updated_s_ago: std::time::Instant::now().saturating_duration_since(r.last_update).as_secs_f64(),
    }
}

async fn clients(State(server): State<Lwm2mServer>) -> Json<Vec<ClientView>> {
    let mut all: Vec<ClientView> = server.registrations().await.iter().map(view).collect();
    all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    Json(all)
}

async fn client(State(server): State<Lwm2mServer>, Path(endpoint): Path<String>) -> Response {
    match server.registrations().await.iter().find(|r| r.endpoint == endpoint) {
        Some(r) => Json(view(r)).into_response(),
        None => error(StatusCode::NOT_FOUND, Some("4.04"), format!("endpoint {endpoint:?} is not registered")),
    }
}

/// `GET …/{path}`: Read; `GET …/{path}/discover`: Discover.
async fn read(State(server): State<Lwm2mServer>, Path((endpoint, path)): Path<(String, String)>) -> Response {
    if let Some(target) = path.strip_suffix("/discover") {
        if let Some(response) = path_error(target) {
            return response;
        }
        return answer(server.discover(&endpoint, target).await, target);
    }
    if let Some(response) = path_error(&path) {
        return response;
    }
    answer(server.read(&endpoint, &path).await, &path)
}

/// Body of a write: `{"value": "..."}` as text/plain, or `{"hex": "..."}` as opaque.
async fn write(
    State(server): State<Lwm2mServer>,
    Path((endpoint, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    if let Some(target) = path.strip_suffix("/attributes") {
        if let Some(response) = path_error(target) {
            return response;
        }
        let attributes: Vec<(String, String)> = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        const KNOWN: [&str; 7] = ["pmin", "pmax", "gt", "lt", "st", "epmin", "epmax"];
        if let Some((bad, _)) = attributes.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
            return error(
                StatusCode::BAD_REQUEST,
                None,
                format!("unknown attribute {bad:?} (known: {})", KNOWN.join(", ")),
            );
        }
        return answer(server.write_attributes(&endpoint, target, &attributes).await, target);
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, None, "body must be JSON".into());
    };
    if let Some(response) = path_error(&path) {
        return response;
    }
    let (format, payload) = match (&body["value"], &body["hex"]) {
        (Value::String(text), Value::Null) => (0, text.as_bytes().to_vec()),
        (Value::Number(n), Value::Null) => (0, n.to_string().into_bytes()),
        (Value::Bool(b), Value::Null) => (0, if *b { b"1".to_vec() } else { b"0".to_vec() }),
        (Value::Null, Value::String(hex)) => match decode_hex(hex) {
            Some(bytes) => (42, bytes),
            None => return error(StatusCode::BAD_REQUEST, None, "\"hex\" must be an even number of hex digits".into()),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                None,
                "body must be {\"value\": text|number|bool} or {\"hex\": \"…\"}".into(),
            )
        }
    };
    answer(server.write(&endpoint, &path, format, payload).await, &path)
}

/// `POST …/{path}`: Execute; `POST …/{path}/observe`: start an observation.
async fn execute_or_observe(
    State(api): State<Api>,
    Path((endpoint, path)): Path<(String, String)>,
    body: String,
) -> Response {
    if let Some(path) = path.strip_suffix("/observe") {
        if let Some(response) = path_error(path) {
            return response;
        }
        return match api.server.observe(&endpoint, path).await {
            Ok(observation) => {
                let id = observation.id;
                api.observations.lock().unwrap_or_else(|e| e.into_inner()).insert(id, observation.notifications);
                api.paths.lock().unwrap_or_else(|e| e.into_inner()).insert(id, path.to_string());
                let mut body = payload_json(&observation.first, path);
                body["observation"] = json!(id);
                Json(body).into_response()
            }
            Err(err) => answer(Err(err), path),
        };
    }
    if let Some(response) = path_error(&path) {
        return response;
    }
    if !path.trim_matches('/').contains('/') {
        return create(&api.server, &endpoint, &path, &body).await;
    }
    answer(api.server.execute(&endpoint, &path, &body).await, &path)
}

/// `POST /api/clients/{ep}/{object}` with `{"instance": 1, "resources": {"0": "x", "1": 5}}`:
/// Create, sent as TLV (the format every LwM2M device supports). Without `instance` the
/// device chooses one.
async fn create(server: &Lwm2mServer, endpoint: &str, object: &str, body: &str) -> Response {
    let Ok(Value::Object(request)) = serde_json::from_str::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            None,
            "body must be {\"instance\": n, \"resources\": {id: value}}".into(),
        );
    };
    let Ok(object_id) = object.trim_matches('/').parse::<u16>() else {
        return error(StatusCode::BAD_REQUEST, None, format!("{object:?} is not an object id"));
    };
    let instance = match request.get("instance") {
        None => None,
        Some(v) => match v.as_u64().and_then(|i| u16::try_from(i).ok()) {
            Some(i) => Some(i),
            None => return error(StatusCode::BAD_REQUEST, None, "\"instance\" must be 0..65535".into()),
        },
    };
    let Some(Value::Object(resources)) = request.get("resources") else {
        return error(StatusCode::BAD_REQUEST, None, "\"resources\" must be an object of id: value".into());
    };
    let mut entries = Vec::new();
    for (id, value) in resources {
        let Ok(resource) = id.parse::<u16>() else {
            return error(StatusCode::BAD_REQUEST, None, format!("resource id {id:?} is not a number"));
        };
        let value = match value {
            Value::String(s) => content::Value::String(s.clone()),
            Value::Bool(b) => content::Value::Boolean(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => content::Value::Integer(i),
                None => content::Value::Float(n.as_f64().unwrap_or_default()),
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    None,
                    format!("resource {id}: only strings, numbers and booleans"),
                )
            }
        };
        let path = content::Path {
            object: object_id,
            instance: Some(instance.unwrap_or(0)),
            resource: Some(resource),
            resource_instance: None,
        };
        entries.push(content::Entry { path, value });
    }
    let base = content::Path {
        object: object_id,
        instance: if instance.is_some() { None } else { Some(0) },
        resource: None,
        resource_instance: None,
    };
    let payload = match content::encode(content::format::TLV, &base, &entries) {
        Ok(payload) => payload,
        Err(err) => return error(StatusCode::BAD_REQUEST, None, err.to_string()),
    };
    answer(server.create(endpoint, object, content::format::TLV, payload).await, object)
}

/// The notifications received since the last call, oldest first.
async fn notifications(State(api): State<Api>, Path(id): Path<u64>) -> Response {
    let path = api.paths.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned().unwrap_or_default();
    let mut observations = api.observations.lock().unwrap_or_else(|e| e.into_inner());
    let Some(queue) = observations.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, None, format!("no observation {id}"));
    };
    let mut values = Vec::new();
    let mut active = true;
    loop {
        match queue.try_recv() {
            Ok(notification) => values.push(payload_json(&notification, &path)),
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                active = false;
                break;
            }
        }
    }
    if !active {
        observations.remove(&id);
    }
    Json(json!({ "observation": id, "active": active, "notifications": values })).into_response()
}

async fn cancel(State(api): State<Api>, Path(id): Path<u64>) -> Response {
    api.observations.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    if api.server.cancel_observation(id).await {
        Json(json!({ "observation": id, "cancelled": true })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, None, format!("no active observation {id}"))
    }
}

/// A device response as JSON: the raw payload (`value` for text, `hex` otherwise) and, when
/// the format decodes, `values` by path with their types.
fn payload_json(response: &DeviceResponse, path: &str) -> Value {
    let mut body = json!({ "coap_code": coap_code(response.code), "content_format": response.content_format });
    match (response.content_format, std::str::from_utf8(&response.payload)) {
        (Some(42), _) | (_, Err(_)) => body["hex"] = json!(encode_hex(&response.payload)),
        (_, Ok(text)) => body["value"] = json!(text),
    }
    let decoded = content::Path::parse(path).ok().and_then(|base| {
        content::decode(response.content_format.unwrap_or(content::format::TEXT), &base, &response.payload).ok()
    });
    if let (Some(entries), false) = (decoded, response.code.is_error() || response.payload.is_empty()) {
        let values: serde_json::Map<String, Value> =
            entries.iter().map(|e| (e.path.to_string(), typed(&e.value))).collect();
        body["values"] = Value::Object(values);
    }
    body
}

fn typed(value: &content::Value) -> Value {
    match value {
        content::Value::Integer(v) | content::Value::Time(v) => json!(v),
        content::Value::Unsigned(v) => json!(v),
        content::Value::Float(v) => json!(v),
        content::Value::Boolean(v) => json!(v),
        content::Value::String(v) => json!(v),
        content::Value::Opaque(v) => json!(encode_hex(v)),
        content::Value::ObjectLink(o, i) => json!(format!("{o}:{i}")),
    }
}

async fn delete(State(server): State<Lwm2mServer>, Path((endpoint, path)): Path<(String, String)>) -> Response {
    if let Some(response) = path_error(&path) {
        return response;
    }
    answer(server.request(&endpoint, build(RequestType::Delete, &path, None, Vec::new())).await, &path)
}

async fn pool(State(server): State<Lwm2mServer>) -> Response {
    let Some(stats) = server.dtls().stats().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, None, "server shutting down".into());
    };
    let sessions: Vec<Value> = stats
        .pool
        .per_session
        .iter()
        .map(|s| {
            json!({
                "peer": s.peer.to_string(), "identity": s.identity, "role": s.role.name(), "state": s.state.name(),
                "generation": s.generation.0, "age_s": s.age.as_secs_f64(), "idle_s": s.idle.as_secs_f64(),
                "handshakes": s.handshakes, "requests": s.requests, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            })
        })
        .collect();
    Json(json!({
        "sessions": stats.pool.sessions,
        "capacity": stats.pool.capacity,
        "handshakes_total": stats.pool.handshakes_total,
        "requests_total": stats.pool.requests_total,
        "expired_total": stats.pool.expired_total,
        "evicted_total": stats.pool.evicted_total,
        "handshakes_in_progress": stats.handshakes_in_progress,
        "dtls": {
            "datagrams_received": stats.endpoint.datagrams_received,
            "hello_verify_requests_sent": stats.endpoint.hello_verify_requests_sent,
            "handshakes_completed": stats.endpoint.handshakes_completed,
            "handshakes_failed": stats.endpoint.handshakes_failed,
            "handshakes_resumed": stats.endpoint.handshakes_resumed,
            "migrations": stats.endpoint.migrations,
            "sessions_restored": stats.endpoint.sessions_restored,
            "session_store_failures": stats.store_failures,
            "datagrams_dropped": stats.endpoint.dropped_total(),
        },
        "per_session": sessions,
    }))
    .into_response()
}

async fn metrics(State(server): State<Lwm2mServer>) -> Response {
    match server.dtls().stats().await {
        Some(stats) => tether::metrics::render(&stats.pool, Some(&stats.endpoint)).into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, None, "server shutting down".into()),
    }
}

/// Object, object/instance or object/instance/resource: 1 to 3 numeric segments.
fn path_error(path: &str) -> Option<Response> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.is_empty() || segments.len() > 4 || segments.iter().any(|s| s.parse::<u16>().is_err()) {
        return Some(error(
            StatusCode::BAD_REQUEST,
            None,
            format!("{path:?} is not an LwM2M path (object[/instance[/resource]])"),
        ));
    }
    None
}

fn answer(result: Result<DeviceResponse, Lwm2mError>, path: &str) -> Response {
    match result {
        Ok(response) => {
            let code = coap_code(response.code);
            let status = if response.code.is_error() { http_status(response.code) } else { StatusCode::OK };
            let mut body = payload_json(&response, path);
            if response.code.is_error() {
                body["error"] = json!(format!("device answered {code}"));
            }
            (status, Json(body)).into_response()
        }
        Err(Lwm2mError::NotRegistered(endpoint)) => {
            error(StatusCode::NOT_FOUND, None, format!("endpoint {endpoint:?} is not registered"))
        }
        Err(err @ (Lwm2mError::NoAnswer(_) | Lwm2mError::SessionClosed)) => {
            error(StatusCode::GATEWAY_TIMEOUT, None, err.to_string())
        }
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, None, err.to_string()),
    }
}

fn error(status: StatusCode, coap_code: Option<&str>, message: String) -> Response {
    (status, Json(json!({ "error": message, "coap_code": coap_code }))).into_response()
}

fn coap_code(code: ResponseType) -> String {
    MessageClass::Response(code).to_string()
}

fn http_status(code: ResponseType) -> StatusCode {
    match code {
        ResponseType::NotFound => StatusCode::NOT_FOUND,
        ResponseType::BadRequest | ResponseType::BadOption => StatusCode::BAD_REQUEST,
        ResponseType::Unauthorized | ResponseType::Forbidden => StatusCode::FORBIDDEN,
        ResponseType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ResponseType::NotAcceptable | ResponseType::UnsupportedContentFormat => StatusCode::NOT_ACCEPTABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}
