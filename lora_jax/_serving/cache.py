"""An adapter cache: many named adapters, a host tier and a few device slots of one stack.

Serving more adapters than fit on the device: the adapters live by name in a
**host tier** (NumPy arrays, already zero-padded to the slot rank, at most
``host_capacity`` of them) and the ones a batch names are moved into the
``max_slots`` slots of one device stack (:class:`~lora_jax.StackedFactors`)
that ``implicit(..., adapter_ids=)`` serves. Both tiers evict the least
recently used adapter; a pinned adapter never leaves its slot.

The pure pieces are functions: :func:`slot_arrays` validates a delta against
the slot shapes and pads it on the host (zero columns, so the slot's product
is exactly the adapter's), :func:`write_slot` writes one slot of a stack
(``.at[slot].set``). :class:`AdapterCache` is the one stateful object: it holds
the stack and the bookkeeping (which name is in which tier and slot, the
recency order, the pins) and nothing else.

A slot write is a jitted call with the stack donated: ``jax.device_put`` of
the adapters' packed host buffers (one per dtype, up to ``WRITE_GROUP``
adapters per call) and the write are dispatched asynchronously, so
:meth:`AdapterCache.resolve` returns the batch's slot ids while the copy
runs, overlapping whatever the device is computing; the serving function,
which takes the stack as an argument, waits for it on its own. The slot is a
traced index and every adapter has the slot's shapes, so neither the write nor
the serving function is compiled again when adapters come and go.

Every method checks its whole input and plans every eviction before it
changes anything: bad input (an unknown name, an adapter whose rank exceeds
the slot, kernels that are not the base's, more adapters in one batch than
unpinned slots) raises a :class:`~lora_jax.LoraError` and leaves the cache
exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._config import LoraConfig
from lora_jax._delta import LeafDelta, is_delta_leaf
from lora_jax._errors import LoraArgumentError, LoraStructureError
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
      kernel_shape: the base kernel's shape.
    """

    path: str
    layout: KernelLayout
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: Any
    kernel_shape: tuple[int, ...]


def _is_entry(x: Any) -> bool:
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
    entries, treedef = leaves_with_paths(like, is_leaf=_is_entry)
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
        specs.append(
            SlotSpec(path, f.layout, tuple(a_shape), tuple(b_shape), dtype, f.kernel_shape)
        )
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


#: slots one write call fills (a batch's misses go in groups of this many, the last group
#: padded by repeating its last entry): one program for any number of misses
WRITE_GROUP = 4


def _write_group(stack: Any, slots: Any, buffers: Sequence[Any], specs: Any) -> Any:
    """``stack`` with ``slots[j]`` holding the packed adapter ``buffers[d][j]`` for each ``j``."""
    for j in range(slots.shape[0]):
        stack = write_slot(stack, slots[j], unpack_slot([b[j] for b in buffers], specs))
    return stack


