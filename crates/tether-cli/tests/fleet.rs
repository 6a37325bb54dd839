//! `tether device --count 1000` against `tether serve`, both real processes on 127.0.0.1.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use support::{http, Server, KEY};

const FLEET: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_1000_registers_and_every_device_answers_a_rest_read() {
    let data = std::env::temp_dir().join(format!("tether-fleet-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let security = data.join("fleet.toml");
    let fleet_args = ["--count", "1000", "--endpoint", "fleet", "--psk-identity", "fleet", "--psk-key", KEY];
    let written = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("device")
        .args(fleet_args)
        .arg("--write-security")
        .arg(&security)
        .status()
        .unwrap();
    assert!(written.success());
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);

    let mut devices = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("device")
        .args(fleet_args)
        .args(["--server", &format!("coaps://{}", server.coaps), "--duration", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = devices.stdout.take().unwrap();
    let (tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            let _ = tx.send(line);
        }
    });

    // Every device registers.
    let started = Instant::now();
    loop {
        let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
        assert_eq!(status, 200);
        if clients.as_array().unwrap().len() == FLEET {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{} registered", clients.as_array().unwrap().len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every device answers a read of /3/0/0 through the REST API, over its own session.
    for i in 0..FLEET {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/fleet-{i}/3/0/0"), None).await;
        assert_eq!(status, 200, "fleet-{i}: {read}");
        assert_eq!(read["values"]["/3/0/0"].as_str(), Some("tether"), "fleet-{i}: {read}");
    }
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["sessions"].as_u64(), Some(FLEET as u64), "{pool}");
    assert_eq!(pool["handshakes_total"].as_u64(), Some(FLEET as u64), "one handshake per device: {pool}");

    // SIGTERM: the fleet de-registers and prints its summary.
    let status = Command::new("kill").args(["-TERM", &devices.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = devices.wait().unwrap();
    assert!(exit.success(), "{exit}");
    let output: Vec<String> = lines.try_iter().collect();
    assert!(output.iter().any(|l| l.starts_with("tether device: 1000/1000 registered in")), "{output:?}");
    assert!(output.iter().any(|l| l.trim() == "handshakes             1000"), "{output:?}");
    assert!(output.iter().any(|l| l.trim() == "requests answered      1000"), "{output:?}");
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients.as_array().unwrap().len(), 0, "every device de-registered");
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

/// SIGKILL of `tether serve` under a running fleet, then a restart on the same port and data:
/// every registration is restored from SQLite, and every device is back on a session of the
/// new process by its next Update (it re-handshakes first after 5 s of silence, as behind a
/// NAT), so REST reads reach all of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_and_restart_the_fleet_is_reachable_again() {
    const DEVICES: usize = 200;
    let data = std::env::temp_dir().join(format!("tether-fleet-kill-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let security = data.join("fleet.toml");
    let count = DEVICES.to_string();
    let fleet_args = ["--count", &count, "--endpoint", "k", "--psk-identity", "k", "--psk-key", KEY];
    let written = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("device")
        .args(fleet_args)
        .arg("--write-security")
        .arg(&security)
        .status()
        .unwrap();
    assert!(written.success());
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);
    let coaps = server.coaps.to_string();
    let mut devices = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("device")
        .args(fleet_args)
        .args(["--server", &format!("coaps://{coaps}"), "--duration", "300", "--lifetime", "20"])
        .args(["--nat-timeout", "5", "--retry-timer", "1", "--jitter"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
        if clients.as_array().unwrap().len() == DEVICES {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    server.sigkill();
    let server = Server::start_on(&coaps, &data, &["--security", security.to_str().unwrap()]);
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients.as_array().unwrap().len(), DEVICES, "every acknowledged registration restored");
    let restarted = Instant::now();
    loop {
        let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
        if pool["sessions"].as_u64() == Some(DEVICES as u64) {
            break;
        }
        // Updates are due 10 s after registering (lifetime 20 s); each comes after a new
        // handshake because the device has been silent for more than 5 s.
        assert!(restarted.elapsed() < Duration::from_secs(40), "{pool}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..DEVICES {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/k-{i}/3/0/0"), None).await;
        assert_eq!(status, 200, "k-{i}: {read}");
    }
    let _ = devices.kill();
    let _ = devices.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn bad_device_flags_are_named() {
    for (args, expected) in [
        (vec!["--count", "0"], "--count must be between 1 and 100000"),
        (vec!["--server", "http://x"], "expected coaps://HOST:PORT"),
        (vec!["--server", "coaps://nohost:5684"], "HOST:PORT with HOST an IP address"),
        (vec!["--psk-key", "zz", "--duration", "1"], "--psk-key"),
        (vec!["--retry-count", "0"], "--retry-count and --sequence-retry-count must be at least 1"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tether")).arg("device").args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
