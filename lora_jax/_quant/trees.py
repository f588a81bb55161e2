"""Quantizing and dequantizing whole params trees: target selection, layouts, bits per parameter."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraArgumentError, LoraLayoutError, LoraTargetError
from lora_jax._layout import KernelLayout, default_layout
from lora_jax._paths import leaves_with_paths
from lora_jax._quant.array import dequantize_leaf, is_quantized, quantize_leaf
from lora_jax._quant.codebooks import SCHEMES


def check_scheme(scheme: str, block_size: Any, double_quant: bool) -> int | None:
    """The block size to use (``'auto'``: 64 for nf4, per channel for int), or raises."""
    if scheme not in SCHEMES:
        raise LoraArgumentError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if block_size == "auto":
        block_size = 64 if scheme == "nf4" else None
    if block_size is None:
        if scheme == "nf4":
            raise LoraArgumentError(
                "nf4 is blockwise: give an integer block_size (64 as bitsandbytes), not None"
            )
        if double_quant:
            raise LoraArgumentError(
                "double_quant needs blockwise scales (an integer "
                "block_size); per-channel scales are not re-quantized"
            )
        return None
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 2
        or (scheme != "int8" and block_size % 2)
    ):
        raise LoraArgumentError(
            f"block_size must be an integer >= 2 (even for {scheme}), 'auto' or None, "
            f"got {block_size!r}"
        )
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
                "layouts={pattern: 'sio'} (or lora_jax.infer_layouts(...))"
            ) from None
    layout = found if isinstance(found, KernelLayout) else KernelLayout(found)
    layout.check_shape(tuple(leaf.shape), path)
    return layout


def check_leaf(path: str, leaf: Any, layout: KernelLayout | None) -> None:
    if is_quantized(leaf):
        raise LoraTargetError(f"leaf {path!r} is already quantized ({leaf!r})")
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise LoraTargetError(
            f"leaf {path!r} matches the quantize targets but is not a floating array "
            f"(dtype {dtype if dtype is not None else type(leaf).__name__})"
        )
    if len(getattr(leaf, "shape", ())) < 2:
        raise LoraTargetError(
            f"leaf {path!r} matches the quantize targets but has shape "
            f"{tuple(getattr(leaf, 'shape', ()))}; only kernels with >= 2 axes are quantized"
        )
    if layout is not None and layout.kind == "embed":
        raise LoraTargetError(
            f"leaf {path!r} is an embedding table; quantized embeddings are not supported "
            "(exclude it from the quantize targets)"
        )


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


def quantize(
    params: Any,
    targets: Any,
    *,
    scheme: str = "nf4",
    block_size: Any = "auto",
    double_quant: bool = False,
    layouts: Mapping[str, Any] | None = None,
    exclude: Any = (),
) -> Any:
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
        (stacked ``'s'`` and experts ``'e'`` axes keep blocks inside one layer / expert;
        per-channel scales are
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
    block_size = check_scheme(scheme, block_size, double_quant)
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
        check_leaf(path, leaf, None)
        layout = _layout_for(path, leaf, layouts)
        check_leaf(path, leaf, layout)
        out.append(
            quantize_leaf(jnp.asarray(leaf), scheme, block_size, double_quant, layout.axes, path)
        )
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
                f"patterns are matched in full against paths such as {paths[:6]}"
            )


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
    return jax.tree.map(
        lambda x: dequantize_leaf(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


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
    chosen = [(p, x) for p, x in leaves if (is_quantized(x) if paths is None else p in set(paths))]
    if not chosen:
        raise LoraTargetError("kernel_bits: no quantized kernel (or given path) in the params")
    bits = sum(
        x.nbytes * 8 if is_quantized(x) else np.size(x) * np.dtype(x.dtype).itemsize * 8
        for _, x in chosen
    )
    return float(bits / sum(int(np.size(x)) if not is_quantized(x) else x.size for _, x in chosen))
