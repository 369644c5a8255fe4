//! The insights viewset: list, create, retrieve, update (soft delete/restore), the 405 on
//! DELETE, and the sharing/activity/viewed/cancel actions.

use crate::body;
use crate::data::{Activity, Dashboard, DataSet, Insight, Mutable, Project, Tile};
use crate::datetime::format_datetime;
use crate::engine::{self, Job};
use crate::error::ApiError;
use crate::handler::{empty_response, json_response, not_found, Reply, Request, Sub};
use crate::params::{absolute_url, str_to_bool};
use crate::query::{self, apply_filters, default_query};
use crate::refresh::{parse_refresh, RefreshParam};
use crate::{Fault, SimResponse};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use time::OffsetDateTime;

pub(crate) async fn handle(req: &Request<'_>, project: &Project, sub: Sub<'_>) -> Reply {
    match (sub, req.method) {
        (Sub::Insights, "GET") => list(req, project).await,
        (Sub::Insights, "POST") => create(req, project).await,
        (Sub::Insight(id), "GET") => retrieve(req, project, id).await,
        (Sub::Insight(id), "PATCH" | "PUT") => update(req, project, id).await,
        // ForbidDestroyModel: a bare 405, before any lookup.
        (Sub::Insight(_), "DELETE") => Ok(empty_response(405)),
        (Sub::InsightSharing(id), "GET") => sharing(req, project, id),
        (Sub::InsightActivity(id), "GET") => activity(req, project, Some(id)),
        (Sub::InsightsActivity, "GET") => activity(req, project, None),
        (Sub::InsightViewed(id), "POST") => {
            find(&req.inner.data, project, id, false).ok_or_else(not_found)?;
            Ok(empty_response(200))
        }
        (Sub::InsightsCancel, "POST") => cancel(req, project),
        _ => Err(ApiError::method_not_allowed(req.method).into()),
    }
}

/// Dashboard-style JSON overrides from the query string (UT `*_override_requested_by_client`).
#[derive(Default)]
struct Overrides {
    filters: Option<Map<String, Value>>,
    variables: Option<Map<String, Value>>,
    tile: Option<Map<String, Value>>,
}

fn parse_override(req: &Request<'_>, name: &'static str) -> Result<Option<Map<String, Value>>, SimResponse> {
    match req.params.get(name) {
        None | Some("") => Ok(None),
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(map)) => Ok(Some(map)),
            _ => Err(ApiError::bad_request(format!("Invalid JSON passed in {name} parameter")).with_attr(name).into()),
        },
    }
}

/// Request-level inputs of the full serializer, parsed once per request.
struct Ctx<'a> {
    req: &'a Request<'a>,
    project: &'a Project,
    refresh: RefreshParam,
    overrides: Overrides,
}

impl<'a> Ctx<'a> {
    fn new(req: &'a Request<'a>, project: &'a Project) -> Result<Self, SimResponse> {
        let refresh = parse_refresh(req.params.get("refresh"), req.body.as_ref().and_then(|b| b.get("refresh")));
        let overrides = Overrides {
            filters: parse_override(req, "filters_override")?,
            variables: parse_override(req, "variables_override")?,
            tile: parse_override(req, "tile_filters_override")?,
        };
        Ok(Self { req, project, refresh, overrides })
    }
}

/// An insight of `project` by numeric id or `short_id` (INS `safely_get_object`), with its
/// live tiles.
fn find(data: &DataSet, project: &Project, raw: &str, include_deleted: bool) -> Option<(Insight, Vec<Tile>)> {
    let st = data.state.read();
    let visible = |i: &&Insight| i.project == project.id && (include_deleted || !i.deleted);
    let by_pk = raw.bytes().all(|b| b.is_ascii_digit()).then(|| raw.parse::<u64>().ok()).flatten();
    let insight = by_pk
        .and_then(|id| st.insights.get(&id))
        .filter(visible)
        .or_else(|| st.insights.values().filter(visible).find(|i| i.short_id == raw))?;
    Some((insight.clone(), st.live_tiles(insight.id).cloned().collect()))
}

