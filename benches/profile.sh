#!/usr/bin/env bash
# benches/profile.sh: where a cache hit's CPU goes, in numbers that do not depend on machine noise.
#
#   benches/profile.sh                   # callgrind: instructions per hit for insights-proxy and nginx
#
# 1. callgrind (user-space instructions, stable to ~1 % between runs): the server runs under
#    `valgrind --tool=callgrind --instr-atstart=no`, pinned to SERVER_CPU; the hit insight is filled,
#    wrk warms up, instrumentation is switched on (callgrind_control -i on), wrk runs DURATION s with 8
#    connections, instrumentation off, dump. Instructions per request = total Ir / wrk's requests.
#    Writes callgrind_annotate's exclusive and inclusive top lists to OUT. nginx (master_process
#    off, same template as compare.sh) is measured the same way for reference.
# 2. perf (if `perf` is installed): `perf record -e cpu-clock -g` of the release proxy under wrk
#    (64 connections), split by kernel / binary / libc and top symbols. cpu-clock works without
#    hardware counters (this VM has none: `perf stat -e instructions true` says <not supported>).
# 3. user and kernel work per hit of each target under wrk (64 connections, no valgrind):
#    `perf stat -e instructions:u,instructions:k` where the machine has hardware counters (checked
#    with `perf stat -e instructions:u,instructions:k true`; the summary says when it has none), and
#    always user and kernel CPU time per hit from /proc/<pid>/stat.
# 4. strace -c of the proxy under wrk: system calls per request (one write per answer).
#
# Settings (environment): TARGETS="insights-proxy nginx" DURATION=10 PROXY_LOG=warn (RUST_LOG of the
# profiled proxy; "info" logs one line per request, as the default) PERF=1 STRACE=1 HIT_INSIGHT=3k (the
# 2.9 KB insight of compare.sh's hit-3k row; 50k its 52 KB one; DAYSxSERIES a daily trends insight of
# that many days and series, e.g. 120x4: 17 KB; or an insight id, e.g. 11: 4.8 KB)
# SENDFILE_MIN_BYTES ([cache] sendfile_min_bytes of the proxy; unset: its default) NGINX_SENDFILE=on
# (nginx's sendfile and tcp_nopush; off: its built-in default)
# SERVER_CPU=0 CLIENT_CPU=1 BASE_PORT=18200 INSIGHTS_PROXY_BIN (skip the build) OUT=/tmp/insights-profile.XXXX.
# Installs valgrind (and linux-perf, strace) with apt-get when missing. Only 127.0.0.1; every run is
# bounded; everything started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
TARGETS=${TARGETS:-"insights-proxy nginx"}
DURATION=${DURATION:-10}
PROXY_LOG=${PROXY_LOG:-warn}
PERF=${PERF:-1}
STRACE=${STRACE:-1}
HIT_INSIGHT=${HIT_INSIGHT:-3k}
SENDFILE_MIN_BYTES=${SENDFILE_MIN_BYTES:-}
NGINX_SENDFILE=${NGINX_SENDFILE:-on}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-18200}
OUT=${OUT:-$(mktemp -d /tmp/insights-profile.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PORT=$((BASE_PORT + 83))
AUTH="Authorization: Bearer phx_demo_all"
HIT_PATH="" # set by start_sim

STOP_WAIT_TENTHS=100 # valgrind writes its profile on SIGTERM
. "$HERE/lib.sh"

wants=(valgrind:valgrind wrk:wrk curl:curl)
[[ " $TARGETS " == *" nginx "* ]] && wants+=(nginx:nginx)
[ "$PERF" = 1 ] && wants+=(perf:linux-perf)
[ "$STRACE" = 1 ] && wants+=(strace:strace)
install_missing "${wants[@]}" || log "warning: install failed"
proxy_binary

start_sim() {
  "$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0 >"$OUT/sim.log" 2>&1 &
  SIM_PID=$!; PIDS+=("$SIM_PID")
  wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start"
  case "$HIT_INSIGHT" in
    3k) HIT_PATH="/api/environments/1/insights/$(create_insight "$SIM_PORT" 1 1)/" ;;
    50k) HIT_PATH="/api/environments/1/insights/$(create_insight "$SIM_PORT" 365 4)/" ;;
    *x*) HIT_PATH="/api/environments/1/insights/$(create_insight "$SIM_PORT" "${HIT_INSIGHT%x*}" "${HIT_INSIGHT#*x}")/" ;;
    *) HIT_PATH="/api/environments/1/insights/$HIT_INSIGHT/" ;;
  esac
}

