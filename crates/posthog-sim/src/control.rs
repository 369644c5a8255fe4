//! `/_sim/…`: an unauthenticated control API so benchmarks can drive a simulator running as a
//! separate process (stats, revocation, access, faults, clock, calculation delay).

use crate::error::ApiError;
use crate::handler::json_response;
use crate::params::Params;
use crate::{Fault, Inner, SimResponse};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Clock moves are capped at ~100 years: `Clock::now` must stay representable.
const MAX_ADVANCE_SECONDS: u64 = 100 * 365 * 86_400;
/// Calculation delays are capped at a day.
const MAX_DELAY_MS: u64 = 86_400_000;

pub(crate) fn handle(inner: &Arc<Inner>, method: &str, path: &str, params: &Params) -> SimResponse {
    let path = path.strip_suffix('/').unwrap_or(path);
    let result = match (method, path) {
        ("GET", "/_sim/stats") => Ok(stats(inner)),
        ("POST", "/_sim/revoke") => required(params, "token").map(|t| inner.auth.revoke(t)).map(|()| ok()),
        ("POST", "/_sim/access") => access(inner, params),
        ("POST", "/_sim/fault") => fault(params).map(|f| *inner.fault.write() = f).map(|()| ok()),
        ("POST", "/_sim/clock/advance") => number(params, "seconds", MAX_ADVANCE_SECONDS).map(|s| {
            inner.clock.advance(Duration::from_secs(s));
            ok()
        }),
        ("POST", "/_sim/calc_delay") => number(params, "ms", MAX_DELAY_MS).map(|ms| {
            inner.set_calc_delay(Duration::from_millis(ms));
            ok()
        }),
        (
            _,
            "/_sim/stats"
            | "/_sim/revoke"
            | "/_sim/access"
            | "/_sim/fault"
            | "/_sim/clock/advance"
            | "/_sim/calc_delay",
        ) => Err(ApiError::method_not_allowed(method)),
        _ => Err(ApiError::not_found()),
    };
    result.unwrap_or_else(SimResponse::from)
}

fn ok() -> SimResponse {
    json_response(200, json!({"ok": true}).to_string())
}

fn stats(inner: &Inner) -> SimResponse {
    let calculations: Map<String, Value> = inner
        .engine
        .calculation_counts()
        .into_iter()
        .map(|((project, insight), n)| (format!("{project}/{insight}"), n.into()))
        .collect();
    let body = json!({
        "total_calculations": inner.engine.total_calculations(),
        "requests": inner.requests.load(Ordering::Relaxed),
        "throttled": inner.throttled.load(Ordering::Relaxed),
        "limit_errors": inner.limit_errors.load(Ordering::Relaxed),
        "calculations": calculations,
    });
    json_response(200, body.to_string())
}

fn required<'p>(params: &'p Params, name: &'static str) -> Result<&'p str, ApiError> {
    params
        .get(name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request("This field is required.").with_attr(name))
}

fn number(params: &Params, name: &'static str, max: u64) -> Result<u64, ApiError> {
    required(params, name)?
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| ApiError::bad_request(format!("Expected an integer between 0 and {max}.")).with_attr(name))
}

fn access(inner: &Inner, params: &Params) -> Result<SimResponse, ApiError> {
    let token = required(params, "token")?;
    let project = number(params, "project", u64::MAX)?;
    let allowed = match params.get("allowed").unwrap_or("true") {
        "true" | "1" => true,
        "false" | "0" => false,
        _ => return Err(ApiError::bad_request("Expected true or false.").with_attr("allowed")),
    };
    inner.auth.set_access(token, project, allowed);
    Ok(ok())
}

fn fault(params: &Params) -> Result<Fault, ApiError> {
    Ok(match required(params, "kind")? {
        "none" => Fault::None,
        "status" => {
            let code = number(params, "status", 599)?;
            if code < 200 {
                return Err(ApiError::bad_request("Expected a status between 200 and 599.").with_attr("status"));
            }
            Fault::Status(code as u16)
        }
        "garbage" => Fault::Garbage,
        "hang" => Fault::Hang,
        "null_result" => Fault::NullResult,
        "concurrency" => Fault::Concurrency,
        _ => return Err(ApiError::bad_request("Unknown fault kind.").with_attr("kind")),
    })
}
