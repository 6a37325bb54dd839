//! A real headless Chromium (Debian's `chromium` and `chromium-driver`, which `.ci/run`
//! installs), driven over the WebDriver protocol.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
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

/// A headless Chromium under its own chromedriver, in a WebDriver session.
pub struct Browser {
    driver: Driver,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with `extra_args` besides the usual
    /// ones (no sandbox as root, no GPU, no background networking on a closed machine).
    pub async fn start(extra_args: &[&str]) -> Self {
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
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-crash-reporter",
            "--disable-breakpad",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1500,1700",
        ];
        args.extend_from_slice(extra_args);
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args }
        }}});
        let (status, created) = webdriver(driver.addr, "POST", "/session", Some(&capabilities.to_string())).await;
        assert_eq!(status, 200, "a browser session: {created}");
        let session = created["value"]["sessionId"].as_str().unwrap().to_string();
        Self { driver, session }
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    /// Logs in to tether's UI at `http` with `token`.
    pub async fn log_in(&self, http: SocketAddr, token: &str) {
        self.open(&format!("http://{http}/")).await;
        let input = self.wait_for("#login-token:not([hidden] *)").await;
        self.call("POST", &format!("/element/{input}/value"), json!({ "text": token })).await;
        self.click("#login-button").await;
        self.wait_for("#devices").await;
    }

    /// Ends the WebDriver session (the browser and driver end when dropped).
    pub async fn quit(self) {
        let _ = webdriver(self.driver.addr, "DELETE", &format!("/session/{}", self.session), None).await;
    }

    pub async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method == "POST").then(|| body.to_string());
        let (status, answer) = webdriver(self.driver.addr, method, &path, body.as_deref()).await;
        assert_eq!(status, 200, "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    pub async fn find(&self, css: &str) -> Option<String> {
        let body = json!({ "using": "css selector", "value": css }).to_string();
        let path = format!("/session/{}/element", self.session);
        let (status, answer) = webdriver(self.driver.addr, "POST", &path, Some(&body)).await;
        (status == 200).then(|| answer["value"]["element-6066-11e4-a52e-4f735466cecf"].as_str().map(String::from))?
    }

    /// Waits (up to 20 s) for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(element) = self.find(css).await {
                return element;
            }
            assert!(Instant::now() < deadline, "no element {css} appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Finds the element matching `css` and clicks it at once, as a person's click lands on
    /// what is on the page at that moment. A page that redraws between the two calls makes
    /// the element stale; it is then found again (up to 20 s).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let element = self.wait_for(css).await;
            let path = format!("/session/{}/element/{element}/click", self.session);
            let (status, answer) = webdriver(self.driver.addr, "POST", &path, Some("{}")).await;
            if status == 200 {
                return;
            }
            let stale = answer["value"]["error"] == "stale element reference";
            assert!(stale && Instant::now() < deadline, "click on {css}: {answer}");
        }
    }

    /// The text of the element matching `css` now ("" while there is none).
    pub async fn text(&self, css: &str) -> String {
        let Some(element) = self.find(css).await else { return String::new() };
        let path = format!("/session/{}/element/{element}/text", self.session);
        let (status, answer) = webdriver(self.driver.addr, "GET", &path, None).await;
        if status != 200 {
            return String::new(); // redrawn between the two calls: read again
        }
        answer["value"].as_str().unwrap_or_default().to_string()
    }

    /// Waits (up to 20 s) until the text of `css` satisfies `done`; returns it.
    pub async fn wait_text(&self, css: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text(css).await;
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{what}: {text:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Standard base64 (the screenshot WebDriver returns).
pub fn base64_decode(text: &str) -> Vec<u8> {
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
