//! What every device request through the API takes: `?timeout=` and `?format=`, and the
//! wait for the device's answer.

use std::time::Duration;

use axum::http::StatusCode;
use tether::lwm2m::Lwm2mError;

use super::{bad_request, failure, ApiError};

/// Longest `?timeout=` in seconds: a queue-mode device may sleep this long.
pub const MAX_TIMEOUT_S: f64 = 300.0;
/// `?timeout=` when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `?timeout=SECONDS` and `?format=NAME` of a device request.
pub struct RequestOptions {
    pub timeout: Duration,
    pub format: Option<u16>,
    /// Every other query parameter, in order (Write-Attributes reads them).
    pub rest: Vec<(String, String)>,
}

impl RequestOptions {
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        Self::parse_with(query, DEFAULT_TIMEOUT)
    }

    /// Like [`parse`](Self::parse), with `default_timeout` when `?timeout=` is not given.
    pub fn parse_with(query: Option<&str>, default_timeout: Duration) -> Result<Self, ApiError> {
        let mut options = Self { timeout: default_timeout, format: None, rest: Vec::new() };
        for item in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match key {
                "timeout" => match value.parse::<f64>() {
                    Ok(s) if (0.1..=MAX_TIMEOUT_S).contains(&s) => options.timeout = Duration::from_secs_f64(s),
                    _ => {
                        return Err(bad_request(format!(
                            "timeout={value:?}: seconds between 0.1 and {MAX_TIMEOUT_S} (default {})",
                            default_timeout.as_secs()
                        )))
                    }
                },
                "format" => match content_format(value) {
                    Some(code) => options.format = Some(code),
                    None => {
                        return Err(bad_request(format!(
                            "format={value:?}: one of text, opaque, tlv, senml-json, senml-cbor, link, or a number"
                        )))
                    }
                },
                _ => options.rest.push((key.to_string(), value.to_string())),
            }
        }
        Ok(options)
    }

    /// `timeout` and `format` only: any other parameter is refused.
    pub fn parse_only(query: Option<&str>) -> Result<Self, ApiError> {
        let options = Self::parse(query)?;
        options.no_others()?;
        Ok(options)
    }

    /// Refuses parameters this route does not take.
    pub fn no_others(&self) -> Result<(), ApiError> {
        match self.rest.first() {
            Some((key, _)) => Err(bad_request(format!("unknown query parameter {key:?} (known: timeout, format)"))),
            None => Ok(()),
        }
    }
}

fn content_format(name: &str) -> Option<u16> {
    use tether_coap::content::format;
    Some(match name {
        "text" | "text/plain" => format::TEXT,
        "opaque" | "octet-stream" => format::OPAQUE,
        "tlv" => format::TLV,
        "senml-json" | "senml+json" => format::SENML_JSON,
        "senml-cbor" | "senml+cbor" => format::SENML_CBOR,
        "link" | "link-format" => format::LINK,
        number => number.parse().ok()?,
    })
}

/// Waits for a device's answer at most `timeout`.
pub async fn within<T>(
    timeout: Duration,
    request: impl std::future::Future<Output = Result<T, Lwm2mError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(err)) => Err(failure(err)),
        Err(_) => Err(ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "the request timed out: no answer from the device within {:.1} s (?timeout= to wait longer)",
                timeout.as_secs_f64()
            ),
        }),
    }
}
