"""Base params, quantized or not, in one safetensors file: quantize once, load many times.

Keys are '/'-joined leaf paths. A dense leaf ``P`` is the tensor ``P``; a
:class:`~lora_jax.QuantizedArray` at ``P`` is the tensors ``P.codes``,
``P.scales`` and, with double quantization, ``P.dq_scales`` and
``P.dq_offset``, stored as they are (bit-exact). The file's metadata holds
``lora_jax_base``: a JSON object with ``format_version`` and, per quantized
leaf, its logical ``shape``, ``dtype``, ``scheme``, ``block_size``,
``double_quant`` and ``axes``. The write is atomic (:mod:`lora_jax._files.atomic`).

:func:`load_base` checks every tensor against what the metadata implies
(:func:`lora_jax._quant.array.storage_shapes`) and raises
:class:`~lora_jax.LoraFileError` naming the file and key; given ``like`` (the
model's params, arrays or ``jax.ShapeDtypeStruct``), a leaf missing, extra,
or of another shape than the model's is a
:class:`~lora_jax.LoraBaseMismatchError` naming the leaf.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraBaseMismatchError, LoraFileError
from lora_jax._files.atomic import atomic_write
from lora_jax._files.safetensors_io import (
    dtype_name,
    nested_from_paths,
    open_safetensors,
    read_tensor,
    tensor_info,
    write_safetensors,
)
from lora_jax._paths import leaves_with_paths
from lora_jax._quant.array import QuantizedArray, is_quantized, storage_shapes
from lora_jax._quant.codebooks import SCHEMES

META_KEY = "lora_jax_base"
FORMAT_VERSION = 1
FIELDS = ("codes", "scales", "dq_scales", "dq_offset")


def save_base(path: str | os.PathLike, params: Any) -> Path:
    """Writes base params (dense and :class:`~lora_jax.QuantizedArray` leaves) to one file.

    Args:
      path: the safetensors file to write (replaced atomically).
      params: a params pytree, e.g. from :func:`~lora_jax.quantize`.

    Returns:
      The path written.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"fc": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}},
      ...                 ".*/kernel", double_quant=True)
      >>> path = lj.save_base(tempfile.mkdtemp() + "/base.safetensors", q)
      >>> back = lj.load_base(path)
      >>> back["fc"]["kernel"]
      QuantizedArray(nf4 + double quant, block 64, shape=(64, 8), dtype=float32, axes='io')
      >>> bool((back["fc"]["kernel"].codes == q["fc"]["kernel"].codes).all())
      True
    """
    path = Path(path)
    tensors: dict[str, Any] = {}
    quantized: dict[str, dict] = {}
    for leaf_path, leaf in leaves_with_paths(params)[0]:
        if not is_quantized(leaf):
            tensors[leaf_path] = np.asarray(leaf)
            continue
        quantized[leaf_path] = {
            "shape": list(leaf.shape),
            "dtype": dtype_name(leaf.dtype),
            "scheme": leaf.scheme,
            "block_size": leaf.block_size,
            "double_quant": leaf.dq_scales is not None,
            "axes": leaf.axes,
        }
        for name in FIELDS:
            if getattr(leaf, name) is not None:
                tensors[f"{leaf_path}.{name}"] = np.asarray(getattr(leaf, name))
    meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, "quantized": quantized})}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, meta))
    return path


def _header(path: Path, f: Any) -> dict[str, dict]:
    """The per-leaf quantization records of the file's metadata, each checked."""
    raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LoraFileError(f"{path}: metadata {META_KEY!r} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise LoraFileError(
            f"{path}: unknown {META_KEY} format_version "
            f"{doc.get('format_version') if isinstance(doc, dict) else doc!r}"
        )
    records = doc.get("quantized", {})
    if not isinstance(records, dict):
        raise LoraFileError(
            f"{path}: {META_KEY} 'quantized' must be an object of per-leaf "
            f"records, got {type(records).__name__}"
        )
    for leaf, rec in records.items():
        problem = _record_problem(rec)
        if problem:
            raise LoraFileError(
                f"{path}: quantization record of leaf {leaf!r} is invalid ({problem}): {rec!r}"[
                    :2000
                ]
            )
    return records


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _record_problem(rec: Any) -> str | None:
    """What is wrong with one leaf's quantization record, or None (every field the reader
    uses is checked here, so a damaged record is a LoraFileError, never a crash later)."""
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    scheme, shape, axes = rec.get("scheme"), rec.get("shape"), rec.get("axes")
    block, dq = rec.get("block_size"), rec.get("double_quant", False)
    if scheme not in SCHEMES:
        return f"scheme must be one of {list(SCHEMES)}"
    if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
        return "shape must be a non-empty list of positive ints"
    if not (
        isinstance(axes, str)
        and len(axes) == len(shape)
        and set(axes) <= set("seio")
        and any(c not in "se" for c in axes)
    ):
        return "axes must hold one of 's', 'e', 'i', 'o' per dimension, not only 's' / 'e'"
    try:
        name = rec.get("dtype")
        dtype = np.dtype(jnp.dtype(name)) if isinstance(name, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return "dtype must name a floating dtype"
    if not isinstance(dq, bool):
        return "double_quant must be true or false"
    layer = math.prod(d for d, c in zip(shape, axes) if c not in "se")
    if block is None:
        if scheme == "nf4" or dq:
            return "block_size null (per output channel) is for int4 / int8 without double_quant"
        if "o" not in axes:
            return "per-output-channel scales need an 'o' axis"
    elif not (_is_int(block) and block > 0 and layer % block == 0):
        return f"block_size must be a positive int dividing the {layer} weights of one layer"
    if scheme != "int8" and layer % 2:
        return f"{scheme} packs two codes per byte: one layer's {layer} weights must be even"
    return None


def _want(rec: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a quantization record implies: ``{field: (shape, dtype)}``."""
    return storage_shapes(
        tuple(int(d) for d in rec["shape"]),
        rec["scheme"],
        rec.get("block_size"),
        bool(rec.get("double_quant")),
        rec["axes"],
    )


def _read_quantized(path: Path, f: Any, info: dict, leaf: str, rec: dict) -> QuantizedArray:
    """One :class:`QuantizedArray` from its tensors, each checked against its record."""
    shape = tuple(int(d) for d in rec["shape"])
    arrays = {}
    for name, (w_shape, w_dtype) in _want(rec).items():
        key = f"{leaf}.{name}"
        if key not in info:
            raise LoraFileError(f"{path}: missing tensor {key!r} of quantized leaf {leaf!r}")
        got_shape, got_dtype = info[key][0], dtype_name(info[key][1])
        if (got_shape, got_dtype) != (w_shape, w_dtype):
            raise LoraFileError(
                f"{path}: tensor {key!r} has shape {got_shape} {got_dtype}; the leaf's record "
                f"({rec['scheme']}, shape {shape}) implies {w_shape} {w_dtype}"
            )
        arrays[name] = jnp.asarray(read_tensor(f, path, key))
    return QuantizedArray(
        arrays["codes"],
        arrays["scales"],
        arrays.get("dq_scales"),
        arrays.get("dq_offset"),
        shape=shape,
        dtype=np.dtype(jnp.dtype(rec["dtype"])),
        scheme=rec["scheme"],
        block_size=rec.get("block_size"),
        axes=rec["axes"],
    )


def load_base(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Reads base params written by :func:`save_base` (quantized leaves bit-exact).

    Args:
      path: the safetensors file.
      like: optional, the model's params (arrays or ``jax.ShapeDtypeStruct``):
        the result then has its tree structure (NNX states, linen dicts), and
        every leaf must be in the file with the model's shape.

    Returns:
      The params: nested dicts, or ``like``'s structure.

    Raises:
      LoraFileError: a missing, corrupt or inconsistent file (names file and key).
      LoraBaseMismatchError: with ``like``, a leaf missing, extra or of another
        shape (names the leaf).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"w": jnp.ones((64, 8))}, "w", scheme="int8")
      >>> path = lj.save_base(tempfile.mkdtemp() + "/base.safetensors", q)
      >>> try:
      ...     lj.load_base(path, like={"w": jax.ShapeDtypeStruct((8, 64), jnp.float32)})
      ... except lj.LoraBaseMismatchError as e:
      ...     print("mismatch:", "'w'" in str(e))
      mismatch: True
    """
    path = Path(path)
    with open_safetensors(path) as f:
        records = _header(path, f)
        info = tensor_info(f)
        leaves: dict[str, Any] = {
            leaf: _read_quantized(path, f, info, leaf, rec) for leaf, rec in records.items()
        }
        owned = {f"{leaf}.{n}" for leaf, rec in records.items() for n in _want(rec)}
        stray = [k for k in info if k not in owned and k.rsplit(".", 1)[0] in records]
        if stray:
            raise LoraFileError(
                f"{path}: tensors {stray[:4]} are not part of their quantized leaf's record"
            )
        for key in info:
            if key not in owned:
                leaves[key] = jnp.asarray(read_tensor(f, path, key))
    if like is None:
        return nested_from_paths(sorted(leaves.items()), where=str(path))
    return _shaped_like(path, leaves, like)


def _shaped_like(path: Path, leaves: dict[str, Any], like: Any) -> Any:
    model, treedef = leaves_with_paths(like)
    missing = [p for p, _ in model if p not in leaves]
    extra = sorted(set(leaves) - {p for p, _ in model})
    if missing or extra:
        raise LoraBaseMismatchError(
            f"{path}: the file's leaves do not match the model's: missing {missing[:5]}, "
            f"extra {extra[:5]}"
        )
    for p, leaf in model:
        want, got = tuple(np.shape(leaf)), tuple(leaves[p].shape)
        if want != got:
            raise LoraBaseMismatchError(
                f"{path}: leaf {p!r} has shape {got} in the file but {want} in the model"
            )
    return jax.tree_util.tree_unflatten(treedef, [leaves[p] for p, _ in model])
