"""LoraBias (PEFT's lora_bias) and TokenRows (PEFT's trainable tokens): init, merge, unmerge,
implicit, gradients and optax, each against an independent numpy formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import (
    LoraBias,
    LoraConfig,
    LoraConfigError,
    LoraStructureError,
    LoraTargetError,
    TokenRows,
)

FAST = settings(max_examples=25, deadline=None)
HI = jax.lax.Precision.HIGHEST


def lm_params(rng, vocab=10, dim=4, out=3):
    return {
        "emb": {"embedding": jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32)},
        "fc": {
            "kernel": jnp.asarray(rng.standard_normal((dim, dim)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(dim), jnp.float32),
        },
        "out": {"kernel": jnp.asarray(rng.standard_normal((dim, out)), jnp.float32)},
    }


def lm(p, ids):
    """Embedding gather -> Dense with bias -> the head tied to the embedding (and one more)."""
    table = p["emb"]["embedding"]
    h = jnp.tanh(jnp.dot(table[ids], p["fc"]["kernel"], precision=HI) + p["fc"]["bias"])
    return jnp.dot(h, table.T, precision=HI), jnp.dot(h, p["out"]["kernel"], precision=HI)


def trained_delta(rng, params):
    cfg = LoraConfig(
        targets="fc/kernel", rank=2, alpha=3.0, lora_bias=True, trainable_tokens={"emb/.*": [7, 2]}
    )
    _, delta = lj.init_lora(jax.random.key(0), params, cfg)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), delta)


def numpy_lm(params, delta, ids):
    """The adapted model by hand: W + s A B, c + s b, table rows 7, 2 plus diff."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    f, bias, rows = (
        delta[k][n] for k, n in (("fc", "kernel"), ("fc", "bias"), ("emb", "embedding"))
    )
    s = 3.0 / 2
    w = p["fc"]["kernel"] + s * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    c = p["fc"]["bias"] + s * np.asarray(bias.b, np.float64)
    table = p["emb"]["embedding"].copy()
    table[[7, 2]] += np.asarray(rows.diff, np.float64)
    h = np.tanh(table[np.asarray(ids)] @ w + c)
    return h @ table.T, h @ p["out"]["kernel"], h, table


