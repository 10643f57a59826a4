# Entry points: `make serve` (the main job: the API on the embedded tiny checkpoint), `make test`,
# and `make run` (one generation, no server).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on the development machines; GPU users installing the
# package with pip get a normal torch from the `torch>=2.4` requirement instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The oracle venv: transformers' Llama 4 image processor needs torchvision, which does not load
# beside the CPU torch above, so the image-parity tests run it from a second venv with a torch +
# torchvision pair that lies on the development machines' disk.
ORACLE_VENV ?= .venv-oracle
ifeq ($(shell uname -m),aarch64)
ORACLE_TORCH ?= torch==2.9.1 torchvision==0.24.1
else
ORACLE_TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
ORACLE_STAMP := $(ORACLE_VENV)/.installed

.PHONY: install system-packages run serve test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# deepspeed builds from source against the torch already installed (no isolated build env,
	# which would pull a second, CUDA torch); DS_BUILD_OPS=0 keeps its ops JIT-only.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install -q -e ".[test]"
	# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; do it once here.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || true
	touch $(STAMP)

$(ORACLE_STAMP): $(STAMP)
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/pip install -q --upgrade pip
	# Same transformers and Pillow as the main venv: same processor code, same image decoding.
	$(ORACLE_VENV)/bin/pip install -q $(ORACLE_TORCH) \
	  "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')" \
	  "pillow==$$($(BIN)/python -c 'import PIL; print(PIL.__version__)')"
	touch $(ORACLE_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/maverick-ray generate --prompt "Hello from maverick-ray" --max-tokens 16

serve: $(STAMP)
	$(BIN)/maverick-ray serve

# Debian packages some tests drive for real (Prometheus, Chromium, iproute2).
system-packages:
	bash .ci/system-packages

test: $(STAMP) $(ORACLE_STAMP) system-packages
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ORACLE_VENV) .pytest_cache
