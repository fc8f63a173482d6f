# Every target creates .venv/ (if missing) and installs airpack into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench bench-fit trace-matrix lint clean registry-bin trace-extra cdn-bin softhsm-bin browser-bin

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

# The [trace] extra (CPU PyTorch + transformers) turns on `fit --trace` and the architecture-matrix tests
# (marked `trace`; they skip without it). Not installed by `make test`: on a host whose pip index is PyPI,
# `pip install torch` pulls the CUDA build (gigabytes). Point pip at a CPU wheel first, e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make trace-extra
# (a local wheelhouse with torch-*+cpu works the same way); then `make test` runs the matrix too.
trace-extra: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[trace]'

# CI runs only `make test`: the lint (ruff, mypy --strict, import contracts) runs first and stops it on a finding.
test: $(STAMP) lint registry-bin cdn-bin softhsm-bin browser-bin
	$(BIN)/python -m pytest -q -n auto tests

# The OCI tests run the CNCF distribution registry (Debian package docker-registry) on 127.0.0.1.
# Install it when missing and we are root; never leave its system-wide service running (tests start their own).
registry-bin:
	@command -v docker-registry >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null && { systemctl disable --now docker-registry >/dev/null 2>&1; service docker-registry stop >/dev/null 2>&1; true; }; } || echo "note: docker-registry is not installed; the OCI registry tests will skip"

# The Hub tests and the pack benchmark serve LFS files from a real nginx on 127.0.0.1 (tests/nginx_cdn.py), and the
# benchmark compares against aria2c. Install them when missing and we are root (Debian's nginx has the secure_link
# module the signed-URL tests use; nginx-light where there is no nginx package); never leave the system-wide nginx
# service running: tests and the benchmark start their own, each with a throwaway config.
cdn-bin:
	@{ command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || { [ "$$(id -u)" = 0 ] && apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; } && { systemctl disable --now nginx >/dev/null 2>&1; service nginx stop >/dev/null 2>&1; true; }; } || echo "note: nginx is not installed; the nginx CDN tests skip and the pack benchmark cannot run"
	@command -v aria2c >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends aria2 >/dev/null; } || echo "note: aria2 is not installed; the pack benchmark has nothing to compare against"

# The token tests and the demo's officer key use SoftHSM2 (Debian package softhsm2: softhsm2-util and libsofthsm2.so).
# Install it when missing and we are root; each test and the demo make their own throwaway token folder (SOFTHSM2_CONF).
softhsm-bin:
	@command -v softhsm2-util >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null; } || echo "note: softhsm2 is not installed; the token tests and the demo's token step will skip"

# The report tests load every report in headless Chromium (Debian package chromium) with the network disabled, and
# `airpack report --pdf` prints through it. Install it when missing and we are root.
browser-bin:
	@{ command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; } || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || echo "note: chromium is not installed; the report browser tests skip and report --pdf cannot print"

demo: $(STAMP) softhsm-bin browser-bin
	$(BIN)/python demo/demo.py

bench: $(STAMP) registry-bin cdn-bin
	$(BIN)/python benchmarks/bench_verify.py
	$(BIN)/python benchmarks/bench_pack.py
	$(BIN)/python benchmarks/bench_install.py
	$(BIN)/python benchmarks/bench_oci.py
	$(BIN)/python benchmarks/bench_transfer.py
	$(BIN)/python benchmarks/bench_check.py
	$(BIN)/python benchmarks/bench_delta.py
	$(BIN)/python benchmarks/bench_startup.py

bench-fit: $(STAMP)
	$(BIN)/python benchmarks/bench_fit.py

# Re-record tests/data/vram_trace_matrix.json, the trace of every architecture-matrix point that
# tests/test_vram_oracle.py holds the pure estimator to without torch (needs the [trace] extra; ~3 minutes).
trace-matrix: $(STAMP)
	$(BIN)/python tests/record_trace_matrix.py

# Silent on success; each tool prints only its findings (lint-imports has no quiet flag: its report shows on failure).
lint: $(STAMP)
	@$(BIN)/ruff check -q airpack tests benchmarks demo
	@$(BIN)/mypy --no-error-summary airpack
	@out=$$($(BIN)/lint-imports --no-logo 2>&1) || { printf '%s\n' "$$out"; exit 1; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
