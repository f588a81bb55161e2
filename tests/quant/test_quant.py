"""Quantized bases: the NF4 code book, round-trip bounds, double quantization, bits per
parameter, N-D and stacked kernels, errors. References are computed here in NumPy from
the published tables, never from lora_jax's own code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._quant.codebooks import DYNAMIC_TABLE, NF4_TABLE
from lora_jax.advanced import leaves_with_paths
from tests._eight_devices import run_on_eight_devices

# bitsandbytes/functional.py, get_4bit_type("nf4") (QLoRA, arXiv:2305.14314, appendix E):
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def rng(seed=0):
    return np.random.default_rng(seed)


def ref_blockwise(x, table, block):
    """Blockwise absmax quantization by brute-force nearest code (float64 NumPy)."""
    flat = np.float64(x).reshape(-1, block)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    t = np.float64(table)
    idx = np.abs(flat[..., None] / absmax[..., None] - t).argmin(axis=-1)
    return (t[idx] * absmax).reshape(x.shape)


# --------------------------------------------------------------------------- the code book


def test_nf4_code_values_equal_the_published_table():
    np.testing.assert_array_equal(NF4_TABLE, np.float32(PUBLISHED_NF4))
    # Through the public path: a block holding every code value (absmax 1) comes back exactly.
    w = np.tile(np.float32(PUBLISHED_NF4), 4).reshape(64, 1)
    q = lj.quantize({"w": jnp.asarray(np.tile(w, (1, 2)))}, "w", scheme="nf4")["w"]
    np.testing.assert_array_equal(np.asarray(lj.dequantize(q))[:, 0], w[:, 0])


def test_nf4_table_is_the_normal_quantile_construction():
    """QLoRA's construction: quantiles of N(0,1) at linspace(0.9677083, 0.5), normalised."""
    from scipy.stats import norm

    off = 0.9677083
    pos = norm.ppf(np.linspace(off, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(off, 0.5, 8)[:-1])
    vals = np.sort(np.concatenate([pos, neg, [0.0]]))
    vals /= vals.max()
    np.testing.assert_allclose(np.float32(PUBLISHED_NF4), vals, atol=2e-7)


def test_codes_are_packed_two_per_byte_high_nibble_first():
    w = np.zeros((64, 2), np.float32)
    w.reshape(-1)[0], w.reshape(-1)[1] = -1.0, 1.0  # codes 0 and 15 in the first byte
    q = lj.quantize({"w": jnp.asarray(w)}, "w", scheme="nf4")["w"]
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (64,)
    assert int(q.codes[0]) == (0 << 4) | 15
    assert int(q.codes[1]) == (7 << 4) | 7  # zeros: code 7 (0.0)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nf4_round_trip_is_the_nearest_code_of_each_block(dtype):
    x = jnp.asarray(rng(1).standard_normal((256, 64)), dtype)
    q = lj.quantize({"w": x}, "w", scheme="nf4")["w"]
    assert q.dtype == dtype
    got = np.float64(np.asarray(lj.dequantize(q, jnp.float32)))
    want = ref_blockwise(np.asarray(x, np.float32), PUBLISHED_NF4, 64)
    # The nearest code is unique except on exact midpoints: compare distances, which are.
    xf = np.float64(np.asarray(x, np.float32))
    np.testing.assert_allclose(np.abs(got - xf), np.abs(want - xf), atol=1e-6)
    # and the code book's bound: half the widest gap times the block's absmax
    absmax = np.abs(xf.reshape(-1, 64)).max(axis=1, keepdims=True)
    half_gap = np.diff(PUBLISHED_NF4).max() / 2
    assert (np.abs(got - xf).reshape(-1, 64) <= absmax * half_gap + 1e-6).all()
    assert lj.dequantize(q).dtype == dtype


@pytest.mark.parametrize("scheme,levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [None, 32])
def test_int_round_trip_within_half_a_step(scheme, levels, block):
    x = rng(2).standard_normal((64, 48)).astype(np.float32)
    q = lj.quantize({"w": jnp.asarray(x)}, "w", scheme=scheme, block_size=block)["w"]
    got = np.float64(np.asarray(lj.dequantize(q)))
    if block is None:  # per output channel: absmax over the fan-in axis
        scale = np.abs(x).max(axis=0, keepdims=True) / levels
        want = np.clip(np.round(x / scale), -levels, levels) * scale
    else:
        flat = x.reshape(-1, block)
        scale = np.abs(flat).max(axis=1, keepdims=True) / levels
        want = (np.clip(np.round(flat / scale), -levels, levels) * scale).reshape(x.shape)
        scale = np.repeat(scale, block, axis=1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (np.abs(got - x) <= scale / 2 * (1 + 1e-5)).all()


def test_nf4_error_on_standard_normal_matches_the_published_code_book():
    x = rng(3).standard_normal((1024, 1024)).astype(np.float32)
    ref = ref_blockwise(x, PUBLISHED_NF4, 64)
    ref_mse = np.mean((ref - x) ** 2)
    for dq in (False, True):
        q = lj.quantize({"w": jnp.asarray(x)}, "w", scheme="nf4", double_quant=dq)["w"]
        mse = float(np.mean((np.float64(np.asarray(lj.dequantize(q))) - x) ** 2))
        assert abs(mse / ref_mse - 1) <= 0.05, (dq, mse, ref_mse)
    # NF4 beats uniform int4 with the same blocks on normal data
    q4 = lj.quantize({"w": jnp.asarray(x)}, "w", scheme="int4", block_size=64)["w"]
    assert np.mean((np.asarray(lj.dequantize(q4)) - x) ** 2) > 1.1 * ref_mse


# --------------------------------------------------------------------------- double quantization


def test_double_quant_absmax_error_is_bounded():
    x = rng(4).standard_normal((512, 256)).astype(np.float32)
    plain = lj.quantize({"w": jnp.asarray(x)}, "w", scheme="nf4")["w"]
    dq = lj.quantize({"w": jnp.asarray(x)}, "w", scheme="nf4", double_quant=True)["w"]
    absmax = np.abs(x.reshape(-1, 64)).max(axis=1)
    # each row of 256 holds 4 whole blocks: stored (512, 4), the flat blocks' scales in order
    assert plain.scales.shape == dq.scales.shape == (512, 4)
    np.testing.assert_allclose(np.ravel(plain.scales), absmax, rtol=0)
    assert dq.scales.dtype == jnp.uint8 and dq.dq_scales.shape == (-(-absmax.size // 256),)
    from lora_jax._quant.codebooks import double_dequantize

    got = np.asarray(double_dequantize(dq.scales.reshape(-1), dq.dq_scales, dq.dq_offset))
    dev = absmax - absmax.mean()
    block_max = np.abs(np.pad(dev, (0, (-dev.size) % 256)).reshape(-1, 256)).max(axis=1)
    bound = np.repeat(block_max, 256)[: dev.size] * np.diff(DYNAMIC_TABLE).max() / 2
    err = np.abs(got - absmax)
    assert (err <= bound + 1e-6).all()
    assert err.max() / absmax.mean() < 0.01  # under 1% of a typical scale
    # weights: the codes are the same; only the scale moved
    np.testing.assert_array_equal(np.asarray(dq.codes), np.asarray(plain.codes))


def test_dynamic_table_is_bitsandbytes_signed_dynamic_map():
    """create_dynamic_map(signed=True): 127 positive, 127 negative, 0 and 1; the positive
    values of exponent i are 10^(i-6) times the midpoints of linspace(0.1, 1, 2^i + 1)."""
    t = np.float64(DYNAMIC_TABLE)
    assert t.shape == (256,) and len(set(t.tolist())) == 256 and t[-1] == 1.0
    pos = []
    for i in range(7):
        edges = np.linspace(0.1, 1, 2**i + 1)
        pos += list(10.0 ** (i - 6) * (edges[1:] + edges[:-1]) / 2)
    want = np.sort(np.concatenate([pos, -np.array(pos), [0.0, 1.0]]))
    np.testing.assert_allclose(t, want, rtol=1e-6)


# --------------------------------------------------------------------------- bits per parameter


def test_bits_per_param():
    w = jnp.asarray(rng(5).standard_normal((1024, 1024)), jnp.float32)
    nf4dq = lj.quantize({"w": w}, "w", scheme="nf4", double_quant=True)["w"]
    n, nb = 1024 * 1024, 1024 * 1024 // 64
    assert nf4dq.bits_per_param == pytest.approx(
        4 + 8 * nb / n + 32 * math.ceil(nb / 256) / n + 32 / n
    )
    assert nf4dq.bits_per_param <= 4.2
    assert abs(nf4dq.bits_per_param - 4.127) < 0.001
    assert lj.quantize({"w": w}, "w", scheme="nf4")["w"].bits_per_param == 4.5
    int8 = lj.quantize({"w": w}, "w", scheme="int8")["w"]
    assert int8.bits_per_param == pytest.approx(8 + 32 / 1024) and int8.bits_per_param <= 8.3
    int4 = lj.quantize({"w": w}, "w", scheme="int4")["w"]
    assert int4.bits_per_param == pytest.approx(4 + 32 / 1024)
    from lora_jax.advanced import kernel_bits

    tree = {"a": nf4dq, "b": int8, "c": jnp.zeros(3)}
    assert kernel_bits(tree) == pytest.approx((nf4dq.nbytes + int8.nbytes) * 8 / (2 * n))


# --------------------------------------------------------------------------- N-D and stacked


def test_stacked_kernel_quantizes_each_layer_alone():
    # layers with scales 1, 100, 0.01: a block straddling layers would mix them
    x = (
        rng(6).standard_normal((3, 32, 6)).astype(np.float32)
        * np.array([1, 100, 0.01], np.float32)[:, None, None]
    )
    for axes, w, take in [
        ("sio", x, lambda a, i: a[i]),
        ("iso", np.transpose(x, (1, 0, 2)), lambda a, i: a[:, i]),
    ]:
        q = lj.quantize(
            {"w": jnp.asarray(w)}, "w", scheme="nf4", layouts={"w": axes}, double_quant=True
        )["w"]
        assert q.shape == w.shape and q.codes.shape == (3, 96) and q.scales.shape == (3, 3)
        dense = np.asarray(lj.dequantize(q))
        for i in range(3):
            alone = lj.quantize(
                {"w": jnp.asarray(take(w, i))}, "w", scheme="nf4", double_quant=True
            )["w"]
            np.testing.assert_array_equal(np.asarray(q.codes[i]), np.asarray(alone.codes))
            # The same codes and scales; the two dequantizing programs may round the
            # scale product differently by an ulp (XLA 0.6 does), never by more.
            np.testing.assert_allclose(
                take(dense, i), np.asarray(lj.dequantize(alone)), rtol=2.5e-7, atol=0
            )


def test_dense_general_per_channel_scales_follow_the_layout():
    x = rng(7).standard_normal((16, 4, 8)).astype(np.float32)  # (d, heads, head_dim)
    q = lj.quantize({"w": jnp.asarray(x)}, "w", scheme="int8", layouts={"w": "ioo"})["w"]
    assert q.scales.shape == (4, 8)
    np.testing.assert_allclose(np.asarray(q.scales), np.abs(x).max(axis=0))
    out = rng(8).standard_normal((4, 8, 16)).astype(np.float32)  # (heads, head_dim, d)
    q2 = lj.quantize({"w": jnp.asarray(out)}, "w", scheme="int8", layouts={"w": "iio"})["w"]
    assert q2.scales.shape == (16,)
    np.testing.assert_allclose(np.asarray(q2.scales), np.abs(out).max(axis=(0, 1)))
    step = np.abs(out).max(axis=(0, 1)) / 127
    assert (np.abs(np.asarray(lj.dequantize(q2)) - out) <= step / 2 * (1 + 1e-5)).all()


def test_quantized_leaf_is_one_leaf_to_lora_jax_and_arrays_to_jax():
    params = {"fc": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}
    q = lj.quantize(params, ".*/kernel")
    assert [p for p, _ in leaves_with_paths(q)[0]] == ["fc/bias", "fc/kernel"]
    assert len(jax.tree.leaves(q)) == 3  # bias, codes, scales
    dense = jax.jit(lj.dequantize)(q)
    np.testing.assert_array_equal(np.asarray(dense["fc"]["kernel"]), np.ones((64, 8)))
    # init_lora reads shape and dtype off the quantized leaf
    base, delta = lj.init_lora(jax.random.key(0), q, lj.LoraConfig(targets=".*/kernel", rank=2))
    assert delta["fc"]["kernel"].a.shape == (64, 2) and base["fc"]["kernel"] is q["fc"]["kernel"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "params,kwargs,error,text",
    [
        (
            {"blk/w": jnp.ones((10, 10))},
            {"block_size": 64},
            lj.LoraArgumentError,
            "'blk/w': block_size 64 does not divide the 100 weights",
        ),
        ({"ids": jnp.ones((8, 8), jnp.int32)}, {}, lj.LoraTargetError, "'ids' matches"),
        ({"b": jnp.ones(64)}, {}, lj.LoraTargetError, "'b' matches the quantize targets but has"),
        ({"tok/embedding": jnp.ones((64, 8))}, {}, lj.LoraTargetError, "embedding table"),
        ({"w3": jnp.ones((2, 64, 8))}, {}, lj.LoraLayoutError, "'w3'"),
        ({"w": jnp.ones((64, 8))}, {"scheme": "fp4"}, lj.LoraArgumentError, "scheme"),
        ({"w": jnp.ones((64, 8))}, {"block_size": None}, lj.LoraArgumentError, "nf4 is blockwise"),
        ({"w": jnp.ones((64, 8))}, {"block_size": 63}, lj.LoraArgumentError, "even"),
        (
            {"w": jnp.ones((64, 8))},
            {"scheme": "int8", "double_quant": True},
            lj.LoraArgumentError,
            "double_quant",
        ),
    ],
)
def test_errors_name_the_leaf(params, kwargs, error, text):
    with pytest.raises(error, match=None) as info:
        lj.quantize(params, ".*", **kwargs)
    assert text in str(info.value)


def test_pattern_matching_nothing_and_already_quantized():
    with pytest.raises(lj.LoraTargetError, match="'nope' matches no"):
        lj.quantize({"w": jnp.ones((64, 8))}, "nope")
    q = lj.quantize({"w": jnp.ones((64, 8))}, "w")
    with pytest.raises(lj.LoraTargetError, match="'w' is already quantized"):
        lj.quantize(q, "w")


# --------------------------------------------------------------------------- merge, requantize, LoftQ


def random_delta(params, config, seed=0):
    """A 'trained' delta: both factors random (B = 0 at init would hide every bug)."""
    _, delta = lj.init_lora(jax.random.key(seed), params, config)
    r = rng(seed + 100)
    return jax.tree.map(lambda x: jnp.asarray(r.standard_normal(x.shape) * 0.1, x.dtype), delta)


def test_merge_against_a_quantized_base_is_dequantized_plus_delta():
    r = rng(9)
    params = {
        "fc": {"kernel": jnp.asarray(r.standard_normal((128, 32)), jnp.bfloat16)},
        "stack": {"kernel": jnp.asarray(r.standard_normal((2, 64, 16)), jnp.float32)},
        "other": jnp.asarray(r.standard_normal((64, 4)), jnp.float32),
        "bias": jnp.ones(4),
    }
    config = lj.LoraConfig(targets=r".*/kernel", rank=3, alpha=6, layouts={"stack/kernel": "sio"})
    delta = random_delta(params, config)
    qbase = lj.quantize(
        params, r".*/kernel|other", double_quant=True, layouts={"stack/kernel": "sio"}
    )
    for dtype in (None, jnp.float32):
        merged = jax.jit(lambda b, d, t=dtype: lj.merge(b, d, dtype=t))(qbase, delta)
        assert not any(
            isinstance(x, lj.QuantizedArray)
            for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, lj.QuantizedArray))
        )
        f, s = delta["fc"]["kernel"], 2.0
        want = np.float64(
            np.asarray(lj.dequantize(qbase["fc"]["kernel"], jnp.float32))
        ) + s * np.float64(f.a) @ np.float64(f.b)
        got = merged["fc"]["kernel"]
        assert got.dtype == (dtype or jnp.bfloat16)
        np.testing.assert_allclose(
            np.float64(np.asarray(got, np.float32)),
            want,
            rtol=1e-2 if dtype is None else 1e-5,
            atol=1e-2 if dtype is None else 1e-5,
        )
        g = delta["stack"]["kernel"]
        want = np.asarray(lj.dequantize(qbase["stack"]["kernel"]), np.float64) + s * np.einsum(
            "lir,lro->lio", np.float64(g.a), np.float64(g.b)
        )
        np.testing.assert_allclose(
            np.asarray(merged["stack"]["kernel"]), want, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            np.asarray(merged["other"]), np.asarray(lj.dequantize(qbase["other"]))
        )
        assert merged["bias"] is qbase["bias"] or (merged["bias"] == 1).all()


def test_dora_merge_against_a_quantized_base():
    w = jnp.asarray(rng(10).standard_normal((64, 16)), jnp.float32)
    config = lj.LoraConfig(targets="w", rank=2, use_dora=True)
    qbase = lj.quantize({"w": w}, "w")
    _, delta = lj.init_lora(jax.random.key(1), lj.dequantize(qbase), config)
    delta = jax.tree.map(lambda x: x + 0.05, delta)
    np.testing.assert_allclose(
        np.asarray(lj.merge(qbase, delta)["w"]),
        np.asarray(lj.merge(lj.dequantize(qbase), delta)["w"]),
        rtol=1e-6,
    )


def test_requantize_reports_the_fraction_of_the_delta_lost():
    w = rng(11).standard_normal((256, 64)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    qbase = lj.quantize(params, "w")
    config = lj.LoraConfig(targets="w", rank=4, alpha=4)
    for size, lo, hi in [(1.0, 0.0, 0.5), (1e-3, 0.9, 10.0)]:
        delta = jax.tree.map(lambda x, s=size: x * s / 0.1, random_delta(params, config, seed=2))
        merged = lj.merge(qbase, delta, dtype=jnp.float32)
        q, report = lj.requantize(merged, qbase)
        assert isinstance(q["w"], lj.QuantizedArray) and q["w"].scheme == "nf4"
        m = np.float64(np.asarray(merged["w"]))
        deq_base = np.float64(np.asarray(lj.dequantize(qbase["w"])))
        ref = ref_blockwise(m, PUBLISHED_NF4, 64)
        want = np.linalg.norm(ref - m) / np.linalg.norm(m - deq_base)
        assert report["w"].fraction_lost == pytest.approx(want, rel=1e-3)
        assert lo <= report["w"].fraction_lost <= hi, (size, report["w"])
    with pytest.raises(lj.LoraStructureError, match="different leaves"):
        lj.requantize({"v": merged["w"]}, qbase)


def ref_loftq(w, rank, scale, num_iter):
    """LoftQ in NumPy (float64): NF4 blocks of 64 by brute force, truncated SVD."""
    low = np.zeros_like(w)
    for _ in range(num_iter):
        deq = ref_blockwise(w - low, PUBLISHED_NF4, 64)
        u, s, vh = np.linalg.svd(w - deq, full_matrices=False)
        low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return deq, low


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_matches_a_numpy_reference_and_beats_plain_quantization(num_iter):
    w = rng(12).standard_normal((128, 64)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    config = lj.LoraConfig(targets="w", rank=8, alpha=16)
    base, delta = lj.init_lora(jax.random.key(0), params, config)
    qbase, delta = lj.loftq(base, delta, num_iter=num_iter)
    f = delta["w"]
    got_err = np.linalg.norm(np.asarray(lj.merge(qbase, delta)["w"], np.float64) - w)
    deq, low = ref_loftq(np.float64(w), 8, f.scale, num_iter)
    want_err = np.linalg.norm(deq + low - w)
    assert got_err == pytest.approx(want_err, rel=1e-3)
    plain = np.linalg.norm(ref_blockwise(w, PUBLISHED_NF4, 64) - w)
    assert got_err < 0.97 * plain, (got_err, plain)
    # s A B is the rank-8 truncation of the residual W - Q̂
    resid = np.float64(w) - np.asarray(lj.dequantize(qbase["w"]), np.float64)
    u, s, vh = np.linalg.svd(resid, full_matrices=False)
    np.testing.assert_allclose(
        f.scale * np.float64(f.a) @ np.float64(f.b), (u[:, :8] * s[:8]) @ vh[:8], atol=2e-4
    )


def test_loftq_stacked_and_errors():
    w = rng(13).standard_normal((2, 64, 16)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    config = lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"})
    base, delta = lj.init_lora(jax.random.key(0), params, config)
    qbase, d2 = lj.loftq(base, delta, scheme="int4", block_size=32)
    assert qbase["w"].axes == "sio" and d2["w"].a.shape == (2, 64, 2)
    for i in range(2):  # each layer alone: quantization and SVD per layer
        alone = {"x": jnp.asarray(w[i])}
        b1, dl = lj.init_lora(jax.random.key(0), alone, lj.LoraConfig(targets="x", rank=2))
        q1, d1 = lj.loftq(b1, dl, scheme="int4", block_size=32)
        np.testing.assert_allclose(
            np.asarray(lj.merge(qbase, d2)["w"][i]), np.asarray(lj.merge(q1, d1)["x"]), atol=1e-5
        )
    dora = lj.init_lora(
        jax.random.key(0),
        params,
        lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"}, use_dora=True),
    )
    with pytest.raises(lj.LoraTargetError, match="'w': loftq"):
        lj.loftq(*dora)
    with pytest.raises(lj.LoraArgumentError, match="num_iter"):
        lj.loftq(base, delta, num_iter=0)


# --------------------------------------------------------------------------- files


def quantized_model_params():
    r = rng(14)
    params = {
        "params": {
            "attn": {"kernel": jnp.asarray(r.standard_normal((32, 4, 16)), jnp.bfloat16)},
            "mlp": {
                "kernel": jnp.asarray(r.standard_normal((2, 64, 32)), jnp.float32),
                "bias": jnp.asarray(r.standard_normal(32), jnp.bfloat16),
            },
            "head": {"kernel": jnp.asarray(r.standard_normal((64, 8)), jnp.float32)},
        }
    }
    q = lj.quantize(params, r".*/mlp/kernel", double_quant=True, layouts={".*mlp.*": "sio"})
    q = lj.quantize(q, r".*/attn/kernel", scheme="int8", layouts={".*attn.*": "ioo"})
    return params, lj.quantize(q, r".*/head/kernel", scheme="int4", block_size=16)


def test_save_base_load_base_round_trip_is_bit_exact(tmp_path):
    params, q = quantized_model_params()
    path = lj.save_base(tmp_path / "base.safetensors", q)
    for back in (lj.load_base(path), lj.load_base(path, like=params), lj.load_base(path, like=q)):
        assert jax.tree.structure(back) == jax.tree.structure(q)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert back["params"]["attn"]["kernel"].dtype == jnp.bfloat16
        assert repr(back["params"]["mlp"]["kernel"]) == repr(q["params"]["mlp"]["kernel"])


def test_load_base_refuses_a_file_that_contradicts_the_model_or_itself(tmp_path):
    params, q = quantized_model_params()
    path = lj.save_base(tmp_path / "base.safetensors", q)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["params"]["head"]["kernel"] = jnp.zeros((8, 64))
    with pytest.raises(lj.LoraBaseMismatchError, match="'params/head/kernel' has shape"):
        lj.load_base(path, like=wrong)
    fewer = {"params": {k: v for k, v in params["params"].items() if k != "head"}}
    with pytest.raises(lj.LoraBaseMismatchError, match="extra \\['params/head/kernel'\\]"):
        lj.load_base(path, like=fewer)
    # a tensor whose shape contradicts its leaf's record
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(tensors)
    bad["params/head/kernel.codes"] = bad["params/head/kernel.codes"][:-1]
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(lj.LoraFileError, match="'params/head/kernel.codes' has shape"):
        lj.load_base(tmp_path / "bad.safetensors")
    gone = {k: v for k, v in tensors.items() if k != "params/mlp/kernel.dq_scales"}
    save_file(gone, str(tmp_path / "gone.safetensors"), metadata=meta)
    with pytest.raises(lj.LoraFileError, match="missing tensor 'params/mlp/kernel.dq_scales'"):
        lj.load_base(tmp_path / "gone.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(lj.LoraFileError, match="cut.safetensors"):
        lj.load_base(tmp_path / "cut.safetensors")


# --------------------------------------------------------------------------- lazy kernels (implicit)


def test_lazy_kernel_layout_ops_equal_the_same_ops_on_the_dense_kernel():
    from jax import lax

    from lora_jax._quant.lazy_kernel import LazyKernel

    w = rng(15).standard_normal((3, 64, 8)).astype(np.float32)
    q = lj.quantize({"w": jnp.asarray(w)}, "w", layouts={"w": "sio"}, double_quant=True)["w"]
    dense = np.asarray(lj.dequantize(q))
    k = LazyKernel(q)
    np.testing.assert_array_equal(
        np.asarray(k.transpose((0, 2, 1)).reshape((3, 512)).dense()),
        dense.transpose(0, 2, 1).reshape(3, 512),
    )
    static = k.slice_stack(
        [1, 0, 0], [2, 64, 8], lambda x, s, n: lax.slice(x, s, [a + b for a, b in zip(s, n)])
    )
    assert static.post == () and static.q.codes.shape == (2, 256)
    np.testing.assert_array_equal(np.asarray(static.dense()), dense[1:3])
    one = jax.jit(
        lambda k, i: (
            k.slice_stack([i, 0, 0], [1, 64, 8], lambda x, s, n: lax.dynamic_slice(x, s, n))
            .reshape((64, 8))
            .dense()
        )
    )(k, 2)
    np.testing.assert_array_equal(np.asarray(one), dense[2])
    layers = lax.scan(lambda c, kk: (c, kk.dense()), 0, k.scanned())[1]
    np.testing.assert_array_equal(np.asarray(layers), dense)
    assert k.transpose((1, 0, 2)).scanned() is None  # recorded op first: caller materialises


def test_lazy_kernel_use_saves_codes_not_the_dense_kernel():
    from lora_jax._quant.lazy_kernel import LazyKernel, use

    q = lj.quantize({"w": jnp.asarray(rng(16).standard_normal((256, 128)), jnp.float32)}, "w")["w"]
    x = jnp.asarray(rng(17).standard_normal((4, 256)), jnp.float32)
    loss = lambda x: jnp.sum(use(jnp.matmul, x, LazyKernel(q), jnp.float32) ** 2)  # noqa: E731
    ref = lambda x: jnp.sum((x @ lj.dequantize(q)) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(jax.grad(loss)(x)), np.asarray(jax.grad(ref)(x)), rtol=1e-5, atol=1e-4
    )
    _, vjp = jax.vjp(loss, x)
    saved = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert (256, 128) not in saved and (128, 256) not in saved, saved


# --------------------------------------------------------------------------- sharding (8 CPU devices)

SHARDING_SCRIPT = r"""
import json, os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lora_jax as lj
from lora_jax.advanced import quantized_shardings
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("stack", "fsdp"))
r = np.random.default_rng(0)
params = {"stk": jnp.asarray(r.standard_normal((2, 256, 64)), jnp.float32),
          "fc": jnp.asarray(r.standard_normal((512, 128)), jnp.float32),
          "tp": jnp.asarray(r.standard_normal((128, 256)), jnp.float32),
          "both": jnp.asarray(r.standard_normal((256, 128)), jnp.float32)}
# stacked + fan-in, fan-in (FSDP), fan-out (tensor parallel), fan-in and fan-out
specs = {"stk": P("stack", "fsdp", None), "fc": P("fsdp", None), "tp": P(None, "fsdp"),
         "both": P("stack", "fsdp")}
kernel_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
q = lj.quantize(params, "stk|tp", double_quant=True, layouts={"stk": "sio"})
q = lj.quantize(q, "fc", scheme="int8")
q = lj.quantize(q, "both", scheme="int4", block_size=32)
sh = quantized_shardings(q, kernel_sh)
placed = jax.device_put(q, sh)
out = {"codes_shard": list(placed["stk"].codes.sharding.shard_shape(placed["stk"].codes.shape)),
       "scales_shard": list(placed["stk"].scales.sharding.shard_shape(placed["stk"].scales.shape)),
       "fc_codes_shard": list(placed["fc"].codes.sharding.shard_shape(placed["fc"].codes.shape)),
       "fc_scales_shard": list(placed["fc"].scales.sharding.shard_shape(placed["fc"].scales.shape))}
for k in ("tp", "both"):
    out[k] = {f: [list(getattr(placed[k], f).shape),
                  list(getattr(placed[k], f).sharding.shard_shape(getattr(placed[k], f).shape))]
              for f in ("codes", "scales")}
out["specs"] = {k: [list(getattr(sh[k], f).spec) for f in ("codes", "scales")] for k in specs}
deq = jax.jit(lj.dequantize, out_shardings=kernel_sh)
dense = deq(placed)
ref = lj.dequantize(q)
out["max_diff"] = max(float(jnp.abs(dense[k] - ref[k]).max()) for k in ref)
hlo = deq.lower(placed).compile().as_text()
out["collectives"] = [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
                      if c in hlo]
# a sharded QLoRA step: delta shardings derived from the dense kernels' shardings
cfg = lj.LoraConfig(targets="stk|fc|tp|both", rank=4, layouts={"stk": "sio"})
_, delta = lj.init_lora(jax.random.key(0), params, cfg)
delta = jax.tree.map(lambda a: a + 0.01, delta)
delta_sh = lj.delta_shardings(kernel_sh, delta)
x = jnp.asarray(r.standard_normal((8, 512)), jnp.float32)
def fn(p, x):
    h = x @ p["fc"] / 16                                      # (8, 128), O(1) values
    h = jnp.tanh(h @ p["tp"] / 8)                             # (8, 256)
    y = jnp.tanh(h @ p["both"] / 16)                          # (8, 128)
    s = jax.lax.scan(lambda c, w: (c, jnp.tanh(c @ w / 16)), h, p["stk"])[1]  # (2, 8, 64)
    return jnp.sum(s ** 2) + jnp.sum(y ** 2)
loss = lambda d, b, x: lj.implicit(fn)(b, d, x)
rep = NamedSharding(mesh, P())
grad = jax.jit(jax.value_and_grad(loss), in_shardings=(delta_sh, sh, rep),
               out_shardings=(rep, delta_sh))
v, g = grad(jax.device_put(delta, delta_sh), placed, x)
v0, g0 = jax.value_and_grad(loss)(delta, q, x)
out["step_rel_diff"] = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))
                           for a, b in zip(jax.tree.leaves(g) + [v], jax.tree.leaves(g0) + [v0]))
out["grad_a_sharding"] = str(g["fc"].a.sharding.spec)
norm = lambda s: list(s) + [None] * (2 - len(s))   # noqa: E731  (trailing Nones)
out["grad_specs"] = {k: [norm(g[k].a.sharding.spec), norm(g[k].b.sharding.spec)] for k in specs}
out["delta_specs"] = {k: [norm(delta_sh[k].a.spec), norm(delta_sh[k].b.spec)] for k in specs}
_, d_init = lj.init_lora_sharded(jax.random.key(0), q, cfg, kernel_sh)   # quantized params
out["init_a_spec"] = list(d_init["fc"].a.sharding.spec)
out["init_stk_a_spec"] = list(d_init["stk"].a.sharding.spec)
try:
    quantized_shardings(q, {**kernel_sh, "tp": NamedSharding(mesh, P(None, ("stack", "fsdp")))})
    out["error"] = None
except lj.LoraShardingError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_quantized_leaves_shard_like_their_kernel_on_8_devices():
    out = run_on_eight_devices(SHARDING_SCRIPT, timeout=600)
    # (2, 256, 64) nf4, one block per row: codes (2, 256, 32) -> (1, 64, 32); scales
    # (2, 256, 1) -> (1, 64, 1)
    assert out["codes_shard"] == [1, 64, 32] and out["scales_shard"] == [1, 64, 1]
    # (512, 128) int8 rows over 4 shards; per-channel scales (128,) replicated (fan-out unsharded)
    assert out["fc_codes_shard"] == [128, 128] and out["fc_scales_shard"] == [128]
    # the same values (up to float contraction order: FMA in one program, not the other)
    assert out["max_diff"] < 1e-5 and out["collectives"] == [], out
    # fan-out (tensor parallel) and fan-in + fan-out shard too: each shard holds whole blocks
    # of its rows and their scales. tp (128, 256) nf4: codes (128, 128), 4 blocks per row
    assert out["tp"] == {"codes": [[128, 128], [128, 32]], "scales": [[128, 4], [128, 1]]}, out
    # both (256, 128) int4 blocks of 32: codes (256, 64), scales (256, 4); 2 x 4 shards
    assert out["both"] == {"codes": [[256, 64], [128, 16]], "scales": [[256, 4], [128, 1]]}, out
    assert out["specs"]["tp"] == [[None, "fsdp"]] * 2, out["specs"]
    # 8 shards of 256 columns would cut the blocks of 64: refused, naming the leaf
    assert out["error"] and "'tp'" in out["error"] and "split a block" in out["error"]
    # the gradients come out in the delta's derived shardings (B fan-out sharded for tp)
    assert out["grad_specs"] == out["delta_specs"], out
    assert out["delta_specs"]["tp"] == [[None, None], [None, "fsdp"]], out
    # implicit over the sharded quantized base == unsharded, gradients sharded like the delta
    assert out["step_rel_diff"] < 1e-5, out
    assert "fsdp" in out["grad_a_sharding"], out
    # init_lora_sharded draws the delta in its shardings over the quantized params
    assert out["init_a_spec"] == ["fsdp", None], out
    assert out["init_stk_a_spec"] == ["stack", "fsdp", None], out


def test_a_delta_trained_on_a_quantized_base_is_an_ordinary_adapter(tmp_path):
    params = {"fc": {"kernel": jnp.asarray(rng(18).standard_normal((64, 32)), jnp.float32)}}
    base, delta = lj.init_lora(
        jax.random.key(0), params, lj.LoraConfig(targets="fc/kernel", rank=2)
    )
    delta = jax.tree.map(lambda a: a + 0.1, delta)
    qbase = lj.quantize(base, "fc/kernel")
    lj.export_peft(tmp_path / "peft", delta)
    back = lj.import_peft(tmp_path / "peft", qbase)  # the quantized base names the leaves
    ours, _ = lj.load(lj.save(tmp_path / "ours", delta), base=qbase)
    for got in (back, ours):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(delta)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(lj.LoraBaseMismatchError):
        lj.load(
            tmp_path / "ours", base=lj.quantize({"fc": {"kernel": jnp.ones((32, 64))}}, "fc/kernel")
        )


def test_infer_layouts_reads_a_quantized_base():
    q = lj.quantize({"w": jnp.ones((2, 64, 8))}, "w", layouts={"w": "sio"})
    fn = lambda p, x: jax.lax.scan(lambda c, w: (c, c @ w), x, p["w"])[1]  # noqa: E731
    assert lj.infer_layouts(fn, q, jnp.ones((3, 64)))["w"].axes == "sio"


def test_cli_merges_an_adapter_into_a_quantized_base_file(tmp_path, capsys):
    from safetensors import safe_open

    from lora_jax._cli import main

    r = rng(19)
    params = {
        "params": {
            "fc": {
                "kernel": jnp.asarray(r.standard_normal((64, 8)), jnp.float32),
                "bias": jnp.asarray(r.standard_normal(8), jnp.float32),
            },
            "head": {"kernel": jnp.asarray(r.standard_normal((64, 4)), jnp.float32)},
        }
    }
    base, delta = lj.init_lora(
        jax.random.key(0), params, lj.LoraConfig(targets=".*/fc/kernel", rank=2)
    )
    delta = jax.tree.map(lambda a: a + 0.1, delta)
    qbase = lj.quantize(base, ".*/kernel", double_quant=True)
    lj.save_base(tmp_path / "qbase.safetensors", qbase)
    lj.save(tmp_path / "adapter", delta)
    code = main(
        [
            "merge",
            "--base",
            str(tmp_path / "qbase.safetensors"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "out.safetensors"),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    want = dict(leaves_with_paths(lj.merge(qbase, delta))[0])
    with safe_open(str(tmp_path / "out.safetensors"), framework="np") as f:
        assert "lora_jax_base" not in (f.metadata() or {})  # the output is dense
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-6, atol=1e-6)


def test_merge_on_the_fly_over_a_quantized_base_differentiates():
    w = jnp.asarray(rng(20).standard_normal((64, 16)), jnp.float32)
    base, delta = lj.init_lora(jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=2))
    delta = jax.tree.map(lambda a: a + 0.1, delta)
    qbase = lj.quantize(base, "w", scheme="int4", block_size=32)
    x = jnp.asarray(rng(21).standard_normal((3, 64)), jnp.float32)
    loss = lambda b: lambda d: jnp.sum(jnp.tanh(x @ lj.merge(b, d)["w"]))  # noqa: E731
    g_q = jax.jit(jax.grad(loss(qbase)))(delta)
    g_d = jax.grad(loss(lj.dequantize(qbase)))(delta)
    for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_d)):
        # float32 rounding of a 64-term product, relative to the gradient's scale (a
        # wrong dequantization is off by percent): XLA 0.6 differs by 6.5e-7 of max|g|.
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6 * scale)
