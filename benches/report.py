#!/usr/bin/env python3
"""Helpers of benches/compare.sh (standard library only).

wrk FILE            -> "rps requests p50_ms p99_ms non2xx socket_errors bytes_per_response" from wrk --latency
h2load FILE         -> the same from h2load's output, latencies from its --log-file FILE.log
h2load-rate FILE    -> the same (h2load at a fixed rate)
summary DIR         -> per row and server, median (min–max) over the valid runs of DIR/hits.tsv and
                       the ratios to nginx (median of the per-round ratios, so each ratio compares
                       runs made under the same machine noise); herd and stale window per round
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


def parse_h2load(path):
    t = open(path).read()
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", t)
    rps = float(m.group(2))
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", t)
    done, failed = int(req.group(3)), int(req.group(5)) + int(req.group(6)) + int(req.group(7))
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", t)
    non2xx = sum(int(x) for x in codes.groups()[1:])
    data = re.search(r"traffic: .*?, [\d.]+\w*B \((\d+)\) data", t)
    lat = sorted(int(line.split("\t")[2]) / 1000 for line in open(path + ".log") if line.count("\t") >= 2)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0
    per = int(data.group(1)) / done if data and done else 0
    print(f"{rps:.0f} {done} {pct(0.5):.3f} {pct(0.99):.3f} {non2xx} {failed} {per:.0f}")


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def spread(vals, key=""):
    """median (min–max)"""
    if not vals:
        return "-"
    f = (lambda v: f"{v:.2f}") if key.endswith("_ms") else (lambda v: f"{v:,.0f}")
    return f"{f(statistics.median(vals))} ({f(min(vals))}–{f(max(vals))})"


def table(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


HIT_COLS = [("req_per_cpu_s", "req/CPU-s"), ("hits_per_s", "hits/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]


def summary(out):
    hits = table(f"{out}/hits.tsv")
    servers = list(dict.fromkeys(r["server"] for r in hits))
    rows = list(dict.fromkeys(r["row"] for r in hits))
    rounds = sorted({r["round"] for r in hits}, key=int)
    valid = [r for r in hits if r["valid"] == "valid"]
    # The valid run of each (round, server, row), if any (the last attempt is the one that counts).
    final = {(r["round"], r["server"], r["row"]): r for r in valid}
    result = {}
    print(f"Hit rows over {len(rounds)} interleaved round(s): median (min–max) of valid runs; ratio to nginx = "
          "median (min–max) of the per-round ratios, rounds where both runs were valid.")
    for row in rows:
        print(f"\n{row}:\n")
        print("| server | valid rounds | " + " | ".join(label for _, label in HIT_COLS)
              + " | server CPU util | client share | connections |")
        print("|---" * (len(HIT_COLS) + 5) + "|")
        for s in servers:
            recs = [final[(rd, s, row)] for rd in rounds if (rd, s, row) in final]
            tried = len({r["round"] for r in hits if r["server"] == s and r["row"] == row})
            cells = []
            entry = {"valid_rounds": len(recs), "rounds": tried}
            for key, _ in HIT_COLS:
                vals = [num(r[key]) for r in recs if num(r[key]) is not None]
                cell = spread(vals, key)
                entry[key] = vals
                if s != "nginx" and "nginx" in servers:
                    ratios = [num(final[(rd, s, row)][key]) / num(final[(rd, "nginx", row)][key])
                              for rd in rounds if (rd, s, row) in final and (rd, "nginx", row) in final
                              and num(final[(rd, "nginx", row)][key])]
                    if ratios:
                        cell += f"; **{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f})"
                        entry[key + "_ratio"] = ratios
                cells.append(cell)
            utils = [num(r["cpu_util"]) for r in recs]
            shares = [num(r["client_share"]) for r in recs]
            conns = sorted({r["connections"] for r in recs}, key=int)
            print(f"| {s} | {len(recs)}/{tried} | " + " | ".join(cells)
                  + f" | {spread(utils, '_ms')} | {spread(shares, '_ms')} | {'/'.join(conns) or '-'} |")
            result.setdefault(row, {})[s] = entry
    invalid = [r for r in hits if r["valid"] != "valid"]
    if invalid:
        print(f"\n{len(invalid)} INVALID run(s) (client above its share), left out above:")
        for r in invalid:
            print(f"  round {r['round']} {r['server']} {r['row']} attempt {r['attempt']}: client {r['client_share']}"
                  f" of {r['client_cpus']}, {r['connections']} conns, {num(r['req_per_cpu_s']):,.0f} req/CPU-s")
    loads = [num(r["loadavg"]) for r in hits]
    busy = [num(r["core_busy"]) for r in hits]
    print(f"\nload average during the runs: {spread(loads, '_ms')}; server core busy: {spread(busy, '_ms')}")
    herd = table(f"{out}/herd.tsv")
    if any(r["herd_calcs"] != "-" or r["stale_calcs"] != "-" for r in herd):
        print("\nHerd and stale window (per round):")
        for s in servers:
            rs = [r for r in herd if r["server"] == s]
            print(f"  {s}: herd calcs {[r['herd_calcs'] for r in rs]}, slowest ms {[r['herd_max_ms'] for r in rs]};"
                  f" stale waited {[r['stale_waited'] for r in rs]}, calcs {[r['stale_calcs'] for r in rs]}")
    with open(f"{out}/summary.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    commands = {"wrk": parse_wrk, "h2load": parse_h2load, "h2load-rate": parse_h2load, "summary": summary}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](sys.argv[2])
