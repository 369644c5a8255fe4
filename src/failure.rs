//! Why an upstream call for an insight produced nothing to answer with, typed by where the fault
//! lies. The origin decides two things (docs/trust.md):
//! - only an upstream outage (connect error, timeout, a broken answer, 5xx, or the circuit that
//!   such outages opened) may stand cached data in for a fresh answer, or skip a revalidation;
//! - only an upstream-origin failure counts against the upstream's circuit breaker.
//!
//! A failure the proxy made itself, or one the client's input caused, never unlocks cached data.

use crate::error::ApiError;
use std::sync::Arc;

use crate::refresh::Shortfall;
use crate::upstream::{UpstreamError, UpstreamResponse};

/// PostHog's message when a team runs too many queries.
pub const CONCURRENCY_LIMIT_EXCEEDED: &str = "concurrency_limit_exceeded";

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's input (rejected at the front door before any work; listed for completeness).
    Client,
    /// The proxy itself: its budget, its admission of unknown credentials, its own bugs.
    Proxy,
    /// The upstream: unreachable, too slow, broken, or answering 5xx.
    Upstream,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The call did not complete: the upstream's fault, but for a request the proxy could not send.
    Upstream(UpstreamError),
    /// The upstream answered 5xx: its answer, relayed when nothing cached may stand in.
    Status(Arc<UpstreamResponse>),
    /// The upstream answered 200 with something that is not an insight.
    Garbage,
    /// The proxy's own budget for the upstream is spent (it never causes an upstream limit error).
    Budget,
    /// The credential is one the upstream has not accepted recently, and the proxy's allowance
    /// for confirming such credentials is spent for this second.
    Unconfirmed,
    /// The work was dropped before it produced an outcome (the proxy's own doing).
    Interrupted,
}

impl Failure {
    pub fn origin(&self) -> Origin {
        match self {
            Failure::Upstream(UpstreamError::Unsendable) => Origin::Proxy,
            Failure::Upstream(_) => Origin::Upstream,
            Failure::Status(_) | Failure::Garbage => Origin::Upstream,
            Failure::Budget | Failure::Unconfirmed | Failure::Interrupted => Origin::Proxy,
        }
    }

    /// Whether the upstream is down or failing, the one case where a cached answer may stand in
    /// (stale-if-error, or a revalidation that could not be made).
    pub fn is_upstream_outage(&self) -> bool {
        match self {
            Failure::Upstream(e) => e.is_outage(),
            Failure::Status(r) => r.status >= 500,
            _ => false,
        }
    }

    /// What a failed calculation leaves for the fallback ([`crate::refresh::fallback`]).
    pub fn shortfall(&self) -> Shortfall {
        match self {
            f if f.is_upstream_outage() => Shortfall::Outage,
            Failure::Budget => Shortfall::Budget,
            _ => Shortfall::Other,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Upstream(e) => e.as_str(),
            Failure::Status(_) => "status_5xx",
            Failure::Garbage => "garbage",
            Failure::Budget => "budget",
            Failure::Unconfirmed => "unconfirmed",
            Failure::Interrupted => "interrupted",
        }
    }

    pub fn to_api_error(&self) -> ApiError {
        match self {
            Failure::Upstream(UpstreamError::Timeout) => {
                ApiError::gateway_timeout("The upstream did not answer in time.")
            }
            Failure::Upstream(UpstreamError::Connect) => ApiError::bad_gateway("The upstream is unreachable."),
            Failure::Upstream(UpstreamError::TooLarge(n)) => {
                ApiError::bad_gateway(format!("The upstream's answer is larger than {n} bytes."))
            }
            Failure::Upstream(UpstreamError::Broken) => ApiError::bad_gateway("The upstream closed the connection."),
            Failure::Upstream(UpstreamError::CircuitOpen) => {
                ApiError::service_unavailable("The upstream is failing; the proxy is not calling it for a moment.")
            }
            Failure::Upstream(UpstreamError::Unsendable) => {
                ApiError::bad_request("The request cannot be forwarded to the upstream.")
            }
            Failure::Status(r) => ApiError::bad_gateway(format!("The upstream answered with status {}.", r.status)),
            Failure::Garbage => ApiError::bad_gateway("The upstream's answer is not a valid insight."),
            Failure::Budget => ApiError::throttled(CONCURRENCY_LIMIT_EXCEEDED),
            Failure::Unconfirmed => {
                ApiError::throttled("Request was throttled. Too many requests with credentials not yet verified.")
            }
            Failure::Interrupted => ApiError::service_unavailable("The calculation was interrupted."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_upstream_outages_unlock_cached_data() {
        let unlock = [
            Failure::Upstream(UpstreamError::Connect),
            Failure::Upstream(UpstreamError::Timeout),
            Failure::Upstream(UpstreamError::Broken),
            Failure::Upstream(UpstreamError::CircuitOpen),
            Failure::Status(Arc::new(UpstreamResponse { status: 500, ..Default::default() })),
            Failure::Status(Arc::new(UpstreamResponse { status: 503, ..Default::default() })),
        ];
        let closed = [
            Failure::Upstream(UpstreamError::Unsendable),
            Failure::Upstream(UpstreamError::TooLarge(10)),
            Failure::Garbage,
            Failure::Budget,
            Failure::Unconfirmed,
            Failure::Interrupted,
        ];
        for f in unlock {
            assert!(f.is_upstream_outage(), "{f:?}");
            assert_eq!(f.origin(), Origin::Upstream);
        }
        for f in closed {
            assert!(!f.is_upstream_outage(), "{f:?}");
        }
        assert_eq!(Failure::Upstream(UpstreamError::Unsendable).origin(), Origin::Proxy);
        assert_eq!(Failure::Budget.origin(), Origin::Proxy);
    }
}
