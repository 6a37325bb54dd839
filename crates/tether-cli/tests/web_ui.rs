//! The web UI in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs), driven over the WebDriver protocol: log in with the token from the
//! data directory, see the device list, open a real `tether device`, press Read on /3/0/0
//! and see its value. The screenshot is kept as `target/reports/web_ui.png`.

mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{device_0, wait_registered, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One WebDriver request. chromedriver says `Connection: close` but keeps the socket open, so
/// the body is read by its `Content-Length`.
async fn webdriver(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "chromedriver closed before answering");
            received.extend_from_slice(&buffer[..n]);
            let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&received[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                let status = head[9..12].parse().unwrap();
                let json = serde_json::from_slice(&received[end + 4..end + 4 + length]).unwrap_or(Value::Null);
                return (status, json);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), exchange).await.expect("chromedriver answers within 60 s")
}

/// A `chromedriver` this test started in a process group of its own, with the browser it
/// starts; the whole group is ended when dropped, so a failing test leaves no browser behind.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// A WebDriver session's id and its driver.
struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl Browser<'_> {
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method == "POST").then(|| body.to_string());
        let (status, answer) = webdriver(self.driver.addr, method, &path, body.as_deref()).await;
        assert_eq!(status, 200, "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn find(&self, css: &str) -> Option<String> {
        let body = json!({ "using": "css selector", "value": css }).to_string();
        let path = format!("/session/{}/element", self.session);
        let (status, answer) = webdriver(self.driver.addr, "POST", &path, Some(&body)).await;
        (status == 200).then(|| answer["value"]["element-6066-11e4-a52e-4f735466cecf"].as_str().map(String::from))?
    }

    /// Waits (up to 20 s) for an element matching `css`.
    async fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(element) = self.find(css).await {
                return element;
            }
            assert!(Instant::now() < deadline, "no element {css} appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), json!({})).await;
    }

    async fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Standard base64 (the screenshot WebDriver returns).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn the_ui_lists_the_device_and_reads_its_manufacturer() {
    let data = std::env::temp_dir().join(format!("tether-web-ui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let server = Server::start(&data);
    let mut device = device_0(&server, &["--duration", "90"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;

    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is installed (.ci/run installs chromium and chromium-driver)");
    let driver = Driver { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(driver.addr).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver listens");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while webdriver(driver.addr, "GET", "/status", None).await.1["value"]["ready"] != true {
        assert!(Instant::now() < deadline, "chromedriver is ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let capabilities = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-crash-reporter",
                "--disable-breakpad", "--window-size=1500,1700"
            ]
        }
    }}});
    let (status, created) = webdriver(driver.addr, "POST", "/session", Some(&capabilities.to_string())).await;
    assert_eq!(status, 200, "a browser session: {created}");
    let browser = Browser { driver: &driver, session: created["value"]["sessionId"].as_str().unwrap().to_string() };

    // Without a login the page asks for a token; the data directory's token logs in.
    browser.call("POST", "/url", json!({ "url": format!("http://{}/", server.http) })).await;
    let input = browser.wait_for("#login-token:not([hidden] *)").await;
    let token = server.token.clone().expect("the token tether serve made");
    browser.call("POST", &format!("/element/{input}/value"), json!({ "text": token })).await;
    browser.click(&browser.wait_for("#login-button").await).await;

    // The device list, then the device's objects with their model names; the events panel
    // shows the registration, which happened before the page opened.
    let row = browser.wait_for("tr[data-endpoint=\"urn:dev:0\"]").await;
    let events = browser.wait_for("#events").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !browser.text(&events).await.contains("registered") {
        assert!(Instant::now() < deadline, "the registration is in the events: {:?}", browser.text(&events).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = browser.text(&row).await;
    assert!(listed.contains("urn:dev:0") && listed.contains("psk:device-0"), "{listed}");
    browser.click(&row).await;
    let read = browser.wait_for("tr[data-path=\"/3/0/0\"] button.read").await;
    let named = browser.text(&browser.wait_for("tr[data-path=\"/3/0/0\"]").await).await;
    assert!(named.contains("Manufacturer"), "{named}");
    browser.click(&read).await;
    let cell = browser.wait_for("tr[data-path=\"/3/0/0\"] td.value").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while browser.text(&cell).await != "tether" {
        assert!(Instant::now() < deadline, "the read value appears: {:?}", browser.text(&cell).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Observe Current Time (/3/0/13, a new value every second): notifications arrive over
    // the event stream, into the events panel and the resource's cell.
    browser.click(&browser.wait_for("tr[data-path=\"/3/0/13\"] button.observe").await).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !browser.text(&events).await.contains("notification") {
        assert!(Instant::now() < deadline, "a notification streams in: {:?}", browser.text(&events).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let live = browser.wait_for("tr[data-path=\"/3/0/13\"] td.value.live").await;
    assert!(browser.text(&live).await.parse::<i64>().is_ok_and(|t| t > 1_600_000_000), "a Unix time");

    // The whole page from the top: the device list, the statistics, the events and, below,
    // the value read.
    browser.call("POST", "/execute/sync", json!({ "script": "window.scrollTo(0, 0)", "args": [] })).await;
    let screenshot = browser.call("GET", "/screenshot", Value::Null).await;
    let png = base64_decode(screenshot.as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let reports = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/reports");
    std::fs::create_dir_all(&reports).unwrap();
    std::fs::write(reports.join("web_ui.png"), &png).unwrap();
    let _ = webdriver(driver.addr, "DELETE", &format!("/session/{}", browser.session), None).await;

    drop(driver);
    let _ = device.kill();
    let _ = device.wait();
    let _ = std::fs::remove_dir_all(&data);
}
