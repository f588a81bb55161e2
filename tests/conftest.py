"""Shared fixtures for the lora_jax core tests.

Base params are filled from NumPy rather than ``jax.random``: the default
threefry PRNG compiles a new XLA program for every new shape, which costs
seconds per shape on a small CPU and would dominate the suite's runtime.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


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
