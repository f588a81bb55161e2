"""merge / unmerge: properties over random shapes, exactness, jit, structure errors."""

import math
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import KernelLayout, LoraConfig, LoraFactors, LoraStructureError

KEY = jax.random.key(0, impl="rbg")
# Small example counts and a pool of small kernel shapes (every axis 2 or 3),
# so that eager ops mostly hit JAX's compile cache and the file runs in seconds.
FAST = settings(max_examples=25, deadline=None)
JIT = settings(max_examples=12, deadline=None)  # one XLA compile per example
KERNELS = [  # (layout, kernel shape)
    ("io", (3, 2)),
    ("io", (2, 3)),
    ("io", (3, 3)),
    ("oi", (3, 2)),
    ("ioo", (3, 2, 2)),
    ("ioo", (2, 3, 2)),
    ("iio", (2, 3, 2)),
    ("iio", (2, 2, 3)),
    ("oio", (2, 3, 3)),
    ("oii", (3, 2, 2)),
    ("sio", (2, 3, 2)),
    ("sio", (3, 2, 3)),
    ("iso", (2, 3, 3)),
    ("ois", (3, 2, 2)),
    ("iiio", (2, 2, 2, 3)),
    ("ssio", (2, 2, 3, 3)),
    ("siio", (2, 2, 3, 2)),
    ("sioo", (2, 3, 2, 2)),
]


# --------------------------------------------------------------------------- independent reference


def letters_for(axes):
    pool = iter(string.ascii_lowercase.replace("r", "").replace("z", ""))
    return [next(pool) for _ in axes]


def ref_update(a, b, axes, scale):
    """``s * A @ B`` in the kernel's own axis order, by an einsum over named axes (float64)."""
    names = letters_for(axes)
    s = "".join(n for n, c in zip(names, axes) if c == "s")
    i = "".join(n for n, c in zip(names, axes) if c == "i")
    o = "".join(n for n, c in zip(names, axes) if c == "o")
    return scale * np.einsum(f"{s}{i}r,{s}r{o}->{''.join(names)}", np.float64(a), np.float64(b))


def ref_forward(x, w, axes):
    """``y[z, *stack, *out] = sum_in x[z, *stack, *in] * W[...]`` (float64)."""
    names = letters_for(axes)
    s = "".join(n for n, c in zip(names, axes) if c == "s")
    i = "".join(n for n, c in zip(names, axes) if c == "i")
    o = "".join(n for n, c in zip(names, axes) if c == "o")
    return np.einsum(f"z{s}{i},{''.join(names)}->z{s}{o}", np.float64(x), np.float64(w))


def ref_lora_forward(x, a, b, axes, scale):
    """``s * (x @ A) @ B`` without ever forming the dense update (float64)."""
    names = letters_for(axes)
    s = "".join(n for n, c in zip(names, axes) if c == "s")
    i = "".join(n for n, c in zip(names, axes) if c == "i")
    o = "".join(n for n, c in zip(names, axes) if c == "o")
    xa = np.einsum(f"z{s}{i},{s}{i}r->z{s}r", np.float64(x), np.float64(a))
    return scale * np.einsum(f"z{s}r,{s}r{o}->z{s}{o}", xa, np.float64(b))


def assert_within(got, want, bound):
    """``|got - want| <= bound`` elementwise (bound: a float32 rounding budget per entry)."""
    got, want = np.float64(got), np.float64(want)
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}, max err {err.max()}"


EPS = 1e-6  # ~16 float32 ulps of headroom per unit of magnitude


@st.composite
def cases(draw, dyadic=False):
    """A kernel shape, its layout, and a factor pair drawn from small shapes."""
    axes, shape = draw(st.sampled_from(KERNELS))
    layout = KernelLayout(axes, draw(st.sampled_from(["dense", "conv", "embed"])))
    max_rank = min(layout.fan_in(shape), layout.fan_out(shape))
    rank = draw(st.integers(1, min(max_rank, 3)))
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if dyadic:
        # multiples of 1/8 and a power-of-two scale: s*A@B is exact in float32 (but mostly
        # not representable in bfloat16, so the order of rounding matters)
        a = rng.integers(-64, 65, a_shape) / 8
        b = rng.integers(-64, 65, b_shape) / 8
        rslora = False
        alpha = rank * 2.0 ** draw(st.integers(-2, 2))
    else:
        a = rng.standard_normal(a_shape)
        b = rng.standard_normal(b_shape)
        rslora = draw(st.booleans())
        alpha = draw(st.floats(0.25, 8.0, allow_nan=False))
    w = rng.standard_normal(shape)
    f = LoraFactors(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(b, jnp.float32),
        alpha=alpha,
        rslora=rslora,
        layout=layout,
    )
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    return w, f, scale


