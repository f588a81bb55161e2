"""Target selection on linen, NNX and plain pytrees; layouts; factor shapes."""

import re
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import (
    KernelLayout,
    LoraConfig,
    LoraConfigError,
    LoraFactors,
    LoraLayoutError,
    LoraTargetError,
)
from lora_jax.advanced import select_targets

# jax.random compiles slowly per new shape with the default threefry PRNG on CPU;
# lora_jax is PRNG-agnostic, so most tests use the cheap "rbg" implementation.
KEY = jax.random.key(0, impl="rbg")


# --------------------------------------------------------------------------- trees


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="fc1")(x)
        x = nn.relu(x)
        return nn.Dense(3, name="fc2")(x)


@pytest.fixture(scope="module")
def linen_params(randomize):
    return randomize(jax.eval_shape(Mlp().init, KEY, jnp.ones((1, 4))))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 5, rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.linear(x)))


def plain_tree():
    return {
        "enc": {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)},
        "dec": {"w": jnp.ones((6, 3)), "b": jnp.zeros(3)},
    }


def paths_of(targets):
    return list(targets)


# --------------------------------------------------------------------------- (a)-(d) tree kinds


def test_linen_params(linen_params):
    t = select_targets(linen_params, LoraConfig(targets=r"params/.*/kernel", rank=2))
    assert paths_of(t) == ["params/fc1/kernel", "params/fc2/kernel"]
    assert t["params/fc1/kernel"].shape == (4, 6)
    assert t["params/fc2/kernel"].shape == (6, 3)
    assert t["params/fc1/kernel"].layout == KernelLayout("io", "dense")
    assert t["params/fc1/kernel"].factor_shapes() == ((4, 2), (2, 6))
    assert t["params/fc2/kernel"].factor_shapes() == ((6, 2), (2, 3))
    assert t["params/fc1/kernel"].dtype == jnp.float32


def nnx_state(randomize):
    _, abstract = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    return randomize(abstract)


def test_nnx_state_paths_drop_value(randomize):
    state = nnx_state(randomize)
    all_paths = [p for p, _ in lj.advanced.leaves_with_paths(state)[0]]
    assert sorted(all_paths) == ["linear/bias", "linear/kernel", "out/bias", "out/kernel"]
    t = select_targets(state, LoraConfig(targets=r"linear/kernel", rank=3))
    assert paths_of(t) == ["linear/kernel"]
    assert t["linear/kernel"].factor_shapes() == ((4, 3), (3, 5))
    _, delta = lj.init_lora(KEY, state, LoraConfig(targets=r".*/kernel", rank=2))
    flat = lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
    assert sorted(p for p, f in flat if lj.advanced.is_factors(f)) == [
        "linear/kernel",
        "out/kernel",
    ]


def test_nnx_param_filter_state():
    _, params, _rest = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))), nnx.Param, ...)
    t = select_targets(params, LoraConfig(targets=r"out/kernel", rank=2))
    assert paths_of(t) == ["out/kernel"]


def test_plain_dict():
    t = select_targets(plain_tree(), LoraConfig(targets=r".*/w", rank=2))
    assert paths_of(t) == ["dec/w", "enc/w"]  # flattening order: sorted dict keys


