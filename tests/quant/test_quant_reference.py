"""The quantized base against NumPy written here from the published algorithms: NF4's tie
rule, the block order, double quantization's offset, per-256 scales and 8-bit codes; and
what ``merge(dtype=)`` and ``requantize`` keep of a quantized base.

Only the published tables are taken from the library (they are checked against the
published values in ``test_quant.py``); every index, scale and offset is recomputed here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._quant.codebooks import DYNAMIC_TABLE, NF4_TABLE


def nearest_lower(x, table):
    """Index of the nearest table value, an exact tie going to the lower index (bitsandbytes'
    decision tree compares ``x > threshold``), by brute force in float64."""
    t = np.float64(table)
    dist = np.abs(np.float64(x)[..., None] - t)
    return dist.argmin(axis=-1)  # argmin returns the first (lowest) of equal minima


# --------------------------------------------------------------------------- NF4


def test_nf4_exact_ties_round_to_the_lower_code():
    t = np.float64(NF4_TABLE)
    mids = (t[1:] + t[:-1]) / 2
    exact = [i for i, m in enumerate(mids) if float(np.float32(m)) == m]  # ties float32 can hold
    assert len(exact) >= 3, exact
    # one block of 64 per tie: absmax 1 (so x / absmax is x itself), the tie, then padding
    rows = np.zeros((len(exact), 64), np.float32)
    rows[:, 0] = 1.0
    rows[:, 1] = mids[exact]
    rows[:, 2] = -mids[exact]
    q = lj.quantize({"w": jnp.asarray(rows)}, "w", scheme="nf4", block_size=64)["w"]
    got = np.asarray(lj.dequantize(q), np.float64)
    np.testing.assert_array_equal(got[:, 1], t[exact])  # the lower of the two codes
    neg = nearest_lower(-mids[exact], t)
    np.testing.assert_array_equal(got[:, 2], t[neg])
    # and the brute-force reference agrees that these are the lower codes
    np.testing.assert_array_equal(nearest_lower(mids[exact], t), exact)


def test_nf4_blocks_run_along_the_flattened_kernel_in_its_own_order():
    """A Flax ``(in, out)`` kernel: block k holds the flattened kernel's weights
    ``[64k, 64k + 64)``, i.e. with 64 output features row ``k`` (along the outputs).
    bitsandbytes' blocks of PyTorch's ``(out, in)`` weight run along the inputs instead."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)[:, None]
    q = lj.quantize({"w": jnp.asarray(w)}, "w", scheme="nf4", block_size=64)["w"]
    np.testing.assert_array_equal(np.ravel(q.scales), np.abs(w).max(axis=1))
    # bitsandbytes' order would give the absmax of each block of w.T's rows instead
    bnb_order = np.abs(w.T.reshape(-1, 64)).max(axis=1)
    assert not np.array_equal(np.ravel(q.scales), bnb_order)
    want = NF4_TABLE[nearest_lower(w / np.abs(w).max(axis=1, keepdims=True), NF4_TABLE)]
    np.testing.assert_array_equal(
        np.asarray(lj.dequantize(q)), np.float32(want * np.abs(w).max(axis=1, keepdims=True))
    )


# --------------------------------------------------------------------------- double quantization


def ref_double_quant(absmax):
    """bitsandbytes' nested quantization in NumPy: ``c = mean(absmax)``; ``absmax - c`` in
    blocks of 256 scaled by each block's max |.|, coded to the nearest dynamic-map value."""
    absmax = np.float64(absmax)
    offset = absmax.mean()
    dev = absmax - offset
    n = dev.size
    blocks = np.pad(dev, (0, (-n) % 256)).reshape(-1, 256)
    a2 = np.abs(blocks).max(axis=1)
    codes = nearest_lower((blocks / a2[:, None]).ravel()[:n], DYNAMIC_TABLE)
    return codes, a2, offset