# --------------------------------------------------------------------------- properties


@FAST
@given(cases())
def test_merge_is_w_plus_update_and_unmerge_inverts(case):
    w, f, scale = case
    assert f.scale == pytest.approx(scale, rel=1e-12)
    upd = lj.advanced.dense_delta(f)
    assert upd.shape == w.shape and upd.dtype == jnp.float32
    want = ref_update(f.a, f.b, f.layout.axes, scale)
    upd_mag = ref_update(np.abs(f.a), np.abs(f.b), f.layout.axes, scale)  # sum of |terms| per entry
    assert_within(upd, want, EPS * upd_mag)
    w32 = np.float32(w)
    params = {"layer": {"kernel": jnp.asarray(w32), "bias": jnp.ones(2)}}
    delta = {"layer": {"kernel": f, "bias": None}}
    merged = lj.merge(params, delta)
    back = lj.unmerge(merged, delta)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    mag = np.abs(w32) + upd_mag
    # merge is W + s A B; unmerge takes it back out
    assert_within(merged["layer"]["kernel"], np.float64(w32) + want, EPS * mag)
    assert_within(back["layer"]["kernel"], w32, EPS * mag)
    assert back["layer"]["bias"] is params["layer"]["bias"]


@FAST
@given(cases(), st.integers(1, 3))
def test_merged_forward_equals_base_plus_low_rank_path(case, batch):
    w, f, scale = case
    axes = f.layout.axes
    stack = tuple(w.shape[n] for n, c in enumerate(axes) if c == "s")
    fan_in = tuple(w.shape[n] for n, c in enumerate(axes) if c == "i")
    x = np.random.default_rng(batch).standard_normal((batch,) + stack + fan_in)
    w32 = np.float32(w)
    merged = lj.merge({"w": jnp.asarray(w32)}, {"w": f})["w"]
    got = ref_forward(x, np.asarray(merged), axes)
    want = ref_forward(x, w32, axes) + ref_lora_forward(x, f.a, f.b, axes, scale)
    mag = ref_forward(
        np.abs(x), np.abs(w32) + ref_update(np.abs(f.a), np.abs(f.b), axes, scale), axes
    )
    assert_within(got, want, EPS * mag)
    assert np.abs(got - ref_forward(x, w32, axes)).max() > 0  # the low-rank path is really there


@FAST
@given(cases(dyadic=True))
def test_bf16_base_exact(case):
    w, f, scale = case
    w16 = jnp.asarray(w, jnp.bfloat16)
    merged = lj.merge({"w": w16}, {"w": f})["w"]
    assert merged.dtype == jnp.bfloat16 and merged.shape == w.shape
    # s * A @ B is exact in float32 here (dyadic values), so this is the exact expected result.
    upd = np.float32(ref_update(f.a, f.b, f.layout.axes, scale))
    want = (np.asarray(w16).astype(np.float32) + upd).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged).view(np.uint16), want.view(np.uint16))
    back = lj.unmerge({"w": merged}, {"w": f})["w"]
    want_back = (want.astype(np.float32) - upd).astype(jnp.bfloat16)
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back).view(np.uint16), want_back.view(np.uint16))


@JIT
@given(cases(dyadic=True))
def test_f32_exact_and_jit_equals_eager(case):
    w, f, scale = case
    params = {"w": jnp.asarray(w, jnp.float32), "other": jnp.asarray(w, jnp.float32)}
    delta = {"w": f, "other": None}
    eager = lj.merge(params, delta)
    jitted = jax.jit(lj.merge)(params, delta)
    want = np.float32(w) + np.float32(ref_update(f.a, f.b, f.layout.axes, scale))
    np.testing.assert_array_equal(np.asarray(eager["w"]), want)
    np.testing.assert_array_equal(np.asarray(jitted["w"]), np.asarray(eager["w"]))
    np.testing.assert_array_equal(np.asarray(jitted["other"]), np.float32(w))