def test_list_and_tuple_tree():
    params = {
        "layers": [
            {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
            {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        ],
        "pair": (jnp.ones((4, 2)), jnp.ones((2, 5))),
    }
    t = select_targets(params, LoraConfig(targets=[r"layers/\d+/kernel", r"pair/1"], rank=2))
    assert paths_of(t) == ["layers/0/kernel", "layers/1/kernel", "pair/1"]
    assert t["pair/1"].factor_shapes() == ((2, 2), (2, 5))
    _, delta = lj.init_lora(KEY, params, LoraConfig(targets=r"layers/1/kernel", rank=2))
    assert isinstance(delta["layers"], list) and isinstance(delta["pair"], tuple)
    assert delta["layers"][0]["kernel"] is None and delta["pair"] == (None, None)
    assert isinstance(delta["layers"][1]["kernel"], LoraFactors)


def test_shape_dtype_struct_leaves():
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16)}
    t = select_targets(params, LoraConfig(targets="w", rank=4))
    assert t["w"].shape == (8, 4) and t["w"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- patterns


def test_pattern_matching_nothing_names_it():
    with pytest.raises(LoraTargetError, match=r"target pattern '.\*/query' matches no leaf") as e:
        select_targets(plain_tree(), LoraConfig(targets=[r".*/w", r".*/query"]))
    assert "'enc/w'" in str(e.value)  # shows example paths


def test_pattern_is_full_match():
    # "w" alone matches neither "enc/w" nor "dec/w" in full
    with pytest.raises(LoraTargetError, match=r"pattern 'w' matches no leaf"):
        select_targets(plain_tree(), LoraConfig(targets="w", rank=2))


def test_pattern_matching_only_excluded_leaves():
    cfg = LoraConfig(targets=[r".*/w", r"enc/.*"], exclude=r"enc/.*", rank=2)
    with pytest.raises(LoraTargetError, match=r"'enc/\.\*' matches only excluded leaves") as e:
        select_targets(plain_tree(), cfg)
    assert "enc/w" in str(e.value)


def test_exclude_removes_leaf():
    t = select_targets(plain_tree(), LoraConfig(targets=r".*/w", exclude=["dec/.*"], rank=2))
    assert paths_of(t) == ["enc/w"]


def test_predicate_targets():
    seen = []

    def pred(path, leaf):
        seen.append(path)
        return leaf.ndim == 2 and leaf.shape[1] == 3

    t = select_targets(plain_tree(), LoraConfig(targets=pred, rank=2))
    assert paths_of(t) == ["dec/w"]
    assert sorted(seen) == ["dec/b", "dec/w", "enc/b", "enc/w"]


def test_predicate_respects_exclude():
    pred = lambda path, leaf: leaf.ndim == 2  # noqa: E731
    t = select_targets(plain_tree(), LoraConfig(targets=pred, exclude="enc/w", rank=2))
    assert paths_of(t) == ["dec/w"]


def test_predicate_selecting_nothing():
    with pytest.raises(LoraTargetError, match=r"predicate selected no leaf"):
        select_targets(plain_tree(), LoraConfig(targets=lambda p, x: False))


# --------------------------------------------------------------------------- unsupported leaves


def mixed_tree():
    return {
        "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        "scale": jnp.float32(2.0),
        "step": jnp.zeros((3, 3), jnp.int32),
        "flag": jnp.zeros((2, 2), jnp.bool_),
    }


@pytest.mark.parametrize(
    "path, what",
    [
        ("dense/bias", r"shape \(4,\), dtype float32"),
        ("scale", r"shape \(\), dtype float32"),
        ("step", r"shape \(3, 3\), dtype int32"),
        ("flag", r"shape \(2, 2\), dtype bool"),
    ],
)
def test_unsupported_leaf_names_path(path, what):
    tree = mixed_tree()
    cfg = LoraConfig(targets=["dense/kernel", path], rank=2)
    with pytest.raises(LoraTargetError, match=rf"leaf '{path}' matches the targets .*{what}"):
        select_targets(tree, cfg)


def test_broad_pattern_unsupported_error_and_skip():
    with pytest.raises(LoraTargetError, match=r"leaf '\w+(/\w+)?' matches the targets"):
        select_targets(mixed_tree(), LoraConfig(targets=".*", rank=2))
    t = select_targets(mixed_tree(), LoraConfig(targets=".*", rank=2, skip_unsupported=True))
    assert paths_of(t) == ["dense/kernel"]


def test_python_scalar_leaf():
    tree = {"w": jnp.ones((4, 4)), "n": 3, "x": 1.5}
    with pytest.raises(LoraTargetError, match=r"leaf 'n' .*dtype int"):
        select_targets(tree, LoraConfig(targets=".*", rank=2))
    t = select_targets(tree, LoraConfig(targets=".*", rank=2, skip_unsupported=True))
    assert paths_of(t) == ["w"]
    base, delta = lj.init_lora(KEY, tree, LoraConfig(targets=".*", rank=2, skip_unsupported=True))
    assert delta["n"] is None and delta["x"] is None
    assert lj.merge(base, delta)["n"] == 3


# --------------------------------------------------------------------------- rank limits and patterns


@pytest.mark.parametrize("shape, rank", [((4, 3), 4), ((3, 4), 4), ((16, 2), 3)])
def test_rank_larger_than_kernel(shape, rank):
    with pytest.raises(
        LoraConfigError,
        match=rf"leaf 'w': rank {rank} is larger than min\(fan_in, fan_out\) = {min(shape)}",
    ):
        select_targets({"w": jnp.ones(shape)}, LoraConfig(targets="w", rank=rank))


def test_rank_equal_to_min_is_fine():
    t = select_targets({"w": jnp.ones((5, 3))}, LoraConfig(targets="w", rank=3))
    assert t["w"].factor_shapes() == ((5, 3), (3, 3))


def test_rank_limit_uses_products_of_axes():
    # (d, h, k) = (2, 3, 4) "ioo": fan_in 2, fan_out 12 -> rank 2 ok, 3 not
    p = {"q": jnp.ones((2, 3, 4))}
    ok = select_targets(p, LoraConfig(targets="q", rank=2, layouts={"q": "ioo"}))
    assert ok["q"].factor_shapes() == ((2, 2), (2, 3, 4))
    with pytest.raises(LoraConfigError, match=r"leaf 'q': rank 3 .* = 2"):
        select_targets(p, LoraConfig(targets="q", rank=3, layouts={"q": "ioo"}))
    # stacked axis does not count: (layers=10, in=2, out=5)
    s = {"s": jnp.ones((10, 2, 5))}
    with pytest.raises(LoraConfigError, match=r"leaf 's': rank 3 .* = 2"):
        select_targets(s, LoraConfig(targets="s", rank=3, layouts={"s": "sio"}))


def test_rank_pattern_override_checked_against_kernel():
    tree = {"a": jnp.ones((8, 8)), "b": jnp.ones((8, 2))}
    cfg = LoraConfig(targets=["a", "b"], rank=2, rank_pattern={"a": 6}, alpha_pattern={"b": 3.0})
    t = select_targets(tree, cfg)
    assert (t["a"].rank, t["a"].alpha) == (6, 16.0)
    assert (t["b"].rank, t["b"].alpha) == (2, 3.0)
    with pytest.raises(LoraConfigError, match=r"leaf 'b': rank 4"):
        select_targets(tree, LoraConfig(targets=["a", "b"], rank=2, rank_pattern={"b": 4}))


@pytest.mark.parametrize(
    "field, value", [("rank_pattern", 2), ("alpha_pattern", 2.0), ("layouts", "io")]
)
def test_override_pattern_matching_no_target(field, value):
    tree = plain_tree()
    cfg = LoraConfig(targets=r"enc/w", rank=2, **{field: {r"dec/w": value}})
    with pytest.raises(LoraConfigError, match=rf"{field} pattern 'dec/w' matches no targeted leaf"):
        select_targets(tree, cfg)


def test_override_pattern_matching_only_excluded_leaf():
    cfg = LoraConfig(targets=r".*/w", exclude="dec/w", rank=2, rank_pattern={"dec/.*": 1})
    with pytest.raises(
        LoraConfigError, match=r"rank_pattern pattern 'dec/\.\*' matches no targeted"
    ):
        select_targets(plain_tree(), cfg)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 3, 4, 5), (2, 3, 4, 5, 6)])