def test_init_places_zero_entries_beside_the_targets():
    params = lm_params(np.random.default_rng(0))
    cfg = LoraConfig(
        targets="fc/kernel", rank=2, alpha=3.0, lora_bias=True, trainable_tokens={"emb/.*": [7, 2]}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    bias, rows = delta["fc"]["bias"], delta["emb"]["embedding"]
    assert isinstance(bias, LoraBias) and bias.scale == 1.5 and not bias.b.any()
    assert isinstance(rows, TokenRows) and rows.indices == (7, 2) and rows.diff.shape == (2, 4)
    assert not rows.diff.any() and delta["out"]["kernel"] is None
    merged = lj.merge(base, delta)  # step 0 is the base model
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    s = lj.summarize(base, delta)
    assert s.trainable_params == 4 * 2 + 2 * 4 + 4 + 2 * 4  # a, b, lora_B bias, two rows


def test_merge_implicit_and_gradients_match_the_formula():
    """Outputs of merge and implicit against the model by hand; d/db sum(g * y) = s * sum g_pre
    (the pre-activation's cotangent); d/d(diff) = the table's gradient at the rows: the
    gather's scatter plus the tied head's G^T h."""
    rng = np.random.default_rng(2)
    params = lm_params(rng)
    delta = trained_delta(rng, params)
    ids = jnp.array([[7, 0, 2], [2, 9, 7]])
    want_tied, want_out, _, _ = numpy_lm(params, delta, ids)
    for got_tied, got_out in (
        lm(lj.merge(params, delta), ids),
        lj.implicit(lm)(params, delta, ids),
    ):
        np.testing.assert_allclose(got_tied, want_tied, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    g_tied = rng.standard_normal((2, 3, 10))

    def loss(d):
        tied, _ = lj.implicit(lm)(params, d, ids)
        return jnp.sum(tied * g_tied)

    grads = jax.grad(loss)(delta)
    _, _, h, table = numpy_lm(params, delta, ids)
    s = 1.5
    w = np.asarray(params["fc"]["kernel"], np.float64) + s * np.asarray(
        delta["fc"]["kernel"].a, np.float64
    ) @ np.asarray(delta["fc"]["kernel"].b, np.float64)
    g_h = g_tied @ table  # (2, 3, dim)
    g_pre = g_h * (1 - h**2)
    np.testing.assert_allclose(grads["fc"]["bias"].b, s * g_pre.sum((0, 1)), rtol=1e-4, atol=1e-5)
    g_table = np.einsum("btv,btd->vd", g_tied, h)  # the tied head
    g_x = g_pre @ w.T  # the gathered rows' cotangent
    np.add.at(g_table, np.asarray(ids).reshape(-1), g_x.reshape(-1, 4))
    np.testing.assert_allclose(
        grads["emb"]["embedding"].diff, g_table[[7, 2]], rtol=1e-4, atol=1e-5
    )


def test_optax_trains_only_the_bias_and_the_rows():
    rng = np.random.default_rng(3)
    params = lm_params(rng)
    cfg = LoraConfig(
        targets="fc/kernel", rank=2, lora_bias=True, trainable_tokens={"emb/embedding": [4]}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    opt = lj.train_delta_only(optax.adam(0.1))
    tree = {"base": base, "delta": delta}
    state = opt.init(tree)
    ids = jnp.array([[4, 1, 4]])

    def loss(t):
        tied, out = lj.implicit(lm)(t["base"], t["delta"], ids)
        return jnp.sum(tied**2) + jnp.sum(out)

    @jax.jit
    def step(tree, state):
        updates, state = opt.update(jax.grad(loss)(tree), state, tree)
        return optax.apply_updates(tree, updates), loss(tree)

    new, before = step(tree, state)
    for got, want in zip(jax.tree.leaves(new["base"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(got, want)
    assert new["delta"]["fc"]["bias"].b.any() and new["delta"]["emb"]["embedding"].diff.any()
    assert new["delta"]["emb"]["embedding"].indices == (4,)
    merged = lj.merge(new["base"], new["delta"])["emb"]["embedding"]
    others = np.delete(np.arange(10), 4)
    np.testing.assert_array_equal(merged[others], params["emb"]["embedding"][others])
    assert not np.allclose(merged[4], params["emb"]["embedding"][4])
    assert jax.jit(loss)(new) < before


@pytest.mark.slow
def test_scanned_layers_bias_has_the_stack_axis():
    rng = np.random.default_rng(4)
    params = {
        "layers": {
            "kernel": jnp.asarray(rng.standard_normal((3, 4, 4)) * 0.5, jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        }
    }

    def scanned(p, x):
        def body(h, layer):
            return jnp.tanh(jnp.dot(h, layer["kernel"], precision=HI) + layer["bias"]), None

        return jax.lax.scan(body, x, p["layers"])[0]

    cfg = LoraConfig(
        targets="layers/kernel", rank=2, alpha=2.0, lora_bias=True, layouts={".*": "sio"}
    )
    base, delta = lj.init_lora(jax.random.key(1), params, cfg)
    delta = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), delta)
    assert delta["layers"]["bias"].b.shape == (3, 4)
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    h = np.asarray(x, np.float64)
    f, b = delta["layers"]["kernel"], delta["layers"]["bias"].b
    for i in range(3):
        w = np.asarray(params["layers"]["kernel"][i], np.float64) + np.asarray(
            f.a[i], np.float64
        ) @ np.asarray(f.b[i], np.float64)
        h = np.tanh(h @ w + np.asarray(params["layers"]["bias"][i]) + np.asarray(b[i]))
    np.testing.assert_allclose(scanned(lj.merge(base, delta), x), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lj.implicit(scanned)(base, delta, x), h, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@FAST
@given(
    st.integers(2, 6),
    st.integers(1, 5),
    st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True),
    st.sampled_from([1.0, 0.5, 4.0]),
    st.integers(0, 2**16),
)
def test_unmerge_inverts_merge_with_bias_and_rows(dim, out, rows, scale, seed):
    rng = np.random.default_rng(seed)
    params = {
        "emb": jnp.asarray(rng.standard_normal((8, dim)), jnp.float32),
        "fc": {
            "kernel": jnp.asarray(rng.standard_normal((dim, out)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(out), jnp.float32),
        },
    }
    delta = {
        "emb": TokenRows(
            jnp.asarray(rng.standard_normal((len(rows), dim)), jnp.float32), indices=rows
        ),
        "fc": {
            "kernel": lj.LoraFactors(
                jnp.asarray(rng.standard_normal((dim, 1)), jnp.float32),
                jnp.asarray(rng.standard_normal((1, out)), jnp.float32),
                alpha=scale,
                layout=lj.KernelLayout("io"),
            ),
            "bias": LoraBias(jnp.asarray(rng.standard_normal(out), jnp.float32), scale=scale),
        },
    }
    merged = lj.merge(params, delta)
    np.testing.assert_allclose(
        merged["fc"]["bias"], params["fc"]["bias"] + scale * delta["fc"]["bias"].b, rtol=1e-6
    )
    want = np.asarray(params["emb"]).copy()
    want[rows] += np.asarray(delta["emb"].diff)
    np.testing.assert_allclose(merged["emb"], want, rtol=1e-6)
    back = lj.unmerge(merged, delta)
    for got, orig in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, orig, rtol=1e-5, atol=1e-5)


def test_init_errors_name_the_leaf():
    params = lm_params(np.random.default_rng(5))
    with pytest.raises(LoraTargetError, match=r"'out/kernel': lora_bias=True needs a bias leaf"):
        lj.init_lora(
            jax.random.key(0), params, LoraConfig(targets=".*/kernel", lora_bias=True, rank=1)
        )
    with pytest.raises(LoraConfigError, match="does not combine with layers="):
        LoraConfig(targets="fc/kernel", lora_bias=True, layers=(0,))
    with pytest.raises(LoraConfigError, match="use_dora"):
        LoraConfig(targets="fc/kernel", lora_bias=True, use_dora=True)
    with pytest.raises(LoraConfigError, match="distinct row indices"):
        LoraConfig(targets="fc/kernel", trainable_tokens={"emb/.*": [1, 1]})
    with pytest.raises(LoraTargetError, match="matches no leaf"):
        lj.init_lora(
            jax.random.key(0),
            params,
            LoraConfig(targets="fc/kernel", rank=2, trainable_tokens={"nope": [1]}),
        )
    with pytest.raises(LoraStructureError, match=r"'emb/embedding': trainable token rows \(10,\)"):
        lj.init_lora(
            jax.random.key(0),
            params,
            LoraConfig(targets="fc/kernel", rank=2, trainable_tokens={"emb/embedding": [10]}),
        )
    with pytest.raises(LoraTargetError, match="'fc/bias' is a LoRA bias, but it already has"):
        lj.init_lora(
            jax.random.key(0),
            params,
            LoraConfig(targets="fc/kernel", rank=2, lora_bias=True, bias="lora_only"),
        )


def test_save_and_load_keep_both_entries(tmp_path):
    rng = np.random.default_rng(6)
    params = lm_params(rng)
    cfg = LoraConfig(
        targets="fc/kernel", rank=2, alpha=3.0, lora_bias=True, trainable_tokens={"emb/.*": [7, 2]}
    )
    delta = trained_delta(rng, params)
    lj.save(tmp_path / "a", delta, cfg)
    for base in (params, None):
        back, cfg2 = lj.load(tmp_path / "a", base=base)
        assert cfg2 == cfg
        assert back["fc"]["bias"].scale == 1.5 and back["emb"]["embedding"].indices == (7, 2)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(delta)):
            np.testing.assert_array_equal(got, want)
    small = {**params, "emb": {"embedding": params["emb"]["embedding"][:5]}}
    with pytest.raises(lj.LoraBaseMismatchError, match="trainable token rows"):
        lj.load(tmp_path / "a", base=small)


def test_shardings_and_the_surfaces_that_refuse_them():
    from jax.sharding import PartitionSpec as P

    from lora_jax import nnx as lora_nnx

    params = lm_params(np.random.default_rng(7))
    cfg = LoraConfig(
        targets="fc/kernel", rank=2, lora_bias=True, trainable_tokens={"emb/embedding": [1]}
    )
    _, delta = lj.init_lora(jax.random.key(0), params, cfg)
    mesh = jax.make_mesh((1,), ("x",))
    specs = {
        "emb": {"embedding": P(None, "x")},
        "fc": {"kernel": P(None, "x"), "bias": P("x")},
        "out": {"kernel": P()},
    }
    sh = lj.delta_shardings(specs, delta, mesh)
    assert tuple(sh["fc"]["bias"].b.spec) == ("x",) and sh["fc"]["bias"].scale == 8.0
    assert tuple(sh["emb"]["embedding"].diff.spec) == (None, "x")
    with pytest.raises(LoraStructureError, match="'emb/embedding' of delta 0 holds a TokenRows"):
        lj.stack_adapters([delta, delta])
    with pytest.raises(LoraStructureError, match="combine takes plain deltas"):
        lj.combine([delta, delta], [0.5, 0.5])
    from flax import nnx

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    state = nnx.split(model)[1]
    _, nnx_delta = lj.init_lora(
        jax.random.key(0), state, LoraConfig(targets=".*kernel", rank=2, lora_bias=True)
    )
    with pytest.raises(LoraStructureError, match="lora_jax.nnx holds LoRA factors"):
        lora_nnx.from_delta(model, nnx_delta)
