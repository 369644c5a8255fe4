#!/usr/bin/env python3
"""benches/soak.py: a long dashboard-like load on the release binary, with upstream faults injected
every few minutes, recording the proxy's memory, errors and open work over time.

    benches/soak.py                     # 30 minutes (the default)
    benches/soak.py --duration 600      # a 10-minute soak
    INSIGHTS_PROXY_BIN=/path/to/insights-proxy benches/soak.py --duration 300

What it does
  * Starts the simulated PostHog (`insights-proxy simulate`) and the proxy as two processes on
    127.0.0.1 (the proxy with a generated config: short staleness so entries keep going stale and
    being recalculated, a bounded cache, the admin listener on; the circuit breaker keeps its
    production defaults, so recovery times are what an operator would see).
  * Registers --viewers extra personal API keys on the simulator (`POST /_sim/access`), so the
    proxy holds many partitions, as with a team of dashboard viewers.
  * --clients threads behave like dashboard viewers: pick a key and one of its project's
    dashboards, load every tile (`from_dashboard=D`) with a mix of refresh modes (async and poll
    the query_status as the frontend does, blocking, cached, lazy_async, forced), sometimes with a
    date filter override, sometimes a list page or a pass-through call; a short think time between.
  * Every --fault-every seconds it injects the next fault, for --fault-for seconds: SIGKILL of the
    simulator process and a restart; `POST /_sim/fault?kind=hang`; `kind=status&status=500`;
    `kind=garbage`; then clears it and measures recovery (time until a forced calculation through
    the proxy succeeds again).
  * Every --sample-every seconds it appends a row to soak.csv: the proxy's VmRSS/VmHWM, fds and
    threads (/proc/PID/status), gauges from the admin /metrics (query_status records, queue depth,
    busy workers, cache bytes/entries, circuit), and the clients' requests, errors and latency
    percentiles in the interval.
  * At the end: soak.png (memory over time: RSS and the cache's own bytes, fault windows shaded),
    summary.json, and a verdict: memory is "flat" when the least-squares slope of RSS over the last
    2/3 of the run (after warm-up) is below --flat-mib-per-hour, or the fitted growth over that
    window is below --flat-noise-mib.

Bounded: every request has a timeout, every loop a deadline, and everything started is stopped by
PID (SIGTERM, then SIGKILL). Only 127.0.0.1. Python 3.11 standard library only.
"""
import argparse
import http.client
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_ALL = "phx_demo_all"
ADMIN_TOKEN = "soak-admin-token-0123456789"
PROJECTS = (1, 2, 3)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------

class Procs:
    """Everything this script started, stopped by PID."""

    def __init__(self):
        self.procs = {}

    def start(self, name, argv, logfile):
        f = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        f.close()
        self.procs[name] = p
        return p

    def kill(self, name):
        """SIGKILL (the fault), by PID."""
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


