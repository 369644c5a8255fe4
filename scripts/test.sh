#!/usr/bin/env bash
# Runs the whole workspace's test suite (the proxy and crates/posthog-sim: unit, integration and
# doc tests, in debug) after installing what a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --all-targets
