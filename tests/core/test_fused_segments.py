"""Fused projections with separate adapters (``LoraConfig(segments=...)``).

Every numeric check is against an independent formula: per-projection
adapters ``A_j (d, r)``, ``B_j (r, out_j)`` built in NumPy, the fused update
``W + s * concat_j(A_j @ B_j)`` along the flattened fan-out, and, for
gradients, a model with *separate* kernels and adapters per projection (the
PEFT form), differentiated by JAX without lora_jax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig, LoraFactors
from lora_jax.advanced import join_segments, split_segments

RNG = np.random.default_rng(0)


def _scan(kernel_in_layers, x):
    """The layers of a scanned model: ``lax.scan`` over the kernel's layer axis."""
    return jax.lax.scan(lambda c, k: (c, x @ k), None, kernel_in_layers)[1]


# (layout, kernel shape, segments, the reference einsum, the function of (params, x))
CASES = {
    "kv_flat": ("io", (6, 8), 2, "bd,do->bo", lambda k, x: x @ k),
    "kv_heads": (
        "iooo",
        (6, 2, 2, 3),
        2,
        "bd,dthk->bthk",
        lambda k, x: jnp.einsum("bd,dthk->bthk", x, k),
    ),
    "gate_up_sizes": ("io", (6, 10), (6, 4), "bd,do->bo", lambda k, x: x @ k),
    "scanned": ("sio", (2, 6, 8), 2, "bd,ldo->lbo", lambda k, x: _scan(k, x)),
    # MaxText's param_scan_axis=1: the layer axis second
    "scan_axis_1": (
        "iso",
        (6, 2, 8),
        2,
        "bd,dlo->lbo",
        lambda k, x: _scan(jnp.moveaxis(k, 1, 0), x),
    ),
}


def sizes_of(spec, fan_out):
    return (fan_out // spec,) * spec if isinstance(spec, int) else tuple(spec)


def parts_for(layout, shape, spec, r, rng):
    """Per-segment ``A_j (*stack, d, r)``, ``B_j (*stack, r, out_j)`` (float64)."""
    lay = KernelLayout(layout)
    stack = tuple(shape[a] for a in lay.stack_axes)
    fan_in = lay.fan_in(shape)
    sizes = sizes_of(spec, lay.fan_out(shape))
    a = [rng.normal(size=stack + (fan_in, r)) for _ in sizes]
    b = [rng.normal(size=stack + (r, n)) for n in sizes]
    return a, b, sizes


def ref_kernel(w, layout, a_parts, b_parts, scale):
    """``W + s * concat_j(A_j @ B_j)``: the fused update, built per segment (float64)."""
    lay = KernelLayout(layout)
    upd = np.concatenate([ai @ bi for ai, bi in zip(a_parts, b_parts)], axis=-1) * scale
    stack = tuple(w.shape[a] for a in lay.stack_axes)
    fan_in = tuple(w.shape[a] for a in lay.in_axes)
    fan_out = tuple(w.shape[a] for a in lay.out_axes)
    upd = upd.reshape(stack + fan_in + fan_out)  # factor order
    return np.float64(w) + np.transpose(upd, np.argsort(lay.permutation))


def fused_factors(layout, spec, a_parts, b_parts, alpha):
    """The same adapters as lora_jax factors, through the public split form."""
    n = len(a_parts)
    lay = KernelLayout(layout)
    ns = len(lay.stack_axes)
    seg_layout = KernelLayout("s" * ns + "io")
    parts = {
        str(j): LoraFactors(
            jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), alpha=alpha, layout=seg_layout
        )
        for j, (a, b) in enumerate(zip(a_parts, b_parts))
    }
    return parts, n


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    layout, shape, spec, eq, use = CASES[request.param]
    rng = np.random.default_rng(len(request.param))
    w = rng.normal(size=shape).astype(np.float32)
    params = {"fused": {"kernel": jnp.asarray(w)}}
    cfg = LoraConfig(
        targets="fused/kernel",
        rank=2,
        alpha=3.0,
        layouts={"fused/kernel": layout},
        segments={"fused/kernel": spec},
    )
    base, like = lj.init_lora(jax.random.key(1), params, cfg)
    a_parts, b_parts, sizes = parts_for(layout, shape, spec, 2, rng)
    parts, _ = fused_factors(layout, spec, a_parts, b_parts, 3.0)
    delta = join_segments({"fused": {"kernel": parts}}, like)
    return dict(
        layout=layout,
        shape=shape,
        eq=eq,
        use=use,
        w=w,
        base=base,
        delta=delta,
        cfg=cfg,
        a=a_parts,
        b=b_parts,
        sizes=sizes,
        like=like,
    )


