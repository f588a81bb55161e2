"""Shared fixtures for the lora_jax core tests, and the rule that no test quietly skips.

Base params are filled from NumPy rather than ``jax.random``: the default
threefry PRNG compiles a new XLA program for every new shape, which costs
seconds per shape on a small CPU and would dominate the suite's runtime.

**Skips.** ``make test`` builds the newest environment, which has every optional
package the tests use (torch, peft, orbax, hypothesis, the examples' extras): there
a skipped test is a *failure* (a missing torch or peft must not turn the PEFT
round trips into silent no-ops). Only the oldest-JAX environment (``make
test-oldest``) may skip, and it lists what it skipped and why at the end of the
run. The environment is ``LORA_JAX_TEST_ENV`` (``newest`` or ``oldest``, set by
the Makefile), else ``oldest`` when JAX is the oldest supported version, else
``newest``.
"""

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
SKIPPED: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def test_env() -> str:
    """``"newest"`` or ``"oldest"``: the environment this run is in (see the module doc)."""
    return TEST_ENV


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In the newest environment a skip is turned into a failure; elsewhere it is recorded."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if TEST_ENV == "newest":
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in the newest test environment, which must run every test "
            f"(LORA_JAX_TEST_ENV={TEST_ENV}, jax {jax.__version__}): {reason}"
        )
    else:
        SKIPPED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    """Says which environment ran, and every skip with its reason."""
    write = terminalreporter.write_line
    write(
        f"lora_jax test environment: {TEST_ENV} (jax {jax.__version__}); "
        f"{len(SKIPPED)} test(s) skipped"
    )
    for nodeid, reason in SKIPPED:
        write(f"  skipped {nodeid}: {reason}")
