"""QLoRA over experts kernels: NF4 blocks stay inside one expert, and ``implicit`` runs the
LoRA branch over a quantized ``(E, in, out)`` base through ``ragged_dot`` and an einsum over
experts with no fallback, equal to merging over the dequantized base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj

E, D, F, T = 4, 16, 64, 8
GROUPS = jnp.asarray([2, 3, 0, 3], jnp.int32)


def test_blocks_never_straddle_experts():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((E, D, F)).astype(np.float32)
    loud = w.copy()
    loud[1] *= 1000.0  # one expert's scale must not reach the others' blocks
    q, q_loud = (
        lj.quantize({"w": jnp.asarray(v)}, "w", layouts={"w": "eio"})["w"] for v in (w, loud)
    )
    assert q.axes == "eio" and q.scales.shape[0] == E
    back, back_loud = lj.dequantize({"w": q})["w"], lj.dequantize({"w": q_loud})["w"]
    for e in (0, 2, 3):
        np.testing.assert_array_equal(np.asarray(back[e]), np.asarray(back_loud[e]))


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: lax.ragged_dot(x, p["w"], GROUPS),
        lambda p, x: jnp.einsum("td,edf->tef", x, p["w"]),
        lambda p, x: jnp.einsum("td,tdf->tf", x, p["w"][jnp.arange(T) % E]),
    ],
    ids=["ragged_dot", "einsum", "gather_per_token"],
)
def test_qlora_over_experts_matches_the_dequantized_merge(fn):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((E, D, F)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    q = lj.quantize({"w": w}, "w", layouts={"w": "eio"})
    _, delta = lj.init_lora(
        jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=2, layouts={"w": "eio"})
    )
    delta = jax.tree.map(lambda v: v + 0.1, delta)
    f, w_hat = delta["w"], lj.dequantize(q)["w"]
    run = lj.implicit(fn, strict=True)

    @jax.jit
    def both(d):
        loss = lambda d: jnp.sum(jnp.sin(run(q, d, x)))  # noqa: E731
        merged = lambda d: w_hat + d["w"].scale * jnp.einsum("eir,ero->eio", d["w"].a, d["w"].b)  # noqa: E731
        ref = lambda d: jnp.sum(jnp.sin(fn({"w": merged(d)}, x)))  # noqa: E731
        return run(q, d, x), fn({"w": merged(d)}, x), jax.grad(loss)(d), jax.grad(ref)(d)

    with jax.default_matmul_precision("highest"):
        y, y_ref, g, g_ref = both(delta)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g["w"].a), np.asarray(g_ref["w"].a), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g["w"].b), np.asarray(g_ref["w"].b), rtol=2e-5, atol=2e-5)
    assert f.a.shape == (E, D, 2)
