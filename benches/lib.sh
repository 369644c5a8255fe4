# benches/lib.sh: what the benchmark scripts share (sourced, not run): logging, processes started in
# the background and stopped by PID on exit, bounded waits, Debian packages, the proxy's binary.
# The sourcing script sets HERE and ROOT first.

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes: everything started is recorded in PIDS and stopped by PID ---------------------
PIDS=()
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
stop_pid() {
  local pid=$1 p i
  kill -0 "$pid" 2>/dev/null || return 0
  local tree=("$pid" $(descendants "$pid"))
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq "${STOP_WAIT_TENTHS:-50}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  for p in "${tree[@]}"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
}
forget() { local keep=() p; for p in "${PIDS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done; PIDS=("${keep[@]}"); }
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port pid: until something accepts on 127.0.0.1:port (15 s), or the pid exits
  local i
  for i in $(seq 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# --- a CPU cap (SERVER_QUOTA of one core over QUOTA_PERIOD_US µs) for the processes given -------
CGROUP=""
cap_join() { # pid...: into the cap's cgroup, made on first use (cgroup v1 or v2)
  local quota p
  quota=$(python3 -c "print(int($SERVER_QUOTA * ${QUOTA_PERIOD_US:-10000}))")
  if [ -z "$CGROUP" ]; then
    if [ -w /sys/fs/cgroup/cpu ]; then # cgroup v1
      CGROUP=/sys/fs/cgroup/cpu/insights-bench-$$
      mkdir -p "$CGROUP"
      echo "${QUOTA_PERIOD_US:-10000}" >"$CGROUP/cpu.cfs_period_us"
      echo "$quota" >"$CGROUP/cpu.cfs_quota_us"
    elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then # cgroup v2
      CGROUP=/sys/fs/cgroup/insights-bench-$$
      mkdir -p "$CGROUP"
      echo "$quota ${QUOTA_PERIOD_US:-10000}" >"$CGROUP/cpu.max"
    else
      die "SERVER_QUOTA needs a writable cgroup cpu controller"
    fi
  fi
  for p in "$@"; do
    echo "$p" >"$CGROUP/cgroup.procs" 2>/dev/null || true
  done
}
cap_remove() { [ -z "$CGROUP" ] || rmdir "$CGROUP" 2>/dev/null || true; }
# proxy_config BIN FILE THREADS FRESH_S MAX_BYTES: FILE from conf/insights-proxy.toml.template, with
# [cache] sendfile_min_bytes = SENDFILE_MIN_BYTES when that is set, and without [budget] for a build
# that does not know it.
proxy_config() {
  sed -e "s#@THREADS@#$3#g" -e "s#@FRESH_S@#$4#g" -e "s#@MAX_BYTES@#$5#g" "$HERE/conf/insights-proxy.toml.template" >"$2"
  [ -z "${SENDFILE_MIN_BYTES:-}" ] || sed -i "s/^max_bytes = .*/&\nsendfile_min_bytes = $SENDFILE_MIN_BYTES/" "$2"
  "$1" --check-config --config "$2" >/dev/null 2>&1 || sed -i '/BUDGET-BEGIN/,/BUDGET-END/d' "$2"
}
# The cap's throttling so far: "periods throttled-periods throttled-µs" (cgroup v1 or v2), or "0 0 0".
cap_stat() {
  [ -n "$CGROUP" ] && [ -r "$CGROUP/cpu.stat" ] || { echo "0 0 0"; return; }
  awk '$1 == "nr_periods" {p = $2} $1 == "nr_throttled" {t = $2}
    $1 == "throttled_time" {us = $2 / 1000} $1 == "throttled_usec" {us = $2}
    END {printf "%d %d %d\n", p, t, us}' "$CGROUP/cpu.stat"
}

# install_missing "command:package" ...: apt-get install the packages whose command is missing.
install_missing() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  log "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}
export PATH="$PATH:/usr/sbin"

# Sets BIN: INSIGHTS_PROXY_BIN, or a release build (honours CARGO_TARGET_DIR).
proxy_binary() {
  if [ -n "${INSIGHTS_PROXY_BIN:-}" ]; then
    BIN=$INSIGHTS_PROXY_BIN
  else
    command -v cmake >/dev/null 2>&1 || install_missing cmake:cmake
    log "building insights-proxy (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin insights-proxy)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/insights-proxy
  fi
  [ -x "$BIN" ] || die "no binary at $BIN"
}

# VmRSS of a process, in KiB.
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# create_insight SIM_PORT DAYS SERIES: saves a daily trends insight over the last DAYS days with
# SERIES series in the simulator's project 1 and prints its id. Its answer grows with DAYS x SERIES
# (1 day x 1 series: 2.9 KB; 365 x 4: 52 KB).
create_insight() {
  local events='["$pageview","$autocapture","$pageleave","signed_up","uploaded_file","downloaded_file"]'
  curl -fsS --max-time 10 -X POST -H "Authorization: Bearer phx_demo_all" -H 'Content-Type: application/json' \
    "http://127.0.0.1:$1/api/projects/1/insights/" --data "$(python3 -c '
import json, sys
days, n, events = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
series = [{"kind": "EventsNode", "event": e, "name": e, "math": "total"} for e in events[:n]]
print(json.dumps({"name": f"bench {days}d x {n}", "saved": True, "query": {"kind": "InsightVizNode", "source": {
    "kind": "TrendsQuery", "interval": "day", "dateRange": {"date_from": f"-{days}d"}, "series": series}}}))
' "$2" "$3" "$events")" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])'
}

# Ends a callgrind run of PID (a server started under `valgrind --tool=callgrind`, its output in
# DIR): instrumentation off, dump, stop; writes DIR/exclusive.txt, inclusive.txt and calling.txt and
# sets CALLGRIND_IR to the run's instructions.
callgrind_finish() { # pid dir
  local f
  callgrind_control -i off "$1" >/dev/null
  callgrind_control -d "$1" >/dev/null
  sleep 1
  stop_pid "$1"; forget "$1"
  f=$(ls -S "$2"/callgrind.out* | head -1)
  CALLGRIND_IR=$(awk '/^totals:/ {print $2}' "$f" | sort -n | tail -1)
  callgrind_annotate "$f" 2>/dev/null >"$2/exclusive.txt" || true
  callgrind_annotate --inclusive=yes "$f" 2>/dev/null >"$2/inclusive.txt" || true
  callgrind_annotate --inclusive=yes --tree=calling "$f" 2>/dev/null >"$2/calling.txt" || true
}
