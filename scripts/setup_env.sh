#!/usr/bin/env bash
# Create .venv with Python 3.12 and install megatron-harpe (editable) with its test, hf and plots extras.
# Re-running is cheap: the install is skipped while setup.py is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=("${PYTHON:-}" python3.12)
  if command -v pyenv >/dev/null 2>&1; then candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12); fi
  candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12)
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! py=$(find_python); then
    echo "error: Python 3.12 is required (megatron-core 0.19 needs it). Install it (apt-get install python3.12," >&2
    echo "       pyenv install 3.12) or point PYTHON at it: PYTHON=/path/to/python3.12 $0" >&2
    exit 2
  fi
  echo "creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=.venv/.megatron-harpe-installed
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing megatron-harpe and its dependencies into .venv (torch is a large download the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test,hf,plots]"
  echo "$want" > "$stamp"
fi
