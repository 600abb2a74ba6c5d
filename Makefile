# Needs nothing but Python 3.11+, make and apt. Creates or reuses .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/pytest -q -p no:cacheprovider

.PHONY: demo test test-fast lint bench reliability install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

# The demo fetches real PDFs with `apt-get download`: make sure apt has package lists.
demo: $(STAMP)
	@ls /var/lib/apt/lists/ | grep -q Packages || { [ "$$(id -u)" = 0 ] && apt-get update -qq; } || \
	  { echo "repage demo: apt has no package lists; run 'sudo apt-get update' once" >&2; exit 2; }
	$(BIN)/repage demo

# Lint first, then everything: unit, contract (every store backend) and integration tests; the Ray test alone
# at the end (its local cluster must start within Ray's fixed 30 s, see pyproject's markers).
# First the Debian packages the tests need (chromium, tesseract): apt installs them as root,
# else .ci/prerequisites names them and stops. With CI set, a skipped test fails the run.
test: $(STAMP) lint
	@bash .ci/prerequisites
	@results=$$(mktemp); \
	REPAGE_RELIABILITY_RESULTS=$$results $(PYTEST) -n 3 -m "not ray" --durations=12 tests && $(PYTEST) -m ray tests; tests=$$?; \
	$(BIN)/python -m tests.support.reliability $$results; summary=$$?; rm -f $$results; \
	[ $$tests -eq 0 ] && [ $$summary -eq 0 ]

# ruff (lint and format check) and mypy: strict on repage/domain, untyped bodies checked elsewhere.
lint: $(STAMP)
	$(BIN)/ruff check repage tests bench examples
	$(BIN)/ruff format --check repage tests bench examples
	$(BIN)/mypy repage

# Unit and contract tests only, for quick loops.
test-fast: $(STAMP)
	$(PYTEST) -n 2 -m "not slow" tests/unit tests/contract

# naive, floor and repage on copies of 1,000- and 5,000-document stores (built once, cached
# under bench/out/stores), local and moto_server buckets; report in bench/out/report.json.
bench: $(STAMP)
	$(BIN)/python -m bench.run

# Faults, bad input and attacks (docs/design.md §13; also part of `make test`, which prints the same line).
# Each test appends its figures to a results file, failed or not; the last line printed sums
# them up: trials (failed), faults, documents verified, lost; it fails on a failure or a loss.
reliability: $(STAMP)
	@results=$$(mktemp); \
	REPAGE_RELIABILITY_RESULTS=$$results $(PYTEST) -n 2 -m reliability tests/reliability; tests=$$?; \
	$(BIN)/python -m tests.support.reliability $$results; summary=$$?; rm -f $$results; \
	[ $$tests -eq 0 ] && [ $$summary -eq 0 ]

clean:
	rm -rf repage-data .pytest_cache
