#!/usr/bin/env bash
# benches/compare.sh: insights-proxy against nginx proxy_cache and Varnish, each in front of the
# built-in simulated PostHog, on this machine.
#
#   benches/compare.sh [ROUNDS]          # default 3 interleaved rounds; about 1 min per server and round
#
# What it does:
#   * installs nginx, varnish and wrk from Debian packages if missing (apt-get update; apt-get
#     install -y nginx varnish wrk), builds insights-proxy in release (honours CARGO_TARGET_DIR;
#     skipped when INSIGHTS_PROXY_BIN points at a built binary);
#   * per round and server (order rotated each round): starts a fresh simulator
#     (`insights-proxy simulate`, pinned to core CLIENT_CPU) and the server pinned to core SERVER_CPU
#     (`taskset -c 0`), from the templates in benches/conf/;
#   * hit test: fills the cache with `?refresh=blocking`, then wrk on core CLIENT_CPU with
#     CONNECTIONS keep-alive connections for WARMUP s (discarded), then DURATION s with --latency,
#     against the insight URL without `refresh` (every answer a hit). Reports hits/s, p50/p99, and
#     requests per CPU-second: wrk's request count / the server's CPU time (utime+stime from
#     /proc/<pid>/stat of every process of the server: nginx master+workers, Varnish manager+child)
#     over the measured run;
#   * herd test: calculation delay CALC_MS; HERD_N concurrent cold `?refresh=blocking` requests for
#     an insight nobody has cached; upstream calculations (from /_sim/stats) and the slowest answer
#     (send to the kernel's receive timestamp of its last bytes, benches/httpload.py burst; the
#     moment the single-threaded client got round to reading it is reported beside it);
#   * stale-window test: an insight whose freshness is FRESH_S seconds everywhere (nginx
#     proxy_cache_valid, Varnish beresp.ttl, insights-proxy [staleness.default] minute; it is a
#     minute-interval insight) is filled, left to go stale, the simulator's clock is moved 600 s so
#     the upstream must really recalculate (CALC_MS), then STALE_N concurrent requests
#     (insights-proxy: `?refresh=async`, its stale-while-revalidate mode; nginx and Varnish: the
#     cached `?refresh=blocking` URL, served stale by use_stale updating / grace): how many answers
#     took >= CALC_MS, and upstream calculations;
#   * prints per-server medians over rounds and ratios to nginx; raw files and results.tsv in OUT.
#
# Settings (environment): ROUNDS=3 DURATION=10 WARMUP=3 CONNECTIONS=64 SERVERS="nginx varnish
# insights-proxy" PROXY_THREADS=1 CALC_MS=200 HERD_N=200 STALE_N=200 FRESH_S=2 SERVER_CPU=0
# CLIENT_CPU=1 BASE_PORT=18000 OUT=/tmp/insights-bench.XXXX HIT_INSIGHT=11 (its answer is 4.78 KB;
# "auto" picks the project-1 insight closest to 4.8 KB) HERD_INSIGHT=2 STALE_INSIGHT=14
# RUST_LOG=warn (of the proxy; "info" logs a line per request) INSIGHTS_PROXY_BIN (skip the build).
# Before/after a change: ALT_BIN=/path/to/other/insights-proxy SERVERS="nginx insights-proxy
# insights-proxy-alt" runs a second build as the server "insights-proxy-alt", interleaved.
# Only 127.0.0.1 is used; every wait and load is bounded; everything started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ROUNDS=${1:-${ROUNDS:-3}}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-64}
SERVERS=${SERVERS:-"nginx varnish insights-proxy"}
PROXY_THREADS=${PROXY_THREADS:-1}
CALC_MS=${CALC_MS:-200}
HERD_N=${HERD_N:-200}
STALE_N=${STALE_N:-200}
FRESH_S=${FRESH_S:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-18000}
HIT_INSIGHT=${HIT_INSIGHT:-11}
HERD_INSIGHT=${HERD_INSIGHT:-2}
STALE_INSIGHT=${STALE_INSIGHT:-14}
export RUST_LOG=${RUST_LOG:-warn}
OUT=${OUT:-$(mktemp -d /tmp/insights-bench.XXXXXX)}
mkdir -p "$OUT"

SIM_PORT=$((BASE_PORT + 10))
declare -A PORT=([nginx]=$((BASE_PORT + 81)) [varnish]=$((BASE_PORT + 82)) [insights-proxy]=$((BASE_PORT + 83))
  [insights-proxy-alt]=$((BASE_PORT + 84)))
