"""Quantized frozen kernels: NF4 (with double quantization), int8 and int4.

A :class:`QuantizedArray` stands in for a frozen kernel ``W`` of any shape. It
is a frozen dataclass registered as a pytree whose children are the stored
arrays (packed codes, scales, double-quantization data) and whose static
metadata is the logical shape and dtype, the scheme, the block size and the
kernel's axis roles. ``jax.jit``, ``device_put`` and orbax see only the arrays;
lora_jax's own tree walks (:func:`lora_jax.advanced.leaves_with_paths`) see one
leaf with the kernel's ``shape`` and ``dtype``.

Storage, per stacked layer (blocks never straddle layers; stacked axes, the
``'s'`` letters of the layout, are moved to the front):

* ``x``: the layer's ``n`` weights flattened in the kernel's own axis order.
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
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraArgumentError, LoraLayoutError, LoraTargetError
from lora_jax._layout import KernelLayout, default_layout
from lora_jax._paths import leaves_with_paths, register_base_leaf

Array = jax.Array

SCHEMES = ("nf4", "int4", "int8")
DQ_BLOCK = 256

# NormalFloat4 as bitsandbytes defines it (functional.get_4bit_type("nf4")).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


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
        bounds = np.linspace(0.1, 1, 2 ** (i + non_sign - max_exponent_bits) + 1,
                             dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += list((10 ** (-(max_exponent_bits - 1) + i)) * means)
        data += list(-(10 ** (-(max_exponent_bits - 1) + i)) * means)
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, np.float32))


DYNAMIC_TABLE = dynamic_table()


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
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
      axes: the kernel's axis roles, ``'s'``/``'i'``/``'o'`` per axis (static).

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
        return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize
                   for x in (self.codes, self.scales, self.dq_scales, self.dq_offset)
                   if x is not None)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per logical weight, scales included."""
        return 8.0 * self.nbytes / self.size

    def dequantize(self, dtype: Any = None) -> Array:
        """The dense kernel in ``dtype`` (default: the logical dtype); see :func:`dequantize`."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        bs = "per-channel" if self.block_size is None else f"block {self.block_size}"
        dq = " + double quant" if self.dq_scales is not None else ""
        return (f"QuantizedArray({self.scheme}{dq}, {bs}, shape={self.shape}, "
                f"dtype={np.dtype(self.dtype).name}, axes={self.axes!r})")


jax.tree_util.register_dataclass(
    QuantizedArray, data_fields=["codes", "scales", "dq_scales", "dq_offset"],
    meta_fields=["shape", "dtype", "scheme", "block_size", "axes"])
register_base_leaf(QuantizedArray)


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray` (use as ``is_leaf`` in tree maps).

    Example:
      >>> is_quantized(jnp.ones(2))
      False
    """
    return isinstance(x, QuantizedArray)


# --------------------------------------------------------------------------- code books


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


def _encode(x: Array, scale: Array, scheme: str) -> Array:
    """Codes of ``x`` given its broadcast absmax ``scale`` (both float32)."""
    safe = jnp.where(scale > 0, scale, 1.0)
    if scheme == "nf4":
        return nearest_code(x / safe, NF4_TABLE)
    lv = _LEVELS[scheme]
    return jnp.clip(jnp.round(x / safe * lv), -lv, lv).astype(jnp.int32)


def _decode(codes: Array, scheme: str) -> Array:
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


# --------------------------------------------------------------------------- one kernel


def _split_axes(axes: str) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """Stacked axes, the others in kernel order, and the others' roles."""
    stack = tuple(k for k, c in enumerate(axes) if c == "s")
    rest = tuple(k for k, c in enumerate(axes) if c != "s")
    return stack, rest, "".join(axes[k] for k in rest)


def _in_positions(axes: str) -> tuple[int, ...]:
    """Positions of the fan-in axes in the ``(*stack, *rest)`` layer view."""
    stack, _, roles = _split_axes(axes)
    return tuple(len(stack) + k for k, c in enumerate(roles) if c == "i")


def _row_unit(scheme: str, block_size: int | None) -> int:
    """Weights a run along the last layer axis must hold: whole blocks, whole bytes."""
    return math.lcm(block_size or 1, 1 if scheme == "int8" else 2)


