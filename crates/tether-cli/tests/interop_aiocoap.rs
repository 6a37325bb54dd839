//! aiocoap with tinydtls (PyPI `aiocoap[all]` + `DTLSSocket`; offers only PSK-AES128-CCM8,
//! like constrained devices) registers with `tether serve` over DTLS.

mod support;

use std::process::Command;

use support::{http, Server};

#[tokio::test]
async fn aiocoap_with_tinydtls_registers_over_ccm8() {
    let data = std::env::temp_dir().join(format!("tether-aiocoap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data);
    let credentials = data.join("credentials.json");
    let pattern = format!("coaps://{}/*", server.coaps);
    let json = serde_json::json!({ pattern: { "dtls": { "psk": { "ascii": "secretPSK" }, "client-identity": { "ascii": "device-3" } } } });
    std::fs::write(&credentials, json.to_string()).unwrap();
    let uri = format!("coaps://{}/rd?ep=urn:dev:3&lt=300&lwm2m=1.1", server.coaps);
    // Installed by .ci/run in a virtual environment under target/ (see PEERS.md).
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/interop-python/bin/aiocoap-client");
    let client = if std::path::Path::new(venv).exists() { venv } else { "aiocoap-client" };
    let output = Command::new(client)
        .arg("--credentials")
        .arg(&credentials)
        .args([
            "-m",
            "POST",
            "--content-format",
            "application/link-format",
            "--payload",
            "</>;rt=\"oma.lwm2m\",</3/0>",
            &uri,
            "-v",
        ])
        .output()
        .expect("aiocoap-client is installed (.ci/run installs aiocoap[all] and DTLSSocket)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("2.01 Created"), "aiocoap output:\n{text}");
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients[0]["endpoint"], "urn:dev:3", "{clients}");
    let _ = std::fs::remove_dir_all(&data);
}
