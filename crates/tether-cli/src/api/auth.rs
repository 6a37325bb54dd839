//! Who may call the API: a bearer token (`Authorization: Bearer …`) or the web UI's login
//! cookie, each token with a role. `read` tokens read, observe and list; `admin` tokens also
//! write, execute, create, delete and push firmware. Everything under `/api/` needs one,
//! except the login itself; the UI's static files do not (they hold no data), and
//! `/metrics` does not when the HTTP port is on loopback.

use std::path::Path;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
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

/// The API's access rules.
#[derive(Clone)]
pub struct Access {
    /// Tokens and their roles; empty with authentication off. Shared: every request clones
    /// the access rules.
    tokens: std::sync::Arc<[(Role, String)]>,
    /// Authentication off (`--no-api-auth`, loopback only).
    open: bool,
    /// `/metrics` without a token (the HTTP port is on loopback).
    open_metrics: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tokens", &self.tokens.len())
            .field("open", &self.open)
            .field("open_metrics", &self.open_metrics)
            .finish()
    }
}

impl Access {
    /// Tokens required; `/metrics` open when `loopback`.
    pub fn tokens(tokens: Vec<(Role, String)>, loopback: bool) -> Self {
        Self { tokens: tokens.into(), open: false, open_metrics: loopback }
    }

    /// No authentication at all.
    pub fn open() -> Self {
        Self { tokens: std::sync::Arc::new([]), open: true, open_metrics: true }
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
}

/// The name of the UI's login cookie.
const COOKIE: &str = "tether_token";
/// Shortest token accepted from a file: 16 bytes of randomness in hex.
const MIN_TOKEN_LEN: usize = 32;

/// Lets a request through, or answers 401 (no valid token) or 403 (a read token asking to
/// change something).
pub async fn require(State(access): State<Access>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let public = path == "/" || path.starts_with("/ui/") || path == "/api/login" || path == "/api/logout";
    if access.open || public || (path == "/metrics" && access.open_metrics) {
        return next.run(request).await;
    }
    let Some(role) = presented(request.headers()).and_then(|token| access.role_of(&token)) else {
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "error": "a token is needed: Authorization: Bearer <token> (the admin token is in the data \
                          directory's api-token file), or log in at /",
                "coap_code": null
            })),
        )
            .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    if role == Role::Read && changes_something(request.method(), path) {
        let message = format!("{} {path} needs an admin token; this one is read-only", request.method());
        return (StatusCode::FORBIDDEN, Json(json!({ "error": message, "coap_code": null }))).into_response();
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

/// The token of `Authorization: Bearer …`, else of the login cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
        .map(|(_, token)| token.trim().to_string());
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string))
    })
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// `POST /api/login` with `{"token": "…"}`: the UI's login. Sets an HttpOnly, SameSite=Strict
/// cookie holding the token (the browser sends it with the UI's requests only).
pub async fn login(State(access): State<Access>, body: String) -> Response {
    let Ok(Login { token }) = serde_json::from_str(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "body must be {\"token\": \"…\"}", "coap_code": null })),
        )
            .into_response();
    };
    let role = if access.open { Some(Role::Admin) } else { access.role_of(token.trim()) };
    let Some(role) = role else {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "error": "unknown token", "coap_code": null })))
            .into_response();
    };
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", token.trim());
    let mut response = Json(json!({ "role": role.name() })).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /api/logout`: clears the login cookie.
pub async fn logout() -> Response {
    let mut response = Json(json!({ "logged_out": true })).into_response();
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /api/whoami`: the role of the token presented (the middleware answered 401 without
/// one).
pub async fn whoami(State(access): State<Access>, headers: HeaderMap) -> Response {
    let role = if access.open { Some(Role::Admin) } else { presented(&headers).and_then(|t| access.role_of(&t)) };
    Json(json!({ "role": role.map(Role::name), "authentication": !access.open })).into_response()
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
        if token.len() < MIN_TOKEN_LEN || !token.chars().all(|c| c.is_ascii_graphic()) || token.contains(';') {
            bail!(
                "{}: token {} must be at least {MIN_TOKEN_LEN} printable characters without ';' (e.g. 32 hex digits: \
                 openssl rand -hex 16)",
                path.display(),
                i + 1
            );
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
        Ok(text) if text.trim().len() >= MIN_TOKEN_LEN => return Ok((text.trim().to_string(), path, false)),
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
    fn tokens_come_from_the_header_or_the_cookie() {
        let access = Access::tokens(vec![(Role::Admin, "a".repeat(32)), (Role::Read, "r".repeat(32))], true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {}", "r".repeat(32))).unwrap());
        assert_eq!(presented(&headers).and_then(|t| access.role_of(&t)), Some(Role::Read));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("bearer {}", "a".repeat(32))).unwrap());
        assert_eq!(presented(&headers).and_then(|t| access.role_of(&t)), Some(Role::Admin), "any case");
        let mut headers = HeaderMap::new();
        headers
            .insert(header::COOKIE, HeaderValue::from_str(&format!("x=1; tether_token={}", "a".repeat(32))).unwrap());
        assert_eq!(presented(&headers).and_then(|t| access.role_of(&t)), Some(Role::Admin));
        assert_eq!(access.role_of("a"), None);
        assert_eq!(access.role_of(&"b".repeat(32)), None);
    }

    #[test]
    fn token_files_with_mistakes_say_which() {
        let dir = std::env::temp_dir().join(format!("tether-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens.toml");
        std::fs::write(&file, "[[token]]\nrole = \"read\"\ntoken = \"short\"\n").unwrap();
        assert!(format!("{:#}", read_token_file(&file).unwrap_err()).contains("token 1 must be at least 32"));
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
