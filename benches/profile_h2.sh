#!/usr/bin/env bash
# benches/profile_h2.sh: user-space instructions per HTTP/2 cache hit (compare.sh's h2-3k row:
# TLS 1.3, ALPN h2, the 2.9 KB insight), for one or more builds, with callgrind.
#
#   INSIGHTS_PROXY_BIN=/tmp/a ALT_BIN=/tmp/b benches/profile_h2.sh
#
# Each build runs under `valgrind --tool=callgrind --instr-atstart=no` on SERVER_CPU with
# `[server.tls]` (one thread); the insight is filled, h2load warms up, instrumentation is switched
# on, h2load sends exactly REQUESTS requests (H2_CLIENTS connections x H2_STREAMS streams, new
# connections: the TLS handshakes are part of the count, as in compare.sh's row), instrumentation
# off, dump. Instructions per request = total Ir / REQUESTS. callgrind_annotate's exclusive and
# inclusive lists are written to OUT/<name>/.
# Settings: REQUESTS=40000 H2_CLIENTS=16 H2_STREAMS=4 SERVER_CPU=0 CLIENT_CPU=1 BASE_PORT=23700
# OUT=/tmp/insights-h2prof.XXXX. Only 127.0.0.1; bounded; everything started is stopped by PID.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
REQUESTS=${REQUESTS:-40000}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-4}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BASE_PORT=${BASE_PORT:-23700}
OUT=${OUT:-$(mktemp -d /tmp/insights-h2prof.XXXXXX)}
mkdir -p "$OUT"
SIM_PORT=$((BASE_PORT + 10))
PORT=$((BASE_PORT + 43))
AUTH="Authorization: Bearer phx_demo_all"
STOP_WAIT_TENTHS=100 # valgrind writes its profile on SIGTERM
. "$HERE/lib.sh"

install_missing valgrind:valgrind h2load:nghttp2-client curl:curl openssl:openssl
proxy_binary
builds=("insights-proxy=$BIN")
[ -n "${ALT_BIN:-}" ] && builds+=("insights-proxy-alt=$ALT_BIN")

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null

"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --calc-delay-ms 0 >"$OUT/sim.log" 2>&1 &
SIM_PID=$!; PIDS+=("$SIM_PID")
wait_port "$SIM_PORT" "$SIM_PID" || die "the simulator did not start"
URL="https://127.0.0.1:$PORT/api/environments/1/insights/$(create_insight "$SIM_PORT" 1 1)/"

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
for build in "${builds[@]}"; do
  name=${build%%=*} bin=${build#*=} dir="$OUT/${build%%=*}"
  mkdir -p "$dir"
  sed -e "s#@THREADS@#1#g" -e "s#@FRESH_S@#300#g" -e "s#@MAX_BYTES@#268435456#g" \
    "$HERE/conf/insights-proxy.toml.template" >"$dir/proxy.toml"
  printf '\n[server.tls]\ncert_path = "%s"\nkey_path = "%s"\nmin_version = "1.3"\n' "$OUT/cert.pem" "$OUT/key.pem" \
    >>"$dir/proxy.toml"
  log "callgrind: $name ($bin)"
  RUST_LOG=warn taskset -c "$SERVER_CPU" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$dir/callgrind.out" "$bin" --config "$dir/proxy.toml" --listen "127.0.0.1:$PORT" \
    --upstream "http://127.0.0.1:$SIM_PORT" --admin-listen off >"$dir/server.out" 2>"$dir/server.err" &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  for i in 1 2 3; do wait_port "$PORT" "$SRV_PID" && break; done
  curl -kfsS --max-time 60 -o /dev/null -H "$AUTH" "$URL?refresh=blocking"
  curl -kfsS --max-time 60 -o /dev/null -D "$dir/hit.headers" -H "$AUTH" "$URL"
  grep -qi '^cache-status: .*hit' "$dir/hit.headers" || die "$name: not a hit (see $dir/hit.headers)"
  taskset -c "$CLIENT_CPU" timeout 120 h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -n 4000 -H "$AUTH" "$URL" >"$dir/warmup.txt"
  callgrind_control -i on "$SRV_PID" >/dev/null
  taskset -c "$CLIENT_CPU" timeout 600 h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -n "$REQUESTS" -H "$AUTH" "$URL" >"$dir/h2load.txt"
  callgrind_finish "$SRV_PID" "$dir"; ir=$CALLGRIND_IR
  ok=$(awk '/^requests:/ {print $8}' "$dir/h2load.txt")
  echo "$name: $(python3 -c "print(round($ir / max(1, $ok)))") instructions per h2 hit ($ir Ir / $ok succeeded" \
    "requests of $REQUESTS, $H2_CLIENTS connections x $H2_STREAMS streams, user space, callgrind)" | tee -a "$SUMMARY"
done
cat "$SUMMARY"
echo "raw: $OUT"
