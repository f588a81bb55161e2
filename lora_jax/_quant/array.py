"""Quantized frozen kernels: NF4 (with double quantization), int8 and int4.

A :class:`QuantizedArray` stands in for a frozen kernel ``W`` of any shape. It
is a frozen dataclass registered as a pytree whose children are the stored
arrays (packed codes, scales, double-quantization data) and whose static
metadata is the logical shape and dtype, the scheme, the block size and the
kernel's axis roles. ``jax.jit``, ``device_put`` and orbax see only the arrays;
lora_jax's own tree walks (:func:`lora_jax.advanced.leaves_with_paths`) see one
leaf with the kernel's ``shape`` and ``dtype``.

Storage, per stacked layer (blocks never straddle layers; batch axes, the
``'s'`` and ``'e'`` letters of the layout, are moved to the front: blocks never
straddle experts either):

* ``x``: the layer's ``n`` weights flattened in the kernel's own axis order
  (row-major): for a Flax ``(in, out)`` kernel a block runs along the output
  features. bitsandbytes flattens PyTorch's ``(out, in)`` weight, so its blocks
  run along the input features: same code book and rounding, other blocks.
* **blockwise** (``block_size = B``): ``absmax_k = max |x_{kB..kB+B-1}|``,
  ``code_j = argmin_c |x_j / absmax_k - table_c|`` (ties to the lower code,
  as bitsandbytes), ``x̂_j = table[code_j] · absmax_k``.
* **per output channel** (``block_size=None``, int schemes):
  ``absmax_o = max over the fan-in axes``.
* **nf4**: the 16 NormalFloat4 values of bitsandbytes (``NF4_TABLE``), two
  codes per ``uint8`` (first in the high nibble), absmax in float32.
  **int4**: ``q = round(x / absmax · 7) ∈ [-7, 7]``, packed as ``q + 8``.
  **int8**: ``q = round(x / absmax · 127) ∈ [-127, 127]`` as ``int8``.
* **double quantization** (bitsandbytes' ``compress_statistics``):
  ``c = mean(absmax)``; ``absmax - c`` quantized blockwise with blocks of 256
  to 8 bits on bitsandbytes' signed dynamic map (``DYNAMIC_TABLE``), each
  256-block with a float32 absmax. Stored bits per weight for NF4:
  ``4 + 8/64 + 32/(64·256) ≈ 4.127`` (plus one float32 ``c`` per layer),
  against ``4 + 32/64 = 4.5`` without.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraArgumentError
from lora_jax._layout import BATCH_LETTERS
from lora_jax._paths import BaseLeaf
from lora_jax._quant.codebooks import (
    DQ_BLOCK,
    DYNAMIC_TABLE,
    decode,
    double_quantize,
    encode,
    pack4,
    unpack4,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QuantizedArray(BaseLeaf):
    """A frozen kernel stored quantized: packed codes, scales, logical shape and dtype.

    Attributes:
      codes: ``(*stack, n)`` ``int8`` (int8) or ``(*stack, n/2)`` ``uint8`` (nf4, int4;
        two codes per byte, the first in the high nibble); ``n`` is one layer's size.
      scales: absmax per block ``(*stack, n/block_size)`` float32, per output
        channel ``(*stack, *fan_out)``, or with double quantization the 8-bit codes
        ``(*stack, n/block_size)`` ``uint8`` of ``absmax - offset``.
      dq_scales: double quantization: float32 absmax per 256 scale codes,
        ``(*stack, ceil(n/block_size/256))``; ``None`` without.
      dq_offset: double quantization: the mean absmax ``(*stack, 1)``; ``None`` without.
      shape, dtype: the kernel's logical shape and dtype (static).
      scheme: ``'nf4'``, ``'int4'`` or ``'int8'`` (static).
      block_size: the block length, or ``None`` for per-output-channel scales (static).
      axes: the kernel's axis roles, ``'s'``/``'e'``/``'i'``/``'o'`` per axis (static).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"w": jnp.ones((64, 8))}, "w", scheme="nf4")["w"]
      >>> q.shape, q.dtype, q.codes.shape, q.scales.shape, q.bits_per_param
      ((64, 8), dtype('float32'), (256,), (8,), 4.5)
      >>> bool((q.dequantize() == 1.0).all())
      True
    """

    codes: Any
    scales: Any
    dq_scales: Any = None
    dq_offset: Any = None
    _: dataclasses.KW_ONLY
    shape: tuple[int, ...]
    dtype: Any
    scheme: str
    block_size: int | None
    axes: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and double-quantization data."""
        return sum(
            int(np.size(x)) * np.dtype(x.dtype).itemsize
            for x in (self.codes, self.scales, self.dq_scales, self.dq_offset)
            if x is not None
        )

    @property
    def bits_per_param(self) -> float:
        """Stored bits per logical weight, scales included."""
        return 8.0 * self.nbytes / self.size

    def dequantize(self, dtype: Any = None) -> Array:
        """The dense kernel in ``dtype`` (default: the logical dtype); see :func:`lora_jax.dequantize`."""
        return dequantize_leaf(self, dtype)

    def __repr__(self) -> str:
        bs = "per-channel" if self.block_size is None else f"block {self.block_size}"
        dq = " + double quant" if self.dq_scales is not None else ""
        return (
            f"QuantizedArray({self.scheme}{dq}, {bs}, shape={self.shape}, "
            f"dtype={np.dtype(self.dtype).name}, axes={self.axes!r})"
        )


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["codes", "scales", "dq_scales", "dq_offset"],
    meta_fields=["shape", "dtype", "scheme", "block_size", "axes"],
)


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray` (use as ``is_leaf`` in tree maps).

    Example:
      >>> is_quantized(jnp.ones(2))
      False
    """
    return isinstance(x, QuantizedArray)


def split_axes(axes: str) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """Batch axes (stacked ``s`` and experts ``e``), the others in kernel order, and the
    others' roles."""
    stack = tuple(k for k, c in enumerate(axes) if c in BATCH_LETTERS)
    rest = tuple(k for k, c in enumerate(axes) if c not in BATCH_LETTERS)
    return stack, rest, "".join(axes[k] for k in rest)


def _in_positions(axes: str) -> tuple[int, ...]:
    """Positions of the fan-in axes in the ``(*stack, *rest)`` layer view."""
    stack, _, roles = split_axes(axes)
    return tuple(len(stack) + k for k, c in enumerate(roles) if c == "i")


def row_unit(scheme: str, block_size: int | None) -> int:
    """Weights a run along the last layer axis must hold: whole blocks, whole bytes."""
    return math.lcm(block_size or 1, 1 if scheme == "int8" else 2)


def layer_shaped(shape: tuple[int, ...], axes: str, scheme: str, block_size: int | None) -> bool:
    """Whether each layer is stored in the kernel's own shape (last axis packed / blocked).

    True when the layer's last axis holds whole blocks (and bytes): then a block
    never straddles two rows, the stored arrays are the flat ones reshaped, and
    any axis can be sharded. Else each layer is stored flattened.
    """
    _, rest, _ = split_axes(axes)
    return shape[rest[-1]] % row_unit(scheme, block_size) == 0


def _stored_shapes(
    shape: tuple[int, ...], axes: str, scheme: str, block_size: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the codes and of blockwise scales (or their 8-bit double-quant codes)."""
    stack_axes, rest_axes, _ = split_axes(axes)
    stack = tuple(shape[k] for k in stack_axes)
    rest = tuple(shape[k] for k in rest_axes)
    pack = 1 if scheme == "int8" else 2
    n = math.prod(rest)
    if not layer_shaped(shape, axes, scheme, block_size):
        return stack + (n // pack,), stack + (n // (block_size or n),)
    return (
        stack + rest[:-1] + (rest[-1] // pack,),
        stack + rest[:-1] + (rest[-1] // (block_size or rest[-1]),),
    )


def _quantize_arrays(
    w: Array, scheme: str, block_size: int | None, double_quant: bool, axes: str
) -> tuple[Array, Array, Array | None, Array | None]:
    """``(codes, scales, dq_scales, dq_offset)`` of one kernel (see the module docstring)."""
    codes, scales, dq_scales, dq_offset = _quantize_flat(w, scheme, block_size, double_quant, axes)
    code_shape, block_shape = _stored_shapes(tuple(w.shape), axes, scheme, block_size)
    codes = codes.reshape(code_shape)
    if block_size is not None:
        scales = scales.reshape(block_shape)
    return codes, scales, dq_scales, dq_offset


def _quantize_flat(
    w: Array, scheme: str, block_size: int | None, double_quant: bool, axes: str
) -> tuple[Array, Array, Array | None, Array | None]:
    """The arrays with each layer flattened (codes ``(*stack, n/pack)``)."""
    stack_axes, rest_axes, _ = split_axes(axes)
    x = jnp.transpose(w.astype(jnp.float32), stack_axes + rest_axes)
    ns = len(stack_axes)
    stack, n = x.shape[:ns], math.prod(x.shape[ns:])
    if block_size is not None:
        xb = x.reshape(stack + (n // block_size, block_size))
        absmax = jnp.max(jnp.abs(xb), axis=-1)
        codes = encode(xb, absmax[..., None], scheme).reshape(stack + (n,))
    else:
        absmax = jnp.max(jnp.abs(x), axis=_in_positions(axes), keepdims=True)
        codes = encode(x, absmax, scheme).reshape(stack + (n,))
        absmax = jnp.squeeze(absmax, _in_positions(axes))
    if scheme == "int8":
        codes = codes.astype(jnp.int8)
    else:
        codes = pack4(codes + (8 if scheme == "int4" else 0))
    if double_quant:
        return (codes,) + double_quantize(absmax)
    return codes, absmax, None, None


_quantize_jit = jax.jit(_quantize_arrays, static_argnums=(1, 2, 3, 4))


def dequantize_leaf(q: QuantizedArray, dtype: Any = None) -> Array:
    """The dense kernel ``table[code] · absmax`` in ``dtype`` (computed in float32), jit-able.

    Example:
      >>> q = quantize_leaf(jnp.arange(128.0).reshape(2, 64), "int8", 64, False, "io")
      >>> err = jnp.abs(dequantize_leaf(q) - jnp.arange(128.0).reshape(2, 64))
      >>> bool(err.max() <= 127 / 127 / 2)   # half a step of the largest block's absmax / 127
      True
    """
    stack_axes, rest_axes, _ = split_axes(q.axes)
    stack = tuple(q.shape[k] for k in stack_axes)
    rest = tuple(q.shape[k] for k in rest_axes)
    if q.scheme == "int8":
        codes = q.codes.astype(jnp.int32)
    else:
        codes = unpack4(q.codes) - (8 if q.scheme == "int4" else 0)
    vals = decode(codes, q.scheme)  # in the stored shape: every op below is local to a shard
    absmax = q.scales if q.dq_scales is None else _double_dequantize_shaped(q)
    absmax = jnp.asarray(absmax, jnp.float32)
    if q.block_size is not None:
        blocks = absmax.shape + (q.block_size,)
        x = (vals.reshape(blocks) * absmax[..., None]).reshape(stack + rest)
    else:
        x = vals.reshape(stack + rest) * jnp.expand_dims(absmax, _in_positions(q.axes))
    x = jnp.transpose(x, np.argsort(stack_axes + rest_axes).tolist())
    return x.astype(q.dtype if dtype is None else dtype)


def _double_dequantize_shaped(q: QuantizedArray) -> Array:
    """The absmax values in the stored scales' shape (groups of 256 along the flattened layer).

    The per-group scales are expanded in the flat order, then reshaped: they are tiny
    and replicated (not sharded along layer axes), so no shard needs another's data."""
    ns = sum(c in BATCH_LETTERS for c in q.axes)
    shape = q.scales.shape
    nb = math.prod(shape[ns:])
    per = jnp.repeat(q.dq_scales, DQ_BLOCK, axis=-1)[..., :nb].reshape(shape)
    offset = q.dq_offset.reshape(q.dq_offset.shape[:ns] + (1,) * (len(shape) - ns))
    vals = jnp.asarray(DYNAMIC_TABLE)[q.scales.astype(jnp.int32)]
    return vals * per + offset


def quantize_leaf(
    w: Array,
    scheme: str,
    block_size: int | None,
    double_quant: bool,
    axes: str,
    path: str = "<kernel>",
) -> QuantizedArray:
    """Quantizes one kernel ``w`` whose axis roles are ``axes`` (checked, jit-compiled).

    Raises:
      LoraArgumentError: the block size does not divide one layer's size, or an
        int4 per-channel layer has an odd size; the message names ``path``.

    Example:
      >>> quantize_leaf(jnp.ones((64, 2)), "nf4", 64, False, "io").codes.shape
      (64,)
    """
    shape = tuple(w.shape)
    layer = math.prod(shape[k] for k, c in enumerate(axes) if c not in BATCH_LETTERS)
    if block_size is not None and layer % block_size:
        raise LoraArgumentError(
            f"leaf {path!r}: block_size {block_size} does not divide the {layer} weights of "
            f"one layer (shape {shape}, axes {axes!r}); blocks never straddle layers"
        )
    if scheme != "int8" and layer % 2:
        raise LoraArgumentError(
            f"leaf {path!r}: {scheme} packs two codes per byte, but one layer holds an odd "
            f"number of weights ({layer}, shape {shape})"
        )
    codes, scales, dq_scales, dq_offset = _quantize_jit(w, scheme, block_size, double_quant, axes)
    return QuantizedArray(
        codes,
        scales,
        dq_scales,
        dq_offset,
        shape=shape,
        dtype=np.dtype(w.dtype),
        scheme=scheme,
        block_size=block_size,
        axes=axes,
    )


def storage_shapes(
    shape: tuple[int, ...], scheme: str, block_size: int | None, double_quant: bool, axes: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{field: (shape, dtype name)}`` of the arrays a :class:`QuantizedArray` stores.

    Example:
      >>> storage_shapes((2, 128, 8), "nf4", 64, True, "sio")
      {'codes': ((2, 512), 'uint8'), 'scales': ((2, 16), 'uint8'), 'dq_scales': ((2, 1), 'float32'), 'dq_offset': ((2, 1), 'float32')}
    """
    stack_axes, rest_axes, roles = split_axes(axes)
    stack = tuple(shape[k] for k in stack_axes)
    n = math.prod(shape[k] for k in rest_axes)
    code_shape, block_shape = _stored_shapes(tuple(shape), axes, scheme, block_size)
    out = {"codes": (code_shape, "int8" if scheme == "int8" else "uint8")}
    if block_size is None:
        fan_out = tuple(shape[k] for k, c in zip(rest_axes, roles) if c == "o")
        out["scales"] = (stack + fan_out, "float32")
        return out
    nb = n // block_size
    out["scales"] = (block_shape, "uint8" if double_quant else "float32")
    if double_quant:
        out["dq_scales"] = (stack + (-(-nb // DQ_BLOCK),), "float32")
        out["dq_offset"] = (stack + (1,), "float32")
    return out
