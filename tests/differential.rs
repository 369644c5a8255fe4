//! Differential test: PostHog (the built-in simulator) answered straight, against the same
//! PostHog answered through the proxy.
//!
//! Each area plays one scripted request sequence twice, in lockstep: two simulators started from
//! the SAME `SimConfig` (same seed, same data), one proxy in front of the second, and ONE shared
//! `Clock` (so `clock.advance` ages both sides' caches alike). Every step sends the request
//! straight to simulator A ("direct"), then the same request through the proxy to simulator B
//! ("proxy"), and compares the two answers: the status, the headers that matter (`Retry-After`,
//! `Content-Type`, `Location`, `WWW-Authenticate`, plus the proxy's own `Cache-Status`), and every
//! JSON field, recursively, by JSON path — and, reported separately, the order of object keys.
//! A step that leaves background work (a `query_status` that is not complete) polls each side's
//! status until it completes (bounded), compares the two finished polls, and waits until the
//! proxy's job queue and calculation budget are idle and neither simulator is still calculating.
//!
//! Everything the two sides may legitimately disagree on is listed in ONE table, [`ALLOWED`]:
//! anything else is a difference. Each area collects ALL differences (it never stops at the
//! first), deduplicates them by (area, JSON path with array indices folded, kind), and fails with
//! one report listing each once, with the first step that produced it and both values. Each area
//! also asserts that it made its requests and compared a non-trivial number of fields, so it
//! cannot pass vacuously; `the_comparison_finds_what_it_is_shown` checks the comparison itself.
//!
//! Nondeterminism that is not the proxy's doing, and how it is neutralised:
//! * `Clock` is wall time plus an offset, so the two sides of a step compute timestamps a few
//!   milliseconds apart. RFC 3339 datetimes compare equal when they are within the longest step
//!   span seen so far (+1 s): the script's clock moves are hours, so this cannot hide an entry of
//!   another cache state, and recalculations also show in `calculation_number` and `is_cached`.
//! * Bucket labels, `resolved_date_range` and HogQL of minute- and hour-interval insights change
//!   at a minute boundary: before each step the clock is moved past the next minute boundary when
//!   fewer than 15 s remain, so both sides of a step fall in the same minute.
//! * 429 answers say how many seconds remain in the window, computed from the instant of each
//!   side's request: `Retry-After` and the `detail` text may differ by one second.
//! * Poll answers of a running query depend on how far its calculation got: only finished polls
//!   are compared (the poll area fixes a long calculation delay to compare "running" answers).
//!
//! The simulator (`crates/posthog-sim`) decides staleness and parses `refresh` with its own code,
//! written from PostHog's, not the proxy's: a staleness or parsing bug in the proxy shows as a
//! difference here.
//!
//! Run: `cargo test --test differential` (each area also alone, e.g.
//! `cargo test --test differential list_pages -- --nocapture`).
//! `DIFFERENTIAL_KEY_ORDER=report` lists key-order differences without failing on them;
//! `=off` skips that check. `DIFFERENTIAL_TRACE=<text>` prints both answers of every step whose
//! label contains the text (with `-- --nocapture`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, start_backend, start_proxy, test_config, Resp, ALL, P1, P2};
use insights_proxy::app::App;
use insights_proxy::clock::{parse_datetime, Clock};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use posthog_sim::{Fault, SimConfig, Simulator};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The allowed differences: the ONE table.
// ---------------------------------------------------------------------------------------------

/// When an allowed difference is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// The proxy answered from its own cache: its `Cache-Status` says `hit`.
    ProxyServedItsCache,
    /// Both null or both strings; a proxy id is mapped to the direct id at the same place (the
    /// same proxy id must always map to the same direct id), so later polls use each side's own.
    BothNullOrBothStrings,
    /// The proxy's answer carries the header (any value); PostHog never sends it.
    ProxySendsIt,
    /// Equal but for one integer (seconds), which differs by at most 1.
    WithinOneSecond,
    /// The same link once each side's own origin is removed: path and every query parameter equal.
    SameLinkAfterOrigin,
    /// Both RFC 3339 datetimes within the longest step span (+1 s), and written alike.
    SameInstantWithinStepSpan,
}

struct Allowed {
    /// A JSON path pattern (`**` = any number of segments, array indices folded) or `header:name`.
    target: &'static str,
    when: When,
    reason: &'static str,
}

const CACHED_TIMING: &str = "timing of the proxy's own cached result, served as the mode allows";

const ALLOWED: &[Allowed] = &[
    Allowed { target: "**.last_refresh", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.next_allowed_client_refresh", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.cache_target_age", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.is_cached", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.query_status.start_time", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.query_status.pickup_time", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.query_status.end_time", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed { target: "**.query_status.expiration_time", when: When::ProxyServedItsCache, reason: CACHED_TIMING },
    Allowed {
        target: "**.query_status.id",
        when: When::BothNullOrBothStrings,
        reason: "the proxy issues its own query ids by design",
    },
    Allowed {
        target: "**.query_status.task_id",
        when: When::BothNullOrBothStrings,
        reason: "the proxy runs the work, so the task is its own",
    },
    Allowed {
        target: "header:cache-status",
        when: When::ProxySendsIt,
        reason: "the proxy's own RFC 9211 header; a proxied answer without it is reported",
    },
    Allowed {
        target: "header:retry-after",
        when: When::WithinOneSecond,
        reason: "seconds left in the throttle window, taken at each side's own request instant",
    },
    Allowed {
        target: "detail",
        when: When::WithinOneSecond,
        reason: "429 text 'Expected available in N seconds', N taken at each side's own request instant",
    },
    Allowed {
        target: "**.next",
        when: When::SameLinkAfterOrigin,
        reason: "the proxy rewrites the upstream's origin to its own public base",
    },
    Allowed {
        target: "**.previous",
        when: When::SameLinkAfterOrigin,
        reason: "the proxy rewrites the upstream's origin to its own public base",
    },
    Allowed {
        target: "**",
        when: When::SameInstantWithinStepSpan,
        reason: "wall-clock instants of two requests sent milliseconds apart",
    },
];

/// Headers compared besides the status and the body.
const HEADERS: [&str; 4] = ["retry-after", "content-type", "location", "www-authenticate"];

// ---------------------------------------------------------------------------------------------
// JSON with key order kept (serde_json's map here is sorted).
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    /// The number's text, compared as written.
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            J::Null => "null",
            J::Bool(_) => "bool",
            J::Num(_) => "number",
            J::Str(_) => "string",
            J::Arr(_) => "array",
            J::Obj(_) => "object",
        }
    }

    fn render(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => out.push_str(&Value::String(s.clone()).to_string()),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.render(out);
                }
                out.push(']');
            }
            J::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    v.render(out);
                }
                out.push('}');
            }
        }
    }

    fn short(&self) -> String {
        let mut s = String::new();
        self.render(&mut s);
        shorten(&s)
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 160;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// Parses a complete JSON document, keeping object keys in their order.
fn parse_json(bytes: &[u8]) -> Option<J> {
    let mut p = Parser { s: bytes, i: 0 };
    let v = p.value(0)?;
    p.ws();
    (p.i == bytes.len()).then_some(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, text: &str, v: J) -> Option<J> {
        self.s[self.i..].starts_with(text.as_bytes()).then(|| {
            self.i += text.len();
            v
        })
    }

    fn value(&mut self, depth: usize) -> Option<J> {
        if depth > 200 {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'n' => self.literal("null", J::Null),
            b't' => self.literal("true", J::Bool(true)),
            b'f' => self.literal("false", J::Bool(false)),
            b'"' => self.string().map(J::Str),
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Some(J::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Some(J::Arr(items));
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut members = Vec::new();
                if self.eat(b'}') {
                    return Some(J::Obj(members));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return None;
                    }
                    members.push((key, self.value(depth + 1)?));
                    if self.eat(b'}') {
                        return Some(J::Obj(members));
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                text.parse::<f64>().ok()?;
                Some(J::Num(text.to_owned()))
            }
            _ => None,
        }
    }

    /// A string token, decoded by serde_json (escapes, surrogates).
    fn string(&mut self) -> Option<String> {
        if self.s.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i;
        self.i += 1;
        while self.i < self.s.len() {
            match self.s[self.i] {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return serde_json::from_slice::<String>(&self.s[start..self.i]).ok();
                }
                _ => self.i += 1,
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Paths, patterns and findings.
// ---------------------------------------------------------------------------------------------

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `results[3].query_status.id` → `results[].query_status.id`.
fn fold_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

fn segments(path: &str) -> Vec<&str> {
    if path.is_empty() {
        return Vec::new();
    }
    path.split('.').map(|s| s.trim_end_matches("[]")).collect()
}

fn glob(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..])),
        (Some(p), Some(s)) => (*p == "*" || p == s) && glob(&pattern[1..], &path[1..]),
        _ => false,
    }
}

fn rules_for(path: &str) -> Vec<usize> {
    thread_local! {
        static RULES: std::cell::RefCell<HashMap<String, Vec<usize>>> = std::cell::RefCell::new(HashMap::new());
    }
    let folded = fold_indices(path);
    if let Some(hit) = RULES.with(|r| r.borrow().get(&folded).cloned()) {
        return hit;
    }
    let rules = rules_for_folded(&folded);
    RULES.with(|r| r.borrow_mut().insert(folded, rules.clone()));
    rules
}

fn rules_for_folded(path: &str) -> Vec<usize> {
    let segs = segments(path);
    ALLOWED
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            if let Some(h) = a.target.strip_prefix("header:") {
                path.strip_prefix("header:") == Some(h)
            } else {
                !path.starts_with("header:") && glob(&segments(a.target), &segs)
            }
        })
        .map(|(i, _)| i)
        .collect()
}