AUTH="Authorization: Bearer phx_demo_all"
STALE_PATH="/api/environments/1/insights/$STALE_INSIGHT/"
HERD_PATH="/api/environments/1/insights/$HERD_INSIGHT/"
HZ=$(getconf CLK_TCK)

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes: everything started is recorded and stopped by PID -----------------------------
PIDS=()
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop_pid() {
  local pid=$1 p i
  kill -0 "$pid" 2>/dev/null || return 0
  local tree=("$pid" $(descendants "$pid"))
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  for p in "${tree[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
forget() { local keep=() p; for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done; PIDS=("${keep[@]}"); }

wait_port() { # port pid
  local i
  for i in $(seq 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# --- setup -------------------------------------------------------------------------------------
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || need+=(varnish)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v cmake >/dev/null 2>&1 || [ -n "${INSIGHTS_PROXY_BIN:-}" ] || need+=(cmake)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
for t in taskset python3 curl nginx varnishd wrk; do command -v "$t" >/dev/null || die "$t not found"; done
[ "$(nproc)" -ge 2 ] || log "warning: fewer than 2 cores; server and client share a core"

if [ -n "${INSIGHTS_PROXY_BIN:-}" ]; then
  BIN=$INSIGHTS_PROXY_BIN
else
  log "building insights-proxy (release)"
  (cd "$ROOT" && cargo build --release --quiet --bin insights-proxy)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/insights-proxy
fi
[ -x "$BIN" ] || die "no binary at $BIN"
if [[ " $SERVERS " == *" insights-proxy-alt "* ]]; then
  [ -x "${ALT_BIN:-}" ] || die "insights-proxy-alt needs ALT_BIN=/path/to/another/insights-proxy"
fi

# --- the simulator -----------------------------------------------------------------------------
SIM_PID=""
start_sim() { # calc_ms
  taskset -c "$CLIENT_CPU" "$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms "$1" \
    >"$OUT/sim.log" 2>&1 &
  SIM_PID=$!; PIDS+=("$SIM_PID")
  wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start (see $OUT/sim.log)"
}
stop_sim() { stop_pid "$SIM_PID"; forget "$SIM_PID"; SIM_PID=""; }
sim() { curl -fsS --max-time 10 -X "$1" "http://127.0.0.1:$SIM_PORT/_sim/$2"; }
sim_calcs() { sim GET stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_calculations"])'; }

# The insight whose answer is closest to 4.8 KB (project 1; not minute-interval, which go stale
# after FRESH_S in the proxy's benchmark configuration).
if [ "$HIT_INSIGHT" = auto ]; then
  start_sim 0
  best=""; bestd=999999
  for id in $(seq 1 20); do
    [ $(((id - 1) % 10)) -eq 3 ] && continue
    [ "$id" -eq "$HERD_INSIGHT" ] && continue
    n=$(curl -fsS --max-time 10 -o /dev/null -w '%{size_download}' -H "$AUTH" \
      "http://127.0.0.1:$SIM_PORT/api/environments/1/insights/$id/?refresh=blocking")
    d=$((n > 4800 ? n - 4800 : 4800 - n))
    if [ "$d" -lt "$bestd" ]; then best=$id; bestd=$d; fi
  done
  stop_sim
  HIT_INSIGHT=$best
fi
HIT_PATH="/api/environments/1/insights/$HIT_INSIGHT/"

# --- the servers -------------------------------------------------------------------------------
SRV_PID=""
start_server() { # name dir
  local name=$1 dir=$2 port=${PORT[$1]}
  local fill=(-e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@UPSTREAM_PORT@#$SIM_PORT#g"
    -e "s#@STALE_PATH@#$STALE_PATH#g" -e "s#@FRESH_S@#$FRESH_S#g" -e "s#@THREADS@#$PROXY_THREADS#g"
    -e "s#@MAX_BYTES@#268435456#g")
  case "$name" in
    nginx)
      sed "${fill[@]}" "$HERE/conf/nginx.conf.template" >"$dir/nginx.conf"
      taskset -c "$SERVER_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/server.log" 2>&1 &
      ;;
    varnish)
      sed "${fill[@]}" "$HERE/conf/varnish.vcl.template" >"$dir/default.vcl"
      taskset -c "$SERVER_CPU" varnishd -F -j none -n "$dir/varnish" -a "127.0.0.1:$port" -T none \
        -f "$dir/default.vcl" -s malloc,256m >"$dir/server.log" 2>&1 &
      ;;
    insights-proxy | insights-proxy-alt)
      local bin=$BIN
      [ "$name" = insights-proxy-alt ] && bin=$ALT_BIN
      sed "${fill[@]}" "$HERE/conf/insights-proxy.toml.template" >"$dir/proxy.toml"
      if ! "$bin" --check-config --config "$dir/proxy.toml" >/dev/null 2>&1; then
        sed -i '/BUDGET-BEGIN/,/BUDGET-END/d' "$dir/proxy.toml" # a build without [budget]
      fi
      taskset -c "$SERVER_CPU" "$bin" --config "$dir/proxy.toml" --listen "127.0.0.1:$port" \
        --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$dir/server.log" 2>&1 &
      ;;
  esac
  SRV_PID=$!; PIDS+=("$SRV_PID")
  wait_port "$port" "$SRV_PID" || die "$name did not start (see $dir/server.log)"
  sleep 0.5 # nginx and Varnish start their worker/child just after the port opens
}
stop_server() { stop_pid "$SRV_PID"; forget "$SRV_PID"; SRV_PID=""; }

# CPU ticks of every process of the server, as "pid ticks" lines.
cpu_snapshot() {
  local p s
  for p in "$SRV_PID" $(descendants "$SRV_PID"); do
    s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    s=${s##*) }
    set -- $s
    echo "$p $((${12} + ${13}))"
  done
}
# Seconds of CPU between two snapshots (processes that started meanwhile count from zero).
cpu_delta() {
  python3 - "$1" "$2" "$HZ" <<'EOF'
import sys
read = lambda f: dict(map(int, l.split()) for l in open(f) if l.strip())
a, b, hz = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3])
print(f"{sum(t - a.get(p, 0) for p, t in b.items()) / hz:.2f}")
EOF
}

