//! The LwM2M client (device) state machine against the sans-IO server side (message layer +
//! registry), on virtual time.
#![allow(clippy::disallowed_methods, reason = "the test picks the origin of virtual time")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_coap::coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};
use tether_coap::content::{self, format, Path, Value};
use tether_coap::device::{Action, ClientConfig, DeviceEvent, Lwm2mClient, RetryTimers};
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer, Token};
use tether_coap::packet;
use tether_coap::registration::{Origin, Registry, RegistryEvent};
use tether_proto::dtls::SessionHandle;
use tether_proto::resilience::Jitter;

const PEER: &str = "127.0.0.1:40000";
const UNIX_BOOT: i64 = 1_790_000_000;

/// A device wired to a server message layer and registry with instant, lossless delivery,
/// unless the server is down.
struct Harness {
    t0: Instant,
    now: Instant,
    client: Lwm2mClient,
    server: MessageLayer,
    registry: Registry,
    authorizer: HashMap<String, String>,
    up: bool,
    connected: bool,
    connects: Vec<Duration>,
    events: Vec<(Duration, DeviceEvent)>,
    registry_events: Vec<RegistryEvent>,
    responses: HashMap<Token, Packet>,
    notifications: Vec<Packet>,
    /// Every action, with the datagrams sent before it.
    log: Vec<String>,
}

fn config(endpoint: &str) -> ClientConfig {
    let mut config = ClientConfig::new(endpoint, "coaps://127.0.0.1:5684");
    config.seed = 7;
    config
}

