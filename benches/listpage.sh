#!/usr/bin/env bash
# benches/listpage.sh: list-page hits (`GET /insights/?limit=N`, every member cached and the page
# itself kept: `Cache-Status: ...; detail=list-page`) against nginx serving the same bytes as a
# static file, for pages of 10, 50 and 100 insights.
#
#   INSIGHTS_PROXY_BIN=target/release/insights-proxy benches/listpage.sh
#
# The simulator is given 100 insights in project 1 (copies of a small seeded insight's query), the
# proxy fills every entry with one `refresh=blocking` list read, then for each page size: the
# page's answer is saved as nginx's static file, and each server (pinned to SERVER_CPU, one worker
# thread / process) gets `wrk -t1 -cCONNS -dDURATION` from CLIENT_CPU. Reported per server:
# requests/s, requests per CPU-second of the server (utime+stime from /proc), the answer's size, and
# the ratio to nginx. Raw wrk output in OUT.
#
# Settings (environment): SIZES="10 50 100" DURATION=10 CONNS=16 SERVER_CPU=0 CLIENT_CPU=1
# BASE_PORT=18400 INSIGHTS_PROXY_BIN (skip the build) OUT=/tmp/insights-listpage.XXXX. Installs wrk
# and nginx with apt-get when missing. Only 127.0.0.1; every run is bounded; everything started is
# stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SIZES=${SIZES:-"10 50 100"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-16}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-18400}
OUT=${OUT:-$(mktemp -d /tmp/insights-listpage.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PORT=$((BASE_PORT + 83))
NGINX_PORT=$((BASE_PORT + 84))
AUTH="Authorization: Bearer phx_demo_all"
LIST="/api/environments/1/insights/"
HZ=$(getconf CLK_TCK)

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

PIDS=()
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}
cleanup() { local p; for p in "${PIDS[@]}"; do stop_pid "$p"; done; PIDS=(); }
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_port() {
  local i
  for i in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null || log "warning: install failed"
fi
export PATH="$PATH:/usr/sbin"

if [ -n "${INSIGHTS_PROXY_BIN:-}" ]; then
  BIN=$INSIGHTS_PROXY_BIN
else
  log "building insights-proxy (release)"
  (cd "$ROOT" && cargo build --release --quiet --bin insights-proxy)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/insights-proxy
fi

# CPU seconds (utime + stime) of a process so far.
cpu_of() {
  local s
  s=$(cat "/proc/$1/stat")
  s=${s##*) }
  set -- $s
  python3 -c "print((${12} + ${13}) / $HZ)"
}

# bench NAME PID URL [HEADER]: wrk against URL; prints "requests/s requests-per-CPU-second".
bench() {
  local name=$1 pid=$2 url=$3 header=${4:-} before after n
  local args=(-t1 -c"$CONNS" -d"${DURATION}s")
  [ -n "$header" ] && args+=(-H "$header")
  taskset -c "$CLIENT_CPU" timeout 10 wrk -t1 -c"$CONNS" -d2s ${header:+-H "$header"} "$url" >/dev/null # warm-up
  before=$(cpu_of "$pid")
  taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) wrk "${args[@]}" "$url" >"$OUT/$name.wrk"
  after=$(cpu_of "$pid")
  n=$(awk '/requests in/ {print $1}' "$OUT/$name.wrk")
  grep -q "Non-2xx" "$OUT/$name.wrk" && die "$name: non-2xx answers (see $OUT/$name.wrk)"
  python3 -c "c = $after - $before; print(round($n / $DURATION), round($n / c) if c > 0 else 0, round(c / $DURATION, 2))"
}

"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0 >"$OUT/sim.log" 2>&1 &
SIM_PID=$!; PIDS+=("$SIM_PID")
wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start"

# 100 insights in project 1: the seeded ones plus copies of the query of the seeded insight with the
# smallest answer (pages of ~2.5 KB per insight, like PostHog's typical trends tiles).
query=$(for id in $(seq 1 20); do
  curl -fsS -H "$AUTH" "http://127.0.0.1:$SIM_PORT${LIST}$id/?refresh=blocking" | python3 -c \
    'import json,sys; raw=sys.stdin.read(); print(len(raw), json.dumps(json.loads(raw)["query"]))'
done | sort -n | head -1 | cut -d' ' -f2-)
have=$(curl -fsS -H "$AUTH" "http://127.0.0.1:$SIM_PORT$LIST?basic=true&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
for i in $(seq "$((have + 1))" 100); do
  curl -fsS -o /dev/null -X POST -H "$AUTH" -H "Content-Type: application/json" \
    --data "{\"name\": \"bench $i\", \"query\": $query}" "http://127.0.0.1:$SIM_PORT$LIST"
done

sed -e "s#@THREADS@#1#g" -e "s#@FRESH_S@#3600#g" -e "s#@MAX_BYTES@#268435456#g" \
  "$HERE/conf/insights-proxy.toml.template" >"$OUT/proxy.toml"
"$BIN" --check-config --config "$OUT/proxy.toml" >/dev/null 2>&1 || sed -i '/BUDGET-BEGIN/,/BUDGET-END/d' "$OUT/proxy.toml"
RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN" --config "$OUT/proxy.toml" --listen "127.0.0.1:$PORT" \
  --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$OUT/proxy.out" 2>"$OUT/proxy.err" &
PROXY_PID=$!; PIDS+=("$PROXY_PID")
wait_port "$PORT" "$PROXY_PID" || die "the proxy did not start (see $OUT/proxy.err)"

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

printf 'items\tbytes\tproxy_rps\tproxy_req_per_cpu_s\tproxy_cpu\tnginx_rps\tnginx_req_per_cpu_s\tnginx_cpu\tratio_per_cpu\n' >"$OUT/results.tsv"
for n in $SIZES; do
  url="http://127.0.0.1:$PORT$LIST?limit=$n"
  curl -fsS -o /dev/null -H "$AUTH" "$url&refresh=blocking"
  curl -fsS -D "$OUT/list-$n.head" -o "$OUT/www/list-$n.json" -H "$AUTH" "$url"
  grep -qi '^cache-status:.*detail=list-page' "$OUT/list-$n.head" || die "page $n is not a kept page (see $OUT/list-$n.head)"
  items=$(python3 -c "import json; print(len(json.load(open('$OUT/www/list-$n.json'))['results']))")
  [ "$items" = "$n" ] || die "page $n has $items items"
  bytes=$(stat -c %s "$OUT/www/list-$n.json")
  read -r p_rps p_cpu p_util < <(bench "proxy-$n" "$PROXY_PID" "$url" "$AUTH")
  read -r n_rps n_cpu n_util < <(bench "nginx-$n" "$NGINX_PID" "http://127.0.0.1:$NGINX_PORT/list-$n.json")
  ratio=$(python3 -c "print(round($p_cpu / $n_cpu, 2) if $n_cpu else 0)")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$bytes" "$p_rps" "$p_cpu" "$p_util" "$n_rps" "$n_cpu" "$n_util" "$ratio" \
    >>"$OUT/results.tsv"
  log "$n items ($bytes B): insights-proxy $p_rps/s ($p_cpu per CPU-s, cpu $p_util), nginx $n_rps/s ($n_cpu per CPU-s, cpu $n_util): ${ratio}x"
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
column -t "$OUT/results.tsv"
echo "raw: $OUT"
