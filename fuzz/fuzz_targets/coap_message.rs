//! Any datagram into a CoAP message layer: never panics; whatever it emits re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use tether_coap::coap_lite::Packet;
use tether_coap::message::{CoapConfig, CoapEvent, MessageLayer};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::from_bytes(data) {
        let _ = packet.to_bytes();
    }
    let now = Instant::now();
    let mut layer = MessageLayer::new(CoapConfig::default(), 1);
    // Feed the input whole, then as several datagrams split at its first byte's value.
    layer.handle_datagram(now, data);
    let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    layer.handle_datagram(now, &data[..cut]);
    layer.handle_datagram(now, &data[cut..]);
    while let Some(event) = layer.poll_event() {
        if let CoapEvent::Request { id, request } = event {
            let _ = layer.respond(now, &id, request);
        }
    }
    layer.handle_timeout(now + Duration::from_secs(300));
    while layer.poll_transmit().is_some() {}
});
