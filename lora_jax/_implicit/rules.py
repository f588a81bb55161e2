"""Low-rank rules: where a kernel meets its input, add ``s * (x @ A) @ B``.

Each rule takes the operands of one primitive (one of them a
:class:`~lora_jax._implicit.view.LoraView`) and returns the primitive's output computed
as ``op(x, stop_gradient(W)) + s * low_rank(x)``, or ``None`` when the use
does not fit the low-rank form (the interpreter then materialises the kernel).

* ``dot_general``: the kernel's contracted axes must be exactly its fan-in
  axes (``x @ W``) or exactly its fan-out axes (``x @ W.T``, as in
  ``Embed.attend``), and its batch axes exactly its stacked axes. The input is
  flattened to ``(*stack, M, K)`` (:class:`DotAxes`) so both low-rank products
  are plain ``[M, K] @ [K, r]`` and ``[M, r] @ [r, N]`` matmuls, and
  :func:`~lora_jax._implicit.low_rank.low_rank`'s custom VJP keeps every
  backward product in that canonical form.
* ``conv_general_dilated``: ``A`` is a conv with the full window into ``r``
  channels, ``B`` a 1x1 conv (a matmul over the channel axis), as in PEFT.
* ``gather`` (embedding lookup): gather the rows of ``A``, then ``@ B``.

The axis bookkeeping of each (:class:`DotAxes`, :func:`conv_axes`,
:func:`gather_axes`) and the base products are shared with the rules for a
batch of mixed adapters (:mod:`lora_jax._serving.example_rules`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._implicit.low_rank import low_rank, low_rank_rebuilt
from lora_jax._implicit.view import LoraView

Array = jax.Array
Dropout = Callable[[Array], Array]
Source = tuple[tuple, Callable[[tuple], Array]]


# ---- dot_general ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DotAxes:
    """``dot_general(x, W)`` (or ``(W, x)``) as the product ``(*stack, M, K) @ (*stack, K, N)``.

    Attributes:
      kernel_is_rhs: the kernel is ``dot_general``'s second operand.
      contracted: the role of the kernel's contracted axes: ``"i"`` (``x @ W``)
        or ``"o"`` (``x @ W.T``).
      x_perm: ``x``'s axes in canonical order: batch axes in stack order, free
        axes, contracted axes in factor order.
      stack: the sizes of the stacked (batch) axes.
      m_shape: the sizes of ``x``'s free axes (``M`` is their product).
      k: ``K``, the product of the contracted sizes.
      out_shape: the sizes of the kernel's free axes in factor order (``N``).
      out_order: ``(*stack, *m_shape, *out_shape)`` -> ``dot_general``'s output
        order (batch axes, then lhs free, then rhs free).
      kb: the kernel's batch axes; k_free: its free axes.

    Example:
      >>> from lora_jax import KernelLayout, LoraFactors
      >>> f = LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=1.0,
      ...                 layout=KernelLayout("io"))
      >>> view = LoraView.of("w", jnp.ones((4, 3)), f)
      >>> dims = {"dimension_numbers": (((2,), (0,)), ((), ()))}
      >>> d = DotAxes.of(jnp.ones((5, 6, 4)), view, True, dims)
      >>> d.contracted, d.x_perm, d.m_shape, d.k, d.out_shape, d.out_order
      ('i', [0, 1, 2], (5, 6), 4, (3,), [0, 1, 2])
    """

    kernel_is_rhs: bool
    contracted: str
    x_perm: list[int]
    stack: tuple[int, ...]
    m_shape: tuple[int, ...]
    k: int
    out_shape: tuple[int, ...]
    out_order: list[int]
    kb: tuple[int, ...]
    k_free: list[int]

    @staticmethod
    def of(x: Array, view: LoraView, kernel_is_rhs: bool, params: dict) -> DotAxes | None:
        """The axes of one use, or None when it does not fit (see :func:`dot_general_rule`)."""
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        xc, kc, xb, kb = (lc, rc, lb, rb) if kernel_is_rhs else (rc, lc, rb, lb)
        contracted = _contracted_role(view, kc, kb)
        if contracted is None:
            return None
        in_role_order = lambda ks, xs: [  # noqa: E731
            x_d for _, x_d in sorted(zip((view.roles[d][1] for d in ks), xs))
        ]
        xb_sorted, xc_sorted = in_role_order(kb, xb), in_role_order(kc, xc)
        x_free = [d for d in range(x.ndim) if d not in xb and d not in xc]
        k_free = [d for d in range(len(view.roles)) if d not in kc and d not in kb]
        ns, nm = view.n_stack, len(x_free)
        x_axes = [ns + i for i in range(nm)]
        k_axes = [ns + nm + view.roles[d][1] for d in k_free]
        return DotAxes(
            kernel_is_rhs,
            contracted,
            xb_sorted + x_free + xc_sorted,
            tuple(x.shape[d] for d in xb_sorted),
            tuple(x.shape[d] for d in x_free),
            math.prod(x.shape[d] for d in xc),
            tuple(view.shape[d] for d in sorted(k_free, key=lambda d: view.roles[d][1])),
            [view.roles[d][1] for d in kb]
            + (x_axes + k_axes if kernel_is_rhs else k_axes + x_axes),
            tuple(kb),
            k_free,
        )

    def canonical(self, v: Array) -> Array:
        """An input ``v`` shaped like ``x`` as ``(*stack, M, K)``."""
        v = v if self.x_perm == list(range(v.ndim)) else jnp.transpose(v, self.x_perm)
        return v.reshape(self.stack + (math.prod(self.m_shape), self.k))

    def restore(self, y: Array) -> Array:
        """A canonical ``(*stack, M, N)`` result in ``dot_general``'s output shape and order."""
        y = y.reshape(self.stack + self.m_shape + self.out_shape)
        return jnp.transpose(y, self.out_order)