#[derive(Clone, Debug)]
struct Finding {
    count: usize,
    step: String,
    path: String,
    direct: String,
    proxy: String,
    /// Every occurrence so far came after a paging client followed the proxy's own `next` link
    /// where it differs from PostHog's (so the two sides asked for different pages, and their
    /// caches parted ways from then on).
    diverged: bool,
    /// Other `refresh` values it was also seen with, and the first step of each (a few).
    also: BTreeMap<String, String>,
}

/// What one area found and how much it compared.
struct Area {
    name: &'static str,
    findings: BTreeMap<(String, String), Finding>,
    order: BTreeMap<String, Finding>,
    /// Steps after which the two simulators had calculated different insights (informational:
    /// it locates where a `calculation_number` difference comes from).
    work: BTreeMap<String, Finding>,
    allowed_uses: Vec<usize>,
    steps: usize,
    requests: usize,
    fields: usize,
    /// The steps now running follow a proxy link that differs from PostHog's.
    diverged: bool,
}

impl Finding {
    fn empty() -> Finding {
        Finding {
            count: 0,
            step: String::new(),
            path: String::new(),
            direct: String::new(),
            proxy: String::new(),
            diverged: true,
            also: BTreeMap::new(),
        }
    }
}

/// The `refresh=…` part of a step label (`refresh absent` included), if it names one.
fn refresh_of(step: &str) -> Option<&str> {
    let start = step.find("refresh=").or_else(|| step.find("refresh absent"))?;
    let rest = &step[start..];
    Some(
        &rest[..rest.find([' ', ',', ']', '`']).map_or(rest.len(), |i| {
            if rest.starts_with("refresh absent") {
                14
            } else {
                i
            }
        })],
    )
}

impl Area {
    fn new(name: &'static str) -> Area {
        Area {
            name,
            findings: BTreeMap::new(),
            order: BTreeMap::new(),
            work: BTreeMap::new(),
            allowed_uses: vec![0; ALLOWED.len()],
            steps: 0,
            requests: 0,
            fields: 0,
            diverged: false,
        }
    }

    fn add(&mut self, step: &str, path: &str, kind: impl Into<String>, direct: String, proxy: String) {
        let key = (fold_indices(path), kind.into());
        Self::note(self.findings.entry(key).or_insert_with(Finding::empty), self.diverged, step, path, direct, proxy);
    }

    fn add_order(&mut self, step: &str, path: &str, direct: String, proxy: String) {
        Self::note(
            self.order.entry(fold_indices(path)).or_insert_with(Finding::empty),
            self.diverged,
            step,
            path,
            direct,
            proxy,
        );
    }

    /// Counts an occurrence; the example is the first one, or the first that did not follow a
    /// diverged link.
    fn note(f: &mut Finding, diverged: bool, step: &str, path: &str, direct: String, proxy: String) {
        f.count += 1;
        if f.count == 1 || (f.diverged && !diverged) {
            let also = std::mem::take(&mut f.also);
            *f =
                Finding { count: f.count, step: step.to_owned(), path: path.to_owned(), direct, proxy, diverged, also };
        }
        if let Some(mode) = refresh_of(step) {
            if refresh_of(&f.step) != Some(mode) && f.also.len() < 6 && !diverged {
                f.also.entry(mode.to_owned()).or_insert_with(|| step.to_owned());
            }
        }
    }

    fn report(&self) -> String {
        let mut r = String::new();
        let _ = writeln!(
            r,
            "\n=== differential area `{}`: {} steps, {} requests, {} fields compared; {} differences, {} key-order differences ===",
            self.name,
            self.steps,
            self.requests,
            self.fields,
            self.findings.len(),
            self.order.len()
        );
        for ((path, kind), f) in &self.findings {
            let shown = if path.is_empty() { "(body)" } else { path };
            let _ = writeln!(r, "* {shown} — {kind} — {}×", f.count);
            let _ = writeln!(r, "    first at {}", f.step);
            if f.diverged {
                let _ = writeln!(r, "    (only seen after a paging client followed the proxy's own `next` link, which differs from PostHog's)");
            }
            if f.path != *path {
                let _ = writeln!(r, "    path:   {}", f.path);
            }
            let _ = writeln!(r, "    direct: {}", f.direct);
            let _ = writeln!(r, "    proxy:  {}", f.proxy);
            for (mode, step) in &f.also {
                let _ = writeln!(r, "    also with {mode}: first at {step}");
            }
        }
        if !self.order.is_empty() {
            let _ = writeln!(r, "--- key order (common keys in a different order) ---");
            for (path, f) in &self.order {
                let shown = if path.is_empty() { "(top level)" } else { path };
                let _ = writeln!(r, "* {shown} — {}×", f.count);
                let _ = writeln!(r, "    first at {}", f.step);
                let _ = writeln!(r, "    direct: {}", f.direct);
                let _ = writeln!(r, "    proxy:  {}", f.proxy);
            }
        }
        if !self.work.is_empty() {
            let _ = writeln!(r, "--- upstream calculations per step (informational, not a failure by itself) ---");
            for (kind, f) in &self.work {
                let _ = writeln!(r, "* {kind} — {}×", f.count);
                let _ = writeln!(r, "    first at {}: {}", f.step, f.proxy);
                if f.diverged {
                    let _ = writeln!(r, "    (only seen after a paging client followed the proxy's own `next` link)");
                }
            }
        }
        let _ = writeln!(r, "--- allowed differences used ---");
        for (a, n) in ALLOWED.iter().zip(&self.allowed_uses) {
            let _ = writeln!(r, "  {:>6}× {} ({:?}): {}", n, a.target, a.when, a.reason);
        }
        r
    }

    /// Fails with the report unless nothing differed; first checks the area was not vacuous.
    fn finish(self, min_steps: usize, min_fields: usize) {
        assert!(
            self.steps >= min_steps && self.fields >= min_fields,
            "area `{}` compared too little to mean anything: {} steps (want {min_steps}), {} fields (want {min_fields}){}",
            self.name,
            self.steps,
            self.fields,
            self.report()
        );
        let order_fails = key_order_mode() == KeyOrder::Fail && !self.order.is_empty();
        assert!(self.findings.is_empty() && !order_fails, "{}", self.report());
        println!("{}", self.report());
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyOrder {
    Fail,
    Report,
    Off,
}

fn key_order_mode() -> KeyOrder {
    static MODE: std::sync::OnceLock<KeyOrder> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("DIFFERENTIAL_KEY_ORDER").as_deref() {
        Ok("report") => KeyOrder::Report,
        Ok("off") => KeyOrder::Off,
        _ => KeyOrder::Fail,
    })
}

// ---------------------------------------------------------------------------------------------
// The comparison of one step's two answers.
// ---------------------------------------------------------------------------------------------

struct Comparison<'x> {
    area: &'x mut Area,
    /// proxy query id → direct query id.
    ids: &'x mut HashMap<String, String>,
    step: &'x str,
    proxy_hit: bool,
    tolerance: Duration,
    direct_origin: &'x str,
    proxy_origin: &'x str,
}

