#!/usr/bin/env bash
# Builds and runs the proxy. With no upstream configured it starts the built-in simulated PostHog.
# Arguments go to insights-proxy, e.g.: scripts/run.sh --upstream https://us.posthog.com --listen 0.0.0.0:8080
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
exec cargo run --release --bin insights-proxy -- "$@"