def test_merge_and_implicit_equal_the_per_segment_formula(case):
    f = case["delta"]["fused"]["kernel"]
    assert f.segments == case["sizes"] and f.scale == 3.0 / 2  # alpha / r of one segment
    want = ref_kernel(case["w"], case["layout"], case["a"], case["b"], 1.5)
    merged = lj.merge(case["base"], case["delta"])["fused"]["kernel"]
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)
    x = jnp.asarray(RNG.normal(size=(3, case["shape"][case["layout"].index("i")])), jnp.float32)
    fn = lambda p, x: case["use"](p["fused"]["kernel"], x)  # noqa: E731
    got = jax.jit(lj.implicit(fn, strict=True))(case["base"], case["delta"], x)
    np.testing.assert_allclose(
        got, np.einsum(case["eq"], np.float64(x), want), rtol=1e-4, atol=1e-4
    )


def test_init_is_block_diagonal_and_counts_real_parameters(case):
    f = case["like"]["fused"]["kernel"]
    n, r = len(case["sizes"]), 2
    assert f.rank == n * r and f.segment_rank == r
    lay = KernelLayout(case["layout"])
    stack = int(np.prod([case["shape"][a] for a in lay.stack_axes]))
    fan_in, fan_out = lay.fan_in(case["shape"]), lay.fan_out(case["shape"])
    real = stack * (fan_in * n * r + r * fan_out)  # sum_j |A_j| + |B_j|
    assert f.num_params == real
    assert lj.count_params(case["like"]) == real
    assert lj.summarize(case["base"], case["like"]).trainable_params == real


def test_split_join_round_trip_is_exact(case):
    parts = split_segments(case["delta"])["fused"]["kernel"]
    assert sorted(parts) == [str(j) for j in range(len(case["sizes"]))]
    for j, p in parts.items():
        np.testing.assert_array_equal(p.a, np.float32(case["a"][int(j)]))
        np.testing.assert_array_equal(p.b, np.float32(case["b"][int(j)]))
    back = join_segments(split_segments(case["delta"]), case["like"])["fused"]["kernel"]
    np.testing.assert_array_equal(back.a, case["delta"]["fused"]["kernel"].a)
    np.testing.assert_array_equal(back.b, case["delta"]["fused"]["kernel"].b)


def test_save_and_load_keep_the_segments(case, tmp_path):
    lj.save(tmp_path / "ad", case["delta"], config=case["cfg"])
    back = lj.load(tmp_path / "ad", case["base"])
    back = back[0] if isinstance(back, tuple) else back
    f, g = case["delta"]["fused"]["kernel"], back["fused"]["kernel"]
    assert g.segments == f.segments and g.scale == f.scale
    np.testing.assert_array_equal(g.b, f.b)


# --------------------------------------------------------------------------- gradients and training


def _kv_problem():
    """A fused k/v kernel and its separate twin: ``W = [W_k | W_v]``, factors per projection."""
    rng = np.random.default_rng(7)
    d, h = 5, 4
    wk, wv = (rng.normal(size=(d, h)).astype(np.float32) for _ in range(2))
    params = {"kv": {"kernel": jnp.asarray(np.concatenate([wk, wv], axis=1))}}
    cfg = LoraConfig(targets="kv/kernel", rank=2, alpha=2.0, segments={"kv/kernel": 2})
    base, delta = lj.init_lora(jax.random.key(3), params, cfg)
    # nonzero B so that every gradient is informative
    f = delta["kv"]["kernel"]
    f = f.replace(b=jnp.asarray(rng.normal(size=f.b.shape), jnp.float32)).masked()
    x = jnp.asarray(rng.normal(size=(3, d)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(3, 2 * h)), jnp.float32)
    return wk, wv, base, {"kv": {"kernel": f}}, x, y


