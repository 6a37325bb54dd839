//! `tether serve` with a security file carrying X.509 settings: a client certificate's CN is
//! the one endpoint name it may register; PSK devices keep working on the same server.

#[path = "../../tether/tests/support/device.rs"]
mod device;
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::Server;
use tether::DtlsClient;
use tether_coap::coap_lite::ResponseType;
use tether_proto::dtls::pki::{CertificateAuthority, Validity};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey, SessionConfig};
use tokio::sync::mpsc;

async fn register(client: DtlsClient, endpoint: &'static str) -> ResponseType {
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(device::device(client, endpoint, "x", tx));
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap().0
}

#[tokio::test]
async fn certificate_cn_is_the_endpoint_name() {
    let data = std::env::temp_dir().join(format!("tether-x509-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let validity = Validity::days_around(now, 7);
    let mut ca = CertificateAuthority::generate("tether test ca", validity).unwrap();
    let server_cert = ca.issue("localhost", validity).unwrap();
    let device_cert = ca.issue("urn:dev:x", validity).unwrap();
    std::fs::write(data.join("server.pem"), server_cert.chain[0].to_pem().unwrap()).unwrap();
    std::fs::write(data.join("server.key"), server_cert.key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    std::fs::write(data.join("ca.pem"), ca.certificate.to_pem().unwrap()).unwrap();
    let security = data.join("security.toml");
    std::fs::write(
        &security,
        "[x509]\ncertificate = \"server.pem\"\nprivate_key = \"server.key\"\nclient_ca = \"ca.pem\"\n\n\
         [[psk]]\nidentity = \"psk-device\"\nkey = \"73656372657450534b\"\nendpoint = \"urn:dev:psk\"\n",
    )
    .unwrap();
    let server = Server::start_with(&data, &["--security", security.to_str().unwrap()]);

    let x509 = |cert| {
        DtlsContext::client(ClientConfig::x509(vec![ca.certificate.clone()]).certificate(cert).server_name("localhost"))
            .unwrap()
    };
    let client = DtlsClient::connect(server.coaps, &x509(device_cert.clone())).await.unwrap();
    assert_eq!(register(client, "urn:dev:x").await, ResponseType::Created);
    let client = DtlsClient::connect(server.coaps, &x509(device_cert)).await.unwrap();
    assert_eq!(register(client, "urn:dev:y").await, ResponseType::Forbidden, "a CN may register only as itself");

    let psk = DtlsContext::client(
        ClientConfig::psk("psk-device", PskKey::from_hex("73656372657450534b").unwrap())
            .session(SessionConfig::default()),
    )
    .unwrap();
    let client = DtlsClient::connect(server.coaps, &psk).await.unwrap();
    assert_eq!(register(client, "urn:dev:psk").await, ResponseType::Created, "PSK devices on the same server");

    // `tether device` with a certificate (CN urn:dev:cli) registers as its CN (no --endpoint),
    // answers a read, leaves.
    let cli_cert = ca.issue("urn:dev:cli", validity).unwrap();
    std::fs::write(data.join("cli.pem"), cli_cert.chain[0].to_pem().unwrap()).unwrap();
    std::fs::write(data.join("cli.key"), cli_cert.key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let device = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["device", "--server", &format!("coaps://{}", server.coaps)])
        .arg("--certificate")
        .arg(data.join("cli.pem"))
        .arg("--private-key")
        .arg(data.join("cli.key"))
        .arg("--server-ca")
        .arg(data.join("ca.pem"))
        .args(["--server-name", "localhost", "--duration", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let read = loop {
        let (status, read) = support::http(server.http, "GET", "/api/clients/urn:dev:cli/3/0/0", None).await;
        if status == 200 || std::time::Instant::now() > deadline {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(read["values"]["/3/0/0"].as_str(), Some("tether"), "{read}");
    let _ = std::process::Command::new("kill").args(["-TERM", &device.id().to_string()]).status();
    let output = device.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("tether device: 1/1 registered in"), "{stdout}");
    let _ = std::fs::remove_dir_all(&data);
}
