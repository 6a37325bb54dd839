//! `tether demo` and `tether bench lwm2m` run end to end as the README shows them.

use std::process::Command;

#[test]
fn the_demo_shows_one_handshake_per_device_however_many_reads_follow() {
    let output =
        Command::new(env!("CARGO_BIN_EXE_tether")).args(["demo", "--rounds", "4", "--samples", "5"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let reads: Vec<&str> = stdout.lines().filter(|l| l.contains(" READ ")).collect();
    assert_eq!(reads.len(), 4 * 3 * 3);
    assert!(
        reads.iter().all(|l| l.contains("reused session: yes") && l.ends_with("(handshakes so far: 3)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("36 reads of 3 devices: 36 reused their device's session; 3 handshakes in all"),
        "{stdout}"
    );
    assert!(stdout.contains("handshakes : requests (reads above)        3 : 36"), "{stdout}");
    assert!(stdout.contains("read needing a new handshake p50 / p99"), "{stdout}");
    assert!(stdout.contains("READ /3/0/0  -> \"tether\""), "{stdout}");
}

#[test]
fn bench_lwm2m_reports_every_figure_beside_its_baseline() {
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["bench", "lwm2m", "--devices", "20", "--seconds", "1", "--concurrency", "4", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let figures: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = figures.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "pooled reads/s (20 devices)",
            "read latency p50, pooled",
            "read latency p99, pooled",
            "server CPU per pooled read",
            "registrations/s",
            "server heap per registered device",
        ]
    );
    let pooled = &figures[0];
    assert!(pooled["value"].as_f64().unwrap() > 0.0 && pooled["baseline_value"].as_f64().unwrap() > 0.0, "{pooled}");
    assert!(pooled["detail"].as_str().unwrap().contains("0 of them resumed"), "{pooled}");
    let memory = &figures[5];
    assert!(memory["value"].as_f64().unwrap() > 0.0, "{memory}");
    assert!(
        memory["baseline_value"].as_f64().unwrap() > memory["value"].as_f64().unwrap(),
        "an OpenSSL-held session (the baseline, measured in the same run) costs far more than a device: {memory}"
    );
}
