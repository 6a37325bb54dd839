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
//!
//! A registration names the DTLS session it was made or last updated over by its
//! [`SessionHandle`], never by an address: an address is only where that session's datagrams
//! come from now. Requests to the endpoint go over that session alone, and only a session of
//! the registration's own identity can take it over ([`Registry::session_replaced`], an
//! Update). Values a peer sends are bounded where they are parsed: a [`Lifetime`] is 1 s to
//! [`Lifetime::MAX`], and a refused request is answered 4.00 with the reason as its payload.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use tether_proto::dtls::SessionHandle;

use crate::link_format::{self, Link};

/// Longest endpoint name accepted.
pub const MAX_ENDPOINT_LEN: usize = 255;

/// A registration lifetime (`lt`, the Server object's /1/x/1): at least [`Lifetime::MIN`], at
/// most [`Lifetime::MAX`]. Made only by [`Lifetime::from_secs`] or parsing, so whatever holds
/// one can add it to an `Instant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lifetime(Duration);

/// A lifetime out of range, or not a number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LifetimeError {
    /// A whole number of seconds outside [`Lifetime::MIN`]..=[`Lifetime::MAX`] (digits too
    /// many for a `u64` included).
    #[error("lifetime {0} s is out of range: 1 to 4294967295 s")]
    OutOfRange(String),
    /// Not a whole number of seconds.
    #[error("lifetime {0:?} is not a whole number of seconds (1 to 4294967295)")]
    NotANumber(String),
}

impl Lifetime {
    /// The shortest: 1 s (LwM2M: a lifetime is positive).
    pub const MIN: Lifetime = Lifetime(Duration::from_secs(1));
    /// The longest: 2^32 − 1 s (136 years), the largest lifetime a 32-bit device stores;
    /// devices that mean "forever" send it.
    pub const MAX: Lifetime = Lifetime(Duration::from_secs(u32::MAX as u64));
    /// Without `lt` (LwM2M 1.1 §6.3.1: 86400 s).
    pub const DEFAULT: Lifetime = Lifetime(Duration::from_secs(86_400));

    /// `secs` seconds, if within range.
    pub fn from_secs(secs: u64) -> Result<Self, LifetimeError> {
        if secs < Self::MIN.as_secs() || secs > Self::MAX.as_secs() {
            return Err(LifetimeError::OutOfRange(secs.to_string()));
        }
        Ok(Self(Duration::from_secs(secs)))
    }

    /// `secs` seconds, held within range: for values tether itself stored.
    pub fn clamped(secs: u64) -> Self {
        Self(Duration::from_secs(secs.clamp(Self::MIN.as_secs(), Self::MAX.as_secs())))
    }

    /// In whole seconds.
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// As a duration.
    pub fn duration(self) -> Duration {
        self.0
    }
}

impl std::str::FromStr for Lifetime {
    type Err = LifetimeError;

    /// Decimal seconds, as `lt=` carries them.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let shown: String = text.chars().take(40).collect();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LifetimeError::NotANumber(shown));
        }
        let secs = text.parse::<u64>().map_err(|_| LifetimeError::OutOfRange(shown))?;
        Self::from_secs(secs)
    }
}

