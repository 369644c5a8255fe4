#!/usr/bin/env bash
# benches/compare.sh: insights-proxy against nginx proxy_cache (and optionally Varnish), each in
# front of the built-in simulated PostHog, on this machine, measured so that it cannot flatter.
#
#   benches/compare.sh [ROUNDS]          # default 5 interleaved rounds; ~1.5 min per server and round
#
# What it does:
#   * installs nginx, wrk, h2load (nghttp2-client), openssl (and varnish when asked for) from Debian
#     packages if missing; builds insights-proxy in release (honours CARGO_TARGET_DIR; skipped when
#     INSIGHTS_PROXY_BIN points at a built binary); makes a self-signed ECDSA P-256 certificate
#     with openssl, used by nginx and insights-proxy alike (TLS 1.3 only on both);
#   * per round and server (order rotated each round): a fresh simulator (`insights-proxy
#     simulate`, on the client core) with two insights saved in it for the hit rows, answers of
#     2.9 KB (1 day, 1 series: the smallest a saved insight gets, its metadata being most of it)
#     and 52 KB (365 days, 4 series; `create_insight` in lib.sh); the server pinned to SERVER_CPU (nginx: one
#     worker with a cleartext and a `listen … ssl http2` listener; insights-proxy: one instance
#     without and one with `[server.tls]`, from the templates in benches/conf/);
#   * hit rows (ROWS): hit-3k and hit-50k (HTTP/1.1, wrk), tls-3k (HTTP/1.1 over TLS, wrk), h2-3k
#     (HTTP/2 over TLS by ALPN, h2load with H2_CLIENTS connections x H2_STREAMS streams). Each
#     fills the entry (`?refresh=blocking`), checks that the answer is a hit, warms up for WARMUP s,
#     then measures DURATION s: hits/s, p50/p99 (wrk --latency; h2load's per-request log), and
#     requests per CPU-second = requests / the server's CPU time (utime+stime of every process of
#     the server over the run, from /proc/<pid>/stat);
#   * latency rows (not in the default ROWS): rate-3k and rate-50k, HTTP/1.1 at a fixed offered load
#     of RATE requests/s in all (h2load --h1 --rps, CONNECTIONS connections, one request in flight
#     each), p50/p99 from its per-request log. The servers then answer the same load below their
#     capacity, so the latencies compare the servers, not how far each is pushed; run them without
#     SERVER_QUOTA, whose pauses would set both p99s;
#   * the load generator must not be the bottleneck: its CPU share (utime+stime of wrk or h2load
#     over the run / wall time / client cores) is recorded per run, and a run where it exceeds
#     MAX_CLIENT_SHARE (0.70) is INVALID: the row is retried (at most RETRIES times) with a
#     further client core (more wrk threads) when the machine has one beside SERVER_CPU and the
#     client cores in use, otherwise with half the connections. Invalid runs are kept in the raw
#     table and left out of medians; the summary says how many valid rounds each row has;
#   * herd test (HTTP/1.1): calculation delay CALC_MS; HERD_N concurrent cold `?refresh=blocking`
#     requests for an insight nobody has cached; upstream calculations (from /_sim/stats) and the
#     slowest answer (send to the kernel's receive timestamp of its last bytes, httpload.py burst);
#   * stale-window test: an insight whose freshness is FRESH_S seconds everywhere (nginx
#     proxy_cache_valid, Varnish beresp.ttl, insights-proxy [staleness.default] minute) is
#     filled, left to go stale, the simulator's clock moved 600 s so the upstream must recalculate
#     (CALC_MS), then STALE_N concurrent requests (insights-proxy: `?refresh=async`; nginx and
#     Varnish: the cached `?refresh=blocking` URL, served stale by use_stale updating / grace): how
#     many answers took >= CALC_MS, and upstream calculations;
#   * prints, per row and server, the median and min–max over valid rounds and the ratio to nginx
#     (median and min–max of the per-round ratios); raw files, hits.tsv and herd.tsv in OUT.
#
# Settings (environment): ROUNDS=5 DURATION=10 WARMUP=3 CONNECTIONS=64 H2_CLIENTS=16 H2_STREAMS=4
# SERVERS="nginx insights-proxy" (add varnish for its HTTP/1.1 rows, herd and stale window; it has
# no TLS) ROWS="hit-3k hit-50k tls-3k h2-3k" (add rate-3k rate-50k) RATE=20000 TESTS="herd stale"
# (empty: hit rows only)
# MAX_CLIENT_SHARE=0.70 RETRIES=2 PROXY_THREADS=1 CALC_MS=200 HERD_N=200 STALE_N=200 FRESH_S=2
# SERVER_CPU=0 CLIENT_CPU=1 (the first client core) BASE_PORT=18000 OUT=/tmp/insights-bench.XXXX
# SMALL="1 1" LARGE="365 4" (days and series of the two insights) HERD_INSIGHT=2 STALE_INSIGHT=14
# RUST_LOG=warn (of the proxy) INSIGHTS_PROXY_BIN (skip the build) NGINX_SENDFILE=on (nginx's
# `sendfile` and `tcp_nopush`, as its packaged nginx.conf sets them; off: its built-in default).
# SERVER_QUOTA (e.g. 0.5; default none): every server (all its processes) runs in a cgroup capped at
# that share of one core (cpu.cfs_quota_us / cpu.max over QUOTA_PERIOD_US=10000 µs), the same cap
# for each. On a machine whose client core cannot outpace a server that has a whole core (2 cores:
# every run INVALID), this makes the server the bottleneck, so the run is valid; requests per
# CPU-second are still the server's own, while hits/s and latency then include the cap's pauses.
# Each run's log line says how often and for how long the cap throttled the server: its p99 is
# those pauses. How long they are depends on when the kernel charges the server's time (at the
# scheduler tick, 4 ms at HZ=250, for a server that never sleeps), not on the server's latency, and
# it changes between runs; compare p99 in the rate rows.
# Before/after a change: ALT_BIN=/path/to/other/insights-proxy SERVERS="nginx insights-proxy
# insights-proxy-alt" runs a second build as the server "insights-proxy-alt", interleaved.
# Only 127.0.0.1 is used; every wait and load is bounded; everything started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
. "$HERE/lib.sh"
ROUNDS=${1:-${ROUNDS:-5}}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-64}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-4}
SERVERS=${SERVERS:-"nginx insights-proxy"}
ROWS=${ROWS:-"hit-3k hit-50k tls-3k h2-3k"}
RATE=${RATE:-20000}
TESTS=${TESTS-"herd stale"}
MAX_CLIENT_SHARE=${MAX_CLIENT_SHARE:-0.70}
RETRIES=${RETRIES:-2}
PROXY_THREADS=${PROXY_THREADS:-1}
CALC_MS=${CALC_MS:-200}
HERD_N=${HERD_N:-200}
STALE_N=${STALE_N:-200}
FRESH_S=${FRESH_S:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SERVER_QUOTA=${SERVER_QUOTA:-}
QUOTA_PERIOD_US=${QUOTA_PERIOD_US:-10000}
BASE_PORT=${BASE_PORT:-18000}
SMALL=${SMALL:-"1 1"}
LARGE=${LARGE:-"365 4"}
HERD_INSIGHT=${HERD_INSIGHT:-2}
STALE_INSIGHT=${STALE_INSIGHT:-14}
export RUST_LOG=${RUST_LOG:-warn}
NGINX_SENDFILE=${NGINX_SENDFILE:-on}
OUT=${OUT:-$(mktemp -d /tmp/insights-bench.XXXXXX)}
mkdir -p "$OUT"

SIM_PORT=$((BASE_PORT + 10))
declare -A PORT=([nginx]=$((BASE_PORT + 81)) [varnish]=$((BASE_PORT + 82)) [insights-proxy]=$((BASE_PORT + 83))
  [insights-proxy-alt]=$((BASE_PORT + 84)))
declare -A TLS_PORT=([nginx]=$((BASE_PORT + 91)) [insights-proxy]=$((BASE_PORT + 93)) [insights-proxy-alt]=$((BASE_PORT + 94)))
AUTH="Authorization: Bearer phx_demo_all"
STALE_PATH="/api/environments/1/insights/$STALE_INSIGHT/"
HERD_PATH="/api/environments/1/insights/$HERD_INSIGHT/"
HZ=$(getconf CLK_TCK)

# --- setup -------------------------------------------------------------------------------------
wants=(nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl taskset:util-linux python3:python3 curl:curl)
[[ " $SERVERS " == *" varnish "* ]] && wants+=(varnishd:varnish)
install_missing "${wants[@]}"
[ "$(nproc)" -ge 2 ] || log "warning: fewer than 2 cores; server and client share a core"
proxy_binary
if [[ " $SERVERS " == *" insights-proxy-alt "* ]]; then
  [ -x "${ALT_BIN:-}" ] || die "insights-proxy-alt needs ALT_BIN=/path/to/another/insights-proxy"
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null \
  || die "openssl could not make a certificate"

# Cores the client may grow onto: every core but the server's and the first client core.
SPARE_CPUS=()
for c in $(seq 0 $(($(nproc) - 1))); do
  [ "$c" -ne "$SERVER_CPU" ] && [ "$c" -ne "$CLIENT_CPU" ] && SPARE_CPUS+=("$c")
done

# --- the simulator -----------------------------------------------------------------------------
SIM_PID=""
SMALL_PATH=""
LARGE_PATH=""
start_sim() { # calc_ms
  taskset -c "$CLIENT_CPU" "$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms "$1" \
    >"$OUT/sim.log" 2>&1 &
  SIM_PID=$!; PIDS+=("$SIM_PID")
  wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start (see $OUT/sim.log)"
  # shellcheck disable=SC2086
  SMALL_PATH="/api/environments/1/insights/$(create_insight "$SIM_PORT" $SMALL)/"
  # shellcheck disable=SC2086
  LARGE_PATH="/api/environments/1/insights/$(create_insight "$SIM_PORT" $LARGE)/"
}
stop_sim() { stop_pid "$SIM_PID"; forget "$SIM_PID"; SIM_PID=""; }
sim() { curl -fsS --max-time 10 -X "$1" "http://127.0.0.1:$SIM_PORT/_sim/$2"; }
sim_calcs() { sim GET stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_calculations"])'; }

# --- the servers -------------------------------------------------------------------------------
SRV_PID=""   # the server: nginx's master, varnishd, or the cleartext insights-proxy
TLS_PID=""   # the insights-proxy instance with [server.tls] (nginx: the same as SRV_PID)
start_proxy() { # bin dir port config -> pid in STARTED
  proxy_config "$1" "$4" "$PROXY_THREADS" "$FRESH_S" 268435456
  if [ "${5:-}" = tls ]; then
    printf '\n[server.tls]\ncert_path = "%s"\nkey_path = "%s"\nmin_version = "1.3"\n' "$OUT/cert.pem" "$OUT/key.pem" >>"$4"
  fi
  taskset -c "$SERVER_CPU" "$1" --config "$4" --listen "127.0.0.1:$3" \
    --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$2/server-$3.log" 2>&1 &
  STARTED=$!; PIDS+=("$STARTED")
  wait_port "$3" "$STARTED" || die "insights-proxy did not start (see $2/server-$3.log)"
}
start_server() { # name dir
  local name=$1 dir=$2 port=${PORT[$1]}
  local fill=(-e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@UPSTREAM_PORT@#$SIM_PORT#g"
    -e "s#@STALE_PATH@#$STALE_PATH#g" -e "s#@FRESH_S@#$FRESH_S#g" -e "s#@SENDFILE@#$NGINX_SENDFILE#g")
  case "$name" in
    nginx)
      # The same server block on a second listener with TLS 1.3 and HTTP/2 (nginx 1.22's syntax).
      sed "${fill[@]}" -e "s#^\( *\)listen 127.0.0.1:$port backlog=4096;#&\n\1listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2 backlog=4096;\n\1ssl_certificate $OUT/cert.pem;\n\1ssl_certificate_key $OUT/key.pem;\n\1ssl_protocols TLSv1.3;#" \
        "$HERE/conf/nginx.conf.template" >"$dir/nginx.conf"
      taskset -c "$SERVER_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/server.log" 2>&1 &
      SRV_PID=$!; PIDS+=("$SRV_PID"); TLS_PID=$SRV_PID
      wait_port "$port" "$SRV_PID" || die "nginx did not start (see $dir/error.log)"
      ;;
    varnish)
      sed "${fill[@]}" "$HERE/conf/varnish.vcl.template" >"$dir/default.vcl"
      taskset -c "$SERVER_CPU" varnishd -F -j none -n "$dir/varnish" -a "127.0.0.1:$port" -T none \
        -f "$dir/default.vcl" -s malloc,256m >"$dir/server.log" 2>&1 &
      SRV_PID=$!; PIDS+=("$SRV_PID"); TLS_PID=""
      wait_port "$port" "$SRV_PID" || die "varnish did not start (see $dir/server.log)"
      ;;
    insights-proxy | insights-proxy-alt)
      local bin=$BIN
      [ "$name" = insights-proxy-alt ] && bin=$ALT_BIN
      start_proxy "$bin" "$dir" "$port" "$dir/proxy.toml"; SRV_PID=$STARTED
      if [[ " $ROWS " == *" tls-"* || " $ROWS " == *" h2-"* ]]; then
        start_proxy "$bin" "$dir" "${TLS_PORT[$name]}" "$dir/proxy-tls.toml" tls; TLS_PID=$STARTED
      fi
      ;;
  esac
  sleep 0.5 # nginx and Varnish start their worker/child just after the port opens
  cap_server
}

