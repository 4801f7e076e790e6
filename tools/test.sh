#!/bin/sh
# Install everything the tests need (Debian 12, as root) and run every check.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup-debian.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" format --check daemon tests bench scenario
"$VENV/bin/ruff" check daemon tests bench scenario
"$VENV/bin/mypy"
"$VENV/bin/pytest"
