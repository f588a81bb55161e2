"""A stacked kernel under ``implicit(adapter_ids=...)``: one kernel, each example's own factors.

When :func:`lora_jax.implicit` is called with an adapter stack and
``adapter_ids`` ``(batch,)``, every stacked kernel enters the interpreter as
an :class:`ExampleView`, built once at the function's inputs:

* ``ids`` are checked and split into a slot ``index`` (clipped into
  ``[0, N)``) and ``valid`` (1 for a slot, 0 for id -1, the base alone):
  :func:`batch_ids`;
* each example's factors are gathered from the stack, ``(batch, *stack,
  *fan_in, R)`` and ``(batch, *stack, R, *fan_out)`` (:func:`gather_slots`,
  which also states their sharding), and its scale ``s[index] * valid``.

The view carries the gathered factors inside a
:class:`~lora_jax._implicit.view.LoraView` whose factors have one leading
axis no kernel axis has (the example axis), so every layout operation
(transpose, reshape, stacked slice, scan) is the plain view's; only the
rules where the kernel meets its input differ
(:mod:`lora_jax._serving.example_rules`). There is no dense kernel for a
batch of mixed adapters, so an :class:`ExampleView` is never materialised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraArgumentError
from lora_jax._implicit.view import LoraView, Role, roles_of
from lora_jax._serving.stack import StackedFactors, stack_slots

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExampleView:
    """A kernel with one factor pair and one scale per example of the batch.

    Attributes:
      kernel: the kernel's :class:`~lora_jax._implicit.view.LoraView` with
        ``a: (batch, *stack, *fan_in, R)`` and ``b: (batch, *stack, R,
        *fan_out)`` (its own ``scale`` is unused, 0).
      scales: ``(batch,)`` float32: each example's scale (0 for the base alone).

    Layout operations act on ``kernel`` and keep ``scales``.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=2.0,
      ...                    layout=lj.KernelLayout("io"))
      >>> s = lj.stack_adapters([{"w": f}, {"w": f}])["w"]
      >>> v = ExampleView.of("w", jnp.ones((4, 3)), s, jnp.array([1, 0, 0]),
      ...                    jnp.array([1.0, 1.0, 0.0]), None)
      >>> v.kernel.a.shape, v.transpose((1, 0)).shape, v.scales.tolist()
      ((3, 4, 2), (3, 4), [1.0, 1.0, 0.0])
    """

    kernel: LoraView
    scales: Any

    @staticmethod
    def of(
        path: str, w: Any, stack: StackedFactors, index: Array, valid: Array, ids: Any
    ) -> ExampleView:
        """Kernel ``w`` with each example's slot of ``stack`` (``index``, ``valid``: see
        :func:`batch_ids`; ``ids`` the caller's ``adapter_ids``, for their sharding)."""
        scales = jnp.asarray(stack.scale, jnp.float32)[index] * valid
        a, b = gather_slots(stack.a, index, ids), gather_slots(stack.b, index, ids)
        # Rows without a slot (id -1) take zero factors through a select: their gradient
        # (exactly 0, even from a NaN row) never reaches the slot their clipped index names.
        own = valid > 0
        a = jnp.where(own.reshape(own.shape + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))
        b = jnp.where(own.reshape(own.shape + (1,) * (b.ndim - 1)), b, jnp.zeros_like(b))
        kernel = LoraView(w, a, b, roles_of(stack.layout.axes), 0.0, jnp.dtype(w.dtype), path)
        return ExampleView(kernel, scales)

    @property
    def path(self) -> str:
        return self.kernel.path

    @property
    def roles(self) -> tuple[Role, ...]:
        return self.kernel.roles

    @property
    def shape(self) -> tuple[int, ...]:
        return self.kernel.shape

    @property
    def w(self) -> Any:
        return self.kernel.w

    def replace(self, **changes: Any) -> ExampleView:
        """``changes`` (``w``, ``dtype``, ...) applied to the kernel's view."""
        return ExampleView(self.kernel.replace(**changes), self.scales)

    def transpose(self, permutation: tuple[int, ...]) -> ExampleView:
        return ExampleView(self.kernel.transpose(permutation), self.scales)

    def reshape(self, new_sizes: tuple[int, ...]) -> ExampleView | None:
        """See :meth:`LoraView.reshape`; None when the reshape mixes roles."""
        kernel = self.kernel.reshape(new_sizes)
        return None if kernel is None else ExampleView(kernel, self.scales)

    def slice_stack(self, starts: list[Any], sizes: list[int], slicer: Any) -> ExampleView | None:
        """See :meth:`LoraView.slice_stack`; None when a fan-in or fan-out axis is cut."""
        kernel = self.kernel.slice_stack(starts, sizes, slicer)
        return None if kernel is None else ExampleView(kernel, self.scales)

    def sliced(self, axis_role: Role) -> ExampleView:
        """See :meth:`LoraView.sliced`; the same scales in every layer of the scan."""
        scales = jnp.broadcast_to(self.scales, (self.shape[0],) + self.scales.shape)
        return ExampleView(self.kernel.sliced(axis_role), scales)


