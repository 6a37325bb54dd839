//! Any datagram as a request to the LwM2M registration interface: a response, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tether_coap::coap_lite::Packet;
use tether_coap::registration::{Origin, Registry};
use tether_proto::dtls::SessionHandle;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Packet::from_bytes(data) else { return };
    let now = Instant::now();
    let mut registry = Registry::new(1);
    let authorizer: HashMap<String, String> = [("id".to_string(), "ep".to_string())].into_iter().collect();
    let origin = Origin { session: SessionHandle(1), peer: "127.0.0.1:5683".parse().unwrap(), identity: "id" };
    let response = registry.handle_request(now, origin, &authorizer, &request);
    let _ = response.to_bytes();
    let _ = registry.handle_request(now, Origin { session: SessionHandle(2), ..origin }, &authorizer, &request);
    registry.session_moved(SessionHandle(2), "127.0.0.1:5999".parse().unwrap());
    // Every change can be taken back (a failed store write) without a panic.
    let events: Vec<_> = std::iter::from_fn(|| registry.poll_event()).collect();
    for event in events.iter().rev() {
        registry.undo(event);
    }
    registry.handle_timeout(now + Duration::from_secs(1 << 20));
    registry.handle_timeout(now + Duration::from_secs(1 << 33));
    while registry.poll_event().is_some() {}
});
