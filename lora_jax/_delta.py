"""The delta: how a LoRA update is represented, paired with its base, and measured.

Everything that knows what a delta *is* lives here, and nowhere else:

* :class:`DeltaEntry`, what every entry type of a delta provides: the check
  that it fits its base leaf.
* :class:`LoraFactors`, the leaf of a delta at a targeted kernel: a frozen
  dataclass registered as a pytree whose children are the arrays ``a``, ``b``
  (and DoRA's ``magnitude``) and whose static metadata (``alpha``, ``rslora``,
  ``layout``, ``layers``) says how to use them. ``jax.jit``, ``jax.grad``,
  optax and orbax see only the arrays.
* :class:`LeafDelta`, the leaf of a delta at a leaf trained in full.
* :class:`LoraBias` (PEFT's ``lora_bias``: a bias on ``lora_B``, at the base
  bias leaf) and :class:`TokenRows` (PEFT's ``trainable_token_indices``: a few
  embedding rows trained in full), the two :class:`ValueDelta` entries: small
  additive updates of one leaf's value, applied where the leaf is read.
* :class:`LayerSelection`, which stacked layers a kernel's factors hold.
* :func:`lora_scale`, the one formula for the scale ``s``.
* :func:`dense_delta`, the dense update ``s A B`` in the kernel's axis order,
  and :func:`column_norm`, the one DoRA norm ``||W + s A B||_c``.
* :func:`align`, the pairing of every base leaf with its delta entry, with
  errors naming the leaf when they do not fit.

For a kernel laid out as ``(*stack, *fan_in, *fan_out)``:

.. math::

   \\Delta W = s \\, A B, \\qquad s = \\alpha / r \\;\\text{(or } \\alpha/\\sqrt{r}
   \\text{ with rsLoRA)}

with ``A: (*stack, *fan_in, r)`` and ``B: (*stack, r, *fan_out)``, contracted
over ``r`` and batched over the stacked axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraStructureError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths
from lora_jax._segments import check_fits as check_segments
from lora_jax._segments import mask_b, real_b_size

Array = jax.Array


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    Example:
      >>> lora_scale(16.0, 8), lora_scale(16.0, 4, rslora=True)
      (2.0, 8.0)
    """
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """The layers (along the first stacked axis) whose factors a kernel's delta holds.

    The factors then have leading axis ``len(indices)``; every other layer's
    update is exactly zero (PEFT's ``layers_to_transform``).

    Attributes:
      indices: distinct layer indices, sorted.
      total: the full length of the stacked axis.

    Example:
      >>> sel = LayerSelection((0, 2), total=3)
      >>> sel.scatter(jnp.ones((2, 1)))[:, 0]
      Array([1., 0., 1.], dtype=float32)
    """

    indices: tuple[int, ...]
    total: int

    def __post_init__(self):
        idx = tuple(int(i) for i in self.indices)
        if (
            not idx
            or list(idx) != sorted(set(idx))
            or idx[0] < 0
            or not isinstance(self.total, (int, np.integer))
            or idx[-1] >= self.total
        ):
            raise LoraStructureError(
                f"LayerSelection needs distinct sorted indices in [0, {self.total}), got "
                f"{self.indices!r}"
            )
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "total", int(self.total))

    def scatter(self, x: Any) -> Any:
        """``(len(indices), ...)`` -> ``(total, ...)`` with zeros at the other layers."""
        x = jnp.asarray(x)
        return jnp.zeros((self.total,) + x.shape[1:], x.dtype).at[np.asarray(self.indices)].set(x)

    def gather(self, x: Any) -> Any:
        """``(total, ...)`` -> ``(len(indices), ...)``: the selected layers of ``x``."""
        return x[np.asarray(self.indices)]


def kernel_shape_of(
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    layout: KernelLayout,
    layers: LayerSelection | None = None,
) -> tuple[int, ...]:
    """The shape of the kernel that factors of shapes ``a_shape`` ``(*stack, *fan_in, r)``
    and ``b_shape`` ``(*stack, r, *fan_out)`` adapt, in the kernel's own axis order
    (with ``layers``, the first stacked axis has ``layers.total`` entries).

    Example:
      >>> kernel_shape_of((4, 2), (2, 3), KernelLayout("oi"))
      (3, 4)
    """
    ns = len(layout.batch_axes)
    stack = tuple(a_shape[:ns])
    if layers is not None:
        stack = (layers.total,) + stack[1:]
    ordered = stack + tuple(a_shape[ns:-1]) + tuple(b_shape[ns + 1 :])
    return tuple(ordered[p] for p in np.argsort(layout.permutation).tolist())