def test_gradients_equal_separate_projections_adapters():
    wk, wv, base, delta, x, y = _kv_problem()
    fn = lambda p, x: x @ p["kv"]["kernel"]  # noqa: E731

    def loss(d):
        return jnp.sum((lj.implicit(fn, strict=True)(base, d, x) - y) ** 2)

    g = jax.jit(jax.grad(loss))(delta)["kv"]["kernel"]
    f = delta["kv"]["kernel"]
    ak, av = f.a[:, :2], f.a[:, 2:]
    bk, bv = f.b[:2, :4], f.b[2:, 4:]

    def separate(ak, bk, av, bv):  # PEFT's form: two Linear layers, two adapters, s = alpha/r
        k = x @ wk + 1.0 * (x @ ak) @ bk
        v = x @ wv + 1.0 * (x @ av) @ bv
        return jnp.sum((jnp.concatenate([k, v], axis=1) - y) ** 2)

    gak, gbk, gav, gbv = jax.grad(separate, argnums=(0, 1, 2, 3))(ak, bk, av, bv)
    np.testing.assert_allclose(g.a[:, :2], gak, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.a[:, 2:], gav, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b[:2, :4], gbk, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b[2:, 4:], gbv, rtol=1e-5, atol=1e-5)
    assert not np.any(g.b[:2, 4:]) and not np.any(g.b[2:, :4])  # structural zeros
    # merge-on-the-fly training gives the same gradient
    g2 = jax.jit(jax.grad(lambda d: jnp.sum((fn(lj.merge(base, d), x) - y) ** 2)))(delta)
    g2 = g2["kv"]["kernel"]
    np.testing.assert_allclose(g2.b, g.b, rtol=1e-5, atol=1e-5)


