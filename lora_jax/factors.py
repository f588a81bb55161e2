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

    @property
    def rank(self) -> int:
        """The rank ``r``: the last axis of ``a``."""
        return int(np.shape(self.a)[-1])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    @property
    def num_params(self) -> int:
        """Trainable parameters held by ``a`` and ``b``."""
        extra = 0 if self.magnitude is None else np.size(self.magnitude)
        return int(np.size(self.a) + np.size(self.b) + extra)


jax.tree_util.register_dataclass(
    LoraFactors, data_fields=["a", "b", "magnitude"], meta_fields=["alpha", "rslora", "layout"]
)


def is_factors(x: Any) -> bool:
    """True for a :class:`LoraFactors` node (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LoraFactors)


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
    layout = factors.layout
    a = jnp.asarray(factors.a, jnp.float32)
    b = jnp.asarray(factors.b, jnp.float32)
    n_stack = len(layout.stack_axes)
    stack = a.shape[:n_stack]
    fan_in, fan_out = a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    r = a.shape[-1]
    a2 = a.reshape(stack + (math.prod(fan_in), r))
    b2 = b.reshape(stack + (r, math.prod(fan_out)))
    dense = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * factors.scale
    dense = dense.reshape(stack + fan_in + fan_out)
    return jnp.transpose(dense, np.argsort(layout.permutation))
