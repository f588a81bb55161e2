"""An adapter cache: many named adapters, a host tier and a few device slots of one stack.

Serving more adapters than fit on the device: the adapters live by name in a
**host tier** (NumPy arrays, already zero-padded to the slot rank, at most
``host_capacity`` of them) and the ones a batch names are moved into the
``max_slots`` slots of one device stack (:class:`~lora_jax.StackedFactors`)
that ``implicit(..., adapter_ids=)`` serves. Both tiers evict the least
recently used adapter; a pinned adapter never leaves its slot.

The pure pieces are functions in :mod:`lora_jax._serving.slots` (a delta
checked and zero-padded into a slot's host arrays, packed into one buffer per
dtype; one slot of a stack written). :class:`AdapterCache` is the one stateful
object: it holds the stack and the bookkeeping (which name is in which tier
and slot, the recency order, the pins) and nothing else.

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
import numpy as np

from lora_jax._config import LoraConfig
from lora_jax._delta import is_delta_leaf
from lora_jax._errors import LoraArgumentError
from lora_jax._files.lora_format import load
from lora_jax._files.peft.format import import_peft
from lora_jax._init_lora import init_lora
from lora_jax._paths import leaves_with_paths
from lora_jax._serving.slots import (
    SlotKernel,
    empty_stack,
    is_entry,
    pack_slot,
    slot_arrays,
    slot_specs,
    unpack_slot,
    write_slot,
)

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
            config = like
            like = jax.eval_shape(lambda: init_lora(jax.random.key(0), base, config)[1])
        ranks = [
            f.rank for _, f in leaves_with_paths(like, is_leaf=is_entry)[0] if is_delta_leaf(f)
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
          LoraStructureError: the delta does not fit the slots: another tree
            structure, factors at a kernel without slots, another kernel shape,
            layout or dtype, a rank above the slot's, a ``LeafDelta`` or DoRA
            factors (the message names the leaf).
          LoraArgumentError: ``name`` is not a non-empty str, or the host tier is
            full of adapters that are in device slots.
        """
        self._add(name, None, lambda: delta)

    def add_file(self, name: str, path: str | os.PathLike) -> None:
        """Loads a lora_jax adapter directory (:func:`lora_jax.load` against the base) as
        ``name``; after a host eviction it is read again from ``path`` on demand."""
        base, p = self._base, os.fspath(path)
        source = lambda: load(p, base=base)[0]  # noqa: E731
        self._add(name, source, source)

    def add_peft(self, name: str, path: str | os.PathLike, **import_options: Any) -> None:
        """Loads a PEFT adapter directory (:func:`lora_jax.import_peft` against the base,
        with ``import_options`` such as ``name_map=``) as ``name``; reread on demand."""
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
        if isinstance(names, str):
            raise LoraArgumentError(f"names must be a sequence of names (one a row), got {names!r}")
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
