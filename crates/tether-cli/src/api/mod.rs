//! The REST API (Leshan-like) and `/metrics`.

pub mod auth;
pub mod cluster;
mod composite;
mod events;
mod firmware;
pub mod guard;
mod health;
pub mod listener;
mod openapi;
mod options;
mod typed;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRef, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use tether::lwm2m::{build, ClientState, DeviceResponse, Lwm2mError, Lwm2mServer};
use tether_coap::coap_lite::CoapOption;

use options::{within, RequestOptions};
use tether_coap::coap_lite::{MessageClass, RequestType, ResponseType};
use tether_coap::content;
use tether_coap::model::Models;

#[derive(Clone)]
struct Api {
    server: Lwm2mServer,
    /// Object models: typed, named values; writes checked.
    models: Arc<Models>,
    /// Observations started through the API, with their latest notifications.
    feeds: events::Feeds,
    /// What `/api/events` streams.
    live: events::Live,
    access: auth::Access,
    /// The cluster this node is part of, if any.
    cluster: Option<cluster::ClusterApi>,
}

impl FromRef<Api> for auth::Access {
    fn from_ref(api: &Api) -> Self {
        api.access.clone()
    }
}

impl FromRef<Api> for Arc<Models> {
    fn from_ref(api: &Api) -> Self {
        Arc::clone(&api.models)
    }
}

impl FromRef<Api> for Lwm2mServer {
    fn from_ref(api: &Api) -> Self {
        api.server.clone()
    }
}

/// Largest request body, but for firmware packages.
const MAX_BODY: usize = 64 * 1024;

/// Every route: its path, its methods and their handlers, declared together (the OpenAPI
/// description is held to this list by a test).
fn routes() -> Vec<(&'static str, &'static [&'static str], MethodRouter<Api>)> {
    use axum::routing::{delete, post, put};
    vec![
        ("/", &["GET"], get(ui::index)),
        ("/ui/{file}", &["GET"], get(ui::asset)),
        ("/healthz", &["GET"], get(health::healthz)),
        ("/api/login", &["POST"], post(auth::login)),
        ("/api/logout", &["POST"], post(auth::logout)),
        ("/api/whoami", &["GET"], get(auth::whoami)),
        ("/api/openapi.json", &["GET"], get(openapi::document)),
        ("/api/events", &["GET"], get(events::stream)),
        ("/api/objects/{object}", &["GET"], get(object_model)),
        ("/api/clients", &["GET"], get(clients)),
        ("/api/clients/{endpoint}", &["GET"], get(client)),
        ("/api/clients/{endpoint}/sent", &["GET"], get(sent)),
        ("/api/clients/{endpoint}/composite", &["POST", "PUT"], post(composite::read).put(composite::write)),
        ("/api/clients/{endpoint}/composite/observe", &["POST"], post(composite::observe)),
        (
            "/api/clients/{endpoint}/firmware",
            &["GET", "POST"],
            get(firmware::status).post(firmware::push).layer(DefaultBodyLimit::max(firmware::MAX_PACKAGE)),
        ),
        (
            "/api/clients/{endpoint}/{*path}",
            &["GET", "PUT", "POST", "DELETE"],
            get(read).merge(put(write)).merge(post(execute_or_observe)).merge(delete(remove)),
        ),
        ("/api/observations/{id}", &["GET", "DELETE"], get(notifications).delete(cancel)),
        ("/api/pool", &["GET"], get(pool)),
        ("/metrics", &["GET"], get(metrics)),
    ]
}

/// Every (method, path) of the API, as `/api/openapi.json` names them (`{path}` for the
/// wildcard).
#[cfg(test)]
fn route_list() -> Vec<(&'static str, String)> {
    routes()
        .into_iter()
        .flat_map(|(path, methods, _)| methods.iter().map(move |m| (*m, path.replace("{*path}", "{path}"))))
        .collect()
}

/// Who may use the API, from where, and how many event readers it takes.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Tokens, roles and the UI's logins.
    pub access: auth::Access,
    /// The names the server answers to besides IP addresses and localhost.
    pub hosts: guard::Hosts,
    /// `/api/events` readers at once.
    pub event_readers: usize,
    /// The cluster this node is part of, if any.
    pub cluster: Option<cluster::ClusterApi>,
}