impl Harness {
    fn new(config: ClientConfig) -> Self {
        let t0 = Instant::now();
        let endpoint = config.endpoint.clone();
        let mut harness = Self {
            t0,
            now: t0,
            client: Lwm2mClient::new(config, t0, UNIX_BOOT).unwrap(),
            server: MessageLayer::new(CoapConfig::default(), 1),
            registry: Registry::new(3),
            authorizer: HashMap::from([(format!("psk:{endpoint}"), endpoint)]),
            up: true,
            connected: false,
            connects: Vec::new(),
            events: Vec::new(),
            registry_events: Vec::new(),
            responses: HashMap::new(),
            notifications: Vec::new(),
            log: Vec::new(),
        };
        harness.client.start(t0);
        harness.client.handle_timeout(t0);
        harness.settle();
        harness
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Delivers everything until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(datagram) = self.client.poll_transmit() {
                moved = true;
                self.log.push("datagram".into());
                if self.up && self.connected {
                    self.server.handle_datagram(self.now, &datagram);
                }
            }
            while let Some(event) = self.server.poll_event() {
                moved = true;
                match event {
                    CoapEvent::Request { id, request } => {
                        let peer: SocketAddr = PEER.parse().unwrap();
                        let identity = format!("psk:{}", self.client.endpoint());
                        let origin = Origin { session: SessionHandle(1), peer, identity: &identity };
                        let answer = self.registry.handle_request(self.now, origin, &self.authorizer, &request);
                        self.server.respond(self.now, &id, answer).unwrap();
                    }
                    CoapEvent::Response { token, response } => {
                        self.responses.insert(token, response);
                    }
                    CoapEvent::Notification { response, .. } => self.notifications.push(response),
                    _ => {}
                }
            }
            while let Some(event) = self.registry.poll_event() {
                self.registry_events.push(event);
            }
            while let Some(datagram) = self.server.poll_transmit() {
                moved = true;
                if self.up && self.connected {
                    self.client.handle_datagram(self.now, &datagram);
                }
            }
            if moved {
                continue;
            }
            // Actions only once every datagram before them went out, as drivers must.
            if let Some(action) = self.client.poll_action() {
                moved = true;
                self.log.push(format!("{action:?}"));
                match action {
                    Action::Connect if self.up => {
                        self.connected = true;
                        self.connects.push(self.elapsed());
                        self.server = MessageLayer::new(CoapConfig::default(), self.connects.len() as u64);
                        self.client.handle_connected(self.now);
                    }
                    Action::Connect => self.client.handle_connect_failed(self.now, "connection refused"),
                    Action::Disconnect | Action::Abandon => self.connected = false,
                }
            }
            while let Some(event) = self.client.poll_event() {
                moved = true;
                self.events.push((self.elapsed(), event));
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs timers until `until` (from start).
    fn run_until(&mut self, until: Duration) {
        let end = self.t0 + until;
        loop {
            let next = [self.client.poll_timeout(), self.server.poll_timeout(), self.registry.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= end => {
                    self.now = self.now.max(at);
                    self.client.handle_timeout(self.now);
                    self.server.handle_timeout(self.now);
                    self.registry.handle_timeout(self.now);
                    self.settle();
                }
                _ => {
                    self.now = end;
                    return;
                }
            }
        }
    }

    /// Sends a request from the server and returns the device's answer.
    fn request(&mut self, request: Packet) -> Packet {
        let token = self.server.request(self.now, request, true, false).unwrap();
        self.settle();
        self.responses.remove(&token).expect("the device answered")
    }

    fn events_named(&self, name: &str) -> Vec<Duration> {
        self.events.iter().filter(|(_, e)| format!("{e:?}").starts_with(name)).map(|(t, _)| *t).collect()
    }
}

fn get(path: &str, accept: Option<u16>) -> Packet {
    let mut packet = request(RequestType::Get, path);
    if let Some(accept) = accept {
        packet.add_option(CoapOption::Accept, uint(accept));
    }
    packet
}

fn request(method: RequestType, path: &str) -> Packet {
    packet::request(method, path, None, Vec::new())
}

fn uint(value: u16) -> Vec<u8> {
    packet::encode_uint(u32::from(value))
}

fn code(packet: &Packet) -> ResponseType {
    match packet.header.code {
        MessageClass::Response(code) => code,
        other => panic!("not a response: {other:?}"),
    }
}

fn content_format(packet: &Packet) -> u16 {
    packet.get_first_option(CoapOption::ContentFormat).and_then(|v| packet::decode_uint(v)).unwrap_or(0)
}

#[test]
fn registers_with_its_objects_and_updates_before_the_lifetime_runs_out() {
    let mut h = Harness::new(config("dev-1"));
    let registration = h.registry.get("dev-1").expect("registered").clone();
    assert_eq!(registration.lifetime.as_secs(), 300);
    let links: Vec<String> = registration.links.to_vec().iter().map(|l| l.target.clone()).collect();
    assert!(links.contains(&"/1/0".to_string()) && links.contains(&"/3/0".to_string()), "{links:?}");
    assert!(!links.iter().any(|l| l.starts_with("/0")), "the Security object is never registered: {links:?}");
    assert_eq!(registration.content_format, Some(format::SENML_CBOR));
    assert!(matches!(&h.events[0].1, DeviceEvent::Registered { location } if location.starts_with("/rd/")));

    // Lifetime 300 s: an Update leaves 93 s (MAX_TRANSMIT_WAIT) of headroom: at 207 s.
    h.run_until(Duration::from_secs(1000));
    assert_eq!(h.events_named("Updated"), [207, 414, 621, 828].map(Duration::from_secs));
    assert!(h.registry.get("dev-1").is_some(), "never expired");
    assert_eq!(h.connects.len(), 1, "one handshake for the whole time");
}

#[test]
fn an_update_answered_after_a_retransmission_is_sent_once() {
    let mut h = Harness::new(config("dev-1"));
    h.run_until(Duration::from_secs(206));
    // The Update at 207 s is lost; its retransmission (2–3 s later) gets through.
    h.up = false;
    h.run_until(Duration::from_secs(208));
    h.up = true;
    h.run_until(Duration::from_secs(220));
    let updates = h.registry_events.iter().filter(|e| matches!(e, RegistryEvent::Updated { .. })).count();
    assert_eq!(updates, 1);
    assert_eq!(h.events_named("Updated").len(), 1);
    h.run_until(Duration::from_secs(420));
    assert_eq!(h.events_named("Updated").len(), 2, "the next one a lifetime's worth later");
}

#[test]
fn retries_follow_the_server_object_timers_then_give_up() {
    let mut config = config("dev-1");
    config.retry = RetryTimers {
        retry_count: 5,
        retry_timer: Duration::from_secs(60),
        sequence_delay: Duration::from_secs(3600),
        sequence_retry_count: 2,
    };
    let t0 = Instant::now();
    let mut client = Lwm2mClient::new(config, t0, UNIX_BOOT).unwrap();
    client.start(t0);
    let mut attempts = Vec::new();
    let mut delays = Vec::new();
    while let Some(at) = client.poll_timeout() {
        let now = at;
        client.handle_timeout(now);
        while let Some(action) = client.poll_action() {
            assert_eq!(action, Action::Connect);
            attempts.push((now - t0).as_secs());
            client.handle_connect_failed(now, "refused");
        }
        while let Some(event) = client.poll_event() {
            if let DeviceEvent::AttemptFailed { retry_in, .. } = event {
                delays.push(retry_in.as_secs());
            }
        }
        if attempts.len() > 20 {
            break;
        }
    }
    // Retry timer 60 s doubling within a sequence of 5; 1 h between the 2 sequences.
    assert_eq!(delays, [60, 120, 240, 480, 3600, 60, 120, 240, 480, 0]);
    assert_eq!(attempts, [0, 60, 180, 420, 900, 4500, 4560, 4680, 4920, 5400]);
    assert!(client.poll_timeout().is_none(), "gave up: nothing more scheduled");
}

#[test]
fn a_refused_port_is_retried_soon_without_using_up_the_schedule() {
    let mut config = config("dev-1");
    config.retry = RetryTimers {
        retry_count: 2,
        retry_timer: Duration::from_secs(60),
        sequence_delay: Duration::from_secs(3600),
        sequence_retry_count: 1,
    };
    let t0 = Instant::now();
    let mut client = Lwm2mClient::new(config, t0, UNIX_BOOT).unwrap();
    client.start(t0);
    let mut delays = Vec::new();
    let mut gave_up = false;
    while let Some(now) = client.poll_timeout() {
        client.handle_timeout(now);
        while let Some(action) = client.poll_action() {
            assert_eq!(action, Action::Connect);
            client.handle_connect_refused(now, "port unreachable");
        }
        while let Some(event) = client.poll_event() {
            match event {
                DeviceEvent::AttemptFailed { retry_in, attempt, .. } => delays.push((attempt, retry_in.as_secs())),
                DeviceEvent::GaveUp { .. } => gave_up = true,
                _ => {}
            }
        }
        assert!(delays.len() < 30, "{delays:?}");
    }
    // 1, 2, 4 … 32 s while below the Retry Timer (60 s), all on attempt 1; then the
    // schedule's own: attempt 1 fails (60 s), attempt 2 fails: given up.
    assert_eq!(delays, [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (1, 32), (1, 60), (2, 0)]);
    assert!(gave_up);
}

#[test]
fn a_server_that_closed_the_session_is_reconnected_within_seconds_even_with_jitter() {
    for seed in 0..20 {
        let mut config = config("dev-1");
        config.seed = seed;
        config.jitter = Jitter::Full;
        let mut h = Harness::new(config);
        h.run_until(Duration::from_secs(5));
        assert_eq!(h.events_named("Registered").len(), 1);
        let lost_at = h.now;
        h.client.handle_disconnected(h.now);
        let Some(next) = h.client.poll_timeout() else { panic!("no reconnect scheduled") };
        assert!(next - lost_at <= Duration::from_secs(5), "seed {seed}: reconnect after {:?}", next - lost_at);
    }
}

#[test]
fn jitter_spreads_retries_below_the_formula() {
    let mut spread = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let mut config = config("dev-1");
        config.seed = seed;
        config.jitter = Jitter::Full;
        config.retry.retry_timer = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut client = Lwm2mClient::new(config, t0, UNIX_BOOT).unwrap();
        client.start(t0);
        client.handle_timeout(t0);
        assert_eq!(client.poll_action(), Some(Action::Connect));
        client.handle_connect_failed(t0, "refused");
        let Some(DeviceEvent::AttemptFailed { retry_in, .. }) = client.poll_event() else { panic!("no failure") };
        assert!(retry_in <= Duration::from_secs(10));
        spread.insert(retry_in.as_millis());
    }
    assert!(spread.len() > 40, "50 devices, {} distinct delays", spread.len());
}

#[test]
fn with_jitter_updates_of_devices_registered_together_spread_out_and_never_come_late() {
    let mut first_updates = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let mut config = config("dev-1");
        config.seed = seed;
        config.jitter = Jitter::Full;
        let mut h = Harness::new(config);
        h.run_until(Duration::from_secs(300));
        let updated = h.events_named("Updated");
        let first = updated[0];
        // 300 s lifetime, 93 s headroom: due at 207 s, up to 46.5 s earlier with jitter.
        assert!(first <= Duration::from_secs(207) && first >= Duration::from_millis(160_500), "{first:?}");
        first_updates.insert(first.as_secs());
    }
    assert!(first_updates.len() > 25, "50 devices updated in {} distinct seconds", first_updates.len());
}

