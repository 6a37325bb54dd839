//! The real server's log: what an operator needs to see, in JSON lines, never a key.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::KEY;

/// The server process, ended (by its PID) however the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_log_names_failed_handshakes_and_registrations() {
    let data = std::env::temp_dir().join(format!("tether-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut server = Child(
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
            .arg(&data)
            .args(["--psk", &format!("device-0:{KEY}:urn:dev:0")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = server.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next_event = |message: &str| -> Value {
        loop {
            let line = lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no {message:?} line"));
            assert!(!line.contains(KEY), "a key in the log: {line}");
            let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if event["message"] == message {
                return event;
            }
        }
    };
    let started = next_event("tether serve started");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["psk_identities"], 1);
    assert_eq!(started["development_psk"], false);
    let coaps = started["coaps"].as_str().unwrap().to_string();

    let device = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["device", "--server", &format!("coaps://{coaps}"), "--psk-identity", "device-0"])
            .args(["--endpoint", "urn:dev:0", "--retry-count", "1", "--retry-timer", "0.1"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(!device(&["--psk-key", "0011223344"]).success());
    let failed = next_event("handshake failed");
    assert_eq!(failed["level"], "WARN");
    assert!(failed["reason"].as_str().unwrap().contains("keys differ"), "{failed}");
    assert!(failed["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{failed}");

    assert!(device(&["--psk-key", KEY, "--duration", "1"]).success());
    let registered = next_event("registered");
    assert_eq!(registered["endpoint"], "urn:dev:0");
    assert_eq!(registered["identity"], "psk:device-0");
    assert_eq!(registered["lifetime_s"], 300);
    assert_eq!(registered["binding"], "U");
    assert_eq!(registered["objects"], 4, "Server, Device, Firmware Update, Temperature");
    let deregistered = next_event("deregistered");
    assert_eq!(deregistered["endpoint"], "urn:dev:0");

    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