/// The API's routes behind `settings`; values are decoded and writes checked with `models`.
pub fn router(server: Lwm2mServer, models: Arc<Models>, settings: ApiSettings) -> Router {
    let live = events::live(&server, settings.event_readers);
    let access = settings.access;
    let api = Api { server, models, feeds: Arc::default(), live, access: access.clone(), cluster: settings.cluster };
    let mut router = Router::new();
    for (path, _, handlers) in routes() {
        router = router.route(path, handlers);
    }
    router
        // Inside the authentication layer: only an authorized request is carried on.
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), cluster::to_holder))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(access, auth::require))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(settings.hosts, guard::check))
        .with_state(api)
}

/// Errors stay JSON: an error answered in plain text by a layer below the handlers (a body
/// over the limit, a malformed path) is rewritten to `{"error": "…", "coap_code": null}`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    error(status, None, message)
}

/// `GET /api/objects/{object}`: what the server knows of an object (its model): name,
/// whether it has several instances, and each resource's ID, name, operations, type, units.
async fn object_model(State(models): State<Arc<Models>>, Path(object): Path<String>) -> Response {
    let Some(model) = object.parse::<u16>().ok().and_then(|id| models.object(id)) else {
        return error(StatusCode::NOT_FOUND, None, format!("no model of object {object:?}"));
    };
    let resources: Vec<Value> = model
        .resources
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.name,
                "operations": r.operations.as_str(),
                "multiple": r.multiple,
                "type": tether_coap::model::type_name(r.kind),
                "units": r.units,
            })
        })
        .collect();
    Json(json!({ "id": model.id, "name": model.name, "multiple": model.multiple, "resources": resources }))
        .into_response()
}

