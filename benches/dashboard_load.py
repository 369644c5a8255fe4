#!/usr/bin/env python3
"""Dashboard load against insights-proxy and, for comparison, directly against the simulated PostHog.

V viewers each repeatedly "load" a dashboard picked by a Zipf distribution over all dashboards:
one list request (GET /api/environments/P/insights/?limit=L&refresh=<mode>) plus one retrieve per
tile (GET /api/environments/P/insights/ID/?from_dashboard=D&refresh=<mode>), then wait R seconds
(auto-refresh, jittered) and reload. Every request picks its own refresh mode from the mix.

The same seeded load runs directly against a fresh simulator (PostHog's limits on) and through the
proxy in front of another fresh simulator, and the figures are reported side by side: upstream
calculations per insight per staleness window, limit errors (429, concurrency_limit_exceeded),
stale answers (all tiles and hot tiles), and client latency per mode.

Standard library only (Python 3.11+). All traffic goes to 127.0.0.1. Every process this tool starts
is stopped by its PID, also on Ctrl-C, SIGTERM and exceptions. Usage notes: benches/dashboard_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BINARY = "/work/target-load/release/insights-proxy"
KEYS = ["phx_demo_all", "phx_demo_p1", "phx_demo_p2"]
SESSION_COOKIE = "sessionid=demo_session_all"  # session users are not throttled: used for discovery
INTERVALS = ["minute", "hour", "day", "week", "month", "quarter", "year"]
MODES = ["force_cache", "async", "blocking", "force_blocking", "lazy_async", "force_async",
         "async_except_on_cache_miss"]
FORCED = {"force_blocking", "force_async"}
DEFAULT_MIX = "force_cache=60,async=30,blocking=8,force_blocking=2"
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes: started with start_new_session (Ctrl-C reaches only us), always stopped by PID.
# --------------------------------------------------------------------------------------------

class Processes:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, Any]] = []

    def start(self, name: str, argv: list[str], log_path: str) -> subprocess.Popen:
        logf = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
        self.procs.append((name, p, logf))
        log(f"started {name} pid={p.pid} (log {log_path})")
        return p

    def stop(self, p: subprocess.Popen) -> None:
        for i, (name, q, logf) in enumerate(self.procs):
            if q is p:
                self._stop_one(name, q, logf)
                del self.procs[i]
                return

    @staticmethod
    def _stop_one(name: str, p: subprocess.Popen, logf: Any) -> None:
        try:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGINT)  # pingora: SIGINT exits at once
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
            log(f"stopped {name} pid={p.pid} rc={p.returncode}")
        except (ProcessLookupError, subprocess.TimeoutExpired, OSError) as e:
            log(f"stopping {name} pid={p.pid}: {e}")
        finally:
            try:
                logf.close()
            except OSError:
                pass

    def stop_all(self) -> None:
        while self.procs:
            name, p, logf = self.procs.pop()
            self._stop_one(name, p, logf)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client on asyncio streams.
# --------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpError(Exception):
    pass


class Conn:
    """One keep-alive connection to 127.0.0.1:port; reconnects after any error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0

    async def close(self) -> None:
        w, self.reader, self.writer = self.writer, None, None
        if w is not None:
            w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass

    async def _once(self, path: str, headers: dict[str, str]) -> Response:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=64 * 1024 * 1024)
            self.used = 0
        self.used += 1
        lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{self.port}", "Accept: application/json",
                 "Connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()
        r = self.reader
        status_line = await r.readline()
        if not status_line:
            raise HttpError("connection closed before the status line")
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        hdrs: dict[str, str] = {}
        for _ in range(200):
            line = await r.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            k = k.strip().lower()
            hdrs[k] = f"{hdrs[k]}, {v.strip()}" if k in hdrs else v.strip()
        else:
            raise HttpError("too many headers")
        if status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            chunks = []
            for _ in range(1_000_000):
                size_line = await r.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await r.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await r.readexactly(size))
                await r.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in hdrs:
            body = await r.readexactly(int(hdrs["content-length"]))
        else:
            body = await r.read()  # until close
            hdrs["connection"] = "close"
        if "close" in hdrs.get("connection", "").lower():
            await self.close()
        return Response(status, hdrs, body)

    async def get(self, path: str, headers: dict[str, str], timeout: float) -> Response:
        """One GET within `timeout` per attempt; a kept-alive connection that the server closed while
        idle is retried once on a new connection. Raises TimeoutError, OSError or HttpError."""
        for attempt in range(2):
            reused = self.writer is not None and self.used > 0
            try:
                return await asyncio.wait_for(self._once(path, headers), timeout)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, HttpError) as e:
                await self.close()
                retry = (attempt == 0 and reused and not isinstance(e, asyncio.TimeoutError)
                         and isinstance(e, (HttpError, ConnectionError, asyncio.IncompleteReadError)))
                if not retry:
                    raise
        raise HttpError("unreachable")


async def simple_get(port: int, path: str, headers: dict[str, str] | None = None,
                     timeout: float = 10.0) -> Response:
    c = Conn(port)
    try:
        return await c.get(path, headers or {}, timeout)
    finally:
        await c.close()


async def get_json(port: int, path: str, headers: dict[str, str] | None = None) -> Any:
    r = await simple_get(port, path, headers)
    if r.status != 200:
        raise RuntimeError(f"GET {path} on :{port} answered {r.status}: {r.body[:200]!r}")
    return json.loads(r.body)


# --------------------------------------------------------------------------------------------
# Discovery of projects, key access and dashboards (from the simulator, never through the proxy).
# --------------------------------------------------------------------------------------------

@dataclass
class Dashboard:
    id: int
    project: int
    tiles: list[int]  # insight ids in tile order
    rank: int = 0
    weight: float = 0.0


async def discover(sim_port: int) -> tuple[list[Dashboard], dict[str, set[int]]]:
    cookie = {"Cookie": SESSION_COOKIE}
    projects = [p["id"] for p in (await get_json(sim_port, "/api/projects/", cookie))["results"]]
    tiles: dict[int, list[tuple[int, int]]] = defaultdict(list)  # dashboard -> [(tile id, insight)]
    dash_project: dict[int, int] = {}
    for p in projects:
        path = f"/api/environments/{p}/insights/?basic=true&limit=100"
        for _ in range(50):  # pages, bounded
            page = await get_json(sim_port, path, cookie)
            for ins in page["results"]:
                for t in ins.get("dashboard_tiles") or []:
                    if t.get("deleted"):
                        continue
                    tiles[t["dashboard_id"]].append((t["id"], ins["id"]))
                    dash_project[t["dashboard_id"]] = p
                if not ins.get("dashboard_tiles"):
                    for d in ins.get("dashboards") or []:
                        tiles[d].append((0, ins["id"]))
                        dash_project[d] = p
            nxt = page.get("next")
            if not nxt:
                break
            path = "/" + nxt.split("://", 1)[-1].split("/", 1)[1]
    dashboards = [Dashboard(d, dash_project[d], [i for _, i in sorted(tiles[d])]) for d in sorted(tiles)]
    # Which projects each demo key may read (GET /api/projects/ is not throttled).
    access: dict[str, set[int]] = {}
    for k in KEYS:
        r = await simple_get(sim_port, "/api/projects/", {"Authorization": f"Bearer {k}"})
        access[k] = {p["id"] for p in json.loads(r.body)["results"]} if r.status == 200 else set()
    return dashboards, access


