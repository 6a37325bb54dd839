//! libcoap's `coap-client-openssl` (a real CoAP/DTLS peer, Debian libcoap3-bin) registers
//! with `tether serve` over PSK DTLS.

mod support;

use std::process::Command;

use support::{http, Server};

fn coap_client(args: &[&str]) -> String {
    let output = Command::new("coap-client-openssl")
        .args(args)
        .output()
        .expect("coap-client-openssl is installed (.ci/run installs libcoap3-bin)");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test]
async fn libcoap_registers_over_psk_dtls_and_is_refused_another_endpoint() {
    let data = std::env::temp_dir().join(format!("tether-libcoap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let base = format!("coaps://{}", server.coaps);
    let links = r#"</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>"#;
    let register = format!("{base}/rd?ep=urn:dev:0&lt=300&lwm2m=1.1&b=U");
    let out = coap_client(&[
        "-v",
        "6",
        "-B",
        "10",
        "-m",
        "post",
        "-k",
        "secretPSK",
        "-u",
        "device-0",
        "-t",
        "40",
        "-e",
        links,
        &register,
    ]);
    assert!(out.contains("c:2.01") && out.contains("Location-Path:rd"), "libcoap output:\n{out}");
    let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200);
    assert_eq!(clients[0]["endpoint"], "urn:dev:0");
    assert_eq!(clients[0]["objects"], links);

    // device-0 may not register as urn:dev:1.
    let other = format!("{base}/rd?ep=urn:dev:1&lt=300");
    let out = coap_client(&[
        "-B",
        "10",
        "-m",
        "post",
        "-k",
        "secretPSK",
        "-u",
        "device-0",
        "-t",
        "40",
        "-e",
        "</3/0>",
        &other,
    ]);
    assert!(out.contains("4.03"), "libcoap output:\n{out}");
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(clients.as_array().unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(&data);
}