impl Comparison<'_> {
    fn responses(&mut self, d: &Resp, p: &Resp) {
        self.parsed(d, p, parse_json(&d.body).as_ref(), parse_json(&p.body).as_ref());
    }

    fn parsed(&mut self, d: &Resp, p: &Resp, dj: Option<&J>, pj: Option<&J>) {
        self.area.fields += 1;
        if d.status != p.status {
            // Each pair of statuses is its own finding: 401→404 and 500→502 are different faults.
            self.diff("status", &format!("{} vs {}", d.status, p.status), d.status.to_string(), p.status.to_string());
        }
        for name in HEADERS {
            self.header(name, d.status, d.header(name), p.header(name));
        }
        self.header("cache-status", d.status, d.header("cache-status"), p.header("cache-status"));
        let success = |s: u16| (200..300).contains(&s);
        if success(d.status) != success(p.status) {
            // A success and an error are different documents: one finding, not one per field.
            let kind = format!("body of a {} answer vs a {} answer", d.status, p.status);
            let show = |r: &Resp| shorten(&String::from_utf8_lossy(&r.body));
            self.diff("", &kind, show(d), show(p));
            return;
        }
        match (dj, pj) {
            (Some(dj), Some(pj)) => self.value("", dj, pj),
            (dj, pj) if dj.is_some() || pj.is_some() || d.body != p.body => {
                let show = |r: &Resp| shorten(&format!("{:?}", String::from_utf8_lossy(&r.body)));
                let kind = match (dj.is_some(), pj.is_some()) {
                    (true, false) => "JSON only on the direct side",
                    (false, true) => "JSON only on the proxy side",
                    _ => "different non-JSON bodies",
                };
                self.diff("", kind, show(d), show(p));
            }
            _ => self.area.fields += 1,
        }
    }

    fn header(&mut self, name: &str, status: u16, d: Option<&str>, p: Option<&str>) {
        self.area.fields += 1;
        let path = format!("header:{name}");
        let rules = rules_for(&path);
        for &i in &rules {
            let ok = match ALLOWED[i].when {
                When::ProxySendsIt => p.is_some() && d.is_none(),
                When::WithinOneSecond => d == p || matches!((d, p), (Some(a), Some(b)) if within_one_second(a, b)),
                _ => false,
            };
            if ok {
                if d != p {
                    self.area.allowed_uses[i] += 1;
                }
                return;
            }
        }
        if d != p || !rules.is_empty() {
            let show = |v: Option<&str>| v.map_or("<absent>".to_owned(), str::to_owned);
            let kind = match (d, p) {
                (Some(_), None) | (None, None) => "missing on the proxy",
                (None, Some(_)) => "only on the proxy",
                _ => "differs",
            };
            // Per (direct) status: a header missing on relayed 429s and on 503s are two findings.
            self.diff(&path, &format!("{kind} (on {status} answers)"), show(d), show(p));
        }
    }

    fn diff(&mut self, path: &str, kind: &str, direct: String, proxy: String) {
        self.area.add(self.step, path, kind, direct, proxy);
    }

    fn value(&mut self, path: &str, d: &J, p: &J) {
        match (d, p) {
            (J::Obj(dm), J::Obj(pm)) => {
                for (k, dv) in dm {
                    let at = child(path, k);
                    match pm.iter().find(|(pk, _)| pk == k) {
                        Some((_, pv)) => self.value(&at, dv, pv),
                        None => {
                            self.area.fields += 1;
                            self.diff(&at, "missing on the proxy", dv.short(), "<absent>".into());
                        }
                    }
                }
                for (k, pv) in pm {
                    if !dm.iter().any(|(dk, _)| dk == k) {
                        self.area.fields += 1;
                        self.diff(&child(path, k), "only on the proxy", "<absent>".into(), pv.short());
                    }
                }
                if key_order_mode() != KeyOrder::Off {
                    let common_d: Vec<&str> =
                        dm.iter().map(|(k, _)| k.as_str()).filter(|k| pm.iter().any(|(pk, _)| pk == k)).collect();
                    let common_p: Vec<&str> =
                        pm.iter().map(|(k, _)| k.as_str()).filter(|k| dm.iter().any(|(dk, _)| dk == k)).collect();
                    if common_d != common_p {
                        // From the first key out of place (with the one before it, for context).
                        let at = common_d.iter().zip(&common_p).position(|(a, b)| a != b).unwrap_or(0);
                        let from = at.saturating_sub(1);
                        let show = |keys: &[&str]| shorten(&format!("[{from}..] {}", keys[from..].join(", ")));
                        self.area.add_order(self.step, path, show(&common_d), show(&common_p));
                    }
                }
            }
            (J::Arr(da), J::Arr(pa)) => {
                if da.len() != pa.len() {
                    self.area.fields += 1;
                    self.diff(path, "array length", format!("{} items", da.len()), format!("{} items", pa.len()));
                }
                for (i, (dv, pv)) in da.iter().zip(pa).enumerate() {
                    self.value(&format!("{path}[{i}]"), dv, pv);
                }
            }
            _ => self.leaf(path, d, p),
        }
    }

    fn leaf(&mut self, path: &str, d: &J, p: &J) {
        self.area.fields += 1;
        let rules = rules_for(path);
        if let Some(&i) = rules.iter().find(|&&i| ALLOWED[i].when == When::BothNullOrBothStrings) {
            match (d, p) {
                (J::Null, J::Null) => return,
                (J::Str(ds), J::Str(ps)) => {
                    match self.ids.get(ps) {
                        Some(known) if known != ds => {
                            let kind = "one proxy id stands for two direct ids";
                            self.diff(path, kind, format!("{ds} (earlier {known})"), ps.clone());
                        }
                        _ => {
                            self.ids.insert(ps.clone(), ds.clone());
                        }
                    }
                    if ds != ps {
                        self.area.allowed_uses[i] += 1;
                    }
                    return;
                }
                _ => {}
            }
        }
        if d == p {
            return;
        }
        let mut datetime_kind = None;
        // Datetimes of the same instant first: that is sameness, not an allowance for a cache hit.
        let mut rules = rules;
        rules.sort_by_key(|&i| ALLOWED[i].when != When::SameInstantWithinStepSpan);
        for &i in &rules {
            let ok = match ALLOWED[i].when {
                When::ProxyServedItsCache => self.proxy_hit,
                When::WithinOneSecond => matches!((d, p), (J::Str(a), J::Str(b)) if within_one_second(a, b)),
                When::SameLinkAfterOrigin => {
                    if let (J::Str(a), J::Str(b)) = (d, p) {
                        self.link(path, a, b);
                        self.area.allowed_uses[i] += 1;
                        return;
                    }
                    false
                }
                When::SameInstantWithinStepSpan => match (d, p) {
                    (J::Str(a), J::Str(b)) => match same_instant(a, b, self.tolerance) {
                        Ok(same) => same,
                        Err(kind) => {
                            datetime_kind = Some(kind);
                            false
                        }
                    },
                    _ => false,
                },
                When::BothNullOrBothStrings | When::ProxySendsIt => false,
            };
            if ok {
                self.area.allowed_uses[i] += 1;
                return;
            }
        }
        let kind = match datetime_kind {
            Some(k) => k.to_owned(),
            None if d.kind() == p.kind() => "value".to_owned(),
            None => format!("{} vs {}", d.kind(), p.kind()),
        };
        self.diff(path, &kind, d.short(), p.short());
    }

    /// `next`/`previous`: each side's own origin removed, then the path and every query
    /// parameter compared exactly.
    fn link(&mut self, path: &str, d: &str, p: &str) {
        let (d_origin, d_rest) = split_origin(d);
        let (p_origin, p_rest) = split_origin(p);
        if d_origin != self.direct_origin || p_origin != self.proxy_origin {
            let kind = "link origin is not the side's own";
            self.diff(
                path,
                kind,
                format!("{d_origin} (own {})", self.direct_origin),
                format!("{p_origin} (own {})", self.proxy_origin),
            );
        }
        if d_rest == p_rest {
            return;
        }
        let (d_path, d_query) = d_rest.split_once('?').unwrap_or((d_rest, ""));
        let (p_path, p_query) = p_rest.split_once('?').unwrap_or((p_rest, ""));
        if d_path != p_path {
            self.diff(path, "link path", d_path.to_owned(), p_path.to_owned());
        }
        let params = |q: &str| -> Vec<(String, String)> {
            q.split('&')
                .filter(|s| !s.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        };
        let (dq, pq) = (params(d_query), params(p_query));
        let keys: BTreeSet<&str> = dq.iter().chain(&pq).map(|(k, _)| k.as_str()).collect();
        let mut any = false;
        for k in keys {
            let values = |q: &[(String, String)]| -> Vec<String> {
                q.iter().filter(|(qk, _)| qk == k).map(|(_, v)| v.clone()).collect()
            };
            let (dv, pv) = (values(&dq), values(&pq));
            if dv != pv {
                any = true;
                let show = |v: &[String]| if v.is_empty() { "<absent>".to_owned() } else { v.join(" & ") };
                self.diff(&format!("{path}?{k}"), "link query parameter", show(&dv), show(&pv));
            }
        }
        if !any && d_path == p_path {
            self.diff(path, "link parameter order", d_rest.to_owned(), p_rest.to_owned());
        }
    }
}

fn split_origin(url: &str) -> (&str, &str) {
    let Some(scheme_end) = url.find("://") else { return ("", url) };
    match url[scheme_end + 3..].find('/') {
        Some(i) => url.split_at(scheme_end + 3 + i),
        None => (url, "/"),
    }
}

/// Equal after taking out one run of digits each, and those numbers differ by at most one.
fn within_one_second(a: &str, b: &str) -> bool {
    let split = |s: &str| -> Option<(String, i64)> {
        let start = s.find(|c: char| c.is_ascii_digit())?;
        let len = s[start..].find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len() - start);
        let n = s[start..start + len].parse().ok()?;
        let rest = format!("{}#{}", &s[..start], &s[start + len..]);
        (!rest.contains(|c: char| c.is_ascii_digit())).then_some((rest, n))
    };
    matches!((split(a), split(b)), (Some((ra, na)), Some((rb, nb))) if ra == rb && (na - nb).abs() <= 1)
}

/// `Ok(true)`: both datetimes, within `tolerance`, written alike. `Ok(false)`: not datetimes.
/// `Err(kind)`: datetimes that differ.
fn same_instant(a: &str, b: &str, tolerance: Duration) -> Result<bool, &'static str> {
    let (Some(ta), Some(tb)) = (parse_datetime(a), parse_datetime(b)) else { return Ok(false) };
    let delta = (ta - tb).abs();
    if delta > time::Duration::try_from(tolerance).unwrap_or(time::Duration::MAX) {
        return Err("datetime beyond the step span");
    }
    // The zone as written (`Z` or an offset). Fraction digits are not compared: both sides trim
    // trailing zeros, so their count depends on the instant.
    let zone = |s: &str| s.ends_with('Z');
    if zone(a) != zone(b) {
        return Err("datetime written differently");
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Two simulators, one proxy, one clock.
// ---------------------------------------------------------------------------------------------

const BAD_KEY: &str = "phx_not_a_real_key";

fn sim_config() -> SimConfig {
    SimConfig { calc_delay: Duration::from_millis(5), ..SimConfig::default() }
}

struct Duo {
    clock: Clock,
    direct: Simulator,
    upstream: Simulator,
    direct_port: u16,
    proxy_port: u16,
    app: Arc<App>,
    proxy: Option<Running>,
    backends: Vec<Running>,
}

impl Duo {
    fn start(sim: SimConfig) -> Duo {
        let clock = Clock::new();
        let (direct_port, upstream_port, proxy_port) = (free_port(), free_port(), free_port());
        let direct = Simulator::new(sim.clone(), clock.clone());
        let upstream = Simulator::new(sim, clock.clone());
        let backends = vec![start_backend(&direct, direct_port), start_backend(&upstream, upstream_port)];
        let (proxy, app) = start_proxy(test_config(proxy_port, upstream_port), clock.clone());
        Duo { clock, direct, upstream, direct_port, proxy_port, app, proxy: Some(proxy), backends }
    }

    fn set_fault(&self, f: Fault) {
        self.direct.set_fault(f.clone());
        self.upstream.set_fault(f);
    }

    fn set_calc_delay(&self, d: Duration) {
        self.direct.set_calc_delay(d);
        self.upstream.set_calc_delay(d);
    }

    fn origin(port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }
}

impl Drop for Duo {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop(false);
        }
        for b in self.backends.drain(..) {
            b.stop(false);
        }
    }
}

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    path: String,
    token: Option<&'static str>,
    body: Option<String>,
}