def wait_port(port, deadline_s=30):
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
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
    """VmRSS and VmHWM in KiB, threads, fds of a process (zeros if it is gone)."""
    out = {"rss_kib": 0, "hwm_kib": 0, "threads": 0, "fds": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "VmRSS":
                    out["rss_kib"] = int(v.split()[0])
                elif k == "VmHWM":
                    out["hwm_kib"] = int(v.split()[0])
                elif k == "Threads":
                    out["threads"] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return out


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------

def request(port, method, path, headers=None, timeout=30.0):
    """One request on a fresh connection: (status, headers dict, body bytes); status 0 on error."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    except (OSError, http.client.HTTPException):
        return 0, {}, b""


def metrics(admin_port):
    status, _, body = request(admin_port, "GET", "/metrics", timeout=10)
    out = {}
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, _, v = line.rpartition(" ")
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def metric_sum(m, prefix):
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


class Client:
    """A keep-alive connection that reconnects after an error."""

    def __init__(self, port, timeout=30.0):
        self.port, self.timeout, self.conn = port, timeout, None

    def get(self, path, headers):
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.conn.request("GET", path, headers=headers)
                r = self.conn.getresponse()
                body = r.read()
                if (r.getheader("connection") or "").lower() == "close":
                    self.close()
                return r.status, r.getheader("cache-status") or "", body
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 1:
                    return 0, "", b""
        return 0, "", b""

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ------------------------------------------------------------------------------------------------
# Statistics shared by the client threads
# ------------------------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset_interval()
        self.total = {"requests": 0, "errors_5xx": 0, "errors_4xx": 0, "conn_errors": 0, "polls": 0,
                      "query_errors": 0, "stale_if_error": 0}
        self.error_times = []  # (t, kind) of every error, to split fault windows from the rest

    def reset_interval(self):
        self.latencies = []
        self.interval = {"requests": 0, "errors_5xx": 0, "errors_4xx": 0, "conn_errors": 0}

    def record(self, status, latency, cache_status, body_error=False):
        now = time.time()
        with self.lock:
            self.latencies.append(latency)
            for d in (self.interval, self.total):
                d["requests"] += 1
            kind = None
            if status == 0:
                kind = "conn_errors"
            elif status >= 500:
                kind = "errors_5xx"
            elif status >= 400:
                kind = "errors_4xx"
            if kind:
                self.interval[kind] += 1
                self.total[kind] += 1
                if len(self.error_times) < 1_000_000:
                    self.error_times.append((now, f"{kind}:{status}"))
            if body_error:
                self.total["query_errors"] += 1
            if "stale-if-error" in cache_status:
                self.total["stale_if_error"] += 1

    def take_interval(self):
        with self.lock:
            lat = sorted(self.latencies)
            iv = dict(self.interval)
            self.reset_interval()

        def pct(p):
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

        iv.update({"p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2), "max_ms": round(pct(1.0), 2)})
        return iv


# ------------------------------------------------------------------------------------------------
# The dashboard viewers
# ------------------------------------------------------------------------------------------------

MODES = [("async", 40), ("blocking", 20), (None, 15), ("lazy_async", 10), ("force_cache", 5),
         ("async_except_on_cache_miss", 5), ("force_blocking", 3), ("force_async", 2)]
OVERRIDES = [None] * 7 + ['{"date_from":"-14d"}', '{"date_from":"-30d"}', '{"date_from":"-90d"}']


def weighted(rng, items):
    total = sum(w for _, w in items)
    x = rng.uniform(0, total)
    for v, w in items:
        x -= w
        if x <= 0:
            return v
    return items[-1][0]


def viewer(idx, args, layout, viewers, stats, stop, deadline):
    rng = random.Random(args.seed * 1000 + idx)
    client = Client(args.proxy_port, timeout=args.request_timeout)
    while not stop.is_set() and time.time() < deadline:
        token, project = rng.choice(viewers)
        dashboards = layout[project]
        if not dashboards:
            time.sleep(0.1)
            continue
        dash = rng.choice(sorted(dashboards))
        headers = {"Authorization": f"Bearer {token}"}
        override = rng.choice(OVERRIDES)
        r = rng.random()
        if r < 0.03:
            paths = [f"/api/environments/{project}/insights/?limit=5&refresh=force_cache"]
        elif r < 0.05:
            paths = ["/api/projects/"]
        else:
            paths = []
            for insight in dashboards[dash]:
                q = {"from_dashboard": dash}
                mode = weighted(rng, MODES)
                if mode:
                    q["refresh"] = mode
                if override:
                    q["filters_override"] = override
                paths.append(f"/api/environments/{project}/insights/{insight}/?{urllib.parse.urlencode(q)}")
        for path in paths:
            if stop.is_set() or time.time() >= deadline:
                break
            t = time.time()
            status, cache_status, body = client.get(path, headers)
            stats.record(status, time.time() - t, cache_status)
            if status != 200 or "/insights/" not in path or "limit=" in path:
                continue
            try:
                v = json.loads(body)
            except ValueError:
                stats.record(599, 0, "")  # a 200 that is not JSON counts as an error
                continue
            qs = v.get("query_status") if isinstance(v, dict) else None
            if isinstance(qs, dict) and qs.get("error"):
                with stats.lock:
                    stats.total["query_errors"] += 1
            if isinstance(qs, dict) and qs.get("id") and not qs.get("complete"):
                # Poll it as PostHog's frontend does, bounded.
                for _ in range(args.max_polls):
                    if stop.is_set():
                        break
                    time.sleep(args.poll_interval)
                    t = time.time()
                    ps, pcs, _ = client.get(f"/api/environments/{project}/query/{qs['id']}/", headers)
                    with stats.lock:
                        stats.total["polls"] += 1
                    if ps != 202:
                        if ps not in (200, 400, 404):
                            stats.record(ps, time.time() - t, pcs)
                        break
            time.sleep(rng.uniform(0, args.think_ms / 1000.0))
    client.close()


# ------------------------------------------------------------------------------------------------
# PNG: a small line-chart rasteriser (zlib + struct)
# ------------------------------------------------------------------------------------------------

FONT = {  # 5x7, rows top to bottom, '1' = ink
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ":": "00000 01100 01100 00000 01100 01100 00000", "-": "00000 00000 00000 11111 00000 00000 00000",
    "/": "00001 00010 00010 00100 01000 01000 10000", "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000", "=": "00000 00000 11111 00000 11111 00000 00000",
    "%": "11001 11010 00010 00100 01000 01011 10011", "+": "00000 00100 00100 11111 00100 00100 00000",
    ",": "00000 00000 00000 00000 01100 00100 01000",
}


class Canvas:
    def __init__(self, w, h, bg=(255, 255, 255)):
        self.w, self.h = w, h
        self.px = bytearray(bytes(bg) * (w * h))

    def set(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0, y0, x1, y1, c):
        for y in range(max(0, y0), min(self.h, y1)):
            for x in range(max(0, x0), min(self.w, x1)):
                self.set(x, y, c)

    def line(self, x0, y0, x1, y1, c, width=1):
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        for _ in range(10 * (self.w + self.h)):
            for ox in range(width):
                for oy in range(width):
                    self.set(x0 + ox - width // 2, y0 + oy - width // 2, c)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x, y, s, c=(0, 0, 0), scale=1):
        for ch in s.upper():
            rows = FONT.get(ch, FONT[" "]).split()
            for ry, row in enumerate(rows):
                for rx, bit in enumerate(row):
                    if bit == "1":
                        self.rect(x + rx * scale, y + ry * scale, x + (rx + 1) * scale, y + (ry + 1) * scale, c)
            x += 6 * scale

    def png(self, path):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)))
            f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
            f.write(chunk(b"IEND", b""))


def nice_step(span, ticks):
    raw = span / max(1, ticks)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def plot(path, title, series, shaded=(), xlabel="MINUTES", ylabel="MIB"):
    """series: [(label, color, [(x, y)])]; shaded: [(x0, x1)] in x units."""
    W, H, L, R, T, B = 960, 440, 70, 20, 40, 50
    cv = Canvas(W, H)
    xs = [x for _, _, pts in series for x, _ in pts] or [0, 1]
    ys = [y for _, _, pts in series for _, y in pts] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = 0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0

    def px(x):
        return int(L + (x - x0) / (x1 - x0) * (W - L - R))

    def py(y):
        return int(H - B - (y - y0) / (y1 - y0) * (H - T - B))

    for a, b in shaded:
        cv.rect(px(max(a, x0)), T, px(min(b, x1)) + 1, H - B, (255, 228, 228))
    ystep = nice_step(y1 - y0, 6)
    y = 0.0
    while y <= y1:
        cv.line(L, py(y), W - R, py(y), (225, 225, 225))
        label = f"{round(y, 6):g}"
        cv.text(L - 8 - 6 * len(label), py(y) - 3, label)
        y += ystep
    xstep = nice_step(x1 - x0, 10)
    x = (int(x0 / xstep)) * xstep
    while x <= x1:
        if x >= x0:
            cv.line(px(x), H - B, px(x), H - B + 4, (0, 0, 0))
            label = f"{round(x, 6):g}"
            cv.text(px(x) - 3 * len(label), H - B + 8, label)
        x += xstep
    cv.line(L, T, L, H - B, (0, 0, 0))
    cv.line(L, H - B, W - R, H - B, (0, 0, 0))
    for _, color, pts in series:
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            cv.line(px(ax), py(ay), px(bx), py(by), color, width=2)
    cv.text(L, 12, title, scale=2)
    cv.text(W // 2 - 3 * len(xlabel), H - 18, xlabel)
    cv.text(8, T - 14, ylabel)
    lx = L + 12
    for i, (label, color, _) in enumerate(series):
        cv.rect(lx, T + 6 + 14 * i, lx + 12, T + 14 + 14 * i, color)
        cv.text(lx + 18, T + 6 + 14 * i, label)
    if shaded:
        cv.rect(lx, T + 6 + 14 * len(series), lx + 12, T + 14 + 14 * len(series), (255, 200, 200))
        cv.text(lx + 18, T + 6 + 14 * len(series), "FAULT WINDOWS")
    cv.png(path)


def slope_per_hour(points):
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    n = len(points)
    if n < 3:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600.0


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def write_config(path, args):
    stale = args.staleness_seconds
    intervals = ("minute", "hour", "day", "week", "month", "quarter", "year")
    with open(path, "w") as f:
        f.write(f"""# generated by benches/soak.py
[server]
listen = "127.0.0.1:{args.proxy_port}"
threads = 2
grace_period_ms = 0
shutdown_timeout_ms = 1000
[upstream]
url = "http://127.0.0.1:{args.sim_port}"
connect_timeout_ms = 500
read_timeout_ms = {args.read_timeout_ms}
[cache]
max_bytes = {args.cache_mib * 1024 * 1024}
[staleness.default]
{chr(10).join(f"{i} = {stale}" for i in intervals)}
[staleness.lazy]
{chr(10).join(f"{i} = {2 * stale}" for i in intervals)}
[refresh]
status_ttl_seconds = {args.status_ttl_seconds}
[budget]
per_minute = 0
per_hour = 0
[admin]
listen = "127.0.0.1:{args.admin_port}"
token = "{ADMIN_TOKEN}"
""")


def start_simulator(procs, binary, args):
    procs.start("simulator", [binary, "simulate", "--listen", f"127.0.0.1:{args.sim_port}",
                              "--calc-delay-ms", str(args.calc_delay_ms),
                              "--staleness-seconds", str(args.staleness_seconds)],
                os.path.join(args.out, "simulator.log"))
    if not wait_port(args.sim_port):
        raise SystemExit("the simulator did not start")


def register_viewers(args, viewers):
    for token, project in viewers:
        if token.startswith("phx_demo"):
            continue
        request(args.sim_port, "POST", f"/_sim/access?token={token}&project={project}&allowed=true", timeout=5)


def dashboard_layout(args):
    """{project: {dashboard: [insight ids]}} read straight from the simulator."""
    layout = {}
    for p in PROJECTS:
        status, _, body = request(args.sim_port, "GET", f"/api/environments/{p}/insights/?basic=true&limit=100",
                                  {"Authorization": f"Bearer {DEMO_ALL}"})
        if status != 200:
            raise SystemExit(f"cannot list project {p}'s insights: {status}")
        dashes = {}
        for ins in json.loads(body)["results"]:
            for d in ins.get("dashboards") or []:
                dashes.setdefault(d, []).append(ins["id"])
        layout[p] = dashes
    return layout


def probe_recovery(args, limit_s=120):
    """Seconds until a forced calculation through the proxy succeeds (None if it never does)."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        status, headers, body = request(args.proxy_port, "GET", "/api/environments/1/insights/1/?refresh=force_blocking",
                                        {"Authorization": f"Bearer {DEMO_ALL}"}, timeout=args.request_timeout)
        if status == 200 and "fwd=request" in headers.get("cache-status", ""):
            return round(time.time() - t0, 3)
        time.sleep(0.1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load (default 1800 = 30 min)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds excluded from the flatness check "
                    "(default: the first third)")
    ap.add_argument("--fault-every", type=float, default=180, help="seconds between faults (default 180)")
    ap.add_argument("--fault-for", type=float, default=20, help="seconds each fault lasts (default 20)")
    ap.add_argument("--sample-every", type=float, default=5, help="seconds between samples (default 5)")
    ap.add_argument("--clients", type=int, default=12, help="viewer threads (default 12)")
    ap.add_argument("--viewers", type=int, default=30, help="extra API keys registered (default 30)")
    ap.add_argument("--think-ms", type=float, default=150, help="max think time between tiles (default 150)")
    ap.add_argument("--poll-interval", type=float, default=0.3)
    ap.add_argument("--max-polls", type=int, default=40)
    ap.add_argument("--calc-delay-ms", type=int, default=150, help="simulated calculation time (default 150)")
    ap.add_argument("--staleness-seconds", type=int, default=120, help="staleness of every interval (default 120)")
    ap.add_argument("--status-ttl-seconds", type=int, default=300)
    ap.add_argument("--read-timeout-ms", type=int, default=5000)
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--cache-mib", type=int, default=64, help="[cache] max_bytes in MiB (default 64)")
    ap.add_argument("--flat-mib-per-hour", type=float, default=16.0)
    ap.add_argument("--flat-noise-mib", type=float, default=3.0)
    ap.add_argument("--base-port", type=int, default=18300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="output directory (default /tmp/insights-soak.<time>)")
    args = ap.parse_args()
    args.sim_port, args.proxy_port, args.admin_port = args.base_port + 10, args.base_port + 80, args.base_port + 90
    args.out = args.out or f"/tmp/insights-soak.{int(time.time())}"
    os.makedirs(args.out, exist_ok=True)
    warmup = args.warmup if args.warmup is not None else args.duration / 3

    binary = find_binary()
    procs = Procs()
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    summary = {}
    try:
        for p in (args.sim_port, args.proxy_port, args.admin_port):
            if wait_port(p, 0.2):
                raise SystemExit(f"port {p} is busy: pick another --base-port")
        start_simulator(procs, binary, args)
        rng = random.Random(args.seed)
        viewers = [(DEMO_ALL, p) for p in PROJECTS] + [("phx_demo_p1", 1), ("phx_demo_p2", 2)]
        viewers += [(f"phx_soak_viewer_{i:03d}_{rng.getrandbits(32):08x}", PROJECTS[i % 3]) for i in range(args.viewers)]
        register_viewers(args, viewers)
        layout = dashboard_layout(args)
        config = os.path.join(args.out, "proxy.toml")
        write_config(config, args)
        proxy = procs.start("proxy", [binary, "--config", config], os.path.join(args.out, "proxy.log"))
        if not wait_port(args.proxy_port) or not wait_port(args.admin_port):
            raise SystemExit("the proxy did not start")
        proxy_pid = proxy.pid
        log(f"proxy pid {proxy_pid} on :{args.proxy_port}, simulator on :{args.sim_port}; output in {args.out}")

        stats = Stats()
        t_start = time.time()
        deadline = t_start + args.duration
        threads = [threading.Thread(target=viewer, args=(i, args, layout, viewers, stats, stop, deadline), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()

        faults = []  # dicts: kind, start, end, recovery_s
        kinds = ["kill", "hang", "status500", "garbage"]
        next_fault = t_start + args.fault_every
        next_sample = t_start
        csv_path = os.path.join(args.out, "soak.csv")
        columns = ["t_s", "rss_mib", "hwm_mib", "fds", "threads", "cache_mib", "cache_entries", "status_records",
                   "queue_depth", "busy_workers", "circuit_open", "upstream_errors", "requests", "errors_5xx",
                   "errors_4xx", "conn_errors", "p50_ms", "p99_ms", "max_ms", "fault"]
        rows = []
        active_fault = None
        with open(csv_path, "w") as csv:
            csv.write(",".join(columns) + "\n")
            while time.time() < deadline and not stop.is_set():
                now = time.time()
                if proxy.poll() is not None:
                    log(f"the proxy exited with {proxy.returncode}!")
                    summary["proxy_crashed"] = proxy.returncode
                    break
                if active_fault is None and now >= next_fault and now + args.fault_for + 10 < deadline:
                    kind = kinds[len(faults) % len(kinds)]
                    active_fault = {"kind": kind, "start": round(now - t_start, 1)}
                    log(f"fault: {kind} for {args.fault_for:.0f}s")
                    if kind == "kill":
                        procs.kill("simulator")
                    elif kind == "hang":
                        request(args.sim_port, "POST", "/_sim/fault?kind=hang", timeout=5)
                    elif kind == "status500":
                        request(args.sim_port, "POST", "/_sim/fault?kind=status&status=500", timeout=5)
                    else:
                        request(args.sim_port, "POST", "/_sim/fault?kind=garbage", timeout=5)
                    active_fault["_until"] = now + args.fault_for
                if active_fault is not None and now >= active_fault["_until"]:
                    if active_fault["kind"] == "kill":
                        start_simulator(procs, binary, args)
                        register_viewers(args, viewers)
                    else:
                        request(args.sim_port, "POST", "/_sim/fault?kind=none", timeout=5)
                    active_fault["end"] = round(time.time() - t_start, 1)
                    active_fault["recovery_s"] = probe_recovery(args)
                    log(f"fault {active_fault['kind']} cleared; recovered in {active_fault['recovery_s']} s")
                    del active_fault["_until"]
                    faults.append(active_fault)
                    active_fault = None
                    next_fault = time.time() + args.fault_every
                if now >= next_sample:
                    ps = proc_status(proxy_pid)
                    m = metrics(args.admin_port)
                    iv = stats.take_interval()
                    row = {
                        "t_s": round(now - t_start, 1), "rss_mib": round(ps["rss_kib"] / 1024, 2),
                        "hwm_mib": round(ps["hwm_kib"] / 1024, 2), "fds": ps["fds"], "threads": ps["threads"],
                        "cache_mib": round(m.get("insights_proxy_cache_bytes", 0) / 2 ** 20, 2),
                        "cache_entries": int(m.get("insights_proxy_cache_entries", 0)),
                        "status_records": int(m.get("insights_proxy_query_status_records", 0)),
                        "queue_depth": int(m.get("insights_proxy_queue_depth", 0)),
                        "busy_workers": int(m.get("insights_proxy_busy_workers", 0)),
                        "circuit_open": int(m.get("insights_proxy_upstream_circuit_open", 0)),
                        "upstream_errors": int(metric_sum(m, "insights_proxy_upstream_errors_total")),
                        **iv, "fault": active_fault["kind"] if active_fault else "",
                    }
                    rows.append(row)
                    csv.write(",".join(str(row[c]) for c in columns) + "\n")
                    csv.flush()
                    log(f"t={row['t_s']:.0f}s rss={row['rss_mib']}MiB cache={row['cache_mib']}MiB "
                        f"statuses={row['status_records']} queue={row['queue_depth']} req={iv['requests']} "
                        f"5xx={iv['errors_5xx']} 4xx={iv['errors_4xx']} conn={iv['conn_errors']} p99={iv['p99_ms']}ms")
                    next_sample = now + args.sample_every
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=args.request_timeout + 5)
        if active_fault is not None:
            request(args.sim_port, "POST", "/_sim/fault?kind=none", timeout=5)

        # After the load: the open work drains.
        drained_at = None
        t_end = time.time()
        while time.time() - t_end < 60:
            m = metrics(args.admin_port)
            if m.get("insights_proxy_queue_depth", 1) == 0 and m.get("insights_proxy_busy_workers", 1) == 0:
                drained_at = round(time.time() - t_end, 2)
                break
            time.sleep(0.2)
        final = proc_status(proxy_pid)

        # Memory verdict over the last 2/3 (after warm-up).
        pts = [(r["t_s"], r["rss_mib"]) for r in rows if r["t_s"] >= warmup and r["rss_mib"] > 0]
        slope = slope_per_hour(pts)
        window_s = (pts[-1][0] - pts[0][0]) if len(pts) > 1 else 0
        growth = slope * window_s / 3600.0
        flat = len(pts) >= 3 and (slope <= args.flat_mib_per_hour or growth <= args.flat_noise_mib)
        # The same slope over successive quarters of that window: converging or steadily rising.
        quarters = []
        if len(pts) >= 8:
            span = (pts[-1][0] - pts[0][0]) / 4
            for q in range(4):
                seg = [p for p in pts if pts[0][0] + q * span <= p[0] <= pts[0][0] + (q + 1) * span]
                quarters.append(round(slope_per_hour(seg), 2))

        def in_fault(t):
            return any(f["start"] <= t - t_start <= (f.get("end", f["start"]) + (f.get("recovery_s") or 0) + 5)
                       for f in faults)

        outside = [k for t, k in stats.error_times if not in_fault(t)]
        summary.update({
            "duration_s": round(time.time() - t_start, 1), "out": args.out,
            "requests": stats.total["requests"], "errors": {k: v for k, v in stats.total.items() if k != "requests"},
            "errors_outside_fault_windows": len(outside), "errors_outside_examples": outside[:10],
            "faults": faults,
            "rss_mib": {"start": rows[0]["rss_mib"] if rows else None, "end": round(final["rss_kib"] / 1024, 2),
                        "peak_hwm": round(final["hwm_kib"] / 1024, 2),
                        "max_sampled": max((r["rss_mib"] for r in rows), default=None)},
            "cache_limit_mib": args.cache_mib,
            "max_status_records": max((r["status_records"] for r in rows), default=0),
            "max_queue_depth": max((r["queue_depth"] for r in rows), default=0),
            "max_fds": max((r["fds"] for r in rows), default=0),
            "drained_after_s": drained_at,
            "memory": {"warmup_s": warmup, "slope_mib_per_hour": round(slope, 2),
                       "fitted_growth_mib_over_window": round(growth, 2), "window_s": window_s,
                       "slope_by_quarter_mib_per_hour": quarters,
                       "verdict": "flat" if flat else "growing",
                       "rule": f"slope <= {args.flat_mib_per_hour} MiB/h or growth <= {args.flat_noise_mib} MiB"},
        })
        plot(os.path.join(args.out, "soak.png"),
             f"INSIGHTS-PROXY SOAK: RSS {summary['memory']['verdict'].upper()} ({slope:+.1f} MIB/H AFTER WARM-UP)",
             [("PROXY RSS (MIB)", (31, 119, 180), [(r["t_s"] / 60, r["rss_mib"]) for r in rows]),
              ("CACHE BYTES (MIB)", (44, 160, 44), [(r["t_s"] / 60, r["cache_mib"]) for r in rows]),
              (f"CACHE LIMIT {args.cache_mib} MIB", (160, 160, 160),
               [(rows[0]["t_s"] / 60, args.cache_mib), (rows[-1]["t_s"] / 60, args.cache_mib)] if rows else [])],
             shaded=[(f["start"] / 60, f.get("end", f["start"]) / 60) for f in faults])
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2))
        log(f"memory after warm-up: {summary['memory']['verdict']} (slope {slope:+.2f} MiB/h); "
            f"csv {csv_path}; plot {os.path.join(args.out, 'soak.png')}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        stop.set()
        procs.stop_all()
    return 0 if summary.get("memory", {}).get("verdict") == "flat" and "proxy_crashed" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