# --------------------------------------------------------------------------- fixed cases


def test_merge_io_by_hand():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    a = np.array([[1, 0], [0, 1], [1, 1], [2, 0]], np.float32)
    b = np.array([[1, 2, 3], [0, -1, 1]], np.float32)
    f = LoraFactors(
        jnp.asarray(a), jnp.asarray(b), alpha=4.0, rslora=False, layout=KernelLayout("io")
    )  # scale 2
    merged = lj.merge({"w": jnp.asarray(w)}, {"w": f})["w"]
    np.testing.assert_array_equal(np.asarray(merged), w + 2 * a @ b)
    back = jax.jit(lj.unmerge)({"w": merged}, {"w": f})["w"]
    np.testing.assert_array_equal(np.asarray(back), w)  # every value is a small integer: exact
    f_rs = LoraFactors(
        jnp.asarray(a), jnp.asarray(b), alpha=4.0, rslora=True, layout=KernelLayout("io")
    )  # scale 4/sqrt(2)
    merged = lj.merge({"w": jnp.asarray(w)}, {"w": f_rs})["w"]
    np.testing.assert_allclose(np.asarray(merged), w + (4 / math.sqrt(2)) * a @ b, rtol=1e-6)


def test_leaves_without_factors_pass_through_unchanged():
    params = {
        "a": jnp.ones((4, 5)),
        "b": jnp.arange(5.0),
        "c": jnp.zeros((2, 2), jnp.int32),
        "d": [jnp.ones(3, jnp.bfloat16), 7],
    }
    _, delta = lj.init_lora(KEY, params, LoraConfig(targets="a", rank=2, init="swapped"))
    merged = lj.merge(params, delta)
    for key in ("b", "c"):
        assert merged[key] is params[key]
    assert merged["d"][0] is params["d"][0] and merged["d"][1] == 7
    assert isinstance(merged["d"], list)
    back = lj.unmerge(merged, delta)
    assert back["b"] is params["b"]
    jm = jax.jit(lj.merge)(params, delta)
    np.testing.assert_array_equal(np.asarray(jm["b"]), np.asarray(params["b"]))
    assert jm["c"].dtype == jnp.int32 and jm["d"][0].dtype == jnp.bfloat16


def test_all_none_delta_is_identity():
    params = {"a": jnp.ones((4, 5)), "b": jnp.arange(5.0)}
    merged = lj.merge(params, {"a": None, "b": None})
    assert merged["a"] is params["a"] and merged["b"] is params["b"]


def test_bf16_factors_on_f32_base():
    a = np.array([[0.5, -1.0], [0.25, 2.0], [1.0, 1.0]], np.float32)
    b = np.array([[1.0, -0.5], [0.75, 0.25]], np.float32)
    f = LoraFactors(
        jnp.asarray(a, jnp.bfloat16),
        jnp.asarray(b, jnp.bfloat16),
        alpha=2.0,
        rslora=False,
        layout=KernelLayout("io"),
    )
    upd = lj.advanced.dense_delta(f)
    assert upd.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(upd), a @ b)
    merged = lj.merge({"w": jnp.ones((3, 2))}, {"w": f})["w"]
    assert merged.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(merged), 1 + a @ b)


def test_align_rows():
    params = {"x": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)}}
    _, delta = lj.init_lora(KEY, params, LoraConfig(targets="x/kernel", rank=2))
    rows, treedef = lj.advanced.align(params, delta)
    assert [(p, f is None) for p, _, f in rows] == [("x/bias", True), ("x/kernel", False)]
    assert rows[1][1] is params["x"]["kernel"] and rows[1][2] is delta["x"]["kernel"]
    assert treedef == jax.tree.structure(params)


# --------------------------------------------------------------------------- structure errors


@pytest.fixture(scope="module")
def base_delta():
    params = {
        "enc": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)},
        "dec": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)},
    }
    return lj.init_lora(KEY, params, LoraConfig(targets=r".*/kernel", rank=2))


