//! Any datagram as a request to the LwM2M registration interface: a response, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tether_coap::coap_lite::Packet;
use tether_coap::registration::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Packet::from_bytes(data) else { return };
    let now = Instant::now();
    let mut registry = Registry::new(1);
    let authorizer: HashMap<String, String> = [("id".to_string(), "ep".to_string())].into_iter().collect();
    let peer = "127.0.0.1:5683".parse().unwrap();
    let response = registry.handle_request(now, peer, "id", &authorizer, &request);
    let _ = response.to_bytes();
    let _ = registry.handle_request(now, peer, "id", &authorizer, &request);
    registry.handle_timeout(now + Duration::from_secs(1 << 20));
    while registry.poll_event().is_some() {}
});