def test_adamw_steps_keep_the_off_diagonal_blocks_zero():
    _, _, base, delta, x, y = _kv_problem()
    fn = lambda p, x: x @ p["kv"]["kernel"]  # noqa: E731
    opt = lj.train_delta_only(optax.adamw(1e-2, weight_decay=0.1))
    state = opt.init(delta)

    @jax.jit
    def step(d, state):
        g = jax.grad(lambda d: jnp.sum((lj.implicit(fn, strict=True)(base, d, x) - y) ** 2))(d)
        u, state = opt.update(g, state, d)
        return optax.apply_updates(d, u), state

    d = delta
    for _ in range(3):
        d, state = step(d, state)
    b = np.asarray(d["kv"]["kernel"].b)
    assert not np.any(b[:2, 4:]) and not np.any(b[2:, :4])
    assert np.any(b[:2, :4] != np.asarray(delta["kv"]["kernel"].b)[:2, :4])


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3),
    r=st.integers(1, 2),
    d=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_merge_then_unmerge_is_the_identity(sizes, r, d, seed):
    rng = np.random.default_rng(seed)
    r = min(r, d, min(sizes))
    w = rng.normal(size=(d, sum(sizes))).astype(np.float32)
    a = [rng.normal(size=(d, r)) for _ in sizes]
    b = [rng.normal(size=(r, n)) for n in sizes]
    parts = {
        str(j): LoraFactors(jnp.float32(aj), jnp.float32(bj), alpha=2.0, layout=KernelLayout("io"))
        for j, (aj, bj) in enumerate(zip(a, b))
    }
    like = {
        "w": LoraFactors(
            jnp.zeros((d, r * len(sizes))),
            jnp.zeros((r * len(sizes), sum(sizes))),
            alpha=2.0,
            layout=KernelLayout("io"),
            segments=tuple(sizes),
        )
    }
    delta = join_segments({"w": parts}, like)
    merged = lj.merge({"w": jnp.asarray(w)}, delta)
    np.testing.assert_allclose(
        merged["w"], ref_kernel(w, "io", a, b, 2.0 / r), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(lj.unmerge(merged, delta)["w"], w, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- errors


def test_config_errors_name_what_is_wrong():
    with pytest.raises(lj.LoraConfigError, match="segments"):
        LoraConfig(targets="w", segments={"w": 1})
    with pytest.raises(lj.LoraConfigError, match="use_dora"):
        LoraConfig(targets="w", use_dora=True, segments={"w": 2})
    params = {"w": jnp.ones((4, 6))}
    with pytest.raises(lj.LoraConfigError, match="do not divide"):
        lj.init_lora(jax.random.key(0), params, LoraConfig(targets="w", segments={"w": 4}))
    with pytest.raises(lj.LoraConfigError, match="add up to 5"):
        lj.init_lora(jax.random.key(0), params, LoraConfig(targets="w", segments={"w": (2, 3)}))
    with pytest.raises(lj.LoraConfigError, match="segment sizes"):
        lj.init_lora(
            jax.random.key(0), params, LoraConfig(targets="w", rank=3, segments={"w": (5, 1)})
        )
    with pytest.raises(lj.LoraConfigError, match="matches no targeted leaf"):
        lj.init_lora(jax.random.key(0), params, LoraConfig(targets="w", segments={"v": 2}))


def test_join_refuses_segments_that_differ():
    like = {
        "w": LoraFactors(
            jnp.zeros((3, 2)),
            jnp.zeros((2, 4)),
            alpha=1.0,
            layout=KernelLayout("io"),
            segments=(2, 2),
        )
    }
    parts = split_segments(like)
    parts["w"]["1"] = parts["w"]["1"].replace(alpha=2.0)
    with pytest.raises(lj.LoraStructureError, match="differ in alpha"):
        join_segments(parts, like)
    del parts["w"]["1"]
    with pytest.raises(lj.LoraStructureError, match="needs plain LoRA factors"):
        join_segments(parts, like)


@pytest.mark.slow  # about 5 s of eager NNX graph work; the core of it is covered above
def test_nnx_face_keeps_segments_through_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    from lora_jax import nnx as lora_nnx

    if not hasattr(nnx, "LoRAParam") or not hasattr(nnx, "DiffState"):
        pytest.skip("this Flax has no nnx.LoRAParam / DiffState")
    model = lora_nnx.lora(
        nnx.Linear(4, 6, rngs=nnx.Rngs(0)),
        LoraConfig(targets="kernel", rank=1, segments={"kernel": 2}),
        jax.random.key(0),
    )
    opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.LoRAParam)
    x = jnp.ones((2, 4))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    if hasattr(opt, "model"):  # Flax < 0.11: update(grads)
        opt.update(grads)
    else:
        opt.update(model, grads)
    _, base, delta = lora_nnx.split(model)
    (f,) = [
        e
        for e in jax.tree.leaves(delta, is_leaf=lj.advanced.is_factors)
        if lj.advanced.is_factors(e)
    ]
    assert f.segments == (3, 3)
    b = np.asarray(f.b)
    assert not np.any(b[0, 3:]) and not np.any(b[1, :3]) and np.all(b[0, :3] != 0)
    graphdef = lora_nnx.split(model)[0]
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    np.testing.assert_allclose(model(x), fn(lj.merge(base, delta), x), rtol=1e-5, atol=1e-5)


def test_qwix_refuses_segments_whose_scale_it_cannot_hold():
    from lora_jax import nnx as lora_nnx

    f = LoraFactors(
        jnp.ones((3, 2)), jnp.zeros((2, 4)), alpha=1.0, layout=KernelLayout("io"), segments=(2, 2)
    )
    with pytest.raises(lj.LoraStructureError, match="segments"):
        lora_nnx.to_qwix({"w": f})


def test_export_peft_asks_for_split_segments(tmp_path):
    f = LoraFactors(
        jnp.ones((3, 2)), jnp.zeros((2, 4)), alpha=1.0, layout=KernelLayout("io"), segments=(2, 2)
    )
    with pytest.raises(lj.LoraStructureError, match="split_segments"):
        lj.export_peft(tmp_path, {"w": f})


def test_base_rewriting_inits_refuse_segments():
    params = {"w": jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)}
    cfg = LoraConfig(targets="w", rank=1, segments={"w": 2})
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    for reinit in (lj.pissa, lj.olora):
        with pytest.raises(lj.LoraConfigError, match="segments"):
            reinit(base, delta)
    with pytest.raises(lj.LoraTargetError, match="segments"):
        lj.loftq(base, delta)


def test_config_with_segments_survives_json():
    from lora_jax._files.config_json import config_from_json, config_to_json

    cfg = LoraConfig(targets=".*kernel", segments={".*kv/kernel": 2, ".*gate_up/kernel": [6, 4]})
    assert cfg.segments == {".*kv/kernel": 2, ".*gate_up/kernel": (6, 4)}
    assert config_from_json(config_to_json(cfg), "here") == cfg