#[test]
fn an_update_the_server_no_longer_knows_registers_anew() {
    let mut h = Harness::new(config("dev-1"));
    let first = h.registry.get("dev-1").unwrap().id.clone();
    // The server restarts without its registrations.
    h.registry = Registry::new(99);
    h.run_until(Duration::from_secs(210));
    let second = h.registry.get("dev-1").expect("registered again").id.clone();
    assert_ne!(first, second);
    assert_eq!(h.events_named("Registered").len(), 2);
}

#[test]
fn a_silent_server_is_retried_on_a_new_session() {
    let mut config = config("dev-1");
    config.retry.retry_timer = Duration::from_secs(10);
    let mut h = Harness::new(config);
    h.up = false;
    h.run_until(Duration::from_secs(207 + 93 + 30));
    // The Update timed out (MAX_TRANSMIT_WAIT), the session was dropped and retried.
    let failed = h.events_named("AttemptFailed");
    assert!(!failed.is_empty());
    assert!(failed[0] >= Duration::from_secs(207 + 62) && failed[0] <= Duration::from_secs(207 + 93), "{failed:?}");
    h.up = true;
    h.run_until(Duration::from_secs(207 + 93 + 200));
    assert!(h.client.is_registered());
    assert!(h.connects.len() >= 2, "a new handshake after the silence");
}