# --- SERVER_QUOTA: one CPU cap for every server (cap_join in lib.sh) ---------------------------
cap_server() {
  [ -n "$SERVER_QUOTA" ] || return 0
  cap_join $SRV_PID $TLS_PID $(descendants "$SRV_PID") ${TLS_PID:+$(descendants "$TLS_PID")}
}
uncap() {
  cleanup
  cap_remove
}
trap uncap EXIT
stop_server() {
  local p
  for p in "$SRV_PID" "$TLS_PID"; do
    [ -n "$p" ] || continue
    stop_pid "$p"; forget "$p"
  done
  SRV_PID=""; TLS_PID=""
}

# CPU ticks of a process and its descendants, as "pid ticks" lines.
cpu_snapshot() { # pid
  local p s
  for p in "$1" $(descendants "$1"); do
    s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    s=${s##*) }
    set -- $s
    echo "$p $((${12} + ${13}))"
  done
}
# Seconds of CPU between two snapshots (processes that started meanwhile count from zero).
cpu_delta() {
  python3 - "$1" "$2" "$HZ" <<'PY'
import sys
read = lambda f: dict(map(int, l.split()) for l in open(f) if l.strip())
a, b, hz = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3])
print(f"{sum(t - a.get(p, 0) for p, t in b.items()) / hz:.2f}")
PY
}
# Busy and total ticks of a list of cores (/proc/stat), to see what else ran on them.
core_snapshot() { # "0" or "1,2"
  awk -v list=",$1," 'index(list, "," substr($1, 4) ",") && $1 ~ /^cpu[0-9]/ {b += $2+$3+$4+$7+$8+$9; t += $2+$3+$4+$5+$6+$7+$8+$9}
    END {print b, t}' /proc/stat
}
core_busy() { # before after -> busy fraction
  python3 -c "import sys; a=list(map(int,sys.argv[1].split())); b=list(map(int,sys.argv[2].split())); print(round((b[0]-a[0])/max(1,b[1]-a[1]),2))" "$1" "$2"
}

