#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a bare GPU machine that has torch, Triton, numpy and packaging but no
# megatron-core and no network: downloaded here (where a package registry is reachable) into .whl/ of the
# repository (ignored by git), then carried with the working tree. gpu_check.sh installs them itself
# (pip --no-index --target WHEEL_SITE) when megatron-core is not importable by its python.
#
# Usage: benchmarks/gpu_wheels.sh [--dest DIR] [--force] [--list]
#   --dest DIR  where the wheels go (default: .whl in the repository)
#   --force     download again even where DIR already holds the pinned wheels
#   --list      print the pinned requirements, one per line, and exit
# Settings (environment): PYTHON (default .venv/bin/python if present, else python3): the pip that downloads.
#   The target is always CPython 3.12 on x86-64 Linux (manylinux), whatever this machine runs.
#
# What and why (each one's non-extra Requires-Dist, read with `unzip -p WHEEL '*/METADATA'`):
#   megatron-core 0.19.2  the version setup.py pins; needs torch>=2.6, numpy, packaging>=24.2 (on the machine)
#   liger-kernel 0.8.5    Triton RoPE baseline for benchmarks/rope.py (pure Python); needs torch>=2.1.2,
#                         triton>=2.3.1 (on the machine: torch 2.11, Triton 3.6)
#   nltk 3.10.4           an install requirement of this package (megatron_harpe.data); needs click, joblib,
#                         regex, tqdm (on the machine) and defusedxml (not on it)
#   defusedxml 0.7.1      nltk's
# Exit status: 0 done, 1 a download failed (DIR is left as it was), 2 usage error.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PINS=( megatron-core==0.19.2 liger-kernel==0.8.5 nltk==3.10.4 defusedxml==0.7.1 )
# Platforms as the device notes list them; pip matches manylinux_2_N exactly (megatron-core's wheel is _2_28).
PLATFORMS=( manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
            manylinux2014_x86_64 manylinux1_x86_64 )

usage() { sed -n '7,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

dest=$REPO/.whl force=0
while (( $# )); do
  case $1 in
    --dest) (( $# >= 2 )) || { echo "error: --dest needs a directory" >&2; exit 2; }; dest=$2; shift ;;
    --dest=*) dest=${1#--dest=} ;;
    --force) force=1 ;;
    --list) printf '%s\n' "${PINS[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

# A wheel's file name starts with its normalized name (PEP 427: '-' -> '_') and version.
wheel_prefix() { local name=${1%%==*} version=${1#*==}; printf '%s-%s-' "${name//-/_}" "$version"; }

have_all=1
for pin in "${PINS[@]}"; do
  compgen -G "$dest/$(wheel_prefix "$pin")*.whl" > /dev/null || have_all=0
done
if (( have_all && ! force )); then
  echo "$dest already holds ${PINS[*]} (--force downloads again)"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$(dirname "$dest")/.whl-download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=( --platform "$p" ); done
for pin in "${PINS[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${platform_args[@]}" -d "$tmp" "$pin"; then
    echo "error: could not download $pin with $PY -m pip (is a package registry reachable from here?)" >&2
    exit 1
  fi
  compgen -G "$tmp/$(wheel_prefix "$pin")*.whl" > /dev/null || { echo "error: pip saved no wheel for $pin" >&2; exit 1; }
done

# One version of each package in DIR: pip install --target stops on two. Other files in DIR are kept.
mkdir -p "$dest"
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  rm -f "$dest/${name//-/_}"-*.whl
done
mv "$tmp"/*.whl "$dest"/
echo "wheels in $dest:"
ls -1 "$dest"/*.whl | sed 's|.*/|  |'
echo "total $(du -ch "$dest"/*.whl | tail -n 1 | cut -f1) (the device's working tree travels within 64 MiB)"
