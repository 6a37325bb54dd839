//! Any text as a CoRE link-format document: parses or errors; what parses re-parses equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_coap::link_format;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(links) = link_format::parse(text) {
        let again = link_format::parse(&link_format::format(&links));
        assert!(again.is_ok(), "formatted links must parse: {text:?}");
    }
});
