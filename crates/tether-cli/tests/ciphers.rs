//! The cipher suites of `tether serve`: the LwM2M 1.1 AEAD suites by default, a list in
//! tether.toml (the CBC suites of the LwM2M lists only there); each handshakes with the real
//! `openssl s_client`.

mod support;

use std::process::{Command, Stdio};

use support::{Server, KEY};

/// The suite `openssl s_client` negotiated with `server` offering only `suite`, if any.
fn negotiated(server: &Server, suite: &str) -> Option<String> {
    let output = Command::new("openssl")
        .args(["s_client", "-dtls1_2", "-psk_identity", "device-0", "-psk", KEY, "-cipher", suite])
        .args(["-connect", &server.coaps.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.trim_start().starts_with("Cipher    :"))?;
    let name = line.split(':').nth(1)?.trim().to_string();
    (name != "0000").then_some(name)
}

#[test]
fn every_psk_suite_handshakes_by_default_and_tether_toml_narrows_them() {
    let data = std::env::temp_dir().join(format!("tether-ciphers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data.join("a"));
    for suite in ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256", "PSK-AES128-CCM"] {
        assert_eq!(negotiated(&server, suite).as_deref(), Some(suite), "{suite} on defaults");
    }
    drop(server);

    let config = data.join("tether.toml");
    std::fs::write(&config, "ciphers = [\"PSK-AES128-CCM\"]\n").unwrap();
    let server = Server::start_with(&data.join("b"), &["--config", config.to_str().unwrap()]);
    assert_eq!(negotiated(&server, "PSK-AES128-CCM").as_deref(), Some("PSK-AES128-CCM"));
    assert_eq!(negotiated(&server, "PSK-AES128-CCM8"), None, "a suite left out of the list is refused");
    drop(server);

    // The CBC suites of the LwM2M lists are off by default, on when named (by OpenSSL's
    // name or the specification's), and then handshake with s_client (which offers
    // Encrypt-then-MAC, as tether requires for CBC).
    let server = Server::start(&data.join("d"));
    assert_eq!(negotiated(&server, "PSK-AES128-CBC-SHA256"), None, "CBC is off by default");
    drop(server);
    std::fs::write(
        &config,
        "ciphers = [\"PSK-AES128-CCM8\", \"psk-aes128-cbc-sha256\", \"ECDHE-PSK-AES128-CBC-SHA256\"]\n",
    )
    .unwrap();
    let server = Server::start_with(&data.join("e"), &["--config", config.to_str().unwrap()]);
    for suite in ["PSK-AES128-CBC-SHA256", "ECDHE-PSK-AES128-CBC-SHA256", "PSK-AES128-CCM8"] {
        assert_eq!(negotiated(&server, suite).as_deref(), Some(suite), "{suite} when configured");
    }
    drop(server);

    std::fs::write(&config, "ciphers = [\"PSK-AES128-CCM\", \"RC4-MD5\"]\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config", config.to_str().unwrap()])
        .arg("--data-dir")
        .arg(data.join("c"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("unknown cipher suite \"RC4-MD5\""), "{stderr}");
    let _ = std::fs::remove_dir_all(&data);
}
