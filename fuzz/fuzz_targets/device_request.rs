//! Any CoAP request from a server into a device's objects (Read, Write, Execute, Discover,
//! Write-Attributes, Observe, composite operations): an answer, never a panic; and the
//! device's values stay readable afterwards (a written clock, lifetime or timer cannot
//! overflow anything later).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use tether_coap::coap_lite::Packet;
use tether_coap::content::{format, Path};
use tether_coap::device::objects::{answer, Observed};
use tether_coap::device::{DeviceInfo, Objects, RetryTimers, SecurityMode};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Packet::from_bytes(data) else { return };
    let now = Instant::now();
    let info = DeviceInfo::simulated("fuzz");
    let mut objects = Objects::new(
        info,
        "coaps://127.0.0.1".into(),
        SecurityMode::PreSharedKey,
        Duration::from_secs(300),
        RetryTimers::default(),
        now,
        1_700_000_000,
    );
    let first = answer(&mut objects, now, &request, format::SENML_CBOR);
    let _ = first.response.to_bytes();
    // Whatever it changed, reads and observations of everything go on, later too.
    let later = now + Duration::from_secs(1 << 20);
    for path in ["/1/0", "/3/0", "/5/0", "/3303/0"] {
        let observed = Observed::Path(Path::parse(path).unwrap());
        let _ = observed.read(&objects, later, format::SENML_JSON);
        let _ = objects.discover(&Path::parse(path).unwrap());
    }
    objects.reboot(later);
    let _ = answer(&mut objects, later, &request, format::TLV);
});
