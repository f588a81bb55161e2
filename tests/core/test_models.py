"""End to end: linen, NNX and a plain function, trained with merge-on-the-fly under jit."""

import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig

KEY = jax.random.key(0, impl="rbg")
STEPS = 8


def ref_merged(base, delta):
    """Dense params computed independently: W + s * A @ B by an einsum over named axes (numpy)."""
    factors = dict(lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0])

    def one(key_path, w):
        f = factors.get(lj.advanced.path_str(key_path))
        if not lj.advanced.is_factors(f):
            return w
        axes = f.layout.axes
        names = list(string.ascii_lowercase[: len(axes)])
        pick = lambda c: "".join(n for n, a in zip(names, axes) if a == c)  # noqa: E731
        spec = f"{pick('s')}{pick('i')}z,{pick('s')}z{pick('o')}->{''.join(names)}"
        upd = f.scale * np.einsum(spec, np.float64(f.a), np.float64(f.b))
        return jnp.asarray(np.float64(w) + upd, w.dtype)

    return jax.tree_util.tree_map_with_path(one, base)


def train(loss_fn, delta, lr=2e-2, steps=STEPS):
    """Adam on the delta only; returns the trained delta and the losses."""
    opt = optax.adam(lr)
    state = opt.init(delta)

    @jax.jit
    def step(d, s):
        loss, grads = jax.value_and_grad(loss_fn)(d)
        updates, s = opt.update(grads, s, d)
        return optax.apply_updates(d, updates), s, loss

    losses = []
    for _ in range(steps):
        delta, state, loss = step(delta, state)
        losses.append(float(loss))
    return delta, losses


def frozen_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_same(tree, copy):
    for (p, x), (_, y) in zip(
        lj.advanced.leaves_with_paths(tree)[0], lj.advanced.leaves_with_paths(copy)[0]
    ):
        assert np.asarray(x).tobytes() == y.tobytes(), p


# --------------------------------------------------------------------------- (a) linen


class Attention(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 8, name="embed")(tokens)  # (11, 8)
        x = nn.Conv(8, kernel_size=(3,), name="conv")(x)  # (3, 8, 8)
        q = nn.DenseGeneral((2, 4), name="q")(x)  # (8, 2, 4)
        k = nn.DenseGeneral((2, 4), name="k")(x)
        v = nn.DenseGeneral((2, 4), name="v")(x)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
        h = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + nn.DenseGeneral(8, axis=(-2, -1), name="o")(h)  # (2, 4, 8)
        return nn.Dense(5, name="fc")(x)  # (8, 5)


TOKENS = jnp.array([[1, 5, 10, 0, 3], [7, 7, 2, 9, 4]], jnp.int32)
TARGET = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 5)), jnp.float32)


def test_linen_attention_model(randomize):
    model = Attention()
    params = randomize(jax.eval_shape(model.init, KEY, TOKENS))
    cfg = LoraConfig(
        targets=[
            r"params/(q|k|v|o)/kernel",
            r"params/conv/kernel",
            r"params/fc/kernel",
            r"params/embed/embedding",
        ],
        rank=2,
        exclude=[r"params/k/.*"],
        layouts={
            r"params/(q|v)/kernel": "ioo",
            r"params/o/kernel": "iio",
            r"params/conv/kernel": KernelLayout("iio", "conv"),
        },
        rank_pattern={r"params/fc/kernel": 4},
    )
    base, delta = lj.init_lora(KEY, params, cfg)
    before = frozen_copy(base)
    summary = lj.summarize(base, delta)
    assert {leaf.path: leaf.kind for leaf in summary.leaves} == {
        "params/conv/kernel": "conv",
        "params/embed/embedding": "embed",
        "params/fc/kernel": "dense",
        "params/o/kernel": "dense",
        "params/q/kernel": "dense",
        "params/v/kernel": "dense",
    }
    assert delta["params"]["k"]["kernel"] is None

    def loss_fn(d):
        return jnp.mean((model.apply(lj.merge(base, d), TOKENS) - TARGET) ** 2)

    apply = jax.jit(model.apply)
    base_loss = float(jnp.mean((apply(base, TOKENS) - TARGET) ** 2))
    delta, losses = train(loss_fn, delta)
    assert abs(losses[0] - base_loss) <= 1e-6 * base_loss
    assert losses[-1] < 0.9 * losses[0], losses
    assert_same(base, before)

    merged = jax.jit(lj.merge)(base, delta)
    ref = ref_merged(base, delta)
    for (p, x), (_, y) in zip(
        lj.advanced.leaves_with_paths(merged)[0], lj.advanced.leaves_with_paths(ref)[0]
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=p)
    changed = [
        p
        for (p, x), (_, y) in zip(
            lj.advanced.leaves_with_paths(merged)[0], lj.advanced.leaves_with_paths(base)[0]
        )
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]
    assert sorted(changed) == sorted(leaf.path for leaf in summary.leaves)
    out = apply(merged, TOKENS)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(apply(ref, TOKENS)), rtol=1e-4, atol=1e-5
    )
    # unmerge gives the base back
    back = jax.jit(lj.unmerge)(merged, delta)
    for (p, x), (_, y) in zip(
        lj.advanced.leaves_with_paths(back)[0], lj.advanced.leaves_with_paths(base)[0]
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5, err_msg=p)


