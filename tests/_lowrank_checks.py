"""Helpers shared by the implicit-LoRA test files (test_implicit, test_quant_implicit)."""

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _highest_precision():
    """float32 matmuls at full precision, so tolerances measure lora_jax, not the backend."""
    with jax.default_matmul_precision("highest"):
        yield


def _trained(delta, seed=7):
    """A delta with both factors non-zero, as after training."""
    leaves, treedef = jax.tree_util.tree_flatten(delta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _rel(a, b):
    """max |a - b| relative to max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
