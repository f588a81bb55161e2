"""LoRA variants against independent dense formulas written out in numpy.

DoRA, PiSSA, OLoRA, rsLoRA, LoRA dropout, LoRA+ and leaves trained in full, in
the three paths: merge on the fly, implicit execution and merge / unmerge.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((12, 10)), jnp.float32)
X = jnp.asarray(RNG.standard_normal((5, 12)), jnp.float32)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _trained(delta, scale=0.3, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), delta
    )


def _np(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- DoRA


def _dora_dense(w, a, b, m, s):
    """m * (W + s A B) / ||W + s A B||_c, norm over the fan-in axis (axis 0)."""
    v = _np(w) + s * _np(a) @ _np(b)
    return _np(m) * v / np.linalg.norm(v, axis=0)


def test_dora_init_magnitude_is_the_column_norm_and_step0_is_exact():
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": W}, lj.LoraConfig(targets="w", rank=3, use_dora=True)
    )
    f = delta["w"]
    np.testing.assert_allclose(f.magnitude, np.linalg.norm(_np(W), axis=0), rtol=1e-6)
    assert f.magnitude.shape == (10,) and lj.count_params(delta) == 3 * (12 + 10) + 10
    np.testing.assert_allclose(lj.merge(base, delta)["w"], W, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        lj.implicit(lambda p, x: x @ p["w"])(base, delta, X), X @ W, rtol=1e-5, atol=1e-5
    )


def test_dora_forward_merge_unmerge_against_the_formula():
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": W}, lj.LoraConfig(targets="w", rank=3, alpha=6, use_dora=True)
    )
    delta = _trained(delta)
    f = delta["w"]
    want = _dora_dense(W, f.a, f.b, f.magnitude, 2.0)
    np.testing.assert_allclose(lj.merge(base, delta)["w"], want, rtol=1e-5, atol=1e-6)
    got = lj.implicit(lambda p, x: x @ p["w"], strict=True)(base, delta, X)
    np.testing.assert_allclose(got, _np(X) @ want, rtol=1e-5, atol=1e-5)
    norms = lj.dora_norms(base, delta)
    restored = lj.unmerge(lj.merge(base, delta), delta, norms=norms)
    np.testing.assert_allclose(restored["w"], W, rtol=1e-5, atol=1e-5)
    with pytest.raises(lj.LoraStructureError, match=r"'w'.*dora_norms"):
        lj.unmerge(lj.merge(base, delta), delta)


def test_dora_gradient_treats_the_norm_as_a_constant():
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": W}, lj.LoraConfig(targets="w", rank=3, use_dora=True)
    )
    delta = _trained(delta)
    f = delta["w"]
    s = f.scale
    # Independent: with c = m / ||V||_c held fixed, y = X (V * c), V = W + s A B,
    # loss = sum(y**2) / 2: dL/dV = X^T G * c, dA = s dV B^T, dB = s A^T dV,
    # dm = sum(dL/dW' * V / ||V||, axis 0).
    v = _np(W) + s * _np(f.a) @ _np(f.b)
    nrm = np.linalg.norm(v, axis=0)
    c = _np(f.magnitude) / nrm
    y = _np(X) @ (v * c)
    g_w = _np(X).T @ y
    dv = g_w * c
    want = {
        "a": s * dv @ _np(f.b).T,
        "b": s * _np(f.a).T @ dv,
        "magnitude": np.sum(g_w * v / nrm, axis=0),
    }
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    for name, path in [
        ("merge", lambda d: fn(lj.merge(base, d), X)),
        ("implicit", lambda d: lj.implicit(fn, strict=True)(base, d, X)),
    ]:
        g = jax.grad(lambda d, f=path: 0.5 * jnp.sum(f(d) ** 2))(delta)["w"]
        for field, value in want.items():
            np.testing.assert_allclose(
                getattr(g, field), value, rtol=2e-4, atol=1e-4, err_msg=f"{name} d{field}"
            )


@pytest.mark.parametrize("kind", ["dense_nd", "conv", "embed", "stacked"])
def test_dora_every_kernel_kind_implicit_equals_merge(kind):
    if kind == "dense_nd":
        params, layout = {"w": jnp.asarray(RNG.standard_normal((4, 3, 6)), jnp.float32)}, "iio"
        x = jnp.asarray(RNG.standard_normal((2, 4, 3)), jnp.float32)
        fn = lambda p, x: jnp.einsum("bhk,hkd->bd", x, p["w"])  # noqa: E731
    elif kind == "conv":
        params, layout = (
            {"w": jnp.asarray(RNG.standard_normal((3, 3, 4, 5)), jnp.float32)},
            lj.KernelLayout("iiio", "conv"),
        )
        x = jnp.asarray(RNG.standard_normal((2, 6, 6, 4)), jnp.float32)
        fn = lambda p, x: jax.lax.conv_general_dilated(  # noqa: E731
            x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    elif kind == "embed":
        params, layout = {"embedding": jnp.asarray(RNG.standard_normal((9, 5)), jnp.float32)}, None
        x = jnp.array([[0, 3, 8], [2, 2, 1]])
        fn = lambda p, ids: jnp.take(p["embedding"], ids, axis=0)  # noqa: E731
    else:
        params, layout = {"w": jnp.asarray(RNG.standard_normal((3, 6, 6)), jnp.float32)}, "sio"
        x = jnp.asarray(RNG.standard_normal((2, 6)), jnp.float32)
        fn = lambda p, x: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]  # noqa: E731
    target = next(iter(params))
    cfg = lj.LoraConfig(
        targets=target, rank=2, use_dora=True, layouts={} if layout is None else {target: layout}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    f = delta[target]
    assert (
        f.magnitude.shape
        == f.b.shape[: f.b.ndim - len(f.layout.out_axes) - 1]
        + f.b.shape[f.b.ndim - len(f.layout.out_axes) :]
    )
    delta = _trained(delta)
    got = lj.implicit(fn, strict=True)(base, delta, x)
    np.testing.assert_allclose(got, fn(lj.merge(base, delta), x), rtol=2e-5, atol=2e-5)
    # The merged kernel has column norms == magnitude (norm over the fan-in axes).
    merged = lj.merge(base, delta)[target]
    np.testing.assert_allclose(
        lj.advanced.column_norm(merged, f.layout), delta[target].magnitude, rtol=1e-5
    )


# ----------------------------------------------------------------------------- PiSSA / OLoRA


@pytest.mark.parametrize("init,niter", [("pissa", None), ("pissa", 6), ("olora", None)])
def test_pissa_olora_reconstruct_the_weight_at_step0(init, niter):
    params = {"w": W, "stacked": jnp.asarray(RNG.standard_normal((2, 8, 6)), jnp.float32)}
    cfg = lj.LoraConfig(
        targets="w|stacked", rank=3, init=init, svd_niter=niter, layouts={"stacked": "sio"}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    assert not np.allclose(base["w"], W)  # the base became a residual
    for k in params:
        np.testing.assert_allclose(lj.merge(base, delta)[k], params[k], atol=2e-5)
    f = delta["w"]
    update = f.scale * _np(f.a) @ _np(f.b)
    u, sv, vt = np.linalg.svd(_np(W))
    if init == "pissa":  # s A B is the best rank-3 approximation
        np.testing.assert_allclose(update, (u[:, :3] * sv[:3]) @ vt[:3], atol=2e-4)
        np.testing.assert_allclose(
            np.linalg.norm(_np(base["w"])), np.sqrt(np.sum(sv[3:] ** 2)), rtol=1e-3
        )
    else:  # OLoRA: W^T = Q R, A = R_r^T, B = Q_r^T
        q, r = np.linalg.qr(_np(W).T)
        np.testing.assert_allclose(np.abs(_np(f.b)), np.abs(q[:, :3].T), atol=1e-5)
        np.testing.assert_allclose(np.abs(_np(f.a)), np.abs(r[:3].T), atol=1e-5)
    # Training moves the merged weight by exactly the factors' change.
    trained = _trained(delta)
    change = trained["w"].scale * (_np(trained["w"].a) @ _np(trained["w"].b)) - update
    np.testing.assert_allclose(lj.merge(base, trained)["w"], _np(W) + change, atol=1e-4)


def test_pissa_rank_larger_than_the_rank_of_w_is_an_error():
    low_rank = jnp.asarray(RNG.standard_normal((8, 2)) @ RNG.standard_normal((2, 6)), jnp.float32)
    with pytest.raises(lj.LoraConfigError, match=r"'w'.*PiSSA.*rank 4.*numerical rank is 2"):
        lj.init_lora(
            jax.random.key(0), {"w": low_rank}, lj.LoraConfig(targets="w", rank=4, init="pissa")
        )


def test_variants_that_read_values_refuse_abstract_params():
    abstract = {"w": jax.ShapeDtypeStruct((12, 10), jnp.float32)}
    for cfg in (
        lj.LoraConfig(targets="w", init="pissa"),
        lj.LoraConfig(targets="w", use_dora=True),
    ):
        with pytest.raises(lj.LoraConfigError, match="'w'.*values"):
            lj.init_lora(jax.random.key(0), abstract, cfg)


# ----------------------------------------------------------------------------- rsLoRA


def test_rslora_scale_in_merge_and_implicit():
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": W}, lj.LoraConfig(targets="w", rank=4, alpha=8, use_rslora=True)
    )
    delta = _trained(delta)
    f = delta["w"]
    assert f.scale == pytest.approx(4.0)
    want = _np(W) + 4.0 * _np(f.a) @ _np(f.b)
    np.testing.assert_allclose(lj.merge(base, delta)["w"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        lj.implicit(lambda p, x: x @ p["w"])(base, delta, X), _np(X) @ want, rtol=1e-5, atol=1e-4
    )


# ----------------------------------------------------------------------------- dropout


def test_dropout_formula_eval_switch_and_reproducibility():
    # rank 12 = fan_in, so s A B is invertible from the left and dropout(x) can be read back.
    w = jnp.asarray(RNG.standard_normal((12, 16)), jnp.float32)
    base, delta = lj.init_lora(jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=12))
    delta = _trained(delta)
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    apply = lj.implicit(fn, dropout=0.25)
    eval_out = apply(base, delta, X)
    np.testing.assert_allclose(eval_out, fn(lj.merge(base, delta), X), rtol=1e-5, atol=1e-4)
    key = jax.random.key(3)
    y1, y2 = (
        apply(base, delta, X, lora_dropout_key=key),
        apply(base, delta, X, lora_dropout_key=key),
    )
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, apply(base, delta, X, lora_dropout_key=jax.random.key(4)))
    # Independent formula: the base path sees x, the low-rank path sees mask * x / (1 - p).
    f = delta["w"]
    seen = (_np(y1) - _np(X) @ _np(w)) @ np.linalg.pinv(f.scale * _np(f.a) @ _np(f.b))
    dropped = np.isclose(seen, 0.0, atol=1e-3)
    kept = np.isclose(seen, _np(X) / 0.75, rtol=1e-3, atol=1e-3)
    assert np.all(dropped | kept) and 0.05 < dropped.mean() < 0.5
    with pytest.raises(lj.LoraArgumentError, match="dropout"):
        lj.implicit(fn, dropout=1.0)


# ----------------------------------------------------------------------------- LoRA+


def test_lora_plus_scales_b_updates_by_the_ratio():
    base, delta = lj.init_lora(
        jax.random.key(0), {"w": W}, lj.LoraConfig(targets="w", rank=3, use_dora=True)
    )
    grads = _trained(jax.tree.map(jnp.zeros_like, delta), scale=1.0)
    for inner in (optax.sgd(0.1), optax.adam(0.01)):
        plain, _ = inner.update(grads, inner.init(delta), delta)
        plus_opt = lj.lora_plus(inner, ratio=16)
        plus, _ = plus_opt.update(grads, plus_opt.init(delta), delta)
        np.testing.assert_allclose(plus["w"].b, 16 * _np(plain["w"].b), rtol=1e-6)
        np.testing.assert_array_equal(plus["w"].a, plain["w"].a)
        np.testing.assert_array_equal(plus["w"].magnitude, plain["w"].magnitude)
    for bad in (0, -1.0, float("nan"), float("inf"), "16", True):
        with pytest.raises(lj.LoraArgumentError, match="ratio"):
            lj.lora_plus(optax.sgd(0.1), ratio=bad)


# ----------------------------------------------------------------------------- trained in full


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(nn.Dense(16, name="fc")(x))
        return nn.Dense(3, name="head")(jax.nn.relu(h))


def test_extra_trainable_leaves_and_bias_modes():
    params = jax.jit(Classifier().init)(jax.random.key(0), X)
    cfg = lj.LoraConfig(targets=".*/fc/kernel", rank=2, trainable=[r".*/head/.*"], bias="lora_only")
    base, delta = lj.init_lora(jax.random.key(1), params, cfg)
    full = {
        p
        for p, x in lj.advanced.leaves_with_paths(
            delta, is_leaf=lambda x: isinstance(x, lj.LeafDelta)
        )[0]
        if isinstance(x, lj.LeafDelta)
    }
    assert full == {"params/head/kernel", "params/head/bias", "params/fc/bias"}
    cfg_all = lj.LoraConfig(targets=".*/fc/kernel", rank=2, bias="all")
    paths = set(
        lj.advanced.select_extra_trainable(
            params, cfg_all, lj.advanced.select_targets(params, cfg_all)
        )
    )
    assert paths == {"params/fc/bias", "params/norm/bias", "params/head/bias"}
    # Step 0 is the base model; training moves the head; merge / unmerge are exact.
    y0 = Classifier().apply(params, X)
    np.testing.assert_array_equal(lj.implicit(Classifier().apply)(base, delta, X), y0)
    y_target = jnp.asarray(RNG.standard_normal((5, 3)), jnp.float32)
    opt = lj.train_delta_only(optax.adam(1e-2))
    tree = {"base": base, "delta": delta}
    state = opt.init(tree)
    loss = lambda t: jnp.mean(
        (
            lj.implicit(Classifier().apply)(t["base"], t["delta"], X)  # noqa: E731
            - y_target
        )
        ** 2
    )
    for _ in range(5):
        g = jax.grad(loss)(tree)
        updates, state = opt.update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
    assert loss(tree) < loss({"base": base, "delta": delta})
    for a, b in zip(jax.tree.leaves(tree["base"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    trained = tree["delta"]
    assert np.any(np.asarray(trained["params"]["head"]["kernel"].diff))
    merged = lj.merge(base, trained)
    np.testing.assert_allclose(
        merged["params"]["head"]["kernel"],
        _np(base["params"]["head"]["kernel"]) + _np(trained["params"]["head"]["kernel"].diff),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        Classifier().apply(merged, X),
        lj.implicit(Classifier().apply)(base, trained, X),
        rtol=1e-5,
        atol=1e-5,
    )
    for a, b in zip(jax.tree.leaves(lj.unmerge(merged, trained)), jax.tree.leaves(base)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    summary = lj.summarize(base, trained)
    assert {l.kind for l in summary.leaves} == {"dense", "full"}
    assert summary.trainable_params == lj.count_params(trained)


def test_extra_trainable_bad_input():
    params = {"fc": {"kernel": W, "bias": jnp.zeros(10)}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(lj.LoraTargetError, match="trainable pattern 'nothing'"):
        lj.init_lora(
            jax.random.key(0), params, lj.LoraConfig(targets="fc/kernel", trainable="nothing")
        )
    with pytest.raises(lj.LoraTargetError, match="'fc/kernel' is both"):
        lj.init_lora(
            jax.random.key(0), params, lj.LoraConfig(targets="fc/kernel", trainable="fc/.*")
        )
    with pytest.raises(lj.LoraTargetError, match="'step'.*not a floating"):
        lj.init_lora(
            jax.random.key(0), params, lj.LoraConfig(targets="fc/kernel", trainable="step")
        )
    with pytest.raises(lj.LoraConfigError, match="bias"):
        lj.LoraConfig(targets="x", bias="some")


def test_dropout_inside_scan_and_conv_under_jit_and_grad():
    params = {
        "w": jnp.asarray(RNG.standard_normal((3, 6, 6)), jnp.float32),
        "c": jnp.asarray(RNG.standard_normal((3, 6, 6)), jnp.float32),
    }
    cfg = lj.LoraConfig(
        targets="w|c", rank=2, layouts={"w": "sio", "c": lj.KernelLayout("iio", "conv")}
    )
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    delta = _trained(delta)

    def fn(p, x):
        x = jax.lax.conv_general_dilated(
            x[None], p["c"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )[0]
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]

    x = jnp.asarray(RNG.standard_normal((4, 6)), jnp.float32)
    apply = lj.implicit(fn, strict=True, dropout=0.5)
    loss = jax.jit(lambda d, k: jnp.sum(apply(base, d, x, lora_dropout_key=k) ** 2))
    g1, g2 = jax.grad(loss)(delta, jax.random.key(1)), jax.grad(loss)(delta, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    assert loss(delta, jax.random.key(1)) != loss(delta, jax.random.key(2))
    np.testing.assert_allclose(
        apply(base, delta, x), fn(lj.merge(base, delta), x), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- layer selection


def test_layers_of_a_stacked_kernel():
    w = jnp.asarray(RNG.standard_normal((4, 6, 6)), jnp.float32)
    cfg = lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"}, layers=[3, 1])
    base, delta = lj.init_lora(jax.random.key(0), {"w": w}, cfg)
    f = delta["w"]
    assert (
        f.layers == lj.advanced.LayerSelection((1, 3), 4)
        and f.a.shape == (2, 6, 2)
        and f.b.shape == (2, 2, 6)
    )
    assert lj.count_params(delta) == 2 * 2 * (6 + 6)  # only the chosen layers
    # The chosen layers draw what an all-layers init would have drawn for them.
    _, full = lj.init_lora(jax.random.key(0), {"w": w}, dataclasses.replace(cfg, layers=None))
    np.testing.assert_array_equal(f.a, full["w"].a[np.array([1, 3])])
    delta = _trained(delta)
    merged = lj.merge(base, delta)["w"]
    np.testing.assert_array_equal(merged[0], w[0])
    np.testing.assert_array_equal(merged[2], w[2])
    for j, layer in enumerate((1, 3)):
        want = _np(w[layer]) + delta["w"].scale * _np(delta["w"].a[j]) @ _np(delta["w"].b[j])
        np.testing.assert_allclose(merged[layer], want, rtol=1e-5, atol=1e-5)
    fn = lambda p, x: jax.lax.scan(lambda c, k: (jnp.tanh(c @ k), None), x, p["w"])[0]  # noqa: E731
    x = jnp.asarray(RNG.standard_normal((3, 6)), jnp.float32)
    np.testing.assert_allclose(
        lj.implicit(fn, strict=True)(base, delta, x),
        fn(lj.merge(base, delta), x),
        rtol=1e-5,
        atol=1e-5,
    )
    g = jax.grad(lambda d: jnp.sum(lj.implicit(fn)(base, d, x) ** 2))(delta)["w"]
    g_ref = jax.grad(lambda d: jnp.sum(fn(lj.merge(base, d), x) ** 2))(delta)["w"]
    assert g.a.shape == (2, 6, 2)
    np.testing.assert_allclose(g.a, g_ref.a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lj.unmerge(lj.merge(base, delta), delta)["w"], w, atol=1e-5)


def test_layers_bad_input():
    w = {"w": jnp.zeros((4, 6, 6)), "v": jnp.zeros((6, 6))}
    with pytest.raises(lj.LoraConfigError, match=r"'w'.*out of range"):
        lj.init_lora(
            jax.random.key(0),
            w,
            lj.LoraConfig(targets="w", layouts={"w": "sio"}, rank=2, layers=[4]),
        )
    with pytest.raises(lj.LoraConfigError, match="no targeted kernel has a stacked axis"):
        lj.init_lora(jax.random.key(0), w, lj.LoraConfig(targets="v", rank=2, layers=[0]))
    for bad in ([], [1, 1], [-1], [0.5]):
        with pytest.raises(lj.LoraConfigError, match="layers"):
            lj.LoraConfig(targets="w", layers=bad)
    with pytest.raises(lj.LoraConfigError, match="'w'.*DoRA.*layers"):
        lj.init_lora(
            jax.random.key(0),
            {"w": jnp.ones((4, 6, 6))},
            lj.LoraConfig(targets="w", layouts={"w": "sio"}, rank=2, layers=[0], use_dora=True),
        )


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(init="pissa"), dict(init="olora")])
def test_variants_combine_with_leaves_trained_in_full(extra):
    params = {"fc": {"kernel": W, "bias": jnp.zeros(10)}}
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, bias="all", **extra)
    base, delta = lj.init_lora(jax.random.key(0), params, cfg)
    assert isinstance(delta["fc"]["bias"], lj.LeafDelta)
    np.testing.assert_array_equal(base["fc"]["bias"], params["fc"]["bias"])
    np.testing.assert_allclose(lj.merge(base, delta)["fc"]["kernel"], W, atol=2e-5)
