#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (CPU; GPU-marked tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
./scripts/fetch_test_assets.sh
exec .venv/bin/python -m pytest "$@"