jax.tree_util.register_dataclass(ExampleView, data_fields=["kernel", "scales"], meta_fields=[])


def batch_ids(adapter_ids: Any, stacks: dict[str, StackedFactors]) -> tuple[Array, Array]:
    """``(index, valid)`` for ``implicit``'s ``adapter_ids`` over the delta's ``stacks``
    (``{path: StackedFactors}``), checked against their slot count (see :func:`example_ids`).

    Raises:
      LoraArgumentError: stacks without ids, ids without stacks, or bad ids.

    Example:
      >>> batch_ids(None, {"w": None})
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraArgumentError: the delta holds adapter stacks (at ['w']); pass adapter_ids=(batch,) ids choosing each example's slot (-1: the base alone)
    """
    if adapter_ids is None:
        raise LoraArgumentError(
            f"the delta holds adapter stacks (at {list(stacks)[:3]}); pass adapter_ids=(batch,) "
            "ids choosing each example's slot (-1: the base alone)"
        )
    if not stacks:
        raise LoraArgumentError(
            "adapter_ids was given but the delta holds no adapter stack (build one with "
            "lora_jax.stack_adapters)"
        )
    return example_ids(adapter_ids, stack_slots(stacks))


def example_ids(adapter_ids: Any, slots: int) -> tuple[Array, Array]:
    """``(index, valid)`` for per-example adapter ids: ``index`` clipped into ``[0, N)`` for
    the gather, ``valid`` a float ``(batch,)``: 1 for a slot, 0 for id -1 (the base alone),
    NaN for an id outside ``[-1, N)`` under ``jit`` (concrete ids are checked here).

    Example:
      >>> example_ids(jnp.array([1, -1]), 2)[1].tolist()
      [1.0, 0.0]
    """
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraArgumentError(
            f"adapter_ids must be a 1-D integer array (one id per example), got shape "
            f"{tuple(ids.shape)} dtype {ids.dtype}"
        )
    if not isinstance(adapter_ids, jax.core.Tracer):
        host = np.asarray(ids)
        bad = host[(host < -1) | (host >= slots)]
        if bad.size:
            raise LoraArgumentError(
                f"adapter_ids {sorted(set(bad.tolist()))[:5]} are outside [-1, {slots}) "
                f"(the stack has {slots} slots; -1 means the base alone)"
            )
    ok = (ids >= -1) & (ids < slots)
    valid = jnp.where(ok, (ids >= 0).astype(jnp.float32), jnp.float32(jnp.nan))
    return jnp.clip(ids, 0, max(slots - 1, 0)).astype(jnp.int32), valid


def gather_slots(x: Array, index: Array, ids: Any) -> Array:
    """``x[index]`` along the slot axis: each example's factors, ``(batch, ...)``.

    Sharding (stated, not left to propagation where JAX needs it): with
    explicit mesh axes (JAX >= 0.7), a gather from a sharded operand needs an
    ``out_sharding`` (JAX 0.9 raises otherwise); the gathered factors get the
    stack's spec with the slot axis replaced by the spec of ``adapter_ids``'
    axis, ``P(ids_spec, *stack_spec[1:])``: examples split like the batch,
    fan-in / fan-out split like the kernel, rank unsplit. Under auto axes the
    stack's sharding is not visible inside ``jit`` and XLA propagates the
    same spec from the operand.

    Example:
      >>> gather_slots(jnp.arange(6.0).reshape(3, 2), jnp.array([2, 0]), None).tolist()
      [[4.0, 5.0], [0.0, 1.0]]
    """
    found = _explicit_spec(x)
    if found is None:
        return jnp.take(x, index, axis=0)
    mesh, spec = found
    id_found = _explicit_spec(ids) if ids is not None else None
    first = id_found[1][0] if id_found else None
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(first, *spec[1:]))
    return x.at[index].get(out_sharding=out)


def _explicit_spec(x: Any) -> Any:
    """``(mesh, spec)`` of ``x``'s type under explicit mesh axes, else None."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    try:
        sharding = getattr(typeof(x), "sharding", None)
    except TypeError:
        return None
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not getattr(mesh, "axis_names", ()):
        return None
    types = getattr(mesh, "axis_types", ())
    if not any("Explicit" in str(t) for t in types):
        return None
    return mesh, tuple(sharding.spec) + (None,) * (np.ndim(x) - len(sharding.spec))
