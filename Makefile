# medit — the two set-up commands of the README:
#   make demo   creates .venv, installs medit, corrects the built-in facts in the default model
#   make test   creates .venv if needed, runs the whole test suite
# make lint: ruff, then lint-imports (layers, no import cycles: [tool.importlinter] in pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medit-installed
# Materialised default model and other caches live in the checkout (git-ignored) by default.
export MEDIT_CACHE ?= $(CURDIR)/.cache/medit
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medit edit --model builtin:smollm2 --method ft-m --requests builtin \
		--mode single --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check medit tests benchmarks
	$(VENV)/bin/ruff format --check medit tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/bench_ft.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_tracing.py
	$(PY) benchmarks/bench_locate.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
