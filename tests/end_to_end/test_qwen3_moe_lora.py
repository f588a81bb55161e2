"""LoRA on the Flax Qwen3-MoE's attention and experts: ``implicit`` (strict, experts low-rank
through ``ragged_dot``) against merge-on-the-fly.

The forward and the gradients of every LoRA factor (attention ``a``/``b`` and
the per-expert ``a (E, in, r)``/``b (E, r, out)``) must agree with the same
loss computed on ``merge(base, delta)`` -- an independent path through the
dense kernels -- to float32 rounding. The parity with transformers and PEFT
is ``test_qwen3_moe.py`` (marked ``torch``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples.common.lm import cross_entropy
from examples.qwen3_moe import (
    ATTENTION,
    EXPERT_LAYOUT,
    EXPERTS,
    Qwen3Moe,
    Qwen3MoeConfig,
    init_params,
)

CFG = Qwen3MoeConfig(
    vocab_size=48, hidden_size=16, head_dim=4, moe_intermediate_size=8, num_experts=4,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip
MODEL = Qwen3Moe(CFG)


@pytest.fixture(scope="module")
def setup(randomize):
    params = randomize(jax.eval_shape(lambda: init_params(CFG)), seed=0, scale=0.3)
    cfg = lj.LoraConfig(
        targets=[ATTENTION, EXPERTS], rank=2, alpha=4, layouts={EXPERTS: EXPERT_LAYOUT}
    )
    shapes = jax.eval_shape(lambda p: lj.init_lora(jax.random.key(0), p, cfg)[1], params)
    delta = randomize(shapes, seed=1, scale=0.3)  # nonzero b: every gradient is live
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7)))
    return params, delta, tokens


def loss_implicit(delta, base, tokens):
    logits = lj.implicit(MODEL.apply, strict=True)(base, delta, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])


def loss_merged(delta, base, tokens):
    return cross_entropy(MODEL.apply(lj.merge(base, delta), tokens[:, :-1]), tokens[:, 1:])


@pytest.mark.slow  # two train-step compiles of a MoE: ~40 s on 2 loaded cores
def test_strict_implicit_matches_merge_forward_and_gradients(setup):
    params, delta, tokens = setup
    li, gi = jax.jit(jax.value_and_grad(loss_implicit))(delta, params, tokens)
    lm, gm = jax.jit(jax.value_and_grad(loss_merged))(delta, params, tokens)
    np.testing.assert_allclose(float(li), float(lm), rtol=1e-5)
    flat_i = lj.advanced.leaves_with_paths(gi, is_leaf=lj.advanced.is_factors)[0]
    flat_m = dict(lj.advanced.leaves_with_paths(gm, is_leaf=lj.advanced.is_factors)[0])
    checked = 0
    for path, fi in flat_i:
        if fi is None:
            continue
        fm = flat_m[path]
        for name in ("a", "b"):
            x, y = np.asarray(getattr(fi, name)), np.asarray(getattr(fm, name))
            assert np.abs(y).max() > 0, (path, name)
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * np.abs(y).max(), err_msg=path)
            checked += 1
    experts = [p for p, f in flat_i if f is not None and "experts" in p]
    assert len(experts) == 4 and checked == 2 * (4 + 8)  # 2 layers x (2 expert + 4 attention)
