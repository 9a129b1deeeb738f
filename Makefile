# nilai developer tasks. `make` (or `make help`) lists them.
#
# Every tool target depends on $(STAMP), so the first `make test` on a fresh clone runs
# scripts/setup.sh, and editing pyproject.toml or constraints.txt triggers a reinstall.

VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The public nilai-py client, in its own virtualenv (tests/interop/README.md).
INTEROP_VENV ?= .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.installed
PYTEST_ARGS ?=
# Only the source folders that exist (tests/ and bench/ may be absent in a partial checkout).
CODE_DIRS := $(wildcard src tests bench)
BENCH_RESULTS := bench/results
# The micro benchmarks in short rounds, at least 20 each (CI's baseline step, and the committed
# baseline's run): about 10 s in all.
MICRO_QUICK := $(BIN)/pytest bench -p no:cacheprovider --benchmark-only \
	--benchmark-min-time=0.005 --benchmark-max-time=0.5 --benchmark-min-rounds=20 \
	--benchmark-json=$(BENCH_RESULTS)/micro.json
MICRO_COMPARE := $(BIN)/python bench/micro_baseline.py compare $(BENCH_RESULTS)/micro.json \
	--out $(BENCH_RESULTS)/micro-compare.md

.DEFAULT_GOAL := help
.PHONY: help setup interop format lint typecheck test audit serve bench bench-quick \
	bench-load-quick bench-baseline hooks clean \
	deploy-check docs-check lock upgrade-deps pin-images

help: ## List the targets
	@echo "Usage: make TARGET   (VENV=$(VENV))"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

# The install stamp holds the SHA-256 of pyproject.toml and constraints.txt (as scripts/setup.sh
# writes it). When they are newer but their content is unchanged (e.g. after a git checkout),
# refreshing the stamp's time is enough.
$(STAMP): pyproject.toml constraints.txt
	@if [ -f "$@" ] && [ -x "$(BIN)/python" ] && [ "$$(cat "$@")" = "$$($(BIN)/python -c \
		'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read() \
		+ open("constraints.txt", "rb").read()).hexdigest())' 2>/dev/null)" ]; then \
		touch "$@"; \
	else \
		VENV="$(VENV)" bash scripts/setup.sh; \
	fi

setup: ## Create or refresh the virtualenv (scripts/setup.sh)
	VENV="$(VENV)" bash scripts/setup.sh

$(INTEROP_STAMP): tests/interop/requirements.txt | $(STAMP)
	$(BIN)/python -m venv --clear $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r tests/interop/requirements.txt
	touch $@

interop: $(INTEROP_STAMP) ## Create the nilai-py client's virtualenv for the interop test

format: $(STAMP) ## Format the code and apply safe lint fixes
	$(BIN)/ruff format $(CODE_DIRS)
	$(BIN)/ruff check --fix $(CODE_DIRS)

lint: $(STAMP) ## Lint and check formatting (ruff)
	$(BIN)/ruff check $(CODE_DIRS)
	$(BIN)/ruff format --check $(CODE_DIRS)

typecheck: $(STAMP) ## Type-check src/ in strict mode (pyright)
	$(BIN)/pyright

test: $(STAMP) $(INTEROP_STAMP) ## Run the test suite with coverage (PYTEST_ARGS=... to pass options)
	$(BIN)/pytest --cov=nilai --cov-report=term-missing $(PYTEST_ARGS)

audit: $(STAMP) ## pip-audit the installed packages and bandit src/ (high severity fails)
	VENV="$(VENV)" bash scripts/audit.sh

serve: $(STAMP) ## Run gateway + local worker on this machine (nilai serve)
	$(BIN)/nilai serve

bench: $(STAMP) ## Micro benchmarks (vs the baseline), then the load benchmark (bench/README.md)
	@mkdir -p $(BENCH_RESULTS)
	$(BIN)/pytest bench -p no:cacheprovider --benchmark-only \
		--benchmark-json=$(BENCH_RESULTS)/micro.json
	$(MICRO_COMPARE)
	$(BIN)/python bench/load.py --out $(BENCH_RESULTS)
	@echo "Benchmark results written to $(BENCH_RESULTS): micro.json, micro-compare.md," \
		"load.md, load.json, load.png"

bench-quick: $(STAMP) ## Micro benchmarks in short rounds vs bench/baseline/micro.json (CI; no gate)
	@mkdir -p $(BENCH_RESULTS)
	$(MICRO_QUICK)
	$(MICRO_COMPARE)
	@echo "Micro benchmark results: $(BENCH_RESULTS)/micro.json, micro-compare.md"

bench-baseline: $(STAMP) ## Refresh the committed micro baseline (bench/baseline/micro.json)
	@mkdir -p $(BENCH_RESULTS)
	$(MICRO_QUICK)
	$(BIN)/python bench/micro_baseline.py write $(BENCH_RESULTS)/micro.json

bench-load-quick: $(STAMP) ## The load benchmark in quick mode (~1 min): load.md/json/png
	@mkdir -p $(BENCH_RESULTS)
	$(BIN)/python bench/load.py --quick --out $(BENCH_RESULTS)

deploy-check: $(STAMP) ## Check compose.yaml, lint the Dockerfiles, render and validate the Helm chart
	VENV="$(VENV)" bash scripts/check_deploy.sh
	$(BIN)/python scripts/deploy_check.py

docs-check: $(STAMP) ## Check docs/API.md's recorded examples against a live gateway (~10 s)
	$(BIN)/python scripts/api_examples.py --check

# Not on $(STAMP): after a dependency was added or raised in pyproject.toml, a set-up would
# reinstall the old locked versions (or fail on them) before they could be locked anew.
lock: ## Write constraints.txt: the versions installed in the virtualenv (scripts/lock.py)
	@test -x "$(BIN)/python" || { echo "no $(VENV): run make setup first" >&2; exit 1; }
	$(BIN)/python scripts/lock.py --write

upgrade-deps: ## Upgrade every dependency within pyproject.toml, then `make lock`; test it!
	@test -x "$(BIN)/python" || { echo "no $(VENV): run make setup first" >&2; exit 1; }
	$(BIN)/python -m pip install --upgrade --upgrade-strategy eager -e '.[dev,local,nildb,websearch,rag,attest]'
	$(BIN)/python scripts/lock.py --write

pin-images: ## Pin the base and service images by digest (docker buildx or crane; a registry)
	python3 scripts/pin_images.py --update

hooks: $(STAMP) ## Install the pre-commit git hooks
	$(BIN)/pre-commit install

clean: ## Remove caches, coverage data and benchmark results (keeps the virtualenv)
	rm -rf .pytest_cache .ruff_cache .benchmarks htmlcov $(BENCH_RESULTS) \
		.coverage .coverage.* coverage.xml
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
