"""A frozen kernel seen together with its LoRA factors, as it flows through a jaxpr.

While :func:`lora_jax.implicit` interprets a function, every targeted kernel is
carried as a :class:`LoraView` instead of a dense array: the frozen kernel
``w`` (in its current axis order and original dtype), the factors ``a`` and
``b``, and for each current axis its *role*:

* ``("s", j)`` -- stacked axis ``j`` of ``a`` and ``b``;
* ``("i", j)`` -- fan-in axis ``j`` of ``a`` (``a`` is ``(*stack, *fan_in, r)``);
* ``("o", j)`` -- fan-out axis ``j`` of ``b`` (``b`` is ``(*stack, r, *fan_out)``).

Transposes permute the roles and casts change ``dtype``; neither touches the
arrays. The view stands for the dense kernel
``(w + scale * A @ B).astype(dtype)`` in the current axis order, which
:meth:`LoraView.materialize` builds when no low-rank rule applies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.factors import LoraFactors

Array = jax.Array
Role = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class LoraView:
    """A kernel plus factors; see the module docstring.

    Attributes:
      w: the frozen kernel, current axis order, original dtype.
      a: ``(*stack, *fan_in, r)``.
      b: ``(*stack, r, *fan_out)``.
      roles: one :data:`Role` per axis of ``w``.
      scale: ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).
      dtype: the dtype the program sees the kernel in.
      path: the kernel's leaf path, for messages.
    """

    w: Any
    a: Any
    b: Any
    roles: tuple[Role, ...]
    scale: float
    dtype: Any
    path: str

    @staticmethod
    def of(path: str, w: Array, f: LoraFactors) -> "LoraView":
        """The view of kernel ``w`` (layout order as stored) with factors ``f``."""
        counters = {"s": 0, "i": 0, "o": 0}
        roles = []
        for letter in f.layout.axes:
            roles.append((letter, counters[letter]))
            counters[letter] += 1
        return LoraView(w, f.a, f.b, tuple(roles), f.scale, jnp.dtype(w.dtype), path)

    @property
    def n_stack(self) -> int:
        return np.ndim(self.a) - sum(1 for k, _ in self.roles if k == "i") - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.w))

    def replace(self, **changes: Any) -> "LoraView":
        return dataclasses.replace(self, **changes)

    def frozen(self) -> Array:
        """``stop_gradient(w)`` cast to the program's dtype."""
        return jax.lax.stop_gradient(self.w).astype(self.dtype)

    def update(self) -> Array:
        """``scale * A @ B`` in float32, in the view's current axis order."""
        a = jnp.asarray(self.a, jnp.float32)
        b = jnp.asarray(self.b, jnp.float32)
        ns = self.n_stack
        stack, fan_in, fan_out = a.shape[:ns], a.shape[ns:-1], b.shape[ns + 1:]
        r = a.shape[-1]
        full = jnp.matmul(a.reshape(stack + (math.prod(fan_in), r)),
                          b.reshape(stack + (r, math.prod(fan_out))),
                          precision=jax.lax.Precision.HIGHEST) * self.scale
        full = full.reshape(stack + fan_in + fan_out)
        offset = {"s": 0, "i": ns, "o": ns + len(fan_in)}
        return jnp.transpose(full, [offset[k] + j for k, j in self.roles])

    def materialize(self) -> Array:
        """The dense kernel ``(w + scale * A @ B).astype(dtype)``; ``w`` gets no gradient."""
        w = jax.lax.stop_gradient(self.w).astype(jnp.float32)
        return (w + self.update()).astype(self.dtype)

    def transpose(self, permutation: tuple[int, ...]) -> "LoraView":
        return self.replace(w=jnp.transpose(self.w, permutation),
                            roles=tuple(self.roles[p] for p in permutation))

    def factor_pair(self, contracted: str) -> tuple[Array, Array, str]:
        """Factors ordered so that the first one meets the contracted side.

        Returns ``(fa, fb, free)`` with ``fa: (*stack, *contracted_axes, r)``,
        ``fb: (*stack, r, *free_axes)`` and ``free`` the role letter of the
        free axes. Contracting the fan-out side (``x @ W.T``, as in Flax's
        ``Embed.attend``) uses ``B^T`` first and ``A^T`` second.
        """
        if contracted == "i":
            return self.a, self.b, "o"
        ns = self.n_stack
        return jnp.moveaxis(self.b, ns, -1), jnp.moveaxis(self.a, -1, ns), "i"

    def sliced(self, axis_role: Role) -> tuple[Array, Array]:
        """``a``, ``b`` with stacked axis ``axis_role`` moved to the front (for ``lax.scan``)."""
        _, j = axis_role
        return jnp.moveaxis(self.a, j, 0), jnp.moveaxis(self.b, j, 0)


def drop_stack_role(roles: tuple[Role, ...], removed: Role) -> tuple[Role, ...]:
    """Roles after stacked axis ``removed`` has been sliced away."""
    _, j = removed
    return tuple(
        (k, i - 1 if k == "s" and i > j else i) for k, i in roles if (k, i) != removed
    )


jax.tree_util.register_dataclass(
    LoraView, data_fields=["w", "a", "b"], meta_fields=["roles", "scale", "dtype", "path"]
)
