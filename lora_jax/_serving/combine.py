"""Exact combinations of adapters, and rank truncation by SVD.

:func:`combine` builds one adapter whose update is exactly the weighted sum of
the given adapters' updates,

.. math::

   \\Delta W = \\sum_i w_i \\, s_i A_i B_i
            = [A_1, \\dots, A_n] \\, [w_1 s_1 B_1; \\dots; w_n s_n B_n],

by concatenating ranks (the scales and weights folded into ``B``, the new
scale 1). PEFT's ``linear`` combination instead forms
``(\\sum_i \\sqrt{w_i} A_i)(\\sum_i \\sqrt{w_i} B_i)``-style sums of ``A`` and
``B`` separately, which adds the cross terms ``A_i B_j`` (``i != j``): it is
not this sum. :func:`truncate_rank` brings a delta to a chosen rank by the
best rank-``k`` approximation of each kernel's update (Eckart-Young), computed
from the factors alone (two thin QRs and an SVD of an ``R x R`` core, never
the dense update), and reports the fraction of ``||Delta W||_F^2`` it drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LeafDelta, LoraFactors, delta_entries
from lora_jax._errors import LoraArgumentError, LoraStructureError
from lora_jax._serving.stack import check_same_kernel, delta_columns

Array = jax.Array
HI = jax.lax.Precision.HIGHEST


def combine(deltas: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """One delta whose update is exactly ``sum_i w_i * s_i * A_i @ B_i``.

    At each kernel, ``A = concat_i A_i`` and ``B = concat_i (w_i s_i B_i)``
    along the rank axis (rank ``sum_i r_i`` over the adapters that adapt the
    kernel), with ``alpha = rank`` so the combined scale is 1. Leaves trained
    in full (:class:`~lora_jax.LeafDelta`) combine as ``sum_i w_i diff_i``,
    also exactly.

    Args:
      deltas: deltas of one base (same tree structure).
      weights: one float per delta (default all 1).

    Returns:
      A delta of the same base; ``merge(base, combine(ds, w))`` equals
      ``base + sum_i w_i (merge(base, d_i) - base)`` up to float rounding.

    Raises:
      LoraArgumentError: no deltas, or a weight count that differs.
      LoraStructureError: different structures or kernel shapes at a leaf,
        LoRA factors and a LeafDelta at one leaf, or DoRA factors (whose
        update is not additive); the message names the leaf.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> p = {"w": jnp.zeros((4, 3))}
      >>> ds = [lj.init_lora(jax.random.key(i), p, lj.LoraConfig(targets="w", rank=2))[1]
      ...       for i in range(2)]
      >>> ds = [jax.tree.map(lambda x: x + 1.0, d) for d in ds]
      >>> c = lj.combine(ds, [0.5, 2.0])
      >>> c["w"].rank, bool(jnp.allclose(lj.merge(p, c)["w"],
      ...     0.5 * lj.merge(p, ds[0])["w"] + 2.0 * lj.merge(p, ds[1])["w"]))
      (4, True)
    """
    deltas = list(deltas)
    if not deltas:
        raise LoraArgumentError("combine needs at least one delta")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise LoraArgumentError(f"{len(weights)} weights for {len(deltas)} deltas")
    columns, treedef = delta_columns(deltas, "combine")
    out: list[Any] = []
    for path, column in columns:
        present = [(w, f) for w, f in zip(weights, column) if f is not None]
        if not present:
            out.append(None)
        elif all(isinstance(f, LeafDelta) for _, f in present):
            out.append(LeafDelta(sum(w * jnp.asarray(f.diff) for w, f in present)))
        else:
            out.append(_concat(path, present))
    return jax.tree_util.tree_unflatten(treedef, out)


def _concat(path: str, present: list[tuple[float, Any]]) -> LoraFactors:
    fs = []
    for _, f in present:
        if isinstance(f, LeafDelta):
            raise LoraStructureError(
                f"leaf {path!r}: LoRA factors in one delta and a trained-in-full leaf in another "
                "cannot be combined"
            )
        if not isinstance(f, LoraFactors):
            raise LoraStructureError(
                f"leaf {path!r}: combine takes plain deltas, got {type(f).__name__} (take a "
                "stack's slot with lora_jax.advanced.unstack)"
            )
        if f.magnitude is not None:
            raise LoraStructureError(
                f"leaf {path!r} has DoRA factors: DoRA's column norm makes the update "
                "non-additive, so no exact sum exists as a LoRA adapter"
            )
        fs.append(f.all_layers())
    f0 = fs[0]
    for f in fs[1:]:  # dtypes may differ: the sum takes their result type
        check_same_kernel(path, f, "one delta", f0, "another", dtypes=False)
    ns = len(f0.layout.stack_axes)
    dtype = jnp.result_type(*[jnp.asarray(f.a) for f in fs])
    a = jnp.concatenate([jnp.asarray(f.a, dtype) for f in fs], axis=-1)
    b = jnp.concatenate(
        [
            (jnp.asarray(f.b, jnp.float32) * (w * f.scale)).astype(dtype)
            for (w, _), f in zip(present, fs)
        ],
        axis=ns,
    )
    return LoraFactors(a, b, alpha=float(a.shape[-1]), layout=f0.layout)


def truncate_rank(delta: Any, rank: int) -> tuple[Any, dict[str, Array]]:
    """Each kernel's update cut to its best rank-``rank`` approximation, and the energy dropped.

    Per stacked kernel, with ``s A B = Q_a (s R_a R_b^T) Q_b^T`` (thin QRs of
    ``A`` and ``B^T``) and ``U S V^T`` the SVD of the ``R x R`` core, the new
    factors are ``A' = Q_a U_k S_k^{1/2}``, ``B' = S_k^{1/2} V_k^T Q_b^T``
    (scale 1): by Eckart-Young the closest rank-``k`` update in Frobenius
    norm. Kernels of rank ``<= rank`` are kept as they are (nothing dropped).

    Args:
      delta: a delta (e.g. from :func:`~lora_jax.combine`).
      rank: the target rank ``k >= 1``.

    Returns:
      ``(delta, dropped)``: ``dropped[path]`` is ``sum_{j>k} S_j^2 / sum_j
      S_j^2``, the fraction of ``||Delta W||_F^2`` lost, float32 (per stacked
      layer for stacked kernels, shape ``(*stack,)``); kernels already of
      rank ``<= rank`` (and leaves trained in full) are kept and have no entry.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.eye(4)[:, :2], jnp.array([[3.0, 0.0], [0.0, 1.0]]),
      ...                    alpha=2.0, layout=lj.KernelLayout("io"))
      >>> d, dropped = lj.truncate_rank({"w": f}, 1)
      >>> d["w"].rank, round(float(dropped["w"]), 3)       # 1 of 9 + 1 dropped
      (1, 0.1)
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise LoraArgumentError(f"rank must be a positive int, got {rank!r}")
    leaves, treedef = jax.tree_util.tree_flatten(
        delta, is_leaf=lambda x: x is None or isinstance(x, (LoraFactors, LeafDelta))
    )
    dropped: dict[str, Array] = {}
    out: list[Any] = []
    for (path, f), leaf in zip(delta_entries(delta), leaves):
        if not isinstance(f, LoraFactors) or f.rank <= rank:
            out.append(leaf)
            continue
        if f.magnitude is not None:
            raise LoraStructureError(
                f"leaf {path!r} has DoRA factors; truncating their rank would change the "
                "norm the magnitude divides by"
            )
        new, dropped[path] = _truncate(f.all_layers(), rank)
        out.append(new)
    return jax.tree_util.tree_unflatten(treedef, out), dropped


