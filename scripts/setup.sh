#!/usr/bin/env bash
# Creates .venv (Python 3.12) and installs svdq-jax with its test extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 \
      /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup: no working Python 3.12 found (jax 0.11.2 needs it)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
