//! LwM2M bootstrap against the real binaries: `tether device --bootstrap` asks `tether
//! bootstrap` over DTLS (its bootstrap PSK), is given the LwM2M server, its PSK and lifetime,
//! and registers there; an identity asking for another endpoint is refused, and says so.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use support::{http, wait_registered, Server, KEY};

/// The bootstrap PSK of `bs-0` (bound to `urn:dev:0`).
const BOOTSTRAP_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A `tether bootstrap` this test started, killed by its PID when dropped.
struct Bootstrap {
    child: Child,
    coaps: SocketAddr,
    lines: std_mpsc::Receiver<String>,
}

impl Bootstrap {
    fn start(security: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["bootstrap", "--coaps", "127.0.0.1:0", "--security"])
            .arg(security)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("tether binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut coaps = None;
        while coaps.is_none() {
            let line = lines.recv_timeout(Duration::from_secs(30)).expect("tether bootstrap prints its address");
            coaps = line.strip_prefix("tether bootstrap: CoAPs (DTLS 1.2) on udp ").and_then(|a| a.trim().parse().ok());
        }
        Self { child, coaps: coaps.unwrap(), lines }
    }

    /// Waits for a line containing `text`.
    fn expect_line(&self, text: &str) -> String {
        loop {
            let line =
                self.lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn device(bootstrap: SocketAddr, identity: &str, key: &str, endpoint: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(["device", "--bootstrap", &format!("coaps://{bootstrap}"), "--psk-identity", identity, "--psk-key", key])
        .args(["--endpoint", endpoint, "--retry-count", "1"]);
    command
}

#[tokio::test]
async fn a_device_bootstraps_then_registers_with_the_server_it_was_given() {
    let data = std::env::temp_dir().join(format!("tether-bootstrap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data.join("server"));
    let security = data.join("bootstrap.toml");
    let mut file = std::fs::File::create(&security).unwrap();
    write!(
        file,
        r#"
[[psk]]
identity = "bs-0"
key = "{BOOTSTRAP_KEY}"
endpoint = "urn:dev:0"

[[bootstrap]]
endpoint = "urn:dev:0"
server_uri = "coaps://{}"
psk_identity = "device-0"
psk_key = "{KEY}"
lifetime = 120
"#,
        server.coaps
    )
    .unwrap();
    drop(file);
    let bootstrap = Bootstrap::start(&security);

    // Bootstrapped, then registered with the server's PSK and the lifetime it was given.
    let registering = device(bootstrap.coaps, "bs-0", BOOTSTRAP_KEY, "urn:dev:0")
        .args(["--duration", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    bootstrap.expect_line("urn:dev:0");
    wait_registered(&server, 1, Duration::from_secs(15)).await;
    let (_, client) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert_eq!(client["identity"], "psk:device-0", "{client}");
    assert_eq!(client["lifetime_s"], 120, "{client}");
    let (status, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3/0/0", None).await;
    assert_eq!((status, read["values"]["/3/0/0"].as_str()), (200, Some("tether")), "{read}");
    let _ = Command::new("kill").args(["-INT", &registering.id().to_string()]).status();
    let output = registering.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("bootstrapped from"), "{stdout}");
    assert!(!stdout.contains(KEY), "no key is printed: {stdout}");

    // The bootstrap identity of urn:dev:0 may not bootstrap urn:dev:1: refused, and the
    // device says so and exits 1.
    let refused = device(bootstrap.coaps, "bs-0", BOOTSTRAP_KEY, "urn:dev:1").output().unwrap();
    let stdout = String::from_utf8_lossy(&refused.stdout);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("refused endpoint \"urn:dev:1\" (4.03)"), "{stdout}");
    bootstrap.expect_line("urn:dev:1");
    // A wrong bootstrap key: the handshake fails, and the device names it.
    let wrong = device(bootstrap.coaps, "bs-0", "00112233445566778899aabbccddeeff", "urn:dev:0").output().unwrap();
    let stdout = String::from_utf8_lossy(&wrong.stdout);
    assert_eq!(wrong.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("does not know identity \"bs-0\" with this key"), "{stdout}");

    drop(bootstrap);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
