#!/usr/bin/env python3
"""benches/flood.py: the full-size versions of tests/reliability.rs, against the release binary.

    benches/flood.py                                  # every phase, ~20 minutes
    benches/flood.py --phases conns,slowloris         # some of them
    INSIGHTS_PROXY_BIN=/path/to/insights-proxy benches/flood.py --keys 200000

Phases (each against a freshly started proxy, so each one's memory figures start clean):
  conns      --connections (10,000) concurrent keep-alive connections opened and held (each made one
             request), while hits are served on other connections: hit latency before/while held,
             the proxy's fds and RSS (bytes per held connection), then all of them ask again at once.
  slowloris  for --slowloris-seconds (75): connections that sent a partial request head and went
             silent, idle keep-alive connections, and connections trickling a header byte every 20 s:
             when (if) the proxy closes each kind, and hit latency meanwhile.
  keys       --keys (1,000,000) distinct cache keys (`filters_override={"x":n}` over insights 1-50,
             `refresh=blocking`) against `[cache] max_bytes` = --cache-mib (128): RSS over time, the
             cache's bytes/entries/evictions, and the overhead of RSS above the configured size.
  async      --async-requests (100,000) `refresh=async` requests for distinct keys
             (`variables_override`, which the simulator really calculates) with the default queue and
             status limits: answer latency, overflow, max queue depth / status records, then every
             acknowledged status polled until complete or gone.
  creds      --cred-flood (120,000) requests with random `Authorization: Bearer` keys the simulator
             rejects (401), each key used once, after --creds-prefill (100,000) legitimate entries were
             cached; then --cred-async (5,000) more with `refresh=async`: whether a legitimate user's
             entries stay hits (and after how many rejected requests they stop), hit latency, upstream
             calls per rejected request, RSS, status records, queue depth, and whether a legitimate
             async request overflows afterwards.

  purges     --purges-flood (30,000) rejected keys, below the purge-record cap, against --purges-prefill
             (20,000) cached entries: the legitimate user's hit latency before, during, and after the
             flood until it is back within 3x its baseline (each 401 purges the key's partition with
             a moka invalidation predicate that every read evaluates until a full scan retires it).

Results: flood-<phase>.csv (samples over time) and flood.json (every figure) in --out.

This script raises its own open-files limit (RLIMIT_NOFILE, inherited by the proxy and simulator
it starts) up to the hard limit; nothing global changes. Only 127.0.0.1. Every phase and every
request has a deadline; everything started is stopped by PID (SIGTERM, then SIGKILL). Python 3.11
standard library only.
"""
import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ALL = "phx_demo_all"
ADMIN_TOKEN = "flood-admin-token-0123456789"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------