#[test]
fn rehandshakes_after_nat_idle_before_sending() {
    let mut config = config("dev-1");
    config.rehandshake_after_idle = Some(Duration::from_secs(40));
    let mut h = Harness::new(config);
    h.run_until(Duration::from_secs(208));
    assert_eq!(h.events_named("Rehandshaking"), [Duration::from_secs(207)]);
    assert_eq!(h.connects, [Duration::ZERO, Duration::from_secs(207)]);
    assert_eq!(h.events_named("Updated"), [Duration::from_secs(207)]);
    let actions: Vec<&String> = h.log.iter().filter(|l| *l != "datagram").collect();
    assert_eq!(actions, ["Connect", "Disconnect", "Connect"]);
}

#[test]
fn answers_reads_in_every_format_with_the_same_values() {
    let mut h = Harness::new(config("dev-1"));
    h.run_until(Duration::from_secs(30));
    let base = Path::parse("/3/0").unwrap();
    let mut decoded = Vec::new();
    for format in [format::TLV, format::SENML_JSON, format::SENML_CBOR] {
        let answer = h.request(get("/3/0", Some(format)));
        assert_eq!(code(&answer), ResponseType::Content);
        assert_eq!(content_format(&answer), format);
        decoded.push(content::decode(format, &base, &answer.payload).unwrap());
    }
    assert_eq!(decoded[0], decoded[1]);
    assert_eq!(decoded[1], decoded[2]);
    let value = |path: &str| {
        let path = Path::parse(path).unwrap();
        decoded[0].iter().find(|e| e.path == path).map(|e| e.value.clone())
    };
    assert_eq!(value("/3/0/0"), Some(Value::String("tether".into())));
    assert_eq!(value("/3/0/13"), Some(Value::Time(UNIX_BOOT + 30)), "the clock advances");
    assert_eq!(value("/3/0/11/0"), Some(Value::Integer(0)));
    assert!(value("/3/0/4").is_none(), "executable resources are not read");

    // One resource: text by default, any asked format otherwise.
    let text = h.request(get("/3/0/0", None));
    assert_eq!((content_format(&text), text.payload.as_slice()), (format::TEXT, b"tether".as_slice()));
    let one = h.request(get("/3/0/9", Some(format::SENML_CBOR)));
    let entries = content::decode(format::SENML_CBOR, &Path::parse("/3/0/9").unwrap(), &one.payload).unwrap();
    assert_eq!(entries[0].value, Value::Integer(100));
    // Without Accept, several values come in the registered format.
    let default = h.request(get("/1/0", None));
    assert_eq!(content_format(&default), format::SENML_CBOR);
    // Text cannot carry an instance.
    assert_eq!(code(&h.request(get("/3/0", Some(format::TEXT)))), ResponseType::NotAcceptable);
    assert_eq!(code(&h.request(get("/3/0/99", None))), ResponseType::NotFound);
    assert_eq!(code(&h.request(get("/4/0", None))), ResponseType::NotFound);
}

