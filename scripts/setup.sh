#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build insights-proxy (cmake, which pingora's zlib-ng
# build needs, and a C compiler) and, unless called as `setup.sh build`, to test it: redis-server
# (shared-tier tests), prometheus (promtool and a real server for tests/monitoring.rs) and
# rustfmt/clippy for the lint gates. Safe to run repeatedly.
set -euo pipefail
mode="${1:-all}"
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
if [ "$mode" != build ]; then
  # The shared-tier tests start their own redis-server on a loopback port; they also build a Redis
  # Cluster with redis-cli and run a Sentinel as `redis-server --sentinel`.
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
  # The monitoring kit's test runs promtool and its own prometheus on a loopback port.
  { command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Only the tools are wanted: the package also enables a Prometheus service (on :9090, the
  # proxy's default admin port) where systemd runs.
  if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
if [ "$mode" != build ] && command -v rustup >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >/dev/null 2>&1 || true
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy >/dev/null 2>&1 || true
fi