get() { # url -> the answer's status line and headers
  curl -ksS --max-time 30 -o /dev/null -D - -H "$AUTH" "$1"
}

# run_client FILE CPUS CONNS URL TOOL SECONDS [--latency]: wrk or h2load on the client cores, its
# output in FILE and its "user sys wall" seconds (rusage) in FILE.time.
run_client() {
  local file=$1 cpus=$2 conns=$3 url=$4 tool=$5 secs=$6 threads
  threads=$(($(tr -cd , <<<"$cpus" | wc -c) + 1))
  local TIMEFORMAT='%U %S %R'
  case "$tool" in
    wrk)
      { time taskset -c "$cpus" timeout $((secs + 20)) wrk -t"$threads" -c"$conns" -d"${secs}s" ${7:-} \
        -H "$AUTH" "$url" >"$file" 2>"$file.err"; } 2>"$file.time" ;;
    h2load-rate) # HTTP/1.1, one request at a time per connection, RATE per second in all
      { time taskset -c "$cpus" timeout $((secs + 20)) h2load --h1 -t"$threads" -c"$conns" -m1 \
        --rps="$(((RATE + conns - 1) / conns))" -D"$secs" --log-file="$file.log" -H "$AUTH" "$url" \
        >"$file" 2>"$file.err"; } 2>"$file.time" ;;
    h2load)
      [ "$conns" -ge "$threads" ] || conns=$threads
      { time taskset -c "$cpus" timeout $((secs + 20)) h2load -t"$threads" -c"$conns" -m"$H2_STREAMS" -D"$secs" \
        --log-file="$file.log" -H "$AUTH" "$url" >"$file" 2>"$file.err"; } 2>"$file.time" ;;
  esac
}