# --------------------------------------------------------------------------------------------
# What one answer says.
# --------------------------------------------------------------------------------------------

def parse_time(s: Any) -> float | None:
    if not isinstance(s, str):
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def first_calc_number(result: Any) -> int | None:
    stack, seen = [result], 0
    while stack and seen < 10_000:
        seen += 1
        v = stack.pop()
        if isinstance(v, dict):
            n = v.get("calculation_number")
            if isinstance(n, int):
                return n
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return None


def never_stale(obj: dict) -> bool:
    """A fixed date range that ended in the past never goes stale (docs/refresh-semantics.md §3.1)."""
    q = obj.get("query")
    if not isinstance(q, dict):
        return False
    src = q.get("source") if isinstance(q.get("source"), dict) else q
    rng = src.get("dateRange") if isinstance(src.get("dateRange"), dict) else {}
    date_to = rng.get("date_to")
    if not isinstance(date_to, str) or date_to.startswith("-"):
        return False
    try:
        d = dt.date.fromisoformat(date_to[:10])
    except ValueError:
        return False
    return d < dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)


@dataclass
class Item:
    """One insight in an answer (a retrieve body or a list entry)."""
    insight: int
    has_result: bool
    last_refresh: float | None
    calc: int | None
    filters_hash: str | None
    is_cached: Any
    limit_error: bool  # query_status.error_message == concurrency_limit_exceeded
    other_error: str | None
    never_stale: bool
    status_id: str | None = None  # query_status.id; the proxy's own ids start with "ipx_"


def item_of(obj: dict) -> Item | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), int):
        return None
    qs = obj.get("query_status") if isinstance(obj.get("query_status"), dict) else {}
    msg = qs.get("error_message") if qs.get("error") else None
    result = obj.get("result")
    return Item(
        insight=obj["id"],
        has_result=result is not None,
        last_refresh=parse_time(obj.get("last_refresh")),
        calc=first_calc_number(result) if result is not None else None,
        filters_hash=obj.get("filters_hash") if isinstance(obj.get("filters_hash"), str) else None,
        is_cached=obj.get("is_cached"),
        limit_error=msg == "concurrency_limit_exceeded",
        other_error=None if msg in (None, "concurrency_limit_exceeded") else str(msg)[:80],
        never_stale=never_stale(obj),
        status_id=qs.get("id") if isinstance(qs.get("id"), str) else None,
    )


@dataclass
class Rec:
    kind: str  # "list" | "retrieve"
    mode: str
    project: int
    dashboard: int
    insight: int | None
    key: str
    t_send: float  # seconds since load start
    latency: float
    status: int | None  # None: no HTTP answer
    error: str | None
    cache_status: str | None
    recv_wall: float
    items: list[Item] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The load.
# --------------------------------------------------------------------------------------------

@dataclass
class LoadSpec:
    viewers: int
    duration: float
    reload: float
    jitter: float
    zipf_s: float
    mix: list[tuple[str, float]]
    keys: int
    seed: int
    list_limit: int
    calc_delay_ms: int
    parallel: int
    request_timeout: float
    max_loads: int
    staleness: float
    hot: int
    warmup: float


def zipf_weights(dashboards: list[Dashboard], s: float) -> None:
    for rank, d in enumerate(dashboards, start=1):  # rank 1 = lowest dashboard id
        d.rank, d.weight = rank, 1.0 / rank ** s


def key_for(viewer: int, project: int, nkeys: int, access: dict[str, set[int]]) -> str:
    cands = [k for k in KEYS[:nkeys] if project in access.get(k, set())] or [KEYS[0]]
    return cands[viewer % len(cands)]


def request_path(kind: str, project: int, dashboard: int, insight: int | None, mode: str,
                 list_limit: int) -> str:
    q = [] if mode == "force_cache" else [f"refresh={mode}"]
    if kind == "list":
        return f"/api/environments/{project}/insights/?" + "&".join([f"limit={list_limit}"] + q)
    q = [f"from_dashboard={dashboard}"] + q
    return f"/api/environments/{project}/insights/{insight}/?" + "&".join(q)


async def run_load(ports: list[int], weights: list[float], spec: LoadSpec, dashboards: list[Dashboard],
                   access: dict[str, set[int]], t0: float) -> tuple[list[Rec], float, int]:
    """Viewers load dashboards from t0 until t0 + warmup + duration (a load under way finishes).
    Each viewer stays on one of `ports`, drawn with `weights` (a skewed load balancer)."""
    recs: list[Rec] = []
    loads = 0
    modes = [m for m, _ in spec.mix]
    mode_w = [w for _, w in spec.mix]
    dash_w = [d.weight for d in dashboards]
    deadline = t0 + spec.warmup + spec.duration

    async def one(conn: Conn, kind: str, d: Dashboard, insight: int | None, mode: str, key: str) -> None:
        path = request_path(kind, d.project, d.id, insight, mode, spec.list_limit)
        start = time.monotonic()
        status = error = cs = None
        items: list[Item] = []
        try:
            r = await conn.get(path, {"Authorization": f"Bearer {key}"}, spec.request_timeout)
            status, cs = r.status, r.headers.get("cache-status")
            if r.status == 200:
                try:
                    body = json.loads(r.body)
                except ValueError:
                    error = "non-json"
                else:
                    if kind == "list":
                        items = [it for it in map(item_of, body.get("results") or []) if it]
                    else:
                        it = item_of(body)
                        items = [it] if it else []
        except asyncio.TimeoutError:
            error = "timeout"
        except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as e:
            error = type(e).__name__
        end = time.monotonic()
        recs.append(Rec(kind, mode, d.project, d.id, insight, key, start - t0, end - start, status, error, cs,
                        time.time(), items))

    async def viewer(v: int) -> None:
        nonlocal loads
        rng = random.Random(f"{spec.seed}/{v}")
        port = random.Random(f"{spec.seed}/{v}/replica").choices(ports, weights)[0]
        conns = [Conn(port) for _ in range(spec.parallel)]
        try:
            # Viewers open their dashboards at different moments within the first reload period.
            await asyncio.sleep(min(rng.uniform(0, spec.reload), max(0.0, deadline - time.monotonic())))
            for _ in range(spec.max_loads):
                if time.monotonic() >= deadline:
                    break
                d = rng.choices(dashboards, dash_w)[0]
                key = key_for(v, d.project, spec.keys, access)
                work = [("list", None)] + [("retrieve", i) for i in d.tiles]
                work_modes = rng.choices(modes, mode_w, k=len(work))
                queue: asyncio.Queue = asyncio.Queue()
                for (kind, ins), mode in zip(work, work_modes):
                    queue.put_nowait((kind, ins, mode))

                async def lane(c: Conn) -> None:
                    while not queue.empty():
                        kind, ins, mode = queue.get_nowait()
                        await one(c, kind, d, ins, mode, key)

                load_start = time.monotonic() - t0
                await asyncio.gather(*(lane(c) for c in conns[: min(spec.parallel, len(work))]))
                if load_start >= spec.warmup:
                    loads += 1
                wait = spec.reload * rng.uniform(1 - spec.jitter, 1 + spec.jitter)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(wait, remaining))
        finally:
            for c in conns:
                await c.close()

    await asyncio.gather(*(viewer(v) for v in range(spec.viewers)))
    return recs, time.monotonic() - t0, loads


