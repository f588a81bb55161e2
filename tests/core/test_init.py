"""Init schemes, step-0 equality, determinism and factor dtypes."""

import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig

# The "rbg" PRNG compiles much faster than threefry on CPU; the determinism
# tests below also use the default (threefry) key.
KEY = jax.random.key(0, impl="rbg")
SCHEMES = ("kaiming", "gaussian", "swapped")


def assert_same_arrays(base, params):
    """The base holds the params' own leaves (no copy), in new containers (see init_lora)."""
    assert base is not params
    assert jax.tree.structure(base) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)))


def factors_of(delta, path):
    rows = lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
    return dict(rows)[path]


def all_factors(delta):
    return {
        p: f
        for p, f in lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
        if lj.advanced.is_factors(f)
    }


# --------------------------------------------------------------------------- distributions
#
# Every distribution test reads one delta per scheme, drawn once for this tree
# (init_lora compiles the draws once per distinct kernel spec).

BIG = (256, 256)  # A (256, 8) and B (8, 256): 2048 draws each
R = 8
KIND_CASES = {  # name: (kernel shape, dtype, layout or None for the default)
    "embed": ((4, 5), jnp.bfloat16, None),
    "conv1d": ((3, 4, 5), jnp.float32, KernelLayout("iio", "conv")),
    "dense_general": ((4, 2, 3), jnp.float32, KernelLayout("ioo")),  # as in plain_fn below
    "stacked": ((3, 4, 4), jnp.float32, KernelLayout("sio")),  # as in plain_fn below
    "stacked_embed": ((3, 4, 5), jnp.float32, KernelLayout("sio", "embed")),
}
CONV_CASES = {  # kaiming only -- name: (kernel shape, axes, fan_in)
    "conv2d": ((3, 3, 16, 8), "iiio", 144),  # the window counts in fan_in
    "conv1d_wide": ((5, 12, 8), "iio", 60),
    "conv3d": ((2, 2, 2, 6, 8), "iiiio", 48),
}


def leaf_name(kind):
    return "embedding" if kind == "embed" else "kernel"


@pytest.fixture(scope="module")
def deltas():
    params = {
        "big": {
            "w": jax.ShapeDtypeStruct(BIG, jnp.float32),  # a dense kernel
            "embedding": jax.ShapeDtypeStruct(BIG, jnp.bfloat16),
        }
    }
    layouts = {}
    for kind, (shape, dtype, layout) in KIND_CASES.items():
        params[kind] = {leaf_name(kind): jax.ShapeDtypeStruct(shape, dtype)}
        if layout is not None:
            layouts[f"{kind}/{leaf_name(kind)}"] = layout
    out = {}
    for scheme in SCHEMES:
        cfg = LoraConfig(
            targets=r".*/(kernel|embedding|w)",
            rank=2,
            init=scheme,
            layouts=layouts,
            rank_pattern={r"big/.*": R},
        )
        out[scheme] = lj.init_lora(KEY, params, cfg)[1]
    conv = {
        name: {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
        for name, (shape, _, _) in CONV_CASES.items()
    }
    conv["stacked16"] = {"kernel": jax.ShapeDtypeStruct((3, 16, 8), jnp.float32)}
    conv_layouts = {
        f"{name}/kernel": KernelLayout(axes, "conv") for name, (_, axes, _) in CONV_CASES.items()
    }
    cfg = LoraConfig(
        targets=r".*/kernel", rank=4, layouts={**conv_layouts, "stacked16/kernel": "sio"}
    )
    out["kaiming_conv"] = lj.init_lora(KEY, conv, cfg)[1]
    return out


def ab(delta, path):
    f = factors_of(delta, path)
    return np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)


def test_kaiming_dense(deltas):
    a, b = ab(deltas["kaiming"], "big/w")
    bound = 1 / math.sqrt(BIG[0])
    assert np.all(b == 0)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(a.mean()) < 0.1 * bound
    assert np.unique(a).size > a.size - 8  # every entry drawn (f32 allows rare collisions)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_kaiming_conv_fan_in_includes_window(deltas, name):
    shape, _, fan_in = CONV_CASES[name]
    a, b = ab(deltas["kaiming_conv"], f"{name}/kernel")
    bound = 1 / math.sqrt(fan_in)
    assert a.shape == shape[:-1] + (4,)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound  # so the bound is not that of a larger fan_in either
    assert np.all(b == 0)


def test_kaiming_stacked_fan_in_excludes_stack_and_layers_differ(deltas):
    a, b = ab(deltas["kaiming_conv"], "stacked16/kernel")
    assert a.shape == (3, 16, 4)
    assert np.abs(a).max() <= 1 / 4  # fan_in 16, not 48
    assert np.abs(a).max() > 0.9 / 4
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert np.all(b == 0)


