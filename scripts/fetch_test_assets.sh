#!/usr/bin/env bash
# Fetch what some tests read and the repository does not carry, into .venv/test-assets (or HARPE_TEST_ASSETS):
# llama-cpp-python's source distribution, whose llama.cpp vocabulary rebuilds the real Llama-2 tokenizer
# (tests/llama2_spm.py). pip downloads it (76 MB, once); nothing in it is built or run.
# Offline, the tests that need it skip and say so; under CI (CI set) a failed fetch fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
assets=${HARPE_TEST_ASSETS:-.venv/test-assets}
sdist=llama_cpp_python-0.3.36.tar.gz
[[ -f $assets/$sdist ]] && exit 0
mkdir -p "$assets"
tmp=$(mktemp -d "$assets/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching $sdist into $assets (test asset, once)"
if .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp" \
    && [[ -f $tmp/$sdist ]]; then
  mv "$tmp/$sdist" "$assets/$sdist"
elif [[ -n ${CI:-} ]]; then
  echo "error: could not download $sdist (needs network): the real-Llama-2-tokenizer tests need it" >&2; exit 1
else
  echo "warning: could not download $sdist (offline?): the real-Llama-2-tokenizer tests will skip" >&2
fi
