"""The low-rank factors of one kernel, and the dense update they stand for.

:class:`LoraFactors` is the leaf type of a delta: a frozen dataclass registered
as a pytree whose children are the arrays ``a`` and ``b`` and whose static
metadata (``alpha``, ``rslora``, ``layout``) says how to use them. Because the
metadata is static, ``jax.jit``, ``jax.grad``, optax and orbax see only the two
arrays.

The update a factor pair stands for, for a kernel laid out as
``(*stack, *fan_in, *fan_out)``:

.. math::

   \\Delta W = s \\, A B, \\qquad s = \\alpha / r \\;\\text{(or } \\alpha/\\sqrt{r}
   \\text{ with rsLoRA)}

with ``A: (*stack, *fan_in, r)`` and ``B: (*stack, r, *fan_out)``, contracted
over ``r`` and batched over the stacked axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layout import KernelLayout

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """Trainable factors ``a``, ``b`` of one targeted kernel.

    Attributes:
      a: ``(*stack, *fan_in, r)`` -- the fan-in side.
      b: ``(*stack, r, *fan_out)`` -- the fan-out side.
      alpha: the LoRA alpha of this kernel (static).
      rslora: if true the scale is ``alpha / sqrt(r)``, else ``alpha / r`` (static).
      layout: the kernel's :class:`KernelLayout` (static).
      magnitude: DoRA's trainable magnitude ``(*stack, *fan_out)``, or ``None``
        for plain LoRA.
      layers: for a scan-stacked kernel adapted on some layers only, the
        indices (along the first stacked axis) of those layers (static); ``a``,
        ``b`` then hold only them (leading axis ``len(layers)``) and the other
        layers' update is exactly zero. ``None``: every layer.
      num_layers: the full length of the first stacked axis when ``layers`` is set.

    Example:
      >>> f = LoraFactors(jnp.ones((4, 2)), jnp.zeros((2, 3)), 16.0, False, KernelLayout("io"))
      >>> f.rank, f.scale
      (2, 8.0)
    """

    a: Any
    b: Any
    alpha: float
    rslora: bool
    layout: KernelLayout
    magnitude: Any = None
    layers: tuple[int, ...] | None = None
    num_layers: int = 0

    @property
    def rank(self) -> int:
        """The rank ``r``: the last axis of ``a``."""
        return int(np.shape(self.a)[-1])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    def expanded(self) -> "LoraFactors":
        """The factors with every stacked layer present (zeros at unselected layers).

        Example:
          >>> f = LoraFactors(jnp.ones((1, 2, 1)), jnp.ones((1, 1, 3)), 1.0, False,
          ...                 KernelLayout("sio"), layers=(2,), num_layers=3)
          >>> f.expanded().a[:, 0, 0]
          Array([0., 0., 1.], dtype=float32)
        """
        if self.layers is None:
            return self
        if self.magnitude is not None:
            # An unselected layer's DoRA magnitude would have to be its base norm.
            raise ValueError("DoRA magnitudes cannot be combined with layers= (LoraFactors "
                             f"with layers={self.layers})")
        index = np.asarray(self.layers)

        def full(x):
            if x is None:
                return None
            x = jnp.asarray(x)
            return jnp.zeros((self.num_layers,) + x.shape[1:], x.dtype).at[index].set(x)

        return LoraFactors(full(self.a), full(self.b), self.alpha, self.rslora, self.layout,
                           full(self.magnitude))

    @property
    def num_params(self) -> int:
        """Trainable parameters held by ``a`` and ``b``."""
        extra = 0 if self.magnitude is None else np.size(self.magnitude)
        return int(np.size(self.a) + np.size(self.b) + extra)


jax.tree_util.register_dataclass(
    LoraFactors, data_fields=["a", "b", "magnitude"],
    meta_fields=["alpha", "rslora", "layout", "layers", "num_layers"]
)


@dataclasses.dataclass(frozen=True)
class LeafDelta:
    """A leaf trained in full beside the low-rank factors (a bias, a head, a norm).

    Stored additively, like the factors: the adapted value is ``W + diff``,
    ``diff`` starts at zero (so step 0 is the base model), weight decay pulls it
    back toward the base, and :func:`lora_jax.unmerge` is exact. PEFT's
    ``modules_to_save`` / ``bias="all"`` hold ``W + diff``.

    Attributes:
      diff: an array with the leaf's shape.
    """

    diff: Any


jax.tree_util.register_dataclass(LeafDelta, data_fields=["diff"], meta_fields=[])


def is_factors(x: Any) -> bool:
    """True for a :class:`LoraFactors` node (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LoraFactors)


