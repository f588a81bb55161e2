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
* kernels with an experts axis (any batch axis of the kernel, ``e`` or ``s``,
  that the product does not batch over): ``ragged_dot`` (tokens sorted by
  expert) is two ragged dots with the same group sizes,
  ``ragged_dot(ragged_dot(x, A, g), B, g)``; a ``dot_general`` that keeps the
  experts axis (``td,edf->tef``) or contracts it (``ted,edf->tf``, the dense
  one-hot combine) is two einsums that carry the experts axis through the rank
  axis (:func:`experts_dot_rule`). No tensor of the kernel's size is formed,
  forward or backward.

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
import numpy as np
from jax import lax

from lora_jax._errors import LoraArgumentError
from lora_jax._implicit import primitives as P
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
        return experts_dot_rule(x, view, kernel_is_rhs, params, dropout)
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


# ---- experts: batch axes of the kernel that the product keeps or contracts ---------------------


def _experts_contracted(view: LoraView, kc: Sequence[int], kb: Sequence[int]) -> str | None:
    """``"i"`` or ``"o"``: the kernel role contracted besides batch axes, when ``kc`` holds
    all of that role's axes (and maybe batch axes), ``kb`` only batch axes, and some batch
    axis of the kernel is not batched over; else None."""
    roles = view.roles
    if any(roles[d][0] != "s" for d in kb) or len(kb) == view.n_stack:
        return None
    kinds = {roles[d][0] for d in kc} - {"s"}
    if len(kinds) != 1:
        return None
    (contracted,) = kinds
    if sum(roles[d][0] == contracted for d in kc) != sum(k == contracted for k, _ in roles):
        return None
    return contracted


def experts_dot_rule(
    x: Array,
    view: LoraView,
    kernel_is_rhs: bool,
    params: dict,
    dropout: Dropout | None = None,
) -> Array | None:
    """``dot_general(x, W)`` whose kernel has batch axes (experts) the product keeps or sums.

    ``td,edf->tef`` (each token through every expert) keeps the experts axis
    ``e`` in the output; ``ted,edf->tf`` (the Mixtral-style dense combine, after
    ``td,te->tde`` with the routing weights) contracts it with the fan-in. The
    branch carries ``e`` through the rank axis: ``u[..., e, r] = x . A[e]``,
    then ``y = s * u . B`` summed over ``r`` (and over ``e`` when the product
    contracts it), two einsums whose largest operand is ``(tokens, E, r)``:
    no ``(E, in, out)`` tensor exists in the forward, so none in the backward.

    Returns None unless every kernel batch axis of the product is a kernel
    batch axis, the contracted non-batch axes are exactly the fan-in (or fan-out)
    axes, and some kernel batch axis is not batched over (that case is
    :func:`dot_general_rule`'s); DoRA and per-example views are left to it too.

    Example:
      >>> from lora_jax import KernelLayout, LoraFactors
      >>> f = LoraFactors(jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5)), alpha=2.0,
      ...                 layout=KernelLayout("eio"))
      >>> view = LoraView.of("w", jnp.zeros((3, 4, 5)), f)
      >>> x = jnp.ones((6, 3, 4))                              # (tokens, experts, in)
      >>> params = jax.make_jaxpr(lambda x, w: jnp.einsum("ted,edf->tf", x, w))(
      ...     x, view.w).eqns[0].params
      >>> experts_dot_rule(x, view, True, params)[0, 0].tolist()  # 3 experts * 4 * 2 * s=1
      24.0
    """
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    xc, kc, xb, kb = (lc, rc, lb, rb) if kernel_is_rhs else (rc, lc, rb, lb)
    if view.n_lead or view.magnitude is not None:
        return None
    contracted = _experts_contracted(view, kc, kb)
    if contracted is None:
        return None
    if view.rank == 0:  # a quantized kernel without factors
        return dot_base(view, x, params, kernel_is_rhs)
    nk = len(view.roles)
    label = {role: d for d, role in enumerate(view.roles)}  # each kernel axis its own label
    x_sub = [nk + d for d in range(x.ndim)]
    for xd, kd in zip(list(xb) + list(xc), list(kb) + list(kc)):
        x_sub[xd] = kd
    x_free = [nk + d for d in range(x.ndim) if d not in xb and d not in xc]
    k_free = [d for d in range(nk) if d not in kc and d not in kb]
    other = "o" if contracted == "i" else "i"
    count = lambda kind: sum(k == kind for k, _ in view.roles)  # noqa: E731
    stack = [label[("s", j)] for j in range(view.n_stack)]
    r = nk + x.ndim
    fa, fb = view.factor_pair(contracted)
    fa_sub = stack + [label[(contracted, j)] for j in range(count(contracted))] + [r]
    fb_sub = stack + [r] + [label[(other, j)] for j in range(count(other))]
    u_sub = list(kb) + x_free + [d for d in stack if d not in kb] + [r]
    out_sub = list(kb) + (x_free + k_free if kernel_is_rhs else k_free + x_free)
    precision = params.get("precision")
    xd = x if dropout is None else dropout(x)
    u = jnp.einsum(xd, x_sub, fa.astype(view.dtype), fa_sub, u_sub, precision=precision)
    u = u * jnp.asarray(view.scale, u.dtype)
    y = jnp.einsum(u, u_sub, fb.astype(view.dtype), fb_sub, out_sub, precision=precision)
    return plus_base(y, view, x, params, kernel_is_rhs)