def _layer_shaped(shape: tuple[int, ...], axes: str, scheme: str, block_size: int | None) -> bool:
    """Whether each layer is stored in the kernel's own shape (last axis packed / blocked).

    True when the layer's last axis holds whole blocks (and bytes): then a block
    never straddles two rows, the stored arrays are the flat ones reshaped, and
    any axis can be sharded. Else each layer is stored flattened.
    """
    _, rest, _ = _split_axes(axes)
    return shape[rest[-1]] % _row_unit(scheme, block_size) == 0


def _stored_shapes(shape: tuple[int, ...], axes: str, scheme: str,
                   block_size: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the codes and of blockwise scales (or their 8-bit double-quant codes)."""
    stack_axes, rest_axes, _ = _split_axes(axes)
    stack = tuple(shape[k] for k in stack_axes)
    rest = tuple(shape[k] for k in rest_axes)
    pack = 1 if scheme == "int8" else 2
    n = math.prod(rest)
    if not _layer_shaped(shape, axes, scheme, block_size):
        return stack + (n // pack,), stack + (n // (block_size or n),)
    return (stack + rest[:-1] + (rest[-1] // pack,),
            stack + rest[:-1] + (rest[-1] // (block_size or rest[-1]),))


def _quantize_arrays(w: Array, scheme: str, block_size: int | None, double_quant: bool,
                     axes: str) -> tuple[Array, Array, Array | None, Array | None]:
    """``(codes, scales, dq_scales, dq_offset)`` of one kernel (see the module docstring)."""
    codes, scales, dq_scales, dq_offset = _quantize_flat(w, scheme, block_size, double_quant,
                                                         axes)
    code_shape, block_shape = _stored_shapes(tuple(w.shape), axes, scheme, block_size)
    codes = codes.reshape(code_shape)
    if block_size is not None:
        scales = scales.reshape(block_shape)
    return codes, scales, dq_scales, dq_offset


def _quantize_flat(w: Array, scheme: str, block_size: int | None, double_quant: bool,
                   axes: str) -> tuple[Array, Array, Array | None, Array | None]:
    """The arrays with each layer flattened (codes ``(*stack, n/pack)``)."""
    stack_axes, rest_axes, _ = _split_axes(axes)
    x = jnp.transpose(w.astype(jnp.float32), stack_axes + rest_axes)
    ns = len(stack_axes)
    stack, n = x.shape[:ns], math.prod(x.shape[ns:])
    if block_size is not None:
        xb = x.reshape(stack + (n // block_size, block_size))
        absmax = jnp.max(jnp.abs(xb), axis=-1)
        codes = _encode(xb, absmax[..., None], scheme).reshape(stack + (n,))
    else:
        absmax = jnp.max(jnp.abs(x), axis=_in_positions(axes), keepdims=True)
        codes = _encode(x, absmax, scheme).reshape(stack + (n,))
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
    stack_axes, rest_axes, _ = _split_axes(q.axes)
    stack = tuple(q.shape[k] for k in stack_axes)
    rest = tuple(q.shape[k] for k in rest_axes)
    if q.scheme == "int8":
        codes = q.codes.astype(jnp.int32)
    else:
        codes = unpack4(q.codes) - (8 if q.scheme == "int4" else 0)
    vals = _decode(codes, q.scheme)   # in the stored shape: every op below is local to a shard
    absmax = q.scales if q.dq_scales is None else _double_dequantize_shaped(q)
    absmax = jnp.asarray(absmax, jnp.float32)
    if q.block_size is not None:
        blocks = absmax.shape + (q.block_size,)
        x = (vals.reshape(blocks) * absmax[..., None]).reshape(stack + rest)
    else:
        x = vals.reshape(stack + rest) * jnp.expand_dims(absmax, _in_positions(q.axes))
    x = jnp.transpose(x, np.argsort(stack_axes + rest_axes))
    return x.astype(q.dtype if dtype is None else dtype)


def _double_dequantize_shaped(q: QuantizedArray) -> Array:
    """The absmax values in the stored scales' shape (groups of 256 along the flattened layer).

    The per-group scales are expanded in the flat order, then reshaped: they are tiny
    and replicated (not sharded along layer axes), so no shard needs another's data."""
    ns = q.axes.count("s")
    shape = q.scales.shape
    nb = math.prod(shape[ns:])
    per = jnp.repeat(q.dq_scales, DQ_BLOCK, axis=-1)[..., :nb].reshape(shape)
    offset = q.dq_offset.reshape(q.dq_offset.shape[:ns] + (1,) * (len(shape) - ns))
    vals = jnp.asarray(DYNAMIC_TABLE)[q.scales.astype(jnp.int32)]
    return vals * per + offset


def quantize_leaf(w: Array, scheme: str, block_size: int | None, double_quant: bool,
                  axes: str, path: str = "<kernel>") -> QuantizedArray:
    """Quantizes one kernel ``w`` whose axis roles are ``axes`` (checked, jit-compiled).

    Raises:
      LoraArgumentError: the block size does not divide one layer's size, or an
        int4 per-channel layer has an odd size; the message names ``path``.

    Example:
      >>> quantize_leaf(jnp.ones((64, 2)), "nf4", 64, False, "io").codes.shape
      (64,)
    """
    shape = tuple(w.shape)
    layer = math.prod(shape[k] for k, c in enumerate(axes) if c != "s")
    if block_size is not None and layer % block_size:
        raise LoraArgumentError(
            f"leaf {path!r}: block_size {block_size} does not divide the {layer} weights of "
            f"one layer (shape {shape}, axes {axes!r}); blocks never straddle layers")
    if scheme != "int8" and layer % 2:
        raise LoraArgumentError(
            f"leaf {path!r}: {scheme} packs two codes per byte, but one layer holds an odd "
            f"number of weights ({layer}, shape {shape})")
    codes, scales, dq_scales, dq_offset = _quantize_jit(w, scheme, block_size, double_quant, axes)
    return QuantizedArray(codes, scales, dq_scales, dq_offset, shape=shape,
                          dtype=np.dtype(w.dtype), scheme=scheme, block_size=block_size,
                          axes=axes)


def storage_shapes(shape: tuple[int, ...], scheme: str, block_size: int | None,
                   double_quant: bool, axes: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{field: (shape, dtype name)}`` of the arrays a :class:`QuantizedArray` stores.

    Example:
      >>> storage_shapes((2, 128, 8), "nf4", 64, True, "sio")
      {'codes': ((2, 512), 'uint8'), 'scales': ((2, 16), 'uint8'), 'dq_scales': ((2, 1), 'float32'), 'dq_offset': ((2, 1), 'float32')}
    """
    stack_axes, rest_axes, roles = _split_axes(axes)
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


# --------------------------------------------------------------------------- params trees


def _check_scheme(scheme: str, block_size: Any, double_quant: bool) -> int | None:
    """The block size to use (``'auto'``: 64 for nf4, per channel for int), or raises."""
    if scheme not in SCHEMES:
        raise LoraArgumentError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if block_size == "auto":
        block_size = 64 if scheme == "nf4" else None
    if block_size is None:
        if scheme == "nf4":
            raise LoraArgumentError("nf4 is blockwise: give an integer block_size (64 as "
                                    "bitsandbytes), not None")
        if double_quant:
            raise LoraArgumentError("double_quant needs blockwise scales (an integer "
                                    "block_size); per-channel scales are not re-quantized")
        return None
    if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
            or block_size < 2 or (scheme != "int8" and block_size % 2)):
        raise LoraArgumentError(
            f"block_size must be an integer >= 2 (even for {scheme}), 'auto' or None, "
            f"got {block_size!r}")
    return int(block_size)


def _layout_for(path: str, leaf: Any, layouts: Mapping[str, Any]) -> KernelLayout:
    """The leaf's layout: ``layouts[path]``, a matching pattern, or the 2-D default."""
    found = layouts.get(path)
    if found is None:
        found = next((v for k, v in layouts.items() if re.fullmatch(k, path)), None)
    if found is None:
        try:
            return default_layout(path, tuple(leaf.shape))
        except LoraLayoutError:
            raise LoraLayoutError(
                f"leaf {path!r} has shape {tuple(leaf.shape)}: quantize needs its axis roles "
                "to keep blocks inside one stacked layer and scales per output channel; pass "
                "layouts={pattern: 'sio'} (or lora_jax.infer_layouts(...))") from None
    layout = found if isinstance(found, KernelLayout) else KernelLayout(found)
    layout.check_shape(tuple(leaf.shape), path)
    return layout


def _check_leaf(path: str, leaf: Any, layout: KernelLayout | None) -> None:
    if is_quantized(leaf):
        raise LoraTargetError(f"leaf {path!r} is already quantized ({leaf!r})")
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise LoraTargetError(
            f"leaf {path!r} matches the quantize targets but is not a floating array "
            f"(dtype {dtype if dtype is not None else type(leaf).__name__})")
    if len(getattr(leaf, "shape", ())) < 2:
        raise LoraTargetError(
            f"leaf {path!r} matches the quantize targets but has shape "
            f"{tuple(getattr(leaf, 'shape', ()))}; only kernels with >= 2 axes are quantized")
    if layout is not None and layout.kind == "embed":
        raise LoraTargetError(
            f"leaf {path!r} is an embedding table; quantized embeddings are not supported "
            "(exclude it from the quantize targets)")


def _matcher(targets: Any, exclude: Any) -> Callable[[str, Any], bool]:
    pats = [targets] if isinstance(targets, str) else targets
    excl = [exclude] if isinstance(exclude, str) else list(exclude)

    def match(path: str, leaf: Any) -> bool:
        if any(re.fullmatch(e, path) for e in excl):
            return False
        if callable(pats):
            return bool(pats(path, leaf))
        return any(re.fullmatch(p, path) for p in pats)

    return match


def quantize(params: Any, targets: Any, *, scheme: str = "nf4", block_size: Any = "auto",
             double_quant: bool = False, layouts: Mapping[str, Any] | None = None,
             exclude: Any = ()) -> Any:
    """Replaces the targeted frozen kernels of ``params`` by :class:`QuantizedArray` leaves.

    Args:
      params: a params pytree (linen dict, ``nnx.State``, plain dict).
      targets: regex(es) matched in full against '/'-joined leaf paths, or a
        predicate ``(path, leaf) -> bool`` (as :class:`~lora_jax.LoraConfig`).
      scheme: ``'nf4'`` (bitsandbytes NormalFloat4), ``'int4'`` or ``'int8'``
        (symmetric absmax).
      block_size: weights per absmax scale along each flattened layer;
        ``'auto'``: 64 for nf4 (bitsandbytes' default), per output channel for
        int4 / int8; ``None``: per output channel (int schemes only).
      double_quant: quantize the absmax values too (bitsandbytes' nested
        quantization: 8 bits per scale, blocks of 256); about 4.127 bits per
        weight for nf4 with blocks of 64.
      layouts: ``{path or pattern: KernelLayout | 'sio'-string}`` for N-D kernels
        (stacked axes ``'s'`` keep blocks inside one layer; per-channel scales are
        per ``'o'`` index); 2-D kernels default to ``'io'``.
      exclude: regex(es) of paths never quantized.

    Returns:
      ``params`` with each targeted kernel replaced by a :class:`QuantizedArray`.

    Raises:
      LoraTargetError: a pattern matches no leaf; a match is not a floating
        kernel with >= 2 axes, is an embedding table, or is already quantized.
      LoraArgumentError: an unknown scheme, a bad block size, or one that does
        not divide a layer of a matched kernel (the message names the leaf).
      LoraLayoutError: an N-D kernel with no layout.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"fc": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
      >>> q = lj.quantize(params, r".*/kernel", scheme="nf4", double_quant=True)
      >>> q["fc"]["kernel"]
      QuantizedArray(nf4 + double quant, block 64, shape=(128, 64), dtype=float32, axes='io')
      >>> q["fc"]["bias"].shape
      (64,)
    """
    block_size = _check_scheme(scheme, block_size, double_quant)
    layouts = dict(layouts or {})
    leaves, treedef = leaves_with_paths(params)
    match = _matcher(targets, exclude)
    hits = [path for path, leaf in leaves if match(path, leaf)]
    _check_patterns(targets, [p for p, _ in leaves], hits)
    out = []
    for path, leaf in leaves:
        if path not in hits:
            out.append(leaf)
            continue
        _check_leaf(path, leaf, None)
        layout = _layout_for(path, leaf, layouts)
        _check_leaf(path, leaf, layout)
        out.append(quantize_leaf(jnp.asarray(leaf), scheme, block_size, double_quant,
                                 layout.axes, path))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_patterns(targets: Any, paths: list[str], hits: list[str]) -> None:
    if callable(targets):
        if not hits:
            raise LoraTargetError("the quantize targets predicate selected no leaf")
        return
    for pattern in [targets] if isinstance(targets, str) else targets:
        if not any(re.fullmatch(pattern, p) for p in hits):
            raise LoraTargetError(
                f"quantize target pattern {pattern!r} matches no (non-excluded) leaf; "
                f"patterns are matched in full against paths such as {paths[:6]}")


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """Dense kernels from :class:`QuantizedArray` leaves (a single leaf, or every one in a tree).

    ``W = table[code] · absmax`` per block (or per output channel), computed in
    float32 and cast to ``dtype`` (default: each kernel's logical dtype). Other
    leaves pass through. Pure and jit-able: under ``jit`` XLA fuses the lookup
    into the consumer.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(16, 8)
      >>> q = lj.quantize({"w": w}, "w", scheme="int8")
      >>> dense = lj.dequantize(q, jnp.bfloat16)
      >>> dense["w"].dtype, bool(jnp.abs(dense["w"] - w).max() < 1 / 127)
      (dtype(bfloat16), True)
    """
    if is_quantized(tree):
        return dequantize_leaf(tree, dtype)
    return jax.tree.map(lambda x: dequantize_leaf(x, dtype) if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)


def kernel_bits(params: Any, paths: Any = None) -> float:
    """Stored bits per parameter over the quantized kernels (or the given ``paths``).

    Quantized leaves count codes, scales and double-quantization data; dense
    leaves among ``paths`` count their dtype's bits.

    Example:
      >>> q = quantize({"w": jnp.ones((256, 256))}, "w", scheme="int8")
      >>> kernel_bits(q)
      8.125
    """
    leaves, _ = leaves_with_paths(params)
    chosen = [(p, x) for p, x in leaves
              if (is_quantized(x) if paths is None else p in set(paths))]
    if not chosen:
        raise LoraTargetError("kernel_bits: no quantized kernel (or given path) in the params")
    bits = sum(x.nbytes * 8 if is_quantized(x) else np.size(x) * np.dtype(x.dtype).itemsize * 8
               for _, x in chosen)
    return float(bits / sum(int(np.size(x)) if not is_quantized(x) else x.size
                            for _, x in chosen))


# --------------------------------------------------------------------------- sharding


def storage_specs(q: QuantizedArray, kernel_spec: Any, mesh_sizes: Mapping[str, int],
                  path: str = "<kernel>") -> QuantizedArray:
    """``PartitionSpec`` s of ``q``'s stored arrays from the dense kernel's spec.

    Stacked axes keep their specs (they lead every stored array). When each
    layer is stored in the kernel's shape (its last axis holds whole blocks,
    the usual case), the codes and blockwise scales take the spec of every
    kernel axis: fan-in, fan-out or both (tensor parallel), a shard of the
    last axis holding whole blocks with their scales. A layer stored
    flattened takes only its first axis's spec. Per-channel scales take the
    fan-out axes' specs; double-quantization scales and offsets (4 bytes per
    16384 weights) are replicated but for stacked axes.

    Args:
      q: the quantized kernel.
      kernel_spec: the ``PartitionSpec`` the dense kernel has (kernel axis order).
      mesh_sizes: ``{mesh axis name: size}`` (``dict(mesh.shape)``).
      path: the leaf path, for messages.

    Raises:
      LoraShardingError: a shard would split a block (or a byte of two 4-bit
        codes), or a flattened layer is sharded on another than its first axis
        (the message names the leaf).

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> q = quantize({"w": jnp.ones((256, 128))}, "w", double_quant=True)["w"]
      >>> q.codes.shape, q.scales.shape
      ((256, 64), (256, 2))
      >>> s = storage_specs(q, P(None, "tp"), {"tp": 2})       # fan-out sharded
      >>> [tuple(x) for x in (s.codes, s.scales, s.dq_scales, s.dq_offset)]
      [(None, 'tp'), (None, 'tp'), (None,), (None,)]
    """
    from jax.sharding import PartitionSpec as P

    from lora_jax._errors import LoraShardingError

    entries = list(tuple(kernel_spec)) + [None] * (q.ndim - len(tuple(kernel_spec)))
    stack_axes, rest_axes, roles = _split_axes(q.axes)
    stack = [entries[d] for d in stack_axes]
    rest = [entries[d] for d in rest_axes]

    def shards(entry: Any) -> int:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return math.prod(mesh_sizes[n] for n in names)

    unit = _row_unit(q.scheme, q.block_size)
    if _layer_shaped(q.shape, q.axes, q.scheme, q.block_size):
        last = q.shape[rest_axes[-1]]
        if (last // shards(rest[-1])) % unit:
            raise LoraShardingError(
                f"leaf {path!r}: {shards(rest[-1])} shards of its last axis ({last}) would "
                f"split a block of {q.block_size or 1} ({q.scheme}); use fewer shards or a "
                "smaller block_size")
        codes = P(*stack, *rest)
    else:
        if any(e is not None for e in rest[1:]):
            raise LoraShardingError(
                f"leaf {path!r}: its last axis ({q.shape[rest_axes[-1]]}) holds no whole "
                f"blocks of {unit}, so each layer is stored flattened and only its first "
                f"non-stacked axis can be sharded; spec {tuple(entries)} shards another "
                f"(axes {q.axes!r}). Shard the first axis, or keep this kernel dense")
        n = math.prod(q.shape[d] for d in rest_axes)
        if shards(rest[0]) > 1 and (n // shards(rest[0])) % unit:
            raise LoraShardingError(
                f"leaf {path!r}: {shards(rest[0])} shards of {n} weights per layer would split "
                f"a block of {q.block_size or 1} ({q.scheme}); use fewer shards or a smaller "
                "block_size")
        codes = P(*stack, rest[0])
    if q.block_size is None:
        scales = P(*stack, *[e for e, c in zip(rest, roles) if c == "o"])
    else:
        scales = codes
    flat = None if q.dq_scales is None else P(*stack, None)
    return dataclasses.replace(q, codes=codes, scales=scales, dq_scales=flat, dq_offset=flat)


def quantized_shardings(params: Any, kernel_shardings: Any) -> Any:
    """Shardings for quantized params, from the shardings their dense kernels have.

    Args:
      params: params with :class:`QuantizedArray` leaves (arrays or abstract).
      kernel_shardings: ``NamedSharding`` s shaped like the dense params (e.g.
        :func:`lora_jax.param_shardings` of the unquantized params); also what
        :func:`lora_jax.delta_shardings` takes for the delta.

    Returns:
      A tree like ``params``: a ``NamedSharding`` per dense leaf, and at each
      quantized leaf a :class:`QuantizedArray` of ``NamedSharding`` s (see
      :func:`storage_specs`), ready for ``jax.device_put`` / ``jit``'s shardings.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
      >>> q = quantize({"w": jnp.ones((128, 64))}, "w")
      >>> s = quantized_shardings(q, {"w": NamedSharding(mesh, P("fsdp"))})
      >>> tuple(s["w"].codes.spec), tuple(s["w"].scales.spec)
      (('fsdp', None), ('fsdp', None))
    """
    from jax.sharding import NamedSharding

    leaves, treedef = leaves_with_paths(params)
    given, _ = leaves_with_paths(kernel_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = dict(given)
    out = []
    for path, leaf in leaves:
        sh = by_path.get(path)
        if sh is None:
            from lora_jax._errors import LoraShardingError
            raise LoraShardingError(f"leaf {path!r} has no entry in the kernel shardings")
        if not is_quantized(leaf):
            out.append(sh)
            continue
        specs = storage_specs(leaf, sh.spec, dict(sh.mesh.shape), path)
        out.append(jax.tree.map(lambda s: NamedSharding(sh.mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, type(sh.spec))))
    return jax.tree_util.tree_unflatten(treedef, out)
