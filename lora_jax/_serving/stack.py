"""Adapter stacks: many LoRA deltas over one base, with a leading adapter (slot) axis.

A stack is a delta-shaped tree holding a :class:`StackedFactors` at each
kernel that any of its adapters adapts (``None`` elsewhere). For a kernel laid
out as ``(*stack, *fan_in, *fan_out)`` and ``N`` slots of rank ``R``:

.. math::

   \\Delta W_n = s_n \\, A_n B_n, \\qquad
   A: (N, *stack, *fan_in, R), \\; B: (N, *stack, R, *fan_out), \\; s: (N,)

An adapter of rank ``r < R`` is zero-padded (``A_n[..., r:] = 0`` and
``B_n[..., r:, ...] = 0``), so ``A_n B_n`` is exactly its own product; a slot
whose adapter does not adapt a kernel holds zeros there (and ``s_n = 0``).
The scale ``s_n`` is data (an array), never a static field, so loading an
adapter of another rank or alpha into a slot (:func:`set_adapter`) changes
only array values: a jitted serving function is not recompiled.

Stacks hold LoRA factors only: a :class:`~lora_jax.LeafDelta` (a leaf trained
in full) or DoRA factors (whose magnitude makes the update non-additive) are
rejected with :class:`~lora_jax.LoraStructureError` naming the leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import (
    DeltaEntry,
    LeafDelta,
    LoraFactors,
    ValueDelta,
    is_delta_leaf,
    kernel_shape_of,
)
from lora_jax._errors import LoraArgumentError, LoraStructureError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StackedFactors(DeltaEntry):
    """The factors of ``N`` adapters of one kernel, padded to a common rank ``R``.

    Attributes:
      a: ``(N, *stack, *fan_in, R)``.
      b: ``(N, *stack, R, *fan_out)``.
      scale: ``(N,)`` float32 array: each slot's LoRA scale ``s_n`` (0 for an
        empty slot). Data, not metadata: swapping adapters never recompiles.
      layout: the kernel's :class:`~lora_jax.KernelLayout` (static).

    Slot ``n`` stands for the update ``s_n * A_n @ B_n``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=4.0,
      ...                    layout=lj.KernelLayout("io"))
      >>> s = lj.stack_adapters([{"w": f}, {"w": None}])["w"]
      >>> s.slots, s.rank, s.kernel_shape, s.scale.tolist()
      (2, 2, (4, 3), [2.0, 0.0])
    """

    a: Any
    b: Any
    scale: Any
    _: dataclasses.KW_ONLY
    layout: KernelLayout

    #: only ``implicit(..., adapter_ids=)`` serves a stack; ``merge`` and the files refuse it
    serving_only: ClassVar[bool] = True

    @property
    def slots(self) -> int:
        """The number of adapter slots ``N``."""
        return int(np.shape(self.a)[0])

    @property
    def rank(self) -> int:
        """The common (padded) rank ``R``."""
        return int(np.shape(self.a)[-1])

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel every slot adapts."""
        return kernel_shape_of(np.shape(self.a)[1:], np.shape(self.b)[1:], self.layout)

    def replace(self, **changes: Any) -> StackedFactors:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """Every slot must adapt a kernel of ``shape``."""
        if self.kernel_shape != shape:
            raise LoraStructureError(
                f"leaf {path!r}: the adapter stack adapts a kernel of shape "
                f"{self.kernel_shape}, the base kernel has shape {shape}"
            )

    def factors(self, slot: int) -> LoraFactors:
        """Slot ``slot`` as plain :class:`~lora_jax.LoraFactors` (scale folded into ``b``,
        ``alpha = R`` so the factors' own scale is 1): ``merge`` it to serve one adapter."""
        b = jnp.asarray(self.b[slot])
        b = (b.astype(jnp.float32) * jnp.asarray(self.scale[slot], jnp.float32)).astype(b.dtype)
        return LoraFactors(self.a[slot], b, alpha=float(self.rank), layout=self.layout)


jax.tree_util.register_dataclass(
    StackedFactors, data_fields=["a", "b", "scale"], meta_fields=["layout"]
)


