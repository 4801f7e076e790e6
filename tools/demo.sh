#!/bin/sh
# Install what is missing, ingest the bundled real Postfix log, print reports.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup-debian.sh
VENV=${VENV:-.venv}
DB=${DEMO_DB:-demo.db}
LOG=tests/data/scenario/mail.log.rfc3339  # rsyslog's RFC 3339 stamps carry the year
rm -f "$DB" "$DB-wal" "$DB-shm"
"$VENV/bin/mailtally" -v ingest --config etc/demo.yaml --db "$DB" "$LOG"
"$VENV/bin/mailtally" top --config etc/demo.yaml --db "$DB" --day 2026-12-03
"$VENV/bin/mailtally" report --config etc/demo.yaml --db "$DB" \
    --sender heavy@campus.example --since 2026-11-27 --until 2026-12-03