class DeltaEntry:
    """The base of every type a delta holds at a leaf (:class:`LoraFactors`,
    :class:`LeafDelta`, and :class:`~lora_jax.StackedFactors` in the serving wing).

    Each type checks itself against its base leaf (:meth:`check_fits`), so
    :func:`check_fits` pairs any entry with its leaf without knowing the types.
    ``serving_only`` marks a type that only ``implicit(..., adapter_ids=)``
    serves (an adapter stack): :func:`align` refuses it unless asked.
    """

    serving_only: ClassVar[bool] = False

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises :class:`LoraStructureError` naming ``path`` unless this entry adapts a
        leaf of ``shape``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LoraFactors(DeltaEntry):
    """Trainable factors ``a``, ``b`` of one targeted kernel.

    Everything but ``a`` and ``b`` is keyword-only, so a rebuilt factor pair
    cannot silently drop a field: use :meth:`replace`.

    Attributes:
      a: ``(*stack, *fan_in, r)`` -- the fan-in side.
      b: ``(*stack, r, *fan_out)`` -- the fan-out side.
      alpha: the LoRA alpha of this kernel (static).
      layout: the kernel's :class:`KernelLayout` (static).
      rslora: if true the scale is ``alpha / sqrt(r)``, else ``alpha / r`` (static).
      magnitude: DoRA's trainable magnitude ``(*stack, *fan_out)``, or ``None``
        for plain LoRA.
      layers: a :class:`LayerSelection` when only some stacked layers are
        adapted (``a``, ``b`` then hold only those); ``None``: every layer.
      segments: for a fused kernel with one adapter per projection, the sizes
        of the projections along the flattened fan-out (static): ``a`` holds
        ``concat_j A_j``, ``b`` is block-diagonal (structural zeros, masked
        wherever ``b`` is used), each segment's rank is ``rank / n`` and the
        scale uses it (see :mod:`lora_jax._segments`). ``None``: one joint adapter.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 3)), alpha=16.0,
      ...                    layout=lj.KernelLayout("io"))
      >>> f.rank, f.scale, f.kernel_shape
      (2, 8.0, (4, 3))
    """

    a: Any
    b: Any
    _: dataclasses.KW_ONLY
    alpha: float
    layout: KernelLayout
    rslora: bool = False
    magnitude: Any = None
    layers: LayerSelection | None = None
    segments: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        """The rank ``r``: the last axis of ``a`` (with ``segments``, the joint rank ``n * r``)."""
        return int(np.shape(self.a)[-1])

    @property
    def segment_rank(self) -> int:
        """The rank of one segment's adapter (``rank`` without ``segments``)."""
        return self.rank // len(self.segments) if self.segments else self.rank

    @property
    def scale(self) -> float:
        """:func:`lora_scale` of this kernel's alpha and (segment) rank."""
        return lora_scale(self.alpha, self.segment_rank, self.rslora)

    @property
    def num_params(self) -> int:
        """Trainable parameters held by ``a``, ``b`` (and the magnitude); a segmented ``b``'s
        structural zeros are not parameters."""
        extra = 0 if self.magnitude is None else np.size(self.magnitude)
        b = np.size(self.b) if not self.segments else real_b_size(np.shape(self.b), self.segments)
        return int(np.size(self.a) + b + extra)

    def masked(self) -> LoraFactors:
        """The factors with a segmented ``b``'s off-diagonal blocks zeroed (a constant mask,
        so their gradient is zero); the factors themselves without ``segments``."""
        if not self.segments:
            return self
        return self.replace(b=mask_b(self.b, self.segments, len(self.layout.out_axes)))

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel these factors adapt, read off ``a``, ``b`` and ``layers``."""
        return kernel_shape_of(np.shape(self.a), np.shape(self.b), self.layout, self.layers)

    def replace(self, **changes: Any) -> LoraFactors:
        """A copy with ``changes`` applied (every other field kept)."""
        return dataclasses.replace(self, **changes)

    def all_layers(self) -> LoraFactors:
        """The factors with every stacked layer present (zeros at unselected layers).

        Example:
          >>> import jax.numpy as jnp, lora_jax as lj
          >>> f = lj.LoraFactors(jnp.ones((1, 2, 1)), jnp.ones((1, 1, 3)), alpha=1.0,
          ...                    layout=lj.KernelLayout("sio"),
          ...                    layers=lj.advanced.LayerSelection((2,), 3))
          >>> f.all_layers().a[:, 0, 0]
          Array([0., 0., 1.], dtype=float32)
        """
        if self.layers is None:
            return self
        if self.magnitude is not None:
            # An unselected layer's DoRA magnitude would have to be its base norm.
            raise LoraStructureError(
                f"DoRA magnitudes of layers {self.layers.indices} cannot be filled in for the "
                f"other layers of {self.layers.total} (their magnitude is the base weight's norm)"
            )
        return self.replace(
            a=self.layers.scatter(self.a), b=self.layers.scatter(self.b), layers=None
        )

    def select_layers(self, layers: LayerSelection) -> LoraFactors:
        """The factors of ``layers`` only (from factors holding every layer)."""
        if self.layers is not None:
            raise LoraStructureError(f"the factors already hold a layer selection ({self.layers})")
        return self.replace(a=layers.gather(self.a), b=layers.gather(self.b), layers=layers)

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """The layout's rank of axes, the layer selection and both factor shapes against a
        kernel of ``shape``.

        Example:
          >>> f = LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=1.0,
          ...                 layout=KernelLayout("io"))
          >>> f.check_fits("w", (4, 5))
          Traceback (most recent call last):
          ...
          lora_jax._errors.LoraStructureError: leaf 'w': factors A(4, 2) B(2, 3) do not fit the base kernel of shape (4, 5) (layout 'io'); expected A(4, 2) B(2, 5)
        """
        layout = self.layout
        if len(shape) != layout.ndim:
            raise LoraStructureError(
                f"leaf {path!r}: the base kernel has shape {shape} but the delta's layout "
                f"{layout.axes!r} is for a {layout.ndim}-D kernel"
            )
        if self.layers is not None and (
            not layout.stack_axes or self.layers.total != shape[layout.stack_axes[0]]
        ):
            raise LoraStructureError(
                f"leaf {path!r}: factors for layers {self.layers.indices} of {self.layers.total} "
                f"do not fit a kernel of shape {shape} (layout {layout.axes!r})"
            )
        want: tuple[tuple[int, ...], ...] = layout.factor_shapes(shape, self.rank)
        if self.layers is not None:  # only the selected layers of the first stacked axis
            want = tuple((len(self.layers.indices),) + w[1:] for w in want)
        got = (tuple(np.shape(self.a)), tuple(np.shape(self.b)))
        if got != want:
            raise LoraStructureError(
                f"leaf {path!r}: factors A{got[0]} B{got[1]} do not fit the base kernel of "
                f"shape {shape} (layout {layout.axes!r}); expected A{want[0]} B{want[1]}"
            )
        if self.segments:
            check_segments(self.segments, self.rank, layout.fan_out(shape), path)


jax.tree_util.register_dataclass(
    LoraFactors,
    data_fields=["a", "b", "magnitude"],
    meta_fields=["alpha", "layout", "rslora", "layers", "segments"],
)


@dataclasses.dataclass(frozen=True)
class LeafDelta(DeltaEntry):
    """A leaf trained in full beside the low-rank factors (a bias, a head, a norm).

    Stored additively, like the factors: the adapted value is ``W + diff``,
    ``diff`` starts at zero (so step 0 is the base model), weight decay pulls it
    back toward the base, and :func:`lora_jax.unmerge` is exact. PEFT's
    ``modules_to_save`` / ``bias="all"`` hold ``W + diff``.

    Attributes:
      diff: an array with the leaf's shape.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.LeafDelta(jnp.zeros((3,))).kernel_shape
      (3,)
    """

    diff: Any

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the leaf this delta adapts."""
        return tuple(np.shape(self.diff))

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """``diff`` must have the leaf's shape."""
        if self.kernel_shape != shape:
            raise LoraStructureError(
                f"leaf {path!r}: the trained-in-full delta has shape {self.kernel_shape}, "
                f"the base leaf {shape}"
            )