async fn unknown_route(uri: axum::http::Uri) -> Response {
    error(StatusCode::NOT_FOUND, None, format!("no such route: {} (see README.md, \"REST API\")", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, None, format!("{method} is not allowed on {}", uri.path()))
}

#[derive(Serialize)]
struct ClientView {
    endpoint: String,
    /// The DTLS identity it registered with (`psk:<identity>` or `x509:<CN>`).
    identity: String,
    registration_id: String,
    address: String,
    lifetime_s: u64,
    binding: &'static str,
    lwm2m_version: String,
    objects: String,
    expires_in_s: u64,
    /// Seconds since the device last registered or updated.
    updated_s_ago: f64,
    /// Whether its DTLS session is open: false after the session closed (close_notify,
    /// fatal alert, idle expiry) until the device connects again; requests fail at once.
    online: bool,
    /// Seconds since the device was last heard from over its session, if it was.
    last_heard_s_ago: Option<f64>,
}

fn view(client: &ClientState) -> ClientView {
    let r = &client.registration;
    let now = std::time::Instant::now();
    ClientView {
        endpoint: r.endpoint.clone(),
        identity: r.identity.to_string(),
        registration_id: r.id.clone(),
        address: r.peer.to_string(),
        lifetime_s: r.lifetime.as_secs(),
        binding: r.binding.as_str(),
        lwm2m_version: r.version.clone(),
        objects: r.links.as_str().to_string(),
        expires_in_s: r.expires_at().saturating_duration_since(std::time::Instant::now()).as_secs(),
        updated_s_ago: now.saturating_duration_since(r.last_update).as_secs_f64(),
        online: client.online,
        last_heard_s_ago: client.last_heard.map(|at| now.saturating_duration_since(at).as_secs_f64()),
    }
}

async fn clients(State(api): State<Api>, headers: axum::http::HeaderMap) -> Json<Vec<Value>> {
    let node = api.cluster.as_ref().map(cluster::ClusterApi::node);
    let mut all: Vec<Value> = api
        .server
        .clients()
        .await
        .iter()
        .map(|c| {
            let mut item = json!(view(c));
            if let Some(node) = node {
                item["node"] = json!(node);
            }
            item
        })
        .collect();
    // A node asked by another lists its own; asked by anyone else, the whole cluster's.
    if let Some(cluster) = api.cluster.as_ref().filter(|_| !headers.contains_key(cluster::FORWARDED)) {
        all.extend(cluster.others_clients().await);
    }
    let endpoint = |v: &Value| v["endpoint"].as_str().unwrap_or_default().to_string();
    let updated_ago = |v: &Value| v["updated_s_ago"].as_f64().unwrap_or(f64::INFINITY);
    all.sort_by(|a, b| natural_cmp(&endpoint(a), &endpoint(b)).then(updated_ago(a).total_cmp(&updated_ago(b))));
    // Two nodes list one endpoint only for a moment (a device moved, and the node it left
    // has not let go yet): the latest update is the one that counts.
    all.dedup_by(|later, kept| later["endpoint"] == kept["endpoint"]);
    Json(all)
}

async fn client(State(server): State<Lwm2mServer>, Path(endpoint): Path<String>) -> Response {
    match server.clients().await.iter().find(|c| c.registration.endpoint == endpoint) {
        Some(c) => Json(view(c)).into_response(),
        None => not_registered(&endpoint),
    }
}

/// `GET /api/clients/{ep}/sent`: the latest value of each resource the device sent (LwM2M
/// Send), typed and named by the models, with how long ago it arrived.
async fn sent(State(api): State<Api>, Path(endpoint): Path<String>) -> Response {
    let Some(sent) = api.server.sent(&endpoint).await else {
        return not_registered(&endpoint);
    };
    let now = std::time::Instant::now();
    let values: serde_json::Map<String, Value> = sent.iter().map(|v| (v.path.to_string(), typed(&v.value))).collect();
    let resources: Vec<Value> = sent
        .iter()
        .map(|v| {
            let mut item = named(&api.models, &content::Entry { path: v.path, value: v.value.clone() });
            item["received_s_ago"] = json!(now.saturating_duration_since(v.received).as_secs_f64());
            item
        })
        .collect();
    Json(json!({ "endpoint": endpoint, "values": values, "resources": resources })).into_response()
}

fn not_registered(endpoint: &str) -> Response {
    error(StatusCode::NOT_FOUND, None, format!("endpoint {endpoint:?} is not registered"))
}

/// Orders names as people read them: digit runs by value (`fleet-2` before `fleet-10`).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> impl Iterator<Item = (bool, &str)> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digits = first.is_ascii_digit();
            let end = rest.find(|c: char| c.is_ascii_digit() != digits).unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some((digits, chunk))
        })
    }
    let mut left = chunks(a);
    let mut right = chunks(b);
    loop {
        let ordering = match (left.next(), right.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some((true, x)), Some((true, y))) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (Some((_, x)), Some((_, y))) => x.cmp(y),
        };
        if ordering.is_ne() {
            return ordering;
        }
    }
}