def test_gaussian(deltas):
    a, b = ab(deltas["gaussian"], "big/w")
    assert np.all(b == 0)
    assert a.std() == pytest.approx(1 / R, rel=0.06)
    assert abs(a.mean()) < 0.1 / R
    # Gaussian, not uniform: a uniform of this std has nothing beyond sqrt(3) std
    assert np.mean(np.abs(a) > 2.0 / R) > 0.02


def test_swapped(deltas):
    a, b = ab(deltas["swapped"], "big/w")
    bound = 1 / math.sqrt(R)
    assert np.all(a == 0)
    assert np.abs(b).max() <= bound
    assert np.abs(b).max() > 0.99 * bound
    assert b.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("scheme", ["kaiming", "gaussian"])
def test_embedding(deltas, scheme):
    a, b = ab(deltas[scheme], "big/embedding")
    assert np.all(a == 0)
    assert b.std() == pytest.approx(1.0, rel=0.06)
    assert abs(b.mean()) < 0.1
    assert np.abs(b).max() > 2.5  # normal, not a bounded uniform


def test_embedding_swapped(deltas):
    a, b = ab(deltas["swapped"], "big/embedding")
    assert np.all(b == 0)
    assert a.std() == pytest.approx(1.0, rel=0.06)
    assert np.abs(a).max() > 2.5


def test_scheme_does_not_change_embedding_draws(deltas):
    # kaiming and gaussian differ only for non-embedding kernels
    np.testing.assert_array_equal(
        ab(deltas["kaiming"], "big/embedding")[1], ab(deltas["gaussian"], "big/embedding")[1]
    )


ZERO_CASES = {  # path in the fixture tree: (shape, kind)
    "big/w": (BIG, "dense"),
    "big/embedding": (BIG, "embed"),
    **{
        f"{k}/{leaf_name(k)}": (shape, "embed" if k == "embed" else layout.kind)
        for k, (shape, _, layout) in KIND_CASES.items()
    },
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("path", list(ZERO_CASES))
def test_exactly_one_factor_zero(deltas, scheme, path):
    shape, kind = ZERO_CASES[path]
    f = factors_of(deltas[scheme], path)
    assert f.layout.kind == kind
    a, b = np.asarray(f.a), np.asarray(f.b)
    a_zero, b_zero = not a.any(), not b.any()
    assert a_zero != b_zero, "exactly one factor must be zero"
    nonzero = b if a_zero else a
    assert np.count_nonzero(nonzero) == nonzero.size
    # embeddings: A is zero unless swapped; others: B is zero unless swapped
    assert a_zero == ((scheme == "swapped") != (kind == "embed"))
    np.testing.assert_array_equal(np.asarray(lj.advanced.dense_delta(f)), np.zeros(shape))
    if path.startswith("stacked"):
        assert not np.array_equal(nonzero[0], nonzero[1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_factor_dtype_default_float32_for_bf16_base(deltas, scheme):
    for path in ("embed/embedding", "big/embedding"):  # bf16 base tables
        f = factors_of(deltas[scheme], path)
        assert f.a.dtype == jnp.float32 and f.b.dtype == jnp.float32


# --------------------------------------------------------------------------- step-0 equality on models


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 8, name="embed")(tokens)  # embedding (11, 8)
        x = nn.Conv(8, kernel_size=(3,), name="conv")(x)  # kernel (3, 8, 8)
        q = nn.DenseGeneral((2, 4), name="q")(x)  # kernel (8, 2, 4)
        x = x + nn.DenseGeneral(8, axis=(-2, -1), name="o")(jnp.tanh(q))  # kernel (2, 4, 8)
        return nn.Dense(5, name="fc")(x)  # kernel (8, 5)


LINEN_LAYOUTS = {
    r"params/conv/kernel": KernelLayout("iio", "conv"),
    r"params/q/kernel": "ioo",
    r"params/o/kernel": "iio",
}


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)
        self.q = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, tokens):
        x = self.conv(self.embed(tokens))
        x = x + self.o(jnp.tanh(self.q(x)))
        return self.fc(x)


NNX_LAYOUTS = {r"conv/kernel": KernelLayout("iio", "conv"), r"q/kernel": "ioo", r"o/kernel": "iio"}

LINEN_APPLY = jax.jit(LinenNet().apply)

TOKENS = jnp.array([[1, 5, 10, 0, 3], [7, 7, 2, 9, 4]], jnp.int32)


def plain_fn(params, x):
    for layer in range(params["stack"].shape[0]):  # stacked (layers, in, out)
        x = jnp.tanh(x @ params["stack"][layer] + params["bias"][layer])
    y = jnp.einsum("bd,dhk->bhk", x, params["proj"])  # (d, h, k)
    return y.sum(-1) @ params["head"]