@pytest.mark.parametrize(
    "shape,axes", [((320, 96), "io"), ((3, 128, 192), "sio")], ids=["flat", "stacked"]
)
def test_double_quant_offset_scales_and_codes_equal_numpy(shape, axes):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * rng.uniform(0.2, 3.0, shape[-1])).astype(np.float32)
    dq = lj.quantize(
        {"w": jnp.asarray(w)}, "w", scheme="nf4", double_quant=True, layouts={"w": axes}
    )["w"]
    layers = w.reshape((-1,) + shape[-2:]) if axes[0] == "s" else w[None]
    rebuilt = []
    for k, layer in enumerate(layers):
        blocks = np.float64(layer).reshape(-1, 64)
        absmax = np.abs(blocks).max(axis=1)
        codes, a2, offset = ref_double_quant(absmax)
        assert absmax.size % 256  # the last group of 256 scales is partial
        got_offset = float(np.asarray(dq.dq_offset).reshape(-1)[k])
        np.testing.assert_allclose(got_offset, offset, rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(dq.dq_scales[k] if axes[0] == "s" else dq.dq_scales), a2, rtol=1e-6
        )
        got_codes = np.ravel(np.asarray(dq.scales[k] if axes[0] == "s" else dq.scales))
        # codes equal except where float32's offset puts a value within 1e-6 of a midpoint
        norm = (absmax - offset) / np.repeat(a2, 256)[: absmax.size]
        t = np.float64(DYNAMIC_TABLE)
        mids = (t[1:] + t[:-1]) / 2
        near = np.abs(norm[:, None] - mids).min(axis=1) < 1e-6
        assert (got_codes[~near] == codes[~near]).all()
        assert near.mean() < 0.01
        # the weights NumPy rebuilds from the stored codes and its own formulas
        scale = t[got_codes] * np.repeat(a2, 256)[: absmax.size] + offset
        w_codes = nearest_lower(blocks / absmax[:, None], NF4_TABLE)
        rebuilt.append((np.float64(NF4_TABLE)[w_codes] * scale[:, None]).reshape(layer.shape))
    got = np.asarray(lj.dequantize(dq), np.float64).reshape((-1,) + shape[-2:])
    np.testing.assert_allclose(got, np.stack(rebuilt), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- merge and requantize


def test_merge_dtype_applies_to_quantized_leaves_without_a_delta():
    rng = np.random.default_rng(2)
    params = {
        "fc": jnp.asarray(rng.standard_normal((64, 8)), jnp.float32),
        "other": jnp.asarray(rng.standard_normal((64, 4)), jnp.float32),
        "bias": jnp.ones(4, jnp.float32),
    }
    _, delta = lj.init_lora(jax.random.key(0), params, lj.LoraConfig(targets="fc", rank=2))
    qbase = lj.quantize(params, "fc|other")
    merged = lj.merge(qbase, delta, dtype=jnp.bfloat16)
    assert merged["fc"].dtype == jnp.bfloat16
    assert merged["other"].dtype == jnp.bfloat16  # quantized, no delta: still dtype
    assert merged["bias"].dtype == jnp.float32  # dense leaves keep their own
    np.testing.assert_array_equal(
        np.asarray(merged["other"], np.float32),
        np.asarray(lj.dequantize(qbase["other"]).astype(jnp.bfloat16), np.float32),
    )


def test_requantize_keeps_the_base_double_quantization():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)}
    for dq in (True, False):
        qbase = lj.quantize(params, "w", double_quant=dq)
        merged = {"w": lj.dequantize(qbase["w"]) + 0.01}
        q, _ = lj.requantize(merged, qbase)
        assert (q["w"].dq_scales is not None) == dq and (q["w"].dq_offset is not None) == dq
        want = lj.quantize(merged, "w", double_quant=dq)["w"]
        assert q["w"].bits_per_param == want.bits_per_param
        for name in ("codes", "scales", "dq_scales", "dq_offset"):
            a, b = getattr(q["w"], name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
