//! The LwM2M 1.1 registration interface (OMA-TS-LightweightM2M_Core §6.3), sans-IO.
//!
//! - Register: `POST /rd?ep=&lt=&lwm2m=&b=` with a link-format body → 2.01 Created and
//!   `Location-Path: rd/<id>`.
//! - Update: `POST /rd/<id>?lt=&b=` (body optional) → 2.04 Changed.
//! - De-register: `DELETE /rd/<id>` → 2.02 Deleted.
//!
//! Authorization: the DTLS identity must be allowed to use the endpoint name (Register
//! refused → 4.03 Forbidden); Update or De-register from an identity other than the
//! registration's → 4.00 Bad Request (as Leshan does); an unknown registration → 4.04.
//! Lifetimes expire on the registry's own timer ([`Registry::poll_timeout`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::link_format::{self, Link};

/// Default lifetime when `lt` is absent (§6.3.1: 86400 s).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(86_400);
/// Shortest lifetime accepted.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Longest endpoint name accepted.
pub const MAX_ENDPOINT_LEN: usize = 255;

/// How the server reaches the device (the `b` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `U`: UDP, always reachable.
    Udp,
    /// `UQ` (1.0) or `Q` (1.1 queue flag): requests wait until the device is next heard from.
    UdpQueue,
}

impl Binding {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "U",
            Self::UdpQueue => "UQ",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "U" => Some(Self::Udp),
            "UQ" | "Q" | "UQS" => Some(Self::UdpQueue),
            _ => None,
        }
    }
}

/// A registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Registration ID (the `rd/<id>` location).
    pub id: String,
    /// Endpoint client name.
    pub endpoint: String,
    /// The authenticated identity that registered it.
    pub identity: String,
    /// Where the device is (its DTLS session's peer address).
    pub peer: SocketAddr,
    /// Lifetime.
    pub lifetime: Duration,
    /// LwM2M version (`lwm2m`).
    pub version: String,
    /// Binding.
    pub binding: Binding,
    /// Objects and instances the device declared.
    pub links: Links,
    /// The content format the device prefers (`ct` on the `</>` link), if declared.
    pub content_format: Option<u16>,
    /// When it registered.
    pub registered_at: Instant,
    /// When it last registered or updated.
    pub last_update: Instant,
}

/// The objects and instances a device declared, kept as their link-format text (one
/// allocation per registration, where a parsed list costs a dozen) and parsed when read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Links(Box<str>);

impl Links {
    /// Parses and keeps a link-format document (in canonical form).
    pub fn parse(text: &str) -> Result<Self, link_format::LinkFormatError> {
        Ok(Self::from_links(&link_format::parse(text)?))
    }

    /// Keeps `links`.
    pub fn from_links(links: &[Link]) -> Self {
        Self(link_format::format(links).into_boxed_str())
    }

    /// The links.
    pub fn to_vec(&self) -> Vec<Link> {
        // The text was formatted from parsed links, so it parses.
        link_format::parse(&self.0).unwrap_or_default()
    }

    /// The link-format text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Registration {
    /// When the lifetime runs out.
    pub fn expires_at(&self) -> Instant {
        self.last_update + self.lifetime
    }
}

/// Who may use which endpoint name.
pub trait EndpointAuthorizer: Send + Sync {
    /// Whether the DTLS `identity` may register as `endpoint`.
    fn allows(&self, identity: &str, endpoint: &str) -> bool;
}

impl EndpointAuthorizer for HashMap<String, String> {
    /// A map from identity to the one endpoint name it may use.
    fn allows(&self, identity: &str, endpoint: &str) -> bool {
        self.get(identity).is_some_and(|e| e == endpoint)
    }
}

/// What changed in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A new registration (`replaced`: the endpoint's previous one, now gone).
    Registered {
        /// The registration.
        registration: Registration,
        /// The endpoint's previous registration, if it had one (re-registration, reboot,
        /// NAT rebinding).
        replaced: Option<Registration>,
    },
    /// An Update.
    Updated {
        /// The registration after the update.
        registration: Registration,
        /// Its address before, if the update came from a new one.
        moved_from: Option<SocketAddr>,
    },
    /// De-registered by the device.
    Deregistered {
        /// The removed registration.
        registration: Registration,
    },
    /// Lifetime ran out.
    Expired {
        /// The removed registration.
        registration: Registration,
    },
}