/// Runs one insight through the engine and renders it in full (INS `InsightSerializer`).
async fn render_full(ctx: &Ctx<'_>, ins: &Insight, tiles: &[Tile], via: Option<(&Dashboard, &Tile)>) -> String {
    let inner = ctx.req.inner;
    // Dashboard filters, then `filters_override` on top; tile filters replace both (CR, UT).
    let mut filters = via.map(|(d, _)| d.filters.clone()).unwrap_or_default();
    filters.extend(ctx.overrides.filters.clone().unwrap_or_default());
    let mut variables = via.map(|(d, _)| d.variables.clone()).unwrap_or_default();
    variables.extend(ctx.overrides.variables.clone().unwrap_or_default());
    let mut tile_filters = via.map(|(_, t)| t.filters_overrides.clone()).unwrap_or_default();
    tile_filters.extend(ctx.overrides.tile.clone().unwrap_or_default());
    if !tile_filters.is_empty() {
        filters = tile_filters;
    }
    let shown_query = apply_filters(&ins.query, &filters);
    let now = inner.clock.now();
    let plan = if ins.query.is_null() {
        query::plan(&apply_filters(&default_query(), &filters), now)
    } else {
        query::plan(&shown_query, now)
    };
    let names = plan.custom_names();
    let cache_key = query::cache_key(ctx.project.id, ctx.project.timezone, &plan, &variables);
    let job = Job {
        team: ctx.project.id,
        insight: ins.id,
        dashboard: via.map(|(d, _)| d.id),
        cache_key,
        plan: Arc::new(plan),
        timezone: ctx.project.timezone.to_owned(),
    };
    let outcome = engine::run(inner, job, ctx.refresh.mode).await;
    let render = body::Render {
        data: &inner.data,
        project: ctx.project,
        refresh_truthy: ctx.refresh.truthy,
        client_query_id: ctx.req.params.get("client_query_id"),
        null_result: inner.fault() == Fault::NullResult,
    };
    body::insight_full(&render, ins, tiles, &shown_query, &outcome, &names, via.map(|(_, t)| t))
}

async fn retrieve(req: &Request<'_>, project: &Project, raw_id: &str) -> Reply {
    let (ins, tiles) = find(&req.inner.data, project, raw_id, false).ok_or_else(not_found)?;
    if !req.inner.auth.can_access_insight(&req.principal, ins.id) {
        return Err(ApiError::permission_denied("You don't have access to this insight.").into());
    }
    let ctx = Ctx::new(req, project)?;
    // `from_dashboard` only counts when a live tile joins that dashboard and this insight.
    let via = req
        .params
        .get("from_dashboard")
        .and_then(|d| d.parse::<u64>().ok())
        .and_then(|d| tiles.iter().find(|t| t.dashboard_id == d))
        .and_then(|t| Some((req.inner.data.dashboard(t.dashboard_id)?, t)));
    Ok(json_response(200, render_full(&ctx, &ins, &tiles, via).await))
}

/// DRF `LimitOffsetPagination` over the project's live insights, ordered by id; each insight
/// on the page runs the request's refresh mode serially, as upstream.
async fn list(req: &Request<'_>, project: &Project) -> Reply {
    let params = &req.params;
    let basic = str_to_bool(params.get("basic"));
    let limit = params.get("limit").and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(100);
    let offset = params.get("offset").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let short_id = params.get("short_id").filter(|s| !s.is_empty());
    let created_by = parse_created_by(params.get("created_by"))?;
    let ctx = if basic { None } else { Some(Ctx::new(req, project)?) };

    let (count, page) = {
        let st = req.inner.data.state.read();
        let matching = || {
            st.insights.values().filter(|i| {
                i.project == project.id
                    && !i.deleted
                    && short_id.is_none_or(|s| i.short_id == s)
                    && created_by.as_ref().is_none_or(|ids| ids.contains(&i.created_by))
            })
        };
        let page: Vec<(Insight, Vec<Tile>)> =
            matching().skip(offset).take(limit).map(|i| (i.clone(), st.live_tiles(i.id).cloned().collect())).collect();
        (matching().count(), page)
    };

    let mut results = Vec::with_capacity(page.len());
    for (ins, tiles) in &page {
        results.push(match &ctx {
            Some(ctx) => render_full(ctx, ins, tiles, None).await,
            None => body::insight_basic(&req.inner.data, ins, tiles),
        });
    }
    let url = |set: &[(&str, String)], remove: &[&str]| absolute_url(req.host(), req.path, params, set, remove);
    let next = (offset.saturating_add(limit) < count)
        .then(|| url(&[("limit", limit.to_string()), ("offset", (offset + limit).to_string())], &[]));
    let previous = (offset > 0).then(|| {
        if offset <= limit {
            url(&[("limit", limit.to_string())], &["offset"])
        } else {
            url(&[("limit", limit.to_string()), ("offset", (offset - limit).to_string())], &[])
        }
    });
    let head = json!({"count": count, "next": next, "previous": previous}).to_string();
    Ok(json_response(200, body::splice(&head, "results", &format!("[{}]", results.join(",")))))
}

