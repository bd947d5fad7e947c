# Ferry: every target sets up what it needs (virtual environment, example models) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODELS := examples/models
PYTEST_ARGS ?=

.PHONY: setup models run test lint protos bench perf-deps nginx-deps interop-deps kserve-deps clean

setup: $(STAMP)

# ferry-client (client/, its own distribution) first, editable, so the server's `ferry-client==X` pin finds it installed
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ./client
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python examples/make_models.py --out $(MODELS)

run: models
	$(BIN)/ferry serve --model-repository $(MODELS) --host 127.0.0.1 --grpc-port 8001 --http-port 8000

# perf_analyzer (shipped in the tritonclient wheel) links against Debian's libb64: installed here when we can (root
# with a working apt). When we cannot, the suite still runs and the perf_analyzer tests skip, saying why (under
# CI=true they fail instead).
perf-deps:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	     (timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq libb64-0d) >/dev/null 2>&1; then :; \
	  else echo "note: could not install libb64-0d (needs root and a working apt): perf_analyzer tests will skip" \
	       "(fail under CI=true)"; fi; }

# nginx (Debian's), the real L7 gRPC balancer in front of replicas in tests/integration/test_fleet.py: installed here
# when we can, as libb64 is; when we cannot, that test skips, saying why (under CI=true it fails instead).
nginx-deps:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	     (timeout 300 apt-get update -qq && \
	      timeout 600 apt-get install -y -qq -o DPkg::Lock::Timeout=300 nginx) >/dev/null 2>&1; then :; \
	  else echo "note: could not install nginx (needs root and a working apt): the fleet test will skip" \
	       "(fail under CI=true)"; fi; }

# The Node client of the interop tests (@grpc/grpc-js, pinned by tests/interop/package-lock.json); reinstalled
# when the lock file changes. Without npm the Node interop tests skip (and fail under CI=true).
interop-deps: tests/interop/node_modules/.installed

tests/interop/node_modules/.installed: tests/interop/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd tests/interop && npm ci --silent --ignore-scripts --no-audit --no-fund && touch node_modules/.installed; \
	else echo "note: npm missing: the @grpc/grpc-js interop tests will skip (fail under CI=true)"; fi

# KServe's Python SDK (its REST client, for tests/integration/test_rest_kserve.py) in its own venv: it pins
# protobuf < 7, Ferry does not. Remade when this Makefile changes; without it (no package index) that test skips
# (fails under CI=true).
KSERVE_VENV := .venv-kserve
kserve-deps: $(KSERVE_VENV)/.installed

$(KSERVE_VENV)/.installed: Makefile
	@{ test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV); } && \
	  $(KSERVE_VENV)/bin/python -m pip install -q --disable-pip-version-check "kserve==0.21.0" && touch $@ || \
	  echo "note: could not install kserve into $(KSERVE_VENV): the KServe client test will skip (fail under CI=true)"

test: models perf-deps nginx-deps interop-deps kserve-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python protos/generate.py

# Every figure in BENCHMARKS.md, each as a ratio to a baseline measured in the same run (about 40 minutes):
# Ferry's own load generator is cross-checked against perf_analyzer, and MLServer gets its own venv.
bench: models perf-deps
	$(BIN)/python -m benchmarks.bench --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_batching --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_observability --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_auth --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_switched --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_shadow --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_transport --models $(MODELS) --out bench-out --doc BENCHMARKS.md
	$(BIN)/python -m benchmarks.bench_tls --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.bench_rest --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.kernel_bench --models $(MODELS) --out bench-out
	$(BIN)/python -m benchmarks.crosscheck --models $(MODELS) --out bench-out --doc BENCHMARKS.md
	bash benchmarks/mlserver/setup.sh
	$(BIN)/python -m benchmarks.mlserver.compare --models $(MODELS) --out bench-out --doc BENCHMARKS.md

clean:
	rm -rf $(VENV) $(KSERVE_VENV) $(MODELS) bench-out .pytest_cache .mypy_cache .ruff_cache tests/interop/node_modules
