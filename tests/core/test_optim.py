"""Training only the delta with optax: gradients, freezing, optimizer state size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig, LoraFactors

KEY = jax.random.key(0, impl="rbg")
STEPS = 5


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, name="fc1")(x))
        return nn.Dense(2, name="fc2")(x)


MODEL = Mlp()
X = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((16, 2)), jnp.float32)


@pytest.fixture(scope="module")
def mlp(randomize):
    params = randomize(jax.eval_shape(MODEL.init, KEY, X))
    cfg = LoraConfig(targets=r"params/fc\d/kernel", rank=2, alpha=4.0)
    return lj.init_lora(KEY, params, cfg)


def snapshot(tree):
    return [
        (p, np.array(x, copy=True), np.asarray(x).tobytes())
        for p, x in lj.advanced.leaves_with_paths(tree)[0]
    ]


def assert_unchanged(tree, snap):
    now = lj.advanced.leaves_with_paths(tree)[0]
    assert [p for p, _ in now] == [p for p, _, _ in snap]
    for (p, x), (_, before, raw) in zip(now, snap):
        assert np.array_equal(np.asarray(x), before), p
        assert np.asarray(x).tobytes() == raw, p


def mse(params):
    return jnp.mean((MODEL.apply(params, X) - Y) ** 2)


# --------------------------------------------------------------------------- (a) grad of the delta only


def test_recommended_loop_trains_delta_only(mlp):
    base, delta = mlp
    before = snapshot(base)

    def loss_fn(d, b):
        return mse(lj.merge(b, d))

    opt = optax.adam(3e-2)
    opt_state = opt.init(delta)
    # Adam moments for the factors only (no base leaves in the optimizer at all).
    n_factor = sum(f.num_params for f in jax.tree.leaves(delta, is_leaf=lj.advanced.is_factors))
    assert lj.count_params(opt_state) == 2 * n_factor + 1

    @jax.jit
    def step(d, s, b):
        loss, grads = jax.value_and_grad(loss_fn)(d, b)
        updates, s = opt.update(grads, s, d)
        return optax.apply_updates(d, updates), s, loss

    losses = []
    d = delta
    for _ in range(STEPS):
        d, opt_state, loss = step(d, opt_state, base)
        losses.append(float(loss))
    final = float(loss_fn(d, base))
    assert losses[0] == pytest.approx(float(mse(base)), rel=1e-6)  # step 0 equals the base model
    assert all(later < earlier for earlier, later in zip(losses, losses[1:] + [final])), losses
    assert final < 0.97 * losses[0]
    assert_unchanged(base, before)
    # The delta did change, and kept its structure and static metadata.
    assert jax.tree.structure(d) == jax.tree.structure(delta)
    assert not np.array_equal(np.asarray(d["params"]["fc1"]["kernel"].b), 0)
    assert d["params"]["fc1"]["bias"] is None


def test_merge_on_the_fly_gradient_dense_formula():
    rng = np.random.default_rng(3)
    n, fin, fout, r = 6, 5, 4, 2
    w, bias = rng.standard_normal((fin, fout)), rng.standard_normal(fout)
    a, b = rng.standard_normal((fin, r)), rng.standard_normal((r, fout))
    x, g = rng.standard_normal((n, fin)), rng.standard_normal((n, fout))
    alpha = 3.0
    s = alpha / r
    params = {
        "dense": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    }
    f = LoraFactors(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(b, jnp.float32),
        alpha=alpha,
        rslora=False,
        layout=KernelLayout("io"),
    )
    delta = {"dense": {"kernel": f, "bias": None}}

    def loss(d):  # L = sum(G * y) so that dL/dy = G
        p = lj.merge(params, d)["dense"]
        y = jnp.asarray(x, jnp.float32) @ p["kernel"] + p["bias"]
        return jnp.sum(jnp.asarray(g, jnp.float32) * y)

    grads = jax.grad(loss)(delta)["dense"]["kernel"]
    assert isinstance(grads, LoraFactors) and grads.layout == f.layout
    # y = x (W + s A B): dL/dA = s X^T G B^T, dL/dB = s A^T X^T G
    np.testing.assert_allclose(np.asarray(grads.a), s * x.T @ g @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.b), s * a.T @ x.T @ g, rtol=1e-5, atol=1e-5)

    def hand(a_, b_):  # the same loss written densely, without lora_jax
        wd = jnp.asarray(w, jnp.float32) + s * jnp.dot(a_, b_, precision="highest")
        return jnp.sum(jnp.asarray(g, jnp.float32) * (jnp.asarray(x, jnp.float32) @ wd + bias))

    ga, gb = jax.grad(hand, argnums=(0, 1))(f.a, f.b)
    np.testing.assert_allclose(np.asarray(grads.a), np.asarray(ga), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.b), np.asarray(gb), rtol=1e-5, atol=1e-5)


def test_merge_on_the_fly_gradient_nd_layouts():
    """Gradients through a stacked "sio" and a DenseGeneral "ioo" kernel vs a hand-written einsum."""
    rng = np.random.default_rng(4)
    ws, wq = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2, 3))
    fs = LoraFactors(
        jnp.asarray(rng.standard_normal((2, 3, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 2, 4)), jnp.float32),
        alpha=2.0,
        rslora=True,
        layout=KernelLayout("sio"),
    )
    fq = LoraFactors(
        jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32),
        alpha=5.0,
        rslora=False,
        layout=KernelLayout("ioo"),
    )
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    params = {"s": jnp.asarray(ws, jnp.float32), "q": jnp.asarray(wq, jnp.float32)}

    def forward(p):
        h = jnp.tanh(x @ p["s"][0]) * jnp.tanh(x @ p["s"][1])  # two stacked (3, 4) kernels
        return jnp.sum(jnp.einsum("nd,dhk->nhk", h, p["q"]) ** 2)

    grads = jax.jit(jax.grad(lambda d: forward(lj.merge(params, d))))({"s": fs, "q": fq})

    def hand(a_s, b_s, a_q, b_q):
        s_s, s_q = 2.0 / np.sqrt(2), 5.0 / 2
        dense_s = params["s"] + s_s * jnp.einsum("lir,lro->lio", a_s, b_s, precision="highest")
        dense_q = params["q"] + s_q * jnp.einsum("dr,rhk->dhk", a_q, b_q, precision="highest")
        return forward({"s": dense_s, "q": dense_q})

    want = jax.jit(jax.grad(hand, argnums=(0, 1, 2, 3)))(fs.a, fs.b, fq.a, fq.b)
    got = (grads["s"].a, grads["s"].b, grads["q"].a, grads["q"].b)
    for g, w_ in zip(got, want):
        assert g.shape == w_.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(g)).max() > 0


# --------------------------------------------------------------------------- (b) freeze on a combined tree


def factor_bytes(delta):
    return sum(
        x.size * x.dtype.itemsize
        for f in jax.tree.leaves(delta, is_leaf=lj.advanced.is_factors)
        for x in (f.a, f.b)
    )


def split_state(state):
    """(bytes of non-scalar arrays, number of scalar arrays, bytes of scalar arrays)."""
    arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    big = sum(x.size * x.dtype.itemsize for x in arrays if x.ndim > 0)
    scalars = [x for x in arrays if x.ndim == 0]
    return big, len(scalars), sum(x.dtype.itemsize for x in scalars)


def run_combined(opt, combined, steps=STEPS):
    def loss_fn(t):
        return mse(lj.merge(t["base"], t["delta"]))

    state = opt.init(combined)

    @jax.jit
    def step(t, s):
        loss, grads = jax.value_and_grad(loss_fn)(
            t
        )  # grads for the base too: freeze must zero them
        updates, s = opt.update(grads, s, t)
        return optax.apply_updates(t, updates), s, loss, updates

    losses = []
    for _ in range(steps):
        combined, state, loss, updates = step(combined, state)
        losses.append(float(loss))
    return combined, state, losses, updates


def test_freeze_adamw_combined_tree(mlp):
    base, delta = mlp
    before = snapshot(base)
    combined = {"base": base, "delta": delta}
    opt = lj.train_delta_only(optax.adamw(3e-2, weight_decay=0.1))
    state0 = opt.init(combined)
    # Optimizer state: Adam's mu and nu for the factors only, plus scalar step counters.
    big, n_scalars, scalar_bytes = split_state(state0)
    trainable = factor_bytes(delta)
    assert big == 2 * trainable
    assert n_scalars >= 1
    assert lj.advanced.tree_bytes(state0) == 2 * trainable + scalar_bytes
    assert lj.count_params(state0) == 2 * lj.count_params(delta) + n_scalars
    assert lj.count_params(delta) == (4 * 2 + 2 * 8) + (8 * 2 + 2 * 2)
    assert trainable == 4 * lj.count_params(delta)

    out, state, losses, updates = run_combined(opt, combined)
    assert_unchanged(out["base"], before)
    # frozen leaves get an update of exactly zero
    for p, u in lj.advanced.leaves_with_paths(updates["base"])[0]:
        assert not np.asarray(u).any(), p
    for path in ("fc1", "fc2"):
        f0, f1 = delta["params"][path]["kernel"], out["delta"]["params"][path]["kernel"]
        assert not np.array_equal(np.asarray(f0.b), np.asarray(f1.b))
    assert losses[-1] < losses[0]
    assert lj.advanced.tree_bytes(state) == lj.advanced.tree_bytes(state0)


def test_freeze_extra_trainable_bias(mlp):
    base, delta = mlp
    combined = {"base": base, "delta": delta}
    pattern = r"base/params/fc2/bias"
    opt = lj.train_delta_only(optax.adam(3e-2), extra_trainable=[pattern])
    state0 = opt.init(combined)
    big, _, scalar_bytes = split_state(state0)
    bias_bytes = base["params"]["fc2"]["bias"].size * 4
    assert big == 2 * (factor_bytes(delta) + bias_bytes)
    assert lj.advanced.tree_bytes(state0) == 2 * (factor_bytes(delta) + bias_bytes) + scalar_bytes
    before_fc1 = snapshot(base["params"]["fc1"])
    before_k2 = np.array(base["params"]["fc2"]["kernel"], copy=True)
    out, _, _, _ = run_combined(opt, combined)
    assert not np.array_equal(
        np.asarray(out["base"]["params"]["fc2"]["bias"]), np.asarray(base["params"]["fc2"]["bias"])
    )
    assert_unchanged(out["base"]["params"]["fc1"], before_fc1)
    assert np.asarray(out["base"]["params"]["fc2"]["kernel"]).tobytes() == before_k2.tobytes()


def test_trainable_mask_values(mlp):
    base, delta = mlp
    mask = lj.advanced.trainable_mask(
        {"base": base, "delta": delta}, extra_trainable=[r"base/params/fc1/bias"]
    )
    flat = {p: v for p, v in lj.advanced.leaves_with_paths(mask)[0]}
    assert flat == {
        "base/params/fc1/bias": True,
        "base/params/fc1/kernel": False,
        "base/params/fc2/bias": False,
        "base/params/fc2/kernel": False,
        "delta/params/fc1/kernel/a": True,
        "delta/params/fc1/kernel/b": True,
        "delta/params/fc2/kernel/a": True,
        "delta/params/fc2/kernel/b": True,
    }
    # The mask has the tree's structure (LoraFactors nodes included), so optax accepts it.
    assert jax.tree.structure(mask) == jax.tree.structure({"base": base, "delta": delta})
    # Full match only: a prefix does not select anything.
    mask = lj.advanced.trainable_mask({"base": base}, extra_trainable=[r"base/params/fc1"])
    assert not any(jax.tree.leaves(mask))
    # On the delta alone: every factor array is trainable.
    assert jax.tree.leaves(lj.advanced.trainable_mask(delta)) == [True] * 4


def test_count_params_and_tree_bytes_independent():
    tree = {
        "a": jnp.ones((2, 3), jnp.float32),
        "b": jnp.ones(5, jnp.bfloat16),
        "c": None,
        "d": [jnp.zeros((), jnp.int32), jnp.zeros((4, 4), jnp.int8)],
    }
    assert lj.count_params(tree) == 6 + 5 + 1 + 16
    assert lj.advanced.tree_bytes(tree) == 6 * 4 + 5 * 2 + 4 + 16
    f = LoraFactors(
        jnp.ones((3, 2)),
        jnp.ones((2, 7), jnp.bfloat16),
        alpha=1.0,
        rslora=False,
        layout=KernelLayout("io"),
    )
    assert lj.count_params({"w": f}) == 6 + 14 == f.num_params
    assert lj.advanced.tree_bytes({"w": f}) == 6 * 4 + 14 * 2
