//! The web UI in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs), driven over the WebDriver protocol: log in with the token from the
//! data directory, see the device list, open a real `tether device`, press Read on /3/0/0
//! and see its value. The screenshot is kept as `target/reports/web_ui.png`.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{base64_decode, Browser};
use support::{device_0, wait_registered, Server};

#[tokio::test]
async fn the_ui_lists_the_device_and_reads_its_manufacturer() {
    let data = std::env::temp_dir().join(format!("tether-web-ui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let mut device = device_0(&server, &["--duration", "90"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;

    let browser = Browser::start(&[]).await;

    // Without a login the page asks for a token; the data directory's token logs in.
    browser.open(&format!("http://{}/", server.http)).await;
    let input = browser.wait_for("#login-token:not([hidden] *)").await;
    let token = server.token.clone().expect("the token tether serve made");
    browser.call("POST", &format!("/element/{input}/value"), json!({ "text": token })).await;
    browser.click("#login-button").await;

    // The device list, then the device's objects with their model names; the events panel
    // shows the registration, which happened before the page opened. Every element is found
    // when it is used: the list redraws on each event and every 10 s.
    let row = "tr[data-endpoint=\"urn:dev:0\"]";
    browser.wait_for(row).await;
    browser.wait_text("#events", "the registration is in the events", |t| t.contains("registered")).await;
    let listed = browser.text(row).await;
    assert!(listed.contains("urn:dev:0") && listed.contains("psk:device-0"), "{listed}");
    browser.click(row).await;
    let resource = "tr[data-path=\"/3/0/0\"]";
    let named = browser.wait_text(resource, "the object tree", |t| !t.is_empty()).await;
    assert!(named.contains("Manufacturer"), "{named}");
    browser.click(&format!("{resource} button.read")).await;
    browser.wait_text(&format!("{resource} td.value"), "the read value appears", |t| t == "tether").await;
    // Observe Current Time (/3/0/13, a new value every second): notifications arrive over
    // the event stream, into the events panel and the resource's cell.
    browser.click("tr[data-path=\"/3/0/13\"] button.observe").await;
    browser.wait_text("#events", "a notification streams in", |t| t.contains("notification")).await;
    let live = browser.wait_text("tr[data-path=\"/3/0/13\"] td.value.live", "a live value", |t| !t.is_empty()).await;
    assert!(live.parse::<i64>().is_ok_and(|t| t > 1_600_000_000), "a Unix time: {live}");

    // The whole page from the top: the device list, the statistics, the events and, below,
    // the value read.
    browser.call("POST", "/execute/sync", json!({ "script": "window.scrollTo(0, 0)", "args": [] })).await;
    let screenshot = browser.call("GET", "/screenshot", Value::Null).await;
    let png = base64_decode(screenshot.as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let reports = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/reports");
    std::fs::create_dir_all(&reports).unwrap();
    std::fs::write(reports.join("web_ui.png"), &png).unwrap();
    browser.quit().await;
    let _ = device.kill();
    let _ = device.wait();
    let _ = std::fs::remove_dir_all(&data);
}
