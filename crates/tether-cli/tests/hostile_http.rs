//! The REST API and web UI of the real `tether serve` against hostile HTTP: silent and slow
//! connections, cross-site requests and DNS rebinding in a real Chromium, token guessing,
//! stolen login cookies, weak tokens, and readers that never leave.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use support::browser::Browser;
use support::{data_dir, device_0, http, wait_registered, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A TCP connection to `to` from the address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// One HTTP/1.1 request from `from` with `headers`; the status, the response's head and its
/// body, within 10 s.
async fn request_from(from: IpAddr, to: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    let exchange = async {
        let mut stream = connect_from(from, to).await.unwrap();
        let request =
            format!("{head}\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (head[9..12].parse().unwrap(), head.to_string(), body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("an answer within 10 s")
}

/// Whether the server closed `stream` within `within` (read gives EOF or a reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_http_clients_take_nothing_down() {
    let data = data_dir("hostile-http-slow");
    std::fs::write(data.join("tether.toml"), "[limits]\nhttp_header_timeout_s = 2\n").unwrap();
    let config = data.join("tether.toml");
    // The shell's usual soft limit of 1,024 open files.
    let server = Server::start_with_nofile(&data.join("server"), 1024, &["--config", config.to_str().unwrap()]);
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    // 1,100 connections that never send a byte.
    let mut silent = Vec::new();
    for _ in 0..1_100 {
        if let Ok(stream) = connect_from(attacker, server.http).await {
            silent.push(stream);
        }
    }
    // Everyone else is answered at once.
    let started = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(5), http(server.http, "GET", "/api/clients", None)).await;
    assert_eq!(answered.map(|(status, _)| status).ok(), Some(200), "the API answers during the attack");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    // Headers sent a byte at a time are cut at the header deadline, long before they end.
    let mut slow = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), server.http).await.unwrap();
    let request =
        format!("GET /api/clients HTTP/1.1\r\nHost: {}\r\nX-Padding: {}\r\n\r\n", server.http, "x".repeat(40));
    let started = Instant::now();
    let mut cut = false;
    for byte in request.as_bytes() {
        if slow.write_all(&[*byte]).await.is_err() || closed_within(&mut slow, Duration::from_millis(200)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "a slowloris client was never cut ({:?})", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(6), "cut after {:?}", started.elapsed());

    // The silent ones were closed by then too.
    assert!(closed_within(&mut silent[0], Duration::from_secs(1)).await, "a silent connection is cut");
    let (status, _) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

/// A page on `listener` (another port of this host) that, once opened, tries to make the
/// browser reboot `urn:dev:0` through tether's API at `api`: a script with a no-CORS fetch,
/// then a `text/plain` form.
async fn serve_attack_page(listener: TcpListener, api: SocketAddr) {
    let target = format!("http://{api}/api/clients/urn:dev:0/3/0/4");
    let page = format!(
        "<!doctype html><html><body><form id=f method=POST action=\"{target}\" enctype=\"text/plain\">\
         <input name=a value=b></form><script>fetch(\"{target}\", {{method: \"POST\", mode: \"no-cors\", \
         credentials: \"include\", body: \"x\"}}).finally(() => document.getElementById(\"f\").submit());\
         </script></body></html>"
    );
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let page = page.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_changes_nothing_and_a_rebound_name_is_refused() {
    let data = data_dir("hostile-http-csrf");
    let server = Server::start(&data.join("server"));
    let mut device = device_0(&server, &["--duration", "90"]);
    wait_registered(&server, 1, Duration::from_secs(10)).await;
    let (_, before) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;

    // Logged in to the UI (its cookie is sent to every port of this host: same site), the
    // browser opens an attacker's page on another port.
    let browser = Browser::start(&["--host-resolver-rules=MAP rebind.test 127.0.0.1"]).await;
    browser.log_in(server.http, server.token.as_deref().unwrap()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let attack = listener.local_addr().unwrap();
    let page = tokio::spawn(serve_attack_page(listener, server.http));
    browser.open(&format!("http://{attack}/")).await;
    // The form's answer is what the browser shows: the refusal.
    let shown = browser.wait_text("body", "the form's answer", |t| t.contains("error")).await;
    assert!(shown.contains(&format!("cross-origin request from http://{attack} refused")), "{shown}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = http(server.http, "GET", "/api/clients/urn:dev:0", None).await;
    assert_eq!(after["registration_id"], before["registration_id"], "the device did not reboot");

    // DNS rebinding: a name that now points at the server is not the server's name.
    browser.open(&format!("http://rebind.test:{}/api/whoami", server.http.port())).await;
    let shown = browser.wait_text("body", "the refusal", |t| t.contains("error")).await;
    assert!(shown.contains("does not answer to the name \\\"rebind.test\\\""), "{shown}");
    browser.quit().await;
    page.abort();

    // Without a browser, the same rules: a form's content type is refused, framing is not
    // allowed, and a real client's JSON goes through.
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let token = server.token.clone().unwrap();
    let post = format!("POST /api/clients/urn:dev:0/1/0/1 HTTP/1.1\r\nAuthorization: Bearer {token}");
    let (status, head, _) =
        request_from(localhost, server.http, &format!("{post}\r\nContent-Type: text/plain"), "{\"value\": 60}").await;
    assert_eq!(status, 415, "{head}");
    assert!(head.contains("x-frame-options: DENY") || head.contains("X-Frame-Options: DENY"), "{head}");
    let put = post.replacen("POST", "PUT", 1);
    let (status, _, body) =
        request_from(localhost, server.http, &format!("{put}\r\nContent-Type: application/json"), "{\"value\": 60}")
            .await;
    assert_eq!(status, 200, "{body}");

    let _ = device.kill();
    let _ = device.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

/// A reader of `/api/events` at `http`: the status, and the connection (the stream goes on
/// while it is open).
async fn event_reader(http: SocketAddr, token: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    (String::from_utf8_lossy(&head[9..12]).parse().unwrap(), stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_is_slowed_and_logged_logins_end_at_logout_and_readers_are_bounded() {
    let data = data_dir("hostile-http-hygiene");
    std::fs::write(data.join("tether.toml"), "[limits]\nevent_readers = 8\n").unwrap();
    let config = data.join("tether.toml");
    let server = Server::start_logged(&data.join("server"), &["--config", config.to_str().unwrap()]);
    let guesser = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));

    // Ten wrong tokens, then the address waits; each is in the log; others are not held up.
    for i in 0..10 {
        let head = format!("GET /api/clients HTTP/1.1\r\nAuthorization: Bearer wrong-guess-{i:026}");
        assert_eq!(request_from(guesser, server.http, &head, "").await.0, 401);
    }
    let token = server.token.clone().unwrap();
    let right = format!("GET /api/clients HTTP/1.1\r\nAuthorization: Bearer {token}");
    let (status, head, _) = request_from(guesser, server.http, &right, "").await;
    assert_eq!(status, 429, "even a right guess waits now: {head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: "), "{head}");
    let (status, _) = http(server.http, "GET", "/api/clients", None).await;
    assert_eq!(status, 200, "another address is not held up");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.logged("API token refused") {
        assert!(Instant::now() < deadline, "failed tokens are logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!server.logged(&token), "never the token");

    // A UI login's cookie is a login id; logging out ends it on the server.
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (status, head, _) = request_from(
        localhost,
        server.http,
        "POST /api/login HTTP/1.1\r\nContent-Type: application/json",
        &format!("{{\"token\": \"{token}\"}}"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l[11..].trim().to_string()))
        .unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    assert!(!cookie.contains(&token), "the cookie does not hold the token");
    let with_cookie = format!("GET /api/clients HTTP/1.1\r\nCookie: {cookie}");
    assert_eq!(request_from(localhost, server.http, &with_cookie, "").await.0, 200);
    let logout = format!("POST /api/logout HTTP/1.1\r\nCookie: {cookie}\r\nContent-Type: application/json");
    assert_eq!(request_from(localhost, server.http, &logout, "").await.0, 200);
    assert_eq!(request_from(localhost, server.http, &with_cookie, "").await.0, 401, "a copied cookie is void");

    // Event readers: eight at once; a ninth is told to come back.
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (status, stream) = event_reader(server.http, &token).await;
        assert_eq!(status, 200);
        readers.push(stream);
    }
    let (status, body) = http(server.http, "GET", "/api/events", None).await;
    assert_eq!(status, 503, "{body}");
    drop(readers.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while event_reader(server.http, &token).await.0 != 200 {
        assert!(Instant::now() < deadline, "a reader's slot comes back when it leaves");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);

    // A token file with a weak token is refused at start, naming the problem.
    std::fs::write(
        data.join("tokens.toml"),
        "[[token]]\nrole = \"admin\"\ntoken = \"changemechangemechangemechangeme\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(data.join("weak"))
        .arg("--api-token-file")
        .arg(data.join("tokens.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("token 1 repeats itself"), "{stderr}");
    let _ = std::fs::remove_dir_all(&data);
}
