#!/usr/bin/env bash
# benches/idle_conns.sh: resident memory per idle keep-alive connection, insights-proxy against nginx.
#
#   benches/idle_conns.sh [N]            # default 10000 connections per server; about a minute
#
# Dashboards keep many keep-alive connections open between reloads; what each costs while idle is
# what this measures. Per server (SERVERS, in turn): a fresh simulator (calculation delay 0), the
# server from the compare.sh templates (insights-proxy with one worker thread, nginx with one
# worker), the hit insight filled, one hit; then `httpload.py hold` opens N connections (at most 200
# opening at once), sends one GET for the hit insight on each, reads the whole answer and holds them
# all idle. VmRSS of each server process is read before the first connection and SETTLE s after the
# last answer; reported per process as (RSS held - RSS before) / N. nginx's master takes no
# connections: its worker is the figure to compare. Raises the open-files limit to N + 1024 (each
# process: server and client; ulimit -n, within the hard limit).
#
# Settings (environment): SERVERS="nginx insights-proxy" HIT_INSIGHT=11 SETTLE=2 BASE_PORT=18300
# INSIGHTS_PROXY_BIN (skip the build) RUST_LOG=warn OUT=/tmp/insights-idle.XXXX.
# Only 127.0.0.1; every wait is bounded; everything started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
. "$HERE/lib.sh"
N=${1:-${N:-10000}}
SERVERS=${SERVERS:-"nginx insights-proxy"}
HIT_INSIGHT=${HIT_INSIGHT:-11}
SETTLE=${SETTLE:-2}
BASE_PORT=${BASE_PORT:-18300}
export RUST_LOG=${RUST_LOG:-warn}
OUT=${OUT:-$(mktemp -d /tmp/insights-idle.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PORT=$((BASE_PORT + 80))
AUTH="Authorization: Bearer phx_demo_all"
HIT_PATH="/api/environments/1/insights/$HIT_INSIGHT/"

ulimit -n $((N + 1024)) || die "cannot raise the open-files limit to $((N + 1024))"
install_missing nginx:nginx curl:curl python3:python3
proxy_binary

summary="$OUT/summary.txt"
: >"$summary"
for name in $SERVERS; do
  dir="$OUT/$name"
  mkdir -p "$dir"
  "$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0 >"$dir/sim.log" 2>&1 &
  sim=$!; PIDS+=("$sim")
  wait_port "$SIM_PORT" "$sim" || die "the simulator did not start (see $dir/sim.log)"
  case "$name" in
    nginx)
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$PORT#g" -e "s#@UPSTREAM_PORT@#$SIM_PORT#g" -e "s#@STALE_PATH@#/none/#g" \
        -e "s#@FRESH_S@#300#g" -e "s#@SENDFILE@#on#g" -e "s#worker_connections 4096#worker_connections $((N + 1024))#" \
        -e "s#^worker_processes 1;#worker_processes 1;\nworker_rlimit_nofile $((N + 1024));#" \
        "$HERE/conf/nginx.conf.template" >"$dir/nginx.conf"
      nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/server.log" 2>&1 &
      ;;
    insights-proxy)
      proxy_config "$BIN" "$dir/proxy.toml" 1 300 268435456
      "$BIN" --config "$dir/proxy.toml" --listen "127.0.0.1:$PORT" --upstream "http://127.0.0.1:$SIM_PORT" \
        --admin-listen off >"$dir/server.log" 2>&1 &
      ;;
    *) die "unknown server $name" ;;
  esac
  srv=$!; PIDS+=("$srv")
  wait_port "$PORT" "$srv" || die "$name did not start (see $dir/server.log)"
  sleep 0.5 # nginx starts its worker just after the port opens
  curl -fsS --max-time 30 -o /dev/null -H "$AUTH" "http://127.0.0.1:$PORT$HIT_PATH?refresh=blocking"
  curl -fsS --max-time 30 -o /dev/null -H "$AUTH" "http://127.0.0.1:$PORT$HIT_PATH"
  procs=("$srv" $(descendants "$srv"))
  args=()
  for p in "${procs[@]}"; do args+=(--pid "$p"); done
  log "$name: holding $N idle connections (processes ${procs[*]})"
  python3 "$HERE/httpload.py" hold --port "$PORT" --header "$AUTH" --target "$HIT_PATH" -n "$N" \
    --settle "$SETTLE" "${args[@]}" >"$dir/hold.json"
  python3 - "$name" "$dir/hold.json" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY' | tee -a "$summary"
import json, sys
name, d, load = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
for pid, per in d["rss_bytes_per_conn"].items():
    role = open(f"/proc/{pid}/cmdline").read().split("\0")[0] if name == "nginx" else name
    print(f"{role}: {per / 1024:,.1f} KiB per idle connection ({d['held']:,} held of {d['requested']:,}, "
          f"answers {d['statuses']}, {d['body_bytes']:,} B each; RSS {d['rss_kib_before'][pid] / 1024:,.1f} -> "
          f"{d['rss_kib_held'][pid] / 1024:,.1f} MiB; load {load})")
PY
  stop_pid "$srv"; forget "$srv"
  stop_pid "$sim"; forget "$sim"
done
echo "raw: $OUT"