# Busy and total ticks of the server's core (/proc/stat), to see what else ran on it.
core_snapshot() { awk -v c="cpu$SERVER_CPU" '$1 == c {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
core_busy() { # before after -> busy fraction of the core
  python3 -c "import sys; a=list(map(int,sys.argv[1].split())); b=list(map(int,sys.argv[2].split())); print(round((b[0]-a[0])/max(1,b[1]-a[1]),2))" "$1" "$2"
}

get() { # port target -> the answer's headers
  curl -sS --max-time 30 -o /dev/null -D - -H "$AUTH" "http://127.0.0.1:$1$2"
}

# --- one server, one round ---------------------------------------------------------------------
printf 'round\tserver\thits_per_s\treq_per_cpu_s\tcpu_s\tcpu_util\tcore_busy\tloadavg\trequests\tp50_ms\tp99_ms\tnon2xx\tsock_errors\tresp_bytes\therd_calcs\therd_ok\therd_max_ms\therd_max_app_ms\tstale_waited\tstale_ok\tstale_max_ms\tstale_calcs\n' >"$OUT/results.tsv"

run_one() { # server round
  local name=$1 round=$2 port=${PORT[$1]} dir="$OUT/r$2-$1"
  mkdir -p "$dir"
  log "round $round: $name"
  start_sim "$CALC_MS"
  start_server "$name" "$dir"

  # Hit test.
  get "$port" "$HIT_PATH?refresh=blocking" >"$dir/fill.headers"
  get "$port" "$HIT_PATH" >/dev/null
  get "$port" "$HIT_PATH" >"$dir/hit.headers"
  grep -qiE '^(cache-status: .*; hit|x-cache-status: hit|x-cache: hit)' "$dir/hit.headers" \
    || log "warning: $name did not answer a hit (see $dir/hit.headers)"
  grep -q ' 200' "$dir/hit.headers" || die "$name did not answer 200 (see $dir/hit.headers)"
  taskset -c "$CLIENT_CPU" timeout $((WARMUP + 20)) wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -H "$AUTH" \
    "http://127.0.0.1:$port$HIT_PATH" >"$dir/warmup.txt"
  local core0 core1
  core0=$(core_snapshot)
  cpu_snapshot >"$dir/cpu.before"
  taskset -c "$CLIENT_CPU" timeout $((DURATION + 20)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -H "$AUTH" "http://127.0.0.1:$port$HIT_PATH" >"$dir/wrk.txt"
  cpu_snapshot >"$dir/cpu.after"
  core1=$(core_snapshot)
  local busy load
  busy=$(core_busy "$core0" "$core1")
  load=$(cut -d' ' -f1 /proc/loadavg)
  local cpu rps requests p50 p99 non2xx errs per
  cpu=$(cpu_delta "$dir/cpu.before" "$dir/cpu.after")
  read -r rps requests p50 p99 non2xx errs per < <(python3 "$HERE/report.py" wrk "$dir/wrk.txt")
  local per_cpu util
  per_cpu=$(python3 -c "print(round($requests / $cpu) if $cpu > 0 else 0)")
  util=$(python3 -c "print(round($cpu / $DURATION, 2))")
  [ "$non2xx" -eq 0 ] || log "warning: $name: $non2xx non-2xx answers under wrk"

  # Herd test. The pause lets anything wrk's abrupt disconnects set off settle first (insights-proxy
  # 0fa6b09 counts them against its upstream circuit breaker, which then opens for a second).
  sleep 2
  sim POST "calc_delay?ms=$CALC_MS" >/dev/null
  local c0 c1 herd
  c0=$(sim_calcs)
  herd=$(python3 "$HERE/httpload.py" burst --port "$port" --header "$AUTH" -n "$HERD_N" \
    --threshold-ms "$CALC_MS" --target "$HERD_PATH?refresh=blocking")
  sleep 0.3
  c1=$(sim_calcs)
  echo "$herd" >"$dir/herd.json"
  local herd_calcs=$((c1 - c0))

  # Stale-window test.
  get "$port" "$STALE_PATH?refresh=blocking" >"$dir/stale-fill.headers"
  get "$port" "$STALE_PATH?refresh=blocking" >/dev/null
  sleep "$((FRESH_S + 2))"
  sim POST "clock/advance?seconds=600" >/dev/null
  local target="$STALE_PATH?refresh=blocking" stale
  [[ "$name" == insights-proxy* ]] && target="$STALE_PATH?refresh=async"
  c0=$(sim_calcs)
  stale=$(python3 "$HERE/httpload.py" burst --port "$port" --header "$AUTH" -n "$STALE_N" \
    --threshold-ms "$CALC_MS" --target "$target")
  sleep "$(python3 -c "print($CALC_MS / 1000 * 2 + 0.3)")" # let the background calculation land
  c1=$(sim_calcs)
  echo "$stale" >"$dir/stale.json"
  local stale_calcs=$((c1 - c0))

  stop_server
  stop_sim
  local j='import json,sys; d=json.loads(sys.argv[1]); print(d["ok"], d["max_ms"], d["waited"], d.get("max_ms_app", "-"))'
  local hok hmax hwait happ sok smax swait sapp
  read -r hok hmax hwait happ < <(python3 -c "$j" "$herd")
  read -r sok smax swait sapp < <(python3 -c "$j" "$stale")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$round" "$name" "$rps" "$per_cpu" "$cpu" "$util" "$busy" "$load" "$requests" "$p50" "$p99" "$non2xx" "$errs" "$per" \
    "$herd_calcs" "$hok" "$hmax" "$happ" "$swait" "$sok" "$smax" "$stale_calcs" >>"$OUT/results.tsv"
  log "  $name: ${rps} hits/s, ${per_cpu} req/CPU-s (server cpu ${cpu}s, core busy ${busy}, load ${load}), p50 ${p50} ms, p99 ${p99} ms;" \
    "herd ${herd_calcs} calc(s), slowest ${hmax} ms (read by the client at ${happ} ms); stale: ${swait}/${STALE_N} waited >= ${CALC_MS} ms, ${stale_calcs} calc(s)"
}

read -ra LIST <<<"$SERVERS"
log "out: $OUT; rounds $ROUNDS; ${DURATION}s (+${WARMUP}s warm-up), $CONNECTIONS connections; hit insight $HIT_INSIGHT," \
  "herd insight $HERD_INSIGHT, stale insight $STALE_INSIGHT; binary $BIN"
for round in $(seq 1 "$ROUNDS"); do
  n=${#LIST[@]}
  for i in $(seq 0 $((n - 1))); do
    run_one "${LIST[$(((i + round - 1) % n))]}" "$round"
  done
done
echo
echo "insights-proxy vs nginx vs Varnish: hit insight $HIT_INSIGHT, ${DURATION}s x $ROUNDS rounds, $CONNECTIONS connections," \
  "server on core $SERVER_CPU, wrk on core $CLIENT_CPU; herd $HERD_N x ${CALC_MS} ms; stale window $STALE_N requests"
python3 "$HERE/report.py" summary "$OUT/results.tsv"
echo "raw: $OUT"
