//! LwM2M 1.1 against the real binaries: a `tether device` with a Temperature object (3303)
//! Sends its values; the server keeps them and shows them typed and named in REST; a Send
//! from a session that did not register is refused.

mod support;

use std::time::{Duration, Instant};

use support::{device_0, http, wait_registered, Server, KEY};
use tether::lwm2m::build;
use tether::DtlsClient;
use tether_coap::coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
use tether_coap::content::{self, format, Entry, Path, Value};
use tether_proto::dtls::{ClientConfig, DtlsContext, PskKey};

#[tokio::test]
async fn a_device_sends_its_temperature_and_rest_shows_it_named() {
    let data = std::env::temp_dir().join(format!("tether-lwm2m-11-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let mut device = device_0(&server, &["--send-interval", "0.5", "--duration", "60"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    let (_, client) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert!(client["objects"].as_str().unwrap().contains("</3303/0>"), "{client}");

    // Send: the latest values, typed and named.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let (status, sent) = http(server.http, "GET", "/api/clients/urn:dev:0/sent", None).await;
        assert_eq!(status, 200, "{sent}");
        if sent["values"]["/3303/0/5700"].is_f64() || Instant::now() > deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let temperature = sent["values"]["/3303/0/5700"].as_f64().expect("a sent temperature");
    assert!((18.0..=24.0).contains(&temperature), "{sent}");
    assert!(sent["values"]["/3/0/9"].is_i64(), "battery level sent too: {sent}");
    let named = sent["resources"].as_array().unwrap().iter().find(|r| r["path"] == "/3303/0/5700").unwrap();
    assert_eq!((named["name"].as_str(), named["units"].as_str()), (Some("Sensor Value"), Some("Cel")));

    // The Temperature object reads typed and named in TLV and SenML alike.
    for format in ["tlv", "senml-json", "senml-cbor"] {
        let (status, read) =
            http(server.http, "GET", &format!("/api/clients/urn:dev:0/3303/0?format={format}"), None).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["object"], "Temperature", "{format}: {read}");
        assert!(read["values"]["/3303/0/5700"].is_f64(), "{format}: {read}");
        assert_eq!(read["values"]["/3303/0/5701"], "Cel", "{format}: {read}");
    }
    let (status, _) = http(server.http, "POST", "/api/clients/urn:dev:0/3303/0/5605", Some("")).await;
    assert_eq!(status, 200, "Reset Min and Max executes");
    let (status, _) =
        http(server.http, "PUT", "/api/clients/urn:dev:0/3303/0/5750", Some(r#"{"value": "greenhouse"}"#)).await;
    assert_eq!(status, 200);
    let (_, read) = http(server.http, "GET", "/api/clients/urn:dev:0/3303/0/5750", None).await;
    assert_eq!(read["values"]["/3303/0/5750"], "greenhouse");

    // Read-Composite: several resources of several objects in one FETCH; a path the device
    // lacks is left out, none at all is 4.04.
    for format in ["senml-cbor", "senml-json"] {
        let body = r#"{"paths": ["/3/0/0", "/3303/0/5700", "/3/0/9", "/4/0/0"]}"#;
        let (status, read) =
            http(server.http, "POST", &format!("/api/clients/urn:dev:0/composite?format={format}"), Some(body)).await;
        assert_eq!(status, 200, "{format}: {read}");
        assert_eq!(read["values"]["/3/0/0"], "tether", "{format}: {read}");
        assert!(read["values"]["/3303/0/5700"].is_f64(), "{format}: {read}");
        assert!(read["values"]["/3/0/9"].is_i64(), "{format}: {read}");
        assert!(read["values"].get("/4/0/0").is_none());
        let names: Vec<&str> =
            read["resources"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(names, ["Manufacturer", "Battery Level", "Sensor Value"], "numeric order: {read}");
    }
    let (status, read) =
        http(server.http, "POST", "/api/clients/urn:dev:0/composite", Some(r#"{"paths": ["/4/0/0"]}"#)).await;
    assert_eq!((status, read["coap_code"].as_str()), (404, Some("4.04")), "{read}");
    let (status, _) = http(server.http, "POST", "/api/clients/urn:dev:0/composite", Some(r#"{"paths": []}"#)).await;
    assert_eq!(status, 400);

    // A Send over a session that registered nothing: 4.03, nothing kept.
    let context = DtlsContext::client(ClientConfig::psk("device-1", PskKey::from_hex(KEY).unwrap())).unwrap();
    let intruder = DtlsClient::connect(server.coaps, &context).await.unwrap();
    let entries = [Entry { path: Path::parse("/3303/0/5700").unwrap(), value: Value::Float(99.0) }];
    let payload = content::encode(format::SENML_CBOR, &Path::parse("/3303").unwrap(), &entries).unwrap();
    let mut send = build(RequestType::Post, "/dp", Some(format::SENML_CBOR), payload);
    send.header.set_type(MessageType::Confirmable);
    send.header.message_id = 1;
    send.set_token(vec![9]);
    intruder.send(&send.to_bytes().unwrap()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), intruder.recv()).await.unwrap().unwrap();
    assert_eq!(Packet::from_bytes(&answer).unwrap().header.code, MessageClass::Response(ResponseType::Forbidden));
    let (status, _) = http(server.http, "GET", "/api/clients/urn:dev:1/sent", None).await;
    assert_eq!(status, 404);

    let _ = device.kill();
    let _ = device.wait();
    let _ = std::fs::remove_dir_all(&data);
}

/// A package in `tether device`'s format: `tether-firmware <name> <version> sha256=<hex>`,
/// then the image.
fn firmware_package(version: &str, image: &str) -> String {
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(image.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!("tether-firmware demo {version} sha256={hash}\n{image}")
}

/// Polls `GET path` until `done` holds for its body (or `within` passes, then fails).
async fn poll(
    server: &Server,
    path: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, body) = http(server.http, "GET", path, None).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never became as expected: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn composite_writes_and_observations_and_a_firmware_update_run_against_a_device() {
    let data = std::env::temp_dir().join(format!("tether-lwm2m-11-fw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let mut device = device_0(&server, &["--duration", "90"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    let ep = "/api/clients/urn:dev:0";

    // Write-Composite: two objects in one iPATCH, in both SenML formats.
    for (format, offset) in [("senml-cbor", "+02:00"), ("senml-json", "+03:00")] {
        let body = format!(r#"{{"values": {{"/3/0/14": "{offset}", "/3303/0/5750": "cellar-{format}"}}}}"#);
        let (status, answer) = http(server.http, "PUT", &format!("{ep}/composite?format={format}"), Some(&body)).await;
        assert_eq!((status, answer["coap_code"].as_str()), (200, Some("2.04")), "{format}: {answer}");
        let paths = r#"{"paths": ["/3/0/14", "/3303/0/5750"]}"#;
        let (_, read) = http(server.http, "POST", &format!("{ep}/composite"), Some(paths)).await;
        assert_eq!(read["values"]["/3/0/14"], offset, "{read}");
        assert_eq!(read["values"]["/3303/0/5750"], format!("cellar-{format}"), "{read}");
    }
    // All or nothing: the device refuses one value (4.05 for /1/0/5), so none is written.
    let body = r#"{"values": {"/3/0/14": "+09:00", "/1/0/5": 30}}"#;
    let (status, answer) = http(server.http, "PUT", &format!("{ep}/composite"), Some(body)).await;
    assert_eq!((status, answer["coap_code"].as_str()), (405, Some("4.05")), "{answer}");
    let (_, read) = http(server.http, "GET", &format!("{ep}/3/0/14"), None).await;
    assert_eq!(read["values"]["/3/0/14"], "+03:00", "nothing of a refused composite write applies: {read}");
    // Checked against the models before anything is sent.
    let (status, answer) =
        http(server.http, "PUT", &format!("{ep}/composite"), Some(r#"{"values": {"/1/0/1": "soon"}}"#)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("Integer"), "{answer}");
    let (status, _) = http(server.http, "PUT", &format!("{ep}/composite"), Some(r#"{"values": {}}"#)).await;
    assert_eq!(status, 400);

    // Observe-Composite: one observation of two objects' resources; a change of either
    // arrives as a notification carrying both.
    let paths = r#"{"paths": ["/3/0/14", "/3303/0/5750"]}"#;
    let (status, first) = http(server.http, "POST", &format!("{ep}/composite/observe"), Some(paths)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["values"]["/3/0/14"], "+03:00", "{first}");
    let id = first["observation"].as_u64().expect("an observation id");
    let (status, _) = http(server.http, "PUT", &format!("{ep}/3/0/14"), Some(r#"{"value": "+05:00"}"#)).await;
    assert_eq!(status, 200);
    let notified = poll(&server, &format!("/api/observations/{id}"), Duration::from_secs(10), |body| {
        body["notifications"].as_array().is_some_and(|n| !n.is_empty())
    })
    .await;
    let notification = &notified["notifications"][0];
    assert_eq!(notification["values"]["/3/0/14"], "+05:00", "{notified}");
    assert!(notification["values"]["/3303/0/5750"].is_string(), "both paths in each notification: {notified}");
    let (status, _) = http(server.http, "DELETE", &format!("/api/observations/{id}"), None).await;
    assert_eq!(status, 200);

    // Firmware update: the object is idle, push only.
    let (status, firmware) = http(server.http, "GET", &format!("{ep}/firmware"), None).await;
    assert_eq!(status, 200, "{firmware}");
    assert_eq!((firmware["state_name"].as_str(), firmware["delivery_method"].as_str()), (Some("Idle"), Some("push")));
    let factory = firmware["firmware_version"].as_str().unwrap().to_string();
    // A corrupted package (5 blocks) is refused by the device's integrity check.
    let image: String = (0..5000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut corrupted = firmware_package("2.0.0", &image);
    corrupted.pop();
    corrupted.push('!');
    let (status, pushed) = http(server.http, "POST", &format!("{ep}/firmware"), Some(&corrupted)).await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(
        (pushed["state"].as_i64(), pushed["result"].as_i64()),
        (Some(0), Some(5)),
        "integrity failure: {pushed}"
    );
    let (status, refused) = http(server.http, "POST", &format!("{ep}/firmware?update=true"), Some(&corrupted)).await;
    assert_eq!(status, 409, "no Update without a package: {refused}");
    // A good one: downloaded, then Update; the device installs it, reboots and registers anew.
    let package = firmware_package("2.0.0", &image);
    let (status, pushed) = http(server.http, "POST", &format!("{ep}/firmware?update=true"), Some(&package)).await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(pushed["state_name"], "Downloaded", "{pushed}");
    assert_eq!((pushed["package_name"].as_str(), pushed["package_version"].as_str()), (Some("demo"), Some("2.0.0")));
    assert_eq!(pushed["bytes"].as_u64(), Some(package.len() as u64));
    let updated =
        poll(&server, &format!("{ep}/firmware"), Duration::from_secs(30), |body| body["firmware_version"] == "2.0.0")
            .await;
    assert_ne!(factory, "2.0.0");
    assert_eq!((updated["state_name"].as_str(), updated["result"].as_i64()), (Some("Idle"), Some(1)), "{updated}");
    assert_eq!(updated["result_name"], "Firmware updated successfully");

    let _ = device.kill();
    let _ = device.wait();
    let _ = std::fs::remove_dir_all(&data);
}