# --- one hit row -------------------------------------------------------------------------------
HITS="$OUT/hits.tsv"
printf 'round\tserver\trow\tvalid\tattempt\tconnections\tclient_cpus\tclient_share\tclient_core_busy\thits_per_s\treq_per_cpu_s\tcpu_s\tcpu_util\tcore_busy\tloadavg\trequests\tp50_ms\tp99_ms\tnon2xx\tsock_errors\tresp_bytes\n' >"$HITS"

hit_row() { # server round row dir
  local name=$1 round=$2 row=$3 dir=$4 base pid tool url path conns
  case "$row" in
    hit-*) base="http://127.0.0.1:${PORT[$name]}"; pid=$SRV_PID; tool=wrk; conns=$CONNECTIONS ;;
    rate-*) base="http://127.0.0.1:${PORT[$name]}"; pid=$SRV_PID; tool=h2load-rate; conns=$CONNECTIONS ;;
    tls-*) base="https://127.0.0.1:${TLS_PORT[$name]:-}"; pid=$TLS_PID; tool=wrk; conns=$CONNECTIONS ;;
    h2-*) base="https://127.0.0.1:${TLS_PORT[$name]:-}"; pid=$TLS_PID; tool=h2load; conns=$H2_CLIENTS ;;
    *) die "unknown row $row" ;;
  esac
  [ -n "$pid" ] || { log "  $name: no $row row (no TLS)"; return 0; }
  case "$row" in
    *-3k) path=$SMALL_PATH ;;
    *-50k) path=$LARGE_PATH ;;
    *) die "unknown body size in $row" ;;
  esac
  url="$base$path"
  get "$url?refresh=blocking" >"$dir/$row.fill.headers"
  get "$url" >/dev/null
  get "$url" >"$dir/$row.hit.headers"
  grep -qiE '^(cache-status: .*; hit|x-cache-status: hit|x-cache: hit)' "$dir/$row.hit.headers" \
    || log "warning: $name did not answer a hit on $row (see $dir/$row.hit.headers)"
  grep -qE '^HTTP/[0-9.]+ 200' "$dir/$row.hit.headers" || die "$name did not answer 200 on $row (see $dir/$row.hit.headers)"
  if [[ "$row" == tls-* || "$row" == h2-* ]]; then # what was negotiated, to compare like with like
    openssl s_client -connect "127.0.0.1:${TLS_PORT[$name]}" -alpn "$([ "$tool" = h2load ] && echo h2 || echo http/1.1)" \
      </dev/null 2>/dev/null | grep -aE '^(New, |Protocol|ALPN|Server Temp Key|Peer signature type)' | sort -u >"$dir/$row.tls.txt" || true
    log "  $name $row: $(tr '\n' ';' <"$dir/$row.tls.txt")"
  fi
  local cpus=$CLIENT_CPU spare=("${SPARE_CPUS[@]}") attempt=0
  while :; do
    attempt=$((attempt + 1))
    local f="$dir/$row.$attempt"
    run_client "$f.warmup" "$cpus" "$conns" "$url" "$tool" "$WARMUP"
    local srv0 srv1 cli0 cli1
    srv0=$(core_snapshot "$SERVER_CPU"); cli0=$(core_snapshot "$cpus")
    cpu_snapshot "$pid" >"$f.cpu.before"
    local cap0 cap1; cap0=$(cap_stat)
    run_client "$f" "$cpus" "$conns" "$url" "$tool" "$DURATION" --latency
    cpu_snapshot "$pid" >"$f.cpu.after"
    cap1=$(cap_stat)
    srv1=$(core_snapshot "$SERVER_CPU"); cli1=$(core_snapshot "$cpus")
    local cpu rps requests p50 p99 non2xx errs per share valid threads
    cpu=$(cpu_delta "$f.cpu.before" "$f.cpu.after")
    read -r rps requests p50 p99 non2xx errs per < <(python3 "$HERE/report.py" "$tool" "$f")
    threads=$(($(tr -cd , <<<"$cpus" | wc -c) + 1))
    share=$(python3 -c "u, s, w = map(float, open('$f.time').read().split()); print(round((u + s) / w / $threads, 2))")
    valid=$(python3 -c "print('valid' if $share <= $MAX_CLIENT_SHARE else 'INVALID')")
    local per_cpu util busy cbusy load
    per_cpu=$(python3 -c "print(round($requests / $cpu) if $cpu > 0 else 0)")
    util=$(python3 -c "print(round($cpu / $DURATION, 2))")
    busy=$(core_busy "$srv0" "$srv1"); cbusy=$(core_busy "$cli0" "$cli1")
    load=$(cut -d' ' -f1 /proc/loadavg)
    local throttled="" # how often and how long the cap stopped the server: its pauses set p99
    [ -z "$SERVER_QUOTA" ] || throttled=$(python3 -c "
p0, t0, u0 = map(int, '$cap0'.split()); p1, t1, u1 = map(int, '$cap1'.split())
n = t1 - t0
print(f'; throttled in {n} of {p1 - p0} periods, {(u1 - u0) / max(n, 1) / 1000:.2f} ms each')")
    [ "$non2xx" -eq 0 ] || log "warning: $name $row: $non2xx non-2xx answers"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
      "$round" "$name" "$row" "$valid" "$attempt" "$conns" "$cpus" "$share" "$cbusy" "$rps" "$per_cpu" "$cpu" "$util" \
      "$busy" "$load" "$requests" "$p50" "$p99" "$non2xx" "$errs" "$per" >>"$HITS"
    log "  $name $row: ${rps}/s, ${per_cpu} req/CPU-s, p50 ${p50} ms, p99 ${p99} ms (server cpu ${cpu}s, core busy ${busy};" \
      "client ${share} of ${threads} core(s), ${conns} conns: ${valid}; load ${load}${throttled})"
    [ "$valid" = valid ] && break
    [ "$attempt" -gt "$RETRIES" ] && break
    if [ ${#spare[@]} -gt 0 ]; then
      cpus="$cpus,${spare[0]}"; spare=("${spare[@]:1}")
    elif [ "$conns" -gt 4 ]; then
      conns=$((conns / 2))
    else
      break
    fi
  done
}

# --- herd and stale window ---------------------------------------------------------------------
HERD="$OUT/herd.tsv"
printf 'round\tserver\therd_calcs\therd_ok\therd_max_ms\therd_max_app_ms\tstale_waited\tstale_ok\tstale_max_ms\tstale_calcs\n' >"$HERD"
herd_stale() { # server round dir
  local name=$1 round=$2 dir=$3 port=${PORT[$1]} c0 c1
  local herd='{}' stale='{}' herd_calcs=- stale_calcs=-
  local burst=(python3 "$HERE/httpload.py" burst --port "$port" --header "$AUTH" --threshold-ms "$CALC_MS")
  if [[ " $TESTS " == *" herd "* ]]; then
    # The pause lets anything the load's abrupt disconnects set off settle first.
    sleep 2
    sim POST "calc_delay?ms=$CALC_MS" >/dev/null
    c0=$(sim_calcs)
    herd=$("${burst[@]}" -n "$HERD_N" --target "$HERD_PATH?refresh=blocking")
    sleep 0.3
    c1=$(sim_calcs)
    echo "$herd" >"$dir/herd.json"
    herd_calcs=$((c1 - c0))
  fi
  if [[ " $TESTS " == *" stale "* ]]; then
    sim POST "calc_delay?ms=$CALC_MS" >/dev/null
    get "http://127.0.0.1:$port$STALE_PATH?refresh=blocking" >"$dir/stale-fill.headers"
    get "http://127.0.0.1:$port$STALE_PATH?refresh=blocking" >/dev/null
    sleep "$((FRESH_S + 2))"
    sim POST "clock/advance?seconds=600" >/dev/null
    local target="$STALE_PATH?refresh=blocking"
    [[ "$name" == insights-proxy* ]] && target="$STALE_PATH?refresh=async"
    c0=$(sim_calcs)
    stale=$("${burst[@]}" -n "$STALE_N" --target "$target")
    sleep "$(python3 -c "print($CALC_MS / 1000 * 2 + 0.3)")" # let the background calculation land
    c1=$(sim_calcs)
    echo "$stale" >"$dir/stale.json"
    stale_calcs=$((c1 - c0))
  fi
  local j='import json,sys; d=json.loads(sys.argv[1]); print(*(d.get(k, "-") for k in ("ok", "max_ms", "waited", "max_ms_app")))'
  local hok hmax hwait happ sok smax swait sapp
  read -r hok hmax hwait happ < <(python3 -c "$j" "$herd")
  read -r sok smax swait sapp < <(python3 -c "$j" "$stale")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$herd_calcs" "$hok" "$hmax" "$happ" \
    "$swait" "$sok" "$smax" "$stale_calcs" >>"$HERD"
  [ -z "$TESTS" ] || log "  $name: herd ${herd_calcs} calc(s), slowest ${hmax} ms (read at ${happ} ms);" \
    "stale: ${swait}/${STALE_N} waited >= ${CALC_MS} ms, ${stale_calcs} calc(s)"
}

run_one() { # server round
  local name=$1 round=$2 dir="$OUT/r$2-$1" row
  mkdir -p "$dir"
  log "round $round: $name"
  start_sim 0
  start_server "$name" "$dir"
  for row in $ROWS; do hit_row "$name" "$round" "$row" "$dir"; done
  herd_stale "$name" "$round" "$dir"
  stop_server
  stop_sim
}

read -ra LIST <<<"$SERVERS"
log "out: $OUT; rounds $ROUNDS; ${DURATION}s (+${WARMUP}s warm-up) per row; rows: $ROWS; tests: ${TESTS:-none};" \
  "server on core $SERVER_CPU, client on core $CLIENT_CPU (spare: ${SPARE_CPUS[*]:-none});" \
  "server CPU cap: ${SERVER_QUOTA:-none}; nginx sendfile $NGINX_SENDFILE; binary $BIN"
for round in $(seq 1 "$ROUNDS"); do
  n=${#LIST[@]}
  for i in $(seq 0 $((n - 1))); do
    run_one "${LIST[$(((i + round - 1) % n))]}" "$round"
  done
done
echo
echo "insights-proxy vs nginx: ${DURATION}s x $ROUNDS rounds per row; HTTP/1.1 $CONNECTIONS connections, h2" \
  "$H2_CLIENTS x $H2_STREAMS streams; server on core $SERVER_CPU (CPU cap: ${SERVER_QUOTA:-none}), client from core $CLIENT_CPU; a run is valid" \
  "when the client used <= $MAX_CLIENT_SHARE of its cores; herd $HERD_N x ${CALC_MS} ms; stale window $STALE_N requests"
python3 "$HERE/report.py" summary "$OUT"
echo "raw: $OUT"
