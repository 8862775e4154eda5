#!/usr/bin/env bash
# Create .venv from Python 3.10 and install the locked stack into it.
#
# Idempotent: does nothing when .venv is already in sync with requirements.lock and setup.py.
# Python 3.10 is required (TFX 1.16 supports only Python < 3.11). It is looked up as
# `python3.10` on PATH first, then through pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.installed"
UV_VERSION=0.13.9

find_python310() {
  local candidate
  if candidate=$(command -v python3.10 2>/dev/null) && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    echo "$candidate"; return 0
  fi
  # pyenv shims only work when the version is selected; try the interpreter directly.
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for candidate in "$root"/versions/3.10*/bin/python3.10; do
      if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
    done
  fi
  return 1
}

lock_digest=$(cat requirements.lock setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$lock_digest" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python310); then
    echo "error: Python 3.10 is required (TFX 1.16 supports only Python < 3.11)." >&2
    echo "       Install it (e.g. 'pyenv install 3.10.13') so that 'python3.10' is on PATH." >&2
    exit 1
  fi
  echo "Creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
echo "Installing the locked stack into $VENV (requirements.lock)"
"$VENV/bin/uv" pip sync --quiet --python "$VENV/bin/python" requirements.lock
# The project itself, editable, without touching the locked dependencies.
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
echo "$lock_digest" > "$STAMP"
