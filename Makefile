# Every target creates .venv/ (if missing) and installs airpack into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench bench-fit lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto tests

demo: $(STAMP)
	$(BIN)/python demo/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_verify.py

bench-fit: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py

lint: $(STAMP)
	$(BIN)/ruff check airpack tests benchmarks demo
	$(BIN)/mypy airpack
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
