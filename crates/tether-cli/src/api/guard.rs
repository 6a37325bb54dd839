//! Requests a browser was tricked into sending are refused before anything else looks at
//! them:
//!
//! - **Host** must name this server: an IP address, `localhost`, or a name configured in
//!   `http_hosts`. A page whose name an attacker re-points at this address (DNS rebinding)
//!   sends its own name and is refused (421).
//! - **Origin**, when a browser sends one, must be this server's own: a page on another
//!   origin, another port of the same host included, is refused (403).
//! - A request that changes something (any method but GET and HEAD) must carry a
//!   Content-Type a cross-site form cannot send (`application/json`; `application/octet-stream`
//!   for firmware), or it is refused (415). A form can only send `text/plain`,
//!   `application/x-www-form-urlencoded` and `multipart/form-data`, and a script on another
//!   origin cannot send anything else without a CORS preflight this server never grants.
//!
//! Every response says `frame-ancestors 'none'`: no page may frame the UI.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The names this server answers to besides IP addresses and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct Hosts(Arc<[String]>);

impl Hosts {
    /// `names` (`tether.example.com`), compared without case and port.
    pub fn new(names: &[String]) -> Self {
        Self(names.iter().map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase()).collect())
    }

    /// Whether a `Host` header value names this server.
    fn allows(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || self.0.iter().any(|n| n == name)
    }
}

/// The name part of a `Host` value: `[::1]:8080` → `::1`, `example.com:80` → `example.com`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Content types a cross-site HTML form or a no-CORS request may send (CORS-safelisted).
const FORM_TYPES: [&str; 3] = ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"];

/// Refuses what the module docs say, and adds the framing rule to every response.
pub async fn check(State(hosts): State<Hosts>, request: Request, next: Next) -> Response {
    if let Some(refusal) = refusal(&hosts, request.method(), request.headers()) {
        return with_frame_rules(refusal);
    }
    with_frame_rules(next.run(request).await)
}

fn refusal(hosts: &Hosts, method: &Method, headers: &HeaderMap) -> Option<Response> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(host) = host.filter(|h| !hosts.allows(h)) {
        let message = format!(
            "this server does not answer to the name {:?}: use its address, localhost, or a name listed in \
             http_hosts (tether.toml)",
            host_name(host)
        );
        return Some(refused(StatusCode::MISDIRECTED_REQUEST, message));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = host.map(|h| format!("http://{h}"));
        if own.as_deref() != origin.to_str().ok() {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            return Some(refused(StatusCode::FORBIDDEN, format!("cross-origin request from {origin} refused")));
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence.is_empty() || FORM_TYPES.contains(&essence.as_str()) {
        let given = if essence.is_empty() { "none".to_string() } else { essence };
        let message = format!(
            "{method} needs Content-Type: application/json (application/octet-stream for a firmware package), \
             got {given}: a cross-site form cannot send those, so the request provably comes from a client of \
             this API"
        );
        return Some(refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, message));
    }
    None
}

fn refused(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message, "coap_code": null }))).into_response()
}

fn with_frame_rules(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("frame-ancestors 'none'"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs.iter().map(|(name, value)| (name.clone(), HeaderValue::from_str(value).unwrap())).collect()
    }

    fn status(hosts: &Hosts, method: Method, pairs: &[(header::HeaderName, &str)]) -> Option<u16> {
        refusal(hosts, &method, &headers(pairs)).map(|r| r.status().as_u16())
    }

    #[test]
    fn hosts_are_addresses_localhost_or_configured_names() {
        let hosts = Hosts::new(&["Tether.Example.com".to_string()]);
        for host in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.0.0.5",
            "localhost:8080",
            "tether.example.com",
            "TETHER.example.com.:443",
        ] {
            assert_eq!(status(&hosts, Method::GET, &[(header::HOST, host)]), None, "{host}");
        }
        for host in ["evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example"] {
            assert_eq!(status(&hosts, Method::GET, &[(header::HOST, host)]), Some(421), "{host}");
        }
    }

    #[test]
    fn only_the_servers_own_origin_is_taken() {
        let hosts = Hosts::default();
        let own = [(header::HOST, "127.0.0.1:8080"), (header::ORIGIN, "http://127.0.0.1:8080")];
        assert_eq!(status(&hosts, Method::GET, &own), None);
        for origin in ["http://127.0.0.1:9000", "null", "http://evil.example", "https://127.0.0.1:8080"] {
            let other = [(header::HOST, "127.0.0.1:8080"), (header::ORIGIN, origin)];
            assert_eq!(status(&hosts, Method::GET, &other), Some(403), "{origin}");
        }
    }

    #[test]
    fn changes_need_a_content_type_no_form_can_send() {
        let hosts = Hosts::default();
        let host = (header::HOST, "127.0.0.1:8080");
        assert_eq!(status(&hosts, Method::POST, std::slice::from_ref(&host)), Some(415), "no Content-Type");
        for form in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "TEXT/Plain"]
        {
            assert_eq!(
                status(&hosts, Method::POST, &[host.clone(), (header::CONTENT_TYPE, form)]),
                Some(415),
                "{form}"
            );
        }
        for fine in ["application/json", "application/json; charset=utf-8", "application/octet-stream"] {
            assert_eq!(status(&hosts, Method::PUT, &[host.clone(), (header::CONTENT_TYPE, fine)]), None, "{fine}");
        }
        assert_eq!(status(&hosts, Method::DELETE, std::slice::from_ref(&host)), Some(415));
        assert_eq!(status(&hosts, Method::GET, &[host]), None, "reads need none");
    }
}
