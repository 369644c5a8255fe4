#!/usr/bin/env bash
# benches/listpage.sh: list-page hits (`GET /insights/?limit=N`, every member cached and the page
# itself kept: `Cache-Status: ...; detail=list-page`) against nginx serving the same bytes as a
# static file, for pages of 10, 50 and 100 insights.
#
#   INSIGHTS_PROXY_BIN=target/release/insights-proxy benches/listpage.sh
#   INSIGHTS_PROXY_BIN=/tmp/new COMPARE_BIN=/tmp/base RUNS=5 benches/listpage.sh   # two builds side by side
#   INSIGHTS_PROXY_BIN=/tmp/new CALLGRIND=1 SIZES=50 benches/listpage.sh           # instructions per hit
#
# The simulator is given 100 insights in project 1 besides its seeded ones, each listed as
# ITEM_BYTES of compact JSON (a `select 1` HogQL insight whose description pads it to that size;
# 2 440 B makes the 50-item page ~122 KB), and the pages start after the seeded insights
# (`offset`), so a page of N items is ~N x ITEM_BYTES. ITEM_BYTES=0 gives the pages measured before
# 2026-12-06 instead: the seeded insights plus copies of the smallest one's query (~5 KB each).
# The proxy fills every entry with one `refresh=blocking` read of each page, then for each page
# size and round: the page's answer is saved as nginx's static file, and each server (pinned to
# SERVER_CPU, one worker thread / process) gets `wrk -t1 -cCONNS -dDURATION` from CLIENT_CPU.
# Reported per server: requests/s and requests per CPU-second of the server (utime+stime from
# /proc), medians and min-max over RUNS interleaved rounds, the ratio of the medians per CPU-second
# to nginx's, and the load generator's share of its core (a round above 70 % was limited by wrk, not
# the server: flagged). Raw wrk output and results.tsv (one row per round) in OUT.
#
# CALLGRIND=1: instead, the proxy runs under `valgrind --tool=callgrind` (instrumentation on only
# while wrk runs DURATION s with 8 connections), once per size: user-space instructions per
# list-page hit, and callgrind_annotate's exclusive and inclusive lists in OUT/callgrind-N.
#
# Settings (environment): SIZES="10 50 100" ITEM_BYTES=2440 RUNS=3 DURATION=10 CONNS=16
# SERVER_CPU=0 CLIENT_CPU=1 BASE_PORT=18400 INSIGHTS_PROXY_BIN (skip the build) COMPARE_BIN (a second
# build, measured the same way) CALLGRIND=0 SENDFILE_MIN_BYTES ([cache] sendfile_min_bytes;
# unset: the default) NGINX_SENDFILE=on (nginx's sendfile and tcp_nopush, as
# its packaged nginx.conf sets them; off: its built-in default) OUT=/tmp/insights-listpage.XXXX. Installs wrk, nginx (and
# valgrind) with apt-get when missing. Only 127.0.0.1; every run is bounded; everything started is
# stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SIZES=${SIZES:-"10 50 100"}
ITEM_BYTES=${ITEM_BYTES:-2440}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-16}
CALLGRIND=${CALLGRIND:-0}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-18400}
NGINX_SENDFILE=${NGINX_SENDFILE:-on}
OUT=${OUT:-$(mktemp -d /tmp/insights-listpage.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PORT=$((BASE_PORT + 83))
NGINX_PORT=$((BASE_PORT + 84))
COMPARE_PORT=$((BASE_PORT + 85))
AUTH="Authorization: Bearer phx_demo_all"
LIST="/api/environments/1/insights/"
HZ=$(getconf CLK_TCK)

STOP_WAIT_TENTHS=100 # valgrind writes its profile on SIGTERM
. "$HERE/lib.sh"

wants=(wrk:wrk nginx:nginx curl:curl)
[ "$CALLGRIND" = 1 ] && wants+=(valgrind:valgrind)
install_missing "${wants[@]}" || log "warning: install failed"
proxy_binary

# CPU seconds (utime + stime) of a process so far.
cpu_of() {
  local s
  s=$(cat "/proc/$1/stat")
  s=${s##*) }
  set -- $s
  python3 -c "print((${12} + ${13}) / $HZ)"
}

# bench NAME PID URL [HEADER]: wrk against URL; prints "requests/s requests-per-CPU-second
# server-CPU-share wrk-CPU-share".
bench() {
  local name=$1 pid=$2 url=$3 header=${4:-} before after n wrk_cpu
  local args=(-t1 -c"$CONNS" -d"${DURATION}s")
  [ -n "$header" ] && args+=(-H "$header")
  taskset -c "$CLIENT_CPU" timeout 10 wrk -t1 -c"$CONNS" -d2s ${header:+-H "$header"} "$url" >/dev/null # warm-up
  before=$(cpu_of "$pid")
  local TIMEFORMAT='%U %S'
  wrk_cpu=$({ time taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) wrk "${args[@]}" "$url" >"$OUT/$name.wrk"; } 2>&1)
  after=$(cpu_of "$pid")
  n=$(awk '/requests in/ {print $1}' "$OUT/$name.wrk")
  grep -q "Non-2xx" "$OUT/$name.wrk" && die "$name: non-2xx answers (see $OUT/$name.wrk)"
  python3 -c "c = $after - $before; w = sum(map(float, '$wrk_cpu'.split())); print(round($n / $DURATION), round($n / c) if c > 0 else 0, round(c / $DURATION, 2), round(w / $DURATION, 2))"
}

start_proxy() { # port binary [wrapper...]: prints the pid
  local port=$1 bin=$2; shift 2
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$@" "$bin" --config "$OUT/proxy.toml" --listen "127.0.0.1:$port" \
    --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$OUT/proxy-$port.out" 2>"$OUT/proxy-$port.err" &
  echo $!
}

"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0 >"$OUT/sim.log" 2>&1 &
SIM_PID=$!; PIDS+=("$SIM_PID")
wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start"

have=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$SIM_PORT$LIST?basic=true&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
create() { # body (JSON): prints the new insight's id
  curl -fsS -X POST -H "$AUTH" -H "Content-Type: application/json" --data "$1" "http://127.0.0.1:$SIM_PORT$LIST" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
if [ "$ITEM_BYTES" -gt 0 ]; then
  # One insight measured as listed (with its result), then every one padded to ITEM_BYTES.
  query='{"kind": "DataTableNode", "source": {"kind": "HogQLQuery", "query": "select 1"}}'
  first=$(create "{\"name\": \"bench\", \"saved\": true, \"query\": $query}")
  size=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$SIM_PORT$LIST?limit=1&offset=$have&refresh=blocking" | python3 -c \
    'import json,sys; print(len(json.dumps(json.load(sys.stdin)["results"][0], separators=(",", ":"))))')
  pad=$(python3 -c "print('x' * max(0, $ITEM_BYTES - $size))")
  for i in $(seq 2 100); do
    create "{\"name\": \"bench\", \"saved\": true, \"description\": \"$pad\", \"query\": $query}" >/dev/null
  done
  curl -fsS -o /dev/null -X PATCH -H "$AUTH" -H "Content-Type: application/json" \
    --data "{\"description\": \"$pad\"}" "http://127.0.0.1:$SIM_PORT$LIST$first/"
  OFFSET=$have
else
  # 100 insights in project 1: the seeded ones plus copies of the query of the seeded insight with
  # the smallest answer.
  query=$(for id in $(seq 1 20); do
    curl -fsS -H "$AUTH" "http://127.0.0.1:$SIM_PORT${LIST}$id/?refresh=blocking" | python3 -c \
      'import json,sys; raw=sys.stdin.read(); print(len(raw), json.dumps(json.loads(raw)["query"]))'
  done | sort -n | head -1 | cut -d' ' -f2-)
  for i in $(seq "$((have + 1))" 100); do
    create "{\"name\": \"bench $i\", \"query\": $query}" >/dev/null
  done
  OFFSET=0
fi
page_url() { # port items
  if [ "$OFFSET" -gt 0 ]; then echo "http://127.0.0.1:$1$LIST?limit=$2&offset=$OFFSET"; else echo "http://127.0.0.1:$1$LIST?limit=$2"; fi
}

proxy_config "$BIN" "$OUT/proxy.toml" 1 3600 268435456

# fill PORT SIZE LABEL: fills the entries through the proxy and checks the kept page; prints its size.
fill() {
  local url
  url=$(page_url "$1" "$2")
  curl -fsS --max-time 60 -o /dev/null -H "$AUTH" "$url&refresh=blocking"
  curl -fsS --max-time 60 -D "$OUT/list-$3-$2.head" -o "$OUT/list-$3-$2.json" -H "$AUTH" "$url"
  grep -qi '^cache-status:.*detail=list-page' "$OUT/list-$3-$2.head" || die "page $2 of $3 is not a kept page (see $OUT/list-$3-$2.head)"
  items=$(python3 -c "import json; print(len(json.load(open('$OUT/list-$3-$2.json'))['results']))")
  [ "$items" = "$2" ] || die "page $2 of $3 has $items items"
  stat -c %s "$OUT/list-$3-$2.json"
}

if [ "$CALLGRIND" = 1 ]; then
  printf 'items\tbytes\trequests\tinstructions_per_hit\n' >"$OUT/callgrind.tsv"
  for n in $SIZES; do
    dir="$OUT/callgrind-$n"; mkdir -p "$dir"
    pid=$(start_proxy "$PORT" "$BIN" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out")
    PIDS+=("$pid")
    for i in 1 2 3; do wait_port "$PORT" "$pid" && break; done # valgrind starts slowly
    bytes=$(fill "$PORT" "$n" callgrind)
    url=$(page_url "$PORT" "$n")
    taskset -c "$CLIENT_CPU" timeout 40 wrk -t1 -c8 -d3s -H "$AUTH" "$url" >/dev/null
    callgrind_control -i on "$pid" >/dev/null
    taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) wrk -t1 -c8 -d"${DURATION}s" -H "$AUTH" "$url" >"$dir/wrk.txt"
    callgrind_finish "$pid" "$dir"; ir=$CALLGRIND_IR
    req=$(awk '/requests in/ {print $1}' "$dir/wrk.txt")
    per=$(python3 -c "print(round($ir / max(1, $req)))")
    printf '%s\t%s\t%s\t%s\n' "$n" "$bytes" "$req" "$per" >>"$OUT/callgrind.tsv"
    log "$n items ($bytes B): $per instructions per list-page hit ($ir Ir / $req requests, user space)"
  done
  column -t "$OUT/callgrind.tsv"
  echo "raw: $OUT"
  exit 0
fi

PROXY_PID=$(start_proxy "$PORT" "$BIN"); PIDS+=("$PROXY_PID")
wait_port "$PORT" "$PROXY_PID" || die "the proxy did not start (see $OUT/proxy-$PORT.err)"
SERVERS=(proxy nginx)
if [ -n "${COMPARE_BIN:-}" ]; then
  COMPARE_PID=$(start_proxy "$COMPARE_PORT" "$COMPARE_BIN"); PIDS+=("$COMPARE_PID")
  wait_port "$COMPARE_PORT" "$COMPARE_PID" || die "the compared proxy did not start (see $OUT/proxy-$COMPARE_PORT.err)"
  SERVERS=(proxy compare nginx)
fi

mkdir -p "$OUT/www" "$OUT/nginx"
cat >"$OUT/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
user root;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile $NGINX_SENDFILE;
    tcp_nopush $NGINX_SENDFILE;
    client_body_temp_path $OUT/nginx/client_body;
    proxy_temp_path $OUT/nginx/proxy_temp;
    fastcgi_temp_path $OUT/nginx/fastcgi_temp;
    uwsgi_temp_path $OUT/nginx/uwsgi_temp;
    scgi_temp_path $OUT/nginx/scgi_temp;
    default_type application/json;
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        root $OUT/www;
    }
}
EOF
taskset -c "$SERVER_CPU" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/error.log" >"$OUT/nginx/out" 2>&1 &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT" "$NGINX_PID" || die "nginx did not start"

printf 'items\tbytes\tround\tserver\trps\treq_per_cpu_s\tserver_cpu\twrk_cpu\n' >"$OUT/results.tsv"
for n in $SIZES; do
  bytes=$(fill "$PORT" "$n" proxy)
  cp "$OUT/list-proxy-$n.json" "$OUT/www/list-$n.json"
  [ -n "${COMPARE_BIN:-}" ] && fill "$COMPARE_PORT" "$n" compare >/dev/null
  for r in $(seq "$RUNS"); do
    for s in "${SERVERS[@]}"; do
      case $s in
        proxy) row=$(bench "proxy-$n-$r" "$PROXY_PID" "$(page_url "$PORT" "$n")" "$AUTH") ;;
        compare) row=$(bench "compare-$n-$r" "$COMPARE_PID" "$(page_url "$COMPARE_PORT" "$n")" "$AUTH") ;;
        nginx) row=$(bench "nginx-$n-$r" "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/list-$n.json") ;;
      esac
      printf '%s\t%s\t%s\t%s\t%s\n' "$n" "$bytes" "$r" "$s" "$(echo "$row" | tr ' ' '\t')" >>"$OUT/results.tsv"
      log "$n items ($bytes B), round $r, $s: $row (req/s, per CPU-s, server CPU, wrk CPU)"
    done
  done
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT/results.tsv" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
sizes = sorted({(int(r[0]), int(r[1])) for r in rows})
servers = list(dict.fromkeys(r[3] for r in rows))
def cell(vals):
    return f"{statistics.median(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f})".replace(",", " ")
print("items  bytes  server  req/s median (min-max)  per CPU-s median (min-max)  server CPU  wrk CPU max")
for n, b in sizes:
    med = {}
    for s in servers:
        rs = [r for r in rows if int(r[0]) == n and r[3] == s]
        rps, cpu = [float(r[4]) for r in rs], [float(r[5]) for r in rs]
        med[s] = statistics.median(cpu)
        util, wrk = statistics.median(float(r[6]) for r in rs), max(float(r[7]) for r in rs)
        flag = " WRK-BOUND" if wrk > 0.7 else ""
        print(f"{n}  {b}  {s}  {cell(rps)}  {cell(cpu)}  {util:.2f}  {wrk:.2f}{flag}")
    for s in servers:
        if s != "nginx":
            print(f"{n}  {b}  {s}/nginx  {med[s] / med['nginx']:.2f}x per CPU-s")
EOF
echo "raw: $OUT"
