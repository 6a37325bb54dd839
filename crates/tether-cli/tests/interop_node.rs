//! node-dtls-client (npm; PSK only, no Extended Master Secret, aborts on a PSK identity hint)
//! completes a handshake with `tether serve` on its defaults. `.ci/run` installs it under
//! target/interop-node.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{http, Server};

fn node_modules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/interop-node/node_modules")
}

#[tokio::test]
async fn node_dtls_client_handshakes_with_the_server_defaults() {
    let modules = node_modules();
    assert!(
        modules.join("node-dtls-client").exists(),
        "node-dtls-client missing: run `bash .ci/run`, which installs it"
    );
    let data = std::env::temp_dir().join(format!("tether-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/node_dtls_handshake.js");
    let output = Command::new("node")
        .arg(script)
        .args(["127.0.0.1", &server.coaps.port().to_string(), "device-0", "secretPSK"])
        .env("NODE_PATH", &modules)
        .output()
        .expect("node is installed (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("connected"),
        "node: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(pool["dtls"]["handshakes_completed"].as_u64(), Some(1), "{pool}");
    assert_eq!(pool["dtls"]["handshakes_failed"].as_u64(), Some(0));
    let _ = std::fs::remove_dir_all(&data);
}
