//! Who may call the API: a bearer token (`Authorization: Bearer …`) or the web UI's login
//! cookie, each token with a role. `read` tokens read, observe and list; `admin` tokens also
//! write, execute, create, delete and push firmware. Everything under `/api/` needs one,
//! except the login itself; the UI's static files do not (they hold no data), and
//! `/metrics` does not when the HTTP port is on loopback.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads, observations, lists, events.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

/// The API's access rules, the web UI's logins, and who guessed wrong lately.
#[derive(Clone)]
pub struct Access {
    /// Tokens and their roles; empty with authentication off. Shared: every request clones
    /// the access rules.
    tokens: Arc<[(Role, String)]>,
    /// Authentication off (`--no-api-auth`, loopback only).
    open: bool,
    /// `/metrics` without a token (the HTTP port is on loopback).
    open_metrics: bool,
    /// The web UI's logins, by the random id its cookie holds (never the token itself).
    logins: Arc<Mutex<Logins>>,
    /// Wrong tokens and logins, by client address.
    failures: Arc<Mutex<Failures>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tokens", &self.tokens.len())
            .field("open", &self.open)
            .field("open_metrics", &self.open_metrics)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// Tokens required; `/metrics` open when `loopback`.
    pub fn tokens(tokens: Vec<(Role, String)>, loopback: bool) -> Self {
        Self {
            tokens: tokens.into(),
            open: false,
            open_metrics: loopback,
            logins: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// These rules, and an admin `token` besides (the one a cluster's nodes present to each
    /// other).
    pub fn and_token(self, token: String) -> Self {
        let mut tokens = self.tokens.to_vec();
        tokens.push((Role::Admin, token));
        Self { tokens: tokens.into(), ..self }
    }

    /// No authentication at all.
    pub fn open() -> Self {
        Self { open: true, open_metrics: true, ..Self::tokens(Vec::new(), true) }
    }

    /// The role of `presented`, compared with every token in constant time.
    fn role_of(&self, presented: &str) -> Option<Role> {
        let mut found = None;
        for (role, token) in self.tokens.iter() {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(*role);
            }
        }
        found
    }

    /// The role of what a request presents: a bearer token, or the UI's login cookie.
    /// `None` if it presents nothing; `Some(None)` if what it presents is not valid.
    fn presented_role(&self, headers: &HeaderMap) -> Option<Option<Role>> {
        if let Some(token) = bearer(headers) {
            return Some(self.role_of(&token));
        }
        let login = login_cookie(headers)?;
        Some(lock(&self.logins).role(&login, Instant::now()))
    }

    /// When `remote` may try again, if it guessed wrong too often lately.
    fn blocked(&self, remote: Option<IpAddr>) -> Option<Duration> {
        lock(&self.failures).blocked(remote?, Instant::now())
    }

    /// Notes a wrong token or login from `remote`, and logs it (within a budget).
    fn failed(&self, remote: Option<IpAddr>, what: &str) {
        let Some(remote) = remote else { return };
        let mut failures = lock(&self.failures);
        let now = Instant::now();
        let count = failures.note(remote, now);
        if let Some(held_back) = failures.log.allow(now) {
            tracing::warn!(%remote, attempts_in_window = count, held_back, "{what} refused");
        }
    }
}

/// The name of the UI's login cookie.
const COOKIE: &str = "tether_session";
/// Shortest token accepted from a file: 16 bytes of randomness in hex.
const MIN_TOKEN_LEN: usize = 32;
/// Wrong tokens or logins one address may present per window before it must wait.
const FAILURES_ALLOWED: u32 = 10;
/// The window of [`FAILURES_ALLOWED`], and the wait after it.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at most (the oldest are forgotten first).
const FAILURES_REMEMBERED: usize = 10_000;
/// A UI login unused this long ends.
const LOGIN_IDLE: Duration = Duration::from_secs(12 * 3600);
/// UI logins held at most (the least recently used ends first).
const MAX_LOGINS: usize = 1_000;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The web UI's logins: a random id (what the cookie holds) → the token's role. Logging out
/// ends one here, so a copied cookie is worth nothing after it.
#[derive(Default)]
struct Logins {
    by_id: HashMap<String, (Role, Instant)>,
}

impl Logins {
    fn start(&mut self, role: Role, now: Instant) -> String {
        self.by_id.retain(|_, (_, used)| now.saturating_duration_since(*used) < LOGIN_IDLE);
        if self.by_id.len() >= MAX_LOGINS {
            let oldest = self.by_id.iter().min_by_key(|(_, (_, used))| *used).map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.by_id.remove(&oldest);
            }
        }
        let id: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
        self.by_id.insert(id.clone(), (role, now));
        id
    }