PLAIN_SHAPES = {"stack": (3, 4, 4), "bias": (3, 4), "proj": (4, 2, 3), "head": (2, 5)}
PLAIN_LAYOUTS = {"stack": "sio", "proj": "ioo"}


def _check_same(base, merged):
    for (p, x), (q, y) in zip(
        lj.advanced.leaves_with_paths(base)[0], lj.advanced.leaves_with_paths(merged)[0]
    ):
        assert p == q
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step0_linen(scheme, randomize):
    model = LinenNet()
    params = randomize(jax.eval_shape(model.init, KEY, TOKENS))
    cfg = LoraConfig(
        targets=r"params/.*/(kernel|embedding)", rank=2, init=scheme, layouts=LINEN_LAYOUTS
    )
    base, delta = lj.init_lora(KEY, params, cfg)
    assert_same_arrays(base, params)
    kinds = {p: f.layout.kind for p, f in all_factors(delta).items()}
    assert kinds == {
        "params/embed/embedding": "embed",
        "params/conv/kernel": "conv",
        "params/q/kernel": "dense",
        "params/o/kernel": "dense",
        "params/fc/kernel": "dense",
    }
    merged = lj.merge(base, delta)
    _check_same(base, merged)
    assert np.array_equal(
        np.asarray(LINEN_APPLY(merged, TOKENS)), np.asarray(LINEN_APPLY(base, TOKENS))
    )


@pytest.fixture(scope="module")
def nnx_model():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))

    @jax.jit
    def forward(st):
        return nnx.merge(graphdef, st)(TOKENS)

    return abstract, forward


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step0_nnx(scheme, randomize, nnx_model):
    abstract, forward = nnx_model
    state = randomize(abstract)
    cfg = LoraConfig(targets=r".*/(kernel|embedding)", rank=2, init=scheme, layouts=NNX_LAYOUTS)
    base, delta = lj.init_lora(KEY, state, cfg)
    assert sorted(all_factors(delta)) == [
        "conv/kernel",
        "embed/embedding",
        "fc/kernel",
        "o/kernel",
        "q/kernel",
    ]
    merged = lj.merge(base, delta)
    _check_same(base, merged)
    assert np.array_equal(np.asarray(forward(merged)), np.asarray(forward(base)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step0_plain_function(scheme, randomize):
    params = randomize({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in PLAIN_SHAPES.items()})
    cfg = LoraConfig(targets=["stack", "proj"], rank=2, init=scheme, layouts=PLAIN_LAYOUTS)
    base, delta = lj.init_lora(KEY, params, cfg)
    assert delta["bias"] is None and delta["head"] is None
    merged = lj.merge(base, delta)
    _check_same(base, merged)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4)), jnp.float32)
    assert np.array_equal(np.asarray(plain_fn(merged, x)), np.asarray(plain_fn(base, x)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step0_bf16_base(deltas, scheme):
    rng = np.random.default_rng(0)
    params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((4, 5)), jnp.bfloat16)}}
    delta = {k: {n: factors_of(deltas[scheme], f"{k}/{n}")} for k, v in params.items() for n in v}
    merged = lj.merge(params, delta)
    for (p, x), (_, y) in zip(
        lj.advanced.leaves_with_paths(params)[0], lj.advanced.leaves_with_paths(merged)[0]
    ):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(y).view(np.uint16), np.asarray(x).view(np.uint16), err_msg=p
        )


# --------------------------------------------------------------------------- determinism


DET_PARAMS = {"a": jnp.zeros((4, 5)), "b": jnp.zeros((4, 5)), "c": jnp.zeros(3)}


@pytest.mark.parametrize(
    "key_fn",
    [lambda s: jax.random.key(s), lambda s: jax.random.PRNGKey(s)],
    ids=["typed_threefry", "raw_uint32"],
)
def test_same_key_same_delta_and_path_keyed(key_fn):
    cfg = LoraConfig(targets=["a", "b"], rank=2)
    _, d1 = lj.init_lora(key_fn(7), DET_PARAMS, cfg)
    _, d2 = lj.init_lora(key_fn(7), DET_PARAMS, cfg)
    _, d3 = lj.init_lora(key_fn(8), DET_PARAMS, cfg)
    for p in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(d1[p].a), np.asarray(d2[p].a))
        np.testing.assert_array_equal(np.asarray(d1[p].b), np.asarray(d2[p].b))
        assert not np.array_equal(np.asarray(d1[p].a), np.asarray(d3[p].a))
    assert not np.array_equal(np.asarray(d1["a"].a), np.asarray(d1["b"].a))  # per-path keys differ
    # Adding or removing another target leaves "a" unchanged.
    _, only_a = lj.init_lora(key_fn(7), DET_PARAMS, LoraConfig(targets="a", rank=2))
    np.testing.assert_array_equal(np.asarray(only_a["a"].a), np.asarray(d1["a"].a))
    assert only_a["b"] is None
    # The documented derivation: fold_in(key, crc32(path)), then U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    want = jax.random.uniform(
        jax.random.fold_in(key_fn(7), zlib.crc32(b"a")),
        (4, 2),
        jnp.float32,
        -1 / math.sqrt(4),
        1 / math.sqrt(4),
    )
    np.testing.assert_array_equal(np.asarray(d1["a"].a), np.asarray(want))