# --------------------------------------------------------------------------------------------
# One run: a fresh simulator, optionally a proxy in front, the load, and the counters.
# --------------------------------------------------------------------------------------------

def proxy_toml(listen: int, admin: int, sim: int, a: argparse.Namespace, refresh_ahead: bool,
               redis: int | None = None) -> str:
    s = int(a.staleness)
    cluster = [] if redis is None else [
        "[cache]", 'partition_secret = "dashboard-load-partition-secret"', "",
        "[l2]", f'url = "redis://{HOST}:{redis}/0"', "",
    ]
    out = [
        "[server]", f'listen = "{HOST}:{listen}"', "", *cluster,
        "[upstream]", f'url = "http://{HOST}:{sim}"', "",
        "[admin]", f'listen = "{HOST}:{admin}"', "",
        "[staleness.default]", *[f"{i} = {s}" for i in INTERVALS], "",
        "[staleness.lazy]", *[f"{i} = {2 * s}" for i in INTERVALS], "",
        "[budget]",
    ]
    for opt, key in [("budget_project_concurrency", "project_concurrency"), ("budget_per_minute", "per_minute"),
                     ("budget_per_hour", "per_hour"), ("budget_wait_ms", "wait_ms")]:
        if getattr(a, opt) is not None:
            out.append(f"{key} = {getattr(a, opt)}")
    if redis is not None:
        out.append(f"shared = {'true' if a.shared_budget == 'on' else 'false'}")
    out += ["", "[refresh_ahead]", f"enabled = {'true' if refresh_ahead else 'false'}", ""]
    if a.forced_min_interval is not None:
        value = a.forced_min_interval if not a.forced_min_interval.isdigit() else int(a.forced_min_interval)
        out += ["[refresh]", f"forced_min_interval = {json.dumps(value)}", ""]
    return "\n".join(out)


async def wait_ready(p: subprocess.Popen, port: int, path: str, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited with {p.returncode} during start (see its log)")
        try:
            r = await simple_get(port, path, timeout=2.0)
            if r.status == 200:
                return
            last = f"HTTP {r.status}"
        except (OSError, asyncio.TimeoutError, HttpError, asyncio.IncompleteReadError) as e:
            last = type(e).__name__
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not ready on :{port}{path} after {timeout:.0f} s ({last})")


SAMPLE_EVERY = 1.0  # seconds between /_sim/stats samples during a run


def scan_log(path: str) -> dict:
    """Warnings and errors in a process log (RUST_LOG=warn), and how many mention a 429."""
    out = {"warn": 0, "error": 0, "mentions_429": 0, "examples": []}
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode("utf-8", "replace")).strip()
                level = "error" if " ERROR " in line else "warn" if " WARN " in line else None
                if level:
                    out[level] += 1
                    msg = line.split(" ", 2)[-1][:200]
                    if msg not in out["examples"] and len(out["examples"]) < 5:
                        out["examples"].append(msg)
                if "429" in line:
                    out["mentions_429"] += 1
    except OSError:
        pass
    return out


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("insights_proxy_"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


async def wait_port(port: int, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _, w = await asyncio.open_connection(HOST, port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} not listening on :{port} after {timeout:.0f} s")


async def one_run(label: str, via_proxy: bool, refresh_ahead: bool, a: argparse.Namespace, spec: LoadSpec,
                  procs: Processes, logdir: str, skew: list[float] | None = None) -> dict:
    """`skew`: several replicas on one Redis, viewers spread over them with these weights."""
    sim_port = free_port()
    sim = procs.start(f"simulator[{label}]", [
        a.binary, "simulate", "--listen", f"{HOST}:{sim_port}", "--calc-delay-ms", str(a.calc_delay_ms),
        "--concurrency-limit", str(a.concurrency_limit), "--rate-limit-per-minute", str(a.rate_limit_per_minute),
        "--rate-limit-per-hour", str(a.rate_limit_per_hour), "--staleness-seconds", str(int(a.staleness)),
        "--seed", str(a.sim_seed)], os.path.join(logdir, f"{label}-simulator.log"))
    proxies: list[subprocess.Popen] = []
    redis = None
    try:
        await wait_ready(sim, sim_port, "/_sim/stats", "simulator")
        dashboards, access = await discover(sim_port)
        if not dashboards:
            raise RuntimeError("the simulator has no dashboards")
        zipf_weights(dashboards, spec.zipf_s)
        targets, weights, admin_ports = [sim_port], [1.0], []
        if via_proxy:
            redis_port = None
            if skew:
                redis_port = free_port()
                redis = procs.start(f"redis[{label}]", [a.redis_server, "--port", str(redis_port), "--bind", HOST,
                                                        "--save", "", "--appendonly", "no"],
                                    os.path.join(logdir, f"{label}-redis.log"))
                await wait_port(redis_port, "redis-server")
            weights = skew or [1.0]
            targets = []
            for i in range(len(weights)):
                target, admin_port = free_port(), free_port()
                cfg = os.path.join(logdir, f"{label}-proxy{i}.toml")
                with open(cfg, "w") as f:
                    f.write(proxy_toml(target, admin_port, sim_port, a, refresh_ahead, redis_port))
                chk = subprocess.run([a.binary, "--check-config", "--config", cfg], capture_output=True, text=True,
                                     timeout=30)
                if chk.returncode != 0:
                    raise RuntimeError(f"proxy config rejected: {chk.stdout}{chk.stderr}")
                proxies.append(procs.start(f"proxy{i}[{label}]", [a.binary, "--config", cfg],
                                           os.path.join(logdir, f"{label}-proxy{i}.log")))
                await wait_ready(proxies[-1], admin_port, "/readyz", "proxy")
                targets.append(target)
                admin_ports.append(admin_port)

        async def metrics_now() -> dict[str, float]:
            """The replicas' metrics, summed."""
            out: dict[str, float] = {}
            for admin_port in admin_ports:
                try:
                    r = await simple_get(admin_port, "/metrics")
                except (OSError, asyncio.TimeoutError, HttpError, asyncio.IncompleteReadError) as e:
                    log(f"{label}: /metrics unavailable ({type(e).__name__})")
                    return {}
                for k, v in parse_metrics(r.body.decode("utf-8", "replace")).items():
                    out[k] = out.get(k, 0.0) + v
            return out

        before: dict = {}
        metrics_before: dict[str, float] = {}
        if spec.warmup <= 0:
            before, metrics_before = await get_json(sim_port, "/_sim/stats"), await metrics_now()
        t0 = time.monotonic()
        t0_wall = time.time()
        samples: list[tuple[float, dict]] = []  # (seconds since t0, /_sim/stats), every SAMPLE_EVERY s
        stop = asyncio.Event()

        async def sampler() -> None:
            nonlocal before, metrics_before
            for _ in range(1_000_000):
                if stop.is_set():
                    break
                t = time.monotonic() - t0
                try:
                    st = await get_json(sim_port, "/_sim/stats")
                except (OSError, asyncio.TimeoutError, HttpError, RuntimeError, ValueError):
                    st = None
                if st is not None:
                    samples.append((t, st))
                    if not before and t >= spec.warmup - 0.01:
                        before, metrics_before = st, await metrics_now()
                now = time.monotonic() - t0
                nxt = (math.floor(now / SAMPLE_EVERY) + 1) * SAMPLE_EVERY
                if not before and now < spec.warmup:
                    nxt = min(nxt, spec.warmup)
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, nxt - now))
                except asyncio.TimeoutError:
                    pass

        warm = f" after {spec.warmup:g} s of warm-up" if spec.warmup else ""
        log(f"{label}: {spec.viewers} viewers for {spec.duration:g} s{warm} against :{targets} weighted {weights}")
        sampling = asyncio.create_task(sampler())
        try:
            recs, elapsed, loads = await run_load(targets, weights, spec, dashboards, access, t0)
        finally:
            stop.set()
            await sampling
        after = await get_json(sim_port, "/_sim/stats")
        samples.append((time.monotonic() - t0, after))
        metrics = await metrics_now()
        if not before:  # the load ended before the warm-up did
            before, metrics_before = samples[0][1], {}
        for p in (*proxies, redis, sim):
            if p is not None and p.poll() is not None:
                log(f"warning: a process of {label} exited early (rc={p.returncode})")
        proxy_log = scan_log(os.path.join(logdir, f"{label}-proxy0.log")) if via_proxy else {}
        if a.dump_requests:
            with open(f"{a.dump_requests}.{label}.jsonl", "w") as f:
                for r in recs:
                    d = dict(vars(r))
                    d["items"] = [vars(it) for it in r.items]
                    f.write(json.dumps(no_nan(d)) + "\n")
        return analyse(label, via_proxy, refresh_ahead, spec, dashboards, access, recs, elapsed, loads, before,
                       after, metrics, metrics_before, samples, t0_wall, proxy_log)
    finally:
        for p in (*proxies, redis):
            if p is not None:
                procs.stop(p)
        procs.stop(sim)


