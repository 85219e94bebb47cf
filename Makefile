# `make demo` and `make test` work on a fresh machine with Python 3.11 and make:
# each creates (or reuses) .venv and installs the project into it, every package at the
# version pinned in requirements.lock (`make lock` refreshes the pins).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
LOCK    = requirements.lock
EXTRAS  = test

.PHONY: demo test test-fast install lock browser clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Re-resolve every dependency (and the test extra) to its newest allowed
# version, in a throwaway environment; review the diff, run `make test`, commit the lock.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "pip-tools==7.*"
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links --extra test --output-file $(LOCK) pyproject.toml

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/melanoma demo

# Headless Chromium for the browser test comes from Debian (Playwright's download is offline here).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache
