"""Checkpointed blocks that return their own state run low-rank under strict ``implicit``.

A block under ``nnx.remat`` (tunix's ``RematConfig.BLOCK``, MaxText's remat
policies) returns the module's state from the checkpointed body, and so does
``nn.remat`` when collections are mutable and a ``jax.checkpoint`` of a
``(params, x) -> (y, params)`` function. Those outputs are the body's own
inputs: ``implicit`` hands them back as the caller's operands, low-rank views
kept, so strict mode (which raises wherever ``W + s * A @ B`` would be formed)
runs each form, and forward and LoRA gradients equal merge-on-the-fly's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from tests._lowrank_checks import _highest_precision, _rel, _trained  # noqa: F401

FWD_TOL = 1e-6  # relative to the output's scale
GRAD_TOL = 1e-5  # relative to each gradient leaf's scale
X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)


# --------------------------------------------------------------------------- the three forms


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(x))


class NnxModel(nnx.Module):
    """Two blocks, each run under ``nnx.remat`` (whose body returns the block's state)."""

    def __init__(self, rngs: nnx.Rngs):
        self.block0, self.block1 = NnxBlock(rngs), NnxBlock(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        for block in (self.block0, self.block1):
            x = nnx.remat(lambda b, h: b(h))(block, x)
        return self.head(x)


def nnx_remat():
    graphdef, state = nnx.split(NnxModel(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def jax_checkpoint():
    """``(y, params)`` from a checkpointed block; the returned kernel is used again after it."""
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
    }

    def block(p, x):
        return jnp.tanh(x @ p["w"]), p

    def fn(p, x):
        y, p = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)(p, x)
        return y @ p["w"] @ p["v"]

    return fn, params


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(4, name="fc")(x))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(LinenBlock)(name="block0")(x)
        x = nn.remat(LinenBlock)(name="block1")(x)
        return nn.Dense(2, name="head")(x)


def linen_remat():
    """With every collection mutable, ``nn.remat``'s body returns the params it was given."""
    model = LinenModel()
    params = model.init(jax.random.key(0), X)
    return (lambda p, x: model.apply(p, x, mutable=True)[0]), params


FORMS = {"nnx.remat": nnx_remat, "jax.checkpoint": jax_checkpoint, "nn.remat": linen_remat}


def loss_of(fn):
    return lambda *args: jnp.sum(fn(*args) ** 2)


@pytest.mark.parametrize("form", list(FORMS))
def test_strict_implicit_runs_a_checkpointed_block_that_returns_its_state(form):
    fn, params = FORMS[form]()
    base, delta = lj.init_lora(
        jax.random.key(1), params, lj.LoraConfig(targets=".*kernel|w|v", rank=2)
    )
    delta = _trained(delta)
    # strict: any kernel passed through and materialised would raise LoraImplicitError
    got = lj.implicit(fn, strict=True)(base, delta, X)
    want = fn(lj.merge(base, delta), X)
    assert _rel(got, want) < FWD_TOL

    grads = jax.grad(lambda d: loss_of(lj.implicit(fn, strict=True))(base, d, X))(delta)
    want_grads = jax.grad(lambda d: loss_of(fn)(lj.merge(base, d), X))(delta)
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    assert pairs and len(pairs) == len(jax.tree.leaves(delta))
    for g, w in pairs:
        assert float(jnp.max(jnp.abs(w))) > 0
        assert _rel(g, w) < GRAD_TOL


def test_the_same_blocks_without_pass_through_fail_strict_mode():
    """The check has teeth: a checkpointed body that returns a *transformed* kernel
    (no low-rank rule reaches the function's output) still raises in strict mode."""
    _, params = jax_checkpoint()
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets="w", rank=2))

    def leaky(p, x):
        return jax.checkpoint(lambda p, x: (x @ p["w"], p["w"] * 2.0))(p, x)

    with pytest.raises(lj.LoraImplicitError, match="'w'"):
        lj.implicit(leaky, strict=True)(base, delta, X)


def test_infer_layouts_follows_a_kernel_returned_by_a_checkpointed_body():
    """``v`` is not used inside the block: its only use is after the block returned it."""
    fn, params = jax_checkpoint()
    layouts = lj.infer_layouts(fn, params, X)
    assert layouts == {"w": lj.KernelLayout("io", "dense"), "v": lj.KernelLayout("io", "dense")}