def dot_general_rule(
    x: Array,
    view: LoraView,
    kernel_is_rhs: bool,
    params: dict,
    dropout: Dropout | None = None,
    source: Source | None = None,
) -> Array | None:
    """``dot_general(x, W)`` (or ``dot_general(W, x)``) with ``W`` a LoRA view.

    Returns ``None`` when the contraction is not over exactly the fan-in (or
    exactly the fan-out) axes, or the batch axes are not exactly the stacked
    axes. ``dropout``, if given, is applied to ``x`` in the low-rank branch only.
    ``source``, if given, is ``(leaves, rebuild)`` with ``rebuild(leaves) == x``:
    the backward then keeps ``leaves`` instead of ``x`` (see
    :func:`~lora_jax._implicit.low_rank.low_rank_rebuilt`); it is ignored under dropout.

    Example:
      >>> from lora_jax import KernelLayout, LoraFactors
      >>> f = LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=2.0,
      ...                 layout=KernelLayout("io"))
      >>> view = LoraView.of("w", jnp.zeros((4, 3)), f)
      >>> x = jnp.ones((1, 4))
      >>> params = jax.make_jaxpr(jnp.matmul)(x, view.w).eqns[0].params
      >>> dot_general_rule(x, view, True, params).tolist()   # s * (x @ A) @ B = 1 * 4 * 2
      [[8.0, 8.0, 8.0]]
    """
    dot = DotAxes.of(x, view, kernel_is_rhs, params)
    if dot is None:
        return None
    fa, fb = view.factor_pair(dot.contracted)
    if view.rank == 0:  # a quantized kernel without factors: the base product alone
        return dot_base(view, x, params, kernel_is_rhs)
    y = _branch(x, view, dot, fa, fb, params.get("precision"), dropout, source)
    out = plus_base(dot.restore(y), view, x, params, kernel_is_rhs)
    if view.magnitude is None:
        return out
    return out * _dora_dot_ratio(view, dot).astype(out.dtype)


