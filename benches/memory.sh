#!/usr/bin/env bash
# benches/memory.sh: insights-proxy's resident memory against the payload it caches.
#
#   benches/memory.sh [ENTRIES]          # default 100000 cached insights; a few minutes
#
# The simulated backend has 50 insights, and unknown API keys get 401, so distinct cache entries
# come from distinct `filters_override` values (each is its own entry in the proxy): insights 1–50
# (all three projects) x ENTRIES/50 values of `{"x": n}`, fetched with `?refresh=blocking` over
# CONCURRENCY keep-alive connections, calculation delay 0. Then it reads VmRSS/VmHWM from
# /proc/<pid>/status, the bodies held in files for sendfile (bodies of [cache] sendfile_min_bytes
# and more live in unnamed files in the page cache or in memfds, which VmRSS counts only where the
# process touched their mapping; summed from the sizes of those descriptors, in whole pages), and the
# proxy's own gauges from the admin listener's /metrics
# (insights_proxy_cache_entries, insights_proxy_cache_bytes), and reports RSS / payload, where
# payload = the sum of the 200 answers' body sizes (what a client received; the proxy stores each
# body once, without two per-answer fields).
#
# Settings (environment): CONCURRENCY=8 DEADLINE=900 (seconds for the fill) BASE_PORT=18100
# INSIGHTS_PROXY_BIN (skip the build; otherwise cargo build --release, honouring CARGO_TARGET_DIR)
# RUST_LOG=warn SENDFILE_MIN_BYTES ([cache] sendfile_min_bytes; unset: the default)
# OUT=/tmp/insights-memory.XXXX. Only 127.0.0.1; everything started is stopped by PID.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ENTRIES=${1:-${ENTRIES:-100000}}
CONCURRENCY=${CONCURRENCY:-8}
DEADLINE=${DEADLINE:-900}
BASE_PORT=${BASE_PORT:-18100}
export RUST_LOG=${RUST_LOG:-warn}
OUT=${OUT:-$(mktemp -d /tmp/insights-memory.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PROXY_PORT=$((BASE_PORT + 83))
ADMIN_PORT=$((BASE_PORT + 90))
AUTH="Authorization: Bearer phx_demo_all"

. "$HERE/lib.sh"
proxy_binary

sim_args=(simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0)
# Unlimited concurrent calculations per team, when this build has the flag (otherwise the fill's
# concurrency stays at 3 per project by construction: targets rotate over the 50 insights).
"$BIN" simulate --help 2>/dev/null | grep -q -- '--concurrency-limit' && sim_args+=(--concurrency-limit 0)
"$BIN" "${sim_args[@]}" >"$OUT/sim.log" 2>&1 &
SIM_PID=$!; PIDS+=("$SIM_PID")
wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start (see $OUT/sim.log)"

proxy_config "$BIN" "$OUT/proxy.toml" 2 300 $((64 << 30))
"$BIN" --config "$OUT/proxy.toml" --listen "127.0.0.1:$PROXY_PORT" --upstream "http://127.0.0.1:$SIM_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" >"$OUT/proxy.log" 2>&1 &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
wait_port "$PROXY_PORT" "$PROXY_PID" || die "the proxy did not start (see $OUT/proxy.log)"

rss_kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$PROXY_PID/status"; } # VmRSS, VmHWM
metric() { curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

curl -fsS --max-time 10 -o /dev/null -H "$AUTH" "http://127.0.0.1:$PROXY_PORT/api/environments/1/insights/1/?refresh=blocking"
BASE_RSS=$(rss_kb VmRSS)

per=$(((ENTRIES + 49) / 50))
python3 - "$per" "$ENTRIES" >"$OUT/targets.txt" <<'EOF'
import sys
per, total = int(sys.argv[1]), int(sys.argv[2])
out = 0
for n in range(per):
    for i in range(1, 51):
        if out == total:
            sys.exit()
        project = 1 if i <= 20 else 2 if i <= 35 else 3
        print(f"/api/environments/{project}/insights/{i}/?refresh=blocking&filters_override=%7B%22x%22%3A{n}%7D")
        out += 1
EOF
log "filling $ENTRIES entries over $CONCURRENCY connections (deadline ${DEADLINE}s); out: $OUT"
python3 "$HERE/httpload.py" fill --port "$PROXY_PORT" --header "$AUTH" --targets "$OUT/targets.txt" \
  --concurrency "$CONCURRENCY" --deadline "$DEADLINE" >"$OUT/fill.json"
sleep 2
RSS=$(rss_kb VmRSS)
HWM=$(rss_kb VmHWM)
SEALED=$(python3 - "$PROXY_PID" <<'EOF'
import os, sys
fd_dir, total = f"/proc/{sys.argv[1]}/fd", 0
for fd in os.listdir(fd_dir):
    try:
        link = os.readlink(f"{fd_dir}/{fd}")
        if link.startswith("/memfd:insights-body") or (link.startswith("/") and link.endswith(" (deleted)")):
            total += -(-os.stat(f"{fd_dir}/{fd}").st_size // 4096) * 4096
    except OSError:
        pass
print(total // 1024)
EOF
)
ENTRIES_GAUGE=$(metric insights_proxy_cache_entries || true)
BYTES_GAUGE=$(metric insights_proxy_cache_bytes || true)

python3 - "$OUT/fill.json" "$BASE_RSS" "$RSS" "$HWM" "${ENTRIES_GAUGE:-0}" "${BYTES_GAUGE:-0}" "$SEALED" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
fill = json.load(open(sys.argv[1]))
base, rss, hwm = (int(x) * 1024 for x in sys.argv[2:5])
sealed = int(sys.argv[7]) * 1024
entries, cbytes = int(float(sys.argv[5])), int(float(sys.argv[6]))
payload = fill["body_bytes_200"]
mib = lambda b: f"{b / 2**20:,.1f} MiB"
print(f"fill: {fill['done']:,} of {fill['requested']:,} requests in {fill['seconds']} s, statuses {fill['statuses']}, "
      f"cache {fill['cache']}{' (DEADLINE HIT)' if fill['timed_out'] else ''}")
print(f"cached entries (gauge): {entries:,}; insights_proxy_cache_bytes: {mib(cbytes)}")
print(f"payload (sum of 200 bodies): {mib(payload)}; mean body {payload / max(1, fill['statuses'].get('200', 1)):,.0f} B")
print(f"RSS: {mib(rss)} (peak {mib(hwm)}); before the fill: {mib(base)}; body files (outside RSS): {mib(sealed)}")
if payload:
    print(f"RSS / payload = {rss / payload:.2f}; (RSS - start RSS) / payload = {(rss - base) / payload:.2f}; "
          f"peak RSS / payload = {hwm / payload:.2f}; (RSS + body files) / payload = {(rss + sealed) / payload:.2f}")
if cbytes:
    print(f"RSS / cache_bytes gauge = {rss / cbytes:.2f}; (RSS - start) per entry = {(rss - base) / max(1, entries):,.0f} B")
EOF
echo "raw: $OUT"
