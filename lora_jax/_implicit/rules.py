"""Low-rank rules: where a kernel meets its input, add ``s * (x @ A) @ B``.

Each rule takes the operands of one primitive (one of them a
:class:`~lora_jax._implicit.view.LoraView`) and returns the primitive's output computed
as ``op(x, stop_gradient(W)) + s * low_rank(x)``, or ``None`` when the use
does not fit the low-rank form (the interpreter then materialises the kernel).

* ``dot_general``: the kernel's contracted axes must be exactly its fan-in
  axes (``x @ W``) or exactly its fan-out axes (``x @ W.T``, as in
  ``Embed.attend``), and its batch axes exactly its stacked axes. The input is
  flattened to ``(*stack, M, K)`` so both low-rank products are plain
  ``[M, K] @ [K, r]`` and ``[M, r] @ [r, N]`` matmuls, and :func:`low_rank`'s
  custom VJP keeps every backward product in that canonical form, transposing
  only rank-``r`` operands (XLA:CPU otherwise writes cotangents in transposed
  layouts, see ``docs/design.md``).
* ``conv_general_dilated``: ``A`` is a conv with the full window into ``r``
  channels, ``B`` a 1x1 conv (a matmul over the channel axis), as in PEFT.
* ``gather`` (embedding lookup): gather the rows of ``A``, then ``@ B``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._errors import LoraArgumentError
from lora_jax._implicit.view import LoraView

Array = jax.Array


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def low_rank(x: Array, a: Array, b: Array, scale: float, precision: Any = None) -> Array:
    """``scale * (x @ a) @ b`` with a layout-friendly backward.

    Args:
      x: ``(*batch, M, K)``.
      a: ``(*batch, K, r)``.
      b: ``(*batch, r, N)``.
      scale: the LoRA scale ``s``.
      precision: passed to every matmul.

    Returns:
      ``(*batch, M, N)``.

    Not differentiated, it is two matmuls. Under differentiation the forward
    forms ``u @ b`` with :func:`expand`, and the backward, with
    ``u = s * x @ a`` saved from the forward and ``g`` the output cotangent, is::

      dB = u^T @ g            (r, M) @ (M, N)
      du = s * g @ b^T        (M, N) @ (N, r)
      dA = (du^T @ x)^T       (r, M) @ (M, K), then a rank-r transpose
      dx = du @ a^T           (M, r) @ (r, K), with expand

    Example:
      >>> x, a, b = jnp.ones((5, 3)), jnp.ones((3, 2)), jnp.ones((2, 4))
      >>> low_rank(x, a, b, 0.5).shape
      (5, 4)
    """
    return jnp.matmul(_scaled_u(x, a, scale, precision), b, precision=precision)


def _scaled_u(x: Array, a: Array, scale: float, precision: Any) -> Array:
    """``u = s * x @ a``, ``(*batch, M, r)``."""
    return jnp.matmul(x, a, precision=precision) * jnp.asarray(scale, x.dtype)


#: Largest rank for which :func:`expand` sums outer products on CPU.
OUTER_MAX_RANK = 16


def expand(u: Array, b: Array, precision: Any = None) -> Array:
    """``u @ b`` for a rank-``r`` inner axis: ``(*batch, M, r) @ (*batch, r, N)``.

    On CPU, for ``r <= OUTER_MAX_RANK``, computed as ``sum_j u[:, j] * b[j, :]``
    (accumulated in float32): XLA fuses that sum, and the add that follows it,
    into the neighbouring full-size matmul, so ``x @ W + s * (x @ A) @ B`` is
    written once, as one array, where a matmul would write the ``(M, N)``
    product separately. Used where the result is differentiated: a non-linear
    consumer (GELU after ``fc1``) then keeps one array for its backward, not
    the two summands. Elsewhere, and for larger ``r``, a matmul.

    Example:
      >>> u, b = jnp.ones((5, 2)), jnp.ones((2, 4))
      >>> bool(jnp.allclose(expand(u, b), u @ b))
      True
    """
    r = u.shape[-1]
    if r > OUTER_MAX_RANK or jax.default_backend() != "cpu":
        return jnp.matmul(u, b, precision=precision)
    acc = jnp.promote_types(u.dtype, jnp.float32)
    terms = u.astype(acc)[..., :, :, None] * b.astype(acc)[..., None, :, :]
    return terms.sum(-2).astype(jnp.result_type(u, b))


def _low_rank_fwd(x, a, b, scale, precision):
    u = _scaled_u(x, a, scale, precision)
    return expand(u, b, precision), (x, a, b, u)


def _grads(scale, precision, x, a, b, u, g):
    """``(dx, dA, dB)`` of ``s * (x @ a) @ b`` with canonical matmuls only."""
    g = g.astype(u.dtype)
    db = jnp.matmul(_mT(u), g, precision=precision)
    du = jnp.matmul(g, _mT(b), precision=precision) * jnp.asarray(scale, g.dtype)
    if callable(x):  # rebuilt in the backward, after dB (see low_rank_rebuilt)
        x = x(db)
    da = _mT(jnp.matmul(_mT(du), x, precision=precision))
    dx = expand(du, _mT(a), precision)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


def _low_rank_bwd(scale, precision, res, g):
    return _grads(scale, precision, *res, g)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def low_rank_rebuilt(x: Array, leaves: tuple, a: Array, b: Array, scale: float,
                     precision: Any, rebuild: Callable[[tuple], Array]) -> Array:
    """:func:`low_rank` that saves ``leaves`` instead of ``x`` for the backward.

    ``rebuild(leaves)`` must equal ``x``; the backward recomputes ``x`` from
    ``leaves``, tied to ``dB`` (see :func:`_after`) so that XLA cannot reuse
    the forward's ``x`` and keep it alive. Cotangents flow to ``x`` only: the
    leaves get none through this branch. Worth it when ``x`` is a cheap
    elementwise function of values the backward keeps anyway (see
    :mod:`lora_jax._implicit.rebuild`).

    Example:
      >>> h, a, b = jnp.ones((5, 3)), jnp.ones((3, 2)), jnp.ones((2, 4))
      >>> y = low_rank_rebuilt(jnp.tanh(h), (h,), a, b, 0.5, None, lambda l: jnp.tanh(l[0]))
      >>> bool(jnp.allclose(y, low_rank(jnp.tanh(h), a, b, 0.5)))
      True
    """
    return low_rank(x, a, b, scale, precision)


def _rebuilt_fwd(x, leaves, a, b, scale, precision, rebuild):
    y, (_, _, _, u) = _low_rank_fwd(x, a, b, scale, precision)
    return y, (leaves, a, b, u)


def _after(leaves: tuple, db: Array) -> tuple:
    """``leaves``, made to depend on ``dB`` so that XLA computes their use in the backward.

    Otherwise XLA merges the rebuilt ``x`` with the forward's and keeps that
    alive (``lax.optimization_barrier`` does not survive XLA:CPU's passes).
    Adding ``0 * dB[0, 0]`` changes no finite value (a non-finite ``dB`` makes
    the gradients non-finite already), and ``dB`` is small and, in a sharded
    step, already reduced: reading one element of it adds no collective.
    """
    if not db.size:
        return leaves
    zero = db.reshape(-1)[0] * 0
    return tuple(v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v
                 for v in leaves)


def _rebuilt_bwd(scale, precision, rebuild, res, g):
    leaves, a, b, u = res
    x = lambda db: rebuild(_after(leaves, db))  # noqa: E731
    dx, da, db = _grads(scale, precision, x, a, b, u, g)
    return dx, jax.tree.map(lambda _: None, leaves), da, db


low_rank_rebuilt.defvjp(_rebuilt_fwd, _rebuilt_bwd)


def dot_general_rule(x: Array, view: LoraView, kernel_is_rhs: bool, params: dict,
                     dropout: Callable[[Array], Array] | None = None,
                     source: tuple[tuple, Callable[[tuple], Array]] | None = None
                     ) -> Array | None:
    """``dot_general(x, W)`` (or ``dot_general(W, x)``) with ``W`` a LoRA view.

    Returns ``None`` when the contraction is not over exactly the fan-in (or
    exactly the fan-out) axes, or the batch axes are not exactly the stacked
    axes. ``dropout``, if given, is applied to ``x`` in the low-rank branch only.
    ``source``, if given, is ``(leaves, rebuild)`` with ``rebuild(leaves) == x``:
    the backward then keeps ``leaves`` instead of ``x`` (see
    :func:`low_rank_rebuilt`); it is ignored under dropout.
    """
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    xc, kc, xb, kb = (lc, rc, lb, rb) if kernel_is_rhs else (rc, lc, rb, lb)
    contracted = _contracted_role(view, kc, kb)
    if contracted is None:
        return None
    fa, fb, free_kind = view.factor_pair(contracted)
    ns = view.n_stack
    # x as (*stack, M, K): batch axes in stack order, free axes, contracted axes in factor order.
    xb_sorted = [x_d for _, x_d in sorted(zip((view.roles[d][1] for d in kb), xb))]
    xc_sorted = [x_d for _, x_d in sorted(zip((view.roles[d][1] for d in kc), xc))]
    x_free = [d for d in range(x.ndim) if d not in xb and d not in xc]
    perm = xb_sorted + x_free + xc_sorted
    stack = tuple(x.shape[d] for d in xb_sorted)
    m_shape = tuple(x.shape[d] for d in x_free)
    if view.ex_scale is not None:
        _check_examples(view, m_shape[0] if m_shape else 0)
    r = fa.shape[-1]
    out_shape = fb.shape[ns + view.n_ex + 1:]
    dtype = view.dtype

    def base_product(x_: Array, w: Array) -> Array:
        return lax.dot_general_p.bind(*((x_, w) if kernel_is_rhs else (w, x_)), **params)

    if r == 0:  # a quantized kernel without factors: the base product alone
        return view.with_frozen(base_product, x)

    def canonical(v: Array) -> Array:  # (*stack, M, K)
        v = v if perm == list(range(v.ndim)) else jnp.transpose(v, perm)
        return v.reshape(stack + (math.prod(m_shape), math.prod(fa.shape[ns + view.n_ex:-1])))

    precision = params.get("precision")
    factors = lambda: (fa.astype(dtype).reshape(stack + (-1, r)),  # noqa: E731
                       fb.astype(dtype).reshape(stack + (r, math.prod(out_shape))))
    if view.ex_scale is not None:  # mixed adapters: one factor pair per example
        xd = x if dropout is None else dropout(x)
        y = per_example_low_rank(canonical(xd), fa.astype(dtype), fb.astype(dtype),
                                 view.ex_scale, ns, precision, view.path)
    elif source is None or dropout is not None:
        xd = x if dropout is None else dropout(x)
        y = low_rank(canonical(xd), *factors(), view.scale, precision)
    else:
        leaves, rebuild = source
        y = low_rank_rebuilt(canonical(x), leaves, *factors(), view.scale, precision,
                             lambda ls: canonical(rebuild(ls)))
    y = y.reshape(stack + m_shape + out_shape)
    # dot_general's output order: batch (in the operands' order), then lhs free, then rhs free.
    k_free = [d for d in range(len(view.roles)) if d not in kc and d not in kb]
    batch_axes = [view.roles[d][1] for d in kb]
    x_axes = [ns + i for i in range(len(m_shape))]
    k_axes = [ns + len(m_shape) + view.roles[d][1] for d in k_free]
    order = batch_axes + (x_axes + k_axes if kernel_is_rhs else k_axes + x_axes)
    y = jnp.transpose(y, order)
    base = view.with_frozen(base_product, x)
    out = base + y.astype(base.dtype)
    if view.magnitude is None:
        return out
    return out * _dora_dot_ratio(view, kb, k_free, len(m_shape), kernel_is_rhs).astype(out.dtype)


def per_example_low_rank(x: Array, fa: Array, fb: Array, scale: Array, n_stack: int,
                         precision: Any, path: str) -> Array:
    """``s_e * (x_e @ A_e) @ B_e`` for every example ``e``: the mixed-adapter branch.

    Args:
      x: ``(*stack, M, K)`` with ``M = batch * M'`` example-major (the example
        axis is the leading free axis of the kernel's input).
      fa: ``(batch, *stack, *contracted, r)``: each example's gathered factor.
      fb: ``(batch, *stack, r, *free)``.
      scale: ``(batch,)``: each example's scale (0 for the base alone).
      n_stack: the number of stacked axes.
      precision: passed to both matmuls.
      path: the kernel's leaf path, for the error.

    Returns:
      ``(*stack, M, N)``. Two batched matmuls over the example axis
      (``(B, M', K) @ (B, K, r)``, then ``@ (B, r, N)``): the low-rank FLOPs
      of one adapter, whatever the mix. Plain autodiff: gradients are exact.

    Example:
      >>> x, a, b = jnp.ones((6, 3)), jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4))
      >>> per_example_low_rank(x, a, b, jnp.array([1.0, 0.0]), 0, None, "w")[:, 0].tolist()
      [3.0, 3.0, 3.0, 0.0, 0.0, 0.0]
    """
    n_ex, r = fa.shape[0], fa.shape[-1]
    stack, (m, k) = x.shape[:n_stack], x.shape[n_stack:]
    if m % n_ex:
        raise _ids_error(path, n_ex, m)
    xe = x.reshape(stack + (n_ex, m // n_ex, k))
    a = jnp.moveaxis(fa.reshape((n_ex,) + stack + (k, r)), 0, n_stack)          # (*stack, B, K, r)
    b = jnp.moveaxis(fb.reshape((n_ex,) + stack + (r, -1)), 0, n_stack)         # (*stack, B, r, N)
    u = jnp.matmul(xe, a, precision=precision) * scale.astype(x.dtype)[:, None, None]
    y = jnp.matmul(u, b, precision=precision)
    return y.reshape(stack + (m, b.shape[-1]))


def _ids_error(path: str, n_ex: int, size: Any) -> Exception:
    return LoraArgumentError(
        f"kernel {path!r}: adapter_ids has {n_ex} entries but the input's example axis (its "
        f"leading free axis) has size {size}; give one id per example of the batch")


def _check_examples(view: LoraView, size: int) -> None:
    """The example axis of a mixed-adapter input must have one entry per id."""
    if size != view.ex_scale.shape[-1]:
        raise _ids_error(view.path, view.ex_scale.shape[-1], size)


def _contracted_role(view: LoraView, kc: Sequence[int], kb: Sequence[int]) -> str | None:
    """``"i"`` or ``"o"`` when the kernel's contracted axes ``kc`` are exactly its fan-in
    (or fan-out) axes and its batch axes ``kb`` exactly its stacked axes; else None."""
    kinds = {view.roles[d][0] for d in kc}
    if len(kinds) != 1 or kinds == {"s"}:
        return None
    (contracted,) = kinds
    if len(kc) != sum(k == contracted for k, _ in view.roles):
        return None
    if sorted(view.roles[d][1] for d in kb if view.roles[d][0] == "s") != list(
            range(view.n_stack)) or len(kb) != view.n_stack:
        return None
    if view.magnitude is not None and contracted != "i":
        return None  # DoRA through x @ W.T: materialise (rare: a tied DoRA embedding)
    return contracted


def _dora_dot_ratio(view: LoraView, kb: Sequence[int], k_free: Sequence[int], n_x_free: int,
                    kernel_is_rhs: bool) -> Array:
    """DoRA's ``m / ||W + sAB||`` arranged to broadcast against ``dot_general``'s output
    (batch axes, then lhs free, then rhs free)."""
    ns = view.n_stack
    ratio = jnp.transpose(view.dora_ratio(),
                          [view.roles[d][1] for d in kb] + [ns + view.roles[d][1] for d in k_free])
    sizes = [view.shape[d] for d in k_free]
    ones = [1] * n_x_free
    batch = [view.shape[d] for d in kb]
    return ratio.reshape(batch + (ones + sizes if kernel_is_rhs else sizes + ones))


def conv_rule(x: Array, view: LoraView, params: dict,
              dropout: Callable[[Array], Array] | None = None) -> Array | None:
    """``conv_general_dilated(x, W)``: a full-window conv into ``r`` channels, then ``@ B``.

    Returns ``None`` for grouped convs, stacked kernels, or a kernel whose
    output-feature axis is not its only fan-out axis.
    """
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1 or view.n_stack:
        return None
    dn = params["dimension_numbers"]
    o_dim = dn.rhs_spec[0]
    if view.roles[o_dim] != ("o", 0) or sum(k == "o" for k, _ in view.roles) != 1:
        return None
    dtype = view.dtype
    if view.a.shape[-1] == 0:  # a quantized kernel without factors
        return view.with_frozen(lambda x_, w: lax.conv_general_dilated_p.bind(x_, w, **params), x)
    n_in = len(view.roles) - 1
    perm = [n_in if d == o_dim else j for d, (_, j) in enumerate(view.roles)]
    feat = dn.out_spec[1]
    if view.ex_scale is not None:  # mixed adapters: each example's conv with its own factors
        _check_examples(view, x.shape[dn.lhs_spec[0]])
        xb, ob = dn.lhs_spec[0], dn.out_spec[0]

        def one(x_i: Array, a_i: Array, b_i: Array, s_i: Array) -> Array:
            u = lax.conv_general_dilated_p.bind(jnp.expand_dims(x_i, xb),
                                                jnp.transpose(a_i.astype(dtype), perm), **params)
            u = jnp.moveaxis(u, feat, -1) * s_i.astype(u.dtype)
            return jnp.squeeze(jnp.moveaxis(jnp.matmul(u, b_i.astype(dtype)), -1, feat), ob)

        xd = x if dropout is None else dropout(x)
        y = jax.vmap(one, in_axes=(xb, 0, 0, 0), out_axes=ob)(xd, view.a, view.b, view.ex_scale)
        base = view.with_frozen(lambda x_, w: lax.conv_general_dilated_p.bind(x_, w, **params), x)
        return base + y.astype(base.dtype)
    a = jnp.transpose(view.a.astype(dtype), perm)
    u = lax.conv_general_dilated_p.bind(x if dropout is None else dropout(x), a, **params)
    u = jnp.moveaxis(u, feat, -1) * jnp.asarray(view.scale, u.dtype)
    y = jnp.moveaxis(jnp.matmul(u, view.b.astype(dtype), precision=params.get("precision")),
                     -1, feat)
    base = view.with_frozen(lambda x_, w: lax.conv_general_dilated_p.bind(x_, w, **params), x)
    return _dora_scaled(base + y.astype(base.dtype), view, feat)


def gather_rule(view: LoraView, indices: Array, params: dict) -> Array | None:
    """An embedding lookup ``W[ids]``: gather rows of ``A``, then ``@ B``.

    Returns ``None`` unless every fan-in axis is collapsed with slice size 1
    and the single fan-out axis is sliced whole.
    """
    dn = params["dimension_numbers"]
    sizes = params["slice_sizes"]
    if view.n_stack or getattr(dn, "operand_batching_dims", ()):
        return None
    outs = [d for d, (k, _) in enumerate(view.roles) if k == "o"]
    ins = [d for d, (k, _) in enumerate(view.roles) if k == "i"]
    if len(outs) != 1 or sorted(dn.collapsed_slice_dims) != ins:
        return None
    (o_dim,) = outs
    if sizes[o_dim] != view.shape[o_dim] or any(sizes[d] != 1 for d in ins):
        return None
    dtype = view.dtype
    r = view.a.shape[-1]
    if r == 0:  # a quantized kernel without factors
        return view.with_frozen(lambda i, w: lax.gather_p.bind(w, i, **params), indices)
    perm = [len(ins) if d == o_dim else j for d, (_, j) in enumerate(view.roles)]
    a_params = dict(params, slice_sizes=tuple(r if d == o_dim else s for d, s in enumerate(sizes)))
    pos = dn.offset_dims[0]
    if view.ex_scale is not None:  # mixed adapters: each example's rows of its own A
        return _per_example_gather(view, indices, params, a_params, perm)
    a = jnp.transpose(view.a.astype(dtype), perm)
    u = lax.gather_p.bind(a, indices, **a_params)
    u = jnp.moveaxis(u, pos, -1) * jnp.asarray(view.scale, u.dtype)
    y = jnp.moveaxis(jnp.matmul(u, view.b.astype(dtype)), -1, pos)
    base = view.with_frozen(lambda i, w: lax.gather_p.bind(w, i, **params), indices)
    return _dora_scaled(base + y.astype(base.dtype), view, pos)


def _per_example_gather(view: LoraView, indices: Array, params: dict, a_params: dict,
                        perm: list[int]) -> Array:
    """An embedding lookup with per-example factors: the example axis is the first batch
    axis of ``indices`` (``lax.gather``'s index vector is always its last axis)."""
    dn = params["dimension_numbers"]
    ib = 0
    if indices.ndim < 2:
        raise _ids_error(view.path, view.ex_scale.shape[-1], "none (a single lookup)")
    _check_examples(view, indices.shape[ib])
    ob = next(d for d in range(len(dn.offset_dims) + indices.ndim - 1)
              if d not in dn.offset_dims)
    pos = dn.offset_dims[0] - (ob < dn.offset_dims[0])
    dtype = view.dtype

    def one(a_i: Array, b_i: Array, s_i: Array, idx_i: Array) -> Array:
        u = lax.gather_p.bind(jnp.transpose(a_i.astype(dtype), perm), jnp.expand_dims(idx_i, ib),
                              **a_params)
        u = jnp.moveaxis(jnp.squeeze(u, ob), pos, -1) * s_i.astype(u.dtype)
        return jnp.moveaxis(jnp.matmul(u, b_i.astype(dtype)), -1, pos)

    y = jax.vmap(one, in_axes=(0, 0, 0, ib), out_axes=ob)(view.a, view.b, view.ex_scale, indices)
    base = view.with_frozen(lambda i, w: lax.gather_p.bind(w, i, **params), indices)
    return base + y.astype(base.dtype)


def _dora_scaled(out: Array, view: LoraView, feature_axis: int) -> Array:
    """Multiplies the single output-feature axis of ``out`` by DoRA's ``m / ||.||``."""
    if view.magnitude is None:
        return out
    ratio = view.dora_ratio().astype(out.dtype)
    return out * jnp.expand_dims(ratio, [d for d in range(out.ndim) if d != feature_axis % out.ndim])
