#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test insights-proxy: cmake (pingora's
# zlib-ng build needs it), redis-server (shared-tier tests), and rustfmt/clippy for the lint gates.
# Safe to run repeatedly.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
# The shared-tier tests start their own redis-server on a loopback port.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# They also build a Redis Cluster with redis-cli and run a Sentinel as `redis-server --sentinel`.
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >/dev/null 2>&1 || true
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy >/dev/null 2>&1 || true
fi
