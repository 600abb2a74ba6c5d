# Needs nothing but Python 3.11+, make and apt. Creates or reuses .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/pytest -q -p no:cacheprovider

.PHONY: demo test test-fast bench reliability install clean

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

# Everything: unit, contract (every store backend) and integration tests.
test: $(STAMP)
	$(PYTEST) -n 2 tests

# Unit and contract tests only, for quick loops.
test-fast: $(STAMP)
	$(PYTEST) -n 2 -m "not slow" tests/unit tests/contract

bench: $(STAMP)
	@echo "make bench: not built yet (issue 10); no figures are produced" >&2; exit 2

reliability: $(STAMP)
	@echo "make reliability: not built yet (issue 11); nothing is checked" >&2; exit 2

clean:
	rm -rf repage-data .pytest_cache