    fn role(&mut self, id: &str, now: Instant) -> Option<Role> {
        let (role, used) = self.by_id.get_mut(id)?;
        if now.saturating_duration_since(*used) >= LOGIN_IDLE {
            self.by_id.remove(id);
            return None;
        }
        *used = now;
        Some(*role)
    }

    fn end(&mut self, id: &str) {
        self.by_id.remove(id);
    }
}

/// Wrong tokens and logins per address, in fixed windows.
struct Failures {
    by_address: HashMap<IpAddr, (Instant, u32)>,
    log: tether::oplog::LogBudget,
}

impl Default for Failures {
    fn default() -> Self {
        Self { by_address: HashMap::new(), log: tether::oplog::LogBudget::new(Duration::from_secs(10), 10) }
    }
}

impl Failures {
    /// Counts a failure; returns the count in the current window.
    fn note(&mut self, address: IpAddr, now: Instant) -> u32 {
        if self.by_address.len() >= FAILURES_REMEMBERED && !self.by_address.contains_key(&address) {
            self.by_address.retain(|_, (since, _)| now.saturating_duration_since(*since) < FAILURE_WINDOW);
            if self.by_address.len() >= FAILURES_REMEMBERED {
                let oldest = self.by_address.iter().min_by_key(|(_, (since, _))| *since).map(|(a, _)| *a);
                if let Some(oldest) = oldest {
                    self.by_address.remove(&oldest);
                }
            }
        }
        let (since, count) = self.by_address.entry(address).or_insert((now, 0));
        if now.saturating_duration_since(*since) >= FAILURE_WINDOW {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count
    }

    fn blocked(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let (since, count) = self.by_address.get(&address)?;
        let left = FAILURE_WINDOW.checked_sub(now.saturating_duration_since(*since))?;
        (*count >= FAILURES_ALLOWED && !left.is_zero()).then_some(left)
    }
}

/// The client's address, as the listener recorded it.
fn remote(request_extensions: &axum::http::Extensions) -> Option<IpAddr> {
    request_extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip())
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into(), "coap_code": null }))).into_response()
}

