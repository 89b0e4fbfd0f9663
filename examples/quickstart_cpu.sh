#!/usr/bin/env bash
# The embedded default on a CPU, no downloads: set up .venv, then run the demonstration into OUTDIR.
# Usage: examples/quickstart_cpu.sh [OUTDIR] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/quickstart}
shift || true
./scripts/setup_env.sh
exec .venv/bin/python tools/harpe_demo.py --out "$out" "$@"