def test_nd_kernel_without_layout(shape):
    with pytest.raises(
        LoraLayoutError, match=rf"leaf .blk/kernel. has shape {re.escape(str(shape))}.*ambiguous"
    ):
        select_targets(
            {"blk": {"kernel": jnp.ones(shape)}}, LoraConfig(targets=r"blk/kernel", rank=1)
        )


@pytest.mark.parametrize(
    "layout", ["io", "iiio", KernelLayout("io"), KernelLayout("sioo", "dense")]
)
def test_explicit_layout_ndim_mismatch(layout):
    cfg = LoraConfig(targets=r"blk/kernel", rank=1, layouts={r"blk/.*": layout})
    with pytest.raises(
        LoraLayoutError,
        match=r"leaf 'blk/kernel': layout '\w+' describes a \d-D kernel, but the kernel has shape \(3, 4, 5\)",
    ):
        select_targets({"blk": {"kernel": jnp.ones((3, 4, 5))}}, cfg)


def test_explicit_layout_overrides_default_and_embed_kind():
    p = {"Embed_0": {"embedding": jnp.ones((10, 4))}, "Dense_0": {"kernel": jnp.ones((4, 10))}}
    t = select_targets(p, LoraConfig(targets=r".*/(embedding|kernel)", rank=2))
    assert t["Embed_0/embedding"].layout == KernelLayout("io", "embed")
    assert t["Dense_0/kernel"].layout == KernelLayout("io", "dense")
    # An explicit "oi" layout transposes the roles of a 2-D kernel.
    t = select_targets(p, LoraConfig(targets=r"Dense_0/kernel", rank=2, layouts={".*": "oi"}))
    assert t["Dense_0/kernel"].factor_shapes() == ((10, 2), (2, 4))