def is_stacked(x: Any) -> bool:
    """True for a :class:`StackedFactors` node.

    Example:
      >>> is_stacked(None)
      False
    """
    return isinstance(x, StackedFactors)


def _entries(tree: Any, what: str) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, entry), ...], treedef)`` of a delta or a stack, entries checked."""
    leaf = lambda x: x is None or is_delta_leaf(x) or is_stacked(x)  # noqa: E731
    entries, treedef = leaves_with_paths(tree, is_leaf=leaf)
    for path, e in entries:
        if e is not None and not (is_delta_leaf(e) or is_stacked(e)):
            raise LoraStructureError(
                f"leaf {path!r} of {what}: expected LoraFactors or None, got {type(e).__name__} "
                "(pass deltas, not params)"
            )
    return entries, treedef


def delta_columns(deltas: Sequence[Any], verb: str) -> tuple[list[tuple[str, list[Any]]], Any]:
    """``([(path, [the entry of each delta at path]), ...], treedef)`` of deltas of one base.

    Raises:
      LoraStructureError: an entry that is not LoraFactors, LeafDelta, a stack
        or None, or a delta whose tree structure differs from the first's.

    Example:
      >>> delta_columns([{"w": None}, {"w": None}], "stack")[0]
      [('w', [None, None])]
    """
    flat = [_entries(d, f"delta {i}") for i, d in enumerate(deltas)]
    treedef = flat[0][1]
    for i, (_, td) in enumerate(flat[1:], 1):
        if td != treedef:
            raise LoraStructureError(
                f"delta {i} has a different tree structure from delta 0 ({verb} deltas of one base)"
            )
    paths = [p for p, _ in flat[0][0]]
    return [(p, [entries[k][1] for entries, _ in flat]) for k, p in enumerate(paths)], treedef


def check_same_kernel(
    path: str, f: Any, which: str, ref: Any, ref_which: str, dtypes: bool = True
) -> None:
    """Raises :class:`LoraStructureError` unless factors ``f`` adapt the kernel ``ref``
    adapts (same shape and layout axes) and, with ``dtypes``, have its factor dtypes.

    ``f`` and ``ref`` are :class:`~lora_jax.LoraFactors` or :class:`StackedFactors`;
    ``which`` and ``ref_which`` name them in the message.
    """
    if f.kernel_shape != ref.kernel_shape or f.layout.axes != ref.layout.axes:
        raise LoraStructureError(
            f"leaf {path!r}: {which} adapts a kernel of shape {f.kernel_shape} (layout "
            f"{f.layout.axes!r}), {ref_which} one of shape {ref.kernel_shape} (layout "
            f"{ref.layout.axes!r}); one leaf needs one kernel shape"
        )
    for name in ("a", "b") if dtypes else ():
        got, want = jnp.result_type(getattr(f, name)), jnp.result_type(getattr(ref, name))
        if got != want:
            raise LoraStructureError(
                f"leaf {path!r}: factor {name} of {which} is {got}, of {ref_which} {want}; "
                "cast the factors to one dtype first"
            )


def _check_plain(path: str, f: Any, which: str) -> None:
    if isinstance(f, LeafDelta):
        raise LoraStructureError(
            f"leaf {path!r} of {which} is trained in full (a LeafDelta); an adapter stack holds "
            "LoRA factors only: merge that leaf into the base, or serve this adapter alone"
        )
    if isinstance(f, ValueDelta):
        raise LoraStructureError(
            f"leaf {path!r} of {which} holds a {type(f).__name__} (PEFT's lora_bias or trainable "
            "tokens); an adapter stack holds LoRA factors only: serve this adapter merged or alone"
        )
    if is_stacked(f):
        raise LoraStructureError(f"leaf {path!r} of {which} is already a stack")
    if f.magnitude is not None:
        raise LoraStructureError(
            f"leaf {path!r} of {which} has DoRA factors; DoRA's column norm makes its update "
            "non-additive, so it cannot share a stack with per-example scales: serve it merged"
        )


def _padded(path: str, f: LoraFactors, rank: int, which: str) -> tuple[Array, Array]:
    """``f``'s factors (every layer) with the rank axis zero-padded to ``rank``."""
    f = f.all_layers()
    if f.rank > rank:
        raise LoraStructureError(
            f"leaf {path!r} of {which} has rank {f.rank}, more than the stack's rank {rank}"
        )
    ns = len(f.layout.stack_axes)
    a = jnp.asarray(f.a)
    b = jnp.asarray(f.b)
    pad_a = [(0, 0)] * (a.ndim - 1) + [(0, rank - f.rank)]
    pad_b = [(0, 0)] * b.ndim
    pad_b[ns] = (0, rank - f.rank)
    return jnp.pad(a, pad_a), jnp.pad(b, pad_b)


