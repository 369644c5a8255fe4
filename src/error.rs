//! Errors in PostHog's shape: `{"type","code","detail","attr"}` (DRF exception handler).
//!
//! Every error the proxy produces itself goes through [`ApiError`], so a client never sees
//! pingora's internal text or upstream addresses.

use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {detail}")]
pub struct ApiError {
    pub status: u16,
    /// PostHog's `type`: `invalid_request`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    pub code: &'static str,
    pub detail: String,
    pub attr: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, kind, code, detail: detail.into(), attr: None }
    }

    pub fn with_attr(mut self, attr: &'static str) -> Self {
        self.attr = Some(attr);
        self
    }

    pub fn not_found() -> Self {
        Self::new(404, "invalid_request", "not_found", "Not found.")
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(400, "validation_error", "invalid_input", detail)
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(405, "invalid_request", "method_not_allowed", format!("Method \"{method}\" not allowed."))
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(413, "invalid_request", "payload_too_large", format!("Request body is larger than {limit} bytes."))
    }

    pub fn uri_too_long(limit: usize) -> Self {
        Self::new(414, "invalid_request", "uri_too_long", format!("Request URI is longer than {limit} bytes."))
    }

    pub fn headers_too_large() -> Self {
        Self::new(431, "invalid_request", "headers_too_large", "Request headers are too large.")
    }

    pub fn not_authenticated() -> Self {
        Self::new(401, "authentication_error", "not_authenticated", "Authentication credentials were not provided.")
    }

    pub fn authentication_failed(detail: impl Into<String>) -> Self {
        Self::new(401, "authentication_error", "authentication_failed", detail)
    }

    pub fn permission_denied(detail: impl Into<String>) -> Self {
        Self::new(403, "authentication_error", "permission_denied", detail)
    }

    pub fn bad_gateway(detail: impl Into<String>) -> Self {
        Self::new(502, "server_error", "bad_gateway", detail)
    }

    pub fn gateway_timeout(detail: impl Into<String>) -> Self {
        Self::new(504, "server_error", "gateway_timeout", detail)
    }

    pub fn service_unavailable(detail: impl Into<String>) -> Self {
        Self::new(503, "server_error", "service_unavailable", detail)
    }

    pub fn throttled(detail: impl Into<String>) -> Self {
        Self::new(429, "throttled_error", "throttled", detail)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({ "type": self.kind, "code": self.code, "detail": self.detail, "attr": self.attr })
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(self.to_json().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_posthogs() {
        let v: serde_json::Value = serde_json::from_slice(&ApiError::not_found().body()).unwrap();
        assert_eq!(v, json!({"type":"invalid_request","code":"not_found","detail":"Not found.","attr":null}));
    }
}