def _branch(
    x: Array,
    view: LoraView,
    dot: DotAxes,
    fa: Array,
    fb: Array,
    precision: Any,
    dropout: Dropout | None,
    source: Source | None,
) -> Array:
    """``s (x @ A) @ B`` as ``(*stack, M, N)``: saving ``x``, or rebuilding it from ``source``."""
    r = fa.shape[-1]
    factors = lambda: (
        fa.astype(view.dtype).reshape(dot.stack + (-1, r)),  # noqa: E731
        fb.astype(view.dtype).reshape(dot.stack + (r, math.prod(dot.out_shape))),
    )
    if source is None or dropout is not None:
        xd = x if dropout is None else dropout(x)
        return low_rank(dot.canonical(xd), *factors(), view.scale, precision)
    leaves, rebuild = source
    return low_rank_rebuilt(
        dot.canonical(x),
        leaves,
        *factors(),
        view.scale,
        precision,
        lambda ls: dot.canonical(rebuild(ls)),
    )


def dot_base(view: LoraView, x: Array, params: dict, kernel_is_rhs: bool) -> Array:
    """The base product ``dot_general(x, stop_gradient(W))`` as the model wrote it."""

    def product(x_: Array, w: Array) -> Array:
        return lax.dot_general_p.bind(*((x_, w) if kernel_is_rhs else (w, x_)), **params)

    return view.with_frozen(product, x)


def plus_base(y: Array, view: LoraView, x: Array, params: dict, kernel_is_rhs: bool) -> Array:
    """The base product plus the branch ``y`` (already in the output's shape and order)."""
    base = dot_base(view, x, params, kernel_is_rhs)
    return base + y.astype(base.dtype)


def _contracted_role(view: LoraView, kc: Sequence[int], kb: Sequence[int]) -> str | None:
    """``"i"`` or ``"o"`` when the kernel's contracted axes ``kc`` are exactly its fan-in
    (or fan-out) axes and its batch axes ``kb`` exactly its stacked axes; else None."""
    kinds = {view.roles[d][0] for d in kc}
    if len(kinds) != 1 or kinds == {"s"}:
        return None
    (contracted,) = kinds
    if len(kc) != sum(k == contracted for k, _ in view.roles):
        return None
    if (
        sorted(view.roles[d][1] for d in kb if view.roles[d][0] == "s") != list(range(view.n_stack))
        or len(kb) != view.n_stack
    ):
        return None
    if view.magnitude is not None and contracted != "i":
        return None  # DoRA through x @ W.T: materialise (rare: a tied DoRA embedding)
    return contracted


def _dora_dot_ratio(view: LoraView, dot: DotAxes) -> Array:
    """DoRA's ``m / ||W + sAB||`` arranged to broadcast against ``dot_general``'s output
    (batch axes, then lhs free, then rhs free)."""
    ns = view.n_stack
    ratio = jnp.transpose(
        view.dora_ratio(),
        [view.roles[d][1] for d in dot.kb] + [ns + view.roles[d][1] for d in dot.k_free],
    )
    sizes = [view.shape[d] for d in dot.k_free]
    ones = [1] * len(dot.m_shape)
    batch = [view.shape[d] for d in dot.kb]
    return ratio.reshape(batch + (ones + sizes if dot.kernel_is_rhs else sizes + ones))


# ---- conv_general_dilated ---------------------------------------------------------------------


def conv_axes(view: LoraView, params: dict) -> tuple[list[int], int] | None:
    """``(perm, feature)``: ``perm`` transposes ``A`` ``(*fan_in, r)`` into the conv kernel's
    axis order with ``r`` as its output features; ``feature`` is the output's feature axis.

    None for grouped convs, stacked kernels, or a kernel whose output-feature axis
    is not its only fan-out axis.
    """
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 or view.n_stack:
        return None
    dn = params["dimension_numbers"]
    o_dim = dn.rhs_spec[0]
    if view.roles[o_dim] != ("o", 0) or sum(k == "o" for k, _ in view.roles) != 1:
        return None
    n_in = len(view.roles) - 1
    return [n_in if d == o_dim else j for d, (_, j) in enumerate(view.roles)], dn.out_spec[1]


def conv_base(view: LoraView, x: Array, params: dict) -> Array:
    """The base conv ``conv(x, stop_gradient(W))``."""
    return view.with_frozen(lambda x_, w: lax.conv_general_dilated_p.bind(x_, w, **params), x)


