"""Initialising the delta: one :class:`LoraFactors` per targeted kernel.

Exactly one factor starts at zero, so ``s * A @ B == 0`` and the adapted model
equals the base model at step 0, whatever the scheme:

=============  ====================================  ==============================
scheme         ``A``                                 ``B``
=============  ====================================  ==============================
``kaiming``    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``  ``0``
``gaussian``   ``N(0, (1/r)^2)``                     ``0``
``swapped``    ``0``                                 ``U(-1/sqrt(r), 1/sqrt(r))``
embedding      ``0``                                 ``N(0, 1)``
embedding,     ``N(0, 1)``                           ``0``
swapped
=============  ====================================  ==============================

``kaiming`` is PEFT's default (``kaiming_uniform_(a=sqrt(5))`` on ``lora_A``,
whose bound is ``1/sqrt(fan_in)``); ``fan_in`` is the product of the kernel's
fan-in axes, so a conv's window counts, as in PyTorch. Every stacked layer
draws its own values.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._config import LoraConfig
from lora_jax._delta import LayerSelection, LeafDelta, LoraBias, LoraFactors, TokenRows, lora_scale
from lora_jax._errors import LoraConfigError, LoraTargetError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths, unshared
from lora_jax._targets import Target, select_extra_trainable, select_targets
from lora_jax._variants import olora, pissa, with_dora

Array = jax.Array


def init_factors(key: Array, target: Target, scheme: str, dtype: Any, rslora: bool) -> LoraFactors:
    """Draws the factors of one :class:`Target` (one of them zero).

    Args:
      key: a PRNG key.
      target: the kernel to adapt (shape, layout, rank, alpha).
      scheme: ``"kaiming"``, ``"gaussian"`` or ``"swapped"``.
      dtype: dtype of the factors.
      rslora: use ``alpha / sqrt(r)`` scaling.

    Returns:
      ``LoraFactors`` with ``a: (*stack, *fan_in, r)``, ``b: (*stack, r, *fan_out)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> t = lj.advanced.select_targets({"w": jnp.ones((6, 4))}, lj.LoraConfig(targets="w", rank=2))["w"]
      >>> f = lj.advanced.init_factors(jax.random.key(0), t, "kaiming", jnp.float32, False)
      >>> f.a.shape, f.b.shape, float(jnp.abs(f.b).max())
      ((6, 2), (2, 4), 0.0)
    """
    a_shape, b_shape = target.factor_shapes()
    n = len(target.segments) if target.segments else 1
    r = target.rank // n  # one segment's rank (lora_jax._segments)
    fan_in = target.layout.fan_in(target.shape)

    def uniform(shape, bound):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    def normal(shape, std):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    zeros = lambda shape: jnp.zeros(shape, dtype)  # noqa: E731
    if target.layout.kind == "embed":
        a, b = (
            (normal(a_shape, 1.0), zeros(b_shape))
            if scheme == "swapped"
            else (zeros(a_shape), normal(b_shape, 1.0))
        )
    elif scheme == "kaiming":
        a, b = uniform(a_shape, fan_in**-0.5), zeros(b_shape)
    elif scheme == "gaussian":
        a, b = normal(a_shape, 1.0 / r), zeros(b_shape)
    else:  # swapped
        a, b = zeros(a_shape), uniform(b_shape, r**-0.5)
    f = LoraFactors(
        a, b, alpha=target.alpha, layout=target.layout, rslora=rslora, segments=target.segments
    )
    return f.masked()  # a fused kernel's B is block-diagonal from the start


def init_lora(
    key: Array,
    params: Any,
    config: LoraConfig,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[Any, Any]:
    """Splits ``params`` into a frozen base and a freshly initialised delta.

    The delta has the params' tree structure, with a :class:`LoraFactors` at
    each targeted leaf, a :class:`LeafDelta` at each leaf trained in full
    (``trainable`` / ``bias``) and ``None`` everywhere else. The base holds
    ``params``' own arrays, except with ``init="pissa"`` or ``"olora"``, which
    replace each target by its residual ``W - s A B``: keep the returned base.
    Its containers are new: the base of an ``nnx.State`` shares no ``Variable``
    with the module, so ``nnx.update(model, merge(base, delta))`` leaves it as it was.
    ``use_dora`` adds magnitudes ``||W + s A B||_c``. PiSSA, OLoRA and DoRA read
    the kernels' values; the other inits only their shapes.

    Args:
      key: a PRNG key; each target draws from ``fold_in(key, crc32(path))``, so
        adding or removing other targets does not change its values.
      params: any params pytree; only shapes and dtypes are read, so
        ``jax.ShapeDtypeStruct`` leaves work (useful under ``jax.jit``).
      config: the :class:`LoraConfig`.
      layouts: optional traced layouts ``{path: KernelLayout}``.

    Returns:
      ``(base, delta)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> base, delta = lj.init_lora(jax.random.key(0), params, lj.LoraConfig(targets=".*kernel", rank=4))
      >>> delta["dense"]["bias"] is None, delta["dense"]["kernel"].a.shape
      (True, (16, 4))
    """
    targets = select_targets(params, config, layouts)
    extra = set(select_extra_trainable(params, config, targets))
    leaves, treedef = leaves_with_paths(params)
    dtype = np.dtype(config.dtype)
    # PiSSA / OLoRA replace the drawn values below; the draw fixes shapes and dtypes.
    scheme = config.init if config.init in ("kaiming", "gaussian", "swapped") else "kaiming"
    new_leaves = [
        _draw_one(
            _path_key(key, path),
            dataclasses.replace(targets[path], path=""),
            scheme,
            dtype,
            config.use_rslora,
        )
        if path in targets
        else LeafDelta(jnp.zeros(leaf.shape, dtype))
        if path in extra
        else None
        for path, leaf in leaves
    ]
    if config.lora_bias or config.trainable_tokens:
        new_leaves = _with_value_deltas(new_leaves, leaves, targets, config, dtype)
    if config.layers is not None:
        new_leaves = _select_layers(new_leaves, [p for p, _ in leaves], tuple(config.layers))
    # The base's containers are new: an nnx.State shares its Variables with the module.
    base, delta = unshared(params), jax.tree_util.tree_unflatten(treedef, new_leaves)
    if config.init == "pissa":
        base, delta = pissa(base, delta, niter=config.svd_niter, key=key)
    elif config.init == "olora":
        base, delta = olora(base, delta)
    if config.use_dora:
        delta = with_dora(base, delta)
    return base, delta


def _with_value_deltas(
    entries: list, leaves: list, targets: Mapping[str, Target], config: LoraConfig, dtype: Any
) -> list:
    """Adds a zero :class:`LoraBias` at the bias beside each target (``lora_bias``) and zero
    :class:`TokenRows` at each table ``trainable_tokens`` names."""
    index = {path: i for i, (path, _) in enumerate(leaves)}
    entries = list(entries)

    def place(i: int, entry: Any, why: str) -> None:
        path = leaves[i][0]
        if entries[i] is not None:
            raise LoraTargetError(
                f"leaf {path!r} is {why}, but it already has a delta entry "
                f"({type(entries[i]).__name__}: a LoRA target or trained in full)"
            )
        entry.check_fits(path, tuple(leaves[i][1].shape))
        entries[i] = entry

    if config.lora_bias:
        for path, t in targets.items():
            bias_path = path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"
            if t.layout.kind == "embed":
                raise LoraConfigError(
                    f"leaf {path!r}: lora_bias=True on an embedding table (PEFT refuses it too)"
                )
            if bias_path not in index:
                raise LoraTargetError(
                    f"leaf {path!r}: lora_bias=True needs a bias leaf {bias_path!r} beside the "
                    "kernel (the adapted layer's bias, which merge updates by s * b); this "
                    "layer has none (PEFT refuses such a layer as well): exclude it or add a "
                    "bias"
                )
            i = index[bias_path]
            scale = lora_scale(t.alpha, t.rank, config.use_rslora)
            place(i, LoraBias(jnp.zeros(leaves[i][1].shape, dtype), scale=scale), "a LoRA bias")
    for pattern, indices in config.trainable_tokens.items():
        hits = [i for path, i in index.items() if re.fullmatch(pattern, path)]
        if not hits:
            raise LoraTargetError(
                f"trainable_tokens pattern {pattern!r} matches no leaf "
                f"(leaves such as {list(index)[:6]})"
            )
        for i in hits:
            shape = tuple(leaves[i][1].shape)
            if len(shape) != 2 or not jnp.issubdtype(leaves[i][1].dtype, jnp.floating):
                raise LoraTargetError(
                    f"leaf {leaves[i][0]!r}: trainable_tokens needs a floating (vocab, dim) "
                    f"embedding table, got shape {shape} dtype {leaves[i][1].dtype}"
                )
            rows = TokenRows(jnp.zeros((len(indices), shape[1]), dtype), indices=tuple(indices))
            place(i, rows, "a trainable-tokens table")
    return entries


def _select_layers(leaves: list, paths: list[str], layers: tuple[int, ...]) -> list:
    """Keeps only ``layers`` of each stacked kernel's factors (first stacked axis)."""
    out, stacked = [], False
    for path, f in zip(paths, leaves):
        if isinstance(f, LoraFactors) and f.layout.stack_axes:
            stacked = True
            n = f.a.shape[0]
            if max(layers) >= n:
                raise LoraConfigError(
                    f"leaf {path!r}: layers {layers} out of range for its {n} stacked layers"
                )
            f = f.select_layers(LayerSelection(layers, n))
        out.append(f)
    if not stacked:
        raise LoraConfigError(
            f"layers={layers} selects layers of scan-stacked kernels, but no targeted kernel has a "
            "stacked axis ('s' in its layout); select unrolled layers with the target regex"
        )
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw_one(key: Array, target: Target, scheme: str, dtype: Any, rslora: bool) -> LoraFactors:
    """One target's factors, compiled once per (shape, layout, rank, alpha, ...) and reused
    by every kernel of that spec; the path only enters through the key."""
    return init_factors(key, target, scheme, dtype, rslora)


def _path_key(key: Array, path: str) -> Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()))
