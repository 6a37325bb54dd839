//! Requests checked against the object model before they go to a device: a Write must
//! carry a value of the resource's type to a writable resource, an Execute must name an
//! executable one, a Read a readable one. Objects tether has no model of go through as
//! they are.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;
use tether_coap::content::{self, ResourceType};
use tether_coap::model::{self, Models, ResourceModel};

use super::{bad_request, decode_hex, error, ApiError};

/// An operation on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read or Observe.
    Read,
    /// Execute.
    Execute,
}

/// A number written to a numeric resource, to check against its range.
fn numeric(kind: ResourceType, value: &Value) -> Option<f64> {
    match kind {
        ResourceType::Integer | ResourceType::Unsigned | ResourceType::Time => integer(value).map(|i| i as f64),
        ResourceType::Float => match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// The model of the resource `path` names, if it names one tether knows.
fn modelled<'m>(models: &'m Models, path: &str) -> Option<(content::Path, &'m ResourceModel)> {
    let path = content::Path::parse(path).ok()?;
    Some((path, models.resource(path.object, path.resource?)?))
}

fn describe(path: &content::Path, resource: &ResourceModel) -> String {
    let path = content::Path { resource_instance: None, ..*path };
    format!("{path} ({})", resource.name)
}

/// 405 when the model says the operation is not allowed on the resource at `path`.
pub fn refuses(models: &Models, path: &str, operation: Operation) -> Option<Response> {
    let (path, resource) = modelled(models, path)?;
    let (allowed, verb) = match operation {
        Operation::Read => (resource.operations.readable(), "readable"),
        Operation::Execute => (resource.operations.executable(), "executable"),
    };
    (!allowed).then(|| not_allowed(&path, resource, verb))
}

fn not_allowed(path: &content::Path, resource: &ResourceModel, verb: &str) -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, None, not_allowed_message(path, resource, verb))
}

fn not_allowed_message(path: &content::Path, resource: &ResourceModel, verb: &str) -> String {
    let operations = match resource.operations.as_str() {
        "" => "none: only a bootstrap server may touch it".to_string(),
        ops => ops.to_string(),
    };
    format!("{} is not {verb} (operations: {operations})", describe(path, resource))
}

/// The content format and payload of a Write of `body` (`{"value": …}` or `{"hex": "…"}`)
/// to `path`, or the 4xx that says what is wrong with it.
pub fn write_payload(models: &Models, path: &str, body: &str) -> Result<(u16, Vec<u8>), ApiError> {
    const SHAPE: &str = "body must be {\"value\": text|number|bool} or {\"hex\": \"…\"}";
    let Ok(body) = serde_json::from_str::<Value>(body) else {
        return Err(bad_request(format!("{SHAPE}: it is not JSON")));
    };
    let hex = match &body["hex"] {
        Value::Null => None,
        Value::String(hex) => match decode_hex(hex) {
            Some(bytes) => Some(bytes),
            None => return Err(bad_request("\"hex\" must be an even number of hex digits".into())),
        },
        _ => return Err(bad_request(SHAPE.into())),
    };
    let value = &body["value"];
    let one_scalar = match (value, &hex) {
        (Value::Null, hex) => hex.is_some(),
        (Value::Array(_) | Value::Object(_), _) | (_, Some(_)) => false,
        _ => true,
    };
    if !one_scalar {
        return Err(bad_request(SHAPE.into()));
    }
    let Some((path, resource)) = modelled(models, path) else {
        // No model: text as given, or opaque.
        return Ok(match hex {
            Some(bytes) => (content::format::OPAQUE, bytes),
            None => (content::format::TEXT, untyped_text(value).into_bytes()),
        });
    };
    if !resource.operations.writable() {
        return Err(ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: not_allowed_message(&path, resource, "writable"),
        });
    }
    let expected = model::type_name(resource.kind);
    let wrong = |given: String| {
        bad_request(format!("{} expects {} {expected}, got {given}", describe(&path, resource), article(expected)))
    };
    if resource.kind == ResourceType::Opaque {
        return match hex {
            Some(bytes) => Ok((content::format::OPAQUE, bytes)),
            None => Err(wrong(format!("{value} (send {{\"hex\": \"…\"}})"))),
        };
    }
    if hex.is_some() {
        return Err(wrong("hex bytes".into()));
    }
    let text = match (resource.kind, value) {
        (ResourceType::String, Value::String(s)) => Some(s.clone()),
        (ResourceType::Integer | ResourceType::Time, v) => integer(v).map(|i| i.to_string()),
        (ResourceType::Unsigned, v) => integer(v).filter(|i| *i >= 0).map(|i| i.to_string()),
        (ResourceType::Float, Value::Number(n)) => n.as_f64().map(|f| f.to_string()),
        (ResourceType::Float, Value::String(s)) => s.trim().parse::<f64>().ok().map(|f| f.to_string()),
        (ResourceType::Boolean, v) => boolean(v).map(|b| if b { "1" } else { "0" }.to_string()),
        (ResourceType::ObjectLink, Value::String(s)) => object_link(s),
        _ => None,
    };
    let Some(text) = text else { return Err(wrong(value.to_string())) };
    if let (Some(range), Some(number)) = (&resource.range, numeric(resource.kind, value)) {
        if !range.contains(number) {
            let units = if resource.units.is_empty() { String::new() } else { format!(" {}", resource.units) };
            return Err(bad_request(format!(
                "{} must be {}{units}, got {value}",
                describe(&path, resource),
                range.describe()
            )));
        }
    }
    Ok((content::format::TEXT, text.into_bytes()))
}