jax.tree_util.register_dataclass(LeafDelta, data_fields=["diff"], meta_fields=[])


class ValueDelta(DeltaEntry):
    """An entry that updates its leaf's value directly (:class:`LoraBias`, :class:`TokenRows`).

    :meth:`apply` gives ``W + update`` and :meth:`remove` ``W - update``, both in
    float32 (the caller casts back), so ``merge``, ``unmerge`` and ``implicit``
    (which applies it to the leaf where the leaf enters the function) treat
    every such entry alike.
    """

    def apply(self, w: Array) -> Array:
        """``W`` (float32) with the update added."""
        raise NotImplementedError

    def remove(self, w: Array) -> Array:
        """``W'`` (float32) with the update taken out: the inverse of :meth:`apply`."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Trainable parameters held by the entry."""
        return int(sum(np.size(x) for x in jax.tree.leaves(self)))


@dataclasses.dataclass(frozen=True)
class LoraBias(ValueDelta):
    """PEFT's ``lora_bias``: a trainable bias ``b`` of ``lora_B``, at the base **bias** leaf.

    PEFT's ``lora_B`` is then ``nn.Linear(r, out, bias=True)``, so the adapted
    layer computes ``x W + c + s (x A B + b)``: the bias leaf's value becomes
    ``c + s b`` (what :func:`lora_jax.merge` writes). ``b`` starts at zero, as
    in PEFT; ``scale`` is the scale ``s`` of the kernel beside it (static).

    Attributes:
      b: an array with the bias leaf's shape (``(*stack, *fan_out)``).
      scale: ``s`` of the adapted kernel (static).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.LoraBias(jnp.ones(3), scale=2.0).apply(jnp.zeros(3))
      Array([2., 2., 2.], dtype=float32)
    """

    b: Any
    _: dataclasses.KW_ONLY
    scale: float

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the bias leaf."""
        return tuple(np.shape(self.b))

    def apply(self, w: Array) -> Array:
        return jnp.asarray(w, jnp.float32) + self.scale * jnp.asarray(self.b, jnp.float32)

    def remove(self, w: Array) -> Array:
        return jnp.asarray(w, jnp.float32) - self.scale * jnp.asarray(self.b, jnp.float32)

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """``b`` must have the bias leaf's shape."""
        if self.kernel_shape != shape:
            raise LoraStructureError(
                f"leaf {path!r}: the LoRA bias b has shape {self.kernel_shape}, the base bias "
                f"{shape}"
            )


