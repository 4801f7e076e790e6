# mailtally: the set-up commands are `sh tools/demo.sh` and `sh tools/test.sh`
# (README.md); these targets are the same for those who have make.
.PHONY: setup demo test bench clean

setup:
	sh tools/setup-debian.sh

demo:
	sh tools/demo.sh

test:
	sh tools/test.sh

bench: setup
	.venv/bin/python bench/ingest.py

clean:
	rm -rf .venv build demo.db demo.db-wal demo.db-shm .pytest_cache .mypy_cache
	find daemon -name '*.so' -delete