class Procs:
    def __init__(self, out):
        self.out, self.procs = out, {}

    def start(self, name, argv):
        with open(os.path.join(self.out, f"{name}.log"), "ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[name] = p
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_port(port, deadline_s=30):
    end = time.time() + deadline_s
    while time.time() < end:
        if port_open(port):
            return True
        time.sleep(0.05)
    return False


def find_binary():
    env = os.environ.get("INSIGHTS_PROXY_BIN")
    if env:
        return env
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    log("building the release binary (cargo build --release) into", target)
    subprocess.run(["cargo", "build", "--release", "--bin", "insights-proxy"], cwd=ROOT, check=True)
    return os.path.join(target, "release", "insights-proxy")


def proc_status(pid):
    out = {"rss_kib": 0, "hwm_kib": 0, "threads": 0, "fds": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    out[{"VmRSS": "rss_kib", "VmHWM": "hwm_kib", "Threads": "threads"}[k]] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return out


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------------------------------------
# Async HTTP/1.1
# ------------------------------------------------------------------------------------------------

def req_bytes(port, path, token=None, extra=()):
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_answer(reader):
    """(status, headers, body) of one response; raises on EOF or a malformed answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower().decode()] = v.strip().decode(errors="replace")
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(p[:-2] for p in parts)
    else:
        body = await reader.read()
    return status, headers, body


class Conn:
    """A keep-alive connection; reconnects after an error or `Connection: close`."""

    def __init__(self, port, timeout=30.0):
        self.port, self.timeout = port, timeout
        self.r = self.w = None

    async def get(self, path, token=None, extra=()):
        for attempt in (0, 1):
            try:
                if self.w is None:
                    self.r, self.w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)
                self.w.write(req_bytes(self.port, path, token, extra))
                status, headers, body = await asyncio.wait_for(read_answer(self.r), self.timeout)
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return status, headers, body
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError,
                    ValueError, IndexError):
                self.close()
                if attempt == 1:
                    return 0, {}, b""
        return 0, {}, b""

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


async def simple_get(port, path, token=None, timeout=30.0, method="GET"):
    c = Conn(port, timeout)
    try:
        if method == "GET":
            return await c.get(path, token)
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        out = await asyncio.wait_for(read_answer(r), timeout)
        w.close()
        return out
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return 0, {}, b""
    finally:
        c.close()


async def metrics(admin_port):
    status, _, body = await simple_get(admin_port, "/metrics", timeout=15)
    out = {}
    if status == 200:
        for line in body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
    return out


def pct(values, p):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(p * len(v)))] * 1000, 2) if v else None


async def drive(port, workers, count, make, on_result, deadline):
    """`workers` keep-alive connections run make(i) -> (path, token) for i in range(count), until the
    deadline; on_result(i, status, headers, body, seconds). Returns how many were sent."""
    it = iter(range(count))
    done = 0

    async def worker():
        nonlocal done
        c = Conn(port)
        try:
            for i in it:
                if time.time() >= deadline:
                    return
                path, token = make(i)
                t = time.time()
                status, headers, body = await c.get(path, token)
                on_result(i, status, headers, body, time.time() - t)
                done += 1
        finally:
            c.close()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


async def hit_probe(port, seconds, paths, workers=4):
    """Hits on `workers` connections for `seconds`: latencies and outcomes."""
    lat, statuses, hits = [], {}, 0
    end = time.time() + seconds

    def on(i, status, headers, body, s):
        nonlocal hits
        lat.append(s)
        statuses[status] = statuses.get(status, 0) + 1
        hits += "; hit" in headers.get("cache-status", "")

    n = await drive(port, workers, 10_000_000, lambda i: (paths[i % len(paths)], ALL), on, end)
    return {"requests": n, "rate_per_s": round(n / seconds, 1), "statuses": statuses, "hits": hits,
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": pct(lat, 1.0)}


class Sampler:
    """Samples the proxy's RSS every `every` seconds (and /metrics every 5th time) into a CSV."""

    def __init__(self, path, pid, admin_port, every=2.0):
        self.path, self.pid, self.admin_port, self.every = path, pid, admin_port, every
        self.rows, self.task, self.t0 = [], None, time.time()
        self.extra = {}

    async def run(self):
        cols = ["t_s", "rss_mib", "hwm_mib", "fds", "cache_mib", "cache_entries", "evictions_size",
                "status_records", "queue_depth", "done"]
        with open(self.path, "w") as f:
            f.write(",".join(cols) + "\n")
            n, m = 0, {}
            while True:
                ps = proc_status(self.pid)
                if n % 5 == 0:
                    m = await metrics(self.admin_port)
                row = {"t_s": round(time.time() - self.t0, 1), "rss_mib": round(ps["rss_kib"] / 1024, 1),
                       "hwm_mib": round(ps["hwm_kib"] / 1024, 1), "fds": ps["fds"],
                       "cache_mib": round(m.get("insights_proxy_cache_bytes", 0) / 2 ** 20, 1),
                       "cache_entries": int(m.get("insights_proxy_cache_entries", 0)),
                       "evictions_size": int(m.get('insights_proxy_cache_evictions_total{cause="size"}', 0)),
                       "status_records": int(m.get("insights_proxy_query_status_records", 0)),
                       "queue_depth": int(m.get("insights_proxy_queue_depth", 0)),
                       "done": self.extra.get("done", 0)}
                self.rows.append(row)
                f.write(",".join(str(row[c]) for c in cols) + "\n")
                f.flush()
                n += 1
                await asyncio.sleep(self.every)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        return self.rows


# ------------------------------------------------------------------------------------------------
# The proxy and the simulator
# ------------------------------------------------------------------------------------------------

class Env:
    def __init__(self, args, binary, procs):
        self.args, self.binary, self.procs = args, binary, procs
        self.sim_port, self.proxy_port, self.admin_port = args.base_port + 10, args.base_port + 80, args.base_port + 90
        self.proxy = None

    def start_sim(self, calc_delay_ms=0):
        self.procs.stop("simulator")
        self.procs.start("simulator", [self.binary, "simulate", "--listen", f"127.0.0.1:{self.sim_port}",
                                       "--calc-delay-ms", str(calc_delay_ms), "--concurrency-limit", "0"])
        if not wait_port(self.sim_port):
            raise SystemExit("the simulator did not start")

    def start_proxy(self, name, extra_toml="", budget=None):
        self.procs.stop("proxy")
        for _ in range(100):
            if not port_open(self.proxy_port):
                break
            time.sleep(0.1)
        budget = budget or "[budget]\nper_minute = 0\nper_hour = 0\nproject_concurrency = 16\n"
        cfg = os.path.join(self.args.out, f"proxy-{name}.toml")
        with open(cfg, "w") as f:
            f.write(f"""# generated by benches/flood.py ({name})
[server]
listen = "127.0.0.1:{self.proxy_port}"
threads = 2
grace_period_ms = 0
shutdown_timeout_ms = 1000
[upstream]
url = "http://127.0.0.1:{self.sim_port}"
connect_timeout_ms = 1000
read_timeout_ms = 10000
[cache]
max_bytes = {self.args.cache_mib * 2 ** 20}
{budget}
[admin]
listen = "127.0.0.1:{self.admin_port}"
token = "{ADMIN_TOKEN}"
{extra_toml}
""")
        self.proxy = self.procs.start("proxy", [self.binary, "--config", cfg])
        if not wait_port(self.proxy_port) or not wait_port(self.admin_port):
            raise SystemExit(f"the proxy did not start; see {self.args.out}/proxy.log")
        return self.proxy.pid

    def alive(self):
        return self.proxy is not None and self.proxy.poll() is None


INSIGHTS = list(range(1, 51))  # 1-20 project 1, 21-35 project 2, 36-50 project 3


def project_of(insight):
    return 1 if insight <= 20 else 2 if insight <= 35 else 3


def insight_path(insight, query=""):
    return f"/api/environments/{project_of(insight)}/insights/{insight}/" + (f"?{query}" if query else "")


async def warm(env):
    for i in INSIGHTS:
        await simple_get(env.proxy_port, insight_path(i, "refresh=blocking"), ALL)


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------

async def phase_conns(env):
    a = env.args
    pid = env.start_proxy("conns")
    await warm(env)
    paths = [insight_path(i) for i in INSIGHTS]
    before = await hit_probe(env.proxy_port, 5, paths)
    ps0 = proc_status(pid)
    held, failures = [], {}
    sem = asyncio.Semaphore(500)
    t0 = time.time()

    async def open_one(i):
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", env.proxy_port), 20)
                w.write(req_bytes(env.proxy_port, paths[i % len(paths)], ALL))
                status, _, _ = await asyncio.wait_for(read_answer(r), 30)
                if status != 200:
                    failures[f"status {status}"] = failures.get(f"status {status}", 0) + 1
                held.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1

    await asyncio.gather(*(open_one(i) for i in range(a.connections)))
    open_s = time.time() - t0
    ps1 = proc_status(pid)
    log(f"conns: {len(held)} held ({failures or 'no failures'}) in {open_s:.1f}s; proxy fds {ps1['fds']}")
    during = await hit_probe(env.proxy_port, 10, paths)
    # Every held connection asks again, all at once.
    t1 = time.time()

    async def again(i, rw):
        r, w = rw
        try:
            w.write(req_bytes(env.proxy_port, paths[i % len(paths)], ALL))
            status, _, _ = await asyncio.wait_for(read_answer(r), 60)
            return status
        except Exception:  # noqa: BLE001
            return 0

    statuses = await asyncio.gather(*(again(i, rw) for i, rw in enumerate(held)))
    round2_s = time.time() - t1
    ps2 = proc_status(pid)
    for _, w in held:
        w.close()
    await asyncio.sleep(0.5)
    t2 = time.time()
    while time.time() - t2 < 30 and proc_status(pid)["fds"] > ps0["fds"] + 50:
        await asyncio.sleep(0.2)
    ps3 = proc_status(pid)
    per_conn = (ps1["rss_kib"] - ps0["rss_kib"]) * 1024 / max(1, len(held))
    return {
        "target": a.connections, "held": len(held), "open_failures": failures, "open_seconds": round(open_s, 2),
        "proxy_fds": {"before": ps0["fds"], "held": ps1["fds"], "after_close": ps3["fds"]},
        "proxy_rss_mib": {"before": round(ps0["rss_kib"] / 1024, 1), "held": round(ps1["rss_kib"] / 1024, 1),
                          "after_round2": round(ps2["rss_kib"] / 1024, 1), "after_close": round(ps3["rss_kib"] / 1024, 1)},
        "rss_bytes_per_held_connection": round(per_conn),
        "hits_before": before, "hits_while_held": during,
        "round2": {"ok": sum(1 for s in statuses if s == 200), "failed": sum(1 for s in statuses if s != 200),
                   "seconds": round(round2_s, 2)},
        "proxy_alive": env.alive(),
    }


async def phase_slowloris(env):
    a = env.args
    env.start_proxy("slowloris")
    await warm(env)
    paths = [insight_path(i) for i in INSIGHTS]
    groups = {"silent_partial_head": a.slowloris_conns, "idle_keepalive": a.slowloris_conns,
              "trickle_1_byte_per_20s": max(1, a.slowloris_conns // 3)}
    closed_at = {g: [] for g in groups}
    t0 = time.time()
    end = t0 + a.slowloris_seconds
    conns = []

    async def one(group, i):
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", env.proxy_port), 20)
        except Exception:  # noqa: BLE001
            closed_at[group].append(-1.0)
            return
        conns.append(w)
        try:
            if group == "idle_keepalive":
                w.write(req_bytes(env.proxy_port, paths[i % len(paths)], ALL))
                await asyncio.wait_for(read_answer(r), 30)
            else:
                w.write(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\nX-Slow: "
                        .encode())
            last = time.time()
            while time.time() < end:
                try:
                    data = await asyncio.wait_for(r.read(1), 1.0)
                    if data == b"":
                        closed_at[group].append(round(time.time() - t0, 1))
                        return
                except asyncio.TimeoutError:
                    pass
                if group == "trickle_1_byte_per_20s" and time.time() - last >= 20:
                    w.write(b"a")
                    last = time.time()
        except Exception:  # noqa: BLE001 - a reset counts as closed
            closed_at[group].append(round(time.time() - t0, 1))

    tasks = [asyncio.get_running_loop().create_task(one(g, i)) for g, n in groups.items() for i in range(n)]
    probes = []
    while time.time() < end - 5:
        probes.append(await hit_probe(env.proxy_port, 5, paths, workers=2))
    await asyncio.gather(*tasks)
    for w in conns:
        w.close()
    out = {"seconds": a.slowloris_seconds, "groups": {}}
    for g, n in groups.items():
        c = [x for x in closed_at[g] if x >= 0]
        out["groups"][g] = {"opened": n, "closed_by_proxy": len(c), "still_open_at_end": n - len(closed_at[g]),
                            "first_close_s": min(c) if c else None, "last_close_s": max(c) if c else None}
    out["hit_p99_ms_per_5s"] = [p["p99_ms"] for p in probes]
    out["hit_errors"] = sum(v for p in probes for k, v in p["statuses"].items() if k != 200)
    out["proxy_alive"] = env.alive()
    return out


async def phase_keys(env):
    a = env.args
    pid = env.start_proxy("keys")
    base = proc_status(pid)
    sampler = Sampler(os.path.join(a.out, "flood-keys.csv"), pid, env.admin_port).start()
    statuses, body_bytes, lat = {}, 0, []

    def make(i):
        return insight_path(INSIGHTS[i % 50], f"refresh=blocking&filters_override=%7B%22x%22%3A{i}%7D"), ALL

    def on(i, status, headers, body, s):
        nonlocal body_bytes
        statuses[status] = statuses.get(status, 0) + 1
        body_bytes += len(body)
        if i % 100 == 0:
            lat.append(s)
        sampler.extra["done"] = sampler.extra.get("done", 0) + 1
        if i % 100_000 == 0:
            log(f"keys: {i} sent; rss {proc_status(pid)['rss_kib'] // 1024} MiB")

    t0 = time.time()
    done = await drive(env.proxy_port, a.workers, a.keys, make, on, t0 + a.keys_deadline)
    took = time.time() - t0
    await asyncio.sleep(3)
    rows = await sampler.stop()
    m = await metrics(env.admin_port)
    ps = proc_status(pid)
    probe = await hit_probe(env.proxy_port, 3, [insight_path(i, "refresh=blocking") for i in INSIGHTS])
    limit_mib = a.cache_mib
    peak = max([r["rss_mib"] for r in rows] + [ps["hwm_kib"] / 1024])
    return {
        "keys_target": a.keys, "keys_done": done, "seconds": round(took, 1), "rate_per_s": round(done / took, 1),
        "statuses": statuses, "payload_mib": round(body_bytes / 2 ** 20, 1),
        "latency_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": pct(lat, 1.0)},
        "cache_limit_mib": limit_mib,
        "cache_mib_end": round(m.get("insights_proxy_cache_bytes", 0) / 2 ** 20, 1),
        "cache_mib_max_sampled": max((r["cache_mib"] for r in rows), default=0),
        "cache_entries_end": int(m.get("insights_proxy_cache_entries", 0)),
        "evictions_size": int(m.get('insights_proxy_cache_evictions_total{cause="size"}', 0)),
        "rss_mib": {"start": round(base["rss_kib"] / 1024, 1), "end": round(ps["rss_kib"] / 1024, 1),
                    "peak_hwm": round(ps["hwm_kib"] / 1024, 1)},
        "overhead_above_cache_mib": {"peak": round(peak - limit_mib, 1),
                                     "end": round(ps["rss_kib"] / 1024 - limit_mib, 1)},
        "hits_after": probe, "proxy_alive": env.alive(),
    }


async def poll_statuses(env, ids, deadline_s):
    """Polls every (project, id) until complete (200/400) or gone (404)."""
    outcome = {"complete_ok": 0, "complete_error": 0, "gone": 0, "running_at_deadline": 0, "other": 0}
    pending = list(ids)
    end = time.time() + deadline_s
    while pending and time.time() < end:
        still = []

        def make(i):
            p, qid = pending[i]
            return f"/api/environments/{p}/query/{qid}/", ALL

        def on(i, status, headers, body, s):
            if status == 200:
                outcome["complete_ok"] += 1
            elif status == 400:
                outcome["complete_error"] += 1
            elif status == 404:
                outcome["gone"] += 1
            elif status == 202:
                still.append(pending[i])
            else:
                outcome["other"] += 1

        await drive(env.proxy_port, 32, len(pending), make, on, end)
        pending = still
        if pending:
            await asyncio.sleep(1)
    outcome["running_at_deadline"] = len(pending)
    return outcome


async def phase_async(env):
    a = env.args
    env.start_sim(calc_delay_ms=a.async_calc_delay_ms)
    pid = env.start_proxy("async", "[refresh]\nworkers = 8\nqueue_capacity = 1024\nstatus_max_records = 100000\n")
    sampler = Sampler(os.path.join(a.out, "flood-async.csv"), pid, env.admin_port, every=1.0).start()
    lat, statuses, overflow, ids, no_status = [], {}, 0, [], 0
    seed = random.getrandbits(24)

    def make(i):
        return insight_path(INSIGHTS[i % 50], f"refresh=async&variables_override=%7B%22s%22%3A{seed}%2C%22x%22%3A{i}%7D"), ALL

    def on(i, status, headers, body, s):
        nonlocal overflow, no_status
        lat.append(s)
        statuses[status] = statuses.get(status, 0) + 1
        sampler.extra["done"] = sampler.extra.get("done", 0) + 1
        if status != 200:
            return
        try:
            qs = json.loads(body).get("query_status")
        except ValueError:
            qs = None
        if not isinstance(qs, dict):
            no_status += 1
            return
        if qs.get("error_message") == "concurrency_limit_exceeded":
            overflow += 1
        elif qs.get("id"):
            ids.append((project_of(INSIGHTS[i % 50]), qs["id"]))

    t0 = time.time()
    done = await drive(env.proxy_port, a.workers, a.async_requests, make, on, t0 + a.async_deadline)
    took = time.time() - t0
    log(f"async: {done} answered in {took:.0f}s, {overflow} overflowed; polling {len(ids)} statuses")
    polled = await poll_statuses(env, ids, a.poll_deadline)
    t1 = time.time()
    m = {}
    while time.time() - t1 < 120:
        m = await metrics(env.admin_port)
        if m.get("insights_proxy_queue_depth", 1) == 0 and m.get("insights_proxy_busy_workers", 1) == 0:
            break
        await asyncio.sleep(0.5)
    rows = await sampler.stop()
    ps = proc_status(pid)
    env.start_sim()
    return {
        "requests": a.async_requests, "answered": done, "seconds": round(took, 1), "statuses": statuses,
        "latency_ms": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": pct(lat, 1.0)},
        "overflow_concurrency_limit_exceeded": overflow, "answers_without_query_status": no_status,
        "accepted_statuses": len(ids), "polled": polled,
        "max_queue_depth": max((r["queue_depth"] for r in rows), default=0),
        "max_status_records": max((r["status_records"] for r in rows), default=0),
        "drained_after_s": round(time.time() - t1, 1),
        "status_records_end": int(m.get("insights_proxy_query_status_records", 0)),
        "rss_mib": {"end": round(ps["rss_kib"] / 1024, 1), "peak_hwm": round(ps["hwm_kib"] / 1024, 1)},
        "proxy_alive": env.alive(),
    }


async def junk_flood(env, count, modes, deadline_s, sampler, warmed):
    """`count` requests, each with a new random key the simulator rejects; meanwhile the legitimate
    user's warmed entries are checked every 2 s. Returns the figures."""
    _, _, stats0 = await simple_get(env.sim_port, "/_sim/stats")
    sim_requests0 = json.loads(stats0 or b"{}").get("requests", 0)
    statuses, leaked, sent, first_lost, probes = {}, 0, {"n": 0}, {"at": None}, []

    def make(i):
        return insight_path(INSIGHTS[i % 50], f"refresh={modes[i % len(modes)]}"), \
            f"phx_flood_{random.getrandbits(64):016x}_{i}"

    def on(i, status, headers, body, s):
        nonlocal leaked
        statuses[status] = statuses.get(status, 0) + 1
        sent["n"] += 1
        sampler.extra["done"] = sampler.extra.get("done", 0) + 1
        if status == 200 or b'"result"' in body or "; hit" in headers.get("cache-status", ""):
            leaked += 1

    async def watch():
        c = Conn(env.proxy_port)
        while True:
            lost, lat = 0, []
            for p in warmed:
                t = time.time()
                _, headers, _ = await c.get(p, ALL)
                lat.append(time.time() - t)
                lost += "; hit" not in headers.get("cache-status", "")
            probes.append({"after_junk_requests": sent["n"], "not_hit": lost, "p99_ms": pct(lat, 0.99)})
            if lost and first_lost["at"] is None:
                first_lost["at"] = sent["n"]
                log(f"creds: the legitimate user's entries stopped hitting after {sent['n']} rejected requests")
            await asyncio.sleep(2)

    watcher = asyncio.get_running_loop().create_task(watch())
    t0 = time.time()
    done = await drive(env.proxy_port, env.args.workers, count, make, on, t0 + deadline_s)
    took = time.time() - t0
    await asyncio.sleep(2.5)
    watcher.cancel()
    try:
        await watcher
    except asyncio.CancelledError:
        pass
    _, _, stats1 = await simple_get(env.sim_port, "/_sim/stats")
    sim_requests = json.loads(stats1 or b"{}").get("requests", 0) - sim_requests0
    return {
        "modes": sorted(set(modes)), "junk_requests": done, "seconds": round(took, 1),
        "rate_per_s": round(done / max(took, 0.001), 1), "statuses": statuses, "answers_with_data": leaked,
        "upstream_requests_per_junk_request": round(sim_requests / max(1, done), 3),
        "legit_entries_first_lost_after_junk_requests": first_lost["at"],
        "legit_not_hit_at_end": probes[-1]["not_hit"] if probes else None,
        "probes": probes[:: max(1, len(probes) // 12)],
    }


async def phase_creds(env):
    a = env.args
    # The production budget's per-project slots (3) and a per-key rate budget too large to throttle
    # the prefill: per-key rate states are part of what a flood of keys could grow.
    pid = env.start_proxy("creds", budget="[budget]\nper_minute = 1000000\nper_hour = 100000000\n")
    await warm(env)
    warmed = [insight_path(i) for i in INSIGHTS]
    if a.creds_prefill:
        log(f"creds: prefilling {a.creds_prefill} legitimate entries")

        def make_fill(i):
            insight = INSIGHTS[i % 50]
            # Other users' entries (phx_demo_p1/p2): the cache is shared, as in production.
            token = "phx_demo_p1" if insight <= 20 else "phx_demo_p2" if insight <= 35 else ALL
            return insight_path(insight, f"refresh=blocking&filters_override=%7B%22p%22%3A{i}%7D"), token

        await drive(env.proxy_port, a.workers, a.creds_prefill, make_fill, lambda *x: None, time.time() + 900)
    before = await hit_probe(env.proxy_port, 5, warmed)
    m0 = await metrics(env.admin_port)
    ps0 = proc_status(pid)
    sampler = Sampler(os.path.join(a.out, "flood-creds.csv"), pid, env.admin_port).start()
    # A: every key new and used once, modes that never enqueue work.
    log(f"creds: {a.cred_flood} rejected keys, force_cache/blocking, each once")
    distinct = await junk_flood(env, a.cred_flood, ["force_cache"] * 9 + ["blocking"], a.creds_deadline, sampler,
                                warmed)
    after_distinct = await hit_probe(env.proxy_port, 3, warmed)
    ps1 = proc_status(pid)
    # B: the same with refresh=async (the peek and the background job both get a 401).
    await warm(env)
    await hit_probe(env.proxy_port, 1, warmed)
    log(f"creds: {a.cred_async} rejected keys with refresh=async")
    asynchronous = await junk_flood(env, a.cred_async, ["async"], a.creds_deadline, sampler, warmed)
    legit_async = await simple_get(env.proxy_port, insight_path(3, "refresh=async&variables_override=%7B%22legit%22%3A1%7D"), ALL)
    rows = await sampler.stop()
    m = await metrics(env.admin_port)
    ps = proc_status(pid)
    try:
        legit_qs = json.loads(legit_async[2]).get("query_status") or {}
    except ValueError:
        legit_qs = {}
    return {
        "prefill": a.creds_prefill, "cache_entries_before": int(m0.get("insights_proxy_cache_entries", 0)),
        "legit_hits_before": before,
        "distinct_once": distinct, "legit_hits_after_distinct": after_distinct,
        "rss_mib_after_distinct": round(ps1["rss_kib"] / 1024, 1),
        "async": asynchronous,
        "legit_async_after_flood": {"status": legit_async[0], "error_message": legit_qs.get("error_message")},
        "max_status_records": max((r["status_records"] for r in rows), default=0),
        "max_queue_depth": max((r["queue_depth"] for r in rows), default=0),
        "cache_entries_end": int(m.get("insights_proxy_cache_entries", 0)),
        "rss_mib": {"before": round(ps0["rss_kib"] / 1024, 1), "end": round(ps["rss_kib"] / 1024, 1),
                    "peak_hwm": round(ps["hwm_kib"] / 1024, 1)},
        "proxy_alive": env.alive(),
    }


async def phase_purges(env):
    """Rejected keys below the purge-record cap: what each 401's partition purge costs every read."""
    a = env.args
    pid = env.start_proxy("purges")
    await warm(env)
    warmed = [insight_path(i) for i in INSIGHTS]

    def make_fill(i):
        insight = INSIGHTS[i % 50]
        token = "phx_demo_p1" if insight <= 20 else "phx_demo_p2" if insight <= 35 else ALL
        return insight_path(insight, f"refresh=blocking&filters_override=%7B%22p%22%3A{i}%7D"), token

    await drive(env.proxy_port, a.workers, a.purges_prefill, make_fill, lambda *x: None, time.time() + 600)
    m = await metrics(env.admin_port)
    baseline = await hit_probe(env.proxy_port, 5, warmed, workers=2)
    log(f"purges: {int(m.get('insights_proxy_cache_entries', 0))} entries; baseline hit p99 {baseline['p99_ms']} ms; "
        f"flooding {a.purges_flood} rejected keys")
    during = []
    flood = asyncio.get_running_loop().create_task(drive(
        env.proxy_port, a.workers, a.purges_flood,
        lambda i: (insight_path(INSIGHTS[i % 50]), f"phx_purge_{random.getrandbits(64):016x}_{i}"),
        lambda *x: None, time.time() + 600))
    t0 = time.time()
    while not flood.done():
        during.append(await hit_probe(env.proxy_port, 3, warmed, workers=2))
    flood_s = time.time() - t0
    after, recovered = [], None
    t1 = time.time()
    while time.time() - t1 < a.purges_watch:
        p = await hit_probe(env.proxy_port, 3, warmed, workers=2)
        p["t_after_flood_s"] = round(time.time() - t1, 1)
        after.append(p)
        if recovered is None and p["p99_ms"] is not None and baseline["p99_ms"] and p["p99_ms"] <= 3 * baseline["p99_ms"]:
            recovered = p["t_after_flood_s"]
            break
    slim = lambda p: {k: p.get(k) for k in ("t_after_flood_s", "rate_per_s", "hits", "p50_ms", "p99_ms", "max_ms")}
    return {
        "cache_entries": int(m.get("insights_proxy_cache_entries", 0)), "rejected_keys": a.purges_flood,
        "flood_seconds": round(flood_s, 1), "baseline": slim(baseline), "during": [slim(p) for p in during],
        "after": [slim(p) for p in after], "recovered_after_s": recovered,
        "rss_mib": round(proc_status(pid)["rss_kib"] / 1024, 1), "proxy_alive": env.alive(),
    }


PHASES = {"conns": phase_conns, "slowloris": phase_slowloris, "keys": phase_keys, "async": phase_async,
          "creds": phase_creds, "purges": phase_purges}


async def run(args, env):
    results = {"args": {k: v for k, v in vars(args).items()}}
    end = time.time() + args.max_seconds
    env.start_sim()
    for name in args.phases.split(","):
        if time.time() >= end:
            results[name] = {"skipped": "--max-seconds reached"}
            continue
        log(f"phase {name}")
        t = time.time()
        results[name] = await PHASES[name](env)
        results[name]["phase_seconds"] = round(time.time() - t, 1)
        log(f"phase {name}: {json.dumps(results[name])[:600]}")
        with open(os.path.join(args.out, "flood.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="conns,slowloris,keys,async,creds,purges")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--slowloris-conns", type=int, default=300)
    ap.add_argument("--slowloris-seconds", type=float, default=75)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--keys-deadline", type=float, default=1200)
    ap.add_argument("--cache-mib", type=int, default=128)
    ap.add_argument("--async-requests", type=int, default=100_000)
    ap.add_argument("--async-deadline", type=float, default=600)
    ap.add_argument("--async-calc-delay-ms", type=int, default=20)
    ap.add_argument("--poll-deadline", type=float, default=300)
    ap.add_argument("--cred-flood", type=int, default=120_000)
    ap.add_argument("--cred-async", type=int, default=5_000)
    ap.add_argument("--creds-prefill", type=int, default=100_000)
    ap.add_argument("--creds-deadline", type=float, default=900)
    ap.add_argument("--purges-prefill", type=int, default=20_000)
    ap.add_argument("--purges-flood", type=int, default=30_000)
    ap.add_argument("--purges-watch", type=float, default=180)
    ap.add_argument("--workers", type=int, default=64, help="client connections for the request floods")
    ap.add_argument("--max-seconds", type=float, default=3600, help="no phase starts after this")
    ap.add_argument("--base-port", type=int, default=18400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or f"/tmp/insights-flood.{int(time.time())}"
    os.makedirs(args.out, exist_ok=True)
    limit = raise_fd_limit(args.connections * 2 + 4096)
    log(f"open-files limit {limit} (this process and its children only)")
    if limit < args.connections + 1024:
        log(f"warning: the limit is below {args.connections + 1024}; fewer connections will be held")
    binary = find_binary()
    procs = Procs(args.out)
    env = Env(args, binary, procs)
    for p in (env.sim_port, env.proxy_port, env.admin_port):
        if port_open(p):
            raise SystemExit(f"port {p} is busy: pick another --base-port")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = asyncio.run(run(args, env))
        print(json.dumps(results, indent=2))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        procs.stop_all()
    log(f"results in {args.out}/flood.json")


if __name__ == "__main__":
    main()
