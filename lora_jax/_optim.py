"""Training only the delta with optax, and LoRA+.

Two ways to train only the delta, both exact:

1. **Differentiate only the delta** (recommended). The base is passed as a
   non-differentiated argument, so frozen weights get no gradient at all and
   the optimizer only ever sees the delta::

     grads = jax.grad(loss_fn)(delta, base, batch)
     updates, opt_state = opt.update(grads, opt_state, delta)
     delta = optax.apply_updates(delta, updates)

2. **Mask a combined tree.** When one tree holds frozen and trainable leaves
   (``{"base": base, "delta": delta}``, plus extra trainable leaves),
   :func:`train_delta_only` wraps any optax optimizer so that frozen leaves
   get an exactly zero update and no optimizer state: it is
   ``optax.multi_transform`` with ``optax.set_to_zero()`` on the frozen label,
   and ``multi_transform`` keeps inner state only for the leaves its label
   selects. (It is the complement of ``optax.freeze(mask)``, which freezes the
   masked leaves: here the delta is what trains.)

**LoRA+** (Hayou et al., 2024) trains ``B`` with learning rate ``ratio * lr``
and ``A`` (and any DoRA magnitude or extra trainable leaf) with ``lr``; PEFT's
``create_loraplus_optimizer`` defaults to ``ratio = 16``. For optimizers whose
update is proportional to the learning rate (SGD, Adam, AdamW with decoupled
weight decay, Lion, ...) that is the same as multiplying ``B``'s updates by
``ratio`` after the optimizer, which is what :func:`lora_plus` does, so it
wraps any optax optimizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from lora_jax._delta import is_delta_leaf, is_factors
from lora_jax._errors import LoraArgumentError
from lora_jax._paths import path_str

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
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> jax.tree.leaves(lj.advanced.trainable_mask({"base": base, "delta": delta}))
      [False, True, True]
    """

    def label(key_path, node):
        if is_delta_leaf(node):
            return jax.tree.map(lambda _: True, node)
        path = path_str(key_path)
        return any(re.fullmatch(p, path) for p in extra_trainable)

    return jax.tree_util.tree_map_with_path(label, tree, is_leaf=is_delta_leaf)


def train_delta_only(
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
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> opt = lj.train_delta_only(optax.adam(1e-3))
      >>> state = opt.init({"base": base, "delta": delta})
    """

    def labels(tree):
        return jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable_mask(tree, extra_trainable))

    return optax.multi_transform({TRAIN: optimizer, FROZEN: optax.set_to_zero()}, labels)


def b_mask(tree: Any) -> Any:
    """Boolean pytree, True exactly at the ``b`` arrays of every ``LoraFactors``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> b_mask(delta)["w"].a, b_mask(delta)["w"].b
      (False, True)
    """

    def label(node):
        if is_factors(node):
            magnitude = None if node.magnitude is None else False
            return node.replace(a=False, b=True, magnitude=magnitude)
        return False

    return jax.tree.map(label, tree, is_leaf=is_factors)


def lora_plus(
    optimizer: optax.GradientTransformation, ratio: float = 16.0
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that ``B``'s updates are ``ratio`` times larger.

    Args:
      optimizer: any optax transformation whose update scales with its
        learning rate.
      ratio: ``lr_B / lr_A`` (> 0, finite; PEFT's default is 16).

    Returns:
      ``optax.chain(optimizer, masked(scale(ratio), b_mask))``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> opt = lj.lora_plus(optax.sgd(0.1), ratio=4.0)
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> ones = jax.tree.map(jnp.ones_like, delta)
      >>> updates, _ = opt.update(ones, opt.init(delta))
      >>> round(float(updates["w"].a[0, 0]), 6), round(float(updates["w"].b[0, 0]), 6)
      (-0.1, -0.4)
    """
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not (math.isfinite(ratio) and ratio > 0)
    ):
        raise LoraArgumentError(f"LoRA+ ratio must be a finite number > 0, got {ratio!r}")
    return optax.chain(optimizer, optax.masked(optax.scale(float(ratio)), b_mask))
