#!/usr/bin/env python3
"""Helpers of benches/compare.sh (standard library only).

wrk FILE            -> "rps requests p50_ms p99_ms non2xx socket_errors bytes_per_response" from wrk --latency
summary TSV         -> per-server medians over rounds, and ratios to nginx (median of the per-round
                       ratios, so each ratio compares runs made under the same machine noise)
"""
import json
import re
import statistics
import sys

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
SIZE = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(path):
    t = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)(B|KB|MB|GB) read", t)
    requests = int(m.group(1))
    nbytes = float(m.group(4)) * SIZE[m.group(5)]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    err_total = sum(int(x) for x in errs.groups()) if errs else 0
    per = nbytes / requests if requests else 0
    print(f"{rps:.0f} {requests} {p50:.3f} {p99:.3f} {int(non2xx.group(1)) if non2xx else 0} {err_total} {per:.0f}")


COLS = [
    ("hits_per_s", "hits/s", True),
    ("req_per_cpu_s", "req/CPU-s", True),
    ("p50_ms", "p50 ms", False),
    ("p99_ms", "p99 ms", False),
]
OTHER = [
    ("cpu_util", "server CPU util"),
    ("core_busy", "core busy"),
    ("loadavg", "load avg"),
    ("resp_bytes", "bytes/resp (wrk)"),
    ("herd_calcs", "herd calcs"),
    ("herd_ok", "herd 200s"),
    ("herd_max_ms", "herd slowest ms"),
    ("herd_max_app_ms", "herd read ms"),
    ("stale_waited", "stale waited"),
    ("stale_ok", "stale 200s"),
    ("stale_max_ms", "stale slowest ms"),
    ("stale_calcs", "stale calcs"),
]


def num(v):
    try:
        return float(v)
    except ValueError:
        return None


def fmt(v, key=""):
    if v is None:
        return "-"
    if key in ("p50_ms", "p99_ms"):
        return f"{v:.2f}"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.2f}"


def summary(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    head, rows = rows[0], rows[1:]
    recs = [dict(zip(head, r)) for r in rows]
    servers = []
    for r in recs:
        if r["server"] not in servers:
            servers.append(r["server"])
    by = {s: [r for r in recs if r["server"] == s] for s in servers}
    rounds = sorted({r["round"] for r in recs}, key=int)

    def med(s, key):
        vals = [num(r.get(key, "")) for r in by[s] if num(r.get(key, "")) is not None]
        return statistics.median(vals) if vals else None

    def ratio(s, key):
        vals = []
        for rd in rounds:
            a = [num(r[key]) for r in by[s] if r["round"] == rd]
            b = [num(r[key]) for r in by.get("nginx", []) if r["round"] == rd]
            if a and b and a[0] is not None and b[0]:
                vals.append(a[0] / b[0])
        return (statistics.median(vals), min(vals), max(vals)) if vals else None

    print(f"Medians over {len(rounds)} interleaved round(s); ratio = median of per-round ratios to nginx (min–max).")
    w = max(len(s) for s in servers) + 2
    print("".ljust(w) + "".join(label.rjust(26) for _, label, _ in COLS))
    for s in servers:
        cells = []
        for key, _, _ in COLS:
            m = med(s, key)
            rt = ratio(s, key) if s != "nginx" and "nginx" in by else None
            cell = fmt(m, key) + (f" ({rt[0]:.2f}x {rt[1]:.2f}-{rt[2]:.2f})" if rt else "")
            cells.append(cell.rjust(26))
        print(s.ljust(w) + "".join(cells))
    print()
    print("".ljust(w) + "".join(label.rjust(18) for _, label in OTHER))
    for s in servers:
        print(s.ljust(w) + "".join(fmt(med(s, k)).rjust(18) for k, _ in OTHER))
    print()
    print("Per round (hits/s, req/CPU-s):")
    for rd in rounds:
        parts = []
        for s in servers:
            r = [x for x in by[s] if x["round"] == rd]
            if r:
                parts.append(f"{s} {fmt(num(r[0]['hits_per_s']))} / {fmt(num(r[0]['req_per_cpu_s']))}")
        print(f"  round {rd}: " + "; ".join(parts))
    out = {s: {k: med(s, k) for k, _, _ in COLS} | {k: med(s, k) for k, _ in OTHER} for s in servers}
    with open(path.rsplit(".", 1)[0] + ".summary.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("wrk", "summary"):
        sys.exit(__doc__)
    parse_wrk(sys.argv[2]) if sys.argv[1] == "wrk" else summary(sys.argv[2])
