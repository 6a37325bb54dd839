//! Client-initiated bootstrap (OMA LwM2M 1.1 §5.2.7, §6.1.3), sans-IO, both sides.
//!
//! The device sends Bootstrap-Request (`POST /bs?ep=NAME`) to its bootstrap server. The
//! server answers 2.04, then configures the device: Bootstrap-Delete of `/` (every instance
//! but the bootstrap server's own), Bootstrap-Write of a Security instance (/0/1: the LwM2M
//! server's URI, security mode, PSK identity and key, Short Server ID) and of a Server
//! instance (/1/0: Short Server ID, lifetime, binding), and Bootstrap-Finish (`POST /bs`).
//! The device checks that what it was given is usable before it answers Finish with 2.04
//! (else 4.06), then registers with that server.
//!
//! - [`bootstrap_requests`]: what a bootstrap server sends for one [`ServerAccount`].
//! - [`BootstrapClient`]: the device side over one DTLS session to the bootstrap server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use crate::content::{self, format, Entry, Path, Value};
use crate::message::{CoapConfig, CoapEvent, IncomingRequest, MessageLayer, Token};
use crate::packet::{decode_uint, encode_uint, request};
use crate::registration::{response, uri_path, Lifetime, LifetimeError};

/// The LwM2M server a device is given: what its Security (0) and Server (1) instances hold.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAccount {
    /// `coaps://HOST:PORT`.
    pub uri: String,
    /// The PSK identity the device presents to that server.
    pub psk_identity: Vec<u8>,
    /// The PSK (a secret: never printed).
    pub psk_key: Vec<u8>,
    /// Short Server ID (/0/x/10, /1/x/0), 1–65534.
    pub short_server_id: u16,
    /// Registration lifetime (/1/x/1).
    pub lifetime: Duration,
    /// Binding (/1/x/7), `U` or `UQ`.
    pub binding: String,
}

impl std::fmt::Debug for ServerAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAccount")
            .field("uri", &self.uri)
            .field("psk_identity", &String::from_utf8_lossy(&self.psk_identity))
            .field("psk_key", &"<redacted>")
            .field("short_server_id", &self.short_server_id)
            .field("lifetime", &self.lifetime)
            .field("binding", &self.binding)
            .finish()
    }
}

/// The Security instance a bootstrap server writes for the LwM2M server (instance 0 is
/// left to the bootstrap server's own account, which a device keeps).
pub const SERVER_SECURITY_INSTANCE: u16 = 1;
/// The Server instance a bootstrap server writes.
pub const SERVER_INSTANCE: u16 = 0;

/// The endpoint name of a Bootstrap-Request (`POST /bs?ep=NAME`), or `None` if `request`
/// is not one.
pub fn bootstrap_request_endpoint(request: &Packet) -> Option<String> {
    if request.header.code != MessageClass::Request(RequestType::Post) || uri_path(request) != ["bs"] {
        return None;
    }
    request
        .get_option(CoapOption::UriQuery)?
        .iter()
        .filter_map(|q| std::str::from_utf8(q).ok())
        .find_map(|q| q.strip_prefix("ep="))
        .filter(|ep| !ep.is_empty())
        .map(str::to_string)
}

