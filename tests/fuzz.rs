//! Property-based fuzzing of the pure request-handling pieces: the router, the query parser, the
//! refresh parser, the cache-key builder and the upstream-body parser. Stable Rust has no
//! cargo-fuzz, so these run under proptest; CI raises the case count (PROPTEST_CASES).

use http::Method;
use insights_proxy::auth::Principal;
use insights_proxy::cache::PartitionKeyer;
use insights_proxy::cache::{CacheKey, Entry, Partition};
use insights_proxy::query::QueryParams;
use insights_proxy::refresh::{RefreshMode, RefreshParam};
use insights_proxy::routes::{route, Route};
use proptest::prelude::*;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::PATCH), Just(Method::PUT), Just(Method::DELETE)]
}

/// Paths that look like the API's, with hostile segments mixed in.
fn api_path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("api".to_string()),
        Just("environments".to_string()),
        Just("projects".to_string()),
        Just("insights".to_string()),
        Just("query".to_string()),
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        Just("".to_string()),
        "[0-9]{1,25}",
        "[a-zA-Z0-9%._~@-]{0,12}",
    ];
    proptest::collection::vec(seg, 0..8).prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    #[test]
    fn router_never_panics_and_never_routes_dot_segments(m in method(), path in api_path(), q in ".{0,40}") {
        let query = QueryParams::parse(Some(&q)).unwrap_or_default();
        let r = route(&m, &path, &query);
        let dotted = path.split('/').any(|s| s == ".." || s.eq_ignore_ascii_case("%2e%2e"));
        if dotted {
            prop_assert!(matches!(r, Route::Reject(_)), "{path} routed to {r:?}");
        }
        if let Route::InsightRetrieve { project, insight } = r {
            prop_assert_eq!(m, Method::GET);
            let numbers: Vec<u64> = path.split('/').filter_map(|s| s.parse().ok()).collect();
            prop_assert!(numbers.contains(&project) && numbers.contains(&insight), "{path}");
        }
    }

    #[test]
    fn any_string_routes_without_panicking(path in "\\PC{0,60}") {
        let _ = route(&Method::GET, &path, &QueryParams::default());
    }

    #[test]
    fn query_parsing_never_panics_and_round_trips(q in "[a-z%=&+0-9A-F\u{e9}]{0,60}") {
        if let Ok(parsed) = QueryParams::parse(Some(&q)) {
            let again = QueryParams::parse(Some(&parsed.encode_without(&[], &[]))).unwrap();
            prop_assert_eq!(parsed, again);
        }
    }

    #[test]
    fn refresh_parsing_is_total(s in "\\PC{0,30}") {
        let mode = RefreshParam::Text(&s).mode();
        prop_assert!(RefreshMode::ALL.contains(&mode));
        let lower = s.to_ascii_lowercase();
        if ["true", "1", "yes", ""].contains(&lower.as_str()) {
            prop_assert_eq!(mode, RefreshMode::ForceBlocking);
        }
    }

    #[test]
    fn keys_ignore_refresh_and_parameter_order(
        dash in proptest::option::of(0u64..100),
        filters in proptest::option::of("[a-z0-9{}:,\"]{0,20}"),
        refresh in "[a-z_]{0,12}",
    ) {
        let p = Partition([7; 16]);
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let Some(d) = dash { pairs.push(("from_dashboard".into(), d.to_string())); }
        if let Some(f) = &filters { pairs.push(("filters_override".into(), f.clone())); }
        let encode = |pairs: &[(String, String)]| pairs.iter()
            .map(|(k, v)| format!("{k}={}", insights_proxy::query::encode(v)))
            .collect::<Vec<_>>().join("&");
        let base = CacheKey::new(p, 1, 2, &QueryParams::parse(Some(&encode(&pairs))).unwrap());
        let mut with_refresh = pairs.clone();
        with_refresh.push(("refresh".into(), refresh));
        with_refresh.push(("client_query_id".into(), "x".into()));
        with_refresh.reverse();
        let other = CacheKey::new(p, 1, 2, &QueryParams::parse(Some(&encode(&with_refresh))).unwrap());
        prop_assert_eq!(base, other);
    }

    #[test]
    fn the_principal_is_the_first_carrier_and_junk_beside_it_changes_nothing(
        key in "[!-~]{1,16}", junk in "[!-~&&[^;]]{1,16}", other in "[!-~]{1,16}",
    ) {
        let keyer = PartitionKeyer::new(None);
        let base = Principal::api_key(&keyer, &key);
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, format!("Bearer {key}").parse().unwrap());
        h.insert(http::header::COOKIE, format!("sessionid={junk}").parse().unwrap());
        let with_junk = Principal::from_request(&keyer, &h, Some(&junk), Some(&junk)).unwrap().unwrap();
        prop_assert_eq!(with_junk.partition(), base.partition());
        prop_assert_eq!(with_junk.rate_key(), base.rate_key());
        prop_assert_eq!(with_junk.upstream_header(), base.upstream_header());
        let in_query = Principal::from_request(&keyer, &http::HeaderMap::new(), Some(&key), Some(&junk)).unwrap().unwrap();
        prop_assert_eq!(in_query.partition(), base.partition());
        if other != key {
            prop_assert_ne!(Principal::api_key(&keyer, &other).partition(), base.partition());
        }
    }

    #[test]
    fn upstream_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Entry::from_upstream(&body, 1, 1);
    }

    #[test]
    fn json_shaped_bodies_never_panic(result in "(null|\\[1\\]|\\{\\}|1)", lr in "(\"2026-01-01T00:00:00Z\"|null|1|\"x\")",
                                      interval in "(\"day\"|\"x\"|1|null)", date_to in "(\"2024-01-31\"|\"-1d\"|null|3)") {
        let body = format!(r#"{{"id":1,"result":{result},"last_refresh":{lr},"query":{{"source":{{"interval":{interval},"dateRange":{{"date_to":{date_to}}}}}}}}}"#);
        if let Ok(e) = Entry::from_upstream(body.as_bytes(), 1, 1) {
            let rendered: serde_json::Value = serde_json::from_slice(&e.render(true, None)).unwrap();
            prop_assert_eq!(&rendered["is_cached"], &serde_json::Value::Bool(true));
        }
    }
}
