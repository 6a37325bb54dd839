//! `tether bench`: the project's figures, each printed beside a baseline measured in the
//! same run.

pub mod dtls;
pub mod lwm2m;
pub mod openssl_baseline;
pub mod pool;
pub mod restart;
pub mod scale;

use serde::Serialize;

/// One measured figure and the baseline it is read against.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The baseline's name, measured in the same run.
    pub baseline: String,
    /// The baseline's value, in the same unit.
    pub baseline_value: f64,
    /// value / baseline_value.
    pub ratio: f64,
    /// Extra detail (latency percentiles, counts).
    pub detail: String,
}

impl Figure {
    /// A figure with its baseline; the ratio is computed.
    pub fn new(
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        baseline: impl Into<String>,
        baseline_value: f64,
        detail: impl Into<String>,
    ) -> Self {
        let ratio = if baseline_value > 0.0 { value / baseline_value } else { f64::NAN };
        Self { name: name.into(), value, unit, baseline: baseline.into(), baseline_value, ratio, detail: detail.into() }
    }
}

impl Figure {
    /// A figure with no baseline that means anything beside it.
    pub fn alone(name: impl Into<String>, value: f64, unit: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            baseline: "-".into(),
            baseline_value: f64::NAN,
            ratio: f64::NAN,
            detail: detail.into(),
        }
    }
}

/// Bytes of the heap in live allocations (glibc's `mallinfo2()`: every chunk in use, its
/// header included, in every arena, plus the large allocations glibc maps on their own). Unlike RSS it does not depend on how the
/// freed memory of short-lived objects (OpenSSL's handshake state) lies between live ones.
pub fn heap_in_use_bytes() -> f64 {
    // SAFETY: mallinfo2 only reads glibc's allocator statistics and returns them by value.
    #[allow(unsafe_code, reason = "the one libc call the allocator figures need")]
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as f64
}

/// Resident set size of this process, in bytes, after the allocator has returned the
/// memory it holds free (glibc keeps what short-lived objects, such as OpenSSL's 40 KiB of
/// handshake state, freed; `malloc_trim` gives it back): what the live objects cost.
pub fn live_rss_bytes() -> anyhow::Result<f64> {
    // SAFETY: malloc_trim only walks glibc's own heaps; it takes and returns no pointers.
    #[allow(unsafe_code, reason = "the one libc call the allocator figures need")]
    unsafe {
        libc::malloc_trim(0);
    }
    rss_bytes()
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> anyhow::Result<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: f64 = statm.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("statm"))?.parse()?;
    Ok(pages * 4096.0)
}

/// CPU time (user + system) this process has used, in seconds (clock-tick resolution).
pub fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| anyhow::anyhow!("stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .zip(fields.get(12))
        .map_or(Ok(0.0), |(u, s)| Ok::<f64, std::num::ParseFloatError>(u.parse::<f64>()? + s.parse::<f64>()?))?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// Prints figures as an aligned table.
pub fn print_table(title: &str, figures: &[Figure]) {
    say!("{title}");
    say!(
        "{:<34} {:>14} {:<10} {:<34} {:>14} {:>8}",
        "figure",
        "value",
        "unit",
        "baseline (same run)",
        "baseline",
        "ratio"
    );
    for f in figures {
        if f.baseline_value.is_nan() {
            say!("{:<34} {:>14.1} {:<10} {:<34} {:>14} {:>8}", f.name, f.value, f.unit, f.baseline, "-", "-");
        } else {
            say!(
                "{:<34} {:>14.1} {:<10} {:<34} {:>14.1} {:>7.2}x",
                f.name,
                f.value,
                f.unit,
                f.baseline,
                f.baseline_value,
                f.ratio
            );
        }
        if !f.detail.is_empty() {
            say!("    {}", f.detail);
        }
    }
}

/// Latency percentiles of a sample, in microseconds.
pub fn percentiles_us(samples: &mut [std::time::Duration]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// A server endpoint's limits for a benchmark: every client of a benchmark presents one
/// identity from one address, and what is measured is the engine's capacity, not the
/// admission policy against floods (which `tether serve` keeps).
pub fn capacity_limits(config: tether_proto::dtls::EndpointConfig) -> tether_proto::dtls::EndpointConfig {
    config.max_sessions_per_identity(1_000_000).handshakes_per_source(1_000_000, 1_000_000).reserved_handshakes(0)
}