def ragged_dot_rule(
    x: Array,
    view: LoraView,
    group_sizes: Array,
    primitive: Any,
    params: dict,
    dropout: Dropout | None = None,
) -> Array | None:
    """``ragged_dot(x, W, group_sizes)`` with ``W`` an experts kernel (tokens sorted by expert).

    ``x @ W_g + s * ragged_dot(ragged_dot(x, A, g), B, g)``: the first ragged
    dot gives each token its expert's ``(M, r)`` projection, the second expands
    it through the same expert's ``B``. JAX's own transpose rules give ``dA``
    and ``dB`` as ragged dots that contract the tokens per group
    (``(E, in, r)``, ``(E, r, out)``): no ``(E, in, out)`` tensor is formed.
    ``group_sizes`` must sum to the tokens: concrete ones (outside ``jit``) are
    checked (:class:`~lora_jax.LoraArgumentError` naming the kernel); traced
    ones cannot be, and JAX checks nothing either (rows past the sum get zeros
    from the base product and from the branch alike, as in the merged model).

    Returns None (the kernel is then materialised, or strict mode raises)
    unless the kernel is ``ragged_dot``'s right operand with its group axis a
    batch axis (``e``), the only one, no batch dimensions, the ragged axis the
    input's only free axis, and the contracted axes exactly the fan-in (or
    fan-out) axes; and for DoRA, per-example views and ``group_offset``.

    Example:
      >>> from lora_jax import KernelLayout, LoraFactors
      >>> f = LoraFactors(jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3)), alpha=1.0,
      ...                 layout=KernelLayout("eio"))
      >>> view = LoraView.of("w", jnp.zeros((2, 4, 3)), f)
      >>> x, g = jnp.ones((5, 4)), jnp.array([2, 3])
      >>> eqn = jax.make_jaxpr(jax.lax.ragged_dot)(x, view.w, g).eqns[0]
      >>> ragged_dot_rule(x, view, g, eqn.primitive, eqn.params)[:, 0].tolist()
      [4.0, 4.0, 4.0, 4.0, 4.0]
    """
    (lc, rc), (lb, rb), lr, rg = P.ragged_dims(params)
    if (
        lb
        or rb
        or len(lr) != 1
        or lr[0] in lc
        or len(rg) != 1
        or view.n_lead
        or view.n_stack != 1
        or view.magnitude is not None
        or params.get("group_offset") is not None
        or view.roles[rg[0]][0] != "s"
        or [d for d in range(x.ndim) if d not in lc] != list(lr)
    ):
        return None
    kinds = {view.roles[d][0] for d in rc}
    if len(kinds) != 1 or kinds == {"s"}:
        return None
    (contracted,) = kinds
    if len(rc) != sum(k == contracted for k, _ in view.roles):
        return None

    _check_group_sizes(view, group_sizes, x.shape[lr[0]])

    def base_product(x_: Array, w: Array, g: Array) -> Array:
        return primitive.bind(x_, w, g, **params)

    base = view.with_frozen(base_product, x, group_sizes)
    if view.rank == 0:  # a quantized kernel without factors
        return base
    fa, fb = view.factor_pair(contracted)
    k_free = [d for d in range(len(view.roles)) if d not in rc and d not in rg]
    out_shape = tuple(
        view.shape[d] for d in sorted(k_free, key=lambda d: view.roles[d][1])
    )  # in factor order
    x_perm = list(lr) + [x_d for _, x_d in sorted(zip((view.roles[d][1] for d in rc), lc))]
    xd = x if dropout is None else dropout(x)
    xc = jnp.transpose(xd, x_perm).reshape(x.shape[lr[0]], -1)
    e, r = fa.shape[0], fa.shape[-1]
    a = fa.astype(view.dtype).reshape(e, -1, r)
    b = fb.astype(view.dtype).reshape(e, r, -1)
    y = ragged_low_rank(xc, a, b, group_sizes, view.scale, params.get("precision"))
    y = y.reshape((x.shape[lr[0]],) + out_shape)  # free axes in factor order
    y = jnp.transpose(y, [0] + [1 + view.roles[d][1] for d in k_free])  # ... in kernel order
    return base + y.astype(base.dtype)