/// The registry of an LwM2M server. See the module docs.
pub struct Registry {
    /// Boxed: the table stays dense with 100,000 registrations.
    by_endpoint: HashMap<Arc<str>, Box<Registration>>,
    /// Registration ID → endpoint name (shared with the other indexes).
    by_id: HashMap<Box<str>, Arc<str>>,
    expiries: BTreeSet<(Instant, Arc<str>)>,
    rng: ChaCha8Rng,
    events: VecDeque<RegistryEvent>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("registrations", &self.by_endpoint.len()).finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry; registration IDs draw from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            by_endpoint: HashMap::new(),
            by_id: HashMap::new(),
            expiries: BTreeSet::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            events: VecDeque::new(),
        }
    }

    /// Registrations held.
    pub fn len(&self) -> usize {
        self.by_endpoint.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    /// The registration of `endpoint`.
    pub fn get(&self, endpoint: &str) -> Option<&Registration> {
        self.by_endpoint.get(endpoint).map(|r| &**r)
    }

    /// Every registration.
    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.by_endpoint.values().map(|r| &**r)
    }

    /// Puts back a registration loaded from storage (restart). Its lifetime keeps counting
    /// from its last update.
    pub fn restore(&mut self, registration: Registration) {
        self.insert(registration);
    }

    /// Handles a request on the registration interface from `peer` authenticated as
    /// `identity`, and returns the response to send. Requests outside `/rd` get 4.04.
    pub fn handle_request(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        identity: &str,
        authorizer: &dyn EndpointAuthorizer,
        request: &Packet,
    ) -> Packet {
        let path = uri_path(request);
        let method = match request.header.code {
            MessageClass::Request(method) => method,
            _ => return response(ResponseType::BadRequest),
        };
        match (method, path.as_slice()) {
            (RequestType::Post, [rd]) if rd == "rd" => self.register(now, peer, identity, authorizer, request),
            (RequestType::Post, [rd, id]) if rd == "rd" => self.update(now, peer, identity, id, request),
            (RequestType::Delete, [rd, id]) if rd == "rd" => self.deregister(identity, id),
            (_, [rd, ..]) if rd == "rd" => response(ResponseType::MethodNotAllowed),
            _ => response(ResponseType::NotFound),
        }
    }

    fn register(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        identity: &str,
        authorizer: &dyn EndpointAuthorizer,
        request: &Packet,
    ) -> Packet {
        let query = match Query::parse(request) {
            Ok(q) => q,
            Err(()) => return response(ResponseType::BadRequest),
        };
        let Some(endpoint) = query.endpoint.filter(|e| !e.is_empty() && e.len() <= MAX_ENDPOINT_LEN) else {
            return response(ResponseType::BadRequest);
        };
        let Ok(body) = std::str::from_utf8(&request.payload) else {
            return response(ResponseType::BadRequest);
        };
        let Ok(links) = link_format::parse(body) else {
            return response(ResponseType::BadRequest);
        };
        if !authorizer.allows(identity, &endpoint) {
            return response(ResponseType::Forbidden);
        }
        let lifetime = query.lifetime.unwrap_or(DEFAULT_LIFETIME);
        let content_format = links
            .iter()
            .find(|l| l.target == "/" || l.attribute("rt") == Some("oma.lwm2m"))
            .and_then(|l| l.attribute("ct"))
            .and_then(|ct| ct.parse().ok());
        let replaced = self.remove(&endpoint);
        let id = self.new_id();
        let registration = Registration {
            id: id.clone(),
            endpoint,
            identity: identity.to_string(),
            peer,
            lifetime,
            version: query.version.unwrap_or_else(|| "1.0".into()),
            binding: query.binding.unwrap_or(Binding::Udp),
            links: Links::from_links(&links),
            content_format,
            registered_at: now,
            last_update: now,
        };
        self.insert(registration.clone());
        self.events.push_back(RegistryEvent::Registered { registration, replaced });
        let mut created = response(ResponseType::Created);
        created.add_option(CoapOption::LocationPath, b"rd".to_vec());
        created.add_option(CoapOption::LocationPath, id.into_bytes());
        created
    }

    fn update(&mut self, now: Instant, peer: SocketAddr, identity: &str, id: &str, request: &Packet) -> Packet {
        let Some(endpoint) = self.by_id.get(id).cloned() else {
            return response(ResponseType::NotFound);
        };
        let Ok(query) = Query::parse(request) else {
            return response(ResponseType::BadRequest);
        };
        let links = if request.payload.is_empty() {
            None
        } else {
            match std::str::from_utf8(&request.payload).ok().map(link_format::parse) {
                Some(Ok(links)) => Some(links),
                _ => return response(ResponseType::BadRequest),
            }
        };
        let Some(mut registration) = self.by_endpoint.get(&endpoint).map(|r| (**r).clone()) else {
            return response(ResponseType::NotFound);
        };
        if registration.identity != identity {
            return response(ResponseType::BadRequest);
        }
        self.expiries.remove(&(registration.expires_at(), endpoint.clone()));
        let moved_from = (registration.peer != peer).then_some(registration.peer);
        registration.peer = peer;
        registration.last_update = now;
        if let Some(lifetime) = query.lifetime {
            registration.lifetime = lifetime;
        }
        if let Some(binding) = query.binding {
            registration.binding = binding;
        }
        if let Some(links) = links {
            registration.links = Links::from_links(&links);
        }
        self.expiries.insert((registration.expires_at(), endpoint.clone()));
        self.by_endpoint.insert(endpoint, Box::new(registration.clone()));
        self.events.push_back(RegistryEvent::Updated { registration, moved_from });
        response(ResponseType::Changed)
    }

    fn deregister(&mut self, identity: &str, id: &str) -> Packet {
        let Some(endpoint) = self.by_id.get(id).cloned() else {
            return response(ResponseType::NotFound);
        };
        if self.by_endpoint.get(&endpoint).is_some_and(|r| r.identity != identity) {
            return response(ResponseType::BadRequest);
        }
        if let Some(registration) = self.remove(&endpoint) {
            self.events.push_back(RegistryEvent::Deregistered { registration });
        }
        response(ResponseType::Deleted)
    }

    /// The device at `from` now talks from `to` over the same DTLS session (a Connection ID
    /// moved it): its registration follows, reported as an Update from the new address.
    /// `endpoint`, when the caller knows it, finds the registration at once; without it every
    /// registration is looked at.
    pub fn move_peer(&mut self, from: SocketAddr, to: SocketAddr, endpoint: Option<&str>) -> Option<&Registration> {
        let known = endpoint.and_then(|e| self.by_endpoint.get_key_value(e)).filter(|(_, r)| r.peer == from);
        let endpoint = match known {
            Some((e, _)) => Arc::clone(e),
            None => self.by_endpoint.iter().find(|(_, r)| r.peer == from).map(|(e, _)| Arc::clone(e))?,
        };
        let registration = self.by_endpoint.get_mut(&endpoint)?;
        registration.peer = to;
        let registration = registration.clone();
        self.events.push_back(RegistryEvent::Updated { registration: *registration, moved_from: Some(from) });
        self.by_endpoint.get(&endpoint).map(|r| &**r)
    }

    /// Drops a registration that could not be made durable (its acknowledgement is withheld).
    pub fn discard(&mut self, endpoint: &str, id: &str) -> Option<Registration> {
        if self.by_endpoint.get(endpoint).is_some_and(|r| r.id == id) {
            return self.remove(endpoint);
        }
        None
    }

    /// Removes registrations whose lifetime ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((at, endpoint)) = self.expiries.iter().next().cloned() {
            if at > now {
                break;
            }
            if let Some(registration) = self.remove(&endpoint) {
                self.events.push_back(RegistryEvent::Expired { registration });
            }
        }
    }

    /// When the next registration expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiries.iter().next().map(|(at, _)| *at)
    }

    /// The next change.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    fn new_id(&mut self) -> String {
        loop {
            let id: String =
                (0..10).map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[self.rng.gen_range(0..32)])).collect();
            if !self.by_id.contains_key(id.as_str()) {
                return id;
            }
        }
    }

    fn insert(&mut self, registration: Registration) {
        let endpoint: Arc<str> = Arc::from(registration.endpoint.as_str());
        self.expiries.insert((registration.expires_at(), Arc::clone(&endpoint)));
        self.by_id.insert(registration.id.as_str().into(), Arc::clone(&endpoint));
        self.by_endpoint.insert(endpoint, Box::new(registration));
    }

    fn remove(&mut self, endpoint: &str) -> Option<Registration> {
        let (endpoint, registration) = self.by_endpoint.remove_entry(endpoint)?;
        self.by_id.remove(registration.id.as_str());
        self.expiries.remove(&(registration.expires_at(), endpoint));
        Some(*registration)
    }
}

