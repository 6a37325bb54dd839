//! `tether serve` as a real process: REST API, SIGKILL and restart, SIGTERM.

#[path = "../../tether/tests/support/device.rs"]
mod device;
mod support;

use support::{http, Server, DEVICES, KEY};

use std::time::Duration;

use tether::DtlsClient;
use tether_coap::coap_lite::ResponseType;
use tether_proto::dtls::{ClientConfig, CloseReason, DtlsContext, PskKey, SessionConfig};
use tokio::sync::mpsc;

async fn register_devices(server: &Server) -> Vec<DtlsClient> {
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let identity = format!("device-{i}");
        let config = ClientConfig::psk(identity, PskKey::from_hex(KEY).unwrap())
            .session(SessionConfig::default().retransmit(Duration::from_millis(50), Duration::from_millis(400)));
        let context = DtlsContext::client(config).unwrap();
        let client = DtlsClient::connect(server.coaps, &context).await.unwrap();
        handles.push(client);
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_sigkill_restart_and_sigterm() {
    let data = std::env::temp_dir().join(format!("tether-serve-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);

    // Five devices register; each answers reads with its own name.
    let clients = register_devices(&server).await;
    let (tx, mut registered) = mpsc::channel(DEVICES);
    let names: Vec<&'static str> = (0..DEVICES).map(|i| &*Box::leak(format!("urn:dev:{i}").into_boxed_str())).collect();
    for (client, name) in clients.into_iter().zip(&names) {
        tokio::spawn(device::device(client, name, name, tx.clone()));
    }
    for _ in 0..DEVICES {
        let (code, _) = tokio::time::timeout(Duration::from_secs(10), registered.recv()).await.unwrap().unwrap();
        assert_eq!(code, ResponseType::Created);
    }

    let (status, clients) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap()).collect();
    assert_eq!(listed, names);
    let (status, one) = http(server.http, "GET", "/api/clients/urn:dev:3", None).await;
    assert_eq!((status, one["lifetime_s"].as_u64()), (200, Some(300)));

    // Reads of a resource, an instance and an object travel over each device's session.
    for path in ["3/0/0", "3/0", "3"] {
        let (status, read) = http(server.http, "GET", &format!("/api/clients/urn:dev:2/{path}"), None).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!((read["coap_code"].as_str(), read["value"].as_str()), (Some("2.05"), Some("urn:dev:2")));
    }
    let (_, typed) = http(server.http, "GET", "/api/clients/urn:dev:2/3/0/0", None).await;
    assert_eq!(typed["values"]["/3/0/0"], "urn:dev:2", "decoded, typed by the Device object model: {typed}");
    let (status, written) = http(server.http, "PUT", "/api/clients/urn:dev:1/1/0/1", Some(r#"{"value": 600}"#)).await;
    assert_eq!((status, written["coap_code"].as_str()), (200, Some("2.05")), "{written}");
    let (status, executed) = http(server.http, "POST", "/api/clients/urn:dev:1/3/0/4", Some("")).await;
    assert_eq!(status, 200, "{executed}");
    // Discover, Write-Attributes, Create, Delete reach the device (the scripted one answers 2.05).
    for (method, path, body) in [
        ("GET", "/api/clients/urn:dev:1/3/0/discover", None),
        ("PUT", "/api/clients/urn:dev:1/3/0/9/attributes?pmin=10&pmax=60", Some("")),
        ("POST", "/api/clients/urn:dev:1/3303", Some(r#"{"instance": 1, "resources": {"5700": 21.5, "5701": "Cel"}}"#)),
        ("DELETE", "/api/clients/urn:dev:1/3303/1", None),
    ] {
        let (status, body) = http(server.http, method, path, body).await;
        assert_eq!((status, body["coap_code"].as_str()), (200, Some("2.05")), "{method} {path}: {body}");
    }
    let (status, bad) = http(server.http, "PUT", "/api/clients/urn:dev:1/3/0/9/attributes?bogus=1", Some("")).await;
    assert_eq!(status, 400);
    assert!(bad["error"].as_str().unwrap().contains("unknown attribute"), "{bad}");
    let (status, bad) =
        http(server.http, "POST", "/api/clients/urn:dev:1/3303", Some(r#"{"resources": {"x": 1}}"#)).await;
    assert_eq!(status, 400);
    assert!(bad["error"].as_str().unwrap().contains("not a number"), "{bad}");

    // Observe: the first value at once, notifications as they arrive, then cancel.
    let (status, observed) = http(server.http, "POST", "/api/clients/urn:dev:2/3/0/9/observe", Some("")).await;
    assert_eq!((status, observed["value"].as_str()), (200, Some("urn:dev:2")), "{observed}");
    let id = observed["observation"].as_u64().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let notified = loop {
        let (status, batch) = http(server.http, "GET", &format!("/api/observations/{id}"), None).await;
        assert_eq!(status, 200);
        let values = batch["notifications"].as_array().unwrap().clone();
        if !values.is_empty() || tokio::time::Instant::now() > deadline {
            break values;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!notified.is_empty(), "notifications arrived");
    assert!(notified[0]["value"].as_str().unwrap().starts_with("urn:dev:2#"), "{notified:?}");
    let (status, cancelled) = http(server.http, "DELETE", &format!("/api/observations/{id}"), None).await;
    assert_eq!((status, cancelled["cancelled"].as_bool()), (200, Some(true)));

    // Errors are JSON and say what is wrong.
    let (status, missing) = http(server.http, "GET", "/api/clients/urn:nobody/3/0/0", None).await;
    assert_eq!(status, 404);
    assert!(missing["error"].as_str().unwrap().contains("not registered"));
    let (status, bad) = http(server.http, "GET", "/api/clients/urn:dev:1/three/0", None).await;
    assert_eq!(status, 400);
    assert!(bad["error"].as_str().unwrap().contains("not an LwM2M path"));

    // One handshake per device however many requests.
    let (status, pool) = http(server.http, "GET", "/api/pool", None).await;
    assert_eq!(status, 200);
    assert_eq!(pool["sessions"].as_u64(), Some(DEVICES as u64));
    assert_eq!(pool["handshakes_total"].as_u64(), Some(DEVICES as u64));
    assert!(pool["requests_total"].as_u64().unwrap() >= 5 + 3, "{pool}");

    // SIGKILL, then start again on the same data: every registration is still listed.
    server.sigkill();
    let server = Server::start(&data);
    let (_, clients) = http(server.http, "GET", "/api/clients", None).await;
    let listed: Vec<&str> = clients.as_array().unwrap().iter().map(|c| c["endpoint"].as_str().unwrap()).collect();
    assert_eq!(listed, names, "no acknowledged registration lost");

    // SIGTERM: close_notify to every peer, exit 0.
    let survivors = register_devices(&server).await;
    let exit = server.sigterm();
    assert!(exit.success(), "{exit:?}");
    for client in &survivors {
        let reason = tokio::time::timeout(Duration::from_secs(10), client.closed()).await.unwrap();
        assert_eq!(reason, CloseReason::PeerClosed);
    }
    let _ = std::fs::remove_dir_all(&data);
}