impl Req {
    fn get(path: impl Into<String>, token: &'static str) -> Req {
        Req { method: "GET", path: path.into(), token: Some(token), body: None }
    }

    fn write(method: &'static str, path: impl Into<String>, token: &'static str, body: &Value) -> Req {
        Req { method, path: path.into(), token: Some(token), body: Some(body.to_string()) }
    }

    fn anonymous(path: impl Into<String>) -> Req {
        Req { method: "GET", path: path.into(), token: None, body: None }
    }

    fn send(&self, port: u16) -> Resp {
        let auth = self.token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
        http(port, self.method, &self.path, &headers, self.body.as_deref())
    }

    /// `/api/{scope}/{project}` of this request's path.
    fn scope(&self) -> String {
        self.path.split('/').take(4).collect::<Vec<_>>().join("/")
    }
}

struct Pair {
    d: Resp,
    p: Resp,
    /// The bodies, parsed once (key order kept).
    dk: Option<J>,
    pk: Option<J>,
}

impl Pair {
    fn dj(&self) -> Value {
        serde_json::from_slice(&self.d.body).unwrap_or(Value::Null)
    }

    fn pj(&self) -> Value {
        serde_json::from_slice(&self.p.body).unwrap_or(Value::Null)
    }
}

/// Runs steps in lockstep on one [`Duo`], feeding one [`Area`].
struct Lockstep<'a> {
    duo: &'a Duo,
    area: &'a mut Area,
    ids: HashMap<String, String>,
    /// The longest step span so far (direct request start → proxy answer, polls included).
    span: Duration,
    /// Put before every step label (which pair of simulators, in areas that start several).
    prefix: String,
}

/// The longest a poll waits for a query to finish.
const POLL_BOUND: Duration = Duration::from_secs(10);

impl<'a> Lockstep<'a> {
    fn new(duo: &'a Duo, area: &'a mut Area) -> Self {
        area.diverged = false;
        Lockstep { duo, area, ids: HashMap::new(), span: Duration::ZERO, prefix: String::new() }
    }

    /// One step: the same request straight, then through the proxy; compared; background work
    /// settled.
    fn step(&mut self, label: &str, req: &Req) -> Pair {
        self.step2(label, req, req)
    }

    /// A step whose two requests differ (each side's own link or query id).
    fn step2(&mut self, label: &str, direct: &Req, proxy: &Req) -> Pair {
        let started = Instant::now();
        let before = self.calculations();
        let pair = self.exchange(label, direct, proxy);
        self.settle(label, &pair, direct, proxy);
        self.span = self.span.max(started.elapsed());
        self.compare_work(label, &before);
        pair
    }

    /// Calculations so far of every seeded insight (and a few created ones), on each simulator.
    fn calculations(&self) -> Vec<(u64, u64, u64, u64)> {
        (1..=3u64)
            .flat_map(|project| (1..=60u64).map(move |insight| (project, insight)))
            .map(|(project, insight)| {
                let (d, u) = (&self.duo.direct, &self.duo.upstream);
                (project, insight, d.calculations(project, insight), u.calculations(project, insight))
            })
            .filter(|(_, _, d, u)| *d + *u > 0)
            .collect()
    }

    fn compare_work(&mut self, label: &str, before: &[(u64, u64, u64, u64)]) {
        let was = |p: u64, i: u64| before.iter().find(|b| b.0 == p && b.1 == i).map_or((0, 0), |b| (b.2, b.3));
        let step = format!("step {} `{}{label}`", self.area.steps, self.prefix);
        for (project, insight, d, u) in self.calculations() {
            let (d0, u0) = was(project, insight);
            let (dd, du) = (d - d0, u - u0);
            if dd != du {
                let kind = if du > dd {
                    "the proxy had the upstream calculate more"
                } else {
                    "the proxy had the upstream calculate less"
                };
                let what = format!(
                    "insight {insight} of project {project}: PostHog calculated {dd}×, the proxy's upstream {du}×"
                );
                Area::note(
                    self.area.work.entry(kind.to_owned()).or_insert_with(Finding::empty),
                    self.area.diverged,
                    &step,
                    "",
                    String::new(),
                    what,
                );
            }
        }
    }

    /// A step that leaves background work running (the poll area compares "running" answers).
    fn step_unsettled(&mut self, label: &str, req: &Req) -> Pair {
        let started = Instant::now();
        let pair = self.exchange(label, req, req);
        self.span = self.span.max(started.elapsed());
        pair
    }

    fn exchange(&mut self, label: &str, direct: &Req, proxy: &Req) -> Pair {
        self.align_minute();
        let d = direct.send(self.duo.direct_port);
        let p = proxy.send(self.duo.proxy_port);
        self.area.requests += 2;
        trace(label, direct, &d, proxy, &p);
        let (dk, pk) = (parse_json(&d.body), parse_json(&p.body));
        self.compare(label, &d, &p, dk.as_ref(), pk.as_ref());
        Pair { d, p, dk, pk }
    }

    fn compare(&mut self, label: &str, d: &Resp, p: &Resp, dj: Option<&J>, pj: Option<&J>) {
        self.area.steps += 1;
        let step = format!("step {} `{}{label}`", self.area.steps, self.prefix);
        let (direct_origin, proxy_origin) = (Duo::origin(self.duo.direct_port), Duo::origin(self.duo.proxy_port));
        let mut c = Comparison {
            area: self.area,
            ids: &mut self.ids,
            step: &step,
            proxy_hit: p.cache_status().contains("; hit"),
            tolerance: self.span + Duration::from_secs(1),
            direct_origin: &direct_origin,
            proxy_origin: &proxy_origin,
        };
        c.parsed(d, p, dj, pj);
    }

    /// Before a step, leaves at least 15 s before the next minute boundary.
    fn align_minute(&self) {
        let second = self.duo.clock.now().second();
        if second >= 45 {
            self.duo.clock.advance(Duration::from_secs(u64::from(61 - second)));
        }
    }

    /// Polls every query that either answer left running until it finishes, compares the two
    /// finished polls where both sides had one, then waits for the proxy and both simulators to
    /// be idle.
    fn settle(&mut self, label: &str, pair: &Pair, direct: &Req, proxy: &Req) {
        let (d_pending, p_pending) = (pending_statuses(pair.dk.as_ref()), pending_statuses(pair.pk.as_ref()));
        let places: BTreeSet<&String> = d_pending.keys().chain(p_pending.keys()).collect();
        for place in places {
            let d_id = d_pending.get(place);
            let p_id = p_pending.get(place);
            let d_poll = d_id.map(|id| poll_req(&direct.scope(), id, direct.token));
            let p_poll = p_id.map(|id| poll_req(&proxy.scope(), id, proxy.token));
            let step = format!("step {} `{}{label}`", self.area.steps, self.prefix);
            if let Some(r) = &d_poll {
                if self.wait_done(self.duo.direct_port, r).status == 202 {
                    self.area.add(&step, place, "query never finished (direct)", r.path.clone(), String::new());
                }
            }
            if let Some(r) = &p_poll {
                if self.wait_done(self.duo.proxy_port, r).status == 202 {
                    self.area.add(&step, place, "query never finished (proxy)", String::new(), r.path.clone());
                }
            }
            if let (Some(dr), Some(pr)) = (d_poll, p_poll) {
                let at = if place.is_empty() { String::new() } else { format!(" of {place}") };
                self.exchange(&format!("{label} ⇒ finished poll{at}"), &dr, &pr);
            }
        }
        self.quiesce();
    }

