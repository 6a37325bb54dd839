//! Firmware Update (object 5) through REST: push a package to a device (written to /5/0/0
//! block-wise), optionally execute Update, and follow State and Update Result.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tether_coap::coap_lite::ResponseType;
use tether_coap::content;

use super::options::{within, RequestOptions};
use super::{bad_request, coap_code, error, http_status, Api};

/// The largest package accepted through the API.
pub const MAX_PACKAGE: usize = 16 * 1024 * 1024;
/// `?timeout=` of a push when none is given: a package of a few hundred blocks takes a while
/// over a lossy link.
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// `GET /api/clients/{ep}/firmware`: the Firmware Update object's state and the firmware
/// version the device runs (/3/0/3).
pub async fn status(State(api): State<Api>, Path(endpoint): Path<String>, RawQuery(query): RawQuery) -> Response {
    let options = match RequestOptions::parse_only(query.as_deref()) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    match read_status(&api, &endpoint, options.timeout).await {
        Ok(body) => Json(body).into_response(),
        Err(response) => response,
    }
}

/// `POST /api/clients/{ep}/firmware` with the package as the body: writes it to /5/0/0
/// (opaque, in 1 KiB Block1 blocks) and answers with the state that follows. With
/// `?update=true`, executes Update (/5/0/2) once the device has the package (State 2); the
/// device then installs it and reboots, and the state afterwards is read with `GET`.
pub async fn push(
    State(api): State<Api>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    package: Bytes,
) -> Response {
    let options = match RequestOptions::parse_with(query.as_deref(), PUSH_TIMEOUT) {
        Ok(options) => options,
        Err(err) => return err.into_response(),
    };
    let mut update = false;
    for (key, value) in &options.rest {
        match (key.as_str(), value.as_str()) {
            ("update", "true" | "1" | "") => update = true,
            ("update", "false" | "0") => update = false,
            _ => {
                return bad_request(format!(
                    "unknown query parameter {key}={value:?} (known: timeout, update=true|false)"
                ))
                .into_response()
            }
        }
    }
    if package.is_empty() {
        return bad_request(
            "the body is the firmware package; it is empty (to reset the object, write /5/0/0 with {\"hex\": \"\"})"
                .into(),
        )
        .into_response();
    }
    let write = api.server.write(&endpoint, "/5/0/0", content::format::OPAQUE, package.to_vec());
    let written = match within(options.timeout, write).await {
        Ok(answer) => answer,
        Err(err) => return err.into_response(),
    };
    if written.code.is_error() {
        return device_error(written.code, "writing the package (/5/0/0)");
    }
    let mut body = match read_status(&api, &endpoint, options.timeout).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    body["bytes"] = json!(package.len());
    if !update {
        return Json(body).into_response();
    }
    if body["state"] != json!(2) {
        let why = format!(
            "the device did not take the package: state {} ({}), result {} ({})",
            body["state"],
            body["state_name"].as_str().unwrap_or("?"),
            body["result"],
            body["result_name"].as_str().unwrap_or("?")
        );
        return (StatusCode::CONFLICT, Json(json!({ "error": why, "coap_code": null, "firmware": body })))
            .into_response();
    }
    match within(options.timeout, api.server.execute(&endpoint, "/5/0/2", "")).await {
        Ok(answer) if answer.code.is_error() => device_error(answer.code, "executing Update (/5/0/2)"),
        Ok(_) => {
            body["update"] = json!("started: the device installs the package and reboots");
            Json(body).into_response()
        }
        Err(err) => err.into_response(),
    }
}

/// Reads /5/0 and /3/0/3 into the API's firmware status.
async fn read_status(api: &Api, endpoint: &str, timeout: Duration) -> Result<Value, Response> {
    let object = within(timeout, api.server.read(endpoint, "/5/0")).await.map_err(IntoResponse::into_response)?;
    if object.code.is_error() {
        return Err(device_error(object.code, "reading the Firmware Update object (/5/0)"));
    }
    let base = content::Path { object: 5, instance: Some(0), resource: None, resource_instance: None };
    let types = |object, resource| api.models.resource_type(object, resource);
    let format = object.content_format.unwrap_or(content::format::TLV);
    let entries = content::decode_with(format, &base, &object.payload, &types)
        .map_err(|_| error(StatusCode::BAD_GATEWAY, None, "the device's /5/0 does not decode".into()))?;
    let value = |resource: u16| {
        entries
            .iter()
            .find(|e| e.path.resource == Some(resource) && e.path.resource_instance.is_none())
            .map(|e| &e.value)
    };
    let integer = |resource| match value(resource) {
        Some(content::Value::Integer(v)) => Some(*v),
        _ => None,
    };
    let text = |resource| match value(resource) {
        Some(content::Value::String(v)) => Some(v.clone()),
        _ => None,
    };
    let mut body = Map::new();
    let state = integer(3);
    let result = integer(5);
    body.insert("state".into(), json!(state));
    body.insert("state_name".into(), json!(state.map(state_name)));
    body.insert("result".into(), json!(result));
    body.insert("result_name".into(), json!(result.map(result_name)));
    body.insert("package_name".into(), json!(text(6)));
    body.insert("package_version".into(), json!(text(7)));
    body.insert("package_uri".into(), json!(text(1)));
    body.insert("delivery_method".into(), json!(integer(9).map(delivery_name)));
    let version = within(timeout, api.server.read(endpoint, "/3/0/3")).await.ok().filter(|r| !r.code.is_error());
    let version = version.and_then(|answer| {
        let path = content::Path { object: 3, instance: Some(0), resource: Some(3), resource_instance: None };
        let format = answer.content_format.unwrap_or(content::format::TEXT);
        match content::decode_with(format, &path, &answer.payload, &types).ok()?.first()?.value.clone() {
            content::Value::String(version) => Some(version),
            _ => None,
        }
    });
    body.insert("firmware_version".into(), json!(version));
    Ok(Value::Object(body))
}

fn device_error(code: ResponseType, what: &str) -> Response {
    let coap = coap_code(code);
    error(http_status(code), Some(&coap), format!("device answered {coap} {what}"))
}

/// /5/0/3 State names (LwM2M 1.1 §E.6).
fn state_name(state: i64) -> &'static str {
    match state {
        0 => "Idle",
        1 => "Downloading",
        2 => "Downloaded",
        3 => "Updating",
        _ => "unknown",
    }
}

/// /5/0/5 Update Result names (LwM2M 1.1 §E.6).
fn result_name(result: i64) -> &'static str {
    match result {
        0 => "Initial value",
        1 => "Firmware updated successfully",
        2 => "Not enough flash memory for the new firmware package",
        3 => "Out of RAM during downloading process",
        4 => "Connection lost during downloading process",
        5 => "Integrity check failure for new downloaded package",
        6 => "Unsupported package type",
        7 => "Invalid URI",
        8 => "Firmware update failed",
        9 => "Unsupported protocol",
        10 => "Firmware update cancelled",
        11 => "Deferred",
        _ => "unknown",
    }
}

/// /5/0/9 Firmware Update Delivery Method names.
fn delivery_name(method: i64) -> &'static str {
    match method {
        0 => "pull",
        1 => "push",
        2 => "push and pull",
        _ => "unknown",
    }
}
