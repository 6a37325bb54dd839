//! 100,000 ClientHellos without cookies from distinct spoofed addresses: no session, no
//! retained allocation, and a legitimate client completes its handshake meanwhile.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant and drive real sockets")]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use support::endpoint::addr;
use support::*;
use tether_proto::dtls::{Endpoint, EndpointConfig, Session};

/// Counts bytes currently allocated by the whole test binary.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY (test-only allocator): forwards every call to the system allocator unchanged and
// only counts sizes.
#[allow(unsafe_code, reason = "a counting global allocator for the test")]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FLOOD: u32 = 100_000;

#[test]
fn a_cookieless_flood_creates_no_state_and_a_legitimate_client_gets_through() {
    let now = Instant::now();
    let mut ep = Endpoint::new(psk_server(fast_session()), EndpointConfig::new([9; 32]), now).unwrap();
    // A genuine ClientHello to replay from spoofed sources.
    let hello = Session::client(&psk_client(fast_session()), now).unwrap().poll_transmit().unwrap().contents;
    let legit_addr = addr(FLOOD + 1);
    let mut legit = Session::client(&psk_client(fast_session()), now).unwrap();

    // Warm up the endpoint's buffers, then measure.
    ep.handle(now, addr(0), &hello);
    while ep.poll_transmit().is_some() {}
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let heap_before = c_heap_in_use();
    let mut peak = 0i64;
    for i in 1..=FLOOD {
        ep.handle(now, addr(i), &hello);
        let hvr = ep.poll_transmit().expect("each ClientHello is answered");
        assert!(hvr.contents.len() < hello.len(), "no amplification");
        drop(hvr);
        peak = peak.max(LIVE_BYTES.load(Ordering::Relaxed) - before);
        if i % 10_000 == 0 {
            // The legitimate client advances one flight per 10,000 spoofed datagrams.
            while let Some(t) = legit.poll_transmit() {
                ep.handle(now, legit_addr, &t.contents);
            }
            while let Some(t) = ep.poll_transmit() {
                assert_eq!(t.destination, legit_addr);
                legit.handle_datagram(now, &t.contents);
            }
        }
    }
    assert!(legit.is_established(), "the legitimate client completed its handshake during the flood");
    let stats = ep.stats();
    assert_eq!(stats.sessions_created, 1, "only the legitimate client");
    assert_eq!(ep.session_count(), 1);
    assert_eq!(ep.peer_count(), 1);
    assert!(stats.hello_verify_requests_sent >= u64::from(FLOOD));
    // Zero per-peer allocations: beyond the one legitimate session, the flood left nothing
    // behind. 100,000 peers at even one byte each would be 100 kB.
    let retained = LIVE_BYTES.load(Ordering::Relaxed) - before;
    println!("flood: {FLOOD} spoofed ClientHellos, retained {retained} bytes (one real session included), peak {peak}");
    assert!(retained < 64 * 1024, "retained {retained} bytes");
    // The same over the whole malloc heap, OpenSSL's allocations included: one established
    // session costs 33-45 KiB, 100,000 of anything would cost megabytes.
    let heap_retained = c_heap_in_use() - heap_before;
    println!("flood: malloc heap grew by {heap_retained} bytes");
    assert!(heap_retained < 256 * 1024, "malloc heap grew by {heap_retained} bytes");
}

/// Bytes in use on the malloc heap (glibc `mallinfo2`), Rust's and OpenSSL's alike.
fn c_heap_in_use() -> i64 {
    #[allow(unsafe_code, reason = "mallinfo2 reads allocator statistics")]
    // SAFETY: mallinfo2 takes no arguments and returns a struct by value.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks as i64
}