jax.tree_util.register_dataclass(LoraBias, data_fields=["b"], meta_fields=["scale"])


@dataclasses.dataclass(frozen=True)
class TokenRows(ValueDelta):
    """PEFT's trainable tokens: rows ``indices`` of an embedding table ``(vocab, dim)``
    trained in full, stored additively.

    The adapted table is ``W.at[indices].add(diff)``: those rows become
    ``W[indices] + diff`` (PEFT stores, and sets, the full rows
    ``W[indices] + diff``), every other row is ``W``'s. An output head tied
    to the table (Flax's ``embed.attend``) reads the same leaf, so it sees
    the same rows, as PEFT ties them. ``diff`` starts at zero; ``indices``
    are static (they are the adapter's configuration, not parameters).

    Attributes:
      diff: ``(k, dim)``, one row per index.
      indices: ``k`` distinct row indices (static).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.TokenRows(jnp.ones((1, 2)), indices=(2,)).apply(jnp.zeros((3, 2)))[:, 0]
      Array([0., 0., 1.], dtype=float32)
    """

    diff: Any
    _: dataclasses.KW_ONLY
    indices: tuple[int, ...]

    def __post_init__(self):
        idx = tuple(int(i) for i in self.indices)
        if not idx or len(set(idx)) != len(idx) or min(idx) < 0:
            raise LoraStructureError(
                f"TokenRows needs distinct row indices >= 0, got {self.indices!r}"
            )
        object.__setattr__(self, "indices", idx)

    def apply(self, w: Array) -> Array:
        rows = np.asarray(self.indices)
        return jnp.asarray(w, jnp.float32).at[rows].add(jnp.asarray(self.diff, jnp.float32))

    def remove(self, w: Array) -> Array:
        rows = np.asarray(self.indices)
        return jnp.asarray(w, jnp.float32).at[rows].add(-jnp.asarray(self.diff, jnp.float32))

    def check_fits(self, path: str, shape: tuple[int, ...]) -> None:
        """A 2-D table with every index in range and ``diff`` ``(k, dim)``.

        Example:
          >>> TokenRows(jnp.zeros((1, 4)), indices=(9,)).check_fits("embed", (8, 4))
          Traceback (most recent call last):
          ...
          lora_jax._errors.LoraStructureError: leaf 'embed': trainable token rows (9,) do not fit a table of shape (8, 4); expected diff (1, 4) and indices < 8
        """
        want = (len(self.indices),) + tuple(shape[1:])
        if len(shape) != 2 or tuple(np.shape(self.diff)) != want or max(self.indices) >= shape[0]:
            raise LoraStructureError(
                f"leaf {path!r}: trainable token rows {self.indices} do not fit a table of "
                f"shape {shape}; expected diff {want} and indices < {shape[0] if shape else 0}"
            )


