"""The experts axis ``e`` of a kernel layout (``eio``, ``seio``): factor shapes, merge and
unmerge against per-expert products written out here, counts, rsLoRA, save / load,
PiSSA per expert, layer selection on ``s`` only, and factor shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax import KernelLayout, LoraFactors


def test_factor_shapes_put_layers_then_experts_first():
    assert KernelLayout("eio").factor_shapes((8, 16, 32), 4) == ((8, 16, 4), (8, 4, 32))
    assert KernelLayout("seio").factor_shapes((2, 8, 16, 32), 4) == ((2, 8, 16, 4), (2, 8, 4, 32))
    # an experts axis after the fan-in (gpt-oss-like storage order): factors still lead with it
    assert KernelLayout("ieo").factor_shapes((16, 8, 32), 4) == ((8, 16, 4), (8, 4, 32))
    layout = KernelLayout("esio")  # factor order: stacked, then experts
    assert layout.batch_axes == (1, 0) and layout.stack_axes == (1,) and layout.expert_axes == (0,)
    assert layout.factor_shapes((8, 2, 16, 32), 4) == ((2, 8, 16, 4), (2, 8, 4, 32))


def per_expert_merge(w, a, b, scale, axes):
    """W + s * A_e @ B_e for every (layer,) expert, written with a loop in NumPy."""
    w = np.asarray(w, np.float64).copy()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if axes == "eio":
        for e in range(w.shape[0]):
            w[e] += scale * a[e] @ b[e]
    else:  # seio
        for layer in range(w.shape[0]):
            for e in range(w.shape[1]):
                w[layer, e] += scale * a[layer, e] @ b[layer, e]
    return w


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(["eio", "seio"]),
    st.integers(1, 4),  # experts
    st.integers(1, 5),  # in
    st.integers(1, 5),  # out
    st.integers(1, 3),  # rank
    st.booleans(),  # rsLoRA
    st.integers(0, 2**16),
)
def test_merge_is_per_expert_and_unmerge_inverts(axes, e, n_in, n_out, r, rslora, seed):
    rank = min(r, n_in, n_out)
    shape = ((2,) if axes == "seio" else ()) + (e, n_in, n_out)
    layout = KernelLayout(axes)
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    f = LoraFactors(
        jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
        jnp.asarray(rng.standard_normal(b_shape), jnp.float32),
        alpha=3.0,
        rslora=rslora,
        layout=layout,
    )
    scale = 3.0 / (np.sqrt(rank) if rslora else rank)
    assert f.scale == pytest.approx(scale)
    merged = lj.merge({"w": w}, {"w": f})["w"]
    want = per_expert_merge(w, f.a, f.b, scale, axes)
    np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-5, atol=1e-5)
    back = lj.unmerge({"w": merged}, {"w": f})["w"]
    np.testing.assert_allclose(np.asarray(back), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_config_targets_experts_by_path_with_rank_and_alpha_per_target(tmp_path):
    params = {
        "moe": {"gate": jnp.ones((4, 6, 5)), "down": jnp.ones((4, 5, 6))},
        "stack": {"up": jnp.ones((2, 4, 6, 5))},
    }
    config = lj.LoraConfig(
        targets=["moe/.*", "stack/up"],
        rank=2,
        layouts={"moe/.*": "eio", "stack/up": "seio"},
        rank_pattern={"moe/down": 3},
        alpha_pattern={"stack/up": 8.0},
        use_rslora=True,
    )
    base, delta = lj.init_lora(jax.random.key(0), params, config)
    assert delta["moe"]["down"].a.shape == (4, 5, 3) and delta["moe"]["down"].b.shape == (4, 3, 6)
    assert delta["stack"]["up"].a.shape == (2, 4, 6, 2)
    assert delta["stack"]["up"].scale == pytest.approx(8.0 / np.sqrt(2))
    counts = 4 * (6 + 5) * 2 + 4 * (5 + 6) * 3 + 2 * 4 * (6 + 5) * 2
    assert lj.count_params(delta) == counts
    delta = jax.tree.map(lambda v: v + 0.25, delta)
    lj.save(tmp_path / "adapter", delta, config)
    loaded = lj.load(tmp_path / "adapter", base)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(delta)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert loaded["stack"]["up"].layout == KernelLayout("seio")


@pytest.mark.slow
def test_pissa_takes_each_experts_own_top_singular_vectors():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
    config = lj.LoraConfig(targets="w", rank=2, layouts={"w": "eio"}, init="pissa")
    residual, delta = lj.init_lora(jax.random.key(0), {"w": w}, config)
    f = delta["w"]
    for e in range(3):
        u, s, vt = np.linalg.svd(np.asarray(w[e], np.float64))
        top = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(f.scale * np.asarray(f.a[e] @ f.b[e]), top, atol=1e-4)
    np.testing.assert_allclose(np.asarray(lj.merge(residual, delta)["w"]), np.asarray(w), atol=1e-5)


@pytest.mark.slow
def test_layer_selection_cuts_layers_not_experts():
    params = {"w": jnp.ones((3, 4, 6, 5))}
    config = lj.LoraConfig(targets="w", rank=2, layouts={"w": "seio"}, layers=[0, 2])
    _, delta = lj.init_lora(jax.random.key(0), params, config)
    assert delta["w"].a.shape == (2, 4, 6, 2)  # 2 of 3 layers, every expert
    with pytest.raises(lj.LoraConfigError, match="stacked axis"):
        lj.init_lora(
            jax.random.key(0),
            {"w": jnp.ones((4, 6, 5))},
            lj.LoraConfig(targets="w", rank=2, layouts={"w": "eio"}, layers=[0]),
        )


def test_factor_specs_follow_an_expert_parallel_axis():
    a, b, m = lj.advanced.factor_specs(P("expert", None, "tensor"), "eio")
    assert (tuple(a), tuple(b), tuple(m)) == (
        ("expert", None, None),
        ("expert", None, "tensor"),
        ("expert", "tensor"),
    )
    a, b, _ = lj.advanced.factor_specs(P(None, "expert", "fsdp", None), "seio")
    assert (tuple(a), tuple(b)) == ((None, "expert", "fsdp", None), (None, "expert", None, None))


def test_experts_axis_size_mismatch_is_an_error_naming_the_leaf():
    f = LoraFactors(jnp.ones((3, 6, 2)), jnp.ones((3, 2, 5)), alpha=1.0, layout=KernelLayout("eio"))
    with pytest.raises(lj.LoraError, match=r"'moe/w'.*A\(3, 6, 2\).*expected A\(4, 6, 2\)"):
        lj.merge({"moe": {"w": jnp.ones((4, 6, 5))}}, {"moe": {"w": f}})
