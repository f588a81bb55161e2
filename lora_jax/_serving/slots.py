"""Adapter slots: the pure pieces of the adapter cache (:mod:`lora_jax._serving.cache`).

A slot is one index of a stack's slot axis (:class:`~lora_jax.StackedFactors`).
:func:`slot_specs` reads the slots' shapes off a delta and a rank,
:func:`slot_arrays` checks a delta against them and zero-pads it on the host
(the padded columns of ``A`` and rows of ``B`` are zeros, so the slot's
``s * A @ B`` is exactly the adapter's own product), :func:`pack_slot` /
:func:`unpack_slot` lay one slot out as one flat buffer per dtype (one
host-to-device copy instead of three per kernel), and :func:`write_slot`
writes one slot of a stack. All are pure; the cache composes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._delta import LeafDelta, is_delta_leaf
from lora_jax._errors import LoraStructureError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths
from lora_jax._serving.stack import StackedFactors, check_same_kernel, is_stacked

#: one slot of one kernel: ``(a, b, scale)`` without the slot axis, padded to the slot rank
SlotKernel = tuple[np.ndarray, np.ndarray, np.float32]


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """The shapes of one kernel's slot in a cache's stack.

    Attributes:
      path: the kernel's leaf path.
      layout: its :class:`~lora_jax.KernelLayout`.
      a_shape: ``(*stack, *fan_in, R)`` (no slot axis).
      b_shape: ``(*stack, R, *fan_out)``.
      dtype: the factors' dtype (``a`` and ``b``).
    """

    path: str
    layout: KernelLayout
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: Any


def is_entry(x: Any) -> bool:
    """True for what a delta or a stack holds at a leaf (None, factors, a stack).

    Example:
      >>> is_entry(None), is_entry(1.0)
      (True, False)
    """
    return x is None or is_delta_leaf(x) or is_stacked(x)


def slot_specs(like: Any, rank: int) -> tuple[list[SlotSpec | None], Any]:
    """``([SlotSpec or None per leaf], treedef)``: the slots of a stack of rank ``rank``
    for the kernels the delta ``like`` adapts (``None`` at every other leaf).

    Raises:
      LoraStructureError: a :class:`~lora_jax.LeafDelta`, DoRA factors or a stack in ``like``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2))
      >>> spec = slot_specs(d, 8)[0][0]
      >>> spec.a_shape, spec.b_shape
      ((6, 8), (8, 5))
    """
    entries, treedef = leaves_with_paths(like, is_leaf=is_entry)
    specs: list[SlotSpec | None] = []
    for path, f in entries:
        if f is None:
            specs.append(None)
            continue
        if not is_delta_leaf(f) or isinstance(f, LeafDelta) or f.magnitude is not None:
            raise LoraStructureError(
                f"leaf {path!r} of the cache's adapter shape is {type(f).__name__}"
                f"{' with DoRA factors' if getattr(f, 'magnitude', None) is not None else ''}; "
                "a cache holds plain LoRA factors (LoraFactors) only"
            )
        ns = len(f.layout.stack_axes)
        a_shape, b_shape = list(np.shape(f.a)), list(np.shape(f.b))
        if f.layers is not None:
            a_shape[0] = b_shape[0] = f.layers.total
        a_shape[-1] = b_shape[ns] = rank
        dtype = jnp.result_type(f.a)
        specs.append(SlotSpec(path, f.layout, tuple(a_shape), tuple(b_shape), dtype))
    return specs, treedef


def empty_stack(specs: Sequence[SlotSpec | None], treedef: Any, slots: int) -> Any:
    """A stack of ``slots`` empty slots (zero factors, scale 0) for ``specs`` (on the host).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2))
      >>> empty_stack(*slot_specs(d, 4), slots=3)["w"].a.shape
      (3, 6, 4)
    """
    out = [
        None
        if s is None
        else StackedFactors(
            np.zeros((slots, *s.a_shape), s.dtype),
            np.zeros((slots, *s.b_shape), s.dtype),
            np.zeros((slots,), np.float32),
            layout=s.layout,
        )
        for s in specs
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def slot_arrays(
    delta: Any, specs: Sequence[SlotSpec | None], treedef: Any, name: str = "the adapter"
) -> tuple[SlotKernel, ...]:
    """A delta as one slot's host arrays: ``(a, b, scale)`` per slotted kernel, NumPy,
    the rank axis zero-padded to the slot rank (pure; nothing moves to the device).

    A kernel the delta does not adapt gets zeros and scale 0. The zero columns
    add exact zeros, so the slot's ``scale * a @ b`` is the adapter's own update.

    Args:
      delta: a delta of the cache's base (``LoraFactors`` or ``None`` per leaf).
      specs, treedef: from :func:`slot_specs`.
      name: names the adapter in error messages.

    Raises:
      LoraStructureError: another tree structure, factors at a kernel without
        slots, another kernel shape or layout, a rank above the slot's, another
        dtype, a ``LeafDelta`` or DoRA factors (naming the leaf).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2, alpha=4.0))
      >>> (a, b, s), = slot_arrays(d, *slot_specs(d, 8))
      >>> a.shape, b.shape, float(s), bool((a[:, 2:] == 0).all())
      ((6, 8), (8, 5), 2.0, True)
    """
    try:
        entries = treedef.flatten_up_to(delta)
    except (ValueError, TypeError):
        raise LoraStructureError(
            f"{name}'s tree structure differs from the cache's base (a delta of another model?)"
        ) from None
    out: list[SlotKernel] = []
    for spec, f, path in zip(specs, entries, leaf_paths(treedef)):
        if spec is None:
            if f is not None:
                raise LoraStructureError(
                    f"leaf {path!r}: {name} adapts it but the cache has no slots there (the "
                    "cache's kernels are fixed when it is built)"
                )
            continue
        if f is None:
            out.append(
                (
                    np.zeros(spec.a_shape, spec.dtype),
                    np.zeros(spec.b_shape, spec.dtype),
                    np.float32(0),
                )
            )
            continue
        if not is_delta_leaf(f) or isinstance(f, LeafDelta) or f.magnitude is not None:
            kind = "DoRA factors" if getattr(f, "magnitude", None) is not None else type(f).__name__
            raise LoraStructureError(
                f"leaf {path!r} of {name} holds {kind}; a cache slot holds plain LoRA factors"
            )
        ref = StackedFactors(
            jax.ShapeDtypeStruct((1, *spec.a_shape), spec.dtype),
            jax.ShapeDtypeStruct((1, *spec.b_shape), spec.dtype),
            None,
            layout=spec.layout,
        )
        check_same_kernel(path, f, name, ref, "the cache's slot")
        rank = spec.a_shape[-1]
        if f.rank > rank:
            raise LoraStructureError(
                f"leaf {path!r} of {name} has rank {f.rank}, more than the cache's slot rank {rank}"
            )
        f = f.all_layers()
        ns = len(spec.layout.stack_axes)
        a, b = np.asarray(f.a), np.asarray(f.b)
        pad_b = [(0, 0)] * b.ndim
        pad_b[ns] = (0, rank - f.rank)
        out.append(
            (
                np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - f.rank)]),
                np.pad(b, pad_b),
                np.float32(f.scale),
            )
        )
    return tuple(out)


def leaf_paths(treedef: Any) -> list[str]:
    """The path of each leaf of ``treedef``.

    Example:
      >>> leaf_paths(jax.tree_util.tree_structure({"a": {"b": 1}, "c": 2}))
      ['a/b', 'c']
    """
    dummy = jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves)
    return [p for p, _ in leaves_with_paths(dummy)[0]]


def write_slot(stack: Any, slot: Any, arrays: Sequence[SlotKernel]) -> Any:
    """The stack with slot ``slot`` holding ``arrays`` (from :func:`slot_arrays`); pure.

    ``slot`` may be traced: under ``jit`` one program writes every slot. Each
    array is written with ``lax.dynamic_update_index_in_dim`` (an in-place
    update when the stack is donated; a traced ``.at[slot].set`` lowers to a
    scatter, several times slower on CPU). ``slot`` must be in ``[0, N)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2, alpha=4.0))
      >>> specs, td = slot_specs(d, 4)
      >>> s = write_slot(empty_stack(specs, td, 3), 1, slot_arrays(d, specs, td))
      >>> s["w"].scale.tolist()
      [0.0, 2.0, 0.0]
    """
    entries, treedef = jax.tree_util.tree_flatten(
        stack, is_leaf=lambda x: x is None or is_stacked(x)
    )
    todo = iter(arrays)
    put = lambda into, x: lax.dynamic_update_index_in_dim(  # noqa: E731
        jnp.asarray(into), jnp.asarray(x, jnp.result_type(into)), slot, 0
    )
    out: list[StackedFactors | None] = []
    for s in entries:
        if s is None:
            out.append(None)
            continue
        a, b, scale = next(todo)
        out.append(s.replace(a=put(s.a, a), b=put(s.b, b), scale=put(s.scale, scale)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _pieces(specs: Sequence[SlotSpec]) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype name, shape)`` of each array of a slot, in :func:`slot_arrays`'s order."""
    return [
        p
        for s in specs
        for p in ((s.dtype.name, s.a_shape), (s.dtype.name, s.b_shape), ("float32", ()))
    ]


