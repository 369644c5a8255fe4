//! Answering insight requests: retrieve ([`retrieve`]), list pages ([`list`]) and polls of the
//! proxy's own query statuses ([`query_status`]). Each handler turns a request into a [`Reply`];
//! what a request does is decided by [`crate::refresh::plan`] and carried out by
//! [`crate::engine::Engine`]; the HTTP glue only parses and writes.

mod answer;
mod body;
mod list;
mod poll;
mod vouch;

use bytes::Bytes;

use crate::auth::Principal;
use crate::cache::sealed::SealedFile;
use crate::cache_status::CacheStatus;
use crate::error::ApiError;
use crate::query::QueryParams;
use crate::refresh::RefreshMode;

pub use answer::retrieve;
pub use list::{client_page_link, list, list_in_full, rewrite_origin, ListCall};
pub use poll::{is_own_query_id, query_status};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// How it was produced: its `Cache-Status` header and metric label.
    pub cache_status: CacheStatus,
    /// The upstream's headers relayed with its answer (`Retry-After`, `WWW-Authenticate`).
    pub relayed: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The sealed file of the cached bytes `body` was taken from, if large: the cleartext HTTP/1
    /// writer sends from it when `body` is a view of it (`SealedFile::offset_of`).
    pub file: Option<SealedFile>,
}

impl Reply {
    pub fn json(status: u16, body: Bytes, cache_status: CacheStatus) -> Self {
        Self { status, body, content_type: None, cache_status, relayed: Vec::new(), file: None }
    }

    /// A 200 answer of bytes taken from a cached insight or a kept page, with its sealed file.
    fn kept(body: Bytes, file: Option<&SealedFile>, cache_status: CacheStatus) -> Self {
        Self { file: file.cloned(), ..Self::json(200, body, cache_status) }
    }

    pub fn error(e: &ApiError, cache_status: CacheStatus) -> Self {
        Self::json(e.status, e.body(), cache_status)
    }

    fn relay(resp: &crate::upstream::UpstreamResponse, cache_status: CacheStatus) -> Self {
        Self {
            status: resp.status,
            body: resp.body.clone(),
            content_type: resp.content_type.clone(),
            cache_status,
            relayed: resp.relayed.clone(),
            file: None,
        }
    }
}

/// What the client asked of one insight: the execution mode, and whether its `refresh` counts as
/// one at all (it decides the answer's `timezone`).
#[derive(Debug, Clone, Copy)]
struct Ask {
    mode: RefreshMode,
    truthy: bool,
}

/// One insight request, already routed and parsed.
#[derive(Debug, Clone)]
pub struct InsightCall {
    pub project: u64,
    pub insight: u64,
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
    pub mode: RefreshMode,
    /// Whether the client's `refresh` counts as one ([`crate::refresh::RefreshParam::truthy`]).
    pub truthy: bool,
}