#[test]
fn the_security_object_is_closed_to_the_server() {
    let mut h = Harness::new(config("dev-1"));
    for method in [RequestType::Get, RequestType::Put, RequestType::Post, RequestType::Delete] {
        let mut packet = request(method, "/0/0");
        if method == RequestType::Put {
            packet.add_option(CoapOption::ContentFormat, uint(format::TEXT));
            packet.payload = b"x".to_vec();
        }
        assert_eq!(code(&h.request(packet)), ResponseType::Unauthorized, "{method:?}");
    }
    assert_eq!(code(&h.request(get("/0", Some(format::LINK)))), ResponseType::Unauthorized);
}

#[test]
fn writes_executes_and_discovers() {
    let mut h = Harness::new(config("dev-1"));
    // Writing the lifetime (TLV) triggers an Update carrying it.
    let mut write = request(RequestType::Put, "/1/0/1");
    write.add_option(CoapOption::ContentFormat, uint(format::TLV));
    let entries = [content::Entry { path: Path::parse("/1/0/1").unwrap(), value: Value::Integer(600) }];
    write.payload = content::encode(format::TLV, &Path::parse("/1/0/1").unwrap(), &entries).unwrap();
    assert_eq!(code(&h.request(write)), ResponseType::Changed);
    h.run_until(Duration::from_secs(1));
    assert_eq!(h.registry.get("dev-1").unwrap().lifetime.as_secs(), 600);
    assert_eq!(h.events_named("Updated").len(), 1);

    // Read-only resources refuse writes, whole or nothing.
    let mut bad = request(RequestType::Put, "/3/0/0");
    bad.add_option(CoapOption::ContentFormat, uint(format::TEXT));
    bad.payload = b"evil".to_vec();
    assert_eq!(code(&h.request(bad)), ResponseType::MethodNotAllowed);
    let mut garbage = request(RequestType::Put, "/3/0/13");
    garbage.add_option(CoapOption::ContentFormat, uint(format::TLV));
    garbage.payload = vec![0xff, 0xff];
    assert_eq!(code(&h.request(garbage)), ResponseType::BadRequest);

    // Execute on a readable resource is refused; Registration Update Trigger updates.
    assert_eq!(code(&h.request(request(RequestType::Post, "/3/0/0"))), ResponseType::MethodNotAllowed);
    assert_eq!(code(&h.request(request(RequestType::Post, "/1/0/8"))), ResponseType::Changed);
    h.run_until(Duration::from_secs(2));
    assert_eq!(h.events_named("Updated").len(), 2);

    // Write-Attributes, then Discover shows them.
    let mut attributes = request(RequestType::Put, "/3/0/9");
    attributes.add_option(CoapOption::UriQuery, b"pmin=10".to_vec());
    attributes.add_option(CoapOption::UriQuery, b"pmax=60".to_vec());
    assert_eq!(code(&h.request(attributes)), ResponseType::Changed);
    let discover = h.request(get("/3/0", Some(format::LINK)));
    let links = String::from_utf8(discover.payload).unwrap();
    assert!(links.starts_with("</3/0>,</3/0/0>,"), "{links}");
    assert!(links.contains("</3/0/9>;pmin=10;pmax=60"), "{links}");
    assert!(links.contains("</3/0/7>;dim=2"), "{links}");
    let mut inverted = request(RequestType::Put, "/3/0/9");
    inverted.add_option(CoapOption::UriQuery, b"pmin=60".to_vec());
    inverted.add_option(CoapOption::UriQuery, b"pmax=10".to_vec());
    assert_eq!(code(&h.request(inverted)), ResponseType::BadRequest);
}

