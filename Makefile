# Every target creates .venv/ (if missing) and installs airpack into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench bench-fit lint clean registry-bin

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

# CI runs only `make test`: the lint (ruff, mypy --strict, import contracts) runs first and stops it on a finding.
test: $(STAMP) lint registry-bin
	$(BIN)/python -m pytest -q -n auto tests

# The OCI tests run the CNCF distribution registry (Debian package docker-registry) on 127.0.0.1.
# Install it when missing and we are root; never leave its system-wide service running (tests start their own).
registry-bin:
	@command -v docker-registry >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null && { systemctl disable --now docker-registry >/dev/null 2>&1; service docker-registry stop >/dev/null 2>&1; true; }; } || echo "note: docker-registry is not installed; the OCI registry tests will skip"

demo: $(STAMP)
	$(BIN)/python demo/demo.py

bench: $(STAMP) registry-bin
	$(BIN)/python benchmarks/bench_verify.py
	$(BIN)/python benchmarks/bench_pack.py
	$(BIN)/python benchmarks/bench_install.py
	$(BIN)/python benchmarks/bench_oci.py
	$(BIN)/python benchmarks/bench_transfer.py
	$(BIN)/python benchmarks/bench_check.py
	$(BIN)/python benchmarks/bench_startup.py

bench-fit: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py

# Silent on success; each tool prints only its findings (lint-imports has no quiet flag: its report shows on failure).
lint: $(STAMP)
	@$(BIN)/ruff check -q airpack tests benchmarks demo
	@$(BIN)/mypy --no-error-summary airpack
	@out=$$($(BIN)/lint-imports --no-logo 2>&1) || { printf '%s\n' "$$out"; exit 1; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