/// `created_by`: a JSON array of user ids (or a single id).
fn parse_created_by(raw: Option<&str>) -> Result<Option<Vec<u64>>, SimResponse> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let invalid =
        || -> SimResponse { ApiError::bad_request("Invalid created_by filter.").with_attr("created_by").into() };
    match serde_json::from_str::<Value>(raw).map_err(|_| invalid())? {
        Value::Array(ids) if ids.is_empty() => Ok(None),
        Value::Array(ids) => ids.iter().map(|v| v.as_u64().ok_or_else(invalid)).collect::<Result<_, _>>().map(Some),
        v => v.as_u64().map(|id| Some(vec![id])).ok_or_else(invalid),
    }
}

/// Writable fields of a POST/PATCH body, validated like the DRF serializer.
#[derive(Default)]
struct Fields {
    name: Option<Option<String>>,
    derived_name: Option<Option<String>>,
    description: Option<String>,
    query: Option<Value>,
    tags: Option<Vec<String>>,
    favorited: Option<bool>,
    saved: Option<bool>,
    deleted: Option<bool>,
    order: Option<Option<i64>>,
    dashboards: Option<Vec<u64>>,
}

/// `$to.f = v` for each listed field `f` whose `$from.f` is `Some(v)`; the others keep their value
/// (a PATCH: absent fields are left alone).
macro_rules! assign_given {
    ($to:ident, $from:ident: $($field:ident),+) => {
        $(if let Some(v) = $from.$field {
            $to.$field = v;
        })+
    };
}

fn invalid(attr: &'static str, detail: impl Into<String>) -> SimResponse {
    ApiError::bad_request(detail).with_attr(attr).into()
}

fn char_field(v: &Value, attr: &'static str) -> Result<Option<String>, SimResponse> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.chars().count() > 400 && attr == "name" => {
            Err(invalid(attr, "Ensure this field has no more than 400 characters."))
        }
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(invalid(attr, "Not a valid string.")),
    }
}

