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
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=3)
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
        Model().apply, params, IDS)


def test_inferred_layouts_drive_init_and_implicit(params):
    layouts = lj.infer_layouts(Model().apply, params, IDS)
    cfg = lj.LoraConfig(targets=r".*(kernel|embedding)", rank=2)
    with pytest.raises(lj.LoraLayoutError, match="ambiguous"):
        lj.init_lora(jax.random.key(1), params, cfg)          # N-D kernels need a layout
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
        y = jnp.einsum("btd,hdk->bthk", x, p["mid"]).sum(2)    # (4, 7, 5): one slice per layer
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
        a = jnp.einsum("bi,ijk->bjk", x, p["w"])     # layout "ioo"
        b = jnp.einsum("bij,ijk->bk", a, p["w"])     # layout "iio"
        return b

    with pytest.raises(lj.LoraLayoutError, match=r"'w'.*'ioo'.*'iio'"):
        lj.infer_layouts(fn, params, jnp.ones((2, 4)))
