"""Implicit LoRA execution against merge-on-the-fly, for every kernel kind and control flow.

For each case the reference is the same function run on ``merge(base, delta)``:
implicit and merged forwards must agree, and the implicit gradients of ``A`` and
``B`` must equal merge-on-the-fly's, to float32 tolerance.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from tests._lowrank_checks import _highest_precision, _rel, _scanned_dense, _trained  # noqa: F401

FWD_TOL = 2e-5  # relative to the output's scale
GRAD_TOL = 2e-5  # relative to each gradient leaf's scale


def check_against_merge(fn, params, config, *args, layouts=None, grad=True, **kwargs):
    """Asserts implicit == merged forward (jit) and implicit == merged A/B gradients."""
    base, delta = lj.init_lora(jax.random.key(1), params, config, layouts=layouts)
    delta = _trained(delta)
    merged = lambda d: fn(lj.merge(base, d), *args, **kwargs)  # noqa: E731
    implicit = lambda d: lj.implicit(fn)(base, d, *args, **kwargs)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraFallbackWarning)
        got = jax.jit(implicit)(delta)
        assert _rel(got, jax.jit(merged)(delta)) < FWD_TOL
        if grad:
            loss = lambda f: lambda d: jnp.sum(jnp.sin(f(d)))  # noqa: E731
            g_ref = jax.jit(jax.grad(loss(merged)))(delta)
            g_imp = jax.jit(jax.grad(loss(implicit)))(delta)
            ref_leaves, imp_leaves = jax.tree.leaves(g_ref), jax.tree.leaves(g_imp)
            assert len(ref_leaves) == len(imp_leaves) > 0
            for r, i in zip(ref_leaves, imp_leaves):
                assert float(jnp.max(jnp.abs(r))) > 0
                assert _rel(i, r) < GRAD_TOL
    return base, delta


X = jnp.linspace(-1.0, 1.0, 2 * 3 * 8).reshape(2, 3, 8)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(jax.nn.gelu(nn.Dense(7, name="fc1")(x)))


def test_dense():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    check_against_merge(MLP().apply, params, lj.LoraConfig(targets=".*kernel", rank=3), X)


class DenseGeneralAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="q")(x)  # kernel (d, heads, head_dim)
        return nn.DenseGeneral(6, axis=(-2, -1), name="o")(q)  # kernel (heads, head_dim, d)


def test_dense_general_both_directions():
    params = jax.jit(DenseGeneralAttn().init)(jax.random.key(0), X)
    cfg = lj.LoraConfig(
        targets=".*kernel", rank=2, layouts={".*/q/kernel": "ioo", ".*/o/kernel": "iio"}
    )
    check_against_merge(DenseGeneralAttn().apply, params, cfg, X)


def test_einsum_with_contraction_in_the_middle_and_kernel_on_the_left():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 8, 5))}  # (h, d_in, k)

    def fn(p, x):
        y = jnp.einsum("btd,hdk->bthk", x, p["w"])  # kernel on the right
        return y + jnp.einsum("hdk,btd->hkbt", p["w"], x).transpose(2, 3, 0, 1)

    cfg = lj.LoraConfig(targets="w", rank=2, layouts={"w": "oio"})
    check_against_merge(fn, params, cfg, X)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv(nd):
    x = jax.random.normal(jax.random.key(3), (2,) + (5,) * nd + (4,))
    conv = nn.Conv(6, (3,) * nd, padding="SAME", strides=2)
    params = jax.jit(conv.init)(jax.random.key(0), x)
    cfg = lj.LoraConfig(
        targets=".*kernel",
        rank=2,
        layouts={".*kernel": lj.KernelLayout("i" * (nd + 1) + "o", "conv")},
    )
    check_against_merge(conv.apply, params, cfg, x)


def test_grouped_conv_falls_back_with_a_warning():
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
    conv = nn.Conv(6, (3, 3), feature_group_count=2)
    params = jax.jit(conv.init)(jax.random.key(0), x)
    cfg = lj.LoraConfig(
        targets=".*kernel", rank=2, layouts={".*kernel": lj.KernelLayout("iiio", "conv")}
    )
    base, delta = lj.init_lora(jax.random.key(1), params, cfg)
    delta = _trained(delta)
    with pytest.warns(lj.LoraFallbackWarning, match="conv_general_dilated"):
        got = lj.implicit(conv.apply)(base, delta, x)
    assert _rel(got, conv.apply(lj.merge(base, delta), x)) < FWD_TOL


class EmbedTied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 6)
        return embed.attend(jnp.tanh(embed(ids)))  # lookup (gather) and tied output head


def test_embedding_lookup_and_attend():
    ids = jnp.array([[1, 2, 3], [4, 10, 0]])
    params = jax.jit(EmbedTied().init)(jax.random.key(0), ids)
    check_against_merge(
        EmbedTied().apply, params, lj.LoraConfig(targets=".*embedding", rank=2), ids
    )


class BF16Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x)


def test_bf16_compute_dtype_with_float32_factors():
    params = jax.jit(BF16Dense().init)(jax.random.key(0), X)
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets=".*kernel", rank=2))
    delta = _trained(delta)
    got = lj.implicit(BF16Dense().apply)(base, delta, X)
    want = BF16Dense().apply(lj.merge(base, delta), X)
    assert got.dtype == want.dtype == jnp.bfloat16
    # bf16 rounds W and the low-rank term separately: agree to bf16 precision.
    assert _rel(got, want) < 2e-2
    assert jax.tree.leaves(delta)[0].dtype == jnp.float32


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_stacked_layers_with_and_without_remat(remat):
    model = _scanned_dense(8, remat)
    params = jax.jit(model.init)(jax.random.key(0), X)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (3, 8, 8)
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, layouts={".*kernel": "sio"})
    base, delta = check_against_merge(model.apply, params, cfg, X)
    a = delta["params"]["layers"]["fc"]["kernel"].a
    assert a.shape == (3, 8, 2) and not np.allclose(a[0], a[1])


def test_vmap_over_stacked_kernel_is_a_batched_dot():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 8, 5))}

    def fn(p, x):  # x: (3, batch, 8) -- one input slice per layer
        return jax.vmap(lambda w, xi: xi @ w)(p["w"], x)

    x = jax.random.normal(jax.random.key(1), (3, 4, 8))
    check_against_merge(fn, params, lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"}), x)


def test_vmap_of_the_implicit_function_over_inputs():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets=".*kernel", rank=2))
    delta = _trained(delta)
    got = jax.vmap(lambda x: lj.implicit(MLP().apply)(base, delta, x))(X)
    assert _rel(got, MLP().apply(lj.merge(base, delta), X)) < FWD_TOL


W44 = {"w": jax.random.normal(jax.random.key(5), (8, 8))}


def test_cond_jit_and_transpose():
    def fn(p, x):
        y = jax.jit(lambda a, w: a @ w)(x, p["w"])
        return jax.lax.cond(jnp.sum(y) > 0, lambda a: a @ p["w"], lambda a: a @ p["w"].T, y)

    check_against_merge(fn, W44, lj.LoraConfig(targets="w", rank=2), X)


def test_while_loop_forward():
    def fn(p, x):
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"]))  # noqa: E731
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    check_against_merge(fn, W44, lj.LoraConfig(targets="w", rank=2), X, grad=False)


def test_fori_loop_with_static_bounds_differentiates():
    def fn(p, x):
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["w"]), x)

    check_against_merge(fn, W44, lj.LoraConfig(targets="w", rank=2), X)


def test_custom_jvp_and_custom_vjp_activations_in_the_model():
    @jax.custom_vjp
    def swish(x):
        return x * jax.nn.sigmoid(x)

    swish.defvjp(
        lambda x: (swish(x), x),
        lambda x, g: (g * (jax.nn.sigmoid(x) * (1 + x * (1 - jax.nn.sigmoid(x)))),),
    )

    def fn(p, x):
        return swish(jax.nn.relu(x @ p["w"]) @ p["w"])  # relu is a custom_jvp

    check_against_merge(fn, W44, lj.LoraConfig(targets="w", rank=2), X)


@jax.custom_vjp
def _kernel_taking_op(x, w):
    return x @ w


_kernel_taking_op.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


def test_kernel_into_custom_vjp_falls_back_warns_once_and_is_exact():
    fn = lambda p, x: _kernel_taking_op(_kernel_taking_op(x, p["w"]), p["w"])  # noqa: E731
    base, delta = lj.init_lora(jax.random.key(1), W44, lj.LoraConfig(targets="w", rank=2))
    delta = _trained(delta)
    X = jnp.reshape(globals()["X"], (6, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lj.implicit(fn)(base, delta, X)
    messages = [str(w.message) for w in caught if issubclass(w.category, lj.LoraFallbackWarning)]
    assert len(messages) == 1 and "custom_vjp_call" in messages[0] and "'w'" in messages[0]
    assert _rel(got, fn(lj.merge(base, delta), X)) < FWD_TOL
    g_imp = jax.grad(lambda d: jnp.sum(lj.implicit(fn)(base, d, X)))(delta)
    g_ref = jax.grad(lambda d: jnp.sum(fn(lj.merge(base, d), X)))(delta)
    for i, r in zip(jax.tree.leaves(g_imp), jax.tree.leaves(g_ref)):
        assert _rel(i, r) < GRAD_TOL


def test_strict_mode_raises_naming_kernel_and_primitive():
    fn = lambda p, x: _kernel_taking_op(x, p["w"])  # noqa: E731
    base, delta = lj.init_lora(jax.random.key(1), W44, lj.LoraConfig(targets="w", rank=2))
    with pytest.raises(lj.LoraImplicitError, match=r"'w'.*custom_vjp_call"):
        lj.implicit(fn, strict=True)(base, delta, X)


def test_returning_the_kernel_materialises_it():
    base, delta = lj.init_lora(jax.random.key(1), W44, lj.LoraConfig(targets="w", rank=2))
    delta = _trained(delta)
    with pytest.warns(lj.LoraFallbackWarning, match="'mul'"):
        got = lj.implicit(lambda p: p["w"] * 2.0)(base, delta)
    np.testing.assert_allclose(got, 2.0 * lj.merge(base, delta)["w"], rtol=1e-6)


def test_frozen_kernel_gets_no_gradient_and_no_kernel_sized_dot():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets=".*kernel", rank=2))
    delta = _trained(delta)
    apply = lj.implicit(MLP().apply)
    # Differentiating w.r.t. the base too: targeted kernels are under stop_gradient.
    g_base = jax.grad(lambda b: jnp.sum(apply(b, delta, X) ** 2))(base)
    for layer in ("fc1", "fc2"):
        assert not np.any(np.asarray(g_base["params"][layer]["kernel"]))
        assert np.any(np.asarray(g_base["params"][layer]["bias"]))  # untargeted leaves train
    # No dot in the delta-gradient program produces a kernel-shaped value.
    jaxpr = jax.make_jaxpr(jax.grad(lambda d: jnp.sum(apply(base, d, X) ** 2)))(delta)
    kernel_shapes = {(8, 7), (7, 5)}
    shapes = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr.jaxpr)
    assert shapes and not kernel_shapes & set(shapes)


def test_flax_nnx_model_through_nnx_merge():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 8, rngs=rngs)
            self.fc1 = nnx.Linear(8, 16, rngs=rngs)
            self.fc2 = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, ids):
            return self.fc2(jax.nn.gelu(self.fc1(self.embed(ids))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    fn = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
    ids = jnp.array([[1, 2, 3], [4, 10, 0]])
    cfg = lj.LoraConfig(targets=["fc./kernel", "embed/embedding"], rank=2)
    check_against_merge(fn, state, cfg, ids)


def test_static_arguments_pass_through():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(8)(x)
            return nn.Dropout(0.5, deterministic=not train)(x)

    params = jax.jit(Drop().init, static_argnames="train")(jax.random.key(0), X, train=False)
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets=".*kernel", rank=2))
    delta = _trained(delta)
    got = lj.implicit(Drop().apply)(base, delta, X, train=True, rngs={"dropout": jax.random.key(3)})
    want = Drop().apply(lj.merge(base, delta), X, train=True, rngs={"dropout": jax.random.key(3)})
    assert _rel(got, want) < FWD_TOL
    assert (
        _rel(
            lj.implicit(Drop().apply)(base, delta, X, train=False),
            Drop().apply(lj.merge(base, delta), X, train=False),
        )
        < FWD_TOL
    )


def test_mismatched_delta_is_a_clear_error():
    base, delta = lj.init_lora(jax.random.key(1), W44, lj.LoraConfig(targets="w", rank=2))
    with pytest.raises(lj.LoraStructureError, match="'w'"):
        lj.implicit(lambda p, x: x @ p["w"])({"w": jnp.ones((8, 9))}, delta, X)


def test_sharding_constraint_on_a_kernel_keeps_the_low_rank_path():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    fn = lambda p, x: x @ jax.lax.with_sharding_constraint(p["w"], sharding)  # noqa: E731
    check_against_merge(fn, W44, lj.LoraConfig(targets="w", rank=2), X)


@pytest.mark.parametrize(
    "shape,layout,fn",
    [
        ((8, 3, 5), "ioo", lambda w, x: x @ w.reshape(8, 15)),  # merge fan-out
        ((8, 15), "io", lambda w, x: jnp.einsum("btd,dhk->bthk", x, w.reshape(8, 3, 5))),  # split
        ((2, 4, 15), "iio", lambda w, x: x @ w.reshape(8, 15)),  # merge fan-in
        ((8, 1, 5), "ioo", lambda w, x: x @ jnp.squeeze(w, 1)),  # drop a size-1 axis
        ((15, 8), "oi", lambda w, x: x @ w.T.reshape(8, 3, 5).reshape(8, 15)),  # after a transpose
    ],
    ids=["merge_out", "split_out", "merge_in", "squeeze", "transposed"],
)
@pytest.mark.parametrize("dora", [False, True])
def test_reshapes_of_the_kernel_within_one_role_stay_low_rank(shape, layout, fn, dora):
    params = {"w": jax.random.normal(jax.random.key(0), shape) / 3}
    cfg = lj.LoraConfig(targets="w", rank=2, layouts={"w": layout}, use_dora=dora)
    check_against_merge(lambda p, x: fn(p["w"], x), params, cfg, X)


def test_reshape_mixing_fan_in_and_fan_out_falls_back_exactly():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    fn = lambda p, x: x @ p["w"].reshape(6, 8).T  # noqa: E731  (rows of W re-cut: no low-rank form)
    base, delta = lj.init_lora(jax.random.key(1), params, lj.LoraConfig(targets="w", rank=2))
    delta = _trained(delta)
    with pytest.warns(lj.LoraFallbackWarning, match="reshape"):
        got = lj.implicit(fn)(base, delta, X)
    assert _rel(got, fn(lj.merge(base, delta), X)) < FWD_TOL
    with pytest.raises(lj.LoraImplicitError, match="reshape"):
        lj.implicit(fn, strict=True)(base, delta, X)


STACK = {"w": jax.random.normal(jax.random.key(3), (3, 8, 8)) / 3}  # (layers, in, out)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["w"][i]), x),  # dynamic
        lambda p, x: jnp.tanh(x @ p["w"][1]) @ p["w"][2],  # static
        lambda p, x: jnp.einsum("lbtd,lde->lbte", jnp.stack([x, -x]), p["w"][1:3]),  # a range
        lambda p, x: x @ jax.lax.dynamic_index_in_dim(p["w"], 2, keepdims=False),  # jitted helper
    ],
    ids=["fori_loop", "static_index", "static_range", "dynamic_index_in_dim"],
)
@pytest.mark.parametrize("dora", [False, True])
def test_slices_of_a_stacked_kernel_stay_low_rank(fn, dora):
    cfg = lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"}, use_dora=dora)
    check_against_merge(fn, STACK, cfg, X)


def test_slicing_a_fan_in_axis_falls_back_exactly():
    fn = lambda p, x: x[..., :4] @ p["w"][1, :4]  # noqa: E731  (cuts the fan-in axis)
    base, delta = lj.init_lora(
        jax.random.key(1), STACK, lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"})
    )
    delta = _trained(delta)
    with pytest.warns(lj.LoraFallbackWarning, match="slice"):
        got = lj.implicit(fn)(base, delta, X)
    assert _rel(got, fn(lj.merge(base, delta), X)) < FWD_TOL


def test_rules_are_looked_up_in_one_dict(monkeypatch):
    """implicit dispatches on ``RULES``: without the transpose rule, a transposed kernel
    is materialised (and named in the warning); with it, it stays low-rank."""
    from lora_jax._implicit import interpreter as _implicit

    fn = lambda p, x: x @ p["w"].T  # noqa: E731
    base, delta = lj.init_lora(jax.random.key(1), W44, lj.LoraConfig(targets="w", rank=2))
    delta = _trained(delta)
    want = fn(lj.merge(base, delta), X)
    assert _rel(lj.implicit(fn, strict=True)(base, delta, X), want) < FWD_TOL
    monkeypatch.delitem(_implicit.RULES, "transpose")
    with pytest.warns(lj.LoraFallbackWarning, match="'transpose'"):
        got = lj.implicit(fn)(base, delta, X)
    assert _rel(got, want) < FWD_TOL
