# mailtally: the two set-up commands are `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DB ?= demo.db
# A real Postfix 3.7 log written by rsyslog (RFC 3339 stamps carry the year).
DEMO_LOG ?= tests/data/scenario/mail.log.rfc3339
DEMO_DAY ?= 2026-12-03
DEMO_SINCE ?= 2026-11-27

.PHONY: setup demo test lint bench clean

setup:
	sh tools/setup-debian.sh

demo: setup
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	$(VENV)/bin/mailtally -v ingest --config etc/demo.yaml --db $(DEMO_DB) $(DEMO_LOG)
	$(VENV)/bin/mailtally top --config etc/demo.yaml --db $(DEMO_DB) --day $(DEMO_DAY)
	$(VENV)/bin/mailtally report --config etc/demo.yaml --db $(DEMO_DB) \
		--sender heavy@campus.example --since $(DEMO_SINCE) --until $(DEMO_DAY)

test: setup
	$(VENV)/bin/ruff format --check daemon tests bench scenario
	$(VENV)/bin/ruff check daemon tests bench scenario
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm .pytest_cache .mypy_cache
