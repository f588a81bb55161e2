"""Rebuilding low-rank inputs in the backward (lora_jax._implicit.rebuild, low_rank_rebuilt)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax._implicit.low_rank import OUTER_MAX_RANK, expand
from lora_jax._implicit.rebuild import Graph, input_chain


def _chain(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr = closed.jaxpr
    return jaxpr, input_chain(Graph(jaxpr), jaxpr.outvars[0])


def _rebuild(jaxpr, chain, args):
    """Evaluates the chain on the leaves' values, read off a full evaluation."""
    env = {}
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        ins = [v.val if hasattr(v, "val") else env[v] for v in eqn.invars]
        outs = eqn.primitive.bind(*ins, **eqn.params)
        for var, val in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
            env[var] = val
    bind = lambda eqn, ins: [eqn.primitive.bind(*ins, **eqn.params)]  # noqa: E731
    return chain.rebuild(bind, [env[v] for v in chain.leaves])


def test_gelu_output_is_rebuilt_from_its_two_product_operands_without_tanh():
    h = jax.random.normal(jax.random.key(0), (16, 32))
    jaxpr, chain = _chain(lambda h: jax.nn.gelu(h, approximate=True), h)
    assert chain is not None
    names = [e.primitive.name for e in chain.eqns]
    assert "tanh" not in names and len(names) <= 2, names  # cheap: the product only
    assert jaxpr.invars[0] in chain.leaves  # h, which GELU's backward keeps
    np.testing.assert_allclose(_rebuild(jaxpr, chain, [h]), jax.nn.gelu(h), rtol=1e-6)


def test_layernorm_output_is_rebuilt_from_the_centred_input_and_small_statistics():
    x = jax.random.normal(jax.random.key(1), (16, 32))
    ln = nn.LayerNorm()
    params = ln.init(jax.random.key(2), x)
    flat = jax.tree.leaves(params)
    jaxpr, chain = _chain(
        lambda *a: ln.apply(jax.tree.unflatten(jax.tree.structure(params), a[:-1]), a[-1]), *flat, x
    )
    assert chain is not None
    names = {e.primitive.name for e in chain.eqns}
    assert not names & {"reduce_sum", "rsqrt", "sub"}, names  # statistics are not recomputed
    big = [v for v in chain.leaves if v.aval.shape == x.shape]
    assert len(big) == 1  # the centred input x - mean
    np.testing.assert_allclose(
        _rebuild(jaxpr, chain, [*flat, x]), ln.apply(params, x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, w: x @ w,  # a dot's output: nothing cheaper to keep
        lambda x, w: jnp.tanh(x @ w),  # tanh's output is kept by its own backward
        lambda x, w: x @ w + jnp.sin(x) @ w,  # a sum of two large values nobody keeps
        lambda x, w: (x @ w) * 0.5 + 1.0,  # linear in a dot: no kept value to start from
        lambda x, w: jnp.where(x @ w > 0, x @ w, 0.0),  # a select keeps only its mask
        lambda x, w: jax.nn.relu(x @ w),  # custom_jvp around max(h, 0)
    ],
    ids=["dot", "tanh", "sum", "affine", "where", "relu"],
)
def test_no_chain_where_nothing_is_gained(fn):
    _, chain = _chain(fn, jnp.ones((8, 8)), jnp.ones((8, 8)))
    assert chain is None


class _Block(nn.Module):
    """Pre-LayerNorm MLP block: LN -> fc1 -> GELU -> fc2, plus a residual."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4 * x.shape[-1], name="fc1")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(h))


class _Stack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(_ScanBlock) if self.remat else _ScanBlock
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(
            name="layers"
        )(x, None)
        return x


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return _Block(name="block")(x), None


def _setup(model, d=16, tokens=12, layouts=None):
    x = jax.random.normal(jax.random.key(0), (tokens, d))
    params = model.init(jax.random.key(1), x)
    cfg = lora_jax.LoraConfig(
        targets=r".*/(fc1|fc2)/kernel", rank=4, alpha=8.0, layouts=layouts or {}
    )
    base, delta = lora_jax.init_lora(jax.random.key(2), params, cfg)
    delta = jax.tree.map(
        lambda f: (
            dataclasses.replace(f, b=jax.random.normal(jax.random.key(3), f.b.shape) * 0.1)
            if lora_jax.advanced.is_factors(f)
            else f
        ),
        delta,
        is_leaf=lora_jax.advanced.is_factors,
    )
    return x, base, delta


@pytest.mark.parametrize(
    "model,layouts",
    [
        (_Block(), None),
        (_Stack(remat=False), {r".*/(fc1|fc2)/kernel": "sio"}),
        (_Stack(remat=True), {r".*/(fc1|fc2)/kernel": "sio"}),
    ],
    ids=["block", "scan", "scan_remat"],
)
def test_rebuilt_inputs_give_merge_on_the_fly_gradients(model, layouts):
    x, base, delta = _setup(model, layouts=layouts)
    loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731

    def implicit_loss(d, recompute):
        return loss(lora_jax.implicit(model.apply, rebuild_inputs=recompute)(base, d, x))

    merged_loss = lambda d: loss(model.apply(lora_jax.merge(base, d), x))  # noqa: E731
    ref = jax.grad(merged_loss)(delta)
    for recompute in (True, False):
        got = jax.jit(jax.grad(implicit_loss), static_argnums=1)(delta, recompute)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6)


class _Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(4):
            x = _Block(name=f"block{i}")(x)
        return x


def test_rebuilding_inputs_lowers_the_compiled_step_memory():
    """XLA's own buffer assignment: the backward no longer keeps the LN and GELU outputs."""
    x, base, delta = _setup(_Deep(), d=128, tokens=512)

    def temp_bytes(recompute):
        fn = lora_jax.implicit(_Deep().apply, rebuild_inputs=recompute)
        step = jax.jit(jax.grad(lambda d: jnp.sum(fn(base, d, x) ** 2)))
        return step.lower(delta).compile().memory_analysis().temp_size_in_bytes

    saved, rebuilt = temp_bytes(False), temp_bytes(True)
    # One GELU output is tokens * 4d * 4 bytes = 1 MiB; four blocks must save at least two.
    assert saved - rebuilt >= 2 * 512 * 512 * 4, (saved, rebuilt)


@pytest.mark.parametrize("r", [1, OUTER_MAX_RANK, OUTER_MAX_RANK + 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_expand_is_the_rank_r_matmul(r, dtype):
    u = jax.random.normal(jax.random.key(0), (3, 7, r)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (3, r, 5)).astype(dtype)
    got = expand(u, b)
    assert got.dtype == dtype and got.shape == (3, 7, 5)
    want = np.einsum("bmr,brn->bmn", np.asarray(u, np.float64), np.asarray(b, np.float64))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * r)