jax.tree_util.register_dataclass(TokenRows, data_fields=["diff"], meta_fields=["indices"])


def is_factors(x: Any) -> bool:
    """True for a :class:`LoraFactors` node (use as ``is_leaf`` in tree maps).

    Example:
      >>> is_factors(LoraFactors(jnp.ones((2, 1)), jnp.ones((1, 2)), alpha=1.0,
      ...                        layout=KernelLayout("io")))
      True
    """
    return isinstance(x, LoraFactors)


def is_delta_leaf(x: Any) -> bool:
    """True for a :class:`LoraFactors`, :class:`LeafDelta` or :class:`ValueDelta` node.

    Example:
      >>> is_delta_leaf(LeafDelta(jnp.zeros(2))), is_delta_leaf(jnp.zeros(2))
      (True, False)
    """
    return isinstance(x, (LoraFactors, LeafDelta, ValueDelta))


# --------------------------------------------------------------------------- dense forms


def factor_product(a: Array, b: Array, scale: float, n_stack: int) -> Array:
    """``scale * A @ B`` in factor order ``(*stack, *fan_in, *fan_out)``, float32.

    Args:
      a: ``(*stack, *fan_in, r)``.
      b: ``(*stack, r, *fan_out)``.
      scale: ``s``.
      n_stack: number of leading batch axes (stacked and experts, :attr:`KernelLayout.batch_axes`).

    Example:
      >>> factor_product(jnp.ones((3, 1)), jnp.ones((1, 2)), 2.0, 0).shape
      (3, 2)
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    stack, fan_in, fan_out = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    r = a.shape[-1]
    dense = (
        jnp.matmul(
            a.reshape(stack + (math.prod(fan_in), r)),
            b.reshape(stack + (r, math.prod(fan_out))),
            precision=jax.lax.Precision.HIGHEST,
        )
        * scale
    )
    return dense.reshape(stack + fan_in + fan_out)


def dense_delta(factors: LoraFactors) -> Array:
    """The dense update ``s * A @ B`` in the kernel's own axis order, in float32.

    Args:
      factors: ``a: (*stack, *fan_in, r)``, ``b: (*stack, r, *fan_out)``.

    Returns:
      A float32 array with the kernel's shape (every stacked layer).

    Example:
      >>> f = LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), alpha=2.0, layout=KernelLayout("io"))
      >>> dense_delta(f)
      Array([[2., 2.],
             [2., 2.],
             [2., 2.]], dtype=float32)
    """
    factors = factors.all_layers().masked()
    layout = factors.layout
    dense = factor_product(factors.a, factors.b, factors.scale, len(layout.batch_axes))
    return jnp.transpose(dense, np.argsort(layout.permutation).tolist())


# --------------------------------------------------------------------------- DoRA


def factor_order_norm(w: Array, a: Array, b: Array, scale: float, n_stack: int) -> Array:
    """``||W + s A B||`` over the fan-in axes, ``(*stack, *fan_out)`` float32.

    ``w`` is in factor order ``(*stack, *fan_in, *fan_out)``. The squared norm
    of each output column is expanded so that no dense ``W + s A B`` is formed:
    with ``W``, ``A``, ``B`` as ``(K, N)``, ``(K, r)``, ``(r, N)`` per stacked
    kernel, ``||W_j||^2 + 2 s (W^T A)_j . B_j + s^2 B_j^T (A^T A) B_j``.

    Example:
      >>> w, a, b = jnp.array([[3.0], [4.0]]), jnp.zeros((2, 1)), jnp.zeros((1, 1))
      >>> float(factor_order_norm(w, a, b, 1.0, 0)[0])
      5.0
    """
    w = jnp.asarray(w, jnp.float32)
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    stack, r = w.shape[:n_stack], a.shape[-1]
    fan_out = b.shape[n_stack + 1 :]
    w2 = w.reshape(stack + (-1, math.prod(fan_out)))
    a2 = a.reshape(stack + (-1, r))
    b2 = b.reshape(stack + (r, math.prod(fan_out)))
    hi = jax.lax.Precision.HIGHEST
    wta = jnp.matmul(jnp.swapaxes(w2, -1, -2), a2, precision=hi)  # (N, r)
    gram = jnp.matmul(jnp.swapaxes(a2, -1, -2), a2, precision=hi)  # (r, r)
    sq = (
        jnp.sum(w2 * w2, axis=-2)
        + 2 * scale * jnp.sum(jnp.swapaxes(wta, -1, -2) * b2, axis=-2)
        + scale * scale * jnp.sum(b2 * jnp.matmul(gram, b2, precision=hi), axis=-2)
    )
    return jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(stack + fan_out)


def column_norm(kernel: Array, layout: KernelLayout, factors: LoraFactors | None = None) -> Array:
    """DoRA's ``||W + s A B||_c``: the L2 norm over the fan-in axes, ``(*stack, *fan_out)``.

    PEFT's per-output-feature weight norm, for Linear, Conv and Embedding
    alike, in float32; without ``factors``, ``||W||_c``.

    Example:
      >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), KernelLayout("io"))
      Array([5., 1.], dtype=float32)
    """
    w = jnp.transpose(jnp.asarray(kernel, jnp.float32), layout.permutation)
    ns = len(layout.batch_axes)
    if factors is None:
        n_in = len(layout.in_axes)
        return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(ns, ns + n_in))))
    factors = factors.all_layers().masked()
    return factor_order_norm(w, factors.a, factors.b, factors.scale, ns)


def to_kernel_axes(per_output: Array, layout: KernelLayout) -> Array:
    """Broadcasts a ``(*stack, *fan_out)`` array against the kernel's axes.

    Example:
      >>> to_kernel_axes(jnp.ones(3), KernelLayout("io")).shape
      (1, 3)
    """
    ns, ni = len(layout.batch_axes), len(layout.in_axes)
    x = jnp.expand_dims(per_output, tuple(range(ns, ns + ni)))
    return jnp.transpose(x, np.argsort(layout.permutation).tolist())


def dora_weight(kernel: Array, factors: LoraFactors, norm: Array | None = None) -> Array:
    """DoRA's merged kernel ``m * (W + s A B) / ||W + s A B||_c``, float32, kernel order.

    Args:
      kernel: ``W``, any dtype.
      factors: factors with a ``magnitude`` ``(*stack, *fan_out)``.
      norm: ``||W + s A B||_c`` if already known; it is treated as a constant
        (``stop_gradient``), as in the DoRA paper and PEFT.

    Example:
      >>> f = LoraFactors(jnp.zeros((2, 1)), jnp.zeros((1, 2)), alpha=1.0,
      ...                 layout=KernelLayout("io"), magnitude=jnp.array([10.0, 1.0]))
      >>> dora_weight(jnp.array([[3.0, 0.0], [4.0, 1.0]]), f)
      Array([[6., 0.],
             [8., 1.]], dtype=float32)
    """
    layout = factors.layout
    merged = jnp.asarray(kernel, jnp.float32) + dense_delta(factors)
    if norm is None:
        norm = column_norm(kernel, layout, factors)
    ratio = jnp.asarray(factors.magnitude, jnp.float32) / jax.lax.stop_gradient(norm)
    return merged * to_kernel_axes(ratio, layout)


# --------------------------------------------------------------------------- pairing


Row = tuple[str, Any, Any]  # (path, base leaf, LoraFactors | LeafDelta | None)


def align(params: Any, delta: Any, stacked_ok: bool = False) -> tuple[list[Row], Any]:
    """Pairs every leaf of ``params`` with its delta entry (or None).

    Args:
      params: a params pytree.
      delta: a delta with the same structure (``None``, :class:`LoraFactors`
        or :class:`LeafDelta` at each leaf).

    Returns:
      ``([(path, leaf, entry_or_None), ...], treedef_of_params)``.

    Raises:
      LoraStructureError: the delta's structure differs from the params', or
        an entry does not fit its leaf's shape; the message names the leaf.
        Adapter stacks (:class:`~lora_jax.StackedFactors`) are entries only
        with ``stacked_ok`` (``implicit`` serves them; ``merge`` cannot).

    Example:
      >>> rows, _ = align({"w": jnp.ones((2, 2))}, {"w": None})
      >>> rows[0][0], rows[0][2]
      ('w', None)
    """
    leaves, treedef = leaves_with_paths(params)
    try:
        entries = treedef.flatten_up_to(delta)
    except (ValueError, TypeError) as e:
        raise LoraStructureError(_structure_message(params, delta, e)) from None
    for (path, leaf), entry in zip(leaves, entries):
        if entry is not None:
            check_fits(path, tuple(getattr(leaf, "shape", ())), entry, stacked_ok)
    return [(path, leaf, entry) for (path, leaf), entry in zip(leaves, entries)], treedef


def check_fits(path: str, shape: tuple[int, ...], entry: Any, stacked_ok: bool = False) -> None:
    """Raises :class:`LoraStructureError` unless ``entry`` adapts a leaf of ``shape``.

    ``entry`` must be a :class:`DeltaEntry`, which checks itself; one that only
    ``implicit`` serves (an adapter stack) needs ``stacked_ok``.

    Example:
      >>> check_fits("w", (2, 3), LeafDelta(jnp.zeros((2, 2))))
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraStructureError: leaf 'w': the trained-in-full delta has shape (2, 2), the base leaf (2, 3)
    """
    if not isinstance(entry, DeltaEntry):
        raise LoraStructureError(
            f"leaf {path!r}: the delta holds {type(entry).__name__}, expected LoraFactors, "
            "LeafDelta or None"
        )
    if entry.serving_only and not stacked_ok:
        raise LoraStructureError(
            f"leaf {path!r}: the delta holds an adapter stack ({type(entry).__name__}); only "
            "implicit(...)(base, stack, x, adapter_ids=ids) serves a stack: merge one "
            "adapter of it (lora_jax.advanced.unstack) instead"
        )
    entry.check_fits(path, shape)


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
            "the delta's tree structure does not match the base's: it has no entry "
            f"(LoraFactors or None) for the base leaves {missing[:5]}"
        )
    return f"the delta's tree structure does not match the base's: {error}"


def map_entries(
    fn: Callable[[str, Any, Any], Any],
    params: Any,
    delta: Any,
    skip: Callable[[Any], bool] = lambda entry: entry is None,
) -> Any:
    """``params`` with each leaf replaced by ``fn(path, leaf, entry)``, except where ``skip(entry)``.

    Example:
      >>> map_entries(lambda p, w, e: w + e.diff, {"w": jnp.ones(2)},
      ...             {"w": LeafDelta(jnp.ones(2))})["w"]
      Array([2., 2.], dtype=float32)
    """
    rows, treedef = align(params, delta)
    return jax.tree_util.tree_unflatten(
        treedef, [leaf if skip(entry) else fn(path, leaf, entry) for path, leaf, entry in rows]
    )


def delta_entries(delta: Any) -> list[tuple[str, Any]]:
    """``[(path, LoraFactors | LeafDelta | None), ...]`` of a delta; anything else is an error.

    Example:
      >>> delta_entries({"w": LeafDelta(jnp.zeros(2)), "b": None})
      [('b', None), ('w', LeafDelta(diff=Array([0., 0.], dtype=float32)))]
    """
    entries, _ = leaves_with_paths(delta, is_leaf=lambda x: x is None or is_delta_leaf(x))
    for path, leaf in entries:
        if leaf is not None and not is_delta_leaf(leaf):
            raise LoraStructureError(
                f"leaf {path!r}: a delta holds LoraFactors, LeafDelta or None at each leaf, got "
                f"{type(leaf).__name__} (pass the delta, not the params)"
            )
    return entries
