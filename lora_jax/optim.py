"""Training only the delta with optax.

Two ways, both exact:

1. **Differentiate only the delta** (recommended). The base is closed over or
   passed as a non-differentiated argument, so frozen weights get no gradient
   at all and the optimizer only ever sees the delta::

     grads = jax.grad(loss_fn)(delta, base, batch)
     updates, opt_state = opt.update(grads, opt_state, delta)
     delta = optax.apply_updates(delta, updates)

2. **Mask a combined tree.** When one tree holds frozen and trainable leaves
   (``{"base": base, "delta": delta}``, plus extra trainable leaves),
   :func:`freeze` wraps any optax optimizer so that frozen leaves get an
   exactly zero update and no optimizer state: it is
   ``optax.multi_transform`` with ``optax.set_to_zero()`` on the frozen label,
   and ``multi_transform`` keeps inner state only for the leaves its label
   selects.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax

from lora_jax.factors import is_delta_leaf
from lora_jax.paths import path_str

TRAIN, FROZEN = "trainable", "frozen"


def trainable_mask(tree: Any, extra_trainable: Sequence[str] = ()) -> Any:
    """Boolean pytree: True at the arrays of every :class:`LoraFactors` and :class:`LeafDelta`.

    Args:
      tree: any pytree holding LoRA factors somewhere (a delta, or a combined
        ``{"base": ..., "delta": ...}`` tree).
      extra_trainable: regexes, matched in full against '/'-joined paths, of
        other leaves to train in full (biases, a head, layer norms).

    Returns:
      A pytree with ``tree``'s structure and bool leaves.

    Example:
      >>> base, delta = init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         LoraConfig(targets="w", rank=2))
      >>> jax.tree.leaves(trainable_mask({"base": base, "delta": delta}))
      [False, True, True]
    """

    def label(key_path, node):
        if is_delta_leaf(node):
            return jax.tree.map(lambda _: True, node)
        path = path_str(key_path)
        return any(re.fullmatch(p, path) for p in extra_trainable)

    return jax.tree_util.tree_map_with_path(label, tree, is_leaf=is_delta_leaf)


def freeze(
    optimizer: optax.GradientTransformation,
    extra_trainable: Sequence[str] = (),
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that only LoRA factors (and ``extra_trainable``) train.

    Frozen leaves receive an update of exactly zero, and ``optimizer`` keeps
    no state for them (Adam's moments cover the trainable leaves only).

    Args:
      optimizer: any optax gradient transformation.
      extra_trainable: regexes of further leaves trained in full.

    Returns:
      An ``optax.GradientTransformation`` over the combined tree.

    Example:
      >>> base, delta = init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         LoraConfig(targets="w", rank=2))
      >>> opt = freeze(optax.adam(1e-3))
      >>> state = opt.init({"base": base, "delta": delta})
    """

    def labels(tree):
        return jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable_mask(tree, extra_trainable))

    return optax.multi_transform({TRAIN: optimizer, FROZEN: optax.set_to_zero()}, labels)


def count_params(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree``.

    Example:
      >>> count_params({"a": jnp.ones((2, 3)), "b": None})
      6
    """
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (e.g. an optimizer state).

    Example:
      >>> tree_bytes({"a": jnp.ones((2, 3), jnp.float32)})
      24
    """
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))



