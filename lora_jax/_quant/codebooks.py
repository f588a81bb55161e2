"""Code books of the quantized base: NF4, int4 / int8 levels, 4-bit packing, double quantization.

* **nf4**: the 16 NormalFloat4 values of bitsandbytes (``NF4_TABLE``), two
  codes per ``uint8`` (first in the high nibble). **int4**: ``q = round(x /
  absmax · 7) ∈ [-7, 7]``, packed as ``q + 8``. **int8**: ``q = round(x /
  absmax · 127) ∈ [-127, 127]``.
* **double quantization** (bitsandbytes' ``compress_statistics``): ``c =
  mean(absmax)``; ``absmax - c`` quantized blockwise with blocks of 256 to 8
  bits on bitsandbytes' signed dynamic map (``DYNAMIC_TABLE``), each 256-block
  with a float32 absmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEMES = ("nf4", "int4", "int8")
DQ_BLOCK = 256

# NormalFloat4 as bitsandbytes defines it (functional.get_4bit_type("nf4")).
NF4_TABLE = np.array(
    [
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
    ],
    dtype=np.float32,
)


def dynamic_table(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), sorted.

    For exponent ``i = 0..6`` the values ``± 10^(i-6) · m`` with ``m`` the
    midpoints of ``linspace(0.1, 1, 2^i + 1)``; plus ``0`` and ``1``: 256 values
    in ``[-1, 1]``, dense near zero (the absmax deviations from their mean).

    Example:
      >>> t = dynamic_table()
      >>> t.shape, round(float(t.min()), 6), float(t.max()), int((t == 0).sum())
      ((256,), -0.992969, 1.0, 1)
    """
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        bounds = np.linspace(0.1, 1, 2 ** (i + non_sign - max_exponent_bits) + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += list((10 ** (-(max_exponent_bits - 1) + i)) * means)
        data += list(-(10 ** (-(max_exponent_bits - 1) + i)) * means)
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC_TABLE = dynamic_table()


def nearest_code(x: Array, table: np.ndarray) -> Array:
    """Index of the nearest value of the sorted ``table`` for each ``x`` (ties: the lower).

    Example:
      >>> nearest_code(jnp.array([-1.0, 0.03, 0.05, 2.0]), NF4_TABLE)
      Array([ 0,  7,  8, 15], dtype=int32)
    """
    mids = jnp.asarray((table[1:] + table[:-1]) / 2.0, jnp.float32)
    return jnp.searchsorted(mids, x.astype(jnp.float32), side="left").astype(jnp.int32)


def pack4(codes: Array) -> Array:
    """``(..., 2m)`` codes in ``[0, 16)`` -> ``(..., m)`` ``uint8``, the first in the high nibble.

    Example:
      >>> pack4(jnp.array([1, 2, 15, 0]))
      Array([ 18, 240], dtype=uint8)
    """
    c = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (-1, 2))
    return (c[..., 0] << 4) | c[..., 1]


def unpack4(packed: Array) -> Array:
    """Inverse of :func:`pack4`: ``(..., m)`` ``uint8`` -> ``(..., 2m)`` ``int32``.

    Example:
      >>> unpack4(jnp.array([18, 240], jnp.uint8))
      Array([ 1,  2, 15,  0], dtype=int32)
    """
    p = packed.astype(jnp.int32)
    return jnp.stack([p >> 4, p & 15], axis=-1).reshape(packed.shape[:-1] + (-1,))


_LEVELS = {"int4": 7, "int8": 127}


def encode(x: Array, scale: Array, scheme: str) -> Array:
    """Codes of ``x`` given its broadcast absmax ``scale`` (both float32)."""
    safe = jnp.where(scale > 0, scale, 1.0)
    if scheme == "nf4":
        return nearest_code(x / safe, NF4_TABLE)
    lv = _LEVELS[scheme]
    return jnp.clip(jnp.round(x / safe * lv), -lv, lv).astype(jnp.int32)


def decode(codes: Array, scheme: str) -> Array:
    """Code values in ``[-1, 1]`` (float32) from unpacked codes."""
    if scheme == "nf4":
        return jnp.asarray(NF4_TABLE)[codes]
    return codes.astype(jnp.float32) / _LEVELS[scheme]


# --------------------------------------------------------------------------- double quant


def double_quantize(absmax: Array) -> tuple[Array, Array, Array]:
    """bitsandbytes' nested quantization of blockwise absmax, per stacked layer.

    ``c = mean(absmax)``; ``d = absmax - c`` in blocks of 256 (the last one
    partial): ``a2 = max |d|`` per block, ``code = nearest(d / a2)`` on
    :data:`DYNAMIC_TABLE`.

    Args:
      absmax: ``(*stack, nb)`` float32.

    Returns:
      ``(codes (*stack, nb) uint8, a2 (*stack, ceil(nb/256)) float32, c (*stack, 1) float32)``.

    Example:
      >>> codes, a2, c = double_quantize(jnp.linspace(0.5, 1.5, 300)[None])
      >>> codes.shape, a2.shape, c.shape
      ((1, 300), (1, 2), (1, 1))
    """
    absmax = absmax.astype(jnp.float32)
    nb = absmax.shape[-1]
    nb2 = -(-nb // DQ_BLOCK)
    offset = jnp.mean(absmax, axis=-1, keepdims=True)
    d = absmax - offset
    padded = jnp.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, nb2 * DQ_BLOCK - nb)])
    blocks = padded.reshape(d.shape[:-1] + (nb2, DQ_BLOCK))
    a2 = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(a2 > 0, a2, 1.0)[..., None]
    codes = nearest_code(blocks / safe, DYNAMIC_TABLE).reshape(padded.shape)[..., :nb]
    return codes.astype(jnp.uint8), a2, offset


def double_dequantize(codes: Array, a2: Array, offset: Array) -> Array:
    """Inverse of :func:`double_quantize`: ``table[code] · a2 + c``, ``(*stack, nb)`` float32.

    Example:
      >>> x = jnp.linspace(0.5, 1.5, 300)[None]
      >>> float(jnp.max(jnp.abs(double_dequantize(*double_quantize(x)) - x))) < 0.01
      True
    """
    nb = codes.shape[-1]
    vals = jnp.asarray(DYNAMIC_TABLE)[codes.astype(jnp.int32)]
    per = jnp.repeat(a2, DQ_BLOCK, axis=-1)[..., :nb]
    return vals * per + offset
