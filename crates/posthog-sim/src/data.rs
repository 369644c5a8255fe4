//! The seeded demo data set: projects, users, dashboards with tiles, and insights.
//!
//! The *shape* of the data is fixed so tests and docs can rely on it (see the module docs in
//! `mod.rs`); the seed picks events, names, tags, owners and the numbers in results.

use parking_lot::RwLock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use time::macros::datetime;
use time::OffsetDateTime;

pub(crate) struct User {
    pub id: u64,
    pub uuid: String,
    pub distinct_id: String,
    pub first_name: &'static str,
    pub last_name: &'static str,
    pub email: &'static str,
}

pub(crate) struct Project {
    pub id: u64,
    pub uuid: String,
    pub name: &'static str,
    pub timezone: &'static str,
    pub api_token: String,
    pub organization: String,
    pub created_at: OffsetDateTime,
}

pub(crate) struct Dashboard {
    pub id: u64,
    pub project: u64,
    pub filters: Map<String, Value>,
    pub variables: Map<String, Value>,
}

#[derive(Clone, Debug)]
pub(crate) struct Tile {
    pub id: u64,
    pub dashboard_id: u64,
    pub insight_id: u64,
    pub color: Option<&'static str>,
    pub layouts: Value,
    /// Stored tile-level filters; they replace the dashboard's filters (§8).
    pub filters_overrides: Map<String, Value>,
    pub deleted: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Insight {
    pub id: u64,
    pub project: u64,
    pub short_id: String,
    pub name: Option<String>,
    pub derived_name: Option<String>,
    pub description: String,
    /// `Value::Null` for a legacy insight without a query.
    pub query: Value,
    pub tags: Vec<String>,
    pub favorited: bool,
    pub saved: bool,
    pub deleted: bool,
    pub order: Option<i64>,
    pub is_sample: bool,
    pub created_at: OffsetDateTime,
    pub created_by: u64,
    pub updated_at: OffsetDateTime,
    pub last_modified_at: OffsetDateTime,
    pub last_modified_by: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Activity {
    pub project: u64,
    pub insight_id: u64,
    pub short_id: String,
    pub name: String,
    pub activity: &'static str,
    pub user_id: u64,
    pub at: OffsetDateTime,
    pub changes: Value,
}

/// The part that PATCH/POST change.
pub(crate) struct Mutable {
    pub insights: BTreeMap<u64, Insight>,
    pub tiles: Vec<Tile>,
    pub activity: Vec<Activity>,
    /// Continues the seeded sequence for new short ids, so runs stay reproducible.
    pub rng: StdRng,
    pub next_tile_id: u64,
}

impl Mutable {
    pub fn live_tiles(&self, insight_id: u64) -> impl Iterator<Item = &Tile> {
        self.tiles.iter().filter(move |t| t.insight_id == insight_id && !t.deleted)
    }

    pub fn new_short_id(&mut self) -> String {
        loop {
            let id = short_id(&mut self.rng);
            if !self.insights.values().any(|i| i.short_id == id) {
                return id;
            }
        }
    }

    /// Keeps the log bounded however many PATCHes a benchmark sends.
    pub fn log(&mut self, entry: Activity) {
        if self.activity.len() >= 10_000 {
            self.activity.drain(..1_000);
        }
        self.activity.push(entry);
    }
}

pub(crate) struct DataSet {
    pub users: Vec<User>,
    pub projects: Vec<Project>,
    pub dashboards: Vec<Dashboard>,
    pub state: RwLock<Mutable>,
}

impl DataSet {
    pub fn project(&self, id: u64) -> Option<&Project> {
        self.projects.iter().find(|p| p.id == id)
    }

    pub fn user(&self, id: u64) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub fn dashboard(&self, id: u64) -> Option<&Dashboard> {
        self.dashboards.iter().find(|d| d.id == id)
    }
}

/// Number of seeded insights; ids `1..=INSIGHT_COUNT`.
pub(crate) const INSIGHT_COUNT: u64 = 50;

/// Project of a seeded insight: 1–20 → 1, 21–35 → 2, 36–50 → 3.
pub(crate) fn seeded_project(insight_id: u64) -> u64 {
    match insight_id {
        0..=20 => 1,
        21..=35 => 2,
        _ => 3,
    }
}

struct Shape {
    funnel: bool,
    interval: &'static str,
    date_from: &'static str,
    date_to: Option<&'static str>,
    series: (usize, usize),
}

/// Insight `id` has shape `SHAPES[(id - 1) % 10]`.
const SHAPES: [Shape; 10] = [
    Shape { funnel: false, interval: "day", date_from: "-7d", date_to: None, series: (2, 3) },
    Shape { funnel: false, interval: "day", date_from: "-30d", date_to: None, series: (1, 3) },
    Shape { funnel: false, interval: "hour", date_from: "-24h", date_to: None, series: (1, 2) },
    Shape { funnel: false, interval: "minute", date_from: "-1h", date_to: None, series: (1, 2) },
    Shape { funnel: false, interval: "week", date_from: "-90d", date_to: None, series: (2, 3) },
    Shape { funnel: false, interval: "month", date_from: "-1y", date_to: None, series: (2, 3) },
    Shape { funnel: true, interval: "day", date_from: "-14d", date_to: None, series: (3, 4) },
    Shape { funnel: false, interval: "day", date_from: "2024-01-01", date_to: Some("2024-01-31"), series: (1, 2) },
    Shape { funnel: true, interval: "day", date_from: "-30d", date_to: None, series: (3, 4) },
    Shape { funnel: false, interval: "day", date_from: "-14d", date_to: None, series: (2, 3) },
];

const EVENTS: [&str; 12] = [
    "$pageview",
    "$autocapture",
    "$pageleave",
    "signed_up",
    "uploaded_file",
    "downloaded_file",
    "shared_file_link",
    "upgraded_plan",
    "invited_team_member",
    "deleted_file",
    "$screen",
    "viewed_pricing",
];

const TAGS: [&str; 6] = ["growth", "marketing", "product", "weekly-review", "retention", "ops"];
const COLORS: [Option<&str>; 4] = [None, Some("blue"), Some("green"), Some("purple")];

fn short_id(rng: &mut StdRng) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..8).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

fn uuid(rng: &mut StdRng) -> String {
    let b: [u8; 16] = rng.gen();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &hex[0..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
}

fn series_node(event: &str, math: &str) -> Value {
    json!({"kind": "EventsNode", "event": event, "name": event, "math": math})
}

pub(crate) fn build(seed: u64) -> DataSet {
    let mut rng = StdRng::seed_from_u64(seed);
    let users = vec![
        ("Ada", "Lovelace", "ada@hedgebox.example"),
        ("Grace", "Hopper", "grace@hedgebox.example"),
        ("Alan", "Turing", "alan@hedgebox.example"),
    ]
    .into_iter()
    .zip(1u64..)
    .map(|((first_name, last_name, email), id)| User {
        id,
        uuid: uuid(&mut rng),
        distinct_id: format!("{:x}", rng.gen::<u64>()),
        first_name,
        last_name,
        email,
    })
    .collect();

    let organization = uuid(&mut rng);
    let projects: Vec<Project> = [
        (1, "Hedgebox (production)", "UTC"),
        (2, "Hedgebox (staging)", "Europe/Berlin"),
        (3, "Burrow mobile", "America/New_York"),
    ]
    .into_iter()
    .map(|(id, name, timezone)| Project {
        id,
        uuid: uuid(&mut rng),
        name,
        timezone,
        api_token: format!("phc_{}{}", short_id(&mut rng), short_id(&mut rng)),
        organization: organization.clone(),
        created_at: datetime!(2024-01-02 10:00 UTC) + time::Duration::days(id as i64),
    })
    .collect();

    let mut insights = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut activity = Vec::new();
    for id in 1..=INSIGHT_COUNT {
        let insight = seeded_insight(&mut rng, id, &mut seen);
        activity.push(Activity {
            project: insight.project,
            insight_id: id,
            short_id: insight.short_id.clone(),
            name: insight.name.clone().or(insight.derived_name.clone()).unwrap_or_default(),
            activity: "created",
            user_id: insight.created_by,
            at: insight.created_at,
            changes: Value::Null,
        });
        insights.insert(id, insight);
    }

    let (dashboards, tiles) = seeded_dashboards(&mut rng, &insights);
    let next_tile_id = tiles.len() as u64 + 1;
    DataSet {
        users,
        projects,
        dashboards,
        state: RwLock::new(Mutable { insights, tiles, activity, rng, next_tile_id }),
    }
}

fn seeded_insight(rng: &mut StdRng, id: u64, seen: &mut HashSet<(u64, String)>) -> Insight {
    let project = seeded_project(id);
    let shape = &SHAPES[((id - 1) % 10) as usize];
    let n = rng.gen_range(shape.series.0..=shape.series.1);
    let mut events: Vec<&str> = Vec::new();
    while events.len() < n {
        let e = EVENTS[rng.gen_range(0..EVENTS.len())];
        if !events.contains(&e) {
            events.push(e);
        }
    }
    let math = if rng.gen_bool(0.25) { "dau" } else { "total" };
    let test_accounts = rng.gen_bool(0.5);
    let make = |events: &[&str]| -> Value {
        let series: Vec<Value> =
            events.iter().map(|e| series_node(e, if shape.funnel { "total" } else { math })).collect();
        let mut source = json!({
            "kind": if shape.funnel { "FunnelsQuery" } else { "TrendsQuery" },
            "interval": shape.interval,
            "dateRange": {"date_from": shape.date_from, "date_to": shape.date_to},
            "series": series,
            "filterTestAccounts": test_accounts,
        });
        if shape.funnel {
            source["funnelsFilter"] = json!({"funnelVizType": "steps", "funnelOrderType": "ordered",
                "funnelWindowInterval": 14, "funnelWindowIntervalUnit": "day"});
        } else {
            source["trendsFilter"] = json!({"display": "ActionsLineGraph"});
        }
        json!({"kind": "InsightVizNode", "source": source})
    };
    // Distinct queries give distinct cache keys: upstream shares a cache entry between insights
    // with identical queries, and the demo should not depend on that.
    let mut query = make(&events);
    while !seen.insert((project, query.to_string())) {
        let extra = EVENTS.iter().find(|e| !events.contains(e)).copied().unwrap_or("$pageview");
        events.push(extra);
        query = make(&events);
    }

    let derived_name = if shape.funnel {
        events.join(" → ")
    } else {
        let what = if math == "dau" { "unique users" } else { "count" };
        format!("{} {what}", events.join(" & "))
    };
    let name = (id % 5 != 0).then(|| {
        let period = match (shape.interval, shape.date_to) {
            (_, Some(_)) => "January 2024".to_owned(),
            ("minute", _) => "last hour, per minute".to_owned(),
            ("hour", _) => "last 24 hours".to_owned(),
            (interval, _) => format!("{}, by {interval}", shape.date_from.trim_start_matches('-')),
        };
        let kind = if shape.funnel { "Funnel" } else { "Trend" };
        format!("{kind}: {} ({period})", events[0].trim_start_matches('$'))
    });
    let tags = (0..rng.gen_range(0..=2)).map(|_| TAGS[rng.gen_range(0..TAGS.len())].to_owned()).collect::<Vec<_>>();
    let created_at = datetime!(2024-05-01 09:00 UTC) + time::Duration::hours(id as i64 * 30 + rng.gen_range(0..24));
    let updated_at = created_at + time::Duration::hours(rng.gen_range(0..500));
    let created_by = rng.gen_range(1..=3);
    Insight {
        id,
        project,
        short_id: short_id(rng),
        name,
        derived_name: Some(derived_name),
        description: if rng.gen_bool(0.5) { format!("Seeded demo insight #{id}.") } else { String::new() },
        query,
        tags: {
            let mut t = tags;
            t.sort();
            t.dedup();
            t
        },
        favorited: rng.gen_bool(0.2),
        saved: true,
        deleted: false,
        order: None,
        is_sample: false,
        created_at,
        created_by,
        updated_at,
        last_modified_at: updated_at,
        last_modified_by: created_by,
    }
}

fn layouts(slot: usize) -> Value {
    json!({
        "sm": {"h": 5, "w": 6, "x": (slot % 2) * 6, "y": (slot / 2) * 5, "minH": 1, "minW": 1},
        "xs": {"h": 5, "w": 1, "x": 0, "y": slot * 5, "minH": 1, "minW": 1},
    })
}

/// Per project `p` (k = p - 1): dashboard `3k+1` has no filters and the first six insights;
/// `3k+2` filters to the last 30 days and shows the insights at even positions;
/// `3k+3` filters to 90 days by week for Chrome and shows odd positions, its first tile storing
/// its own `filters_overrides` (`date_from: -180d`).
fn seeded_dashboards(rng: &mut StdRng, insights: &BTreeMap<u64, Insight>) -> (Vec<Dashboard>, Vec<Tile>) {
    let mut dashboards = Vec::new();
    let mut tiles = Vec::new();
    let chrome = json!([{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}]);
    for project in 1..=3u64 {
        let ids: Vec<u64> = insights.values().filter(|i| i.project == project).map(|i| i.id).collect();
        let k = (project - 1) * 3;
        let specs = [
            (k + 1, json!({}), ids.iter().take(6).copied().collect::<Vec<_>>()),
            (k + 2, json!({"date_from": "-30d", "date_to": null}), ids.iter().step_by(2).copied().collect()),
            (
                k + 3,
                json!({"date_from": "-90d", "interval": "week", "properties": chrome}),
                ids.iter().skip(1).step_by(2).copied().collect(),
            ),
        ];
        for (id, filters, members) in specs {
            for (slot, insight_id) in members.into_iter().enumerate() {
                let overrides = if id == k + 3 && slot == 0 { json!({"date_from": "-180d"}) } else { json!({}) };
                tiles.push(Tile {
                    id: tiles.len() as u64 + 1,
                    dashboard_id: id,
                    insight_id,
                    color: COLORS[rng.gen_range(0..COLORS.len())],
                    layouts: layouts(slot),
                    filters_overrides: overrides.as_object().cloned().unwrap_or_default(),
                    deleted: false,
                });
            }
            dashboards.push(Dashboard {
                id,
                project,
                filters: filters.as_object().cloned().unwrap_or_default(),
                variables: Map::new(),
            });
        }
    }
    (dashboards, tiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_shaped() {
        let a = build(42);
        let b = build(42);
        let c = build(7);
        let (sa, sb, sc) = (a.state.read(), b.state.read(), c.state.read());
        assert_eq!(sa.insights.len(), INSIGHT_COUNT as usize);
        for (x, y) in sa.insights.values().zip(sb.insights.values()) {
            assert_eq!((&x.short_id, &x.query, &x.name), (&y.short_id, &y.query, &y.name));
        }
        assert!(sa.insights.values().zip(sc.insights.values()).any(|(x, y)| x.query != y.query));
        for i in sa.insights.values() {
            assert_eq!(i.project, seeded_project(i.id));
            assert_eq!(sc.insights[&i.id].query["source"]["interval"], i.query["source"]["interval"]);
        }
        let short: HashSet<_> = sa.insights.values().map(|i| i.short_id.clone()).collect();
        assert_eq!(short.len(), INSIGHT_COUNT as usize);
        assert_eq!(a.dashboards.len(), 9);
        // every tile points at an insight of its dashboard's project
        for t in &sa.tiles {
            assert_eq!(a.dashboard(t.dashboard_id).unwrap().project, sa.insights[&t.insight_id].project);
        }
    }
}
