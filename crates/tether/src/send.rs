//! LwM2M 1.1 Send (§6.4.2 of the Information Reporting interface): a registered device
//! `POST`s SenML values to `/dp` over its own session; the server keeps the latest value of
//! each resource per endpoint.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use tether_coap::coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_coap::content::{self, format, Path, Value};
use tether_coap::packet::decode_uint;
use tether_coap::registration::{response, uri_path};

/// Resources kept per endpoint at most; values for more are answered but not kept.
pub const MAX_SENT_RESOURCES: usize = 256;

/// One value a device sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentValue {
    /// The resource (or resource instance).
    pub path: Path,
    /// Its value, typed by the built-in models where they know the resource.
    pub value: Value,
    /// When it arrived.
    pub received: Instant,
}

/// Whether `request` is a Send.
pub(crate) fn is_send(request: &Packet) -> bool {
    request.header.code == MessageClass::Request(RequestType::Post) && uri_path(request) == ["dp"]
}

/// The latest values sent, per endpoint.
#[derive(Debug, Default)]
pub(crate) struct SentStore {
    by_endpoint: HashMap<String, BTreeMap<Path, (Value, Instant)>>,
}

impl SentStore {
    /// Takes a Send from `endpoint` (already checked to be registered over this session)
    /// and returns the answer: 2.04, or 4.00 / 4.15 for a payload it cannot read.
    pub(crate) fn accept(&mut self, now: Instant, endpoint: &str, request: &Packet) -> Packet {
        let format = request.get_first_option(CoapOption::ContentFormat).and_then(|v| decode_uint(v));
        let Some(format @ (format::SENML_JSON | format::SENML_CBOR)) = format else {
            return response(ResponseType::UnsupportedContentFormat);
        };
        let root = Path { object: 0, instance: None, resource: None, resource_instance: None };
        let entries = match content::decode(format, &root, &request.payload) {
            Ok(entries) if !entries.is_empty() => entries,
            _ => return response(ResponseType::BadRequest),
        };
        let kept = self.by_endpoint.entry(endpoint.to_string()).or_default();
        for entry in entries {
            if kept.len() < MAX_SENT_RESOURCES || kept.contains_key(&entry.path) {
                kept.insert(entry.path, (entry.value, now));
            }
        }
        response(ResponseType::Changed)
    }

    /// The latest values of `endpoint`, in path order.
    pub(crate) fn values(&self, endpoint: &str) -> Vec<SentValue> {
        self.by_endpoint.get(endpoint).map_or_else(Vec::new, |kept| {
            kept.iter()
                .map(|(path, (value, received))| SentValue { path: *path, value: value.clone(), received: *received })
                .collect()
        })
    }

    /// Forgets `endpoint` (de-registered or expired).
    pub(crate) fn forget(&mut self, endpoint: &str) {
        self.by_endpoint.remove(endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_coap::content::Entry;
    use tether_coap::packet::request;

    fn send(format: u16, entries: &[Entry]) -> Packet {
        let base = Path::parse("/3303").unwrap();
        request(RequestType::Post, "/dp", Some(format), content::encode(format, &base, entries).unwrap())
    }

    #[test]
    fn the_latest_value_of_each_resource_is_kept() {
        let now = Instant::now();
        let mut store = SentStore::default();
        let temperature = |v| Entry { path: Path::parse("/3303/0/5700").unwrap(), value: Value::Float(v) };
        let battery = Entry { path: Path::parse("/3/0/9").unwrap(), value: Value::Integer(80) };
        let answer = store.accept(now, "ep", &send(format::SENML_CBOR, &[temperature(20.5), battery]));
        assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Changed));
        store.accept(now, "ep", &send(format::SENML_JSON, &[temperature(21.0)]));
        let values = store.values("ep");
        assert_eq!(values.len(), 2);
        assert_eq!((values[0].path.to_string(), &values[0].value), ("/3/0/9".into(), &Value::Integer(80)));
        assert_eq!(values[1].value, Value::Float(21.0));
        assert!(is_send(&send(format::SENML_CBOR, &[temperature(1.0)])));
        store.forget("ep");
        assert!(store.values("ep").is_empty());
    }

    #[test]
    fn unreadable_sends_are_refused() {
        let mut store = SentStore::default();
        let now = Instant::now();
        let text = request(RequestType::Post, "/dp", Some(format::TEXT), b"21".to_vec());
        let code = |p: Packet| p.header.code;
        assert_eq!(
            code(store.accept(now, "ep", &text)),
            MessageClass::Response(ResponseType::UnsupportedContentFormat)
        );
        let garbage = request(RequestType::Post, "/dp", Some(format::SENML_CBOR), vec![0xff, 0x00]);
        assert_eq!(code(store.accept(now, "ep", &garbage)), MessageClass::Response(ResponseType::BadRequest));
        assert!(store.values("ep").is_empty());
    }
}