# start_server NAME WRAPPER... : the server pinned to SERVER_CPU, under the given wrapper command.
start_server() {
  local name=$1; shift
  local dir="$OUT/$name"
  mkdir -p "$dir"
  case "$name" in
    insights-proxy)
      proxy_config "$BIN" "$dir/proxy.toml" 1 300 268435456
      RUST_LOG=$PROXY_LOG taskset -c "$SERVER_CPU" "$@" "$BIN" --config "$dir/proxy.toml" --listen "127.0.0.1:$PORT" \
        --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$dir/server.out" 2>"$dir/server.err" &
      ;;
    nginx)
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$PORT#g" -e "s#@UPSTREAM_PORT@#$SIM_PORT#g" -e "s#@STALE_PATH@#/none/#g" \
        -e "s#@FRESH_S@#2#g" -e "s#@SENDFILE@#$NGINX_SENDFILE#g" -e "s#master_process on#master_process off#" "$HERE/conf/nginx.conf.template" >"$dir/nginx.conf"
      taskset -c "$SERVER_CPU" "$@" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/server.out" 2>"$dir/server.err" &
      ;;
  esac
  SRV_PID=$!; PIDS+=("$SRV_PID")
  local i
  for i in 1 2; do wait_port "$PORT" "$SRV_PID" && break; done # valgrind starts slowly
  kill -0 "$SRV_PID" 2>/dev/null || die "$name did not start (see $dir)"
  curl -fsS --max-time 30 -o /dev/null -H "$AUTH" "http://127.0.0.1:$PORT$HIT_PATH?refresh=blocking"
  curl -fsS --max-time 30 -o /dev/null -H "$AUTH" "http://127.0.0.1:$PORT$HIT_PATH"
}

wrk_run() { # seconds connections file
  taskset -c "$CLIENT_CPU" timeout $(($1 + 30)) wrk -t1 -c"$2" -d"$1s" -H "$AUTH" "http://127.0.0.1:$PORT$HIT_PATH" >"$3"
  awk '/requests in/ {print $1}' "$3"
}

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
start_sim

for name in $TARGETS; do
  log "callgrind: $name"
  start_server "$name" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$name/callgrind.out"
  wrk_run 3 8 "$OUT/$name/warmup.txt" >/dev/null
  sleep 1
  callgrind_control -i on "$SRV_PID" >/dev/null
  n=$(wrk_run "$DURATION" 8 "$OUT/$name/wrk.txt")
  callgrind_finish "$SRV_PID" "$OUT/$name"; ir=$CALLGRIND_IR
  per=$(python3 -c "print(round($ir / max(1, $n)))")
  echo "$name: $per instructions per hit ($ir Ir / $n requests, user space, callgrind)" | tee -a "$SUMMARY"
done

# User and kernel work per hit, for each target under the same load (64 connections, no valgrind):
# hardware instruction counters where the machine has them, CPU time from /proc/<pid>/stat always.
COUNTERS=0
if command -v perf >/dev/null; then
  perf stat -x, -e instructions:u,instructions:k true 2>"$OUT/perf-check.txt" >/dev/null || true
  grep -q '^[0-9]' "$OUT/perf-check.txt" && COUNTERS=1
fi
[ "$COUNTERS" = 1 ] || echo "perf stat -e instructions:u,instructions:k: not supported on this machine (no hardware" \
  "counters, or perf missing): kernel instructions per hit not measured; CPU time per hit below instead" | tee -a "$SUMMARY"