def ragged_low_rank(
    x: Array,
    a: Array,
    b: Array,
    group_sizes: Array,
    scale: float,
    precision: Any = None,
    dense: bool | None = None,
) -> Array:
    """``s * ragged_dot(ragged_dot(x, a, g), b, g)``: ``x (M, K)``, ``a (E, K, r)``,
    ``b (E, r, N)`` -> ``(M, N)``.

    On CPU, JAX lowers ``ragged_dot`` to ``E`` dense matmuls over an ``(E, M, K)``
    masked copy of ``x``: ``E`` times the FLOPs and a mask as large as ``E``
    inputs. There the branch is computed densely instead, with the same FLOPs and
    no mask of ``x``: ``u = x @ [A_1 .. A_E]`` ``(M, E*r)``, each row's other
    experts' columns zeroed (a one-hot of its group, rows past the sum in none),
    then ``u @ [B_1; ..; B_E]``; autodiff's backward is three more such matmuls.
    Elsewhere (a native grouped matmul), two ragged dots. ``dense`` forces
    either form (None: by backend).

    Example:
      >>> x, a, b = jnp.ones((3, 4)), jnp.ones((2, 4, 1)), jnp.arange(6.0).reshape(2, 1, 3)
      >>> ragged_low_rank(x, a, b, jnp.array([1, 2]), 0.5).tolist()
      [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0], [6.0, 8.0, 10.0]]
    """
    e, k, r = a.shape
    s = jnp.asarray(scale, x.dtype)
    if not (jax.default_backend() == "cpu" if dense is None else dense):
        u = jax.lax.ragged_dot(x, a, group_sizes, precision=precision) * s
        return jax.lax.ragged_dot(u, b, group_sizes, precision=precision)
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(x.shape[0], dtype=ends.dtype)
    group = jnp.sum(rows[:, None] >= ends[None, :], axis=1)  # E: past the last group
    mask = (group[:, None] == jnp.arange(e, dtype=group.dtype)).astype(x.dtype) * s
    a_all = jnp.transpose(a, (1, 0, 2)).reshape(k, e * r)
    u = jnp.matmul(x, a_all, precision=precision).reshape(-1, e, r) * mask[:, :, None]
    return jnp.matmul(u.reshape(-1, e * r), b.reshape(e * r, -1), precision=precision)


def _check_group_sizes(view: LoraView, group_sizes: Array, rows: int) -> None:
    """Concrete group sizes (outside ``jit``) must sum to the rows; traced ones cannot be
    checked (JAX checks nothing either: rows past the sum come out as zeros)."""
    if isinstance(group_sizes, jax.core.Tracer):
        return
    total = int(np.sum(np.asarray(group_sizes)))
    if total != rows:
        raise LoraArgumentError(
            f"kernel {view.path!r}: ragged_dot's group_sizes sum to {total}, but its input has "
            f"{rows} rows (one per token, sorted by expert); they must be equal"
        )


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