def pack_slot(arrays: Sequence[SlotKernel], specs: Sequence[SlotSpec]) -> tuple[np.ndarray, ...]:
    """One slot's arrays as one flat buffer per dtype (dtype names sorted): what the host
    tier keeps, and one transfer per dtype instead of three per kernel.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2))
      >>> specs, td = slot_specs(d, 4)
      >>> [b.shape for b in pack_slot(slot_arrays(d, specs, td), [s for s in specs if s])]
      [(45,)]
    """
    flat = [np.asarray(x).ravel() for k in arrays for x in k]
    groups: dict[str, list[np.ndarray]] = {}
    for (dtype, _), x in zip(_pieces(specs), flat):
        groups.setdefault(dtype, []).append(x.astype(dtype, copy=False))
    return tuple(np.concatenate(groups[k]) for k in sorted(groups))


def unpack_slot(buffers: Sequence[Any], specs: Sequence[SlotSpec]) -> list[SlotKernel]:
    """The inverse of :func:`pack_slot` (NumPy or JAX buffers; static offsets, jit-able).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> _, d = lj.init_lora(jax.random.key(0), {"w": jnp.ones((6, 5))},
      ...                     lj.LoraConfig(targets="w", rank=2))
      >>> specs, td = slot_specs(d, 4)
      >>> slotted = [s for s in specs if s]
      >>> packed = pack_slot(slot_arrays(d, specs, td), slotted)
      >>> a, b, s = unpack_slot(packed, slotted)[0]
      >>> a.shape, b.shape, float(s)
      ((6, 4), (4, 5), 8.0)
    """
    pieces = _pieces(specs)
    names = sorted({d for d, _ in pieces})
    offsets = dict.fromkeys(names, 0)
    out = []
    for dtype, shape in pieces:
        size = int(np.prod(shape))
        buf = buffers[names.index(dtype)]
        out.append(buf[offsets[dtype] : offsets[dtype] + size].reshape(shape))
        offsets[dtype] += size
    return [(out[i], out[i + 1], out[i + 2]) for i in range(0, len(out), 3)]