#[test]
fn reboot_answers_first_then_reconnects_and_registers_anew() {
    let mut h = Harness::new(config("dev-1"));
    let first = h.client.location().unwrap().to_string();
    h.log.clear();
    assert_eq!(code(&h.request(request(RequestType::Post, "/3/0/4"))), ResponseType::Changed);
    assert_eq!(h.log, ["datagram", "Abandon"], "the 2.04 leaves before the device goes dark");
    h.run_until(Duration::from_secs(2));
    assert_eq!(h.connects.len(), 2);
    assert_ne!(h.client.location().unwrap(), first);
    assert_eq!(h.events_named("Rebooting").len(), 1);
}

#[test]
fn observed_values_are_notified_on_change_within_pmin_and_pmax() {
    let mut h = Harness::new(config("dev-1"));
    let mut observe = get("/3/0/13", None);
    observe.set_observe_value(0);
    let token = h.server.request(h.now, observe, true, true).unwrap();
    h.settle();
    let first = h.responses.remove(&token).unwrap();
    assert!(first.get_observe_value().is_some());
    h.run_until(Duration::from_secs(5));
    // The clock resource changes every second.
    assert_eq!(h.notifications.len(), 5);
    let times: Vec<String> = h.notifications.iter().map(|n| String::from_utf8_lossy(&n.payload).into_owned()).collect();
    assert_eq!(times[4], (UNIX_BOOT + 5).to_string());

    // The manufacturer never changes: only pmax makes it notify.
    let mut attributes = request(RequestType::Put, "/3/0/0");
    attributes.add_option(CoapOption::UriQuery, b"pmax=20".to_vec());
    h.request(attributes);
    let mut observe = get("/3/0/0", None);
    observe.set_observe_value(0);
    let token = h.server.request(h.now, observe, true, true).unwrap();
    h.settle();
    h.responses.remove(&token).unwrap();
    h.notifications.clear();
    h.server.cancel(Token(0)); // unrelated token: nothing changes
    h.run_until(Duration::from_secs(46));
    let manufacturer: Vec<_> = h.notifications.iter().filter(|n| n.payload == b"tether").collect();
    assert_eq!(manufacturer.len(), 2, "pmax 20 s over 41 s");
}