HZ=$(getconf CLK_TCK)
ticks() { local s; s=$(cat "/proc/$1/stat"); s=${s##*) }; set -- $s; echo "${12} ${13}"; }
for name in $TARGETS; do
  log "CPU per hit: $name"
  start_server "$name"
  wrk_run 3 64 "$OUT/$name/cpu-warmup.txt" >/dev/null
  read -r u0 k0 < <(ticks "$SRV_PID")
  if [ "$COUNTERS" = 1 ]; then
    timeout $((DURATION + 20)) perf stat -x, -e instructions:u,instructions:k -p "$SRV_PID" -o "$OUT/$name/counters.txt" \
      -- sleep "$DURATION" &
    PS=$!; PIDS+=("$PS")
  fi
  n=$(wrk_run "$DURATION" 64 "$OUT/$name/cpu-wrk.txt")
  read -r u1 k1 < <(ticks "$SRV_PID")
  counted=""
  if [ "$COUNTERS" = 1 ]; then
    wait "$PS" 2>/dev/null || true
    counted=$(awk -F, -v n="$n" '$3 ~ /instructions/ {printf "; %s %.0f per hit", $3, $1 / n}' "$OUT/$name/counters.txt")
  fi
  stop_pid "$SRV_PID"
  python3 -c "import sys; u, k, n, hz = map(float, sys.argv[1:5]); print(f'{sys.argv[5]}: user {u / hz / n * 1e6:.2f} µs, kernel {k / hz / n * 1e6:.2f} µs of CPU per hit ({n:.0f} hits in $DURATION s, 64 connections, /proc/<pid>/stat){sys.argv[6]}')" \
    "$((u1 - u0))" "$((k1 - k0))" "$n" "$HZ" "$name" "$counted" | tee -a "$SUMMARY"
done

if [[ " $TARGETS " == *" insights-proxy "* ]] && [ "$STRACE" = 1 ] && command -v strace >/dev/null; then
  log "strace: system calls per request"
  start_server insights-proxy
  timeout $((DURATION + 10)) strace -c -f -p "$SRV_PID" -o "$OUT/strace.txt" &
  ST=$!; PIDS+=("$ST")
  sleep 1
  n=$(wrk_run 3 8 "$OUT/strace-wrk.txt")
  kill -INT "$ST" 2>/dev/null || true
  wait "$ST" 2>/dev/null || true
  stop_pid "$SRV_PID"
  python3 - "$OUT/strace.txt" "$n" <<'EOF' | tee -a "$SUMMARY"
import sys
n = int(sys.argv[2])
calls = {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) >= 5 and p[3].isdigit():
        calls[p[-1]] = int(p[3])
top = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:5] if k != "total")
print(f"insights-proxy system calls per request: {top}")
EOF
fi

if [[ " $TARGETS " == *" insights-proxy "* ]] && [ "$PERF" = 1 ] && command -v perf >/dev/null; then
  log "perf: kernel/user split under wrk (64 connections)"
  start_server insights-proxy
  timeout 40 perf record -e cpu-clock -F 2000 -g -p "$SRV_PID" -o "$OUT/perf.data" -- sleep "$((DURATION + 1))" \
    >"$OUT/perf.log" 2>&1 &
  PF=$!; PIDS+=("$PF")
  sleep 0.5
  wrk_run "$DURATION" 64 "$OUT/perf-wrk.txt" >/dev/null
  wait "$PF" 2>/dev/null || true
  stop_pid "$SRV_PID"
  perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' \
    >"$OUT/perf-dso.txt" || true
  perf report -i "$OUT/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' \
    | head -40 >"$OUT/perf-sym.txt" || true
  echo "perf (cpu-clock) split: $(head -4 "$OUT/perf-dso.txt" | awk '{printf "%s %s; ", $2, $1}')" | tee -a "$SUMMARY"
fi

echo
echo "Top exclusive costs (insights-proxy):"
grep -E '^ *[0-9,]+ \(' "$OUT/insights-proxy/exclusive.txt" 2>/dev/null | sed -n 2,26p | cut -c1-170 || true
echo
echo "Top inclusive costs (insights-proxy):"
grep -E '^ *[0-9,]+ \(' "$OUT/insights-proxy/inclusive.txt" 2>/dev/null | sed -n 2,50p | cut -c1-170 || true
echo
cat "$SUMMARY"
echo "raw: $OUT"