def stack_adapters(deltas: Sequence[Any], slots: int | None = None, rank: int | None = None) -> Any:
    """Stacks ``N`` deltas of one base into one tree of :class:`StackedFactors`.

    Slot ``n`` holds ``deltas[n]``; slots past ``len(deltas)`` are empty (zero
    factors, scale 0). Each kernel's factors are zero-padded to the stack's
    rank, so every slot's product ``s_n A_n B_n`` is exactly its adapter's
    update; a delta without factors at a kernel another one adapts contributes
    zeros there.

    Args:
      deltas: deltas of the same base (same tree structure); each kernel's
        factors in every delta must have the same kernel shape, layout axes and
        dtypes.
      slots: the number of slots ``N`` (default ``len(deltas)``); fixed for the
        stack's lifetime (it is an array shape).
      rank: the common rank ``R`` (default: the largest rank of any kernel in
        any delta); larger ranks leave room for adapters loaded later.

    Returns:
      A tree like the deltas with a :class:`StackedFactors`
      ``a: (N, *stack, *fan_in, R)``, ``b: (N, *stack, R, *fan_out)``,
      ``scale: (N,)`` at each kernel any delta adapts, ``None`` elsewhere.

    Raises:
      LoraStructureError: different tree structures, kernel shapes, layouts or
        dtypes at one leaf, a :class:`~lora_jax.LeafDelta` or DoRA factors (the
        message names the leaf and the adapter).
      LoraArgumentError: no deltas, ``slots < len(deltas)``, or ``rank`` below
        an adapter's rank.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> cfg = lambda r: lj.LoraConfig(targets="w", rank=r, alpha=8.0)
      >>> _, d1 = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))}, cfg(2))
      >>> _, d2 = lj.init_lora(jax.random.key(1), {"w": jnp.ones((6, 5))}, cfg(4))
      >>> s = lj.stack_adapters([d1, d2], slots=3)["w"]
      >>> s.a.shape, s.b.shape, s.scale.tolist()
      ((3, 6, 4), (3, 4, 5), [4.0, 2.0, 0.0])
    """
    deltas = list(deltas)
    if not deltas:
        raise LoraArgumentError("stack_adapters needs at least one delta")
    n = len(deltas) if slots is None else slots
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < len(deltas):
        raise LoraArgumentError(
            f"slots must be an int >= the number of deltas ({len(deltas)}), got {slots!r}"
        )
    columns, treedef = delta_columns(deltas, "stack")
    out: list[Any] = []
    for path, column in columns:
        present = [(i, f) for i, f in enumerate(column) if f is not None]
        if not present:
            out.append(None)
            continue
        for i, f in present:
            _check_plain(path, f, f"delta {i}")
        i0, f0 = present[0]
        for i, f in present[1:]:
            check_same_kernel(path, f, f"delta {i}", f0, f"delta {i0}")
        r = max(f.rank for _, f in present) if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise LoraArgumentError(f"rank must be a positive int, got {rank!r}")
        pairs = {i: _padded(path, f, int(r), f"delta {i}") for i, f in present}
        a0, b0 = pairs[i0]
        a = jnp.stack([pairs[i][0] if i in pairs else jnp.zeros_like(a0) for i in range(n)])
        b = jnp.stack([pairs[i][1] if i in pairs else jnp.zeros_like(b0) for i in range(n)])
        scale = jnp.asarray(
            [
                column[i].scale if i < len(column) and column[i] is not None else 0.0
                for i in range(n)
            ],
            jnp.float32,
        )
        out.append(StackedFactors(a, b, scale, layout=f0.layout))
    return jax.tree_util.tree_unflatten(treedef, out)