# --------------------------------------------------------------------------- (b) NNX


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


X = jnp.asarray(np.random.default_rng(6).standard_normal((10, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(7).standard_normal((10, 3)), jnp.float32)


def numpy_mlp(w1, b1, w2, b2, x):
    return np.tanh(np.float64(x) @ w1 + b1) @ w2 + b2


def test_nnx_model(randomize):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))))
    state = randomize(abstract)
    cfg = LoraConfig(targets=r"fc\d/kernel", rank=2, alpha=8.0, init="gaussian")
    base, delta = lj.init_lora(KEY, state, cfg)
    before = frozen_copy(base)

    def loss_fn(d):
        return jnp.mean((nnx.merge(graphdef, lj.merge(base, d))(X) - Y) ** 2)

    delta, losses = train(loss_fn, delta)
    assert losses[-1] < 0.9 * losses[0], losses
    assert_same(base, before)

    merged_state = lj.merge(base, delta)
    assert type(merged_state) is type(state)
    model = nnx.merge(graphdef, merged_state)
    out = np.asarray(model(X))

    factors = dict(lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0])
    values = dict(lj.advanced.leaves_with_paths(base)[0])

    def dense(name):
        f = factors[f"{name}/kernel"]
        return np.float64(values[f"{name}/kernel"]) + (8.0 / 2) * np.float64(f.a) @ np.float64(f.b)

    want = numpy_mlp(
        dense("fc1"),
        np.float64(values["fc1/bias"]),
        dense("fc2"),
        np.float64(values["fc2/bias"]),
        X,
    )
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    base_out = numpy_mlp(
        np.float64(values["fc1/kernel"]),
        values["fc1/bias"],
        np.float64(values["fc2/kernel"]),
        values["fc2/bias"],
        X,
    )
    assert np.abs(out - base_out).max() > 1e-3  # the trained delta changed the model

    # nnx.update writes the merged weights into a live module in place.
    live = nnx.merge(graphdef, base)
    nnx.update(live, merged_state)
    np.testing.assert_array_equal(np.asarray(live(X)), out)


# --------------------------------------------------------------------------- (c) plain function


def plain_fn(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.einsum("nd,dhk->nhk", h, params["proj"]).reshape(x.shape[0], -1)  # (d, h, k)
    return h @ params["w2"]


def test_plain_function(randomize):
    shapes = {"w1": (4, 8), "b1": (8,), "proj": (8, 2, 3), "w2": (6, 3)}
    params = randomize({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}, seed=2)
    cfg = LoraConfig(
        targets=["w1", "proj", "w2"],
        rank=2,
        alpha=2.0,
        init="swapped",
        use_rslora=True,
        layouts={"proj": "ioo"},
    )
    base, delta = lj.init_lora(KEY, params, cfg)
    before = frozen_copy(base)

    def loss_fn(d):
        return jnp.mean((plain_fn(lj.merge(base, d), X) - Y) ** 2)

    delta, losses = train(loss_fn, delta)
    assert losses[-1] < 0.9 * losses[0], losses
    assert_same(base, before)

    s = 2.0 / np.sqrt(2)
    f1, fp, f2 = delta["w1"], delta["proj"], delta["w2"]
    w1 = np.float64(params["w1"]) + s * np.float64(f1.a) @ np.float64(f1.b)
    proj = np.float64(params["proj"]) + s * np.einsum(
        "dr,rhk->dhk", np.float64(fp.a), np.float64(fp.b)
    )
    w2 = np.float64(params["w2"]) + s * np.float64(f2.a) @ np.float64(f2.b)
    h = np.tanh(np.float64(X) @ w1 + np.float64(params["b1"]))
    want = np.einsum("nd,dhk->nhk", h, proj).reshape(len(h), -1) @ w2
    got = plain_fn(jax.jit(lj.merge)(base, delta), X)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # merging on the fly and merging once agree
    np.testing.assert_allclose(
        float(jax.jit(loss_fn)(delta)), float(np.mean((want - np.float64(Y)) ** 2)), rtol=1e-5
    )
