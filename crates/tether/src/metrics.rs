//! Prometheus text exposition of pool and endpoint statistics.
//!
//! Written by hand: the text format is a few lines per metric, and the figures already live
//! in [`PoolStats`] and [`EndpointStats`]; a metrics registry would hold a second copy of
//! them.

use std::fmt::Write;

use tether_proto::dtls::{DropReason, EndpointStats};
use tether_proto::pool::PoolStats;

/// Renders pool statistics (and endpoint counters, if any) in the Prometheus text format.
pub fn render(pool: &PoolStats, endpoint: Option<&EndpointStats>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let plain = |v: f64| vec![(String::new(), v)];
    metric("tether_pool_sessions", "gauge", "Sessions in the pool.", &plain(pool.sessions as f64));
    metric(
        "tether_pool_sessions_by_state",
        "gauge",
        "Sessions in the pool by state.",
        &[
            ("{state=\"established\"}".into(), pool.established as f64),
            ("{state=\"connecting\"}".into(), pool.connecting as f64),
        ],
    );
    metric("tether_pool_capacity", "gauge", "Most sessions the pool holds.", &plain(pool.capacity as f64));
    metric(
        "tether_pool_handshakes_total",
        "counter",
        "Handshakes the pool's sessions cost.",
        &plain(pool.handshakes_total as f64),
    );
    metric(
        "tether_pool_requests_total",
        "counter",
        "Requests sent over pooled sessions.",
        &plain(pool.requests_total as f64),
    );
    metric("tether_pool_expired_total", "counter", "Sessions closed for idleness.", &plain(pool.expired_total as f64));
    metric("tether_pool_evicted_total", "counter", "Sessions evicted at capacity.", &plain(pool.evicted_total as f64));
    metric(
        "tether_pool_closed_total",
        "counter",
        "Sessions removed for other reasons.",
        &plain(pool.closed_total as f64),
    );
    let (bytes_in, bytes_out) = pool.per_session.iter().fold((0, 0), |(i, o), s| (i + s.bytes_in, o + s.bytes_out));
    metric(
        "tether_pool_bytes",
        "gauge",
        "Application bytes carried by the sessions now pooled.",
        &[("{direction=\"in\"}".into(), bytes_in as f64), ("{direction=\"out\"}".into(), bytes_out as f64)],
    );
    if let Some(e) = endpoint {
        metric(
            "tether_dtls_datagrams_received_total",
            "counter",
            "Datagrams handed to the endpoint.",
            &plain(e.datagrams_received as f64),
        );
        metric(
            "tether_dtls_hello_verify_requests_total",
            "counter",
            "HelloVerifyRequests sent.",
            &plain(e.hello_verify_requests_sent as f64),
        );
        metric(
            "tether_dtls_handshakes_completed_total",
            "counter",
            "Handshakes completed.",
            &plain(e.handshakes_completed as f64),
        );
        metric(
            "tether_dtls_handshakes_resumed_total",
            "counter",
            "Completed handshakes that resumed a session.",
            &plain(e.handshakes_resumed as f64),
        );
        metric(
            "tether_dtls_handshakes_failed_total",
            "counter",
            "Handshakes failed or timed out.",
            &plain(e.handshakes_failed as f64),
        );
        metric(
            "tether_dtls_sessions_replaced_total",
            "counter",
            "Sessions replaced by a re-handshake from the same address.",
            &plain(e.sessions_replaced as f64),
        );
        metric(
            "tether_dtls_migrations_total",
            "counter",
            "Sessions that followed their peer to a new address by Connection ID.",
            &plain(e.migrations as f64),
        );
        metric(
            "tether_dtls_sessions_restored_total",
            "counter",
            "Sessions restored from the session store at start, with no handshake.",
            &plain(e.sessions_restored as f64),
        );
        let drops: Vec<(String, f64)> =
            DropReason::ALL.iter().map(|r| (format!("{{reason=\"{}\"}}", r.name()), e.dropped(*r) as f64)).collect();
        metric("tether_dtls_datagrams_dropped_total", "counter", "Datagrams dropped, by reason.", &drops);
    }
    out
}