def test_traced_layouts_argument_and_config_priority():
    p = {"k": jnp.ones((2, 3, 4))}
    t = select_targets(p, LoraConfig(targets="k", rank=1), layouts={"k": KernelLayout("ioo")})
    assert t["k"].layout.axes == "ioo"
    t = select_targets(
        p, LoraConfig(targets="k", rank=1, layouts={"k": "iio"}), layouts={"k": KernelLayout("ioo")}
    )
    assert t["k"].layout.axes == "iio"


@pytest.mark.parametrize("axes", ["iqo", "IO", "i o", "iox"])
def test_kernel_layout_bad_letters(axes):
    with pytest.raises(
        LoraLayoutError, match=rf"string of 's', 'e', 'i', 'o' letters, got {re.escape(repr(axes))}"
    ):
        KernelLayout(axes)


def test_kernel_layout_empty():
    with pytest.raises(LoraLayoutError, match=r"needs at least one fan-in axis"):
        KernelLayout("")


@pytest.mark.parametrize("axes", ["ii", "oo", "sii", "soo", "s"])
def test_kernel_layout_needs_i_and_o(axes):
    with pytest.raises(
        LoraLayoutError,
        match=rf"KernelLayout '{axes}' needs at least one fan-in axis 'i' and one fan-out axis 'o'",
    ):
        KernelLayout(axes)


def test_kernel_layout_non_string():
    with pytest.raises(LoraLayoutError):
        KernelLayout(["i", "o"])


@pytest.mark.parametrize("kind", ["linear", "Conv", "", None])
def test_kernel_layout_bad_kind(kind):
    with pytest.raises(LoraLayoutError, match=r"kind must be one of"):
        KernelLayout("io", kind)


def test_kernel_layout_axes_roles():
    lay = KernelLayout("soio", "dense")
    assert lay.ndim == 4
    assert lay.stack_axes == (0,) and lay.in_axes == (2,) and lay.out_axes == (1, 3)
    assert lay.permutation == (0, 2, 1, 3)
    assert lay.fan_in((7, 2, 3, 5)) == 3 and lay.fan_out((7, 2, 3, 5)) == 10
    assert lay.factor_shapes((7, 2, 3, 5), 2) == ((7, 3, 2), (7, 2, 2, 5))


# --------------------------------------------------------------------------- factor shapes per kind


def _ref_update(a, b, axes, scale):
    """Independent dense update: einsum over named axes, in the kernel's order."""
    letters = iter(string.ascii_letters.replace("r", ""))
    names = [next(letters) for _ in axes]
    s = "".join(n for n, c in zip(names, axes) if c == "s")
    i = "".join(n for n, c in zip(names, axes) if c == "i")
    o = "".join(n for n, c in zip(names, axes) if c == "o")
    spec = f"{s}{i}r,{s}r{o}->{''.join(names)}"
    return scale * np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))


SHAPE_CASES = [
    # name, kernel shape, layout, rank, expected A shape, expected B shape
    ("dense", (5, 7), KernelLayout("io"), 3, (5, 3), (3, 7)),
    ("q_proj", (6, 2, 3), KernelLayout("ioo"), 2, (6, 2), (2, 2, 3)),
    ("out_proj", (2, 3, 6), KernelLayout("iio"), 2, (2, 3, 2), (2, 6)),
    ("oio", (2, 5, 3), KernelLayout("oio"), 2, (5, 2), (2, 2, 3)),
    (
        "oii",
        (3, 2, 4),
        KernelLayout("oii"),
        2,
        (2, 4, 2),
        (2, 3),
    ),  # permutation is not its own inverse
    ("conv_pointwise", (4, 6), KernelLayout("io", "conv"), 2, (4, 2), (2, 6)),
    ("conv1d", (3, 4, 6), KernelLayout("iio", "conv"), 2, (3, 4, 2), (2, 6)),
    ("conv2d", (3, 3, 2, 5), KernelLayout("iiio", "conv"), 2, (3, 3, 2, 2), (2, 5)),
    ("conv3d", (2, 2, 2, 3, 4), KernelLayout("iiiio", "conv"), 3, (2, 2, 2, 3, 3), (3, 4)),
    ("embedding", (11, 5), None, 2, (11, 2), (2, 5)),
    ("stacked", (3, 4, 5), KernelLayout("sio"), 2, (3, 4, 2), (3, 2, 5)),
    ("stacked2", (2, 3, 4, 5), KernelLayout("ssio"), 2, (2, 3, 4, 2), (2, 3, 2, 5)),
    ("stack_mid", (4, 3, 5), KernelLayout("iso"), 2, (3, 4, 2), (3, 2, 5)),
]


