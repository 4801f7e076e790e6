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

# The parser and correlator once more as plain Python (the fallback where mypyc is
# missing): a copy of the package without its compiled modules.
pure=$(mktemp -d)
trap 'rm -rf "$pure"' EXIT
cp -r daemon/mailtally "$pure/"
find "$pure" -name '*.so' -delete
MAILTALLY_EXPECT_PURE=1 PYTHONPATH="$pure" "$VENV/bin/pytest" -q -o pythonpath="$pure" tests/test_parse.py \
    tests/test_correlate.py
