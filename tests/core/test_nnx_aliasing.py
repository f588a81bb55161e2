"""No base lora_jax returns shares a Variable with a live Flax NNX module.

``nnx.split(model)`` gives an ``nnx.State`` holding the module's own
``Variable`` objects, and ``nnx.update(model, ...)`` writes into them. A base
that kept those Variables would silently become ``W + s A B`` when the adapter
is merged into the module (the NNX example's documented step), and the next
``implicit(base, delta)`` would apply the adapter twice. Each function that
returns a base is checked here against the module it came from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj

X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)


def trained(delta, seed=3, scale=0.3):
    """The delta with every factor moved, as after training (B is no longer zero)."""
    leaves, treedef = jax.tree_util.tree_flatten(delta)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves]
    )


def variables(tree) -> list:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def assert_shares_no_variable(tree, model):
    own = {id(v) for v in variables(nnx.split(model)[1])}
    assert own, "the module has Variables to compare against"
    shared = [v for v in variables(tree) if isinstance(v, nnx.Variable) and id(v) in own]
    assert not shared, f"{len(shared)} Variable(s) shared with the live module"


def test_merging_into_the_module_leaves_the_base_alone():
    """The issue's repro: a 4x3 Linear, merge into the module, run implicit again."""
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = X[:, :4]
    kernel = np.asarray(model.kernel[...])
    graphdef, state = nnx.split(model)
    base, delta = lj.init_lora(jax.random.key(0), state, lj.LoraConfig(targets="kernel", rank=2))
    delta = trained(delta)
    forward = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x), strict=True)
    (f,) = jax.tree.leaves(delta, is_leaf=lj.advanced.is_factors)  # the kernel's LoraFactors
    want = np.asarray(x) @ (kernel + f.scale * np.asarray(f.a) @ np.asarray(f.b)) + np.asarray(
        model.bias[...]
    )
    before = forward(base, delta, x)
    np.testing.assert_allclose(before, want, rtol=1e-5, atol=1e-5)

    nnx.update(model, lj.merge(base, delta))  # the module now holds W + s A B
    np.testing.assert_array_equal(np.asarray(base["kernel"][...]), kernel)
    after = forward(base, delta, x)  # the adapter once, as before
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, ids):
        return self.fc2(nnx.gelu(self.fc1(self.embed(ids).mean(axis=1))))


def test_the_nnx_example_sequence():
    """examples/nnx_finetune.py: split, init_lora, train the delta, merge into the module
    for inference, unmerge back: every step sees the base it was given."""
    model = Mlp(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 11, (4, 3)))
    graphdef, state = nnx.split(model)
    original = model(ids)
    base, delta = lj.init_lora(
        jax.random.key(0), state, lj.LoraConfig(targets=r"(fc1|fc2)/kernel", rank=4, alpha=8)
    )
    forward = lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x), strict=True)
    delta = trained(delta)
    adapted = forward(base, delta, ids)
    assert float(jnp.max(jnp.abs(adapted - original))) > 1e-2  # the adapter does something

    nnx.update(model, lj.merge(base, delta))
    np.testing.assert_allclose(model(ids), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(base, delta, ids), adapted, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nnx.merge(graphdef, base)(ids), original, rtol=1e-6, atol=1e-6)

    nnx.update(model, lj.unmerge(nnx.state(model), delta))
    np.testing.assert_allclose(model(ids), original, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(base, delta, ids), adapted, rtol=1e-6, atol=1e-6)


CFG = lj.LoraConfig(targets=r"fc./kernel", rank=2)


def _sharded(state, init):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return lj.init_lora_sharded(
        jax.random.key(0), state, lj.LoraConfig(targets=r"fc./kernel", rank=2, init=init), mesh=mesh
    )


def _requantized(state):
    qbase = lj.quantize(state, r"fc./kernel", scheme="int8")
    return lj.requantize(state, qbase)[0]


def _loaded(state, tmp_path):
    lj.save_base(tmp_path / "base.safetensors", state)
    return lj.load_base(tmp_path / "base.safetensors", like=state)


#: Every public function that returns a base (or params for the module), from a live state.
BASES = {
    "init_lora": lambda s, d, tmp: lj.init_lora(jax.random.key(0), s, CFG)[0],
    "init_lora dora": lambda s, d, tmp: lj.init_lora(
        jax.random.key(0), s, lj.LoraConfig(targets=r"fc./kernel", rank=2, use_dora=True)
    )[0],
    "init_lora pissa": lambda s, d, tmp: lj.init_lora(
        jax.random.key(0), s, lj.LoraConfig(targets=r"fc./kernel", rank=2, init="pissa")
    )[0],
    "init_lora_sharded": lambda s, d, tmp: _sharded(s, "kaiming")[0],
    "init_lora_sharded pissa": lambda s, d, tmp: _sharded(s, "pissa")[0],
    "pissa": lambda s, d, tmp: lj.pissa(s, d)[0],
    "olora": lambda s, d, tmp: lj.olora(s, d)[0],
    "merge": lambda s, d, tmp: lj.merge(s, d),
    "unmerge": lambda s, d, tmp: lj.unmerge(s, d),
    "quantize": lambda s, d, tmp: lj.quantize(s, r"fc./kernel", scheme="int8"),
    "dequantize": lambda s, d, tmp: lj.dequantize(s),
    "requantize": lambda s, d, tmp: _requantized(s),
    "loftq": lambda s, d, tmp: lj.loftq(s, d, scheme="int8", block_size=None)[0],
    "load_base": lambda s, d, tmp: _loaded(s, tmp),
}


@pytest.mark.parametrize("name", list(BASES))
def test_no_returned_base_shares_a_variable_with_the_module(name, tmp_path):
    model = Mlp(nnx.Rngs(0))
    _, state = nnx.split(model)
    _, delta = lj.init_lora(jax.random.key(0), state, CFG)
    delta = trained(delta)
    out = BASES[name](state, delta, tmp_path)
    assert_shares_no_variable(out, model)
    # and so writing into the module leaves the returned tree as it was
    kept = [np.asarray(leaf) for leaf in jax.tree.leaves(out)]
    nnx.update(model, jax.tree.map(lambda v: v + 1.0, nnx.state(model)))
    for a, b in zip(kept, jax.tree.leaves(out)):
        np.testing.assert_array_equal(a, np.asarray(b))
