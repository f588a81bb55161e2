"""The low-rank rules for a batch of mixed adapters: each example's branch with its own factors.

Where an :class:`~lora_jax._serving.example_view.ExampleView` meets its input,
example ``e`` gets ``op(x_e, stop_gradient(W)) + s_e * op(x_e, A_e) @ B_e``:

* ``dot_general``: the input is flattened as for one adapter
  (:class:`~lora_jax._implicit.rules.DotAxes`), with ``M = batch * M'``
  example-major, then two batched matmuls (:func:`per_example_low_rank`);
* ``conv_general_dilated`` and ``gather``: the one-adapter branch under
  ``jax.vmap`` over the example axis.

The example axis is the input's leading free axis (a conv's batch axis, the
first batch axis of an embedding lookup's indices); its size must be the
number of ids, else :class:`~lora_jax.LoraArgumentError` names the kernel.
Which uses fit, and the base products, are exactly the one-adapter rules'
(:mod:`lora_jax._implicit.rules`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._errors import LoraArgumentError
from lora_jax._implicit.rules import (
    DotAxes,
    Dropout,
    conv_axes,
    conv_base,
    gather_axes,
    gather_base,
    plus_base,
    times_b,
)
from lora_jax._serving.example_view import ExampleView

Array = jax.Array


def dot_general_rule(
    x: Array, ev: ExampleView, kernel_is_rhs: bool, params: dict, dropout: Dropout | None = None
) -> Array | None:
    """``dot_general(x, W)`` (or ``(W, x)``) with each example's factors; None where the
    one-adapter rule declines (:func:`lora_jax._implicit.rules.dot_general_rule`)."""
    view = ev.kernel
    dot = DotAxes.of(x, view, kernel_is_rhs, params)
    if dot is None:
        return None
    fa, fb = view.factor_pair(dot.contracted)
    _check_examples(ev, dot.m_shape[0] if dot.m_shape else 0)
    xd = x if dropout is None else dropout(x)
    y = per_example_low_rank(
        dot.canonical(xd),
        fa.astype(view.dtype),
        fb.astype(view.dtype),
        ev.scales,
        view.n_stack,
        params.get("precision"),
        view.path,
    )
    return plus_base(dot.restore(y), view, x, params, kernel_is_rhs)


def per_example_low_rank(
    x: Array, fa: Array, fb: Array, scale: Array, n_stack: int, precision: Any, path: str
) -> Array:
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
    a = jnp.moveaxis(fa.reshape((n_ex,) + stack + (k, r)), 0, n_stack)  # (*stack, B, K, r)
    b = jnp.moveaxis(fb.reshape((n_ex,) + stack + (r, -1)), 0, n_stack)  # (*stack, B, r, N)
    u = jnp.matmul(xe, a, precision=precision) * scale.astype(x.dtype)[:, None, None]
    y = jnp.matmul(u, b, precision=precision)
    return y.reshape(stack + (m, b.shape[-1]))


def conv_rule(
    x: Array, ev: ExampleView, params: dict, dropout: Dropout | None = None
) -> Array | None:
    """``conv_general_dilated(x, W)``: each example's conv with its own factors (``vmap``);
    None where :func:`lora_jax._implicit.rules.conv_axes` declines."""
    view = ev.kernel
    axes = conv_axes(view, params)
    if axes is None:
        return None
    perm, feat = axes
    dn = params["dimension_numbers"]
    _check_examples(ev, x.shape[dn.lhs_spec[0]])
    xb, ob = dn.lhs_spec[0], dn.out_spec[0]

    def one(x_i: Array, a_i: Array, b_i: Array, s_i: Array) -> Array:
        u = lax.conv_general_dilated_p.bind(
            jnp.expand_dims(x_i, xb), jnp.transpose(a_i.astype(view.dtype), perm), **params
        )
        return jnp.squeeze(times_b(u, b_i, s_i, feat, view.dtype), ob)

    xd = x if dropout is None else dropout(x)
    y = jax.vmap(one, in_axes=(xb, 0, 0, 0), out_axes=ob)(xd, view.a, view.b, ev.scales)
    base = conv_base(view, x, params)
    return base + y.astype(base.dtype)


def gather_rule(ev: ExampleView, indices: Array, params: dict) -> Array | None:
    """An embedding lookup with per-example factors: the example axis is the first batch
    axis of ``indices`` (``lax.gather``'s index vector is always its last axis); None where
    :func:`lora_jax._implicit.rules.gather_axes` declines."""
    view = ev.kernel
    axes = gather_axes(view, params)
    if axes is None:
        return None
    perm, a_params = axes
    dn = params["dimension_numbers"]
    ib = 0
    if indices.ndim < 2:
        raise _ids_error(view.path, ev.scales.shape[-1], "none (a single lookup)")
    _check_examples(ev, indices.shape[ib])
    ob = next(d for d in range(len(dn.offset_dims) + indices.ndim - 1) if d not in dn.offset_dims)
    pos = dn.offset_dims[0] - (ob < dn.offset_dims[0])

    def one(a_i: Array, b_i: Array, s_i: Array, idx_i: Array) -> Array:
        u = lax.gather_p.bind(
            jnp.transpose(a_i.astype(view.dtype), perm), jnp.expand_dims(idx_i, ib), **a_params
        )
        return times_b(jnp.squeeze(u, ob), b_i, s_i, pos, view.dtype)

    y = jax.vmap(one, in_axes=(0, 0, 0, ib), out_axes=ob)(view.a, view.b, ev.scales, indices)
    base = gather_base(view, indices, params)
    return base + y.astype(base.dtype)


def _ids_error(path: str, n_ex: int, size: Any) -> Exception:
    return LoraArgumentError(
        f"kernel {path!r}: adapter_ids has {n_ex} entries but the input's example axis (its "
        f"leading free axis) has size {size}; give one id per example of the batch"
    )


def _check_examples(ev: ExampleView, size: int) -> None:
    """The example axis of a mixed-adapter input must have one entry per id."""
    if size != ev.scales.shape[-1]:
        raise _ids_error(ev.path, ev.scales.shape[-1], size)