fn bool_field(v: &Value, attr: &'static str) -> Result<bool, SimResponse> {
    let as_text = match v {
        Value::Bool(b) => return Ok(*b),
        Value::String(s) => s.to_lowercase(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    match as_text.as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Ok(false),
        _ => Err(invalid(attr, "Must be a valid boolean.")),
    }
}

fn list_field<'v>(v: &'v Value, attr: &'static str) -> Result<&'v [Value], SimResponse> {
    let kind = match v {
        Value::Array(items) => return Ok(items),
        Value::String(_) => "str",
        Value::Object(_) => "dict",
        Value::Bool(_) => "bool",
        Value::Number(_) => "int",
        Value::Null => return Err(invalid(attr, "This field may not be null.")),
    };
    Err(invalid(attr, format!("Expected a list of items but got type \"{kind}\".")))
}

fn parse_fields(body: &Map<String, Value>, data: &DataSet, project: &Project) -> Result<Fields, SimResponse> {
    let mut f = Fields::default();
    for (key, v) in body {
        match key.as_str() {
            "name" => f.name = Some(char_field(v, "name")?),
            "derived_name" => f.derived_name = Some(char_field(v, "derived_name")?),
            "description" => f.description = Some(char_field(v, "description")?.unwrap_or_default()),
            "query" => {
                f.query = Some(match v {
                    Value::Null => Value::Null,
                    Value::Object(q) if q.get("kind").is_some_and(Value::is_string) => v.clone(),
                    Value::Object(_) => {
                        let e =
                            ApiError::new(400, "validation_error", "parse_error", "Query must have a string \"kind\".");
                        return Err(e.into());
                    }
                    _ => return Err(invalid("query", "Query must be a valid JSON object")),
                })
            }
            "tags" => {
                let tags = list_field(v, "tags")?
                    .iter()
                    .map(|t| char_field(t, "tags").map(Option::unwrap_or_default))
                    .collect::<Result<Vec<_>, _>>()?;
                f.tags = Some(tags);
            }
            "favorited" => f.favorited = Some(bool_field(v, "favorited")?),
            "saved" => f.saved = Some(bool_field(v, "saved")?),
            "deleted" => f.deleted = Some(bool_field(v, "deleted")?),
            "order" => {
                f.order = Some(match v {
                    Value::Null => None,
                    v => Some(v.as_i64().ok_or_else(|| invalid("order", "A valid integer is required."))?),
                })
            }
            "dashboards" => {
                let ids = list_field(v, "dashboards")?
                    .iter()
                    .map(|d| {
                        match d.as_u64().filter(|id| data.dashboard(*id).is_some_and(|d| d.project == project.id)) {
                            Some(id) => Ok(id),
                            None => Err(invalid("dashboards", format!("Invalid pk \"{d}\" - object does not exist."))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                f.dashboards = Some(ids);
            }
            _ => {} // read-only or unknown fields are ignored, as DRF does
        }
    }
    Ok(f)
}

/// Makes the insight's live tiles match `dashboards`, reviving soft-deleted tiles.
fn set_dashboards(st: &mut Mutable, insight_id: u64, dashboards: &[u64]) {
    for t in st.tiles.iter_mut().filter(|t| t.insight_id == insight_id) {
        t.deleted = !dashboards.contains(&t.dashboard_id);
    }
    for &d in dashboards {
        if !st.tiles.iter().any(|t| t.insight_id == insight_id && t.dashboard_id == d) {
            let id = st.next_tile_id;
            st.next_tile_id += 1;
            let layouts = json!({"sm": {"h": 5, "w": 6, "x": 0, "y": 0, "minH": 1, "minW": 1}});
            st.tiles.push(Tile {
                id,
                dashboard_id: d,
                insight_id,
                color: None,
                layouts,
                filters_overrides: Map::new(),
                deleted: false,
            });
        }
    }
}

fn display_name(i: &Insight) -> String {
    i.name.clone().or_else(|| i.derived_name.clone()).unwrap_or_default()
}

/// Saves `ins`, logs `activity` on it (by `user` at `at`) and returns it with its live tiles.
fn store(
    st: &mut Mutable,
    ins: Insight,
    activity: &'static str,
    user: u64,
    at: OffsetDateTime,
    changes: Value,
) -> (Insight, Vec<Tile>) {
    st.log(Activity {
        project: ins.project,
        insight_id: ins.id,
        short_id: ins.short_id.clone(),
        name: display_name(&ins),
        activity,
        user_id: user,
        at,
        changes,
    });
    st.insights.insert(ins.id, ins.clone());
    let tiles = st.live_tiles(ins.id).cloned().collect();
    (ins, tiles)
}

async fn create(req: &Request<'_>, project: &Project) -> Reply {
    let data = &req.inner.data;
    let empty = Map::new();
    let body = req.body.as_ref().and_then(Value::as_object).unwrap_or(&empty);
    let fields = parse_fields(body, data, project)?;
    let ctx = Ctx::new(req, project)?;
    let now = req.inner.clock.now();
    let user = req.principal.user_id;
    let (ins, tiles) = {
        let mut st = data.state.write();
        let id = st.insights.keys().next_back().map_or(1, |k| k + 1);
        let short_id = st.new_short_id();
        let ins = Insight {
            id,
            project: project.id,
            short_id,
            name: fields.name.flatten(),
            derived_name: fields.derived_name.flatten(),
            description: fields.description.unwrap_or_default(),
            query: fields.query.unwrap_or(Value::Null),
            tags: fields.tags.unwrap_or_default(),
            favorited: fields.favorited.unwrap_or(false),
            saved: fields.saved.unwrap_or(false),
            deleted: fields.deleted.unwrap_or(false),
            order: fields.order.flatten(),
            is_sample: false,
            created_at: now,
            created_by: user,
            updated_at: now,
            last_modified_at: now,
            last_modified_by: user,
        };
        if let Some(dashboards) = &fields.dashboards {
            set_dashboards(&mut st, id, dashboards);
        }
        store(&mut st, ins, "created", user, now, Value::Null)
    };
    Ok(json_response(201, render_full(&ctx, &ins, &tiles, None).await))
}

async fn update(req: &Request<'_>, project: &Project, raw_id: &str) -> Reply {
    let data = &req.inner.data;
    let empty = Map::new();
    let body = req.body.as_ref().and_then(Value::as_object).unwrap_or(&empty);
    // Only `{"deleted": false}` may see a soft-deleted insight (INS `dangerously_get_queryset`).
    let include_deleted = body.get("deleted") == Some(&Value::Bool(false));
    let (found, _) = find(data, project, raw_id, include_deleted).ok_or_else(not_found)?;
    let fields = parse_fields(body, data, project)?;
    let ctx = Ctx::new(req, project)?;
    let now = req.inner.clock.now();
    let user = req.principal.user_id;
    let (ins, tiles) = {
        let mut st = data.state.write();
        let Some(before) = st.insights.get(&found.id).cloned() else {
            return Err(not_found());
        };
        let mut after = before.clone();
        assign_given!(after, fields: name, derived_name, description, query, tags, favorited, order, deleted);
        after.saved = fields.saved.unwrap_or(true);
        after.is_sample = false;
        after.updated_at = now;
        let material =
            before.name != after.name || before.description != after.description || before.query != after.query;
        if material {
            after.last_modified_at = now;
            after.last_modified_by = user;
        }
        if after.deleted && fields.deleted == Some(true) {
            for t in st.tiles.iter_mut().filter(|t| t.insight_id == after.id) {
                t.deleted = true;
            }
        } else if let Some(dashboards) = &fields.dashboards {
            set_dashboards(&mut st, after.id, dashboards);
        }
        let activity = match (before.deleted, after.deleted) {
            (false, true) => "deleted",
            (true, false) => "restored",
            _ => "updated",
        };
        let changes = changes(&before, &after);
        store(&mut st, after, activity, user, now, changes)
    };
    Ok(json_response(200, render_full(&ctx, &ins, &tiles, None).await))
}

/// Activity-log `changes` between two versions of an insight.
fn changes(before: &Insight, after: &Insight) -> Value {
    let pairs = [
        ("name", json!(before.name), json!(after.name)),
        ("derived_name", json!(before.derived_name), json!(after.derived_name)),
        ("description", json!(before.description), json!(after.description)),
        ("query", before.query.clone(), after.query.clone()),
        ("tags", json!(before.tags), json!(after.tags)),
        ("favorited", json!(before.favorited), json!(after.favorited)),
        ("deleted", json!(before.deleted), json!(after.deleted)),
    ];
    pairs
        .into_iter()
        .filter(|(_, b, a)| b != a)
        .map(|(field, b, a)| json!({"type": "Insight", "action": "changed", "field": field, "before": b, "after": a}))
        .collect()
}

fn sharing(req: &Request<'_>, project: &Project, raw_id: &str) -> Reply {
    let (ins, _) = find(&req.inner.data, project, raw_id, false).ok_or_else(not_found)?;
    let token_source = format!("{}:{}:{}", req.inner.seed, project.id, ins.id);
    let token = blake3::hash(token_source.as_bytes()).to_hex()[..22].to_owned();
    let body = json!({"created_at": format_datetime(ins.created_at), "enabled": false, "access_token": token});
    Ok(json_response(200, body.to_string()))
}

fn activity(req: &Request<'_>, project: &Project, raw_id: Option<&str>) -> Reply {
    let data = &req.inner.data;
    let target = match raw_id {
        Some(raw) => Some(find(data, project, raw, false).ok_or_else(not_found)?.0.id),
        None => None,
    };
    let st = data.state.read();
    let results: Vec<Value> = st
        .activity
        .iter()
        .rev()
        .filter(|a| a.project == project.id && target.is_none_or(|t| a.insight_id == t))
        .take(100)
        .map(|a| {
            let user = data.user(a.user_id);
            json!({
                "user": {"first_name": user.map(|u| u.first_name), "email": user.map(|u| u.email)},
                "unread": false, "is_staff": false, "is_system": false,
                "activity": a.activity, "item_id": a.insight_id.to_string(), "scope": "Insight",
                "detail": {"id": a.insight_id, "changes": a.changes, "merge": null, "trigger": null,
                    "type": null, "name": a.name, "short_id": a.short_id},
                "created_at": format_datetime(a.at),
            })
        })
        .collect();
    Ok(json_response(200, json!({"results": results, "next": null, "previous": null}).to_string()))
}

/// `POST insights/cancel {client_query_id}` → 201; the query's status record is dropped.
fn cancel(req: &Request<'_>, project: &Project) -> Reply {
    let id = req.body.as_ref().and_then(|b| b.get("client_query_id")).and_then(Value::as_str);
    let Some(id) = id else {
        return Err(invalid("client_query_id", "This field is required."));
    };
    req.inner.engine.remove_status(project.id, id);
    Ok(empty_response(201))
}
