# Entry points: `make serve` (the main job: the API on the trained demo model), `make test`,
# `make run` (one generation, no server) and `make train-demo` (retrain the demo model).
# Each creates .venv and installs what it needs on first use.
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

.PHONY: install system-packages run serve train-demo test test-latest lock bench clean

# Every install takes its versions from the lock (requirements/lock.txt, made by `make lock`);
# pyproject.toml keeps the ranges for people who `pip install` the package.
LOCK := requirements/lock.txt

# $(1): the venv, $(2): extra pip arguments (a constraint file, or none for the newest allowed).
define install_project
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip setuptools wheel
	$(1)/bin/pip install -q $(2) "$(TORCH_SPEC)"
	# deepspeed builds from source against the torch already installed (no isolated build env,
	# which would pull a second, CUDA torch); DS_BUILD_OPS=0 keeps its ops JIT-only.
	DS_BUILD_OPS=0 $(1)/bin/pip install -q $(2) --no-build-isolation "deepspeed>=0.15"
	$(1)/bin/pip install -q $(2) -e ".[test]"
	# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; do it once here.
	$(1)/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || true
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install_project,$(VENV),-c $(LOCK))
	touch $(STAMP)

$(ORACLE_STAMP): $(LOCK)
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/pip install -q --upgrade pip
	# The lock less its torch (ORACLE_TORCH pins that pair): the same transformers and Pillow as
	# the main venv, so the same processor code and image decoding.
	grep -v '^torch==' $(LOCK) > $(ORACLE_VENV)/constraints.txt
	$(ORACLE_VENV)/bin/pip install -q -c $(ORACLE_VENV)/constraints.txt $(ORACLE_TORCH) transformers pillow
	touch $(ORACLE_STAMP)

install: $(STAMP)

# The trained demo model (maverick_ray/demo_model/README.md); the random `tiny` checkpoint
# (no --model) stays what the tests use.
DEMO_MODEL ?= maverick_ray/demo_model

run: $(STAMP)
	$(BIN)/maverick-ray generate --model $(DEMO_MODEL) --prompt "What is 37+45?" --max-tokens 16

serve: $(STAMP)
	$(BIN)/maverick-ray serve --model $(DEMO_MODEL)

# Retrains the demo model from scratch into $(DEMO_MODEL) (seeded; about 20-30 minutes on 2 CPU
# cores), then prints its held-out scores.
train-demo: $(STAMP)
	$(BIN)/python -m maverick_ray.train train $(DEMO_MODEL)
	$(BIN)/python -m maverick_ray.train eval $(DEMO_MODEL)

# Debian packages some tests drive for real (Prometheus, Chromium, iproute2).
system-packages:
	bash .ci/system-packages

test: $(STAMP) $(ORACLE_STAMP) system-packages
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

# The newest versions pyproject.toml allows (no lock), in a venv of their own: finds the next
# break on purpose. Known exclusions (pyproject's `!=` pins) are reported, not failed.
LATEST_VENV ?= .venv-latest
test-latest: $(ORACLE_STAMP) system-packages
	rm -rf $(LATEST_VENV)
	$(call install_project,$(LATEST_VENV),)
	$(LATEST_VENV)/bin/python tools/known_exclusions.py
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Re-resolves the lock from pyproject.toml's ranges (the newest allowed versions) in a fresh
# venv. Run it, then `make test`, and commit the lock only when the suite is green.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(call install_project,$(LOCK_VENV),)
	$(LOCK_VENV)/bin/python tools/write_lock.py $(LOCK_VENV) $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(ORACLE_VENV) $(LATEST_VENV) .pytest_cache
