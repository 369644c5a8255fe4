#!/usr/bin/env bash
# benches/send-floor.sh: what the kernel alone costs per answer of a cached body, by each way of
# handing the body to the socket; the floor under any server's CPU per hit on this machine.
#
#   benches/send-floor.sh [ROUNDS]       # default 5 interleaved rounds of every mode
#
# Builds benches/send_floor.c (a minimal epoll server that answers every request with a fixed head
# and body, no parsing, no cache) with cc, then per round and mode (order rotated each round):
# starts it pinned to SERVER_CPU, runs wrk (one thread, CONNECTIONS connections) on CLIENT_CPU for
# DURATION s, stops it and reads its user and system CPU per answer. Modes (send_floor.c):
#   copy          writev from the heap
#   memfd         sendfile from a sealed memfd: insights-proxy's way for bodies of
#                 [cache] sendfile_min_bytes and more
#   disk          sendfile from a file on a disk filesystem (DISK_DIR): nginx's way with sendfile on
#   vmsplice      vmsplice + splice of anonymous pages
#   vmsplice-thp  the same from a transparent huge page (AnonHugePages of the server is printed: 0
#                 means the kernel gave no huge page and the row is the 4 KiB one again)
# Prints per mode the median and min–max of system and user µs per answer and of answers/s. The
# server's user time is near zero: the system time is the kernel's share of an answer of that size,
# which a full server (insights-proxy, nginx) pays on top of its own work.
#
# Settings (environment): SIZE=53248 (bytes of body; compare.sh's 52 KB insight) MODES="copy memfd
# disk vmsplice vmsplice-thp" DURATION=5 CONNECTIONS=64 SERVER_CPU=0 CLIENT_CPU=1 BASE_PORT=18600
# DISK_DIR=/var/tmp OUT=/tmp/send-floor.XXXX SERVER_QUOTA (e.g. 0.5; default none: the server has a
# whole core, and on 2 cores wrk is then the limit, so the server idles between wake-ups and its CPU
# per answer depends on how many answers a wake-up batches; with a cap it is always busy, as in
# compare.sh) QUOTA_PERIOD_US=10000. Only 127.0.0.1; every run is bounded; everything
# started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
ROUNDS=${1:-${ROUNDS:-5}}
SIZE=${SIZE:-53248}
MODES=${MODES:-"copy memfd disk vmsplice vmsplice-thp"}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-18600}
export DISK_DIR=${DISK_DIR:-/var/tmp}
OUT=${OUT:-$(mktemp -d /tmp/send-floor.XXXXXX)}
mkdir -p "$OUT"
SERVER_QUOTA=${SERVER_QUOTA:-}
trap 'cleanup; cap_remove' EXIT

install_missing cc:gcc wrk:wrk || die "cannot install gcc and wrk"
cc -O2 -Wall -o "$OUT/send_floor" "$HERE/send_floor.c"
log "out: $OUT; $ROUNDS rounds; body $SIZE bytes; ${DURATION}s per run; wrk -c$CONNECTIONS; CPU cap ${SERVER_QUOTA:-none}; disk: $DISK_DIR ($(df -T "$DISK_DIR" | awk 'NR == 2 {print $2}'))"

RESULTS="$OUT/runs.tsv"
printf 'round\tmode\tanswers\tuser_us\tsys_us\treq_s\tanon_huge_kb\n' >"$RESULTS"
read -r -a modes <<<"$MODES"
for round in $(seq "$ROUNDS"); do
  shift_by=$(((round - 1) % ${#modes[@]}))
  order=("${modes[@]:$shift_by}" "${modes[@]:0:$shift_by}")
  for mode in "${order[@]}"; do
    port=$((BASE_PORT + round))
    taskset -c "$SERVER_CPU" "$OUT/send_floor" "$port" "$SIZE" "$mode" 2>"$OUT/$round-$mode.err" &
    SRV=$!
    PIDS+=("$SRV")
    [ -z "$SERVER_QUOTA" ] || cap_join "$SRV"
    wait_port "$port" "$SRV"
    taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$port/" \
      >"$OUT/$round-$mode.wrk"
    huge=$(awk '$1 == "AnonHugePages:" {print $2}' "/proc/$SRV/smaps_rollup" 2>/dev/null || echo 0)
    kill -TERM "$SRV"
    wait "$SRV" 2>/dev/null || true
    forget "$SRV"
    read -r _ answers user sys <"$OUT/$round-$mode.err" || die "no report from send_floor $mode"
    rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$round-$mode.wrk")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$answers" "$user" "$sys" "$rps" "${huge:-0}" >>"$RESULTS"
    log "round $round $mode: system $sys µs, user $user µs per answer, $rps answers/s"
  done
done

python3 - "$RESULTS" "$SIZE" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
modes = list(dict.fromkeys(r["mode"] for r in rows))
def cell(vals, fmt):
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"
print(f"\nbody {sys.argv[2]} bytes; median (min–max) over {len(rows) // max(1, len(modes))} rounds")
print("| mode | system µs/answer | user µs/answer | answers/s | AnonHugePages kB |")
print("|---|---|---|---|---|")
for m in modes:
    rs = [r for r in rows if r["mode"] == m]
    print(f"| {m} | {cell([float(r['sys_us']) for r in rs], '{:.2f}')} | {cell([float(r['user_us']) for r in rs], '{:.2f}')}"
          f" | {cell([float(r['req_s']) for r in rs], '{:.0f}')} | {max(int(r['anon_huge_kb']) for r in rs)} |")
EOF
echo "raw: $OUT"
