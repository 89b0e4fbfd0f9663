#!/usr/bin/env bash
# Fetch what some tests read and the repository does not carry, into .venv/test-assets (or HARPE_TEST_ASSETS):
# llama-cpp-python's source distribution, whose llama.cpp vocabulary rebuilds the real Llama-2 tokenizer
# (tests/llama2_spm.py, which names the version and the place). pip downloads it (76 MB, once); nothing in it is
# built or run. Offline, the tests that need it skip and say so; under CI (CI set) a failed fetch fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r version sdist_path < <(.venv/bin/python -c \
  'import sys; sys.path.insert(0, "tests"); import llama2_spm as m; print(m.VERSION, m.sdist_path())')
[[ -f $sdist_path ]] && exit 0
assets=$(dirname "$sdist_path") sdist=$(basename "$sdist_path")
mkdir -p "$assets"
tmp=$(mktemp -d "$assets/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetching $sdist into $assets (test asset, once)"
if .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" \
    && [[ -f $tmp/$sdist ]]; then
  mv "$tmp/$sdist" "$sdist_path"
elif [[ -n ${CI:-} ]]; then
  echo "error: could not download $sdist (needs network): the real-Llama-2-tokenizer tests need it" >&2; exit 1
else
  echo "warning: could not download $sdist (offline?): the real-Llama-2-tokenizer tests will skip" >&2
fi
