//! Any payload decoded as SENML_JSON at object, instance and resource level: decodes or errors;
//! what decodes re-encodes and decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_coap::content::{decode, encode, format, Path};

fuzz_target!(|data: &[u8]| {
    for base in ["/3", "/3/0", "/3/0/7", "/1/0", "/0/0/3"] {
        let base = Path::parse(base).unwrap();
        if let Ok(entries) = decode(format::SENML_JSON, &base, data) {
            if let Ok(bytes) = encode(format::SENML_JSON, &base, &entries) {
                let _ = decode(format::SENML_JSON, &base, &bytes);
            }
        }
    }
});
