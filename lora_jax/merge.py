"""Merging a delta into dense params, and taking it back out.

.. math::

   \\text{merge}(W, \\Delta) = \\operatorname{cast}_{W}(W + s A B), \\qquad
   \\text{unmerge}(W', \\Delta) = \\operatorname{cast}_{W}(W' - s A B)

with ``s A B`` computed in float32 and the sum cast back to the kernel's own
dtype. Both are pure and jit-able; leaves without factors pass through
untouched (the same array object outside ``jit``), so donating the params to a
jitted ``merge`` reuses their buffers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraStructureError
from lora_jax.factors import (
    LoraFactors,
    _to_kernel_axes,
    column_norm,
    dora_weight,
    LeafDelta,
    is_delta_leaf,
    is_factors,
    lora_update,
)
from lora_jax.paths import leaves_with_paths

Array = jax.Array


def align(params: Any, delta: Any) -> tuple[list[tuple[str, Any, LoraFactors | None]], Any]:
    """Pairs every leaf of ``params`` with its factors (or None).

    Args:
      params: a params pytree.
      delta: a delta with the same structure (``None`` or ``LoraFactors`` at
        each leaf).

    Returns:
      ``([(path, leaf, factors_or_None), ...], treedef_of_params)``.

    Raises:
      LoraStructureError: the delta's structure differs from the params', or
        a factor pair does not fit its kernel's shape; the message names the
        leaf.

    Example:
      >>> rows, _ = align({"w": jnp.ones((2, 2))}, {"w": None})
      >>> rows[0][0], rows[0][2]
      ('w', None)
    """
    leaves, treedef = leaves_with_paths(params)
    try:
        factors = treedef.flatten_up_to(delta)
    except (ValueError, TypeError) as e:
        raise LoraStructureError(_structure_message(params, delta, e)) from None
    rows = []
    for (path, leaf), f in zip(leaves, factors):
        if f is not None:
            _check_factors(path, leaf, f)
        rows.append((path, leaf, f))
    return rows, treedef


def _check_factors(path: str, leaf: Any, f: Any) -> None:
    if isinstance(f, LeafDelta):
        shape = tuple(getattr(leaf, "shape", ()))
        if tuple(jnp.shape(f.diff)) != shape:
            raise LoraStructureError(
                f"leaf {path!r}: the trained-in-full delta has shape {jnp.shape(f.diff)}, "
                f"the base leaf {shape}"
            )
        return
    if not is_factors(f):
        raise LoraStructureError(
            f"leaf {path!r}: the delta holds {type(f).__name__}, expected LoraFactors, "
            "LeafDelta or None"
        )
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) != f.layout.ndim:
        raise LoraStructureError(
            f"leaf {path!r}: the base kernel has shape {shape} but the delta's layout "
            f"{f.layout.axes!r} is for a {f.layout.ndim}-D kernel"
        )
    want = f.layout.factor_shapes(shape, f.rank)
    if f.layers is not None:  # only the selected layers of the first stacked axis are stored
        if not f.layout.stack_axes or f.num_layers != shape[f.layout.stack_axes[0]]:
            raise LoraStructureError(
                f"leaf {path!r}: factors for layers {f.layers} of {f.num_layers} do not fit a "
                f"kernel of shape {shape} (layout {f.layout.axes!r})"
            )
        want = tuple((len(f.layers),) + w[1:] for w in want)
    got = (tuple(jnp.shape(f.a)), tuple(jnp.shape(f.b)))
    if got != want:
        raise LoraStructureError(
            f"leaf {path!r}: factors A{got[0]} B{got[1]} do not fit the base kernel of shape "
            f"{shape} (layout {f.layout.axes!r}); expected A{want[0]} B{want[1]}"
        )


def _structure_message(params: Any, delta: Any, error: Exception) -> str:
    base_paths = [p for p, _ in leaves_with_paths(params)[0]]
    delta_paths = [p for p, _ in leaves_with_paths(delta, is_leaf=is_delta_leaf)[0]]
    unknown = [p for p in delta_paths if p not in set(base_paths)]
    if unknown:
        return (
            f"the delta has factors at {unknown[:5]}, which are not leaves of the base "
            f"(base leaves: {base_paths[:6]}...)"
        )
    entries = leaves_with_paths(delta, is_leaf=lambda x: x is None or is_delta_leaf(x))[0]
    missing = [p for p in base_paths if p not in {q for q, _ in entries}]
    if missing:
        return (
            f"the delta's tree structure does not match the base's: it has no entry "
            f"(LoraFactors or None) for the base leaves {missing[:5]}"
        )
    return f"the delta's tree structure does not match the base's: {error}"


def _map_targets(fn: Callable[[Array, LoraFactors], Array], params: Any, delta: Any) -> Any:
    rows, treedef = align(params, delta)
    out = [leaf if f is None else fn(leaf, f) for _, leaf, f in rows]
    return jax.tree_util.tree_unflatten(treedef, out)


def merge(params: Any, delta: Any) -> Any:
    """Returns dense params ``W + s A B`` with the base's structure, shapes and dtypes.

    DoRA factors (with a ``magnitude``) merge to ``m * (W + s A B) / ||W + s A B||_c``.

    Args:
      params: the base params pytree.
      delta: the delta from :func:`lora_jax.init_lora` (or trained).

    Returns:
      A pytree like ``params``: targeted kernels replaced by
      ``(W.astype(f32) + s * A @ B).astype(W.dtype)``, other leaves as given.

    Example:
      >>> from lora_jax import LoraConfig, init_lora
      >>> base, delta = init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         LoraConfig(targets="w", rank=2))
      >>> bool((merge(base, delta)["w"] == base["w"]).all())   # B = 0 at init
      True
    """

    def merge_one(w, f):
        if isinstance(f, LeafDelta):
            return (w.astype(jnp.float32) + f.diff).astype(w.dtype)
        dense = lora_update(f) + w.astype(jnp.float32) if f.magnitude is None else dora_weight(w, f)
        return dense.astype(w.dtype)

    return _map_targets(merge_one, params, delta)


def dora_norms(params: Any, delta: Any) -> Any:
    """``||W + s A B||_c`` at every DoRA leaf (None elsewhere): what :func:`unmerge` needs.

    Merging DoRA folds ``m / ||W + s A B||_c`` into the weight, and the norm
    cannot be recovered from the merged weight alone; compute it from the base
    before merging (PEFT caches it for the same reason).

    Returns:
      A pytree like ``params`` with ``(*stack, *fan_out)`` float32 norms.
    """
    rows, treedef = align(params, delta)
    out = [None if not is_factors(f) or f.magnitude is None else
           column_norm(w.astype(jnp.float32) + lora_update(f), f.layout) for _, w, f in rows]
    return jax.tree_util.tree_unflatten(treedef, out)


def unmerge(params: Any, delta: Any, norms: Any = None) -> Any:
    """Inverse of :func:`merge`: ``W' - s A B`` cast to the kernel's dtype.

    ``unmerge(merge(p, d), d)`` equals ``p`` up to the rounding of the kernel's
    dtype (exactly when ``s A B`` is representable next to ``W``). For DoRA
    leaves, ``W = W' * ||W + s A B||_c / m - s A B`` needs ``norms`` from
    :func:`dora_norms` taken before merging.

    Example:
      >>> from lora_jax import LoraConfig, init_lora
      >>> p = {"w": jnp.ones((4, 4))}
      >>> _, d = init_lora(jax.random.key(0), p, LoraConfig(targets="w", rank=2, init="swapped"))
      >>> d = jax.tree.map(lambda x: x + 0.1, d)   # a trained delta
      >>> bool(jnp.allclose(unmerge(merge(p, d), d)["w"], p["w"], atol=1e-6))
      True
    """
    rows, treedef = align(params, delta)
    norm_leaves = ([None] * len(rows) if norms is None
                   else treedef.flatten_up_to(norms))
    out = []
    for (path, w, f), n in zip(rows, norm_leaves):
        if f is None:
            out.append(w)
            continue
        dense = w.astype(jnp.float32)
        if isinstance(f, LeafDelta):
            out.append((dense - f.diff).astype(w.dtype))
            continue
        if f.magnitude is not None:
            if n is None:
                raise LoraStructureError(
                    f"leaf {path!r} is a DoRA kernel: unmerge needs its column norms "
                    "||W + s A B||, which the merged weight no longer holds; pass "
                    "norms=dora_norms(base, delta) computed before merging"
                )
            magnitude = f.expanded().magnitude
            dense = dense * _to_kernel_axes(jnp.asarray(n, jnp.float32) /
                                            jnp.asarray(magnitude, jnp.float32), f.layout)
        out.append((dense - lora_update(f)).astype(w.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
