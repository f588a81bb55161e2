"""Tracing a function of the params to a jaxpr (shared by implicit and infer).

The params' leaves and the array arguments become the jaxpr's inputs, in that
order; every other argument (bools, strings, callables, ``None``) stays a
Python constant, so ``model.apply(params, x, train=False, method=...)``
traces as it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def split_static(tree: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any]]:
    """Array leaves of ``tree`` (to trace) and a function rebuilding ``tree`` from them.

    Example:
      >>> dyn, rebuild = split_static(({"x": np.ones(2)}, True))
      >>> len(dyn), rebuild([np.zeros(2)])[1]
      (1, True)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    slots = [i for i, x in enumerate(leaves) if _is_dynamic(x)]

    def rebuild(dynamic: Sequence[Any]) -> Any:
        full = list(leaves)
        for i, x in zip(slots, dynamic):
            full[i] = x
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in slots], rebuild


def trace(
    fn: Callable[..., Any], treedef: Any, leaves: Sequence[Any], args: tuple, kwargs: dict
) -> tuple[Any, Any, list[Any]]:
    """Traces ``fn(unflatten(treedef, leaves), *args, **kwargs)``.

    Returns:
      ``(closed_jaxpr, out_shape, dynamic_args)``: the jaxpr's inputs are
      ``[*leaves, *dynamic_args]``; ``out_shape`` is the output pytree of
      ``jax.ShapeDtypeStruct``.
    """
    dynamic, rebuild = split_static((args, kwargs))

    def flat_fn(leaves, dynamic):
        call_args, call_kwargs = rebuild(dynamic)
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *call_args, **call_kwargs)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(list(leaves), dynamic)
    return closed, out_shape, dynamic
