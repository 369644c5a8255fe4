//! PostHog's error bodies: `{"type","code","detail","attr"}`, as DRF's exception handler renders
//! them (docs/refresh-semantics.md §6, §7 for the 403, 405 and 429 cases the simulator answers).

use serde_json::{json, Value};

/// One PostHog-shaped error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {detail}")]
pub struct ApiError {
    pub status: u16,
    /// PostHog's `type`: `invalid_request`, `validation_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub code: &'static str,
    pub detail: String,
    /// The field the error is about, if any.
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

    pub fn not_authenticated() -> Self {
        Self::new(401, "authentication_error", "not_authenticated", "Authentication credentials were not provided.")
    }

    pub fn authentication_failed(detail: impl Into<String>) -> Self {
        Self::new(401, "authentication_error", "authentication_failed", detail)
    }

    pub fn permission_denied(detail: impl Into<String>) -> Self {
        Self::new(403, "authentication_error", "permission_denied", detail)
    }

    pub fn throttled(detail: impl Into<String>) -> Self {
        Self::new(429, "throttled_error", "throttled", detail)
    }

    pub fn to_json(&self) -> Value {
        json!({ "type": self.kind, "code": self.code, "detail": self.detail, "attr": self.attr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_drf_shape() {
        assert_eq!(
            ApiError::not_found().to_json(),
            json!({"type": "invalid_request", "code": "not_found", "detail": "Not found.", "attr": null})
        );
        let e = ApiError::bad_request("This field is required.").with_attr("token");
        assert_eq!(e.to_json()["attr"], "token");
        assert_eq!(e.to_json()["type"], "validation_error");
    }
}