/// Where a request on the registration interface came from: the DTLS session, the address
/// its datagram came from, and the session's authenticated identity.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The session.
    pub session: SessionHandle,
    /// Its peer's address now.
    pub peer: SocketAddr,
    /// Its authenticated identity (`psk:…`, `x509:…`).
    pub identity: &'a str,
}

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
    /// The DTLS session it was registered or last updated over: requests to the endpoint go
    /// over this session only. `None` for a registration stored before tether kept it (the
    /// device's next Update binds one).
    pub session: Option<SessionHandle>,
    /// Where the device's session was last heard from (shown; never used to route).
    pub peer: SocketAddr,
    /// Lifetime.
    pub lifetime: Lifetime,
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
        // A Lifetime is at most 136 years, which no clock's Instant overflows with; were one
        // to, the registration would expire at once rather than take the server down.
        self.last_update.checked_add(self.lifetime.duration()).unwrap_or(self.last_update)
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
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A new registration (`replaced`: the endpoint's previous one, now gone).
    Registered {
        /// The registration.
        registration: Registration,
        /// The endpoint's previous registration, if it had one (re-registration, reboot,
        /// NAT rebinding).
        replaced: Option<Box<Registration>>,
    },
    /// An Update, or the registration following its session: to a new address (Connection
    /// ID), or to the session that replaced it (a re-handshake of the same identity).
    Updated {
        /// The registration after the update.
        registration: Registration,
        /// The registration before it.
        previous: Box<Registration>,
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
    /// A Register, Update or De-register was refused with 4.00 or 4.03: changes nothing,
    /// reported so an operator can see why a device cannot register.
    Refused {
        /// The endpoint name it asked for (Register) or whose registration it named.
        endpoint: Option<String>,
        /// The identity of the session it came over.
        identity: String,
        /// Its address.
        peer: SocketAddr,
        /// The answer: 4.00 or 4.03.
        code: ResponseType,
        /// Why, as the 4.00's payload says it.
        reason: String,
    },
}

impl RegistryEvent {
    /// For an Update: the address the registration was at before, if it changed.
    pub fn moved_from(&self) -> Option<SocketAddr> {
        match self {
            Self::Updated { registration, previous } => (previous.peer != registration.peer).then_some(previous.peer),
            _ => None,
        }
    }
}

/// The registry of an LwM2M server. See the module docs.
pub struct Registry {
    /// Boxed: the table stays dense with 100,000 registrations.
    by_endpoint: HashMap<Arc<str>, Box<Registration>>,
    /// Registration ID → endpoint name (shared with the other indexes).
    by_id: HashMap<Box<str>, Arc<str>>,
    /// The session a registration is bound to → its endpoint name.
    by_session: HashMap<SessionHandle, Arc<str>>,
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
            by_session: HashMap::new(),
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

    /// The registration bound to `session`.
    pub fn by_session(&self, session: SessionHandle) -> Option<&Registration> {
        self.by_session.get(&session).and_then(|endpoint| self.get(endpoint))
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

    /// Whether a registration has location id `id`.
    pub fn contains_id(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Lets go of registration `id` without an event: another node of the same cluster
    /// claimed it (its device moved there), and the stored registration is that node's.
    pub fn release(&mut self, id: &str) -> Option<Registration> {
        let endpoint = self.by_id.get(id)?.clone();
        self.remove(&endpoint)
    }

    /// Lets go of the registration bound to `session` without an event: another server (a
    /// node of the same cluster) serves it now, and the stored registration is its own.
    pub fn hand_over(&mut self, session: SessionHandle) -> Option<Registration> {
        let endpoint = self.by_session.get(&session)?.clone();
        self.remove(&endpoint)
    }

    /// Handles a request on the registration interface from `origin`, and returns the
    /// response to send. Requests outside `/rd` get 4.04; a refused one is answered with its
    /// reason (4.00 and 4.03 carry it as text) and reported as [`RegistryEvent::Refused`].
    pub fn handle_request(
        &mut self,
        now: Instant,
        origin: Origin<'_>,
        authorizer: &dyn EndpointAuthorizer,
        request: &Packet,
    ) -> Packet {
        let path = uri_path(request);
        let method = match request.header.code {
            MessageClass::Request(method) => method,
            _ => return response(ResponseType::BadRequest),
        };
        let outcome = match (method, path.as_slice()) {
            (RequestType::Post, [rd]) if rd == "rd" => self.register(now, origin, authorizer, request),
            (RequestType::Post, [rd, id]) if rd == "rd" => self.update(now, origin, id, request),
            (RequestType::Delete, [rd, id]) if rd == "rd" => self.deregister(origin, id),
            (_, [rd, ..]) if rd == "rd" => return response(ResponseType::MethodNotAllowed),
            _ => return response(ResponseType::NotFound),
        };
        match outcome {
            Ok(answer) => answer,
            Err(refusal) => {
                let mut answer = response(refusal.code);
                answer.add_option(CoapOption::ContentFormat, vec![]); // text/plain (0)
                answer.payload = refusal.reason.clone().into_bytes();
                self.events.push_back(RegistryEvent::Refused {
                    endpoint: refusal.endpoint,
                    identity: origin.identity.to_string(),
                    peer: origin.peer,
                    code: refusal.code,
                    reason: refusal.reason,
                });
                answer
            }
        }
    }

    fn register(
        &mut self,
        now: Instant,
        origin: Origin<'_>,
        authorizer: &dyn EndpointAuthorizer,
        request: &Packet,
    ) -> Result<Packet, Refusal> {
        let query = Query::parse(request).map_err(|reason| Refusal::bad_request(None, reason))?;
        let Some(endpoint) = query.endpoint.clone() else {
            return Err(Refusal::bad_request(None, "a Register needs ep= (the endpoint name)".into()));
        };
        if endpoint.is_empty() || endpoint.len() > MAX_ENDPOINT_LEN {
            let reason = format!("ep= must be 1 to {MAX_ENDPOINT_LEN} bytes, got {}", endpoint.len());
            return Err(Refusal::bad_request(Some(endpoint), reason));
        }
        let links = links(&request.payload).map_err(|reason| Refusal::bad_request(Some(endpoint.clone()), reason))?;
        if !authorizer.allows(origin.identity, &endpoint) {
            let reason = format!("identity {} may not register endpoint {endpoint:?}", origin.identity);
            return Err(Refusal { code: ResponseType::Forbidden, endpoint: Some(endpoint), reason });
        }
        let content_format = links
            .iter()
            .find(|l| l.target == "/" || l.attribute("rt") == Some("oma.lwm2m"))
            .and_then(|l| l.attribute("ct"))
            .and_then(|ct| ct.parse().ok());
        let replaced = self.remove(&endpoint).map(Box::new);
        let id = self.new_id();
        let registration = Registration {
            id: id.clone(),
            endpoint,
            identity: origin.identity.to_string(),
            session: Some(origin.session),
            peer: origin.peer,
            lifetime: query.lifetime.unwrap_or(Lifetime::DEFAULT),
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
        Ok(created)
    }

    fn update(&mut self, now: Instant, origin: Origin<'_>, id: &str, request: &Packet) -> Result<Packet, Refusal> {
        let Some(endpoint) = self.by_id.get(id).cloned() else {
            return Ok(response(ResponseType::NotFound));
        };
        let named = Some(endpoint.to_string());
        let query = Query::parse(request).map_err(|reason| Refusal::bad_request(named.clone(), reason))?;
        let links = match request.payload.is_empty() {
            true => None,
            false => Some(links(&request.payload).map_err(|reason| Refusal::bad_request(named.clone(), reason))?),
        };
        let Some(previous) = self.by_endpoint.get(&endpoint).map(|r| (**r).clone()) else {
            return Ok(response(ResponseType::NotFound));
        };
        if previous.identity != origin.identity {
            let reason = format!("registration {id} belongs to another identity");
            return Err(Refusal::bad_request(named, reason));
        }
        let mut registration = previous.clone();
        registration.session = Some(origin.session);
        registration.peer = origin.peer;
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
        self.replace(registration, previous);
        Ok(response(ResponseType::Changed))
    }

    fn deregister(&mut self, origin: Origin<'_>, id: &str) -> Result<Packet, Refusal> {
        let Some(endpoint) = self.by_id.get(id).cloned() else {
            return Ok(response(ResponseType::NotFound));
        };
        if self.by_endpoint.get(&endpoint).is_some_and(|r| r.identity != origin.identity) {
            let reason = format!("registration {id} belongs to another identity");
            return Err(Refusal::bad_request(Some(endpoint.to_string()), reason));
        }
        if let Some(registration) = self.remove(&endpoint) {
            self.events.push_back(RegistryEvent::Deregistered { registration });
        }
        Ok(response(ResponseType::Deleted))
    }

    /// `session` now talks from `to` (a Connection ID moved it): the registration bound to
    /// it follows, reported as an Update. `None` if no registration is bound to it.
    pub fn session_moved(&mut self, session: SessionHandle, to: SocketAddr) -> Option<&Registration> {
        let previous = self.by_session(session).filter(|r| r.peer != to)?.clone();
        let endpoint = Arc::clone(self.by_endpoint.get_key_value(previous.endpoint.as_str())?.0);
        let registration = Registration { peer: to, ..previous.clone() };
        self.replace(registration, previous);
        self.by_endpoint.get(&endpoint).map(|r| &**r)
    }

    /// A new handshake (`new`) replaced the session `old` of the same address (a reboot, a
    /// NAT re-handshake; RFC 6347 §4.2.8). The registration bound to `old` moves to it if
    /// `new` is of the registration's own identity; a session of another identity takes
    /// nothing over (the endpoint is offline until its own device is heard from).
    pub fn session_replaced(&mut self, old: SessionHandle, new: Origin<'_>) -> Option<&Registration> {
        let previous = self.by_session(old).filter(|r| r.identity == new.identity)?.clone();
        let endpoint = Arc::clone(self.by_endpoint.get_key_value(previous.endpoint.as_str())?.0);
        let registration = Registration { session: Some(new.session), peer: new.peer, ..previous.clone() };
        self.replace(registration, previous);
        self.by_endpoint.get(&endpoint).map(|r| &**r)
    }

    /// Takes back a change that could not be made durable (its acknowledgement is withheld):
    /// a new registration is removed and the one it replaced put back, an update is
    /// reverted, a de-registered registration returns. Nothing that was acknowledged before
    /// is lost to a failed write. Expiries and refusals stand.
    pub fn undo(&mut self, event: &RegistryEvent) {
        match event {
            RegistryEvent::Registered { registration, replaced } => {
                if self.get(&registration.endpoint).is_some_and(|r| r.id == registration.id) {
                    self.remove(&registration.endpoint);
                }
                if let Some(old) = replaced.as_ref().filter(|old| self.get(&old.endpoint).is_none()) {
                    self.insert((**old).clone());
                }
            }
            RegistryEvent::Updated { registration, previous }
                if self.get(&registration.endpoint).is_some_and(|r| r.id == registration.id) =>
            {
                self.remove(&registration.endpoint);
                self.insert((**previous).clone());
            }
            RegistryEvent::Deregistered { registration } if self.get(&registration.endpoint).is_none() => {
                self.insert(registration.clone());
            }
            _ => {}
        }
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

    /// Puts `registration` in the place of `previous` (the same endpoint and ID) and reports
    /// the update.
    fn replace(&mut self, registration: Registration, previous: Registration) {
        self.remove(&previous.endpoint);
        self.insert(registration.clone());
        self.events.push_back(RegistryEvent::Updated { registration, previous: Box::new(previous) });
    }

    fn insert(&mut self, registration: Registration) {
        let endpoint: Arc<str> = Arc::from(registration.endpoint.as_str());
        self.expiries.insert((registration.expires_at(), Arc::clone(&endpoint)));
        self.by_id.insert(registration.id.as_str().into(), Arc::clone(&endpoint));
        if let Some(session) = registration.session {
            self.by_session.insert(session, Arc::clone(&endpoint));
        }
        self.by_endpoint.insert(endpoint, Box::new(registration));
    }

    fn remove(&mut self, endpoint: &str) -> Option<Registration> {
        let (endpoint, registration) = self.by_endpoint.remove_entry(endpoint)?;
        self.by_id.remove(registration.id.as_str());
        if let Some(session) = registration.session {
            if self.by_session.get(&session).is_some_and(|e| *e == endpoint) {
                self.by_session.remove(&session);
            }
        }
        self.expiries.remove(&(registration.expires_at(), endpoint));
        Some(*registration)
    }
}

/// A request on the registration interface that is refused, and why.
struct Refusal {
    code: ResponseType,
    endpoint: Option<String>,
    reason: String,
}

impl Refusal {
    fn bad_request(endpoint: Option<String>, reason: String) -> Self {
        Self { code: ResponseType::BadRequest, endpoint, reason }
    }
}

/// The links of a Register or Update body (CoRE link format, UTF-8).
fn links(payload: &[u8]) -> Result<Vec<Link>, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "the link-format body is not UTF-8".to_string())?;
    link_format::parse(text).map_err(|err| format!("the link-format body does not parse: {err}"))
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
    lifetime: Option<Lifetime>,
    version: Option<String>,
    binding: Option<Binding>,
}

impl Query {
    /// The query parameters, or what is wrong with them.
    fn parse(request: &Packet) -> Result<Self, String> {
        let mut query = Query::default();
        for item in request.get_option(CoapOption::UriQuery).into_iter().flatten() {
            let item = std::str::from_utf8(item).map_err(|_| "a query parameter is not UTF-8".to_string())?;
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match key {
                "ep" => query.endpoint = Some(value.to_string()),
                "lt" => query.lifetime = Some(value.parse().map_err(|err: LifetimeError| err.to_string())?),
                "lwm2m" => query.version = Some(value.to_string()),
                "b" => {
                    let binding = Binding::parse(value).ok_or_else(|| {
                        let shown: String = value.chars().take(16).collect();
                        format!("binding b={shown:?} is not one of U, UQ, Q")
                    })?;
                    query.binding = Some(binding);
                }
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

    /// A session numbered by its port, from that port.
    fn from(port: u16, identity: &str) -> Origin<'_> {
        Origin { session: SessionHandle(u64::from(port)), peer: peer(port), identity }
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
            from(port, identity),
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
            (Lifetime::from_secs(300).unwrap(), "1.1", Binding::Udp, Some(11543))
        );
        assert_eq!(r.links.to_vec().len(), 3);
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Registered { replaced: None, .. })));

        let update = request(RequestType::Post, &["rd", &id], &["lt=600"], "");
        assert_eq!(
            code(&reg.handle_request(now + Duration::from_secs(10), from(5001, "id-a"), &auth(), &update)),
            ResponseType::Changed
        );
        assert_eq!(reg.get("ep-a").unwrap().lifetime.as_secs(), 600);
        let updated = reg.poll_event().unwrap();
        assert_eq!(updated.moved_from(), Some(peer(5000)));
        assert_eq!(reg.get("ep-a").unwrap().peer, peer(5001), "the update moved the registration (NAT rebinding)");

        let delete = request(RequestType::Delete, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, from(5001, "id-a"), &auth(), &delete)), ResponseType::Deleted);
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Deregistered { .. })));
        assert!(reg.is_empty());
        assert_eq!(code(&reg.handle_request(now, from(5001, "id-a"), &auth(), &delete)), ResponseType::NotFound);
    }

    #[test]
    fn an_identity_can_only_act_for_its_own_endpoint() {
        let now = Instant::now();
        let mut reg = Registry::new(2);
        assert_eq!(code(&register(&mut reg, now, "id-a", "ep-b", 300, 5000)), ResponseType::Forbidden);
        assert_eq!(code(&register(&mut reg, now, "stranger", "ep-a", 300, 5000)), ResponseType::Forbidden);
        let id = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5000));
        let update = request(RequestType::Post, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, from(6000, "id-b"), &auth(), &update)), ResponseType::BadRequest);
        let delete = request(RequestType::Delete, &["rd", &id], &[], "");
        assert_eq!(code(&reg.handle_request(now, from(6000, "id-b"), &auth(), &delete)), ResponseType::BadRequest);
        assert!(reg.get("ep-a").is_some(), "untouched");
        let unknown = request(RequestType::Post, &["rd", "nope"], &[], "");
        assert_eq!(code(&reg.handle_request(now, from(6000, "id-a"), &auth(), &unknown)), ResponseType::NotFound);
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
        reg.handle_request(now + Duration::from_secs(50), from(5000, "id-a"), &auth(), &update);
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
        assert_eq!(code(&reg.handle_request(now, from(5002, "id-a"), &auth(), &stale)), ResponseType::NotFound);
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
                code(&reg.handle_request(now, from(1, "id-a"), &auth(), r)),
                ResponseType::BadRequest,
                "case {i}"
            );
        }
        let mut invalid_utf8 = request(RequestType::Post, &["rd"], &["ep=ep-a"], "");
        invalid_utf8.payload = vec![0xff, 0xfe];
        assert_eq!(code(&reg.handle_request(now, from(1, "id-a"), &auth(), &invalid_utf8)), ResponseType::BadRequest);
        assert!(reg.is_empty());
    }

    #[test]
    fn lifetimes_beyond_the_maximum_are_refused_with_the_reason() {
        let now = Instant::now();
        let mut reg = Registry::new(6);
        for lt in ["18446744073709551615", "9223372036854775807", "4294967296", "99999999999999999999999", "0", "-5"] {
            let register = request(RequestType::Post, &["rd"], &["ep=ep-a", &format!("lt={lt}")], "</1/0>");
            let answer = reg.handle_request(now, from(1, "id-a"), &auth(), &register);
            assert_eq!(code(&answer), ResponseType::BadRequest, "lt={lt}");
            let reason = String::from_utf8(answer.payload).unwrap();
            assert!(reason.contains("1 to 4294967295"), "lt={lt}: {reason}");
            assert!(
                matches!(reg.poll_event(), Some(RegistryEvent::Refused { code: ResponseType::BadRequest, .. })),
                "lt={lt} is reported"
            );
        }
        assert!(reg.is_empty() && reg.poll_timeout().is_none());
        let id = location(&register(&mut reg, now, "id-a", "ep-a", 4_294_967_295, 1));
        assert_eq!(reg.get("ep-a").unwrap().lifetime, Lifetime::MAX, "the maximum itself is taken");
        let update = request(RequestType::Post, &["rd", &id], &["lt=18446744073709551615"], "");
        assert_eq!(code(&reg.handle_request(now, from(1, "id-a"), &auth(), &update)), ResponseType::BadRequest);
        assert_eq!(reg.get("ep-a").unwrap().lifetime, Lifetime::MAX, "a refused update changes nothing");
        reg.handle_timeout(now + Duration::from_secs(1 << 40));
        assert!(reg.get("ep-a").is_none(), "expires, no overflow");
    }

    #[test]
    fn a_registration_follows_only_sessions_of_its_own_identity() {
        let now = Instant::now();
        let mut reg = Registry::new(7);
        let id = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5000));
        assert_eq!(reg.by_session(SessionHandle(5000)).map(|r| r.endpoint.as_str()), Some("ep-a"));
        // Another identity's handshake from the same address takes nothing over.
        assert!(reg
            .session_replaced(SessionHandle(5000), Origin { session: SessionHandle(9), ..from(5000, "id-b") })
            .is_none());
        assert_eq!(reg.get("ep-a").unwrap().session, Some(SessionHandle(5000)));
        // Its own re-handshake does, reported as an update.
        while reg.poll_event().is_some() {}
        let moved =
            reg.session_replaced(SessionHandle(5000), Origin { session: SessionHandle(10), ..from(5000, "id-a") });
        assert_eq!(moved.map(|r| r.session), Some(Some(SessionHandle(10))));
        assert!(matches!(reg.poll_event(), Some(RegistryEvent::Updated { .. })));
        assert!(reg.by_session(SessionHandle(5000)).is_none());
        // A Connection ID move changes the address only.
        reg.session_moved(SessionHandle(10), peer(7000));
        assert_eq!(
            (reg.get("ep-a").unwrap().peer, reg.get("ep-a").unwrap().session),
            (peer(7000), Some(SessionHandle(10)))
        );
        // An Update binds the session it came over.
        let update = request(RequestType::Post, &["rd", &id], &[], "");
        reg.handle_request(now, from(7100, "id-a"), &auth(), &update);
        assert_eq!(reg.by_session(SessionHandle(7100)).map(|r| r.endpoint.as_str()), Some("ep-a"));
        assert!(reg.by_session(SessionHandle(10)).is_none());
    }

    #[test]
    fn undo_puts_back_what_a_failed_write_replaced() {
        let now = Instant::now();
        let mut reg = Registry::new(8);
        let first = location(&register(&mut reg, now, "id-a", "ep-a", 300, 5000));
        while reg.poll_event().is_some() {}
        register(&mut reg, now, "id-a", "ep-a", 600, 5001);
        let registered = reg.poll_event().unwrap();
        reg.undo(&registered);
        assert_eq!(reg.get("ep-a").map(|r| r.id.as_str()), Some(first.as_str()), "the acknowledged one is back");
        assert_eq!(reg.by_session(SessionHandle(5000)).map(|r| r.id.as_str()), Some(first.as_str()));
        let update = request(RequestType::Post, &["rd", &first], &["lt=900"], "");
        reg.handle_request(now, from(5002, "id-a"), &auth(), &update);
        let updated = reg.poll_event().unwrap();
        reg.undo(&updated);
        assert_eq!(reg.get("ep-a").unwrap().lifetime.as_secs(), 300);
        assert_eq!(reg.get("ep-a").unwrap().session, Some(SessionHandle(5000)));
        let delete = request(RequestType::Delete, &["rd", &first], &[], "");
        reg.handle_request(now, from(5000, "id-a"), &auth(), &delete);
        let deregistered = reg.poll_event().unwrap();
        reg.undo(&deregistered);
        assert!(reg.get("ep-a").is_some());
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(300)), "its expiry is back too");
    }
}
