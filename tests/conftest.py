"""Shared fixtures for the lora_jax core tests, and the rule that no test quietly skips.

Base params are filled from NumPy rather than ``jax.random``: the default
threefry PRNG compiles a new XLA program for every new shape, which costs
seconds per shape on a small CPU and would dominate the suite's runtime.

**Environments.** ``make test`` runs the suite in two environments (see the
Makefile): ``newest`` (the current JAX and Flax, on Python >= 3.12, with every
optional package but torch) runs every test not marked ``torch``; ``torch``
(Python 3.11, where torch's CPU build is, with peft and transformers and the
newest JAX Python 3.11 has) runs the tests marked ``torch``: the parity tests
against PyTorch, PEFT and transformers. ``make test-oldest`` runs the oldest
supported versions.

**Skips.** In the ``newest`` and ``torch`` environments a skipped test is a
*failure* (a missing torch or peft must not turn the PEFT round trips into
silent no-ops). A test marked ``torch`` is skipped where torch, peft or
transformers is missing, which those two environments turn into a failure.
Only the oldest environment may skip, and it lists what it skipped and why
at the end of the run. The environment is ``LORA_JAX_TEST_ENV`` (``newest``,
``torch`` or ``oldest``, set by the Makefile), else ``oldest`` when JAX is the
oldest supported version, else ``newest``.
"""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The repository root, so tests import the examples, benchmarks and studies as packages
# (``import examples.common.lm``); pytest's importlib mode does not add it.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _randomize(tree, seed=0, scale=0.5):
    """Replaces every array (or ShapeDtypeStruct) leaf by N(0, scale^2) values of its dtype."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if jnp.issubdtype(dtype, jnp.floating):
            return jnp.asarray(scale * rng.standard_normal(shape), dtype)
        return jnp.zeros(shape, dtype)

    return jax.tree.map(fill, tree)


@pytest.fixture(scope="session")
def randomize():
    """``randomize(tree, seed=0, scale=0.5)``: a concrete tree of random values shaped like ``tree``."""
    return _randomize


OLDEST_JAX = "0.6.2"  # the Makefile's OLDEST pin and pyproject's lower bound
TEST_ENV = os.environ.get("LORA_JAX_TEST_ENV") or (
    "oldest" if jax.__version__ == OLDEST_JAX else "newest"
)
STRICT_ENVS = ("newest", "torch")  # where a skip is a failure
TORCH_NEEDS = ("torch", "peft", "transformers")  # what a test marked `torch` imports


@pytest.fixture(scope="session")
def test_env() -> str:
    """``"newest"``, ``"torch"`` or ``"oldest"``: the environment this run is in (see the module doc)."""
    return TEST_ENV


def pytest_runtest_setup(item):
    """A test marked ``torch`` needs torch, peft and transformers: skipped without them
    (a failure in the newest and torch environments: run it in ``.venv-torch``)."""
    if item.get_closest_marker("torch") is None:
        return
    missing = [m for m in TORCH_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"marked torch and {missing} missing: `make test` runs the torch tests in .venv-torch"
        )


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In the newest and torch environments a skip is turned into a failure; elsewhere it stays a
    skip, which the terminal summary lists."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if TEST_ENV in STRICT_ENVS:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in the {TEST_ENV} test environment, which must run every test it "
            f"selects (LORA_JAX_TEST_ENV={TEST_ENV}, jax {jax.__version__}): {reason}"
        )


def pytest_terminal_summary(terminalreporter):
    """Says which environment ran, and every skip with its reason.

    The skips are read from the reporter's statistics (not collected in a hook), so the list is
    complete when pytest-xdist runs the tests in worker processes."""
    write = terminalreporter.write_line
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if hasattr(r, "nodeid")]
    write(
        f"lora_jax test environment: {TEST_ENV} (jax {jax.__version__}); "
        f"{len(skipped)} test(s) skipped"
    )
    for report in skipped:
        write(f"  skipped {report.nodeid}: {_skip_reason(report)}")