    fn wait_done(&mut self, port: u16, poll: &Req) -> Resp {
        let deadline = Instant::now() + POLL_BOUND;
        loop {
            let r = poll.send(port);
            self.area.requests += 1;
            if r.status != 202 || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (bounded) until the proxy has no queued job and no running calculation and neither
    /// simulator's calculation count moves, for two observations in a row.
    fn quiesce(&mut self) {
        let app = &self.duo.app;
        let look = || {
            (
                app.engine.queued(),
                (1..=3).map(|p| app.engine.slots_taken(p)).sum::<usize>(),
                self.duo.direct.total_calculations(),
                self.duo.upstream.total_calculations(),
            )
        };
        let deadline = Instant::now() + POLL_BOUND;
        let mut last = look();
        let mut calm = 0;
        // Three calm looks 2 ms apart outlast a simulated calculation (5 ms) counted as it began.
        while calm < 3 {
            if Instant::now() > deadline {
                let step = format!("step {} (after it)", self.area.steps);
                let what = format!("queued jobs, running calculations: {last:?}");
                self.area.add(&step, "(background)", "proxy still busy after 10 s", String::new(), what);
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            let now = look();
            if now == last && now.0 == 0 && now.1 == 0 {
                calm += 1;
            } else {
                calm = 0;
                last = now;
            }
        }
    }

    /// Polls a query on both sides: the proxy's id as the proxy gave it, the direct id it maps to.
    fn poll(&mut self, label: &str, scope: &str, proxy_id: &str, token: Option<&'static str>) -> Pair {
        let direct_id = self.ids.get(proxy_id).cloned().unwrap_or_else(|| proxy_id.to_owned());
        self.step2(label, &poll_req(scope, &direct_id, token), &poll_req(scope, proxy_id, token))
    }

    /// Follows `next` on each side as a paging client would, comparing every page.
    /// Pages through a list (see [`Paging`]). Once the two sides follow different links, every
    /// later step of this pair of simulators is marked (see [`Finding::diverged`]).
    fn page_through(&mut self, label: &str, first: &Req, paging: Paging) -> usize {
        let (mut d, mut p) = (first.clone(), first.clone());
        let mut pages = 0;
        for page in 1..=10 {
            pages = page;
            let pair = self.step2(&format!("{label} · page {page}"), &d, &p);
            let next = |j: &Option<J>| match j.as_ref().and_then(|j| j.get("next")) {
                Some(J::Str(s)) => Some(s.clone()),
                _ => None,
            };
            let (Some(dn), Some(pn)) = (next(&pair.dk), next(&pair.pk)) else { break };
            d.path = split_origin(&dn).1.to_owned();
            p.path = match paging {
                Paging::OwnLinks => split_origin(&pn).1.to_owned(),
                Paging::PostHogLinks => d.path.clone(),
            };
            self.area.diverged |= d.path != p.path;
        }
        pages
    }
}

/// `DIFFERENTIAL_TRACE=<text>` prints both answers of every step whose label contains it.
fn trace(label: &str, direct: &Req, d: &Resp, proxy: &Req, p: &Resp) {
    let Ok(filter) = std::env::var("DIFFERENTIAL_TRACE") else { return };
    if !label.contains(&filter) {
        return;
    }
    let show = |r: &Resp| {
        let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} [{}]\n{}", r.status, headers.join("; "), String::from_utf8_lossy(&r.body))
    };
    println!(
        "--- {label}\n  direct {} {}\n  {}\n  proxy {} {}\n  {}",
        direct.method,
        direct.path,
        show(d),
        proxy.method,
        proxy.path,
        show(p)
    );
}

fn poll_req(scope: &str, id: &str, token: Option<&'static str>) -> Req {
    Req { method: "GET", path: format!("{scope}/query/{id}/"), token, body: None }
}

/// Query statuses in an answer that are not complete, by where they are.
fn pending_statuses(body: Option<&J>) -> BTreeMap<String, String> {
    fn walk(path: &str, v: &J, out: &mut BTreeMap<String, String>) {
        match v {
            J::Obj(m) => {
                for (k, v) in m {
                    let at = child(path, k);
                    if k == "query_status" {
                        if let (Some(J::Str(id)), Some(J::Bool(false))) = (v.get("id"), v.get("complete")) {
                            out.insert(at.clone(), id.clone());
                        }
                    }
                    walk(&at, v, out);
                }
            }
            J::Arr(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    if let Some(j) = body {
        walk("", j, &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The script vocabulary: modes, cache states, aliases, contexts.
// ---------------------------------------------------------------------------------------------

/// Every `refresh` value the README's table names (absent first).
/// Every `refresh` value but `async_except_on_cache_miss`: the proxy honours it as PostHog's API
/// reference documents it, where PostHog's insights endpoint reads it as `force_cache` (README,
/// "Differences from PostHog"); `tests/refresh.rs` covers it.
const MODES: [Option<&str>; 9] = [
    None,
    Some("true"),
    Some("false"),
    Some("force_cache"),
    Some("blocking"),
    Some("async"),
    Some("lazy_async"),
    Some("force_blocking"),
    Some("force_async"),
];

const ALIASES: [&str; 2] = ["environments", "projects"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheState {
    Miss,
    Fresh,
    /// Past the DEFAULT threshold of a day interval (6 h), not past its LAZY one (12 h).
    Stale,
    /// Past the LAZY threshold of a day interval (12 h).
    LazilyStale,
}

const STATES: [CacheState; 4] = [CacheState::Miss, CacheState::Fresh, CacheState::Stale, CacheState::LazilyStale];

impl CacheState {
    /// How far the clock moves between the warming calculation and the read.
    fn age(self) -> Duration {
        match self {
            CacheState::Miss | CacheState::Fresh => Duration::ZERO,
            CacheState::Stale => Duration::from_secs(7 * 3600),
            CacheState::LazilyStale => Duration::from_secs(13 * 3600),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Context {
    Standalone,
    /// `from_dashboard=<a dashboard the insight is on>`.
    Dashboard(u64),
    FiltersOverride,
    VariablesOverride,
}

fn encode(v: &Value) -> String {
    utf8_percent_encode(&v.to_string(), NON_ALPHANUMERIC).to_string()
}

impl Context {
    fn all(dashboard: u64) -> [Context; 4] {
        [Context::Standalone, Context::Dashboard(dashboard), Context::FiltersOverride, Context::VariablesOverride]
    }

    fn params(self) -> Vec<String> {
        match self {
            Context::Standalone => vec![],
            Context::Dashboard(d) => vec![format!("from_dashboard={d}")],
            Context::FiltersOverride => vec![format!("filters_override={}", encode(&json!({"date_from": "-3d"})))],
            Context::VariablesOverride => {
                let v = json!({"c0ffee01": {"code": "region", "variableId": "c0ffee01", "value": "EU"}});
                vec![format!("variables_override={}", encode(&v))]
            }
        }
    }

    fn name(self) -> String {
        match self {
            Context::Standalone => "standalone".into(),
            Context::Dashboard(d) => format!("from_dashboard={d}"),
            Context::FiltersOverride => "filters_override".into(),
            Context::VariablesOverride => "variables_override".into(),
        }
    }
}

fn mode_name(mode: Option<&str>) -> String {
    mode.map_or("refresh absent".to_owned(), |m| format!("refresh={m}"))
}

/// `/api/{alias}/{project}/insights/{id}/?{context}&refresh={mode}`.
fn insight_url(alias: &str, pick: &Pick, ctx: Context, mode: Option<&str>, extra: &[String]) -> String {
    let mut params = ctx.params();
    params.extend(mode.map(|m| format!("refresh={m}")));
    params.extend(extra.iter().cloned());
    let base = format!("/api/{alias}/{}/insights/{}/", pick.project, pick.id);
    if params.is_empty() {
        base
    } else {
        format!("{base}?{}", params.join("&"))
    }
}

/// A trends or funnels insight with a `day` interval and a relative range (stale after 6 h,
/// lazily after 12 h), on a dashboard whose filters keep the `day` interval.
#[derive(Clone, Debug)]
struct Pick {
    project: u64,
    id: u64,
    dashboard: u64,
    query: Value,
}

/// Lists projects 1 and 2 on both sides (`basic=true`, compared) and picks `n` insights from
/// the direct answer. Per the simulator's documented shape, dashboards `3k+2` filter to
/// `date_from: -30d` only (the `3k+3` ones switch to a `week` interval).
fn pick_day_insights(ls: &mut Lockstep<'_>, n: usize) -> Vec<Pick> {
    let mut picks = Vec::new();
    for project in [1u64, 2] {
        let req = Req::get(format!("/api/projects/{project}/insights/?basic=true&limit=100"), ALL);
        let pair = ls.step(&format!("setup: basic list of project {project}"), &req);
        for i in pair.dj()["results"].as_array().cloned().unwrap_or_default() {
            let source = &i["query"]["source"];
            let kind = source["kind"].as_str().unwrap_or("");
            let dashboard =
                i["dashboards"].as_array().into_iter().flatten().filter_map(Value::as_u64).find(|d| d % 3 == 2);
            if matches!(kind, "TrendsQuery" | "FunnelsQuery")
                && source["interval"] == "day"
                && source["dateRange"]["date_to"].is_null()
            {
                if let (Some(id), Some(dashboard)) = (i["id"].as_u64(), dashboard) {
                    picks.push(Pick { project, id, dashboard, query: i["query"].clone() });
                }
            }
        }
    }
    assert!(picks.len() >= n, "the seeded data has {} suitable insights, the script needs {n}", picks.len());
    picks.truncate(n);
    picks
}

// ---------------------------------------------------------------------------------------------
// Areas.
// ---------------------------------------------------------------------------------------------

/// Every refresh mode × cache state {miss, fresh, stale, lazily stale} × both URL aliases ×
/// {standalone, from_dashboard, filters_override, variables_override}. Each (alias) round runs
/// on its own pair of simulators and proxy (the aliases share cache entries by design); within a
/// round each mode has its own insight, so the four contexts of a mode are four cache variants
/// nothing else touches. Phases: the cold reads; then, per later state, every variant warmed with
/// `force_blocking`, the clock moved by the state's age, and every variant read in its mode.
/// Last, each variant is calculated for `phx_demo_all` and read with `phx_demo_p1`.
#[test]
fn refresh_modes_by_cache_state_alias_and_context() {
    let mut area = Area::new("modes");
    for alias in ALIASES {
        let duo = Duo::start(sim_config());
        let mut ls = Lockstep::new(&duo, &mut area);
        let picks = pick_day_insights(&mut ls, MODES.len());
        let cells: Vec<(Option<&str>, &Pick, Context)> = MODES
            .iter()
            .zip(&picks)
            .flat_map(|(mode, pick)| Context::all(pick.dashboard).map(|ctx| (*mode, pick, ctx)))
            .collect();
        for state in STATES {
            if state != CacheState::Miss {
                for (_, pick, ctx) in &cells {
                    let url = insight_url(alias, pick, *ctx, Some("force_blocking"), &[]);
                    ls.step(
                        &format!("warm for {state:?} · {alias} · insight {} · {}", pick.id, ctx.name()),
                        &Req::get(url, ALL),
                    );
                }
            }
            duo.clock.advance(state.age());
            for (mode, pick, ctx) in &cells {
                let url = insight_url(alias, pick, *ctx, *mode, &[]);
                let label =
                    format!("{state:?} · {alias} · {} · {} · insight {}", mode_name(*mode), ctx.name(), pick.id);
                ls.step(&label, &Req::get(url, ALL));
            }
        }
        // Another key of project 1 (phx_demo_p1; project 2 is not its own: 403) reads what
        // phx_demo_all just calculated: PostHog's cache is shared, the proxy's is per credential.
        for (mode, pick, ctx) in &cells {
            let warm = insight_url(alias, pick, *ctx, Some("force_blocking"), &[]);
            ls.step(
                &format!("warm for another key · {alias} · insight {} · {}", pick.id, ctx.name()),
                &Req::get(warm, ALL),
            );
            let url = insight_url(alias, pick, *ctx, *mode, &[]);
            let label = format!(
                "Fresh for phx_demo_all, read by phx_demo_p1 · {alias} · {} · {} · insight {}",
                mode_name(*mode),
                ctx.name(),
                pick.id
            );
            ls.step(&label, &Req::get(url, P1));
        }
    }
    area.finish(500, 50_000);
}

/// List pages with `limit`/`offset` in every mode, in the cold, fresh, stale and lazily stale
/// states, each mode on its own pair of simulators so its first pages are cold; plus a
/// `basic=true` page (passed through). Each mode runs twice:
/// * as a paging client: each side follows its own `next` link (which carries the client's own
///   `refresh` and `client_query_id`). Once the proxy's link differs from PostHog's, the two
///   sides ask for different pages and their caches part ways: every later finding of that pair
///   is marked as such;
/// * by PostHog's links: both sides request the page PostHog's `next` names, so the list items are
///   compared on equal requests (the links themselves are still compared).
#[test]
fn list_pages_and_their_links() {
    let mut area = Area::new("lists");
    for (i, mode) in MODES.iter().enumerate() {
        for paging in [Paging::OwnLinks, Paging::PostHogLinks] {
            let duo = Duo::start(sim_config());
            let mut ls = Lockstep::new(&duo, &mut area);
            ls.prefix = format!("[{}, {paging:?}] ", mode_name(*mode));
            list_script(&mut ls, i, *mode, paging);
        }
    }
    area.finish(300, 200_000);
}

/// How a paging client gets from one page to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paging {
    /// Each side follows the `next` link its own answer gave.
    OwnLinks,
    /// Both sides request the path and query of PostHog's (the direct answer's) `next`.
    PostHogLinks,
}

fn list_script(ls: &mut Lockstep<'_>, i: usize, mode: Option<&str>, paging: Paging) {
    let alias = ALIASES[i % 2];
    let other = ALIASES[(i + 1) % 2];
    let tag = mode.unwrap_or("absent");
    let list = |alias: &str, project: u64, limit: u32, offset: u32, mode: Option<&str>, cq: &str| {
        let mut q = vec![format!("limit={limit}")];
        if offset > 0 {
            q.push(format!("offset={offset}"));
        }
        q.extend(mode.map(|m| format!("refresh={m}")));
        q.push(format!("client_query_id={cq}"));
        Req::get(format!("/api/{alias}/{project}/insights/?{}", q.join("&")), ALL)
    };
    let name = mode_name(mode);
    let duo = ls.duo;
    ls.page_through(
        &format!("Miss · {alias} · {name} · limit 7"),
        &list(alias, 1, 7, 0, mode, &format!("{tag}-cold")),
        paging,
    );
    ls.page_through(
        &format!("setup: warm · {other} · refresh=blocking"),
        &list(other, 1, 20, 0, Some("blocking"), "warm"),
        paging,
    );
    ls.page_through(
        &format!("Fresh · {other} · {name} · limit 6 offset 2"),
        &list(other, 1, 6, 2, mode, &format!("{tag}-fresh")),
        paging,
    );
    duo.clock.advance(CacheState::Stale.age());
    ls.page_through(
        &format!("Stale · {alias} · {name} · limit 7"),
        &list(alias, 1, 7, 0, mode, &format!("{tag}-stale")),
        paging,
    );
    ls.page_through(
        &format!("setup: warm · {alias} · refresh=force_blocking"),
        &list(alias, 1, 20, 0, Some("force_blocking"), "warm2"),
        paging,
    );
    duo.clock.advance(CacheState::LazilyStale.age());
    ls.page_through(
        &format!("LazilyStale · {other} · {name} · limit 9 offset 5"),
        &list(other, 1, 9, 5, mode, &format!("{tag}-lazy")),
        paging,
    );
    // Another project, cold, and the last page first (a `previous` link, no `next`).
    ls.page_through(
        &format!("Miss · {alias} · project 2 · {name} · limit 4 offset 12"),
        &list(alias, 2, 4, 12, mode, &format!("{tag}-p2")),
        paging,
    );
    if i == 0 {
        ls.step(
            "basic list (passed through)",
            &Req::get(format!("/api/{alias}/1/insights/?basic=true&limit=5&offset=5"), ALL),
        );
    }
}

/// `query/:id/` polling: a running query (a long calculation, so both sides are surely still
/// running), the finished poll, the other alias, other keys, an unknown id, expiry, cancelling,
/// and the statuses of `force_async`, `async` on a stale entry and `lazy_async` on a lazily
/// stale one.
#[test]
fn query_status_polls() {
    let mut area = Area::new("polling");
    let duo = Duo::start(sim_config());
    let mut ls = Lockstep::new(&duo, &mut area);
    let picks = pick_day_insights(&mut ls, 3);
    let (x, y) = (&picks[0], &picks[1]);
    let env = format!("/api/environments/{}", x.project);
    let projects_scope = format!("/api/projects/{}", x.project);

    // A running query: 400 ms calculations, polled at once on both sides.
    duo.set_calc_delay(Duration::from_millis(400));
    let started = ls.step_unsettled(
        "async on a cold insight",
        &Req::get(insight_url("environments", x, Context::Standalone, Some("async"), &[]), ALL),
    );
    let proxy_id = started.pj()["query_status"]["id"].as_str().map(str::to_owned);
    let direct_id = started.dj()["query_status"]["id"].as_str().map(str::to_owned);
    let proxy_id = proxy_id.or(direct_id.clone()).expect("an async miss answers a query status");
    ls.poll("poll while running", &env, &proxy_id, Some(ALL));
    // Wait for both, then compare the finished answers.
    if let Some(d) = &direct_id {
        ls.wait_done(duo.direct_port, &poll_req(&env, d, Some(ALL)));
    }
    ls.wait_done(duo.proxy_port, &poll_req(&env, &proxy_id, Some(ALL)));
    ls.quiesce();
    duo.set_calc_delay(sim_config().calc_delay);
    ls.poll("poll once finished", &env, &proxy_id, Some(ALL));
    ls.poll("poll again", &env, &proxy_id, Some(ALL));
    ls.poll("poll through the other alias", &projects_scope, &proxy_id, Some(ALL));
    // Another key of the same project is not shown the status: the proxy answers a status only
    // to the principal that started it (README, "Differences from PostHog").
    ls.poll("poll with a key for another project (phx_demo_p2)", &env, &proxy_id, Some(P2));
    ls.poll("poll with an invalid key", &env, &proxy_id, Some(BAD_KEY));
    ls.poll("poll without a credential", &env, &proxy_id, None);
    ls.step(
        "poll an unknown id",
        &poll_req(&env, "cache_1_0000000000000000000000000000000000000000000000000000000000000000", Some(ALL)),
    );
    ls.step("poll a made-up id", &poll_req(&env, "not-a-query", Some(ALL)));

    // Statuses of the other modes that leave work behind (settled and compared by `step`).
    for ctx in [Context::Standalone, Context::Dashboard(y.dashboard)] {
        let r = ls.step(
            &format!("force_async · {}", ctx.name()),
            &Req::get(insight_url("environments", y, ctx, Some("force_async"), &[]), ALL),
        );
        if let Some(id) = r.pj()["query_status"]["id"].as_str() {
            ls.poll(&format!("force_async · {} · poll later", ctx.name()), &env, id, Some(ALL));
        }
    }
    duo.clock.advance(CacheState::Stale.age());
    ls.step("Stale · async", &Req::get(insight_url("projects", y, Context::Standalone, Some("async"), &[]), ALL));
    ls.step(
        "Stale · async on the dashboard",
        &Req::get(insight_url("projects", y, Context::Dashboard(y.dashboard), Some("async"), &[]), ALL),
    );
    duo.clock.advance(CacheState::LazilyStale.age());
    ls.step(
        "LazilyStale · lazy_async",
        &Req::get(insight_url("environments", y, Context::Standalone, Some("lazy_async"), &[]), ALL),
    );
    ls.step(
        "LazilyStale · lazy_async again",
        &Req::get(insight_url("environments", y, Context::Standalone, Some("lazy_async"), &[]), ALL),
    );

    // Expiry: a finished status, polled 21 minutes later (PostHog keeps them 20 minutes).
    let fresh = ls.step(
        "force_async for expiry",
        &Req::get(insight_url("environments", x, Context::FiltersOverride, Some("force_async"), &[]), ALL),
    );
    if let Some(id) = fresh.pj()["query_status"]["id"].as_str() {
        ls.poll("poll right after", &env, id, Some(ALL));
        duo.clock.advance(Duration::from_secs(19 * 60));
        ls.poll("poll at 19 minutes", &env, id, Some(ALL));
        duo.clock.advance(Duration::from_secs(2 * 60));
        ls.poll("poll at 21 minutes", &env, id, Some(ALL));
    }

    // Cancelling: DELETE query/:id/ and POST insights/cancel, then polls.
    let r = ls.step(
        "force_async to cancel",
        &Req::get(insight_url("environments", x, Context::Standalone, Some("force_async"), &[]), ALL),
    );
    if let Some(id) = r.pj()["query_status"]["id"].as_str().map(str::to_owned) {
        let direct_id = ls.ids.get(&id).cloned().unwrap_or_else(|| id.clone());
        let del = |id: &str| Req { method: "DELETE", path: format!("{env}/query/{id}/"), token: Some(ALL), body: None };
        ls.step2("DELETE query/:id/", &del(&direct_id), &del(&id));
        ls.poll("poll after DELETE", &env, &id, Some(ALL));
    }
    let r = ls.step(
        "force_async to cancel by client_query_id",
        &Req::get(insight_url("environments", y, Context::FiltersOverride, Some("force_async"), &[]), ALL),
    );
    if let Some(id) = r.pj()["query_status"]["id"].as_str().map(str::to_owned) {
        let direct_id = ls.ids.get(&id).cloned().unwrap_or_else(|| id.clone());
        let cancel =
            |id: &str| Req::write("POST", format!("{env}/insights/cancel/"), ALL, &json!({"client_query_id": id}));
        ls.step2("POST insights/cancel", &cancel(&direct_id), &cancel(&id));
        ls.poll("poll after cancel", &env, &id, Some(ALL));
    }
    area.finish(30, 2_000);
}

/// Writes followed by reads: PATCH an insight's name, then its query, then its dashboards, and a
/// POST creating one, each followed by reads in several modes, contexts and both aliases, and by
/// a list page.
#[test]
fn reads_after_writes() {
    let mut area = Area::new("writes");
    let duo = Duo::start(sim_config());
    let mut ls = Lockstep::new(&duo, &mut area);
    let picks = pick_day_insights(&mut ls, 2);
    let x = &picks[0];
    let url = |alias: &str, ctx: Context, mode: Option<&str>| insight_url(alias, x, ctx, mode, &[]);
    let contexts = [Context::Standalone, Context::Dashboard(x.dashboard), Context::FiltersOverride];
    let read_modes =
        [None, Some("force_cache"), Some("blocking"), Some("async"), Some("lazy_async"), Some("force_blocking")];
    let reads = |ls: &mut Lockstep<'_>, after: &str, contexts: &[Context]| {
        for (i, mode) in read_modes.iter().enumerate() {
            for ctx in contexts {
                let alias = ALIASES[i % 2];
                let label = format!("after {after} · {alias} · {} · {}", mode_name(*mode), ctx.name());
                ls.step(&label, &Req::get(url(alias, *ctx, *mode), ALL));
            }
        }
    };
    for ctx in contexts {
        ls.step(&format!("warm · {}", ctx.name()), &Req::get(url("environments", ctx, Some("blocking")), ALL));
    }
    let patch = |alias: &str, body: Value| Req::write("PATCH", url(alias, Context::Standalone, None), ALL, &body);

    ls.step("PATCH name", &patch("environments", json!({"name": "Renamed through the differential test"})));
    reads(&mut ls, "PATCH name", &contexts);

    let mut query = x.query.clone();
    query["source"]["dateRange"]["date_from"] = json!("-21d");
    ls.step("PATCH query (date_from -21d)", &patch("projects", json!({"query": query})));
    reads(&mut ls, "PATCH query", &contexts);

    duo.clock.advance(CacheState::Stale.age());
    ls.step(
        "Stale · PATCH description and tags",
        &patch("environments", json!({"description": "Edited.", "tags": ["differential"]})),
    );
    reads(&mut ls, "PATCH description (stale)", &[Context::Standalone, Context::Dashboard(x.dashboard)]);

    ls.step("PATCH dashboards (moved to dashboard 1)", &patch("projects", json!({"dashboards": [1]})));
    for ctx in [Context::Dashboard(x.dashboard), Context::Dashboard(1), Context::Standalone] {
        for mode in [None, Some("blocking")] {
            ls.step(
                &format!("after PATCH dashboards · {} · {}", mode_name(mode), ctx.name()),
                &Req::get(url("environments", ctx, mode), ALL),
            );
        }
    }

    let created = ls.step(
        "POST a new insight",
        &Req::write(
            "POST",
            format!("/api/environments/{}/insights/", x.project),
            ALL,
            &json!({"name": "Created through the differential test", "query": x.query}),
        ),
    );
    if let Some(id) = created.dj()["id"].as_u64() {
        for (i, mode) in [None, Some("blocking"), None, Some("async")].iter().enumerate() {
            let path = format!(
                "/api/{}/{}/insights/{id}/{}",
                ALIASES[i % 2],
                x.project,
                mode.map(|m| format!("?refresh={m}")).unwrap_or_default()
            );
            ls.step(&format!("read the created insight · {}", mode_name(*mode)), &Req::get(path, ALL));
        }
    }
    ls.page_through(
        "list after writes",
        &Req::get(format!("/api/environments/{}/insights/?limit=8", x.project), ALL),
        Paging::OwnLinks,
    );
    area.finish(60, 10_000);
}

/// Errors from the upstream and refusals: 401 (an invalid key, no credential), 403 (a key for
/// another project: `phx_demo_p2` on project 1), 404 (unknown insight, project or query id), 500
/// and 503 (simulator faults, on variants nothing cached), and 429 (the simulator's throttle, on
/// a pair of simulators with a small rate limit, reached with forced calculations the proxy must
/// forward).
#[test]
fn upstream_errors_and_refusals() {
    let mut area = Area::new("errors");
    {
        let duo = Duo::start(sim_config());
        let mut ls = Lockstep::new(&duo, &mut area);
        let picks = pick_day_insights(&mut ls, 1);
        let x = &picks[0];
        let env = format!("/api/environments/{}", x.project);
        let url = |ctx: Context, mode: Option<&str>| insight_url("environments", x, ctx, mode, &[]);
        let running =
            ls.step_unsettled("setup: force_async", &Req::get(url(Context::Standalone, Some("force_async")), ALL));
        let status_id = running.pj()["query_status"]["id"].as_str().map(str::to_owned);
        ls.settle(
            "setup: force_async",
            &running,
            &Req::get(url(Context::Standalone, None), ALL),
            &Req::get(url(Context::Standalone, None), ALL),
        );
        ls.step("setup: warm", &Req::get(url(Context::Standalone, Some("blocking")), ALL));

        for (who, token) in
            [("an invalid key", Some(BAD_KEY)), ("a key for another project", Some(P2)), ("no credential", None)]
        {
            for mode in [None, Some("blocking"), Some("async"), Some("force_async")] {
                let path = url(Context::Standalone, mode);
                let req = Req { method: "GET", path, token, body: None };
                ls.step(&format!("{who} · retrieve · {}", mode_name(mode)), &req);
            }
            let list =
                Req { method: "GET", path: format!("{env}/insights/?limit=3&refresh=blocking"), token, body: None };
            ls.step(&format!("{who} · list"), &list);
            let patch = Req {
                method: "PATCH",
                path: url(Context::Standalone, None),
                token,
                body: Some(json!({"name": "nope"}).to_string()),
            };
            ls.step(&format!("{who} · PATCH"), &patch);
            if let Some(id) = &status_id {
                ls.poll(&format!("{who} · poll"), &env, id, token);
            }
        }
        let anonymous = Req::anonymous(url(Context::Dashboard(x.dashboard), Some("force_cache")));
        ls.step("no credential · from_dashboard", &anonymous);

        for (what, path) in [
            ("unknown insight", format!("{env}/insights/999999/")),
            ("unknown insight · blocking", format!("{env}/insights/999999/?refresh=blocking")),
            ("insight of another project", format!("{env}/insights/25/?refresh=blocking")),
            ("unknown project", "/api/environments/77/insights/1/?refresh=blocking".to_owned()),
            ("unknown project · list", "/api/projects/77/insights/?limit=2".to_owned()),
            ("unknown query id", format!("{env}/query/cache_1_ffff/")),
        ] {
            ls.step(&format!("404 · {what}"), &Req::get(path, ALL));
        }
        ls.step(
            "404 · PATCH unknown insight",
            &Req::write("PATCH", format!("{env}/insights/999999/"), ALL, &json!({"name": "x"})),
        );

        for (status, variant) in [(500u16, "-4d"), (503, "-5d")] {
            duo.set_fault(Fault::Status(status));
            let cold = insight_url(
                "environments",
                x,
                Context::Standalone,
                Some("blocking"),
                &[format!("filters_override={}", encode(&json!({"date_from": variant})))],
            );
            ls.step(&format!("{status} · blocking on a cold variant"), &Req::get(cold, ALL));
            ls.step(
                &format!("{status} · list"),
                &Req::get(format!("{env}/insights/?limit=2&offset=11&refresh=blocking"), ALL),
            );
            duo.set_fault(Fault::None);
            ls.step(
                &format!("after {status} · the same variant again"),
                &Req::get(
                    insight_url(
                        "environments",
                        x,
                        Context::Standalone,
                        Some("blocking"),
                        &[format!("filters_override={}", encode(&json!({"date_from": variant})))],
                    ),
                    ALL,
                ),
            );
        }
    }
    {
        // 429: five requests a minute per key.
        let duo = Duo::start(SimConfig { rate_limit: Some((5, 1000)), ..sim_config() });
        let mut ls = Lockstep::new(&duo, &mut area);
        ls.prefix = "[pair with a rate limit of 5/minute] ".into();
        let picks = pick_day_insights(&mut ls, 1);
        let x = &picks[0];
        duo.clock.advance(Duration::from_secs(120));
        // Background work the proxy runs itself counts against the key's rate upstream (a read and
        // a calculation where PostHog counts one request: README, "Differences from PostHog"), so
        // the rate is approached with requests that cost both sides one call each.
        let running = ls.step(
            "429 setup: blocking",
            &Req::get(insight_url("environments", x, Context::Standalone, Some("blocking"), &[]), ALL),
        );
        let status_id = running.pj()["query_status"]["id"].as_str().map(str::to_owned);
        for n in 1..=8 {
            let filters = format!("filters_override={}", encode(&json!({"date_from": format!("-{}d", n + 1)})));
            let alias = ALIASES[n % 2];
            let path = insight_url(alias, x, Context::Standalone, Some("force_blocking"), &[filters]);
            ls.step(&format!("throttle · forced calculation {n} · {alias}"), &Req::get(path, ALL));
        }
        ls.step(
            "throttled · list",
            &Req::get(format!("/api/environments/{}/insights/?limit=2&refresh=force_blocking", x.project), ALL),
        );
        if let Some(id) = &status_id {
            ls.poll(
                "throttled · poll (polls are not throttled)",
                &format!("/api/environments/{}", x.project),
                id,
                Some(ALL),
            );
        }
        duo.clock.advance(Duration::from_secs(120));
        ls.step(
            "after the window · forced calculation",
            &Req::get(insight_url("projects", x, Context::Standalone, Some("force_blocking"), &[]), ALL),
        );
    }
    area.finish(40, 3_000);
}

// ---------------------------------------------------------------------------------------------
// The comparison itself: it reports what it is shown, and only what the table allows passes.
// ---------------------------------------------------------------------------------------------

fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Resp {
    Resp {
        status,
        headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned())).collect(),
        body: body.as_bytes().to_vec(),
    }
}

fn compare_once(area: &mut Area, ids: &mut HashMap<String, String>, d: &Resp, p: &Resp) {
    let mut c = Comparison {
        area,
        ids,
        step: "synthetic",
        proxy_hit: p.cache_status().contains("; hit"),
        tolerance: Duration::from_secs(2),
        direct_origin: "http://127.0.0.1:1",
        proxy_origin: "http://127.0.0.1:2",
    };
    c.responses(d, p);
}

#[test]
fn the_comparison_finds_what_it_is_shown() {
    let json = [("content-type", "application/json")];
    let hit = [("content-type", "application/json"), ("cache-status", "insights-proxy; hit; ttl=10")];
    let miss = [("content-type", "application/json"), ("cache-status", "insights-proxy; fwd=miss")];
    let kinds = |a: &Area| a.findings.keys().map(|(p, k)| format!("{p}: {k}")).collect::<Vec<_>>();

    // Identical answers (a proxy id mapped, datetimes within the span, own origins): nothing.
    let mut area = Area::new("self-test");
    let mut ids = HashMap::new();
    let d = resp(
        200,
        &json,
        r#"{"a":1,"last_refresh":"2024-01-01T00:00:00.100000Z","query_status":{"id":"cache_1_x"},"next":"http://127.0.0.1:1/api/x/?limit=2&offset=2"}"#,
    );
    let p = resp(
        200,
        &miss,
        r#"{"a":1,"last_refresh":"2024-01-01T00:00:01.000000Z","query_status":{"id":"ipx_1_y"},"next":"http://127.0.0.1:2/api/x/?limit=2&offset=2"}"#,
    );
    compare_once(&mut area, &mut ids, &d, &p);
    assert!(area.findings.is_empty() && area.order.is_empty(), "{}", area.report());
    assert_eq!(ids.get("ipx_1_y").map(String::as_str), Some("cache_1_x"));
    assert!(area.fields >= 6, "{}", area.fields);

    // Every kind of difference is found, each at its path.
    let mut area = Area::new("self-test");
    let d = resp(
        200,
        &[("content-type", "application/json"), ("retry-after", "30")],
        r#"{"a":{"b":[1,2,3]},"name":"x","is_cached":true,"last_refresh":"2024-01-01T00:00:00Z","query_status":{"id":"q"},"next":"http://127.0.0.1:1/api/x/?limit=2&offset=2&refresh=blocking","z":1,"y":2}"#,
    );
    let p = resp(
        200,
        &miss,
        r#"{"a":{"b":[1,5]},"name":null,"is_cached":false,"last_refresh":"2024-01-01T07:00:00Z","query_status":null,"next":"http://127.0.0.1:9/api/x/?limit=2&offset=2&refresh=force_cache","extra":0,"y":2,"z":1}"#,
    );
    compare_once(&mut area, &mut HashMap::new(), &d, &p);
    let found = kinds(&area);
    for expected in [
        "header:retry-after: missing on the proxy (on 200 answers)",
        "a.b: array length",
        "a.b[]: value",
        "name: string vs null",
        "is_cached: value",
        "last_refresh: datetime beyond the step span",
        "query_status: object vs null",
        "next: link origin is not the side's own",
        "next?refresh: link query parameter",
        "extra: only on the proxy",
    ] {
        assert!(found.iter().any(|f| f == expected), "not found: {expected}\n{}", area.report());
    }
    assert!(area.order.contains_key(""), "key order is compared: {}", area.report());

    // Statuses: two errors are compared field by field; a success and an error as one body.
    let mut area = Area::new("self-test");
    let err = |code: &str| format!(r#"{{"type":"x","code":"{code}","detail":"d","attr":null}}"#);
    compare_once(
        &mut area,
        &mut HashMap::new(),
        &resp(401, &json, &err("authentication_failed")),
        &resp(404, &miss, &err("not_found")),
    );
    compare_once(
        &mut area,
        &mut HashMap::new(),
        &resp(200, &json, r#"{"id":1,"name":"n"}"#),
        &resp(429, &miss, &err("throttled")),
    );
    assert_eq!(
        kinds(&area),
        [": body of a 200 answer vs a 429 answer", "code: value", "status: 200 vs 429", "status: 401 vs 404"],
        "{}",
        area.report()
    );

    // Timing fields and is_cached pass only when the proxy says it served its cache.
    let mut area = Area::new("self-test");
    let d = resp(200, &json, r#"{"is_cached":true,"last_refresh":"2024-01-01T00:00:00Z"}"#);
    let p = resp(200, &hit, r#"{"is_cached":false,"last_refresh":"2024-01-01T07:00:00Z"}"#);
    compare_once(&mut area, &mut HashMap::new(), &d, &p);
    assert!(area.findings.is_empty(), "{}", area.report());

    // Answers without Cache-Status, proxy ids that are not strings, 429 texts within one
    // second, JSON on one side only.
    let mut area = Area::new("self-test");
    let d = resp(
        429,
        &[("retry-after", "30")],
        r#"{"detail":"Request was throttled. Expected available in 30 seconds.","query_status":{"id":"q"}}"#,
    );
    let p = resp(
        429,
        &[("retry-after", "31")],
        r#"{"detail":"Request was throttled. Expected available in 31 seconds.","query_status":{"id":null}}"#,
    );
    compare_once(&mut area, &mut HashMap::new(), &d, &p);
    let found = kinds(&area);
    assert_eq!(
        found,
        ["header:cache-status: missing on the proxy (on 429 answers)", "query_status.id: string vs null"],
        "{}",
        area.report()
    );
    let mut area = Area::new("self-test");
    compare_once(&mut area, &mut HashMap::new(), &resp(502, &json, "{}"), &resp(502, &miss, "<html>"));
    assert_eq!(kinds(&area), [": JSON only on the direct side"], "{}", area.report());

    // Datetimes written differently (an offset instead of `Z`).
    let mut area = Area::new("self-test");
    let d = resp(200, &json, r#"{"t":"2024-01-01T00:00:00.123Z"}"#);
    let p = resp(200, &miss, r#"{"t":"2024-01-01T00:00:00.12300+00:00"}"#);
    compare_once(&mut area, &mut HashMap::new(), &d, &p);
    assert_eq!(kinds(&area), ["t: datetime written differently"], "{}", area.report());

    // The patterns and the parser.
    assert_eq!(fold_indices("results[12].query_status.id"), "results[].query_status.id");
    assert!(glob(&segments("**.last_refresh"), &segments("last_refresh")));
    assert!(glob(&segments("**.query_status.id"), &segments("results[].query_status.id")));
    assert!(!glob(&segments("**.query_status.id"), &segments("results[].id")));
    assert!(!glob(&segments("detail"), &segments("a.detail")));
    let j = parse_json(br#"{"b":1,"a":[true,null,"x\"y",-1.5e3]}"#).unwrap();
    let mut text = String::new();
    j.render(&mut text);
    assert_eq!(text, r#"{"b":1,"a":[true,null,"x\"y",-1.5e3]}"#);
    assert!(parse_json(b"{\"a\":1").is_none() && parse_json(b"{} x").is_none());
}
