//! One insight as the proxy asks the upstream about it on a caller's behalf.

use http::Method;

use crate::auth::Principal;
use crate::cache::CacheKey;
use crate::query::QueryParams;
use crate::refresh::UpstreamRefresh;
use crate::upstream::UpstreamRequest;

/// Everything needed to ask the upstream about one insight on a caller's behalf.
#[derive(Debug, Clone)]
pub struct CalcSpec {
    pub key: CacheKey,
    pub project: u64,
    pub insight: u64,
    /// The path as the client sent it, so the upstream sees the same alias.
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
}

/// Query parameters that never go upstream from the proxy's own calls: the proxy sets `refresh`
/// itself, a client's `client_query_id` names the client's query, not ours, and the credential
/// travels only as the principal's one header.
const NOT_FORWARDED: [&str; 3] = ["refresh", "client_query_id", "personal_api_key"];

/// A GET the proxy makes on a principal's behalf: the client's parameters with the proxy's
/// `refresh`, and exactly one credential, the principal's.
pub fn own_request(path: &str, query: &QueryParams, principal: &Principal, refresh: &str) -> UpstreamRequest {
    let query = query.encode_without(&NOT_FORWARDED, &[("refresh", refresh)]);
    UpstreamRequest {
        method: Method::GET,
        path_and_query: format!("{path}?{query}"),
        headers: vec![principal.upstream_header()],
        body: None,
    }
}

impl CalcSpec {
    pub fn dashboard_id(&self) -> Option<u64> {
        self.query.get("from_dashboard").and_then(|d| d.parse().ok())
    }

    pub fn upstream_request(&self, refresh: UpstreamRefresh) -> UpstreamRequest {
        own_request(&self.path, &self.query, &self.principal, refresh.as_str())
    }
}