/// The values of a Write-Composite body, `{"values": {"/3/0/14": "+02:00", "/1/0/1": 300}}`
/// (a value may be `{"hex": "…"}` for opaque resources), each checked against its model as
/// a single write is and typed by it.
pub fn composite_entries(models: &Models, body: &str) -> Result<Vec<content::Entry>, ApiError> {
    const SHAPE: &str = "body must be {\"values\": {\"/3/0/14\": \"+02:00\", …}}";
    let values = match serde_json::from_str::<Value>(body).ok().and_then(|b| b.get("values").cloned()) {
        Some(Value::Object(values)) if !values.is_empty() => values,
        _ => return Err(bad_request(format!("{SHAPE} with 1 to {} values", content::MAX_COMPOSITE_PATHS))),
    };
    if values.len() > content::MAX_COMPOSITE_PATHS {
        return Err(bad_request(format!("at most {} values in one composite write", content::MAX_COMPOSITE_PATHS)));
    }
    let types = |object, resource| models.resource_type(object, resource);
    let mut entries = Vec::new();
    for (path_text, value) in &values {
        let path = content::Path::parse(path_text)
            .ok()
            .filter(|p| p.resource.is_some())
            .ok_or_else(|| bad_request(format!("{path_text:?} is not a resource path (/object/instance/resource)")))?;
        let single = match value {
            Value::Object(object) if object.contains_key("hex") => value.clone(),
            value => serde_json::json!({ "value": value }),
        };
        let (format, payload) = write_payload(models, path_text, &single.to_string())?;
        let decoded = content::decode_with(format, &path, &payload, &types)
            .map_err(|e| bad_request(format!("{path_text}: {e}")))?;
        entries.extend(decoded);
    }
    Ok(entries)
}

fn untyped_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
        other => other.to_string(),
    }
}

/// A JSON integer, or a string holding one.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// `"3:0"` (object ID:instance ID).
fn object_link(text: &str) -> Option<String> {
    let (object, instance) = text.split_once(':')?;
    let (object, instance) = (object.parse::<u16>().ok()?, instance.parse::<u16>().ok()?);
    Some(format!("{object}:{instance}"))
}

