"""LoRA+: a larger learning rate for ``B`` than for ``A``.

LoRA+ (Hayou et al., 2024) trains ``B`` with learning rate ``ratio * lr`` and
``A`` (and any DoRA magnitude or extra trainable leaf) with ``lr``; PEFT's
``create_loraplus_optimizer`` defaults to ``ratio = 16``. For optimizers whose
update is proportional to the learning rate (SGD, Adam, AdamW with decoupled
weight decay, Lion, ...) that is the same as multiplying ``B``'s updates by
``ratio`` after the optimizer, which is what :func:`lora_plus` does, so it
wraps any optax optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

from lora_jax.errors import LoraConfigError
from lora_jax.factors import is_factors


def b_mask(tree: Any) -> Any:
    """Boolean pytree, True exactly at the ``b`` arrays of every ``LoraFactors``.

    Example:
      >>> base, delta = init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         LoraConfig(targets="w", rank=2))
      >>> b_mask(delta)["w"].a, b_mask(delta)["w"].b
      (False, True)
    """

    def label(node):
        if is_factors(node):
            magnitude = None if node.magnitude is None else False
            return dataclasses.replace(node, a=False, b=True, magnitude=magnitude)
        return False

    return jax.tree.map(label, tree, is_leaf=is_factors)


def lora_plus(optimizer: optax.GradientTransformation, ratio: float = 16.0
              ) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that ``B``'s updates are ``ratio`` times larger.

    Args:
      optimizer: any optax transformation whose update scales with its
        learning rate.
      ratio: ``lr_B / lr_A`` (> 0, finite; PEFT's default is 16).

    Returns:
      ``optax.chain(optimizer, masked(scale(ratio), b_mask))``.

    Example:
      >>> opt = lora_plus(optax.sgd(0.1), ratio=4.0)
      >>> base, delta = init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         LoraConfig(targets="w", rank=2))
      >>> ones = jax.tree.map(jnp.ones_like, delta)
      >>> updates, _ = opt.update(ones, opt.init(delta))
      >>> round(float(updates["w"].a[0, 0]), 6), round(float(updates["w"].b[0, 0]), 6)
      (-0.1, -0.4)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
            math.isfinite(ratio) and ratio > 0):
        raise LoraConfigError(f"LoRA+ ratio must be a finite number > 0, got {ratio!r}")
    return optax.chain(optimizer, optax.masked(optax.scale(float(ratio)), b_mask))
