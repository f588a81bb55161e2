"""qwix LoRA state <-> lora_jax delta: exact round trips, and a qwix-LoRA model's output
equals lora_jax's implicit output with the converted delta.

The qwix side is qwix itself (0.1.8, as tunix brings it): ``qwix.apply_lora_to_model``
adds its ``<name>_lora_a`` / ``<name>_lora_b`` LoRAParams to a copy of the model and
runs ``x @ W + (alpha / r) (x @ A) @ B`` by intercepting dot_general, einsum and conv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import nnx as lora_nnx

pytestmark = pytest.mark.tunix

RANK, ALPHA = 3, 6.0


class Einsum(nnx.Module):
    def __init__(self, equation, shape, rngs):
        self.equation = equation
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.5)

    def __call__(self, x):
        return jnp.einsum(self.equation, x, self.w[...])


class Net(nnx.Module):
    """A conv, an einsum with a 3-D kernel, a dot_general contracting two kernel axes
    (qwix flattens them in A), and a Linear."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3,), rngs=rngs)  # kernel (3, 2, 4)
        self.q = Einsum("btd,dnh->btnh", (4, 2, 3), rngs)  # kernel (4, 2, 3)
        self.o = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)  # kernel (2, 3, 4)
        self.fc = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x)
        return self.fc(self.o(jnp.tanh(self.q(h))))


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 2)), jnp.float32)


def _randomized_lora(model, seed=3):
    """Both qwix factors nonzero (qwix starts B at zero)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.LoRAParam)
    state = jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.4 * rng.standard_normal(x.shape), x.dtype), state
    )
    nnx.update(model, state)
    return state


def _qwix_model(plain, *inputs, module_path=".*", **kwargs):
    qwix = pytest.importorskip("qwix")
    provider = qwix.LoraProvider(module_path=module_path, rank=RANK, alpha=ALPHA)
    return qwix.apply_lora_to_model(plain, provider, *inputs, rngs=nnx.Rngs(7), **kwargs)


def _flat(tree):
    return lj.advanced.leaves_with_paths(tree)[0]


def test_qwix_model_output_equals_implicit_with_the_converted_delta():
    plain = Net(nnx.Rngs(0))
    qm = _qwix_model(plain, X)
    qwix_state = _randomized_lora(qm)
    shapes = {p: tuple(x.shape) for p, x in _flat(qwix_state)}
    assert shapes == {  # qwix's own layouts, as this test relies on them
        "conv/kernel_lora_a": (3, 2, RANK),
        "conv/kernel_lora_b": (RANK, 4),
        "q/w_lora_a": (4, RANK),
        "q/w_lora_b": (RANK, 2, 3),
        "o/kernel_lora_a": (6, RANK),
        "o/kernel_lora_b": (RANK, 4),
        "fc/kernel_lora_a": (4, RANK),
        "fc/kernel_lora_b": (RANK, 5),
    }

    graphdef, base = nnx.split(plain)
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    delta = lora_nnx.from_qwix(qwix_state, base, alpha=ALPHA, layouts=lj.infer_layouts(f, base, X))
    assert delta["o"]["kernel"].a.shape == (2, 3, RANK)
    want = np.asarray(qm(X))
    assert float(np.abs(want - np.asarray(plain(X))).max()) > 0.1  # the adapter matters
    np.testing.assert_allclose(
        lj.implicit(f, strict=True)(base, delta, X), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(lora_nnx.from_delta(plain, delta)(X), want, rtol=1e-5, atol=1e-5)


def test_qwix_state_round_trips_exactly():
    plain = Net(nnx.Rngs(0))
    qm = _qwix_model(plain, X)
    qwix_state = _randomized_lora(qm)
    graphdef, base = nnx.split(plain)
    layouts = lj.infer_layouts(lambda s, x: nnx.merge(graphdef, s)(x), base, X)
    delta = lora_nnx.from_qwix(qwix_state, base, alpha=ALPHA, layouts=layouts)

    back = lora_nnx.to_qwix(delta, like=nnx.state(qm, nnx.LoRAParam))
    for (p, x), (q, y) in zip(_flat(back), _flat(qwix_state)):
        assert p == q and x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y, err_msg=p)
    again = lora_nnx.from_qwix(lora_nnx.to_qwix(delta), base, alpha=ALPHA, layouts=layouts)
    for (p, x), (_, y) in zip(_flat(again), _flat(delta)):
        np.testing.assert_array_equal(x, y, err_msg=p)
    # A delta trained by lora_jax goes into the qwix model and reproduces its own output.
    trained = jax.tree_util.tree_map(lambda x: x * 1.5, delta)
    nnx.update(qm, lora_nnx.to_qwix(trained, like=nnx.state(qm, nnx.LoRAParam)))
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    np.testing.assert_allclose(qm(X), lj.implicit(f)(base, trained, X), rtol=1e-5, atol=1e-5)


def test_bad_qwix_states_name_the_leaf():
    base = {"q": {"w": jnp.ones((8, 2, 4))}, "fc": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(lj.LoraStructureError, match="fc/kernel_lora_a but no fc/kernel_lora_b"):
        lora_nnx.from_qwix({"fc/kernel_lora_a": jnp.ones((4, 2))}, base, alpha=1.0)
    with pytest.raises(lj.LoraStructureError, match="'head'"):
        lora_nnx.from_qwix(
            {"head_lora_a": jnp.ones((4, 2)), "head_lora_b": jnp.ones((2, 3))}, base, alpha=1.0
        )
    with pytest.raises(lj.LoraStructureError, match="q/w.*more than two axes"):
        lora_nnx.from_qwix(
            {"q/w_lora_a": jnp.ones((8, 2)), "q/w_lora_b": jnp.ones((2, 8))}, base, alpha=1.0
        )
    with pytest.raises(lj.LoraStructureError, match="q/w.*do not fit"):  # an einsum batch axis
        lora_nnx.from_qwix(
            {"q/w_lora_a": jnp.ones((2, 8, 2)), "q/w_lora_b": jnp.ones((2, 4))},
            base,
            alpha=1.0,
            layouts={"q/w": lj.KernelLayout("sio")},
        )
    _, rs = lj.init_lora(
        jax.random.key(0), base, lj.LoraConfig(targets="fc/kernel", rank=2, use_rslora=True)
    )
    with pytest.raises(lj.LoraStructureError, match="fc/kernel.*rsLoRA"):
        lora_nnx.to_qwix(rs)


def test_tunix_qwen3_with_qwix_lora_equals_lora_jax(tiny_qwen3):
    """A tunix model adapted by qwix, as tunix's docs do it, and its LoRA state converted."""
    plain = tiny_qwen3()
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 6)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((6, 6), bool)), (2, 6, 6))
    qm = _qwix_model(
        plain,
        tokens,
        positions,
        None,
        mask,
        module_path=".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj",
    )
    qwix_state = _randomized_lora(qm)
    assert len(_flat(qwix_state)) == 2 * 7 * 2
    graphdef, base = nnx.split(plain)
    f = lambda s, *a: nnx.merge(graphdef, s)(*a)[0]  # noqa: E731
    layouts = lj.infer_layouts(f, base, tokens, positions, None, mask)
    delta = lora_nnx.from_qwix(qwix_state, base, alpha=ALPHA, layouts=layouts)
    want = np.asarray(qm(tokens, positions, None, mask)[0])
    got = lj.implicit(f, strict=True)(base, delta, tokens, positions, None, mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    lm = lora_nnx.from_delta(plain, delta)
    np.testing.assert_allclose(lm(tokens, positions, None, mask)[0], want, rtol=1e-4, atol=1e-4)
