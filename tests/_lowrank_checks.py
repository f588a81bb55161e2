"""Helpers shared by the implicit-LoRA test files (test_implicit, test_quant_implicit)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
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
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def _rel(a, b):
    """max |a - b| relative to max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def _scanned_dense(features, remat):
    """A model of 3 ``tanh(Dense(features))`` layers stacked by ``nn.scan`` (kernel
    ``(3, features, features)``, layout ``sio``), each layer rematerialised if ``remat``."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, c, _):
            return jnp.tanh(nn.Dense(features, name="fc")(c)), None

    block = nn.remat(Block) if remat else Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return stack(name="layers")(x, None)[0]

    return Scanned()