# One program per stack shape, shared by every cache; the stack is updated in place (donated).
_write_packed = jax.jit(_write_group, static_argnums=3, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class CacheState:
    """A snapshot of an :class:`AdapterCache`'s bookkeeping (compare two with ``==``).

    Attributes:
      known: every name the cache can serve, sorted.
      host: the host tier's names, least recently used first.
      slots: the name in each device slot (``None``: empty).
      pinned: the pinned names.
    """

    known: tuple[str, ...]
    host: tuple[str, ...]
    slots: tuple[str | None, ...]
    pinned: frozenset[str]


Source = Callable[[], Any]


class AdapterCache:
    """Named adapters in a host tier and ``max_slots`` device slots of one stack.

    Args:
      base: the base params the adapters are for (arrays or
        ``jax.ShapeDtypeStruct``); files are loaded against it.
      like: the adapter shape: a :class:`~lora_jax.LoraConfig` (its targets on
        ``base``) or a delta of ``base`` whose adapted kernels get slots.
      max_slots: device slots ``N`` (the stack's slot axis; fixed).
      host_capacity: adapters kept on the host (``>= max_slots``; every
        adapter in a slot also has its host copy).
      rank: the slot rank ``R`` (default: the config's or the delta's largest
        rank); adapters of rank up to ``R`` fit, zero-padded.

    Serve with ``ids = cache.resolve(names)`` and then
    ``implicit(apply)(base, cache.stack, x, adapter_ids=ids)``: read
    :attr:`stack` after :meth:`resolve` (in its own statement, not as an
    earlier argument of the same call), since a slot write donates the old
    stack's buffers and so deletes an older ``cache.stack``.

    Raises:
      LoraArgumentError: bad ``max_slots`` / ``host_capacity`` / ``rank``.
      LoraStructureError: ``like`` holds a LeafDelta or DoRA factors.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((6, 5))}
      >>> cfg = lj.LoraConfig(targets="w", rank=4)
      >>> cache = lj.AdapterCache(params, cfg, max_slots=2, host_capacity=3)
      >>> for i, name in enumerate(["x", "y", "z"]):
      ...     cache.add(name, lj.init_lora(jax.random.key(i), params, cfg)[1])
      >>> cache.resolve(["x", None, "y", "x"]).tolist()
      [0, -1, 1, 0]
      >>> cache.resolve(["z"]).tolist(), cache.state().slots  # z evicts x, used least recently
      ([0], ('z', 'y'))
      >>> ids = cache.resolve(["y", "z"])  # both resident: nothing moves
      >>> ids.tolist()
      [1, 0]
      >>> y = lj.implicit(lambda p, x: x @ p["w"])(params, cache.stack, jnp.ones((2, 6)),
      ...                                          adapter_ids=ids)
    """

    def __init__(
        self,
        base: Any,
        like: Any,
        *,
        max_slots: int,
        host_capacity: int,
        rank: int | None = None,
    ) -> None:
        for what, v in (("max_slots", max_slots), ("host_capacity", host_capacity)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise LoraArgumentError(f"{what} must be a positive int, got {v!r}")
        if host_capacity < max_slots:
            raise LoraArgumentError(
                f"host_capacity ({host_capacity}) must be >= max_slots ({max_slots}): every "
                "adapter in a device slot keeps its host copy"
            )
        if isinstance(like, LoraConfig):
            from lora_jax._init_lora import init_lora  # noqa: PLC0415

            config = like
            like = jax.eval_shape(lambda: init_lora(jax.random.key(0), base, config)[1])
        ranks = [
            f.rank for _, f in leaves_with_paths(like, is_leaf=_is_entry)[0] if is_delta_leaf(f)
        ]
        if not ranks:
            raise LoraArgumentError("the adapter shape `like` adapts no kernel")
        r = max(ranks) if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise LoraArgumentError(f"rank must be a positive int, got {rank!r}")
        self._base = base
        self._specs, self._treedef = slot_specs(like, int(r))
        self.max_slots, self.host_capacity, self.rank = int(max_slots), int(host_capacity), int(r)
        self._stack = jax.device_put(empty_stack(self._specs, self._treedef, self.max_slots))
        self._sources: dict[str, Source | None] = {}  # every known name: how to (re)read it
        self._slotted = tuple(s for s in self._specs if s is not None)
        self._host: dict[str, tuple[np.ndarray, ...]] = {}  # packed; insertion order = LRU first
        self._slots: list[str | None] = [None] * self.max_slots
        self._pinned: set[str] = set()
        self._retired: list[Any] = []  # donated stacks kept until the current one is ready
        #: counters: ``hits``, ``misses`` (slot writes for a batch), ``host_loads``, ``evictions``
        self.stats = {"hits": 0, "misses": 0, "host_loads": 0, "evictions": 0}

    # -- what it holds --------------------------------------------------------------------

    @property
    def stack(self) -> Any:
        """The device stack (a tree of :class:`~lora_jax.StackedFactors`, ``max_slots`` slots)."""
        return self._stack

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def state(self) -> CacheState:
        """A snapshot of the bookkeeping (not the arrays): names, host LRU order, slots, pins."""
        return CacheState(
            tuple(sorted(self._sources)),
            tuple(self._host),
            tuple(self._slots),
            frozenset(self._pinned),
        )

    def host_arrays(self, name: str) -> dict[str, SlotKernel]:
        """``{kernel path: (a, b, scale)}``: ``name``'s host copy, padded to the slot rank
        (read from its file if the host tier evicted it; the cache is not changed)."""
        self._check_known([name])
        packed = self._host[name] if name in self._host else self._read(name)
        return {s.path: k for s, k in zip(self._slotted, unpack_slot(packed, self._slotted))}

    # -- adding adapters ------------------------------------------------------------------

    def add(self, name: str, delta: Any) -> None:
        """Puts ``delta`` into the host tier as ``name`` (replacing an adapter of that name;
        if it is in a slot, the slot is rewritten now, asynchronously).

        An adapter given as a delta has no file to reread: once the host tier
        evicts it, its name is forgotten.

        Raises:
          LoraStructureError: the delta does not fit the slots (see :func:`slot_arrays`).
          LoraArgumentError: ``name`` is not a non-empty str, or the host tier is
            full of adapters that are in device slots.
        """
        self._add(name, None, lambda: delta)

    def add_file(self, name: str, path: str | os.PathLike) -> None:
        """Loads a lora_jax adapter directory (:func:`lora_jax.load` against the base) as
        ``name``; after a host eviction it is read again from ``path`` on demand."""
        from lora_jax._files.lora_format import load  # noqa: PLC0415

        base, p = self._base, os.fspath(path)
        source = lambda: load(p, base=base)[0]  # noqa: E731
        self._add(name, source, source)

    def add_peft(self, name: str, path: str | os.PathLike, **import_options: Any) -> None:
        """Loads a PEFT adapter directory (:func:`lora_jax.import_peft` against the base,
        with ``import_options`` such as ``name_map=``) as ``name``; reread on demand."""
        from lora_jax._files.peft.format import import_peft  # noqa: PLC0415

        base, p = self._base, os.fspath(path)
        source = lambda: import_peft(p, base, **import_options)  # noqa: E731
        self._add(name, source, source)

    def _add(self, name: str, source: Source | None, read: Source) -> None:
        if not isinstance(name, str) or not name:
            raise LoraArgumentError(f"an adapter name must be a non-empty str, got {name!r}")
        arrays = self._pack(read(), name)
        victims = [] if name in self._host else self._host_victims(1, keep={name})
        # -- commit (nothing above changed the cache)
        self._evict_host(victims)
        self._sources[name] = source
        self._host.pop(name, None)
        self._host[name] = arrays
        if name in self._slots:
            self._write([(self._slots.index(name), arrays)])

    def remove(self, name: str) -> None:
        """Forgets ``name`` (its host copy, its slot and its pin)."""
        self._check_known([name])
        self._pinned.discard(name)
        self._host.pop(name, None)
        self._sources.pop(name)
        if name in self._slots:
            self._slots[self._slots.index(name)] = None

    # -- serving --------------------------------------------------------------------------

    def resolve(self, names: Sequence[str | None]) -> np.ndarray:
        """Each row's slot id for a batch naming its adapters (``None``: the base alone, -1).

        Loads what is missing: host tier from the adapter's file, device slot
        from the host tier (evicting the least recently used unpinned
        adapters the batch does not name), the writes dispatched
        asynchronously. Every named adapter becomes the most recently used.

        Args:
          names: ``(batch,)`` adapter names or ``None``.

        Returns:
          ``(batch,)`` int32 NumPy ids for ``implicit(..., adapter_ids=)``,
          computed from the bookkeeping alone (no device round trip).

        Raises:
          LoraArgumentError: an unknown name (all listed, with their rows), or
            more distinct adapters than slots that are not pinned by others;
            the cache is left as it was.
          LoraFileError: an adapter's file cannot be read again (cache unchanged).
        """
        names = list(names)
        want = list(dict.fromkeys(n for n in names if n is not None))
        self._check_known(want, names)
        free = self.max_slots - len(self._pinned - set(want))
        if len(want) > free:
            raise LoraArgumentError(
                f"the batch names {len(want)} distinct adapters; the cache has {self.max_slots} "
                f"slots, {self.max_slots - free} pinned by adapters the batch does not name"
            )
        missing = [n for n in want if n not in self._slots]
        device_victims = self._device_victims(len(missing), keep=set(want))
        read = {n: self._read(n) for n in want if n not in self._host}
        resident_after = {n for n in self._slots if n is not None} - set(device_victims)
        resident_after |= set(want)
        host_victims = self._host_victims(len(read), keep=resident_after)
        # -- commit (nothing above changed the cache)
        self._evict_host(host_victims)
        self.stats["host_loads"] += len(read)
        self._host.update(read)
        for victim in device_victims:
            self._slots[self._slots.index(victim)] = None
        self.stats["evictions"] += len(device_victims)
        writes = []
        for n in missing:
            slot = self._slots.index(None)
            self._slots[slot] = n
            writes.append((slot, self._host[n]))
        self._write(writes)
        self.stats["misses"] += len(missing)
        self.stats["hits"] += len(want) - len(missing)
        for n in want:  # most recently used last
            self._host[n] = self._host.pop(n)
        slot_of = {n: i for i, n in enumerate(self._slots) if n is not None}
        return np.asarray([-1 if n is None else slot_of[n] for n in names], np.int32)

    def pin(self, name: str) -> None:
        """Loads ``name`` into a slot (if it is not in one) and keeps it there until unpinned.

        Raises:
          LoraArgumentError: unknown name, or every slot pinned (cache unchanged).
        """
        self._check_known([name])
        if name not in self._pinned and len(self._pinned) >= self.max_slots:
            raise LoraArgumentError(
                f"cannot pin {name!r}: all {self.max_slots} slots are pinned "
                f"({sorted(self._pinned)}); unpin one first"
            )
        self.resolve([name])
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """Lets ``name``'s slot be evicted again (a no-op for a name that is not pinned)."""
        self._check_known([name])
        self._pinned.discard(name)

    # -- internals ------------------------------------------------------------------------

    def _check_known(self, want: Sequence[Any], rows: Sequence[Any] | None = None) -> None:
        unknown = [n for n in want if not isinstance(n, str) or n not in self._sources]
        if unknown:
            where = ""
            if rows is not None:
                at = {n: [i for i, r in enumerate(rows) if r == n] for n in unknown}
                where = " at rows " + ", ".join(f"{n!r}: {i}" for n, i in at.items())
            raise LoraArgumentError(
                f"unknown adapter(s) {unknown}{where}; known: {sorted(self._sources)[:8]}"
                f"{'...' if len(self._sources) > 8 else ''} (add them with AdapterCache.add, "
                "add_file or add_peft); the cache is unchanged"
            )

    def _read(self, name: str) -> tuple[np.ndarray, ...]:
        source = self._sources[name]
        assert source is not None, "an adapter without a file is always in the host tier"
        return self._pack(source(), name)

    def _pack(self, delta: Any, name: str) -> tuple[np.ndarray, ...]:
        arrays = slot_arrays(delta, self._specs, self._treedef, f"adapter {name!r}")
        return pack_slot(arrays, self._slotted)

    def _device_victims(self, count: int, keep: set[str]) -> list[str]:
        empty = self._slots.count(None)
        order = [n for n in self._host if n in self._slots and n not in keep | self._pinned]
        return order[: max(0, count - empty)]

    def _host_victims(self, count: int, keep: set[str]) -> list[str]:
        over = len(self._host) + count - self.host_capacity
        if over <= 0:
            return []
        order = [n for n in self._host if n not in keep and n not in self._slots]
        if len(order) < over:
            raise LoraArgumentError(
                f"the host tier is full ({self.host_capacity} adapters) and every adapter in it "
                "is in a device slot or needed now; raise host_capacity or remove one"
            )
        return order[:over]

    def _evict_host(self, victims: Sequence[str]) -> None:
        for n in victims:
            del self._host[n]
            if self._sources[n] is None:  # given as a delta: nothing to reread
                del self._sources[n]

    def _write(self, writes: Sequence[tuple[int, tuple[np.ndarray, ...]]]) -> None:
        """Dispatches the writes ``[(slot, packed host buffers), ...]``, WRITE_GROUP per call."""
        self._release_retired()
        for i in range(0, len(writes), WRITE_GROUP):
            group = list(writes[i : i + WRITE_GROUP])
            group += group[-1:] * (WRITE_GROUP - len(group))  # rewriting a slot: idempotent
            slots = np.asarray([slot for slot, _ in group], np.int32)
            buffers = tuple(np.stack(b) for b in zip(*(packed for _, packed in group)))
            on_device = jax.device_put((slots, buffers))  # asynchronous, like the write after it
            old, self._stack = self._stack, _write_packed(self._stack, *on_device, self._slotted)
            self._retired.append(old)

    def _release_retired(self) -> None:
        """Drops the donated stacks of earlier writes once the current stack is ready (then
        no computation still reads their buffers). JAX 0.6 blocks while deleting a donated
        array that a dispatched computation still reads, so dropping them at once would
        make a write wait for the device."""
        if all(x.is_ready() for x in jax.tree.leaves(self._stack)):
            self._retired.clear()