/// What a bootstrap server sends, in order, after answering a Bootstrap-Request with 2.04:
/// Delete `/`, Write /0/1 and /1/0 (TLV), Finish.
pub fn bootstrap_requests(account: &ServerAccount) -> Vec<Packet> {
    let security =
        Path { object: 0, instance: Some(SERVER_SECURITY_INSTANCE), resource: None, resource_instance: None };
    let server = Path { object: 1, instance: Some(SERVER_INSTANCE), resource: None, resource_instance: None };
    let at =
        |base: &Path, resource: u16, value: Value| Entry { path: Path { resource: Some(resource), ..*base }, value };
    let security_entries = [
        at(&security, 0, Value::String(account.uri.clone())),
        at(&security, 1, Value::Boolean(false)),
        at(&security, 2, Value::Integer(0)), // PSK
        at(&security, 3, Value::Opaque(account.psk_identity.clone())),
        at(&security, 5, Value::Opaque(account.psk_key.clone())),
        at(&security, 10, Value::Integer(i64::from(account.short_server_id))),
    ];
    let server_entries = [
        at(&server, 0, Value::Integer(i64::from(account.short_server_id))),
        at(&server, 1, Value::Integer(i64::try_from(account.lifetime.as_secs()).unwrap_or(i64::MAX))),
        at(&server, 6, Value::Boolean(true)),
        at(&server, 7, Value::String(account.binding.clone())),
    ];
    let write = |base: &Path, entries: &[Entry]| {
        let payload = content::encode(format::TLV, base, entries).unwrap_or_default();
        request(RequestType::Put, &base.to_string(), Some(format::TLV), payload)
    };
    vec![
        request(RequestType::Delete, "", None, Vec::new()),
        write(&security, &security_entries),
        write(&server, &server_entries),
        request(RequestType::Post, "/bs", None, Vec::new()),
    ]
}

/// Why a device's bootstrap failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// The bootstrap server answered the Bootstrap-Request with an error.
    #[error("the bootstrap server refused endpoint {endpoint:?} ({code})")]
    Refused {
        /// The endpoint name asked for.
        endpoint: String,
        /// The CoAP code, `4.03`.
        code: String,
    },
    /// The Bootstrap-Request got no answer.
    #[error("no answer to the Bootstrap-Request ({0})")]
    NoAnswer(String),
    /// The server did not finish in time.
    #[error("the bootstrap server did not finish within {0:?}")]
    Timeout(Duration),
    /// What the server wrote cannot be used (answered 4.06 to Finish).
    #[error("the bootstrap configuration is unusable: {0}")]
    Unusable(String),
}

/// How long a bootstrap may take from the Bootstrap-Request to Finish.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(60);

/// The device side of a bootstrap over one session to the bootstrap server. Drive it like
/// the other state machines: [`start`](Self::start), then datagrams and timeouts in,
/// datagrams out, until [`outcome`](Self::outcome) is set; send what is left to transmit
/// (the answer to Finish), then close the session.
#[derive(Debug)]
pub struct BootstrapClient {
    endpoint: String,
    layer: MessageLayer,
    request: Option<Token>,
    /// Security and Server instances written, by object and instance.
    written: BTreeMap<(u16, u16), Vec<Entry>>,
    deadline: Option<Instant>,
    outcome: Option<Result<ServerAccount, BootstrapError>>,
}

impl BootstrapClient {
    /// A device named `endpoint` about to bootstrap.
    pub fn new(endpoint: impl Into<String>, coap: Arc<CoapConfig>, seed: u64) -> Self {
        Self {
            endpoint: endpoint.into(),
            layer: MessageLayer::new(coap, seed),
            request: None,
            written: BTreeMap::new(),
            deadline: None,
            outcome: None,
        }
    }

    /// Sends the Bootstrap-Request (the session to the bootstrap server is up).
    pub fn start(&mut self, now: Instant) {
        let mut bs = request(RequestType::Post, "/bs", None, Vec::new());
        bs.add_option(CoapOption::UriQuery, format!("ep={}", self.endpoint).into_bytes());
        self.deadline = Some(now + BOOTSTRAP_TIMEOUT);
        match self.layer.request(now, bs, true, false) {
            Ok(token) => self.request = Some(token),
            Err(err) => self.outcome = Some(Err(BootstrapError::NoAnswer(err.to_string()))),
        }
    }