def _truncate(f: LoraFactors, k: int) -> tuple[LoraFactors, Array]:
    ns = len(f.layout.stack_axes)
    a = jnp.asarray(f.a, jnp.float32)
    b = jnp.asarray(f.b, jnp.float32)
    stack, fan_in, fan_out, r = a.shape[:ns], a.shape[ns:-1], b.shape[ns + 1 :], a.shape[-1]
    a2 = a.reshape(stack + (-1, r))
    bt = jnp.swapaxes(b.reshape(stack + (r, -1)), -1, -2)
    qa, ra = jnp.linalg.qr(a2)
    qb, rb = jnp.linalg.qr(bt)
    core = jnp.matmul(ra, jnp.swapaxes(rb, -1, -2), precision=HI) * f.scale
    u, sv, vt = jnp.linalg.svd(core)
    root = jnp.sqrt(sv[..., :k])
    new_a = jnp.matmul(qa, u[..., :k], precision=HI) * root[..., None, :]
    new_b = root[..., :, None] * jnp.matmul(vt[..., :k, :], jnp.swapaxes(qb, -1, -2), precision=HI)
    energy = jnp.sum(sv * sv, axis=-1)
    dropped = jnp.where(
        energy > 0, jnp.sum(sv[..., k:] ** 2, axis=-1) / jnp.where(energy > 0, energy, 1.0), 0.0
    )
    dtype = jnp.asarray(f.a).dtype
    return (
        LoraFactors(
            new_a.reshape(stack + fan_in + (k,)).astype(dtype),
            new_b.reshape(stack + (k,) + fan_out).astype(dtype),
            alpha=float(k),
            layout=f.layout,
        ),
        dropped,
    )