def is_delta_leaf(x: Any) -> bool:
    """True for a :class:`LoraFactors` or :class:`LeafDelta` node."""
    return isinstance(x, (LoraFactors, LeafDelta))


def factor_product(a: Array, b: Array, scale: float, n_stack: int) -> Array:
    """``scale * A @ B`` in factor order ``(*stack, *fan_in, *fan_out)``, float32.

    Args:
      a: ``(*stack, *fan_in, r)``.
      b: ``(*stack, r, *fan_out)``.
      scale: ``s``.
      n_stack: number of leading stacked axes.

    Example:
      >>> factor_product(jnp.ones((3, 1)), jnp.ones((1, 2)), 2.0, 0).shape
      (3, 2)
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    stack, fan_in, fan_out = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1:]
    r = a.shape[-1]
    dense = jnp.matmul(a.reshape(stack + (math.prod(fan_in), r)),
                       b.reshape(stack + (r, math.prod(fan_out))),
                       precision=jax.lax.Precision.HIGHEST) * scale
    return dense.reshape(stack + fan_in + fan_out)


def lora_update(factors: LoraFactors) -> Array:
    """The dense update ``s * A @ B`` in the kernel's own axis order, in float32.

    Args:
      factors: ``a: (*stack, *fan_in, r)``, ``b: (*stack, r, *fan_out)``.

    Returns:
      A float32 array with the kernel's shape.

    Example:
      >>> f = LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), 2.0, False, KernelLayout("io"))
      >>> lora_update(f)
      Array([[2., 2.],
             [2., 2.],
             [2., 2.]], dtype=float32)
    """
    factors = factors.expanded()
    layout = factors.layout
    dense = factor_product(factors.a, factors.b, factors.scale, len(layout.stack_axes))
    return jnp.transpose(dense, np.argsort(layout.permutation))


def column_norm(kernel: Array, layout: KernelLayout) -> Array:
    """L2 norm over the fan-in axes, one per output feature: ``(*stack, *fan_out)``.

    This is DoRA's ``||W||_c`` (PEFT's per-output-feature weight norm, for
    Linear, Conv and Embedding alike), in float32.

    Example:
      >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), KernelLayout("io"))
      Array([5., 1.], dtype=float32)
    """
    x = jnp.transpose(jnp.asarray(kernel, jnp.float32), layout.permutation)
    ns, ni = len(layout.stack_axes), len(layout.in_axes)
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(ns, ns + ni))))


def dora_weight(kernel: Array, factors: LoraFactors, norm: Array | None = None) -> Array:
    """DoRA's merged kernel ``m * (W + s A B) / ||W + s A B||_c``, float32, kernel order.

    Args:
      kernel: ``W``, any dtype.
      factors: factors with a ``magnitude`` ``(*stack, *fan_out)``.
      norm: ``||W + s A B||_c`` if already known; it is treated as a constant
        (``stop_gradient``), as in the DoRA paper and PEFT.

    Example:
      >>> f = LoraFactors(jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0, False, KernelLayout("io"),
      ...                 magnitude=jnp.array([10.0, 1.0]))
      >>> dora_weight(jnp.array([[3.0, 0.0], [4.0, 1.0]]), f)
      Array([[6., 0.],
             [8., 1.]], dtype=float32)
    """
    factors = factors.expanded()
    layout = factors.layout
    merged = jnp.asarray(kernel, jnp.float32) + lora_update(factors)
    if norm is None:
        norm = column_norm(merged, layout)
    ratio = jnp.asarray(factors.magnitude, jnp.float32) / jax.lax.stop_gradient(norm)
    return merged * _to_kernel_axes(ratio, layout)


def _to_kernel_axes(per_output: Array, layout: KernelLayout) -> Array:
    """Broadcasts a ``(*stack, *fan_out)`` array against the kernel's axes."""
    ns, ni = len(layout.stack_axes), len(layout.in_axes)
    x = jnp.expand_dims(per_output, tuple(range(ns, ns + ni)))
    return jnp.transpose(x, np.argsort(layout.permutation))