    /// Feeds a datagram from the bootstrap server.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        self.layer.handle_datagram(now, datagram);
        self.process(now);
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.layer.handle_timeout(now);
        self.process(now);
        if self.outcome.is_none() && self.deadline.is_some_and(|d| now >= d) {
            self.outcome = Some(Err(BootstrapError::Timeout(BOOTSTRAP_TIMEOUT)));
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.layer.poll_transmit()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.layer.poll_timeout(), self.deadline.filter(|_| self.outcome.is_none())].into_iter().flatten().min()
    }

    /// The server to register with, once bootstrap finished, or why it failed.
    pub fn outcome(&self) -> Option<&Result<ServerAccount, BootstrapError>> {
        self.outcome.as_ref()
    }

    fn process(&mut self, now: Instant) {
        while let Some(event) = self.layer.poll_event() {
            match event {
                CoapEvent::Response { token, response } if Some(token) == self.request => {
                    self.request = None;
                    if let MessageClass::Response(code) = response.header.code {
                        if code.is_error() {
                            let code = MessageClass::Response(code).to_string();
                            let endpoint = self.endpoint.clone();
                            self.outcome.get_or_insert(Err(BootstrapError::Refused { endpoint, code }));
                        }
                    }
                }
                CoapEvent::RequestFailed { token, reason } if Some(token) == self.request => {
                    self.outcome.get_or_insert(Err(BootstrapError::NoAnswer(reason.to_string())));
                }
                CoapEvent::Request { id, request } if self.outcome.is_none() => self.on_request(now, &id, &request),
                _ => {}
            }
        }
    }

    fn on_request(&mut self, now: Instant, id: &IncomingRequest, request: &Packet) {
        let segments = uri_path(request);
        let ids: Option<Vec<u16>> = segments.iter().map(|s| s.parse().ok()).collect();
        let code = match (request.header.code, ids.as_deref()) {
            (MessageClass::Request(RequestType::Post), _) if segments == ["bs"] => return self.finish(now, id),
            (MessageClass::Request(RequestType::Delete), Some(ids)) => self.delete(ids),
            (MessageClass::Request(RequestType::Put), Some([object, rest @ ..])) if rest.len() <= 2 => {
                self.write(request, *object, rest)
            }
            (MessageClass::Request(RequestType::Get), Some(ids)) if accepts_links(request) => {
                let mut answer = response(ResponseType::Content);
                answer.add_option(CoapOption::ContentFormat, encode_uint(u32::from(format::LINK)));
                answer.payload = self.discover(ids).into_bytes();
                let _ = self.layer.respond(now, id, answer);
                return;
            }
            _ => ResponseType::MethodNotAllowed,
        };
        let _ = self.layer.respond(now, id, response(code));
    }

    /// Bootstrap-Delete: `/`, an object (0 or 1) or one instance of it.
    fn delete(&mut self, ids: &[u16]) -> ResponseType {
        match ids {
            [] => self.written.clear(),
            [object @ (0 | 1)] => self.written.retain(|(o, _), _| o != object),
            [object @ (0 | 1), instance] => {
                self.written.remove(&(*object, *instance));
            }
            _ => return ResponseType::BadRequest,
        }
        ResponseType::Deleted
    }

    /// Bootstrap-Write to an object, instance or resource of Security (0) or Server (1);
    /// Access Control (2) is taken and ignored (this device enforces no ACLs).
    fn write(&mut self, request: &Packet, object: u16, rest: &[u16]) -> ResponseType {
        if object == 2 {
            return ResponseType::Changed;
        }
        if object > 1 {
            return ResponseType::NotFound;
        }
        let base =
            Path { object, instance: rest.first().copied(), resource: rest.get(1).copied(), resource_instance: None };
        let cf = request.get_first_option(CoapOption::ContentFormat).and_then(|v| decode_uint(v));
        let entries = match content::decode(cf.unwrap_or(format::TLV), &base, &request.payload) {
            Ok(entries) if !entries.is_empty() => entries,
            Ok(_) => return ResponseType::BadRequest,
            Err(content::ContentError::Unsupported(_)) => return ResponseType::UnsupportedContentFormat,
            Err(_) => return ResponseType::BadRequest,
        };
        if entries.iter().any(|e| e.path.object != object || e.path.instance.is_none()) {
            return ResponseType::BadRequest;
        }
        for entry in entries {
            let Some(instance) = entry.path.instance else { continue };
            let values = self.written.entry((object, instance)).or_default();
            values.retain(|e| e.path != entry.path);
            values.push(entry);
        }
        ResponseType::Changed
    }

    /// Bootstrap-Discover: the instances of Security and Server, and the device's other
    /// objects.
    fn discover(&self, ids: &[u16]) -> String {
        let mut links = vec!["</>;lwm2m=1.1".to_string()];
        for (object, instance) in self.written.keys() {
            if ids.first().is_none_or(|o| o == object) {
                links.push(format!("</{object}/{instance}>"));
            }
        }
        if ids.is_empty() {
            links.extend(["</1>", "</3/0>", "</5/0>", "</3303/0>"].map(String::from));
        }
        links.join(",")
    }

    /// Bootstrap-Finish: 2.04 and the account if what was written is usable, else 4.06.
    fn finish(&mut self, now: Instant, id: &IncomingRequest) {
        let account = self.account();
        let code = if account.is_ok() { ResponseType::Changed } else { ResponseType::NotAcceptable };
        let _ = self.layer.respond(now, id, response(code));
        self.outcome = Some(account.map_err(BootstrapError::Unusable));
    }

    /// The LwM2M server's account from the Security instance that is not a bootstrap
    /// server's and the Server instance with its Short Server ID.
    fn account(&self) -> Result<ServerAccount, String> {
        let value = |object: u16, instance: u16, resource: u16| {
            self.written.get(&(object, instance))?.iter().find(|e| e.path.resource == Some(resource)).map(|e| &e.value)
        };
        let integer = |v: Option<&Value>| match v {
            Some(Value::Integer(i)) => Some(*i),
            Some(Value::Unsigned(u)) => i64::try_from(*u).ok(),
            _ => None,
        };
        let security = self
            .written
            .keys()
            .filter(|(object, _)| *object == 0)
            .map(|(_, instance)| *instance)
            .find(|i| !matches!(value(0, *i, 1), Some(Value::Boolean(true))))
            .ok_or("no Security instance for an LwM2M server (/0/x with /0/x/1 false)")?;
        let Some(Value::String(uri)) = value(0, security, 0) else {
            return Err(format!("/0/{security}/0 (server URI) is missing"));
        };
        match integer(value(0, security, 2)) {
            Some(0) => {}
            Some(mode) => return Err(format!("security mode {mode} is not supported by this device (0, PSK, only)")),
            None => return Err(format!("/0/{security}/2 (security mode) is missing")),
        }
        let opaque = |resource: u16, name: &str| match value(0, security, resource) {
            Some(Value::Opaque(bytes)) if !bytes.is_empty() => Ok(bytes.clone()),
            Some(Value::String(text)) if !text.is_empty() => Ok(text.clone().into_bytes()),
            _ => Err(format!("/0/{security}/{resource} ({name}) is missing")),
        };
        let psk_identity = opaque(3, "PSK identity")?;
        let psk_key = opaque(5, "secret key")?;
        let short_server_id = integer(value(0, security, 10))
            .and_then(|id| u16::try_from(id).ok())
            .filter(|id| (1..u16::MAX).contains(id))
            .ok_or(format!("/0/{security}/10 (Short Server ID) is missing or out of range"))?;
        let server = self
            .written
            .keys()
            .filter(|(object, _)| *object == 1)
            .map(|(_, instance)| *instance)
            .find(|i| integer(value(1, *i, 0)) == Some(i64::from(short_server_id)))
            .ok_or(format!("no Server instance with Short Server ID {short_server_id}"))?;
        let lifetime = match integer(value(1, server, 1)) {
            None => Lifetime::from_secs(300).map_err(|e| e.to_string())?,
            Some(secs) => u64::try_from(secs)
                .map_err(|_| LifetimeError::OutOfRange(secs.to_string()))
                .and_then(Lifetime::from_secs)
                .map_err(|e| format!("/1/{server}/1: {e}"))?,
        };
        let binding = match value(1, server, 7) {
            Some(Value::String(binding)) if !binding.is_empty() => binding.clone(),
            _ => "U".to_string(),
        };
        Ok(ServerAccount {
            uri: uri.clone(),
            psk_identity,
            psk_key,
            short_server_id,
            lifetime: lifetime.duration(),
            binding,
        })
    }
}