def test_unrelated_target_in_other_tree_kind_does_not_change_factors():
    cfg_small = LoraConfig(targets=r"enc/w", rank=2)
    cfg_big = LoraConfig(targets=[r"enc/w", r"dec/w", r"extra/w"], rank=2)
    small = {"enc": {"w": jnp.zeros((4, 5))}, "dec": {"w": jnp.zeros((4, 5))}}
    big = dict(small, extra={"w": jnp.zeros((4, 5))})
    _, d_small = lj.init_lora(KEY, small, cfg_small)
    _, d_big = lj.init_lora(KEY, big, cfg_big)
    np.testing.assert_array_equal(
        np.asarray(d_small["enc"]["w"].a), np.asarray(d_big["enc"]["w"].a)
    )


def test_shape_dtype_struct_params():
    params = {
        "w": jax.ShapeDtypeStruct((4, 5), jnp.bfloat16),
        "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16),
    }
    base, delta = lj.init_lora(KEY, params, LoraConfig(targets="w", rank=2))
    assert_same_arrays(base, params)
    assert delta["b"] is None
    assert delta["w"].a.shape == (4, 2) and delta["w"].a.dtype == jnp.float32


# --------------------------------------------------------------------------- dtypes and metadata


def test_factor_dtype_config_respected():
    params = {"w": jnp.ones((4, 5)), "embedding": jnp.ones((4, 5), jnp.bfloat16)}
    cfg = LoraConfig(targets=["w", "embedding"], rank=2, dtype=jnp.bfloat16)
    _, delta = lj.init_lora(KEY, params, cfg)
    for p in ("w", "embedding"):
        assert delta[p].a.dtype == jnp.bfloat16 and delta[p].b.dtype == jnp.bfloat16
    assert np.asarray(delta["w"].a).any() and np.asarray(delta["embedding"].b).any()
    merged = lj.merge(params, delta)
    assert merged["w"].dtype == jnp.float32 and merged["embedding"].dtype == jnp.bfloat16


def test_bf16_factors_keep_distribution():
    params = {"w": jax.ShapeDtypeStruct(BIG, jnp.float32)}
    _, delta = lj.init_lora(KEY, params, LoraConfig(targets="w", rank=R, dtype=jnp.bfloat16))
    a = np.asarray(delta["w"].a, np.float64)
    bound = 1 / math.sqrt(BIG[0])
    assert np.abs(a).max() <= bound * (1 + 2**-8)  # bf16 rounding of the bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_metadata_alpha_rslora_layout():
    params = {"q": jnp.zeros((4, 2, 3)), "v": jnp.zeros((8, 5))}
    cfg = LoraConfig(
        targets=["q", "v"],
        rank=2,
        alpha=6.0,
        rank_pattern={"v": 4},
        alpha_pattern={"q": 3.0},
        use_rslora=True,
        layouts={"q": "ioo"},
    )
    _, delta = lj.init_lora(KEY, params, cfg)
    q, v = delta["q"], delta["v"]
    assert (q.alpha, q.rank, q.rslora, q.layout) == (3.0, 2, True, KernelLayout("ioo"))
    assert (v.alpha, v.rank, v.rslora, v.layout) == (6.0, 4, True, KernelLayout("io"))
    assert q.scale == pytest.approx(3.0 / math.sqrt(2), rel=1e-15)
    assert v.scale == pytest.approx(6.0 / 2.0, rel=1e-15)
    assert v.num_params == 8 * 4 + 4 * 5 and q.num_params == 4 * 2 + 2 * 6
    # Metadata is static: only a and b are pytree leaves.
    assert len(jax.tree.leaves(delta)) == 4


def test_init_factors_direct():
    target = lj.advanced.select_targets(
        {"w": jnp.zeros((4, 5))}, LoraConfig(targets="w", rank=2, alpha=5.0)
    )["w"]
    f = lj.advanced.init_factors(KEY, target, "kaiming", jnp.float32, False)
    assert f.a.shape == (4, 2) and f.b.shape == (2, 5)
    assert np.abs(np.asarray(f.a)).max() <= 1 / 2 and not np.asarray(f.b).any()
    assert f.alpha == 5.0 and f.scale == 2.5
