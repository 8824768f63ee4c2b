#!/usr/bin/env bash
# The project's Python environment (.venv): every package at the version of constraints.txt.
# Needs no root (python3-venv must be installed: scripts/setup-host.sh does that). Safe to run
# again: it changes nothing while pyproject.toml and constraints.txt are what it installed
# last; an existing venv is updated in place, never removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp=$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  echo "setup: Python environment up to date"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the Python environment in $VENV (about 1-2 min)"
  "$PYTHON" -m venv "$VENV"
else
  echo "setup: updating the Python environment in $VENV to constraints.txt"
fi
"$VENV/bin/pip" install -q -c constraints.txt --upgrade pip
"$VENV/bin/pip" install -q -c constraints.txt -e '.[controller,dev]'
rm -f "$VENV"/.installed-*
touch "$stamp"
