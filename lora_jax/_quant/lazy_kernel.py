"""A quantized kernel carried lazily through :func:`lora_jax.implicit`'s interpreter.

:class:`LazyKernel` stands for ``post(dequantize(q))``: a
:class:`~lora_jax.QuantizedArray` ``q`` and a chain of layout operations
(transposes, reshapes) to apply after dequantizing. What a program does to a
kernel before using it is recorded, not computed; the dense kernel is made
only where the kernel meets its input (:meth:`LazyKernel.dense`), so a
program never holds a dense copy of a kernel longer than its one use, and
under :func:`use` the backward recomputes it from the codes instead of
keeping it.

Stacked axes are cut on the stored codes and scales directly (they are
stored first, see :mod:`lora_jax._quant.array`): a slice of stacked axes
(``w[i]`` in a ``fori_loop``), dropping a size-1 stacked axis, and
``lax.scan`` over the first stacked axis (:meth:`LazyKernel.scanned`) all
read one layer's codes without dequantizing the others. They apply while no
post operation has been recorded (else the caller materialises: correct,
with a warning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._layout import BATCH_LETTERS
from lora_jax._quant.array import QuantizedArray, dequantize_leaf

Array = jax.Array
FIELDS = ("codes", "scales", "dq_scales", "dq_offset")


@dataclasses.dataclass(frozen=True)
class LazyKernel:
    """``post(dequantize(q))`` with ``post`` a tuple of ``("t", perm)`` / ``("r", shape)``.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"w": jnp.ones((64, 4))}, "w", scheme="int8")["w"]
      >>> k = LazyKernel(q).transpose((1, 0)).reshape((2, 2, 64))
      >>> k.shape, k.dense(jnp.bfloat16).dtype
      ((2, 2, 64), dtype(bfloat16))
    """

    q: QuantizedArray
    post: tuple = ()

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.q.shape
        for op, arg in self.post:
            shape = tuple(shape[p] for p in arg) if op == "t" else tuple(arg)
        return shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> Any:
        return self.q.dtype

    def dense(self, dtype: Any = None) -> Array:
        """The dense kernel in ``dtype`` (the codes and scales under ``stop_gradient``).

        Dequantized to the kernel's logical dtype first, then cast, exactly as a
        program casting the dequantized kernel would see it."""
        q = jax.tree.map(jax.lax.stop_gradient, self.q)
        x = dequantize_leaf(q)
        x = x if dtype is None else x.astype(dtype)
        for op, arg in self.post:
            x = jnp.transpose(x, arg) if op == "t" else jnp.reshape(x, arg)
        return x

    def transpose(self, perm: tuple[int, ...]) -> LazyKernel:
        perm = tuple(int(p) for p in perm)
        if perm == tuple(range(len(perm))):
            return self
        return LazyKernel(self.q, self.post + (("t", perm),))

    def reshape(self, shape: tuple[int, ...]) -> LazyKernel:
        shape = tuple(int(d) for d in shape)
        if shape == self.shape:
            return self
        dropped = _dropped_stack_axis(self, shape)
        if dropped is not None:
            return LazyKernel(_drop_stack_axis(self.q, dropped))
        return LazyKernel(self.q, self.post + (("r", shape),))

    def slice_stack(
        self, starts: list[Any], sizes: list[int], slicer: Callable[[Any, list, list], Any]
    ) -> LazyKernel | None:
        """The kernel cut along stacked axes only (``slicer`` is ``lax.slice``-like), or None."""
        if self.post:
            return None
        q = self.q
        stack_axes = [d for d, c in enumerate(q.axes) if c in BATCH_LETTERS]
        if any(sizes[d] != q.shape[d] for d in range(q.ndim) if d not in stack_axes):
            return None
        s_starts = [starts[d] for d in stack_axes]
        s_sizes = [sizes[d] for d in stack_axes]

        def cut(x):
            if x is None:
                return None
            rest = list(np.shape(x)[len(stack_axes) :])
            return slicer(x, s_starts + [0] * len(rest), s_sizes + rest)

        shape = tuple(int(n) for n in sizes)
        return LazyKernel(
            dataclasses.replace(q, **{f: cut(getattr(q, f)) for f in FIELDS}, shape=shape)
        )

    def scanned(self) -> LazyKernel | None:
        """The per-layer kernel whose stored arrays still hold the leading stacked axis:
        what ``lax.scan`` over axis 0 slices into one layer's kernel (None if it cannot)."""
        if self.post or self.q.axes[0] not in BATCH_LETTERS:
            return None
        return LazyKernel(dataclasses.replace(self.q, shape=self.q.shape[1:], axes=self.q.axes[1:]))