/// 429 with how long to wait.
fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many wrong tokens from this address: try again in {seconds} s"),
    );
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Lets a request through, or answers 401 (no valid token), 403 (a read token asking to
/// change something) or 429 (an address that presented too many wrong tokens lately).
pub async fn require(State(access): State<Access>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let public =
        path == "/" || path.starts_with("/ui/") || path == "/api/login" || path == "/api/logout" || path == "/healthz";
    if access.open || public || (path == "/metrics" && access.open_metrics) {
        return next.run(request).await;
    }
    let remote = remote(request.extensions());
    if let Some(wait) = access.blocked(remote) {
        return too_many(wait);
    }
    let role = match access.presented_role(request.headers()) {
        Some(Some(role)) => role,
        presented => {
            if presented.is_some() {
                access.failed(remote, "API token");
            }
            let mut response = json_error(
                StatusCode::UNAUTHORIZED,
                "a token is needed: Authorization: Bearer <token> (the admin token is in the data directory's \
                 api-token file), or log in at /",
            );
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    if role == Role::Read && changes_something(request.method(), path) {
        let message = format!("{} {path} needs an admin token; this one is read-only", request.method());
        return json_error(StatusCode::FORBIDDEN, message);
    }
    next.run(request).await
}

/// Whether `method` on `path` writes, executes, creates or deletes: everything but `GET`,
/// observations (`POST …/observe`) and composite reads (`POST …/composite`).
fn changes_something(method: &Method, path: &str) -> bool {
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => false,
        Method::POST => !(path.ends_with("/observe") || path.ends_with("/composite")),
        _ => true,
    }
}

/// The token of `Authorization: Bearer …`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    // The scheme is case-insensitive (RFC 9110 §11.1).
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
        .map(|(_, token)| token.trim().to_string())
}

/// The login id of the UI's cookie.
fn login_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string))
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// `POST /api/login` with `{"token": "…"}`: the UI's login. The token is checked once; the
/// HttpOnly, SameSite=Strict cookie set holds a random login id, not the token, and
/// `POST /api/logout` ends it on the server.
pub async fn login(State(access): State<Access>, request: Request) -> Response {
    let remote = remote(request.extensions());
    if let Some(wait) = access.blocked(remote) {
        return too_many(wait);
    }
    let body = axum::body::to_bytes(request.into_body(), 4096).await.unwrap_or_default();
    let Ok(Login { token }) = serde_json::from_slice(&body) else {
        return json_error(StatusCode::BAD_REQUEST, "body must be {\"token\": \"…\"}");
    };
    let role = if access.open { Some(Role::Admin) } else { access.role_of(token.trim()) };
    let Some(role) = role else {
        access.failed(remote, "UI login");
        return json_error(StatusCode::UNAUTHORIZED, "unknown token");
    };
    let id = lock(&access.logins).start(role, Instant::now());
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/");
    let mut response = Json(json!({ "role": role.name() })).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /api/logout`: ends the UI's login on the server and clears its cookie.
pub async fn logout(State(access): State<Access>, headers: HeaderMap) -> Response {
    if let Some(id) = login_cookie(&headers) {
        lock(&access.logins).end(&id);
    }
    let mut response = Json(json!({ "logged_out": true })).into_response();
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /api/whoami`: the role of the token or login presented (the middleware answered
/// 401 without one).
pub async fn whoami(State(access): State<Access>, headers: HeaderMap) -> Response {
    let role = if access.open { Some(Role::Admin) } else { access.presented_role(&headers).flatten() };
    Json(json!({ "role": role.map(Role::name), "authentication": !access.open })).into_response()
}

/// Why `token` is too weak to guard the API, if it is: shorter than 32 characters, not
/// printable, repeating itself, a run of consecutive characters, or with too little variety
/// to hold 96 bits.
fn weakness(token: &str) -> Option<&'static str> {
    if token.len() < MIN_TOKEN_LEN || !token.chars().all(|c| c.is_ascii_graphic()) || token.contains(';') {
        return Some("must be at least 32 printable characters without ';'");
    }
    let bytes = token.as_bytes();
    if (1..=bytes.len() / 2).any(|period| bytes.iter().skip(period).zip(bytes).all(|(a, b)| a == b)) {
        return Some("repeats itself");
    }
    let longest_run = bytes
        .windows(2)
        .fold((1, 1, 1), |(longest, up, down), pair| {
            let up = if pair[1] == pair[0].wrapping_add(1) { up + 1 } else { 1 };
            let down = if pair[1].wrapping_add(1) == pair[0] { down + 1 } else { 1 };
            (longest.max(up).max(down), up, down)
        })
        .0;
    if longest_run >= 8 {
        return Some("holds a run of consecutive characters");
    }
    let mut counts = HashMap::new();
    for byte in bytes {
        *counts.entry(byte).or_insert(0usize) += 1;
    }
    let n = bytes.len() as f64;
    let bits: f64 = counts.values().map(|&c| -(c as f64) * (c as f64 / n).log2()).sum();
    if bits < 96.0 {
        return Some("has too little variety (under 96 bits)");
    }
    None
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    role: Role,
    token: String,
}

/// The tokens of an `--api-token-file` (TOML: `[[token]]` entries with `role = "admin"` or
/// `"read"` and `token`).
pub fn read_token_file(path: &Path) -> Result<Vec<(Role, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: TokenFile = toml::from_str(&text).with_context(|| {
        format!("{}: expected [[token]] entries with role = \"admin\" or \"read\" and token", path.display())
    })?;
    let mut tokens = Vec::new();
    for (i, entry) in file.token.into_iter().enumerate() {
        let token = entry.token.trim().to_string();
        if let Some(weakness) = weakness(&token) {
            bail!("{}: token {} {weakness}: make one with openssl rand -hex 16", path.display(), i + 1);
        }
        tokens.push((entry.role, token));
    }
    if tokens.is_empty() {
        bail!("{}: no [[token]] entries", path.display());
    }
    Ok(tokens)
}

/// The admin token in `data_dir/api-token`, made (random, mode 0600) if there is none.
/// Returns the token, the file, and whether it was made now.
pub fn data_dir_token(data_dir: &Path) -> Result<(String, std::path::PathBuf, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("api-token");
    match std::fs::read_to_string(&path) {
        Ok(text) if weakness(text.trim()).is_none() => return Ok((text.trim().to_string(), path, false)),
        Ok(_) => bail!("{} holds no usable token: delete it to have a new one made", path.display()),
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("cannot read {}", path.display()))
        }
        Err(_) => {}
    }
    let token: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok((token, path, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_open_to_read_tokens_and_changes_need_admin() {
        for (method, path) in [
            (Method::GET, "/api/clients/x/3/0/0"),
            (Method::POST, "/api/clients/x/3/0/13/observe"),
            (Method::POST, "/api/clients/x/composite"),
            (Method::POST, "/api/clients/x/composite/observe"),
        ] {
            assert!(!changes_something(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::PUT, "/api/clients/x/1/0/1"),
            (Method::POST, "/api/clients/x/3/0/4"),
            (Method::DELETE, "/api/observations/1"),
            (Method::POST, "/api/clients/x/firmware"),
            (Method::PUT, "/api/clients/x/composite"),
        ] {
            assert!(changes_something(&method, path), "{method} {path}");
        }
    }

    #[test]
    fn tokens_come_from_the_header_and_logins_from_the_cookie() {
        let admin = "3f9c2a7e81d4b6059e1c7a2f4d8b3e60".to_string();
        let read = "b71e4c09a2f35d8e6c1b9a7f0e2d4c58".to_string();
        let access = Access::tokens(vec![(Role::Admin, admin.clone()), (Role::Read, read.clone())], true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {read}")).unwrap());
        assert_eq!(access.presented_role(&headers), Some(Some(Role::Read)));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("bearer {admin}")).unwrap());
        assert_eq!(access.presented_role(&headers), Some(Some(Role::Admin)), "any case");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer wrong"));
        assert_eq!(access.presented_role(&headers), Some(None));
        assert_eq!(access.presented_role(&HeaderMap::new()), None, "nothing presented");
        // A login's cookie holds a random id, never the token; logging out ends it.
        let id = lock(&access.logins).start(Role::Admin, Instant::now());
        assert!(id.len() == 64 && id != admin);
        let mut cookie = HeaderMap::new();
        cookie.insert(header::COOKIE, HeaderValue::from_str(&format!("x=1; tether_session={id}")).unwrap());
        assert_eq!(access.presented_role(&cookie), Some(Some(Role::Admin)));
        lock(&access.logins).end(&id);
        assert_eq!(access.presented_role(&cookie), Some(None), "revoked");
        let mut raw = HeaderMap::new();
        raw.insert(header::COOKIE, HeaderValue::from_str(&format!("tether_session={admin}")).unwrap());
        assert_eq!(access.presented_role(&raw), Some(None), "a token is no login id");
    }

    #[test]
    fn wrong_guesses_from_one_address_make_it_wait() {
        let access = Access::tokens(vec![(Role::Admin, "3f9c2a7e81d4b6059e1c7a2f4d8b3e60".into())], true);
        let guesser: IpAddr = "10.0.0.9".parse().unwrap();
        for _ in 0..FAILURES_ALLOWED - 1 {
            access.failed(Some(guesser), "API token");
        }
        assert!(access.blocked(Some(guesser)).is_none());
        access.failed(Some(guesser), "API token");
        let wait = access.blocked(Some(guesser)).expect("blocked");
        assert!(wait <= FAILURE_WINDOW && wait > FAILURE_WINDOW - Duration::from_secs(5));
        assert!(access.blocked(Some("10.0.0.10".parse().unwrap())).is_none(), "others are not");
    }

    #[test]
    fn weak_tokens_are_named() {
        for (token, why) in [
            ("short", "at least 32"),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "repeats itself"),
            ("0123456789abcdef0123456789abcdef", "repeats itself"),
            ("abcdefghijklmnopqrstuvwxyzABCDEFGH", "consecutive"),
            ("aabbaabbaabbaabbaabbaabbaabbaabbccdd", "variety"),
        ] {
            assert!(weakness(token).is_some_and(|w| w.contains(why)), "{token}: {:?}", weakness(token));
        }
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        for _ in 0..1000 {
            let random: String = rand::Rng::gen::<[u8; 16]>(&mut rng).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(weakness(&random), None, "{random}");
        }
    }

    #[test]
    fn token_files_with_mistakes_say_which() {
        let dir = std::env::temp_dir().join(format!("tether-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens.toml");
        std::fs::write(&file, "[[token]]\nrole = \"read\"\ntoken = \"short\"\n").unwrap();
        assert!(format!("{:#}", read_token_file(&file).unwrap_err()).contains("token 1 must be at least 32"));
        std::fs::write(&file, "[[token]]\nrole = \"read\"\ntoken = \"passwordpasswordpasswordpassword\"\n").unwrap();
        assert!(format!("{:#}", read_token_file(&file).unwrap_err()).contains("token 1 repeats itself"));
        std::fs::write(&file, "[[token]]\nrole = \"root\"\ntoken = \"x\"\n").unwrap();
        assert!(format!("{:#}", read_token_file(&file).unwrap_err()).contains("role = \"admin\" or \"read\""));
        let (token, path, made) = data_dir_token(&dir).unwrap();
        assert!(made && token.len() == 64);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(data_dir_token(&dir).unwrap(), (token, path, false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