def set_adapter(stack: Any, slot: Any, delta: Any) -> Any:
    """The stack with slot ``slot`` holding ``delta`` (pure: ``.at[slot].set`` per array).

    Only array values change (factors zero-padded to the stack's rank, the
    scale written into ``scale[slot]``), so a jitted function taking the
    stack as an argument runs the new adapter without recompiling. An adapter
    of smaller rank than the stack fits; kernels ``delta`` does not adapt are
    zeroed in that slot.

    Args:
      stack: a tree from :func:`stack_adapters`.
      slot: an int in ``[0, N)`` (or an int array, e.g. under ``jit``).
      delta: a delta of the same base, adapting only kernels the stack has.

    Returns:
      The new stack; ``stack`` is unchanged.

    Raises:
      LoraStructureError: the delta adapts a kernel the stack has no slot
        arrays for, another kernel shape, rank above the stack's, another
        dtype, a LeafDelta or DoRA factors (naming the leaf).
      LoraArgumentError: a Python int ``slot`` outside ``[0, N)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> cfg = lambda r: lj.LoraConfig(targets="w", rank=r, alpha=8.0)
      >>> _, d4 = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))}, cfg(4))
      >>> _, d2 = lj.init_lora(jax.random.key(1), {"w": jnp.ones((6, 5))}, cfg(2))
      >>> s = lj.set_adapter(lj.stack_adapters([d4, d4]), 1, d2)
      >>> s["w"].scale.tolist(), bool((s["w"].a[1, :, 2:] == 0).all())
      ([2.0, 4.0], True)
    """
    s_entries, treedef = _entries(stack, "the stack")
    try:
        d_entries = treedef.flatten_up_to(delta)
    except (ValueError, TypeError):
        raise LoraStructureError(
            "the delta's tree structure differs from the stack's (use a delta of the stack's base)"
        ) from None
    n = next((s.slots for _, s in s_entries if s is not None), 0)
    if isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) and not 0 <= slot < n:
        raise LoraArgumentError(f"slot {slot} is outside the stack's {n} slots")
    out: list[Any] = []
    for (path, s), f in zip(s_entries, d_entries):
        if s is None:
            if f is not None:
                raise LoraStructureError(
                    f"leaf {path!r}: the delta adapts it but the stack has no slots there "
                    "(a stack's kernels are fixed: stack_adapters with this adapter among them)"
                )
            out.append(None)
            continue
        if not is_stacked(s):
            raise LoraStructureError(
                f"leaf {path!r} of the stack holds {type(s).__name__}, expected StackedFactors"
            )
        if f is None:
            out.append(
                s.replace(
                    a=s.a.at[slot].set(0), b=s.b.at[slot].set(0), scale=s.scale.at[slot].set(0.0)
                )
            )
            continue
        _check_plain(path, f, "the delta")
        check_same_kernel(path, f, "the delta", s, "the stack")
        a, b = _padded(path, f, s.rank, "the delta")
        out.append(
            s.replace(
                a=s.a.at[slot].set(a),
                b=s.b.at[slot].set(b),
                scale=s.scale.at[slot].set(jnp.float32(f.scale)),
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def unstack(stack: Any, slot: int) -> Any:
    """Slot ``slot`` of a stack as a plain delta (``merge`` it to serve that adapter alone).

    Each kernel's factors keep the stack's rank (zero-padded) with the scale
    folded into ``b`` and ``alpha = R``, so ``merge(base, unstack(s, n))``
    equals merging adapter ``n`` itself.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2))
      >>> lj.advanced.unstack(lj.stack_adapters([d]), 0)["w"].scale
      1.0
    """
    entries, treedef = _entries(stack, "the stack")
    return jax.tree_util.tree_unflatten(
        treedef, [None if s is None else s.factors(slot) for _, s in entries]
    )


def stack_slots(stack: Any) -> int:
    """The number of slots of a stack; every stacked kernel must agree.

    Example:
      >>> stack_slots({"w": None})
      0
    """
    entries, _ = _entries(stack, "the stack")
    sizes = {path: s.slots for path, s in entries if is_stacked(s)}
    if len(set(sizes.values())) > 1:
        raise LoraStructureError(f"the stack's kernels have different slot counts: {sizes}")
    return next(iter(sizes.values()), 0)