fn accepts_links(request: &Packet) -> bool {
    request.get_first_option(CoapOption::Accept).and_then(|v| decode_uint(v)) == Some(format::LINK)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;
    use coap_lite::MessageType;

    fn account() -> ServerAccount {
        ServerAccount {
            uri: "coaps://127.0.0.1:5684".into(),
            psk_identity: b"device-7".to_vec(),
            psk_key: vec![0x11; 16],
            short_server_id: 123,
            lifetime: Duration::from_secs(600),
            binding: "UQ".into(),
        }
    }

    /// Runs a bootstrap server's side against the client over an in-memory exchange;
    /// `tamper` may change the requests first.
    fn run(requests: Vec<Packet>) -> Result<ServerAccount, BootstrapError> {
        let now = Instant::now();
        let config = Arc::new(CoapConfig::default());
        let mut client = BootstrapClient::new("urn:dev:7", Arc::clone(&config), 1);
        let mut server = MessageLayer::new(config, 2);
        client.start(now);
        let mut queue = requests.into_iter();
        let mut sent_next = false;
        for _ in 0..100 {
            while let Some(datagram) = client.poll_transmit() {
                server.handle_datagram(now, &datagram);
            }
            while let Some(event) = server.poll_event() {
                match event {
                    CoapEvent::Request { id, request } => {
                        assert_eq!(bootstrap_request_endpoint(&request).as_deref(), Some("urn:dev:7"));
                        server.respond(now, &id, response(ResponseType::Changed)).unwrap();
                        sent_next = true;
                    }
                    CoapEvent::Response { response, .. } => {
                        assert!(!response.header.code.to_string().starts_with('5'));
                        sent_next = true;
                    }
                    _ => {}
                }
            }
            if std::mem::take(&mut sent_next) {
                if let Some(next) = queue.next() {
                    server.request(now, next, true, false).unwrap();
                }
            }
            while let Some(datagram) = server.poll_transmit() {
                client.handle_datagram(now, &datagram);
            }
            if let Some(outcome) = client.outcome().cloned() {
                // The answer to Finish goes out.
                while let Some(datagram) = client.poll_transmit() {
                    let answer = Packet::from_bytes(&datagram).unwrap();
                    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
                }
                return outcome;
            }
        }
        panic!("bootstrap never finished");
    }

    #[test]
    fn a_device_takes_the_server_account_it_is_given() {
        let got = run(bootstrap_requests(&account())).unwrap();
        assert_eq!(got, account());
        assert!(!format!("{got:?}").contains("17"), "the key is not printed: {got:?}");
    }

    #[test]
    fn an_unusable_configuration_is_refused_at_finish() {
        let mut requests = bootstrap_requests(&account());
        // The Server instance names another Short Server ID.
        let mut other = account();
        other.short_server_id = 9;
        requests[2] = bootstrap_requests(&other)[2].clone();
        let err = run(requests).unwrap_err();
        assert_eq!(err, BootstrapError::Unusable("no Server instance with Short Server ID 123".into()));
        // A Delete after the writes leaves nothing.
        let mut requests = bootstrap_requests(&account());
        requests.insert(3, request(RequestType::Delete, "/0", None, Vec::new()));
        assert!(matches!(run(requests), Err(BootstrapError::Unusable(_))));
    }
}
