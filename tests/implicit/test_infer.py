"""Layouts read off a traced call of the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(8, name="fc")(c)), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 8, name="emb")
        x = embed(ids)
        q = nn.DenseGeneral((2, 4), name="q")(x)
        x = nn.DenseGeneral(8, axis=(-2, -1), name="o")(q)
        stack = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x = stack(name="layers")(x, None)[0]
        x = nn.Conv(8, (3,), name="conv1d")(x)
        x = nn.Conv(8, (3, 3), name="conv2d")(x[:, :, None, :])[:, :, 0, :]
        return embed.attend(x)


IDS = jnp.array([[1, 2, 3], [4, 5, 10]])


@pytest.fixture(scope="module")
def params():
    return jax.jit(Model().init)(jax.random.key(0), IDS)


def test_every_kernel_kind(params):
    layouts = lj.infer_layouts(Model().apply, params, IDS)
    assert layouts == {
        "params/emb/embedding": lj.KernelLayout("io", "embed"),
        "params/q/kernel": lj.KernelLayout("ioo"),
        "params/o/kernel": lj.KernelLayout("iio"),
        "params/layers/fc/kernel": lj.KernelLayout("sio"),
        "params/conv1d/kernel": lj.KernelLayout("iio", "conv"),
        "params/conv2d/kernel": lj.KernelLayout("iiio", "conv"),
    }


def test_abstract_params_are_enough(params):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert lj.infer_layouts(Model().apply, abstract, IDS) == lj.infer_layouts(
        Model().apply, params, IDS
    )


def test_inferred_layouts_drive_init_and_implicit(params):
    layouts = lj.infer_layouts(Model().apply, params, IDS)
    cfg = lj.LoraConfig(targets=r".*(kernel|embedding)", rank=2)
    with pytest.raises(lj.LoraLayoutError, match="ambiguous"):
        lj.init_lora(jax.random.key(1), params, cfg)  # N-D kernels need a layout
    base, delta = lj.init_lora(jax.random.key(1), params, cfg, layouts=layouts)
    assert delta["params"]["q"]["kernel"].a.shape == (8, 2)
    assert delta["params"]["q"]["kernel"].b.shape == (2, 2, 4)
    assert delta["params"]["layers"]["fc"]["kernel"].a.shape == (3, 8, 2)
    assert delta["params"]["conv2d"]["kernel"].a.shape == (3, 3, 8, 2)
    delta = jax.tree.map(lambda x: x + 0.1, delta)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda d: Model().apply(lj.merge(base, d), IDS))(delta)
        got = jax.jit(lambda d: lj.implicit(Model().apply, strict=True)(base, d, IDS))(delta)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def test_einsum_and_vmap_stacked():
    params = {"mid": jnp.ones((3, 8, 5)), "stacked": jnp.ones((4, 5, 6))}

    def fn(p, x):
        y = jnp.einsum("btd,hdk->bthk", x, p["mid"]).sum(2)  # (4, 7, 5): one slice per layer
        return jax.vmap(lambda yi, w: yi @ w)(y, p["stacked"])  # a batched dot over layers

    layouts = lj.infer_layouts(fn, params, jnp.ones((4, 7, 8)))
    assert layouts == {"mid": lj.KernelLayout("oio"), "stacked": lj.KernelLayout("sio")}


def test_unused_and_non_float_leaves_are_absent():
    params = {"w": jnp.ones((4, 4)), "unused": jnp.ones((4, 4)), "ids": jnp.ones((4, 4), jnp.int32)}
    layouts = lj.infer_layouts(lambda p, x: x @ p["w"] + p["ids"][0], params, jnp.ones((2, 4)))
    assert set(layouts) == {"w"}


def test_conflicting_uses_are_a_clear_error():
    params = {"w": jnp.ones((4, 4, 4))}

    def fn(p, x):
        a = jnp.einsum("bi,ijk->bjk", x, p["w"])  # layout "ioo"
        b = jnp.einsum("bij,ijk->bk", a, p["w"])  # layout "iio"
        return b

    with pytest.raises(lj.LoraLayoutError, match=r"'w'.*'ioo'.*'iio'"):
        lj.infer_layouts(fn, params, jnp.ones((2, 4)))


# ---- infer_layouts follows a kernel exactly where implicit does ----------------------------

X = jnp.linspace(-1.0, 1.0, 2 * 3 * 8).reshape(2, 3, 8)
STACK = (3, 8, 8)  # (layers, in, out)


def _fori(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["w"][i]), x)


@pytest.mark.parametrize(
    "shape,fn,layout",
    [
        ((8, 15), lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["w"].reshape(8, 3, 5)), "io"),
        ((8, 3, 5), lambda p, x: x @ p["w"].reshape(8, 15), "ioo"),
        ((2, 4, 15), lambda p, x: x @ p["w"].reshape(8, 15), "iio"),
        ((15, 8), lambda p, x: x @ p["w"].T.reshape(8, 3, 5).reshape(8, 15), "oi"),
        (STACK, _fori, "sio"),
        (STACK, lambda p, x: jnp.tanh(x @ p["w"][1]) @ p["w"][2], "sio"),
        (STACK, lambda p, x: jnp.einsum("lbtd,lde->lbte", jnp.stack([x, -x]), p["w"][0:2]), "sio"),
        (STACK, lambda p, x: x @ jax.lax.dynamic_index_in_dim(p["w"], 2, keepdims=False), "sio"),
        ((1, 8, 5), lambda p, x: x @ jnp.squeeze(p["w"], 0), "sio"),
        ((1, 8, 5), lambda p, x: x @ p["w"].reshape(8, 5), "sio"),
    ],
    ids=[
        "split_out",
        "merge_out",
        "merge_in",
        "transposed_merge",
        "fori_loop_index",
        "static_index",
        "static_range",
        "dynamic_index_in_dim",
        "squeeze",
        "reshape_drop",
    ],
)
def test_every_use_implicit_runs_low_rank_gets_the_layout_implicit_assumes(shape, fn, layout):
    params = {"w": jax.random.normal(jax.random.key(0), shape) / 3}
    layouts = lj.infer_layouts(fn, params, X)
    assert layouts == {"w": lj.KernelLayout(layout)}
    base, delta = lj.init_lora(
        jax.random.key(1), params, lj.LoraConfig(targets="w", rank=2), layouts=layouts
    )
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    delta = jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )  # B != 0
    with jax.default_matmul_precision("highest"):
        want = fn(lj.merge(base, delta), X)
        got = lj.implicit(fn, strict=True)(base, delta, X)  # strict: no fallback anywhere
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


@jax.custom_vjp
def _opaque(x, w):
    return x @ w


_opaque.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


@pytest.mark.parametrize(
    "shape,fn",
    [
        ((8, 6), lambda p, x: x @ p["w"].reshape(6, 8).T),  # rows re-cut: i and o mixed
        (
            (8, 15),
            lambda p, x: jnp.einsum("bth,dhk->btdk", x[..., :3], p["w"].reshape(8, 3, 5)),
        ),  # one piece of a split contracted
        (STACK, lambda p, x: x[..., :4] @ p["w"][1, :4]),  # a slice cuts a fan-in axis
        ((8, 8), lambda p, x: _opaque(x, p["w"])),  # custom_vjp: materialised
        ((8, 8), lambda p, x: jax.lax.fori_loop(0, 2, lambda i, w: w @ w, p["w"])),  # a loop carry
    ],
    ids=["mixed_reshape", "split_contracted_in_part", "cut_fan_in", "custom_vjp", "while_carry"],
)
def test_no_layout_from_uses_implicit_does_not_run_low_rank(shape, fn):
    assert lj.infer_layouts(fn, {"w": jnp.ones(shape)}, X) == {}


def test_the_three_walkers_read_one_primitive_table():
    """infer follows a kernel through exactly the primitives implicit has rules for, and no
    walker names a primitive itself: every name comes from lora_jax._implicit.primitives."""
    import ast
    import inspect

    from lora_jax._implicit import interpreter as _implicit
    from lora_jax._implicit import layout_inference as _infer
    from lora_jax._implicit import primitives as _primitives
    from lora_jax._implicit import rebuild as _rebuild

    assert set(_infer.STEPS) == set(_implicit.RULES)
    table = set()
    for value in vars(_primitives).values():
        if isinstance(value, frozenset):
            table |= value
        elif isinstance(value, str) and value in _implicit.RULES:
            table.add(value)
    assert set(_implicit.RULES) <= table
    for module in (_implicit, _infer, _rebuild):
        tree = ast.parse(inspect.getsource(module))
        literals = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & table, (module.__name__, literals & table)