# --------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------

def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[i]


def lat_summary(vals: list[float]) -> dict:
    v = sorted(vals)
    return {"n": len(v), "p50_ms": pct(v, .5) * 1e3, "p90_ms": pct(v, .9) * 1e3, "p99_ms": pct(v, .99) * 1e3,
            "max_ms": (v[-1] * 1e3) if v else float("nan")}


def normalise_cs(cs: str | None) -> str:
    if cs is None:
        return "(none)"
    s = cs.removeprefix("insights-proxy; ")
    return re.sub(r"ttl=-?\d+", lambda m: m.group(0) if m.group(0) == "ttl=0" else
                  "ttl=-N" if "-" in m.group(0) else "ttl=N", s)


def analyse(label: str, via_proxy: bool, refresh_ahead: bool, spec: LoadSpec, dashboards: list[Dashboard],
            access: dict[str, set[int]], all_recs: list[Rec], elapsed_total: float, loads: int, before: dict,
            after: dict, metrics: dict[str, float], metrics_before: dict[str, float],
            samples: list[tuple[float, dict]], t0_wall: float, proxy_log: dict) -> dict:
    S = spec.staleness
    W = spec.warmup
    elapsed = max(1e-9, elapsed_total - W)  # until the last answer (includes the tail of slow requests)
    windows = spec.duration / S  # as the brief defines it; calculations of the tail still count
    hot = {d.id for d in sorted(dashboards, key=lambda d: d.rank)[: spec.hot]}
    recs = [r for r in all_recs if r.t_send >= W]  # measured requests (after the warm-up)
    measure_wall = t0_wall + W
    calc_s = spec.calc_delay_ms / 1000.0  # last_refresh is when a calculation ended

    # Every calculation a client saw: (insight, calculation_number) -> (variant, last_refresh).
    seen_calc: dict[tuple[str, int], tuple[str, float]] = {}
    forced_all: dict[str, set[int]] = defaultdict(set)
    for r in all_recs:
        for it in r.items:
            if it.calc is None or it.last_refresh is None:
                continue
            k = f"{r.project}/{it.insight}"
            seen_calc.setdefault((k, it.calc), (it.filters_hash or "?", it.last_refresh))
            if r.mode == "force_blocking" and it.is_cached is False:
                forced_all[k].add(it.calc)

    def measured(lr: float) -> bool:
        return lr - calc_s >= measure_wall - 0.05

    # Calculations per insight (upstream counters), forced ones identified by calculation_number.
    calcs: dict[str, int] = {}
    for k, n in after.get("calculations", {}).items():
        calcs[k] = n - before.get("calculations", {}).get(k, 0)
    forced_seen: dict[str, set[int]] = defaultdict(set)
    for k, ns in forced_all.items():
        forced_seen[k] = {n for n in ns if measured(seen_calc[(k, n)][1])}
    force_async_ok: Counter = Counter()
    forced_sent: Counter = Counter()
    variants: dict[str, set[str]] = defaultdict(set)
    requested: set[str] = set()
    served_calcs: dict[str, set[int]] = defaultdict(set)
    for r in recs:
        if r.kind == "retrieve":
            requested.add(f"{r.project}/{r.insight}")
        for it in r.items:
            k = f"{r.project}/{it.insight}"
            requested.add(k)
            if it.filters_hash:
                variants[k].add(it.filters_hash)
            if it.calc is not None:
                served_calcs[k].add(it.calc)
            if r.mode == "force_blocking":
                forced_sent[k] += 1
            elif r.mode == "force_async":
                forced_sent[k] += 1
                if not it.limit_error and r.status == 200:
                    force_async_ok[k] += 1
        if r.mode in FORCED and not r.items and r.kind == "retrieve":
            forced_sent[f"{r.project}/{r.insight}"] += 1
    per_insight = {}
    for k in sorted(requested, key=lambda s: tuple(map(int, s.split("/")))):
        total = calcs.get(k, 0)
        forced = len(forced_seen[k]) + force_async_ok[k]
        nonforced = max(0, total - forced)
        nvar = max(1, len(variants[k]))
        per_insight[k] = {
            "calculations": total, "forced": forced, "forced_requests": forced_sent[k], "nonforced": nonforced,
            "variants": nvar, "per_window": nonforced / windows, "per_variant_window": nonforced / nvar / windows,
            "nonforced_by_sent": max(0, total - forced_sent[k]) / windows,
            "never_served": max(0, total - len(served_calcs[k])),
        }
    # The literal reading: non-forced calculations of one insight within one aligned S-window
    # [W + jS, W + (j+1)S), from the per-second /_sim/stats samples (full windows only).
    def sample_at(t: float) -> dict:
        return min(samples, key=lambda s: abs(s[0] - t))[1].get("calculations", {}) if samples else {}

    nfull = int(min(spec.duration, elapsed) // S)
    win_counts: dict[str, list[int]] = {}
    forced_by_win: dict[tuple[str, int], int] = Counter()
    for k, ns in forced_seen.items():
        for n in ns:
            j = int((seen_calc[(k, n)][1] - calc_s - measure_wall) // S)
            forced_by_win[(k, j)] += 1
    for j in range(nfull):
        a_, b_ = sample_at(W + j * S), sample_at(W + (j + 1) * S)
        for k in per_insight:
            win_counts.setdefault(k, []).append(max(0, b_.get(k, 0) - a_.get(k, 0) - forced_by_win[(k, j)]))
    win_vals = [(c, k, j) for k, cs in win_counts.items() for j, c in enumerate(cs)]

    # Per variant (upstream cache key, seen as filters_hash): how soon after the previous calculation of
    # the same variant a non-forced one came. < S/2 is a duplicate (a missed share); < S is early.
    by_variant: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for (k, n), (fh, lr) in seen_calc.items():
        by_variant[(k, fh)].append((lr, n))
    dup = early = 0
    gaps: list[float] = []
    dup_examples: Counter = Counter()
    var_win: Counter = Counter()
    for (k, fh), cs in by_variant.items():
        cs.sort()
        for i, (lr, n) in enumerate(cs):
            if n in forced_all[k] or not measured(lr):
                continue
            var_win[(k, fh, int((lr - calc_s - measure_wall) // S))] += 1
            if i == 0:
                continue
            gap = lr - cs[i - 1][0]
            gaps.append(gap)
            if gap < S / 2:
                dup += 1
                dup_examples[k] += 1
            elif gap < S:
                early += 1

    pw = [v["per_window"] for v in per_insight.values()]
    pvw = [v["per_variant_window"] for v in per_insight.values()]
    pws = [v["nonforced_by_sent"] for v in per_insight.values()]
    worst = sorted(per_insight.items(), key=lambda kv: -kv[1]["per_variant_window"])[:5]

    # Limit errors seen by clients.
    statuses = Counter(str(r.status if r.status is not None else r.error) for r in recs)
    c429 = Counter(r.kind for r in recs if r.status == 429)
    # Who said no: the upstream (relayed: fwd-status=429; direct runs: always) or the proxy itself.
    c429_src = Counter(("upstream" if not via_proxy or "fwd-status=429" in (r.cache_status or "") else "proxy")
                       for r in recs if r.status == 429)
    # The proxy's own: its budget refusal (detail=budget) or a status record it issued (id ipx_…, e.g.
    # a background job of its own that failed for budget, returned again to rr=false enqueues).
    conc_src = Counter(("proxy" if via_proxy and ("detail=budget" in (r.cache_status or "") or any(
                            (it.status_id or "").startswith("ipx_") for it in r.items if it.limit_error))
                        else "upstream")
                       for r in recs if r.kind == "retrieve" and any(it.limit_error for it in r.items))
    c429_cs = Counter(normalise_cs(r.cache_status) for r in recs if r.status == 429)
    conc_ret = sum(1 for r in recs if r.kind == "retrieve" and any(it.limit_error for it in r.items))
    conc_list_items = sum(1 for r in recs if r.kind == "list" for it in r.items if it.limit_error)
    conc_list_reqs = sum(1 for r in recs if r.kind == "list" and any(it.limit_error for it in r.items))
    conc_cs = Counter(normalise_cs(r.cache_status) for r in recs if r.kind == "retrieve"
                      and any(it.limit_error for it in r.items))
    other_errors = Counter(it.other_error for r in recs for it in r.items if it.other_error)
    non200 = Counter(f"{r.kind} {r.status or r.error}" for r in recs if r.status != 200)

    # Stale answers: retrieves whose result is older than S at receipt, or marked stale.
    def stale_of(r: Rec) -> tuple[bool, bool, bool]:
        """(answered with a result, stale by age, stale by Cache-Status)."""
        if r.status != 200 or not r.items or not r.items[0].has_result:
            return False, False, False
        it = r.items[0]
        by_age = (not it.never_stale and it.last_refresh is not None and r.recv_wall - it.last_refresh > S)
        # detail=stale, stale-while-revalidate, stale-if-error (fwd=stale is a fresh recalculation)
        by_cs = r.cache_status is not None and "detail=stale" in r.cache_status
        return True, by_age, by_cs

    def stale_block(sel: list[Rec]) -> dict:
        answered = stale = by_age = by_cs = empty = age_only = cs_only = 0
        cs_only_ex: Counter = Counter()
        per_mode: Counter = Counter()
        cs_hist: Counter = Counter()
        ages: list[float] = []
        insights: Counter = Counter()
        for r in sel:
            ok, a, c = stale_of(r)
            if r.status == 200 and r.items and not r.items[0].has_result:
                empty += 1
            if not ok:
                continue
            answered += 1
            if a or c:
                stale += 1
                per_mode[r.mode] += 1
                cs_hist[normalise_cs(r.cache_status)] += 1
                insights[f"{r.project}/{r.insight}@d{r.dashboard}"] += 1
                if r.items[0].last_refresh is not None:
                    ages.append(r.recv_wall - r.items[0].last_refresh)
            by_age += a
            by_cs += c
            age_only += a and not c
            if c and not a:
                cs_only += 1
                age = r.recv_wall - r.items[0].last_refresh if r.items[0].last_refresh else float("nan")
                cs_only_ex[f"{normalise_cs(r.cache_status)} (age {age:.0f} s)"] += 1
        return {"requests": len(sel), "with_result": answered, "empty": empty, "stale": stale,
                "stale_fraction": stale / answered if answered else 0.0, "stale_by_age": by_age,
                "stale_by_cache_status": by_cs, "stale_by_mode": dict(per_mode),
                "stale_by_age_not_marked": age_only, "marked_stale_age_le_S": cs_only,
                "marked_stale_age_le_S_examples": dict(cs_only_ex.most_common(4)),
                "stale_cache_status": dict(cs_hist.most_common(8)), "stale_top_tiles": dict(insights.most_common(8)),
                "stale_age_max_s": max(ages) if ages else 0.0,
                "stale_age_p50_s": statistics.median(ages) if ages else 0.0}

    retrieves = [r for r in recs if r.kind == "retrieve"]
    stale_all = stale_block(retrieves)
    stale_hot = stale_block([r for r in retrieves if r.dashboard in hot])
    # List entries that carried a result older than S (not asked for, but telling).
    list_items = [(r, it) for r in recs if r.kind == "list" and r.status == 200 for it in r.items if it.has_result]
    list_stale = sum(1 for r, it in list_items if not it.never_stale and it.last_refresh is not None
                     and r.recv_wall - it.last_refresh > S)

    lat = {m: lat_summary([r.latency for r in recs if r.mode == m]) for m, _ in spec.mix}
    lat_kind = {f"{k} {m}": lat_summary([r.latency for r in recs if r.mode == m and r.kind == k])
                for k in ("list", "retrieve") for m, _ in spec.mix}
    cs_all = Counter(normalise_cs(r.cache_status) for r in recs) if via_proxy else Counter()

    up_requests = after.get("requests", 0) - before.get("requests", 0)
    # Upstream requests in any 60 s (PostHog's per-minute limit is per key; the proxy uses one key
    # per viewer key, so with --keys 1 this is the figure to hold against 240/min).
    req_series = [(t, st.get("requests", 0)) for t, st in samples]
    max_60 = 0
    for i, (t, n) in enumerate(req_series):
        j = i
        while j > 0 and req_series[j - 1][0] >= t - 60 - 1e-6:
            j -= 1
        max_60 = max(max_60, n - req_series[j][1] if j < i else 0)
    metric_delta = {k: v - metrics_before.get(k, 0.0) if k.endswith("_total") else v for k, v in metrics.items()}
    sel_metrics = {k: v for k, v in metric_delta.items()
                   if any(s in k for s in ("upstream_errors", "upstream_calculations", "upstream_reads", "coalesced",
                                           "budget", "ahead", "circuit", "queue_depth", "revalidations"))
                   and not k.endswith(("_bucket", "_sum", "_count"))}
    if via_proxy:
        sel_metrics.setdefault("insights_proxy_upstream_errors_total (all kinds)",
                               sum(v for k, v in metric_delta.items() if k.startswith("insights_proxy_upstream_errors_total")))
    return {
        "label": label, "via_proxy": via_proxy, "refresh_ahead": refresh_ahead if via_proxy else None,
        "elapsed_s": elapsed, "tail_s": elapsed - spec.duration, "windows": windows, "loads": loads, "requests": len(recs),
        "requests_by_kind": dict(Counter(r.kind for r in recs)),
        "requests_by_mode": dict(Counter(r.mode for r in recs)),
        "hot_dashboards": sorted(hot),
        "dashboards": [{"id": d.id, "project": d.project, "tiles": d.tiles, "rank": d.rank,
                        "loads": sum(1 for r in recs if r.kind == "list" and r.dashboard == d.id)}
                       for d in dashboards],
        "key_access": {k: sorted(v) for k, v in access.items()},
        "keys_used": dict(Counter(r.key for r in recs)),
        "warmup_s": W,
        "upstream": {"requests": up_requests, "requests_per_min": up_requests / elapsed * 60 if elapsed else 0,
                     "max_requests_in_60s": max_60,
                     # The simulator's throttle counts every request of a key in a sliding window; if all
                     # requests fit both limits, it cannot have answered 429 (with --keys 1).
                     "total_requests_run": req_series[-1][1] if req_series else 0,
                     "calculations": after.get("total_calculations", 0) - before.get("total_calculations", 0)},
        "calc_per_insight_window": {
            "max": max(pw, default=0.0), "mean": statistics.fmean(pw) if pw else 0.0,
            "per_variant_max": max(pvw, default=0.0), "per_variant_mean": statistics.fmean(pvw) if pvw else 0.0,
            "minus_forced_sent_max": max(pws, default=0.0),
            "minus_forced_sent_mean": statistics.fmean(pws) if pws else 0.0,
            "insights_requested": len(per_insight),
            "insights_over_1_per_variant": sum(1 for v in pvw if v > 1.0),
            "worst": {k: v for k, v in worst},
            "forced_calculations": sum(v["forced"] for v in per_insight.values()),
            "never_served_calculations": sum(v["never_served"] for v in per_insight.values()),
            "aligned_windows": nfull,
            "aligned_max": max(win_vals, default=(0, "", 0))[0],
            "aligned_max_at": "{1} window {2}".format(*max(win_vals, default=(0, "-", 0))),
            "aligned_mean": statistics.fmean([c for c, _, _ in win_vals]) if win_vals else 0.0,
            "aligned_over_1": sum(1 for c, _, _ in win_vals if c > 1),
            "aligned_insight_windows": len(win_vals),
            "variant_window_max": max(var_win.values(), default=0),
            "variant_duplicates_lt_half_S": dup,
            "variant_early_lt_S": early,
            "variant_min_gap_s": min(gaps, default=float("nan")),
            "variant_median_gap_s": statistics.median(gaps) if gaps else float("nan"),
            "duplicate_insights": dict(dup_examples.most_common(6)),
        },
        "per_insight": per_insight,
        "limits": {
            "client_429": sum(c429.values()), "client_429_by_kind": dict(c429),
            "client_429_by_source": dict(c429_src), "concurrency_limit_by_source": dict(conc_src),
            "client_429_cache_status": dict(c429_cs.most_common(6)),
            "concurrency_limit_retrieves": conc_ret, "concurrency_limit_list_items": conc_list_items,
            "concurrency_limit_list_requests": conc_list_reqs,
            "concurrency_limit_cache_status": dict(conc_cs.most_common(6)),
            "other_query_errors": dict(other_errors.most_common(6)),
            "non_200": dict(non200.most_common(12)), "statuses": dict(statuses),
        },
        "stale": {"all": stale_all, "hot": stale_hot,
                  "list_items_with_result": len(list_items), "list_items_stale_by_age": list_stale},
        "latency": lat, "latency_by_kind": lat_kind,
        "cache_status": dict(cs_all.most_common(20)),
        "proxy_metrics": sel_metrics, "proxy_metrics_all": metric_delta, "proxy_log": proxy_log,
    }


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def text_report(a: argparse.Namespace, spec: LoadSpec, runs: list[dict]) -> str:
    mix = " / ".join(f"{m} {w:g}" for m, w in spec.mix)
    head = (f"dashboard_load: {spec.viewers} viewers, {spec.duration:g} s, staleness S={spec.staleness:g} s, "
            f"calc {a.calc_delay_ms} ms, reload {spec.reload:g} s ±{spec.jitter * 100:.0f} %, zipf s={spec.zipf_s:g}, "
            f"seed {spec.seed}, keys {spec.keys}, list limit {spec.list_limit}, {spec.parallel} connections/viewer\n"
            f"mix: {mix} (force_cache = no refresh parameter)\n"
            f"simulator limits: {a.concurrency_limit} concurrent/team, {a.rate_limit_per_minute}/min, "
            f"{a.rate_limit_per_hour}/h per key\n")
    if runs:
        d0 = runs[0]["dashboards"]
        head += "dashboards (rank: id p=project tiles): " + ", ".join(
            f"{d['rank']}:{d['id']} p{d['project']} {len(d['tiles'])}t" for d in d0) + \
            f"; hot = {runs[0]['hot_dashboards']}\n"
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, f) -> None:
        vals = []
        for r in runs:
            try:
                vals.append(f(r))
            except (KeyError, TypeError, ValueError):
                vals.append("-")
        rows.append((name, [fmt(v) if not isinstance(v, str) else v for v in vals]))

    row("windows (duration/S) / tail s", lambda r: f"{r['windows']:.2f} / {r['elapsed_s'] - spec.duration:.1f}")
    row("dashboard loads / requests", lambda r: f"{r['loads']} / {r['requests']}")
    row("upstream requests (max in any 60 s)", lambda r: f"{r['upstream']['requests']} "
        f"({r['upstream']['max_requests_in_60s']})")
    row("upstream within the rate limits?", lambda r: "limits off" if not (
        a.rate_limit_per_minute or a.rate_limit_per_hour) else "yes" if (
        r["upstream"]["max_requests_in_60s"] <= (a.rate_limit_per_minute or math.inf)
        and r["upstream"]["total_requests_run"] <= (a.rate_limit_per_hour or math.inf)) else "NO")
    row("upstream calculations (forced)", lambda r: f"{r['upstream']['calculations']} "
        f"({r['calc_per_insight_window']['forced_calculations']})")
    row("calcs never served to a client", lambda r: r["calc_per_insight_window"]["never_served_calculations"])
    rows.append(("NON-FORCED CALCS / INSIGHT / WINDOW", [""] * len(runs)))
    row("  total / (s/S): max (target <= 1)", lambda r: r["calc_per_insight_window"]["max"])
    row("  total / (s/S): mean", lambda r: r["calc_per_insight_window"]["mean"])
    row("  ... / variants: max / mean", lambda r: f"{r['calc_per_insight_window']['per_variant_max']:.2f} / "
        f"{r['calc_per_insight_window']['per_variant_mean']:.2f}")
    row("  one insight in one S-window: max / mean", lambda r: f"{r['calc_per_insight_window']['aligned_max']} / "
        f"{r['calc_per_insight_window']['aligned_mean']:.2f}")
    row("  insight-windows > 1 / all", lambda r: f"{r['calc_per_insight_window']['aligned_over_1']} / "
        f"{r['calc_per_insight_window']['aligned_insight_windows']}")
    row("  one variant in one S-window: max", lambda r: r["calc_per_insight_window"]["variant_window_max"])
    row("  variant recalcs <S/2 / <S after prev", lambda r: f"{r['calc_per_insight_window']['variant_duplicates_lt_half_S']}"
        f" / {r['calc_per_insight_window']['variant_early_lt_S']}")
    row("  variant recalc gap s: min / median", lambda r: f"{fmt(r['calc_per_insight_window']['variant_min_gap_s'])} / "
        f"{fmt(r['calc_per_insight_window']['variant_median_gap_s'])}")
    row("  minus forced *sent*: max / mean", lambda r: f"{r['calc_per_insight_window']['minus_forced_sent_max']:.2f} / "
        f"{r['calc_per_insight_window']['minus_forced_sent_mean']:.2f}")
    row("  insights requested / >1 per variant", lambda r: f"{r['calc_per_insight_window']['insights_requested']} / "
        f"{r['calc_per_insight_window']['insights_over_1_per_variant']}")
    row("  worst (insight: nonforced/variants)", lambda r: ", ".join(
        f"{k}:{v['nonforced']}/{v['variants']}" for k, v in list(r["calc_per_insight_window"]["worst"].items())[:3]))
    rows.append(("LIMIT ERRORS SEEN BY CLIENTS (target 0)", [""] * len(runs)))
    row("  429 answers (list / retrieve)", lambda r: f"{r['limits']['client_429']} "
        f"({r['limits']['client_429_by_kind'].get('list', 0)} / {r['limits']['client_429_by_kind'].get('retrieve', 0)})")
    row("  429 from upstream / from proxy", lambda r: f"{r['limits']['client_429_by_source'].get('upstream', 0)} / "
        f"{r['limits']['client_429_by_source'].get('proxy', 0)}")
    row("  concurrency_limit_exceeded: retrieves", lambda r: r["limits"]["concurrency_limit_retrieves"])
    row("    ... from upstream / from proxy", lambda r: f"{r['limits']['concurrency_limit_by_source'].get('upstream', 0)}"
        f" / {r['limits']['concurrency_limit_by_source'].get('proxy', 0)}")
    row("  concurrency_limit_exceeded: list items", lambda r: f"{r['limits']['concurrency_limit_list_items']} "
        f"(in {r['limits']['concurrency_limit_list_requests']} lists)")
    row("  other non-200 answers", lambda r: sum(v for k, v in r["limits"]["non_200"].items()
                                                  if not k.endswith(" 429")))
    rows.append(("STALE RETRIEVE ANSWERS (age > S or Cache-Status stale)", [""] * len(runs)))
    for scope in ("all", "hot"):
        row(f"  {scope}: stale / with result (%)", lambda r, s=scope: f"{r['stale'][s]['stale']} / "
            f"{r['stale'][s]['with_result']} ({100 * r['stale'][s]['stale_fraction']:.1f} %)")
        row(f"  {scope}: by age / by Cache-Status", lambda r, s=scope: f"{r['stale'][s]['stale_by_age']} / "
            f"{r['stale'][s]['stale_by_cache_status']}")
        row(f"  {scope}: empty answers (result null)", lambda r, s=scope: r["stale"][s]["empty"])
    row("  all: stale by age only / marked only", lambda r: f"{r['stale']['all']['stale_by_age_not_marked']} / "
        f"{r['stale']['all']['marked_stale_age_le_S']}")
    row("  all: stale age p50 / max s", lambda r: f"{r['stale']['all']['stale_age_p50_s']:.1f} / "
        f"{r['stale']['all']['stale_age_max_s']:.1f}")
    row("  list entries stale by age / with result", lambda r: f"{r['stale']['list_items_stale_by_age']} / "
        f"{r['stale']['list_items_with_result']}")
    rows.append(("CLIENT LATENCY ms p50 / p90 / p99 / max", [""] * len(runs)))
    for m, _ in spec.mix:
        row(f"  {m}", lambda r, m=m: "{p50_ms:.0f} / {p90_ms:.0f} / {p99_ms:.0f} / {max_ms:.0f}".format(**r["latency"][m])
            if r["latency"][m]["n"] else "-")
    rows.append(("PROXY METRICS", [""] * len(runs)))
    names = sorted({k for r in runs for k in r["proxy_metrics"]})
    for n in names:
        short = n.removeprefix("insights_proxy_")
        row(f"  {short}", lambda r, n=n: r["proxy_metrics"].get(n, "-") if r["via_proxy"] else "-")

    width0 = max(len(n) for n, _ in rows) + 2
    cols = [r["label"] for r in runs]
    widths = [max(len(c), *(len(v[i]) for _, v in rows)) + 2 for i, c in enumerate(cols)]
    out = [head, " " * width0 + "".join(c.rjust(w) for c, w in zip(cols, widths))]
    for n, vals in rows:
        out.append(n.ljust(width0) + "".join(v.rjust(w) for v, w in zip(vals, widths)))
    for r in runs:
        if not r["via_proxy"]:
            continue
        out.append(f"\n{r['label']}: Cache-Status of all answers: " +
                   ", ".join(f"{k} ×{v}" for k, v in r["cache_status"].items()))
        for scope in ("all", "hot"):
            s = r["stale"][scope]
            if s["stale"]:
                out.append(f"{r['label']}: stale ({scope}) by mode {s['stale_by_mode']}; Cache-Status "
                           f"{s['stale_cache_status']}; tiles {s['stale_top_tiles']}")
        lim = r["limits"]
        if r["stale"]["all"]["marked_stale_age_le_S_examples"]:
            out.append(f"{r['label']}: marked stale although age <= S: "
                       f"{r['stale']['all']['marked_stale_age_le_S_examples']}")
        if lim["client_429"] or lim["concurrency_limit_retrieves"]:
            out.append(f"{r['label']}: 429 Cache-Status {lim['client_429_cache_status']}; "
                       f"concurrency_limit Cache-Status {lim['concurrency_limit_cache_status']}")
        odd = {k: v for k, v in lim["non_200"].items() if not k.endswith(" 429")}
        if odd:
            out.append(f"{r['label']}: other non-200 answers {odd}")
        if lim["other_query_errors"]:
            out.append(f"{r['label']}: other query_status errors {lim['other_query_errors']}")
        c = r["calc_per_insight_window"]
        if c["duplicate_insights"]:
            out.append(f"{r['label']}: insights with recalcs < S/2 apart (same variant) {c['duplicate_insights']}")
        if c["aligned_max"] > 1:
            out.append(f"{r['label']}: most non-forced calcs of one insight in one window: {c['aligned_max']} "
                       f"at {c['aligned_max_at']}")
        pl = r.get("proxy_log") or {}
        if pl.get("warn") or pl.get("error"):
            out.append(f"{r['label']}: proxy log: {pl['warn']} WARN, {pl['error']} ERROR lines "
                       f"({pl['mentions_429']} mention 429); e.g. {pl['examples'][:2]}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------

def no_nan(v: Any) -> Any:
    """JSON has no NaN: undefined figures (no samples) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [no_nan(x) for x in v]
    return v


def parse_skew(s: str) -> list[float]:
    try:
        w = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights, comma-separated: {s!r}") from None
    if len(w) < 2 or any(x <= 0 for x in w):
        raise argparse.ArgumentTypeError("at least two positive weights")
    return w


def parse_mix(s: str) -> list[tuple[str, float]]:
    out = []
    for part in s.split(","):
        name, _, w = part.strip().partition("=")
        if name not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {name!r} (one of {', '.join(MODES)})")
        try:
            weight = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}") from None
        if weight < 0:
            raise argparse.ArgumentTypeError(f"negative weight in {part!r}")
        if weight > 0:
            out.append((name, weight))
    if not out:
        raise argparse.ArgumentTypeError("empty mix")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--binary", default=DEFAULT_BINARY, help="the insights-proxy binary")
    g = p.add_argument_group("load")
    g.add_argument("--viewers", type=int, default=30)
    g.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    g.add_argument("--reload", type=float, default=5.0, help="auto-refresh period R, seconds")
    g.add_argument("--jitter", type=float, default=0.2, help="R is drawn from R×[1-j, 1+j]")
    g.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent over dashboards (rank = id order)")
    g.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                   help="refresh modes and weights per request; force_cache sends no refresh parameter")
    g.add_argument("--keys", type=int, choices=[1, 2, 3], default=1,
                   help="spread viewers over the first N of phx_demo_all, phx_demo_p1, phx_demo_p2 (where they "
                        "have access to the project)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--list-limit", type=int, default=10, help="limit= of the list request of each load")
    g.add_argument("--parallel", type=int, default=4, help="keep-alive connections (parallel requests) per viewer")
    g.add_argument("--hot", type=int, default=3, help="the top-N dashboards count as hot")
    g.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of load before measuring (excludes the cold start); counters are taken after it")
    g.add_argument("--request-timeout", type=float, default=30.0, help="hard timeout per request, seconds")
    g.add_argument("--max-loads", type=int, default=10_000, help="dashboard loads per viewer, at most")
    g.add_argument("--max-wall", type=float, default=None,
                   help="total wall-clock cap, seconds (default: runs × (duration + timeout + 60))")
    g = p.add_argument_group("simulated PostHog")
    g.add_argument("--staleness", type=float, default=20.0, help="S: every interval stale after S s (lazy 2S)")
    g.add_argument("--calc-delay-ms", type=int, default=200)
    g.add_argument("--concurrency-limit", type=int, default=3)
    g.add_argument("--rate-limit-per-minute", type=int, default=240)
    g.add_argument("--rate-limit-per-hour", type=int, default=1200)
    g.add_argument("--sim-seed", type=int, default=42, help="seed of the demo data set")
    g = p.add_argument_group("runs and proxy")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--proxy-only", action="store_true")
    x.add_argument("--direct-only", action="store_true")
    g.add_argument("--refresh-ahead", choices=["on", "off", "both"], default="on",
                   help="[refresh_ahead] enabled for the proxy run(s); both = two proxy runs")
    g.add_argument("--budget-project-concurrency", type=int, default=None, help="[budget] (default: proxy's)")
    g.add_argument("--budget-per-minute", type=int, default=None)
    g.add_argument("--budget-per-hour", type=int, default=None)
    g.add_argument("--budget-wait-ms", type=int, default=None)
    g.add_argument("--forced-min-interval", default=None,
                   help='[refresh] forced_min_interval: "off", "next_allowed_client_refresh" or seconds')
    g.add_argument("--replicas", type=parse_skew, default=None, metavar="W1,W2,...",
                   help="also run a cluster: one replica per weight on one Redis, viewers spread by the weights "
                        "(e.g. 70,20,10), compared with one replica carrying the same load")
    g.add_argument("--shared-budget", choices=["on", "off"], default="on", help="[budget] shared of the cluster")
    g.add_argument("--redis-server", default="redis-server", help="the redis-server binary, for --replicas")
    g.add_argument("--log-dir", default=None, help="where configs and process logs go (default: a temp dir)")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of the table")
    g.add_argument("--per-insight", action="store_true", help="with --json, include per-insight figures")
    g.add_argument("--dump-requests", metavar="PREFIX",
                   help="write every request of each run as JSON lines to PREFIX.<run>.jsonl")
    g.add_argument("--save-json", metavar="FILE", help="also write the JSON document (with per-insight rows) here")
    g.add_argument("--from-json", metavar="FILE", help="run nothing: print the table of a saved JSON document")
    return p


def spec_of(a: argparse.Namespace) -> LoadSpec:
    return LoadSpec(a.viewers, a.duration, a.reload, a.jitter, a.zipf_s, a.mix, a.keys, a.seed, a.list_limit,
                    a.calc_delay_ms, a.parallel, a.request_timeout, a.max_loads, a.staleness, a.hot, a.warmup)


def main() -> int:
    a = build_parser().parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        saved = argparse.Namespace(**{**vars(a), **doc["args"]})
        saved.mix = list(doc["mix"].items())
        sys.stdout.write(text_report(saved, spec_of(saved), doc["runs"]))
        return 0
    if a.viewers < 1 or a.duration <= 0 or a.staleness < 1 or a.parallel < 1 or a.reload <= 0:
        print("viewers, parallel ≥ 1; duration, reload > 0; staleness ≥ 1", file=sys.stderr)
        return 2
    if not (0 <= a.jitter < 1):
        print("--jitter must be in [0, 1)", file=sys.stderr)
        return 2
    if not os.access(a.binary, os.X_OK):
        print(f"{a.binary} is not an executable; build it with CARGO_TARGET_DIR=/work/target-load cargo build "
              f"--release --bin insights-proxy (or pass --binary)", file=sys.stderr)
        return 2
    spec = spec_of(a)
    plan: list[tuple[str, bool, bool, list[float] | None]] = []
    if not a.proxy_only:
        plan.append(("direct", False, False, None))
    if not a.direct_only:
        ras = {"on": [True], "off": [False], "both": [False, True]}[a.refresh_ahead]
        plan += [(f"proxy ra={'on' if ra else 'off'}", True, ra, None) for ra in ras]
        if a.replicas:
            skew = "/".join(f"{w:g}" for w in a.replicas)
            plan += [(f"cluster {skew} ra={'on' if ra else 'off'}", True, ra, a.replicas) for ra in ras]
    max_wall = a.max_wall or len(plan) * (a.warmup + a.duration + a.request_timeout + 60)
    logdir = a.log_dir or tempfile.mkdtemp(prefix="dashboard_load.")
    os.makedirs(logdir, exist_ok=True)
    procs = Processes()
    atexit.register(procs.stop_all)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    runs: list[dict] = []

    async def all_runs() -> None:
        for label, via_proxy, ra, skew in plan:
            runs.append(await one_run(label.replace(" ", "_").replace("=", "-").replace("/", "-"), via_proxy, ra, a,
                                      spec, procs, logdir, skew))
            runs[-1]["label"] = label

    rc = 0
    try:
        asyncio.run(asyncio.wait_for(all_runs(), max_wall))
    except asyncio.TimeoutError:
        log(f"total wall-clock cap of {max_wall:.0f} s reached; reporting the runs that finished")
        rc = 1
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except RuntimeError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        procs.stop_all()
    log(f"configs and process logs in {logdir}")
    if runs:
        doc = {"args": {k: v for k, v in vars(a).items() if k != "mix"}, "mix": dict(a.mix), "runs": runs,
               "log_dir": logdir}
        if a.save_json:
            with open(a.save_json, "w") as f:
                json.dump(no_nan(doc), f, indent=1, default=str, allow_nan=False)
        if a.json:
            if not a.per_insight:
                doc = {**doc, "runs": [{k: v for k, v in r.items() if k != "per_insight"} for r in runs]}
            json.dump(no_nan(doc), sys.stdout, indent=1, default=str, allow_nan=False)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(text_report(a, spec, runs))
    return rc


if __name__ == "__main__":
    sys.exit(main())
