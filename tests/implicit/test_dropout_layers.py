"""LoRA dropout in a model whose layers run under ``nn.scan``: each layer draws its own mask.

The masks are read off the forward pass with probe factors (``W = 0``, ``A = I``,
``B = I``): each layer's output is then ``mask_l * x / keep`` on the same input ``x``,
so no part of the check depends on how the library draws its keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj

LAYERS, D, P = 4, 16, 0.5


class Probe(nn.Module):
    """One layer: the carry passes through unchanged, the layer's output is collected."""

    @nn.compact
    def __call__(self, h, _):
        return h, nn.Dense(D, use_bias=False, name="dense")(h)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        _, ys = nn.scan(
            Probe, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )(name="layers")(x, None)
        return ys  # (LAYERS, *x.shape)


def layer_masks(key):
    x = jnp.ones((64, D))
    params = jax.jit(Scanned().init)(jax.random.key(0), x)
    zero = jax.tree.map(jnp.zeros_like, params)  # W = 0 in every layer
    eye = jnp.broadcast_to(jnp.eye(D), (LAYERS, D, D))
    delta = {
        "params": {
            "layers": {
                "dense": {
                    "kernel": lj.LoraFactors(
                        eye, eye, alpha=float(D), layout=lj.KernelLayout("sio")
                    )
                }
            }
        }
    }
    fn = jax.jit(
        lambda b, d, x, k: lj.implicit(Scanned().apply, dropout=P, strict=True)(
            b, d, x, lora_dropout_key=k
        )
    )
    out = np.asarray(fn(zero, delta, x, key))  # mask / keep
    assert set(np.unique(np.round(out * (1 - P), 6)).tolist()) <= {0.0, 1.0}
    return out != 0


def test_each_scanned_layer_draws_its_own_mask():
    masks = layer_masks(jax.random.key(3))
    assert masks.shape == (LAYERS, 64, D)
    n = masks[0].size
    for layer in masks:  # each a Bernoulli(0.5) draw: within 5 standard deviations
        assert abs(layer.mean() - (1 - P)) < 5 * np.sqrt(P * (1 - P) / n), layer.mean()
    for i in range(LAYERS):
        for j in range(i + 1, LAYERS):
            # independent masks agree on about half the entries; one key would agree on all
            agree = (masks[i] == masks[j]).mean()
            assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / n), (i, j, agree)
    # another key, other masks; the same key, the same masks
    assert (layer_masks(jax.random.key(3)) == masks).all()
    assert (layer_masks(jax.random.key(4)) != masks).any()
