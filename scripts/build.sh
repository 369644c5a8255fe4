#!/usr/bin/env bash
# Builds the insights-proxy binary: the one build recipe, run by CI (.ci/run, debug) and by the
# Dockerfile (`scripts/build.sh --release`), so the image is built the way CI builds.
# Arguments go to cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
cargo build --locked --bin insights-proxy "$@"