#[test]
fn garbage_from_the_server_never_panics_or_unregisters() {
    let mut h = Harness::new(config("dev-1"));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 64) as usize;
        let mut datagram: Vec<u8> = (0..len).map(|k| (seed >> (k % 8 * 8)) as u8 ^ k as u8).collect();
        if i % 2 == 0 && datagram.len() >= 4 {
            datagram[0] = 0x40 | (datagram[0] & 0x0f).min(8); // version 1, CON
        }
        h.client.handle_datagram(h.now, &datagram);
    }
    h.settle();
    assert!(h.client.is_registered());
    h.run_until(Duration::from_secs(210));
    assert_eq!(h.events_named("Updated").len(), 1);
}

/// A Write of `value` (text) to `path`.
fn write_text(path: &str, value: &str) -> Packet {
    let mut write = request(RequestType::Put, path);
    write.add_option(CoapOption::ContentFormat, uint(format::TEXT));
    write.payload = value.as_bytes().to_vec();
    write
}

#[test]
fn values_out_of_range_are_refused_with_4_00_and_change_nothing() {
    let mut h = Harness::new(config("dev-1"));
    for (path, value) in [
        ("/1/0/1", "0"),
        ("/1/0/1", "-5"),
        ("/1/0/1", "9223372036854775807"),
        ("/1/0/1", "4294967296"),
        ("/1/0/2", "-1"),
        ("/1/0/17", "0"),
        ("/1/0/18", "18446744073709551615"),
        ("/1/0/19", "9223372036854775807"),
        ("/3/0/13", "9223372036854775807"),
        ("/3/0/13", "-9223372036854775808"),
    ] {
        assert_eq!(code(&h.request(write_text(path, value))), ResponseType::BadRequest, "{path} = {value}");
    }
    h.run_until(Duration::from_secs(1));
    assert!(h.events_named("Updated").is_empty(), "no refused lifetime reached the server");
    assert_eq!(h.registry.get("dev-1").unwrap().lifetime.as_secs(), 300);
    let lifetime = h.request(get("/1/0/1", Some(format::TEXT)));
    assert_eq!(lifetime.payload, b"300");
    // The largest lifetime and clock are taken, and the clock goes on from there.
    assert_eq!(code(&h.request(write_text("/1/0/1", "4294967295"))), ResponseType::Changed);
    assert_eq!(code(&h.request(write_text("/3/0/13", "253402300799"))), ResponseType::Changed);
    h.run_until(Duration::from_secs(3));
    assert_eq!(h.registry.get("dev-1").unwrap().lifetime.as_secs(), 4_294_967_295);
    let clock: i64 = String::from_utf8(h.request(get("/3/0/13", Some(format::TEXT))).payload).unwrap().parse().unwrap();
    assert!((253_402_300_799..253_402_300_810).contains(&clock), "{clock}");
}

#[test]
fn attributes_that_are_not_finite_or_in_range_are_refused() {
    let mut h = Harness::new(config("dev-1"));
    for item in
        ["gt=-1e400", "gt=NaN", "gt=inf", "lt=-inf", "pmin=1e300", "pmin=-1", "pmax=NaN", "st=-1", "pmin=x", "zz=1"]
    {
        let mut attributes = request(RequestType::Put, "/3/0/9");
        attributes.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
        assert_eq!(code(&h.request(attributes)), ResponseType::BadRequest, "{item}");
    }
    let mut fine = request(RequestType::Put, "/3/0/9");
    for item in ["gt=-1", "lt=-40.5", "st=0.5", "pmin=0.5", "pmax=4294967295"] {
        fine.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
    }
    assert_eq!(code(&h.request(fine)), ResponseType::Changed);
    let links = String::from_utf8(h.request(get("/3/0/9", Some(format::LINK))).payload).unwrap();
    assert!(links.contains("pmin=0.5;pmax=4294967295;gt=-1;lt=-40.5;st=0.5"), "{links}");
    assert!(h.client.is_registered());
}
