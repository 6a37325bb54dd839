//! The web UI: a page and two files (plain HTML, an ES module and a stylesheet, no build
//! step), built into the binary and served on the HTTP port. They hold no data: everything
//! the page shows comes from the API, with the token its login set.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

/// `GET /`: the page.
pub async fn index() -> Response {
    served("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{file}`: `app.js` or `style.css`.
pub async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => served("text/javascript; charset=utf-8", APP),
        "style.css" => served("text/css; charset=utf-8", STYLE),
        _ => super::error(StatusCode::NOT_FOUND, None, format!("no such file: /ui/{file}")),
    }
}

fn served(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // The page loads only its own files and talks only to its own origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