jax.tree_util.register_dataclass(LazyKernel, data_fields=["q"], meta_fields=["post"])


def _dropped_stack_axis(k: LazyKernel, shape: tuple[int, ...]) -> int | None:
    """The size-1 stacked axis a reshape to ``shape`` removes (nothing else changing), or None."""
    if k.post or len(shape) != k.ndim - 1:
        return None
    for d, c in enumerate(k.q.axes):
        if c in BATCH_LETTERS and k.q.shape[d] == 1 and k.q.shape[:d] + k.q.shape[d + 1 :] == shape:
            return d
    return None


def _drop_stack_axis(q: QuantizedArray, d: int) -> QuantizedArray:
    k = sum(c in BATCH_LETTERS for c in q.axes[:d])  # its position among the stored batch axes
    drop: dict[str, Any] = {
        f: None if getattr(q, f) is None else jnp.squeeze(getattr(q, f), k) for f in FIELDS
    }
    return dataclasses.replace(
        q, **drop, shape=q.shape[:d] + q.shape[d + 1 :], axes=q.axes[:d] + q.axes[d + 1 :]
    )


def use(fn: Callable[..., Array], x: Array, kernel: Any, dtype: Any, *aux: Array) -> Array:
    """``fn(x, W, *aux)`` with ``W`` the kernel in ``dtype``, ``fn`` linear in ``x``.

    ``aux`` are further operands that get no gradient (``ragged_dot``'s group sizes).

    A lazy kernel is dequantized here and, in the backward, dequantized again
    from its codes (never saved dense), tied to the incoming cotangent so that
    XLA cannot compute it before this use's backward. ``fn`` is linear in
    ``x``, so the backward is its transpose at ``W``: ``x`` itself is not saved
    (the frozen model's own backward does not keep it either).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> q = lj.quantize({"w": jnp.ones((64, 4))}, "w", scheme="int8")["w"]
      >>> use(jnp.matmul, jnp.ones((2, 64)), LazyKernel(q), jnp.float32)
      Array([[64., 64., 64., 64.],
             [64., 64., 64., 64.]], dtype=float32)
    """
    if not isinstance(kernel, LazyKernel):
        return fn(x, jax.lax.stop_gradient(kernel).astype(dtype), *aux)

    x_aval = jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))

    def tied(k, v):
        """W from codes and scales both tied to ``v``: computed only once ``v`` exists, and
        no part of it the same expression in the forward and the backward. Tying only the
        scales let XLA share the forward's ``table[codes]`` with the backward, tying only the
        codes its broadcast absmax: either kept a dense f32 array per kernel alive from the
        forward to the backward (+46 MiB on the reference workload)."""
        q = k.q
        zero = jnp.zeros((), jnp.float32) * jnp.ravel(v)[0].astype(jnp.float32)
        field = "scales" if q.dq_scales is None else "dq_scales"
        q = dataclasses.replace(
            q, codes=q.codes + zero.astype(q.codes.dtype), **{field: getattr(q, field) + zero}
        )
        return dataclasses.replace(k, q=q).dense(dtype)

    @jax.custom_vjp
    def product(x_, k, *aux_):
        return fn(x_, tied(k, x_), *aux_)

    def forward(x_, k, *aux_):
        return fn(x_, tied(k, x_), *aux_), (k, aux_)  # linear in x: the backward needs only W

    def backward(res, g):
        k, aux_ = res
        w = tied(k, g)
        if jnp.issubdtype(x_aval.dtype, jnp.inexact):
            dx = jax.linear_transpose(lambda v: fn(v, w, *aux_), x_aval)(g)[0]
        else:  # integer operands (gather indices) get no cotangent
            dx = np.zeros(x_aval.shape, jax.dtypes.float0)
        return (dx, jax.tree.map(_zero_cotangent, k), *map(_zero_cotangent, aux_))

    product.defvjp(forward, backward)
    return product(x, kernel, *aux)


def _zero_cotangent(a: Array) -> Any:
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def is_lazy(x: Any) -> bool:
    """True for a :class:`LazyKernel`.

    Example:
      >>> is_lazy(jnp.ones(2))
      False
    """
    return isinstance(x, LazyKernel)
