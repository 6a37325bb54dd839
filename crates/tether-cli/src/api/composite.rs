//! LwM2M 1.1 composite operations through REST: Read-Composite (`FETCH`), Observe-Composite
//! (`FETCH` with Observe) and Write-Composite (`iPATCH`), several resources of several objects
//! in one request, in SenML.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tether::lwm2m::DeviceResponse;
use tether_coap::content;
use tether_coap::model::Models;

use super::options::{within, RequestOptions};
use super::{bad_request, coap_code, error, http_status, named, path_error, path_problem, typed, Api, ApiError};

/// `POST /api/clients/{ep}/composite` with `{"paths": ["/3/0/0", "/3303/0/5700"]}`:
/// Read-Composite (one `FETCH`), answered typed and named like a read. `?format=senml-json`
/// or `senml-cbor` (default) for the device's answer, `?timeout=`.
pub async fn read(
    State(api): State<Api>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    let (options, accept, paths) = match options_and_paths(query.as_deref(), &body) {
        Ok(parsed) => parsed,
        Err(err) => return err.into_response(),
    };
    match within(options.timeout, api.server.read_composite(&endpoint, &paths, accept)).await {
        Ok(answer) => composite_answer(&answer, &api.models),
        Err(err) => err.into_response(),
    }
}

/// `POST /api/clients/{ep}/composite/observe` with `{"paths": […]}`: Observe-Composite. The
/// answer is the first values and an `observation` id, whose notifications (every path's
/// values in each) are read like any observation's.
pub async fn observe(
    State(api): State<Api>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    let (options, accept, paths) = match options_and_paths(query.as_deref(), &body) {
        Ok(parsed) => parsed,
        Err(err) => return err.into_response(),
    };
    match within(options.timeout, api.server.observe_composite(&endpoint, &paths, accept)).await {
        Ok(observation) => {
            let id = observation.id;
            let mut body = values_json(&observation.first, &api.models);
            if observation.first.code.is_error() {
                return composite_answer(&observation.first, &api.models);
            }
            let decode = |answer: &DeviceResponse, _: &str, models: &Models| values_json(answer, models);
            super::events::follow(&api, id, &endpoint, COMPOSITE, observation.notifications, decode);
            body["observation"] = json!(id);
            Json(body).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// `PUT /api/clients/{ep}/composite` with `{"values": {"/3/0/14": "+02:00", "/1/0/1": 300}}`:
/// Write-Composite (one `iPATCH`, SenML CBOR unless `?format=senml-json`), each value
/// checked against its resource's model first. The device applies all or none.
pub async fn write(
    State(api): State<Api>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    body: String,
) -> Response {
    let (options, format) = match composite_options(query.as_deref()) {
        Ok(parsed) => parsed,
        Err(err) => return err.into_response(),
    };
    let entries = match typed::composite_entries(&api.models, &body) {
        Ok(entries) => entries,
        Err(err) => return err.into_response(),
    };
    for entry in &entries {
        if let Some(response) = path_error(&entry.path.to_string()) {
            return response;
        }
    }
    let answer = within(options.timeout, api.server.write_composite(&endpoint, &entries, format)).await;
    match answer {
        Ok(answer) => composite_answer(&answer, &api.models),
        Err(err) => err.into_response(),
    }
}

/// The path recorded for a composite observation: its notifications name their paths.
pub const COMPOSITE: &str = "composite";

/// `?timeout=` and `?format=` (SenML JSON or CBOR, default CBOR) of a composite operation.
fn composite_options(query: Option<&str>) -> Result<(RequestOptions, u16), ApiError> {
    let options = RequestOptions::parse_only(query)?;
    let format = options.format.unwrap_or(content::format::SENML_CBOR);
    if !matches!(format, content::format::SENML_JSON | content::format::SENML_CBOR) {
        return Err(bad_request("composite operations use senml-json or senml-cbor".into()));
    }
    Ok((options, format))
}

/// `?timeout=`, `?format=` and the paths of a composite read or observation.
fn options_and_paths(query: Option<&str>, body: &str) -> Result<(RequestOptions, u16, Vec<content::Path>), ApiError> {
    let (options, format) = composite_options(query)?;
    Ok((options, format, composite_paths(body)?))
}

/// The paths of `{"paths": ["/3/0/0", …]}`, each a valid LwM2M path.
fn composite_paths(body: &str) -> Result<Vec<content::Path>, ApiError> {
    let paths = match serde_json::from_str::<Value>(body).ok().and_then(|b| b.get("paths").cloned()) {
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= content::MAX_COMPOSITE_PATHS => items,
        _ => {
            let max = content::MAX_COMPOSITE_PATHS;
            return Err(bad_request(format!("body must be {{\"paths\": [\"/3/0/0\", …]}} with 1 to {max} paths")));
        }
    };
    let mut parsed = Vec::new();
    for item in &paths {
        let text = item.as_str().unwrap_or_default();
        if let Some(err) = path_problem(text) {
            return Err(err);
        }
        parsed.push(content::Path::parse(text).map_err(|err| bad_request(err.to_string()))?);
    }
    Ok(parsed)
}

/// A device's answer to a composite operation: its error as a status, or its values.
fn composite_answer(answer: &DeviceResponse, models: &Models) -> Response {
    let code = coap_code(answer.code);
    if answer.code.is_error() {
        let status = http_status(answer.code);
        return (status, Json(json!({ "error": format!("device answered {code}"), "coap_code": code })))
            .into_response();
    }
    if !answer.payload.is_empty() && composite_values(answer, models).is_none() {
        return error(StatusCode::BAD_GATEWAY, Some(&code), "the device's answer does not decode".into());
    }
    Json(values_json(answer, models)).into_response()
}

/// `coap_code`, `content_format` and, when there are values, `values` by path and
/// `resources` named by the models.
pub fn values_json(answer: &DeviceResponse, models: &Models) -> Value {
    let mut body = json!({ "coap_code": coap_code(answer.code), "content_format": answer.content_format });
    if let Some(entries) = composite_values(answer, models) {
        let values: serde_json::Map<String, Value> =
            entries.iter().map(|e| (e.path.to_string(), typed(&e.value))).collect();
        body["values"] = Value::Object(values);
        body["resources"] = entries.iter().map(|e| named(models, e)).collect();
    }
    body
}

/// The SenML values of a composite answer, in numeric path order.
fn composite_values(answer: &DeviceResponse, models: &Models) -> Option<Vec<content::Entry>> {
    if answer.payload.is_empty() {
        return None;
    }
    let root = content::Path { object: 0, instance: None, resource: None, resource_instance: None };
    let types = |object, resource| models.resource_type(object, resource);
    let format = answer.content_format.unwrap_or(content::format::SENML_CBOR);
    let mut entries = content::decode_with(format, &root, &answer.payload, &types).ok()?;
    entries.sort_by_key(|e| e.path);
    Some(entries)
}
