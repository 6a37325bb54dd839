//! `GET /api/openapi.json`: an OpenAPI 3.0 description of the REST API, written by hand beside
//! the routes; a test holds it to the router's table of routes, and a process test calls every
//! route it describes.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The description.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/openapi.json`.
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_covers_every_route_and_no_other() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, operations) in doc["paths"].as_object().unwrap() {
            for method in operations.as_object().unwrap().keys() {
                described.push((method.to_uppercase(), path.clone()));
            }
        }
        described.sort();
        let mut routes: Vec<(String, String)> =
            super::super::route_list().into_iter().map(|(m, p)| (m.to_string(), p)).collect();
        routes.sort();
        assert_eq!(described, routes);
        // Every operation says what it answers, and all but the public ones say 401.
        for (method, path) in &routes {
            let operation = &doc["paths"][path][method.to_lowercase()];
            assert!(operation["summary"].is_string(), "{method} {path}");
            let public = operation["security"].as_array().is_some_and(|s| s.is_empty());
            assert_eq!(operation["responses"]["401"].is_null(), public, "{method} {path}");
        }
    }
}
