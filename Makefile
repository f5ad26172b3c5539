# Two entry points that work on a fresh clone (Debian, Python 3.11):
#   make demo   start a relay with generated dev keys, CA and demo targets
#   make test   run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench tools clean

$(BIN)/dbgrelay: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

demo: $(BIN)/dbgrelay
	$(BIN)/dbgrelay demo --state demo-state

# The tests use real gcc, gdb, gdbserver and stunnel, and Wine with mingw-w64 for the Windows
# tier (tests/windows/); scripts/install-tools adds them if missing.
test: $(BIN)/dbgrelay tools
	$(BIN)/python -m pytest -q

tools:
	@scripts/install-tools

lint: $(BIN)/dbgrelay
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BIN)/dbgrelay tools
	$(BIN)/python -m bench

clean:
	-[ -d .wine-tier ] && $(PYTHON) scripts/wine-tier --stop
	rm -rf $(VENV) demo-state .pytest_cache .wine-tier