/// The Uri-Path segments of a request.
pub fn uri_path(request: &Packet) -> Vec<String> {
    request
        .get_option(CoapOption::UriPath)
        .map(|segments| segments.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
        .unwrap_or_default()
}

/// A response with `code` and nothing else.
pub fn response(code: ResponseType) -> Packet {
    let mut packet = Packet::new();
    packet.header.code = MessageClass::Response(code);
    packet
}

#[derive(Default)]
struct Query {
    endpoint: Option<String>,
    lifetime: Option<Duration>,
    version: Option<String>,
    binding: Option<Binding>,
}

impl Query {
    fn parse(request: &Packet) -> Result<Self, ()> {
        let mut query = Query::default();
        for item in request.get_option(CoapOption::UriQuery).into_iter().flatten() {
            let item = std::str::from_utf8(item).map_err(|_| ())?;
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match key {
                "ep" => query.endpoint = Some(value.to_string()),
                "lt" => {
                    let secs: u64 = value.parse().map_err(|_| ())?;
                    let lifetime = Duration::from_secs(secs);
                    if lifetime < MIN_LIFETIME {
                        return Err(());
                    }
                    query.lifetime = Some(lifetime);
                }
                "lwm2m" => query.version = Some(value.to_string()),
                "b" => query.binding = Some(Binding::parse(value).ok_or(())?),
                _ => {} // sms, Q, and future parameters are ignored
            }
        }
        Ok(query)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn auth() -> HashMap<String, String> {
        [("id-a", "ep-a"), ("id-b", "ep-b")].into_iter().map(|(i, e)| (i.to_string(), e.to_string())).collect()
    }

    fn request(method: RequestType, path: &[&str], query: &[&str], body: &str) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::Request(method);
        for seg in path {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        p.payload = body.as_bytes().to_vec();
        p
    }

    fn register(reg: &mut Registry, now: Instant, identity: &str, ep: &str, lt: u64, port: u16) -> Packet {
        let lt = format!("lt={lt}");
        let ep = format!("ep={ep}");
        let body = r#"</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>"#;
        reg.handle_request(
            now,
            peer(port),
            identity,
            &auth(),
            &request(RequestType::Post, &["rd"], &[&ep, &lt, "lwm2m=1.1", "b=U"], body),
        )
    }

    fn location(response: &Packet) -> String {
        let segs: Vec<String> = response
            .get_option(CoapOption::LocationPath)
            .unwrap()
            .iter()
            .map(|s| String::from_utf8(s.clone()).unwrap())
            .collect();
        assert_eq!(segs[0], "rd");
        segs[1].clone()
    }

    fn code(p: &Packet) -> ResponseType {
        match p.header.code {
            MessageClass::Response(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_update_deregister() {
        let now = Instant::now();
        let mut reg = Registry::new(1);
        let created = register(&mut reg, now, "id-a", "ep-a", 300, 5000);
        assert_eq!(code(&created), ResponseType::Created);
        let id = location(&created);
        let r = reg.get("ep-a").unwrap();
        assert_eq!(
            (r.lifetime, r.version.as_str(), r.binding, r.content_format),
            (Duration::from_secs(300), "1.1", Binding::Udp, Some(11543))
        );
        assert_eq!(r.links.to_vec().len(), 3);
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Registered { replaced: None, .. })));

        let update = request(RequestType::Post, &["rd", &id], &["lt=600"], "");
        assert_eq!(
            code(&reg.handle_request(now + Duration::from_secs(10), peer(5001), "id-a", &auth(), &update)),
            ResponseType::Changed
        );
        assert_eq!(reg.get("ep-a").unwrap().lifetime, Duration::from_secs(600));
        assert!(
            matches!(reg.poll_event(), Some(RegistryEvent::Updated { moved_from: Some(p), .. }) if p == peer(5000))
        );
        assert_eq!(reg.get("ep-a").unwrap().peer, peer(5001), "the update moved the registration (NAT rebinding)");

        let delete = request(RequestType::Delete, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, peer(5001), "id-a", &auth(), &delete)), ResponseType::Deleted);
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Deregistered { .. })));
        assert!(reg.is_empty());
        assert_eq!(code(&reg.handle_request(now, peer(5001), "id-a", &auth(), &delete)), ResponseType::NotFound);
    }

    #[test]
    fn an_identity_can_only_act_for_its_own_endpoint() {
        let now = Instant::now();
        let mut reg = Registry::new(2);
        assert_eq!(code(&register(&mut reg, now, "id-a", "ep-b", 300, 5000)), ResponseType::Forbidden);
        assert_eq!(code(&register(&mut reg, now, "stranger", "ep-a", 300, 5000)), ResponseType::Forbidden);
        let id = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5000));
        let update = request(RequestType::Post, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, peer(6000), "id-b", &auth(), &update)), ResponseType::BadRequest);
        let delete = request(RequestType::Delete, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, peer(6000), "id-b", &auth(), &delete)), ResponseType::BadRequest);
        assert!(reg.get("ep-a").is_some(), "untouched");
        let unknown = request(RequestType::Post, &["rd", "nope"], &[], "");
        assert_eq!(code(&reg.handle_request(now, peer(6000), "id-a", &auth(), &unknown)), ResponseType::NotFound);
    }

    #[test]
    fn lifetimes_expire_and_updates_extend_them() {
        let now = Instant::now();
        let mut reg = Registry::new(3);
        let id = location(&register(&mut reg, now, "id-a", "ep-a", 60, 5000));
        register(&mut reg, now, "id-b", "ep-b", 100, 5001);
        while reg.poll_event().is_some() {}
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(60)));
        let update = request(RequestType::Post, &["rd", &id], &[], "");
        reg.handle_request(now + Duration::from_secs(50), peer(5000), "id-a", &auth(), &update);
        reg.handle_timeout(now + Duration::from_secs(100));
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Updated { .. })));
        assert!(
            matches!(reg.poll_event(), Some(RegistryEvent::Expired { registration }) if registration.endpoint == "ep-b")
        );
        assert!(reg.get("ep-a").is_some(), "extended to 110 s by its update");
        reg.handle_timeout(now + Duration::from_secs(110));
        assert!(
            matches!(reg.poll_event(), Some(RegistryEvent::Expired { registration }) if registration.endpoint == "ep-a")
        );
        assert!(reg.is_empty() && reg.poll_timeout().is_none());
    }

    #[test]
    fn re_registration_replaces_the_old_one() {
        let now = Instant::now();
        let mut reg = Registry::new(4);
        let first = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5000));
        let second = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5002));
        assert_ne!(first, second);
        reg.poll_event();
        assert!(
            matches!(reg.poll_event(), Some(RegistryEvent::Registered { replaced: Some(old), .. }) if old.id == first)
        );
        assert_eq!(reg.len(), 1);
        let stale = request(RequestType::Post, &["rd", &first], &[], "");
        assert_eq!(code(&reg.handle_request(now, peer(5002), "id-a", &auth(), &stale)), ResponseType::NotFound);
    }

    #[test]
    fn malformed_registrations_get_4_00() {
        let now = Instant::now();
        let mut reg = Registry::new(5);
        let cases = [
            request(RequestType::Post, &["rd"], &["lt=60"], "</1/0>"), // no ep
            request(RequestType::Post, &["rd"], &["ep=ep-a", "lt=abc"], "</1/0>"), // bad lt
            request(RequestType::Post, &["rd"], &["ep=ep-a", "lt=0"], "</1/0>"), // lt 0
            request(RequestType::Post, &["rd"], &["ep=ep-a", "b=X"], "</1/0>"), // bad binding
            request(RequestType::Post, &["rd"], &["ep=ep-a"], "</1/0"), // bad links
            request(RequestType::Post, &["rd"], &["ep="], "</1/0>"),   // empty ep
        ];
        for (i, r) in cases.iter().enumerate() {
            assert_eq!(
                code(&reg.handle_request(now, peer(1), "id-a", &auth(), r)),
                ResponseType::BadRequest,
                "case {i}"
            );
        }
        let mut invalid_utf8 = request(RequestType::Post, &["rd"], &["ep=ep-a"], "");
        invalid_utf8.payload = vec![0xff, 0xfe];
        assert_eq!(code(&reg.handle_request(now, peer(1), "id-a", &auth(), &invalid_utf8)), ResponseType::BadRequest);
        assert!(reg.is_empty());
    }
}
