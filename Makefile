# mailtally: the two set-up commands are `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DB ?= demo.db

.PHONY: setup demo test lint bench clean

setup:
	sh tools/setup-debian.sh

demo: setup
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	$(VENV)/bin/mailtally ingest --config etc/demo.yaml --db $(DEMO_DB) tests/data/scenario/mail.log
	$(VENV)/bin/mailtally top --db $(DEMO_DB) --day all
	$(VENV)/bin/mailtally report --db $(DEMO_DB) --sender heavy@campus.example --since 2026-12-01 --until 2026-12-07

test: setup
	$(VENV)/bin/ruff format --check daemon tests bench scenario
	$(VENV)/bin/ruff check daemon tests bench scenario
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm .pytest_cache .mypy_cache