/// `GET …/{path}`: Read (`?format=` asks for a content format); `GET …/{path}/discover`:
/// Discover. Both take `?timeout=`.
async fn read(
    State(server): State<Lwm2mServer>,
    State(models): State<Arc<Models>>,
    Path((endpoint, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let options = match RequestOptions::parse_only(query.as_deref()) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    if let Some(target) = path.strip_suffix("/discover") {
        if let Some(response) = path_error(target) {
            return response;
        }
        return answer(within(options.timeout, server.discover(&endpoint, target)).await, target, &models);
    }
    if let Some(response) = path_error(&path) {
        return response;
    }
    if let Some(response) = typed::refuses(&models, &path, typed::Operation::Read) {
        return response;
    }
    let request = match options.format {
        Some(format) => {
            let mut request = build(RequestType::Get, &path, None, Vec::new());
            request.add_option(CoapOption::Accept, tether_coap::packet::encode_uint(u32::from(format)));
            within(options.timeout, server.request(&endpoint, request)).await
        }
        None => within(options.timeout, server.read(&endpoint, &path)).await,
    };
    answer(request, &path, &models)
}

/// `PUT …/{path}`: Write. Body `{"value": …}` (sent as text/plain) or `{"hex": "…"}`
/// (opaque), checked against the object model first. `PUT …/{path}/attributes?pmin=…`:
/// Write-Attributes. Both take `?timeout=`.
async fn write(
    State(server): State<Lwm2mServer>,
    State(models): State<Arc<Models>>,
    Path((endpoint, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    let options = match RequestOptions::parse(query.as_deref()) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    if let Some(target) = path.strip_suffix("/attributes") {
        if let Some(response) = path_error(target) {
            return response;
        }
        const KNOWN: [&str; 7] = ["pmin", "pmax", "gt", "lt", "st", "epmin", "epmax"];
        if let Some((bad, _)) = options.rest.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
            return bad_request(format!("unknown attribute {bad:?} (known: {})", KNOWN.join(", "))).into_response();
        }
        let request = server.write_attributes(&endpoint, target, &options.rest);
        return answer(within(options.timeout, request).await, target, &models);
    }
    if let Err(err) = options.no_others() {
        return err.into_response();
    }
    if let Some(response) = path_error(&path) {
        return response;
    }
    let (format, payload) = match typed::write_payload(&models, &path, &body) {
        Ok(payload) => payload,
        Err(err) => return err.into_response(),
    };
    answer(within(options.timeout, server.write(&endpoint, &path, format, payload)).await, &path, &models)
}

/// `POST …/{path}`: Execute; `POST …/{path}/observe`: start an observation.
async fn execute_or_observe(
    State(api): State<Api>,
    Path((endpoint, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    let options = match RequestOptions::parse_only(query.as_deref()) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    if let Some(path) = path.strip_suffix("/observe") {
        if let Some(response) = path_error(path).or_else(|| typed::refuses(&api.models, path, typed::Operation::Read)) {
            return response;
        }
        return match within(options.timeout, api.server.observe(&endpoint, path)).await {
            Ok(observation) => {
                let id = observation.id;
                events::follow(&api, id, &endpoint, path, observation.notifications, payload_json);
                let mut body = payload_json(&observation.first, path, &api.models);
                body["observation"] = json!(id);
                Json(body).into_response()
            }
            Err(err) => err.into_response(),
        };
    }
    if let Some(response) = path_error(&path) {
        return response;
    }
    if !path.trim_matches('/').contains('/') {
        return create(&api, &endpoint, &path, &body, options.timeout).await;
    }
    if let Some(response) = typed::refuses(&api.models, &path, typed::Operation::Execute) {
        return response;
    }
    answer(within(options.timeout, api.server.execute(&endpoint, &path, &body)).await, &path, &api.models)
}

/// `POST /api/clients/{ep}/{object}` with `{"instance": 1, "resources": {"0": "x", "1": 5}}`:
/// Create, sent as TLV (the format every LwM2M device supports). Without `instance` the
/// device chooses one.
async fn create(api: &Api, endpoint: &str, object: &str, body: &str, timeout: Duration) -> Response {
    let (server, models) = (&api.server, &api.models);
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
    answer(within(timeout, server.create(endpoint, object, content::format::TLV, payload)).await, object, models)
}

/// The notifications received since the last call, oldest first.
async fn notifications(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let id = match observation_id(&id) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let Some((values, active)) = events::drain(&api.feeds, id) else {
        return error(StatusCode::NOT_FOUND, None, format!("no observation {id}"));
    };
    Json(json!({ "observation": id, "active": active, "notifications": values })).into_response()
}

async fn cancel(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let id = match observation_id(&id) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    api.feeds.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    if api.server.cancel_observation(id).await {
        Json(json!({ "observation": id, "cancelled": true })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, None, format!("no active observation {id}"))
    }
}

/// A device response as JSON: the raw payload (`value` for text, `hex` otherwise) and, when
/// the format decodes, `values` by path, typed by the object models, and `resources`: each
/// value with its resource's name, type and units where a model names it.
fn payload_json(response: &DeviceResponse, path: &str, models: &Models) -> Value {
    let mut body = json!({ "coap_code": coap_code(response.code), "content_format": response.content_format });
    match (response.content_format, std::str::from_utf8(&response.payload)) {
        (Some(42), _) | (_, Err(_)) => body["hex"] = json!(encode_hex(&response.payload)),
        (_, Ok(text)) => body["value"] = json!(text),
    }
    let format = response.content_format.unwrap_or(content::format::TEXT);
    let types = |object, resource| models.resource_type(object, resource);
    let decoded = content::Path::parse(path)
        .ok()
        .and_then(|base| content::decode_with(format, &base, &response.payload, &types).ok());
    if let (Some(mut entries), false) = (decoded, response.code.is_error() || response.payload.is_empty()) {
        // In numeric order (/3/0/2 before /3/0/10); the JSON object keeps it.
        entries.sort_by_key(|e| e.path);
        let values: serde_json::Map<String, Value> =
            entries.iter().map(|e| (e.path.to_string(), typed(&e.value))).collect();
        body["values"] = Value::Object(values);
        body["resources"] = entries.iter().map(|e| named(models, e)).collect();
        if let Some(object) = content::Path::parse(path).ok().and_then(|p| models.object(p.object)) {
            body["object"] = json!(object.name);
        }
    }
    body
}

/// One value with what its model says of it.
fn named(models: &Models, entry: &content::Entry) -> Value {
    let mut item = json!({ "path": entry.path.to_string(), "value": typed(&entry.value) });
    if let Some(resource) = entry.path.resource.and_then(|r| models.resource(entry.path.object, r)) {
        item["name"] = json!(resource.name);
        item["type"] = json!(tether_coap::model::type_name(resource.kind));
        if !resource.units.is_empty() {
            item["units"] = json!(resource.units);
        }
    }
    item
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

fn observation_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| bad_request(format!("{text:?} is not an observation id (a number)")))
}

async fn remove(
    State(server): State<Lwm2mServer>,
    State(models): State<Arc<Models>>,
    Path((endpoint, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let options = match RequestOptions::parse_only(query.as_deref()) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    if let Some(response) = path_error(&path) {
        return response;
    }
    let request = build(RequestType::Delete, &path, None, Vec::new());
    answer(within(options.timeout, server.request(&endpoint, request)).await, &path, &models)
}

async fn pool(State(api): State<Api>) -> Response {
    let server = &api.server;
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
    let mut pool = json!({
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
            "sessions_evicted": stats.endpoint.sessions_evicted,
            "foreign_records": stats.endpoint.foreign_records,
            "stalled_handshakes_closed": stats.endpoint.stalled_handshakes_closed,
            "session_store_failures": stats.store_failures,
            "datagrams_dropped": stats.endpoint.dropped_total(),
            "dropped_by_reason": tether_proto::dtls::DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), json!(stats.endpoint.dropped(*r))))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "per_session": sessions,
    });
    if let Some(cluster) = &api.cluster {
        pool["cluster"] = cluster.summary();
    }
    Json(pool).into_response()
}

async fn metrics(State(server): State<Lwm2mServer>) -> Response {
    match server.dtls().stats().await {
        Some(stats) => tether::metrics::render(&stats.pool, Some(&stats.endpoint)).into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, None, "server shutting down".into()),
    }
}

/// An LwM2M path: object, object/instance, object/instance/resource or
/// object/instance/resource/resource-instance, each an ID below 65535 (which is reserved).
fn path_error(path: &str) -> Option<Response> {
    path_problem(path).map(|err| err.into_response())
}

/// [`path_error`] as an [`ApiError`].
fn path_problem(path: &str) -> Option<ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let ids_valid = segments.iter().all(|s| s.parse::<u16>().is_ok_and(|id| id < u16::MAX));
    if segments.is_empty() || segments.len() > 4 || !ids_valid {
        return Some(bad_request(format!(
            "{path:?} is not an LwM2M path: object[/instance[/resource[/resource-instance]]], IDs 0–65534"
        )));
    }
    None
}

/// A device's answer as the API's JSON: 200 with the payload, or the device's error code
/// as an HTTP status with `coap_code`.
fn answer(result: Result<DeviceResponse, ApiError>, path: &str, models: &Models) -> Response {
    match result {
        Ok(response) => {
            let code = coap_code(response.code);
            let status = if response.code.is_error() { http_status(response.code) } else { StatusCode::OK };
            let mut body = payload_json(&response, path, models);
            if response.code.is_error() {
                body["error"] = json!(format!("device answered {code}"));
            }
            (status, Json(body)).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// A request that got no answer from the device.
fn failure(err: Lwm2mError) -> ApiError {
    let status = match &err {
        Lwm2mError::NotRegistered(_) => StatusCode::NOT_FOUND,
        Lwm2mError::SessionClosed | Lwm2mError::NoAnswer(_) => StatusCode::GATEWAY_TIMEOUT,
        Lwm2mError::QueueFull(_) => StatusCode::SERVICE_UNAVAILABLE,
        Lwm2mError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match err {
        Lwm2mError::SessionClosed => {
            "the device is offline: its DTLS session is closed (it is reachable again once it reconnects)".into()
        }
        err => err.to_string(),
    };
    ApiError { status, message }
}

/// An error of the API, answered as `{"error": "…", "coap_code": null}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, None, self.message)
    }
}

/// Every error of the API has this shape: `{"error": "…", "coap_code": "4.04" | null}`.
fn error(status: StatusCode, coap_code: Option<&str>, message: String) -> Response {
    (status, Json(json!({ "error": message, "coap_code": coap_code }))).into_response()
}

fn bad_request(message: String) -> ApiError {
    ApiError { status: StatusCode::BAD_REQUEST, message }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn response(format: u16, payload: Vec<u8>) -> DeviceResponse {
        DeviceResponse { code: ResponseType::Content, content_format: Some(format), payload }
    }

    #[test]
    fn values_of_modelled_objects_come_typed_and_named() {
        use content::{Entry, Path as LwPath, Value as V};
        let models = Models::built_in();
        let at = |p: &str| LwPath::parse(p).unwrap();
        // Temperature (3303) in TLV: typed by the model (TLV alone does not say Float).
        let entries = [
            Entry { path: at("/3303/0/5700"), value: V::Float(21.5) },
            Entry { path: at("/3303/0/5701"), value: V::String("Cel".into()) },
        ];
        let tlv = content::encode(content::format::TLV, &at("/3303/0"), &entries).unwrap();
        let body = payload_json(&response(content::format::TLV, tlv), "/3303/0", &models);
        assert_eq!(body["object"], "Temperature");
        assert_eq!(body["values"]["/3303/0/5700"], 21.5);
        assert_eq!(body["resources"][0]["name"], "Sensor Value");
        assert_eq!(body["resources"][0]["type"], "Float");
        assert_eq!(body["resources"][0]["units"], "Cel");
        // Firmware Update (5) in SenML JSON.
        let entries = [
            Entry { path: at("/5/0/3"), value: V::Integer(1) },
            Entry { path: at("/5/0/1"), value: V::String("coap://fw/1".into()) },
        ];
        let senml = content::encode(content::format::SENML_JSON, &at("/5/0"), &entries).unwrap();
        let body = payload_json(&response(content::format::SENML_JSON, senml), "/5/0", &models);
        let names: Vec<&str> =
            body["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Package URI", "State"], "named, in numeric order: {body}");
        assert_eq!(body["values"]["/5/0/3"], 1);
        // An object without a model still reads, as raw values.
        let tlv = content::encode(
            content::format::TLV,
            &at("/40000/0"),
            &[Entry { path: at("/40000/0/1"), value: V::Integer(7) }],
        )
        .unwrap();
        let body = payload_json(&response(content::format::TLV, tlv), "/40000/0", &models);
        assert_eq!(body["values"]["/40000/0/1"], "07", "opaque bytes without a model: {body}");
        assert!(body["resources"][0].get("name").is_none());
    }

    #[test]
    fn names_sort_as_people_read_them() {
        let mut names = vec!["fleet-10", "fleet-2", "fleet-1", "urn:dev:02", "fleet", "urn:dev:1", "a10b2", "a10b10"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["a10b2", "a10b10", "fleet", "fleet-1", "fleet-2", "fleet-10", "urn:dev:1", "urn:dev:02"]);
    }

    #[test]
    fn paths_deeper_than_a_resource_instance_are_refused() {
        assert!(path_error("3/0/11/0").is_none());
        for bad in ["3/0/11/0/1", "", "3/x", "3/65535", "70000"] {
            assert_eq!(path_error(bad).map(|r| r.status().as_u16()), Some(400), "{bad:?}");
        }
    }
}