@pytest.mark.parametrize(
    "fn", [lj.merge, lj.unmerge, lj.advanced.align, lj.summarize], ids=lambda f: f.__name__
)
def test_missing_entry_names_leaf(base_delta, fn):
    base, delta = base_delta
    bad = {"enc": delta["enc"]}  # no "dec" subtree at all
    with pytest.raises(
        LoraStructureError, match=r"does not match the base.*'dec/bias', 'dec/kernel'"
    ):
        fn(base, bad)
    bad = {"enc": delta["enc"], "dec": {"kernel": delta["dec"]["kernel"]}}  # no dec/bias entry
    with pytest.raises(LoraStructureError, match=r"no entry .* for the base leaves \['dec/bias'\]"):
        fn(base, bad)


def test_factors_for_leaf_not_in_base(base_delta):
    base, delta = base_delta
    bad = {**delta, "head": {"kernel": delta["enc"]["kernel"]}}
    with pytest.raises(
        LoraStructureError, match=r"factors at \['head/kernel'\], which are not leaves of the base"
    ):
        lj.merge(base, bad)
    # factors where the base has a subtree, not a leaf
    bad = {"enc": delta["enc"]["kernel"], "dec": delta["dec"]}
    with pytest.raises(LoraStructureError, match=r"factors at \['enc'\]"):
        lj.merge(base, bad)


def test_wrong_factor_shapes(base_delta):
    base, delta = base_delta
    f = delta["dec"]["kernel"]
    for a, b in [
        (f.a[:4], f.b),
        (f.a, f.b[:, :2]),
        (jnp.zeros((5, 3)), jnp.zeros((2, 3))),
        (f.a.T, f.b.T),
        (f.a[None], f.b),
    ]:
        bad = {
            **delta,
            "dec": {
                "kernel": LoraFactors(a, b, alpha=f.alpha, rslora=f.rslora, layout=f.layout),
                "bias": None,
            },
        }
        with pytest.raises(
            LoraStructureError,
            match=r"leaf 'dec/kernel': factors A\(.*\) B\(.*\) do not fit the base kernel of shape \(5, 3\).*expected A\(5, (\d)\) B\(\1, 3\)",
        ):
            lj.merge(base, bad)


def test_layout_ndim_mismatch(base_delta):
    base, delta = base_delta
    f = delta["enc"]["kernel"]
    bad = {
        **delta,
        "enc": {
            "kernel": LoraFactors(
                f.a, f.b, alpha=f.alpha, rslora=f.rslora, layout=KernelLayout("iio")
            ),
            "bias": None,
        },
    }
    with pytest.raises(
        LoraStructureError,
        match=r"leaf 'enc/kernel': the base kernel has shape \(4, 5\) but the delta's layout 'iio' is for a 3-D kernel",
    ):
        lj.unmerge(base, bad)


@pytest.mark.parametrize(
    "obj",
    [jnp.zeros((4, 2)), (jnp.zeros((4, 2)), jnp.zeros((2, 5))), {"a": 1}, 3.0],
    ids=["array", "tuple", "dict", "float"],
)
def test_non_factors_object(base_delta, obj):
    base, delta = base_delta
    bad = {**delta, "enc": {"kernel": obj, "bias": None}}
    with pytest.raises(
        LoraStructureError,
        match=rf"leaf 'enc/kernel': the delta holds {type(obj).__name__}, expected LoraFactors",
    ):
        lj.merge(base, bad)


def test_factors_on_bias_leaf(base_delta):
    base, delta = base_delta
    f = delta["enc"]["kernel"]
    bad = {**delta, "enc": {"kernel": f, "bias": f}}
    with pytest.raises(LoraStructureError, match=r"leaf 'enc/bias'"):
        lj.merge(base, bad)


def test_structure_errors_under_jit(base_delta):
    base, delta = base_delta
    f = delta["dec"]["kernel"]
    bad = {
        **delta,
        "dec": {
            "kernel": LoraFactors(f.a[:4], f.b, alpha=f.alpha, rslora=f.rslora, layout=f.layout),
            "bias": None,
        },
    }
    with pytest.raises(LoraStructureError, match=r"leaf 'dec/kernel'"):
        jax.jit(lj.merge)(base, bad)


def test_structure_error_is_value_error(base_delta):
    base, _ = base_delta
    with pytest.raises(ValueError):
        lj.merge(base, {"enc": None})