@pytest.mark.parametrize(
    "name, shape, layout, rank, a_shape, b_shape", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES]
)
def test_factor_shapes_update_and_merge(name, shape, layout, rank, a_shape, b_shape):
    leaf = "embedding" if name == "embedding" else name
    path = f"m/{leaf}"
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = {"m": {leaf: w, "bias": jnp.zeros(shape[-1])}}
    layouts = {} if layout is None else {path: layout}
    cfg = LoraConfig(targets=path, rank=rank, alpha=3.0, layouts=layouts)
    target = select_targets(params, cfg)[path]
    want_kind = "embed" if name == "embedding" else layout.kind
    assert target.layout.kind == want_kind
    assert target.factor_shapes() == (a_shape, b_shape)
    assert (target.rank, target.alpha, target.shape) == (rank, 3.0, shape)
    # Non-zero factors of those shapes: lora_update and merge against an independent einsum.
    f = LoraFactors(
        jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
        jnp.asarray(rng.standard_normal(b_shape), jnp.float32),
        alpha=3.0,
        rslora=False,
        layout=target.layout,
    )
    assert f.rank == rank and f.scale == 3.0 / rank
    ref = _ref_update(f.a, f.b, f.layout.axes, 3.0 / rank)
    upd = lj.advanced.dense_delta(f)
    assert upd.shape == shape and upd.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(upd), ref, rtol=1e-5, atol=1e-5)
    merged = lj.merge(params, {"m": {leaf: f, "bias": None}})
    np.testing.assert_allclose(
        np.asarray(merged["m"][leaf]), np.float64(w) + ref, rtol=1e-5, atol=1e-5
    )
    assert merged["m"]["bias"] is params["m"]["bias"]


def test_explicit_per_kind_formulas():
    """The same checks with each einsum written out by hand."""
    rng = np.random.default_rng(0)
    s = 0.5

    def check(axes, a, b, want):
        f = LoraFactors(
            jnp.asarray(a),
            jnp.asarray(b),
            alpha=s * a.shape[-1],
            rslora=False,
            layout=KernelLayout(axes),
        )
        np.testing.assert_allclose(
            np.asarray(lj.advanced.dense_delta(f)), want, rtol=1e-5, atol=1e-6
        )

    a, b = rng.normal(size=(5, 2)), rng.normal(size=(2, 7))
    check("io", a, b, s * a @ b)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(2, 3, 4))  # (d, r), (r, h, k)
    check("ioo", a, b, s * np.einsum("dr,rhk->dhk", a, b))
    a, b = rng.normal(size=(3, 4, 2)), rng.normal(size=(2, 6))  # (h, k, r), (r, d)
    check("iio", a, b, s * np.einsum("hkr,rd->hkd", a, b))
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(2, 3, 4))  # W[o1, i, o2]
    check("oio", a, b, s * np.einsum("ir,rab->aib", a, b))
    a, b = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(2, 4))  # conv2d (kh, kw, in, out)
    check("iiio", a, b, s * (a.reshape(18, 2) @ b).reshape(3, 3, 2, 4))
    a, b = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5))  # stacked (L, in, out)
    check("sio", a, b, s * np.stack([a[l] @ b[l] for l in range(3)]))
    a, b = rng.normal(size=(4, 5, 2)), rng.normal(size=(4, 2, 3))  # "ois": W[o, i, s]
    check("ois", a, b, s * np.stack([(a[l] @ b[l]).T for l in range(4)], axis=-1))
    a, b = rng.normal(size=(2, 4, 2)), rng.normal(size=(2, 3))  # "oii": W[o, i1, i2]
    check("oii", a, b, s * np.einsum("jkr,ro->ojk", a, b))


def test_skip_unsupported_with_nothing_left_is_an_error():
    params = {"dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(LoraTargetError, match=r"only leaves LoRA cannot serve.*'dense/bias'"):
        select_targets(params, LoraConfig(targets=".*bias", skip_unsupported=True))
