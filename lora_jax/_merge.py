"""Merging a delta into dense params, and taking it back out.

.. math::

   \\text{merge}(W, \\Delta) = \\operatorname{cast}_{W}(W + s A B), \\qquad
   \\text{unmerge}(W', \\Delta) = \\operatorname{cast}_{W}(W' - s A B)

with ``s A B`` computed in float32 and the sum cast back to the kernel's own
dtype. A quantized kernel (:class:`~lora_jax.QuantizedArray`) is dequantized
first (``W = table[code] · absmax`` in float32), and every quantized leaf of the
result is dense, in ``dtype`` or its logical dtype. Both are pure and jit-able; leaves without a delta pass through
untouched (the same array object outside ``jit``), so donating the params to a
jitted ``merge`` reuses their buffers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._delta import (
    LeafDelta,
    ValueDelta,
    align,
    column_norm,
    dense_delta,
    dora_weight,
    is_factors,
    map_entries,
    to_kernel_axes,
)
from lora_jax._errors import LoraStructureError
from lora_jax._quant.array import dequantize_leaf, is_quantized
from lora_jax._quant.trees import dequantize


def merge(params: Any, delta: Any, *, dtype: Any = None) -> Any:
    """Returns dense params ``W + s A B`` with the base's structure, shapes and dtypes.

    DoRA factors (with a ``magnitude``) merge to ``m * (W + s A B) / ||W + s A B||_c``;
    a :class:`~lora_jax.LeafDelta` merges to ``W + diff``, a
    :class:`~lora_jax.LoraBias` (at a bias leaf) to ``c + s b``, and
    :class:`~lora_jax.TokenRows` (at an embedding) to ``W.at[indices].add(diff)``. A quantized base kernel
    merges to ``dequantize(W) + s A B`` (in float32, then cast), and quantized
    leaves without a delta are dequantized: the result holds no
    :class:`~lora_jax.QuantizedArray` (re-quantizing is the explicit
    :func:`~lora_jax.requantize`).

    Args:
      params: the base params pytree (dense or with quantized kernels).
      delta: the delta from :func:`lora_jax.init_lora` (or trained).
      dtype: the dtype of every leaf that was quantized (default: its logical
        dtype); dense leaves keep their own.

    Returns:
      A pytree like ``params``: targeted kernels replaced by
      ``(W.astype(f32) + s * A @ B).astype(W.dtype)``, other leaves as given.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                            lj.LoraConfig(targets="w", rank=2))
      >>> bool((lj.merge(base, delta)["w"] == base["w"]).all())   # B = 0 at init
      True
      >>> qbase = lj.quantize(base, "w", scheme="int8")
      >>> lj.merge(qbase, delta, dtype=jnp.bfloat16)["w"].dtype
      dtype(bfloat16)
    """

    def merge_one(path, w, f):
        if not is_quantized(w):
            if f is None:
                return w
            out_dtype = w.dtype
        else:
            out_dtype = dtype or w.dtype
            if f is None:
                return dequantize_leaf(w, out_dtype)
            w = dequantize_leaf(w, jnp.float32)
        if isinstance(f, LeafDelta):
            return (w.astype(jnp.float32) + f.diff).astype(out_dtype)
        if isinstance(f, ValueDelta):  # a LoRA bias, trainable token rows
            return f.apply(w).astype(out_dtype)
        dense = dense_delta(f) + w.astype(jnp.float32) if f.magnitude is None else dora_weight(w, f)
        return dense.astype(out_dtype)

    return map_entries(merge_one, params, delta, skip=lambda entry: False)


def dora_norms(params: Any, delta: Any) -> Any:
    """``||W + s A B||_c`` at every DoRA leaf (None elsewhere): what :func:`unmerge` needs.

    Merging DoRA folds ``m / ||W + s A B||_c`` into the weight, and the norm
    cannot be recovered from the merged weight alone; compute it from the base
    before merging (PEFT caches it for the same reason).

    Returns:
      A pytree like ``params`` with ``(*stack, *fan_out)`` float32 norms.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 3))},
      ...                            lj.LoraConfig(targets="w", rank=2, use_dora=True))
      >>> lj.dora_norms(base, delta)["w"]
      Array([2., 2., 2.], dtype=float32)
    """
    rows, treedef = align(params, delta)
    out = [
        column_norm(dequantize(w, jnp.float32), f.layout, f) if _is_dora(f) else None
        for _, w, f in rows
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_dora(f: Any) -> bool:
    return is_factors(f) and f.magnitude is not None


def unmerge(params: Any, delta: Any, norms: Any = None) -> Any:
    """Inverse of :func:`merge`: ``W' - s A B`` cast to the kernel's dtype.

    ``unmerge(merge(p, d), d)`` equals ``p`` up to the rounding of the kernel's
    dtype (exactly when ``s A B`` is representable next to ``W``). For DoRA
    leaves, ``W = W' * ||W + s A B||_c / m - s A B`` needs ``norms`` from
    :func:`dora_norms` taken before merging.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> p = {"w": jnp.ones((4, 4))}
      >>> _, d = lj.init_lora(jax.random.key(0), p,
      ...                     lj.LoraConfig(targets="w", rank=2, init="swapped"))
      >>> d = jax.tree.map(lambda x: x + 0.1, d)   # a trained delta
      >>> bool(jnp.allclose(lj.unmerge(lj.merge(p, d), d)["w"], p["w"], atol=1e-6))
      True
    """
    rows, treedef = align(dequantize(params), delta)
    norm_leaves = [None] * len(rows) if norms is None else treedef.flatten_up_to(norms)
    out = []
    for (path, w, f), n in zip(rows, norm_leaves):
        if f is None:
            out.append(w)
            continue
        dense = w.astype(jnp.float32)
        if isinstance(f, LeafDelta):
            out.append((dense - f.diff).astype(w.dtype))
            continue
        if isinstance(f, ValueDelta):
            out.append(f.remove(dense).astype(w.dtype))
            continue
        if f.magnitude is not None:
            if n is None:
                raise LoraStructureError(
                    f"leaf {path!r} is a DoRA kernel: unmerge needs its column norms "
                    "||W + s A B||, which the merged weight no longer holds; pass "
                    "norms=dora_norms(base, delta) computed before merging"
                )
            dense = dense * to_kernel_axes(
                jnp.asarray(n, jnp.float32) / jnp.asarray(f.magnitude, jnp.float32), f.layout
            )
        out.append((dense - dense_delta(f)).astype(w.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
