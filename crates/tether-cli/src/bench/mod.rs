//! `tether bench`: the project's figures, each printed beside a baseline measured in the
//! same run.

pub mod dtls;
pub mod pool;

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

/// Prints figures as an aligned table.
pub fn print_table(title: &str, figures: &[Figure]) {
    println!("{title}");
    println!(
        "{:<34} {:>14} {:<10} {:<34} {:>14} {:>8}",
        "figure", "value", "unit", "baseline (same run)", "baseline", "ratio"
    );
    for f in figures {
        println!(
            "{:<34} {:>14.1} {:<10} {:<34} {:>14.1} {:>7.2}x",
            f.name, f.value, f.unit, f.baseline, f.baseline_value, f.ratio
        );
        if !f.detail.is_empty() {
            println!("    {}", f.detail);
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