def conv_rule(
    x: Array, view: LoraView, params: dict, dropout: Dropout | None = None
) -> Array | None:
    """``conv_general_dilated(x, W)``: a full-window conv into ``r`` channels, then ``@ B``.

    Returns ``None`` where :func:`conv_axes` does.
    """
    axes = conv_axes(view, params)
    if axes is None:
        return None
    if view.rank == 0:  # a quantized kernel without factors
        return conv_base(view, x, params)
    perm, feat = axes
    a = jnp.transpose(view.a.astype(view.dtype), perm)
    u = lax.conv_general_dilated_p.bind(x if dropout is None else dropout(x), a, **params)
    y = times_b(u, view.b, view.scale, feat, view.dtype, params.get("precision"))
    base = conv_base(view, x, params)
    return _dora_scaled(base + y.astype(base.dtype), view, feat)


# ---- gather (embedding lookup) ----------------------------------------------------------------


def gather_axes(view: LoraView, params: dict) -> tuple[list[int], dict] | None:
    """``(perm, a_params)``: ``perm`` transposes ``A`` ``(*fan_in, r)`` into the table's axis
    order with ``r`` for its fan-out axis, ``a_params`` gathers rows of that ``A``.

    None unless every fan-in axis is collapsed with slice size 1 and the single
    fan-out axis is sliced whole (and the kernel is not stacked).
    """
    dn = params["dimension_numbers"]
    sizes = params["slice_sizes"]
    if view.n_stack or tuple(getattr(dn, "operand_batching_dims", None) or ()):
        return None
    outs = [d for d, (k, _) in enumerate(view.roles) if k == "o"]
    ins = [d for d, (k, _) in enumerate(view.roles) if k == "i"]
    if len(outs) != 1 or sorted(dn.collapsed_slice_dims) != ins:
        return None
    (o_dim,) = outs
    if sizes[o_dim] != view.shape[o_dim] or any(sizes[d] != 1 for d in ins):
        return None
    perm = [len(ins) if d == o_dim else j for d, (_, j) in enumerate(view.roles)]
    r = view.rank
    return perm, dict(
        params, slice_sizes=tuple(r if d == o_dim else s for d, s in enumerate(sizes))
    )


def gather_base(view: LoraView, indices: Array, params: dict) -> Array:
    """The base lookup ``stop_gradient(W)[indices]``."""
    return view.with_frozen(lambda i, w: lax.gather_p.bind(w, i, **params), indices)


def gather_rule(view: LoraView, indices: Array, params: dict) -> Array | None:
    """An embedding lookup ``W[ids]``: gather rows of ``A``, then ``@ B``.

    Returns ``None`` where :func:`gather_axes` does.
    """
    axes = gather_axes(view, params)
    if axes is None:
        return None
    if view.rank == 0:  # a quantized kernel without factors
        return gather_base(view, indices, params)
    perm, a_params = axes
    pos = params["dimension_numbers"].offset_dims[0]
    a = jnp.transpose(view.a.astype(view.dtype), perm)
    u = lax.gather_p.bind(a, indices, **a_params)
    y = times_b(u, view.b, view.scale, pos, view.dtype)
    base = gather_base(view, indices, params)
    return _dora_scaled(base + y.astype(base.dtype), view, pos)


def times_b(u: Array, b: Array, scale: Any, axis: int, dtype: Any, precision: Any = None) -> Array:
    """``scale * u @ B`` over ``u``'s rank axis ``axis``, whose place the fan-out takes: the
    second half of a conv or lookup branch (``u`` the conv or lookup through ``A``).

    Example:
      >>> times_b(jnp.ones((5, 2, 3)), jnp.ones((2, 4)), 0.5, 1, jnp.float32).shape
      (5, 4, 3)
    """
    u = jnp.moveaxis(u, axis, -1) * jnp.asarray(scale, u.dtype)
    return jnp.moveaxis(jnp.matmul(u, b.astype(dtype), precision=precision), -1, axis)


def _dora_scaled(out: Array, view: LoraView, feature_axis: int) -> Array:
    """Multiplies the single output-feature axis of ``out`` by DoRA's ``m / ||.||``."""
    if view.magnitude is None:
        return out
    ratio = view.dora_ratio().astype(out.dtype)
    return out * jnp.expand_dims(
        ratio, [d for d in range(out.ndim) if d != feature_axis % out.ndim]
    )