fn article(type_name: &str) -> &'static str {
    if type_name.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    fn refused(path: &str, body: &str) -> (u16, String) {
        let response = write_payload(&Models::built_in(), path, body).expect_err("refused").into_response();
        let status = response.status().as_u16();
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 10_000)).unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn writes_are_checked_against_the_model() {
        assert_eq!(write_payload(&Models::built_in(), "1/0/1", r#"{"value": 600}"#).unwrap(), (0, b"600".to_vec()));
        assert_eq!(write_payload(&Models::built_in(), "1/0/1", r#"{"value": "600"}"#).unwrap(), (0, b"600".to_vec()));
        assert_eq!(write_payload(&Models::built_in(), "1/0/6", r#"{"value": true}"#).unwrap(), (0, b"1".to_vec()));
        assert_eq!(
            write_payload(&Models::built_in(), "3/0/14", r#"{"value": "+02:00"}"#).unwrap(),
            (0, b"+02:00".to_vec())
        );
        assert_eq!(
            write_payload(&Models::built_in(), "1/0/10", r#"{"value": "11:0"}"#).unwrap(),
            (0, b"11:0".to_vec())
        );
        // Objects without a model go through as given.
        assert_eq!(
            write_payload(&Models::built_in(), "40000/0/1", r#"{"value": "abc"}"#).unwrap(),
            (0, b"abc".to_vec())
        );
        assert_eq!(write_payload(&Models::built_in(), "40000/0/1", r#"{"hex": "00ff"}"#).unwrap(), (42, vec![0, 255]));
        // IPSO objects are modelled too.
        assert_eq!(write_payload(&Models::built_in(), "3311/0/5851", r#"{"value": 40}"#).unwrap(), (0, b"40".to_vec()));
        let (status, body) = refused("3303/0/5700", r#"{"value": 1}"#);
        assert!(status == 405 && body.contains("(Sensor Value) is not writable"), "{body}");

        let (status, body) = refused("1/0/1", r#"{"value": "abc"}"#);
        assert_eq!(status, 400);
        assert!(body.contains("/1/0/1 (Lifetime) expects an Integer, got \\\"abc\\\""), "{body}");
        let (status, body) = refused("1/0/17", r#"{"value": -1}"#);
        assert!(status == 400 && body.contains("Unsigned Integer"), "{body}");
        // Within the range the specification gives: a lifetime is positive.
        for lifetime in ["0", "-5", "9223372036854775807", "4294967296"] {
            let (status, body) = refused("1/0/1", &format!(r#"{{"value": {lifetime}}}"#));
            assert_eq!(status, 400, "{lifetime}");
            assert!(body.contains("/1/0/1 (Lifetime) must be 1 to 4294967295 s, got"), "{lifetime}: {body}");
        }
        assert!(write_payload(&Models::built_in(), "1/0/1", r#"{"value": 4294967295}"#).is_ok());
        let (status, body) = refused("3/0/13", r#"{"value": 9223372036854775807}"#);
        assert!(status == 400 && body.contains("(Current Time) must be 0 to 253402300799"), "{body}");
        let (status, body) = refused("3/0/0", r#"{"value": "x"}"#);
        assert!(status == 405 && body.contains("/3/0/0 (Manufacturer) is not writable (operations: R)"), "{body}");
        let (status, body) = refused("1/0/7", r#"{"value": 5}"#);
        assert!(status == 400 && body.contains("expects a String"), "{body}");
        let (status, _) = refused("1/0/7", r#"{"value": [1]}"#);
        assert_eq!(status, 400);
        let (status, _) = refused("1/0/7", "not json");
        assert_eq!(status, 400);
        let (status, _) = refused("1/0/7", r#"{"value": "U", "hex": "00"}"#);
        assert_eq!(status, 400);
    }

    #[test]
    fn reads_and_executes_are_checked_against_the_model() {
        assert!(refuses(&Models::built_in(), "3/0/4", Operation::Execute).is_none());
        assert!(refuses(&Models::built_in(), "3/0/0", Operation::Read).is_none());
        assert_eq!(refuses(&Models::built_in(), "3/0/0", Operation::Execute).map(|r| r.status().as_u16()), Some(405));
        assert_eq!(refuses(&Models::built_in(), "3/0/4", Operation::Read).map(|r| r.status().as_u16()), Some(405));
        assert_eq!(refuses(&Models::built_in(), "0/0/5", Operation::Read).map(|r| r.status().as_u16()), Some(405));
        assert!(refuses(&Models::built_in(), "3/0", Operation::Read).is_none());
        assert!(refuses(&Models::built_in(), "40000/0/1", Operation::Execute).is_none());
        assert!(refuses(&Models::built_in(), "3303/0/5605", Operation::Execute).is_none());
    }
}
