# The two commands a newcomer types: `make demo` and `make test`.
# Each creates .venv (with the project installed) if it is missing.
PYTHON ?= python3
VENV := .venv
OLD_VENV := .venv-oldest
DOCS_VENV := .venv-docs
# The oldest versions lora_jax declares support for (pyproject.toml lower bounds).
OLDEST := jax==0.6.2 jaxlib==0.6.2 flax==0.10.7 optax==0.2.4 chex==0.1.89
# The peft that wrote tests/fixtures/peft (their adapter_config.json's peft_version).
PEFT := peft==0.21.2

.PHONY: demo gemma test test-slow test-oldest docs clean

# torch (the CPU build these machines carry) and peft run the PEFT round-trip tests.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0 $(PEFT)
	$(VENV)/bin/python -m pip install -q -e '.[dev,examples,gemma]'
	touch $@

$(OLD_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q $(OLDEST) -e '.[dev]'
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

# In the newest environment a skipped test fails (tests/conftest.py); the oldest may skip
# and lists what it skipped.
test: $(VENV)/.installed
	LORA_JAX_TEST_ENV=newest $(VENV)/bin/python -m pytest -q

# The slow tests (whole example programs, long end-to-end runs); CI runs them after `make test`.
test-slow: $(VENV)/.installed
	LORA_JAX_TEST_ENV=newest $(VENV)/bin/python -m pytest -q -m slow

test-oldest: $(OLD_VENV)/.installed
	LORA_JAX_TEST_ENV=oldest $(OLD_VENV)/bin/python -m pytest -q

# docs/ and the API reference generated from the docstrings, into site/. --strict: a broken
# link, anchor, cross-reference or snippet, or a docstring griffe cannot read, fails the build.
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(OLD_VENV) $(DOCS_VENV) site .pytest_cache
