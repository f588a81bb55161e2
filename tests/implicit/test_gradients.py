"""Gradients through ``implicit`` against references written out densely in the test:
DoRA on conv and embedding kernels, LoRA dropout, and leaves trained in full (LeafDelta)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import KernelLayout, LeafDelta, LoraFactors

RTOL, ATOL = 2e-5, 2e-6


def close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL, err_msg=what)


def rand(rng, shape, scale=0.5):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------- DoRA: conv and embed


def dora_kernel(w, f: LoraFactors, fan_in_axes: tuple[int, ...]):
    """The DoRA paper's / PEFT's kernel, written out: m * V / stop_gradient(||V||), V = W + s A B
    with the norm over the fan-in axes, per output feature."""
    update = jnp.tensordot(f.a, f.b, axes=1) * f.scale  # (*fan_in, out)
    v = w + update
    norm = jnp.sqrt(jnp.sum(v * v, axis=fan_in_axes, keepdims=True))
    return f.magnitude * v / jax.lax.stop_gradient(norm)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (3, 3), name="conv")(x).mean(axis=(1, 2))


class EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(11, 6, name="emb")(ids).sum(axis=1)


def dora_factors(rng, w, layout, rank, embed=False):
    n_in = layout.axes.count("i")
    fan_in, fan_out = w.shape[:n_in], w.shape[n_in:]
    norm = jnp.sqrt(jnp.sum(w * w, axis=tuple(range(n_in))))
    return LoraFactors(
        rand(rng, fan_in + (rank,)),
        rand(rng, (rank,) + fan_out),
        alpha=3.0,
        layout=layout,
        magnitude=norm * (1 + 0.2 * rand(rng, fan_out)),
    )


@pytest.mark.parametrize("kind", ["conv", "embed"])
def test_dora_gradients_match_the_dense_reference(kind):
    rng = np.random.default_rng(0)
    if kind == "conv":
        model, x, name, leaf = ConvNet(), rand(rng, (2, 6, 6, 3), 1.0), "conv", "kernel"
        layout = KernelLayout("iiio", "conv")
    else:
        model, x, name, leaf = (
            EmbedNet(),
            jnp.asarray(rng.integers(0, 11, (3, 4))),
            "emb",
            "embedding",
        )
        layout = KernelLayout("io", "embed")
    params = jax.tree.map(
        lambda s: rand(rng, s.shape), jax.eval_shape(model.init, jax.random.key(0), x)
    )
    w = params["params"][name][leaf]
    f = dora_factors(rng, w, layout, rank=2)
    delta = jax.tree.map(lambda _: None, params)
    delta["params"][name][leaf] = f
    y = rand(rng, jax.eval_shape(model.apply, params, x).shape, 1.0)
    fan_in_axes = tuple(range(layout.axes.count("i")))

    def reference(f):
        p = jax.tree.map(lambda v: v, params)
        p["params"][name] = dict(p["params"][name], **{leaf: dora_kernel(w, f, fan_in_axes)})
        return jnp.mean((model.apply(p, x) - y) ** 2)

    def low_rank(f):
        d = jax.tree.map(lambda v: v, delta, is_leaf=lambda v: isinstance(v, LoraFactors))
        d["params"][name][leaf] = f
        return jnp.mean((lj.implicit(model.apply, strict=True)(params, d, x) - y) ** 2)

    want = jax.grad(reference)(f)
    got = jax.grad(low_rank)(f)
    assert float(jnp.abs(want.a).max()) > 1e-3 and float(jnp.abs(want.magnitude).max()) > 1e-3
    close((got.a, got.b, got.magnitude), (want.a, want.b, want.magnitude), f"DoRA {kind}")


# --------------------------------------------------------------------------- LoRA dropout


class OneDense(nn.Module):
    features: int = 5

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, use_bias=False, name="fc")(x)


def test_dropout_gradients_match_the_dense_reference():
    """The mask is read off the forward pass (probe factors A = I, B = I, W = 0 give
    ``s * mask * x / keep``), so the reference does not depend on how keys are drawn."""
    rng = np.random.default_rng(1)
    p, d_in = 0.3, 6
    x, y = rand(rng, (8, d_in), 1.0) + 2.0, rand(rng, (8, 5), 1.0)  # x far from 0
    params = {"params": {"fc": {"kernel": rand(rng, (d_in, 5))}}}
    apply = lj.implicit(OneDense().apply, dropout=p, strict=True)
    key = jax.random.key(5)

    probe = LoraFactors(jnp.eye(d_in), jnp.eye(d_in), alpha=float(d_in), layout=KernelLayout("io"))
    wide = {"params": {"fc": {"kernel": jnp.zeros((d_in, d_in))}}}
    out = lj.implicit(OneDense(d_in).apply, dropout=p)(
        wide, {"params": {"fc": {"kernel": probe}}}, x, lora_dropout_key=key
    )
    scaled_mask = out / x  # mask / keep, exactly 0 or 1/keep
    keep = 1.0 - p
    assert set(np.unique(np.round(np.asarray(scaled_mask) * keep, 5))) == {0.0, 1.0}

    f = LoraFactors(rand(rng, (d_in, 3)), rand(rng, (3, 5)), alpha=4.0, layout=KernelLayout("io"))
    w = params["params"]["fc"]["kernel"]

    def reference(f):
        out = x @ w + f.scale * ((scaled_mask * x) @ f.a) @ f.b
        return jnp.mean((out - y) ** 2)

    def low_rank(f):
        out = apply(params, {"params": {"fc": {"kernel": f}}}, x, lora_dropout_key=key)
        return jnp.mean((out - y) ** 2)

    close(low_rank(f), reference(f), "dropout forward")
    got, want = jax.grad(low_rank)(f), jax.grad(reference)(f)
    close((got.a, got.b), (want.a, want.b), "dropout gradients")
    no_key = jax.grad(
        lambda f: jnp.mean((apply(params, {"params": {"fc": {"kernel": f}}}, x) - y) ** 2)
    )(f)
    assert not np.allclose(np.asarray(no_key.a), np.asarray(got.a))  # the mask mattered


# --------------------------------------------------------------------------- LeafDelta


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(4, name="head")(h)


def test_leaf_delta_gradients_match_the_dense_reference():
    """LoRA on fc1's kernel, fc1's bias and the whole head kernel trained in full."""
    rng = np.random.default_rng(2)
    x, y = rand(rng, (6, 5), 1.0), rand(rng, (6, 4), 1.0)
    model = MLP()
    params = jax.tree.map(
        lambda s: rand(rng, s.shape), jax.eval_shape(model.init, jax.random.key(0), x)
    )
    cfg = lj.LoraConfig(
        targets=r".*fc1/kernel",
        rank=2,
        alpha=4,
        init="swapped",
        trainable=[r".*fc1/bias", r".*head/kernel"],
    )
    base, delta = lj.init_lora(jax.random.key(1), params, cfg)
    delta = jax.tree.map(lambda v: v, delta, is_leaf=lambda v: isinstance(v, LeafDelta))
    for name in ("fc1/bias", "head/kernel"):
        mod, leaf = name.split("/")
        d = delta["params"][mod][leaf]
        assert isinstance(d, LeafDelta)
        delta["params"][mod][leaf] = LeafDelta(rand(rng, d.diff.shape, 0.1))
    f = delta["params"]["fc1"]["kernel"]

    def reference(delta):
        p = jax.tree.map(lambda v: v, base)
        fc1, head = delta["params"]["fc1"], delta["params"]["head"]
        p["params"]["fc1"] = {
            "kernel": base["params"]["fc1"]["kernel"]
            + fc1["kernel"].scale * fc1["kernel"].a @ fc1["kernel"].b,
            "bias": base["params"]["fc1"]["bias"] + fc1["bias"].diff,
        }
        p["params"]["head"] = dict(
            p["params"]["head"], kernel=base["params"]["head"]["kernel"] + head["kernel"].diff
        )
        return jnp.mean((model.apply(p, x) - y) ** 2)

    def low_rank(delta):
        return jnp.mean((lj.implicit(model.apply, strict=True)(base, delta, x) - y) ** 2)

    assert isinstance(f, LoraFactors)
    want, got = jax.grad(reference)(delta), jax.grad(low_rank)(delta)
    close(got, want, "LeafDelta and LoRA gradients")
    assert float(jnp.abs(want["params"]["head"]["kernel"].diff).max()) > 1e-3
