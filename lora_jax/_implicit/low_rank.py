"""The low-rank branch ``s * (x @ A) @ B`` as canonical matmuls, with custom VJPs.

Every rule of :mod:`lora_jax._implicit.rules` ends in one of these, on
operands already flattened to ``x: (*batch, M, K)``, ``a: (*batch, K, r)``,
``b: (*batch, r, N)``:

* :func:`low_rank`: the backward uses only canonical ``[M,K]@[K,N]`` products
  and transposes only rank-``r`` operands (XLA:CPU otherwise writes
  cotangents in transposed layouts, see ``docs/design.md``);
* :func:`low_rank_rebuilt`: the same, saving values the backward keeps
  anyway instead of ``x`` and rebuilding ``x`` from them;
* :func:`expand`: ``u @ b`` for a rank-``r`` inner axis, as a sum of outer
  products on CPU where that lets XLA fuse it into the base matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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
def low_rank_rebuilt(
    x: Array,
    leaves: tuple,
    a: Array,
    b: Array,
    scale: float,
    precision: Any,
    rebuild: Callable[[tuple], Array],
) -> Array:
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
    return tuple(
        v + zero.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v for v in leaves
    )


def _rebuilt_bwd(scale, precision, rebuild, res, g):
    leaves, a, b, u = res
    x = lambda db: rebuild(_after(leaves, db))  # noqa: E731
    dx, da, db = _grads(scale, precision, x, a, b, u, g)
    return dx, jax.tree.map(lambda _: None, leaves), da, db


low_rank_rebuilt.defvjp(_rebuilt_fwd, _rebuilt_bwd)
