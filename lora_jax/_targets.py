"""Target selection: which leaves of a params pytree get LoRA factors.

:func:`select_targets` reads a :class:`~lora_jax._config.LoraConfig` against
any params pytree (Flax linen ``params``, Flax NNX ``nnx.State``, a plain
dict) and returns one :class:`Target` per adapted leaf, having checked
everything that can be checked before any array is made: every pattern matches
something, every match is a floating kernel with at least two axes, its layout
is known and fits its shape, and its rank fits its fan-in and fan-out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax._config import LoraConfig
from lora_jax._errors import LoraConfigError, LoraTargetError
from lora_jax._layout import KernelLayout, default_layout
from lora_jax._paths import leaves_with_paths
from lora_jax._segments import segment_sizes


@dataclasses.dataclass(frozen=True)
class Target:
    """One kernel chosen for LoRA, with everything needed to build its factors.

    Attributes:
      path: the '/'-joined leaf path.
      shape: the kernel's shape.
      dtype: the kernel's dtype.
      layout: its :class:`KernelLayout`.
      rank: its rank ``r`` (with ``segments``, the joint rank ``n * r``).
      alpha: its alpha.
      segments: sizes of the fused projections along the flattened fan-out,
        each with its own adapter of rank ``rank / n``; None: one joint adapter.
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    layout: KernelLayout
    rank: int
    alpha: float
    segments: tuple[int, ...] | None = None

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``A``: ``(*stack, *fan_in, r)``, ``B``: ``(*stack, r, *fan_out)``."""
        return self.layout.factor_shapes(self.shape, self.rank)


def select_targets(
    params: Any,
    config: LoraConfig,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> dict[str, Target]:
    """Picks and validates the leaves ``config`` adapts.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      config: the :class:`LoraConfig`.
      layouts: optional ``{path: KernelLayout}``, e.g. from
        :func:`lora_jax.infer_layouts`; config ``layouts`` patterns win over it,
        and it wins over :func:`~lora_jax._layout.default_layout`.

    Returns:
      ``{path: Target}`` in the params' flattening order.

    Raises:
      LoraTargetError: a pattern matches no leaf; a matched leaf is not a
        floating array with at least 2 axes (unless ``skip_unsupported``).
      LoraLayoutError: an N-D kernel has no known layout, or a layout does
        not fit the kernel's shape.
      LoraConfigError: a rank exceeds ``min(fan_in, fan_out)`` of its kernel.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}}
      >>> t = lj.advanced.select_targets(params, lj.LoraConfig(targets=".*/kernel", rank=4))
      >>> t["dense/kernel"].factor_shapes()
      ((16, 4), (4, 32))
    """
    layouts = dict(layouts or {})
    leaves, _ = leaves_with_paths(params)
    matched = [(path, leaf) for path, leaf in leaves if _is_target(config, path, leaf)]
    _check_every_pattern_matches(config, [p for p, _ in leaves], [p for p, _ in matched])
    if config.skip_unsupported and not any(_is_supported(leaf) for _, leaf in matched):
        raise LoraTargetError(
            f"the targets match only leaves LoRA cannot serve ({[p for p, _ in matched][:5]}); "
            "nothing would be adapted"
        )
    targets = {}
    for path, leaf in matched:
        if not _is_supported(leaf):
            if config.skip_unsupported:
                continue
            raise LoraTargetError(
                f"leaf {path!r} matches the targets but is not a floating kernel with at "
                f"least 2 axes (shape {tuple(getattr(leaf, 'shape', ()))}, dtype {_dtype_name(leaf)}); narrow "
                "the targets, add it to exclude, or set skip_unsupported=True"
            )
        shape = tuple(leaf.shape)
        layout = config.layout_for(path) or layouts.get(path) or default_layout(path, shape)
        layout.check_shape(shape, path)
        rank = config.rank_for(path)
        spec = config.segments_for(path)
        sizes = None if spec is None else segment_sizes(spec, layout.fan_out(shape), path)
        limit = min(layout.fan_in(shape), min(sizes or (layout.fan_out(shape),)))
        if rank > limit:
            what = "min(fan_in, fan_out)" if sizes is None else "min(fan_in, segment sizes)"
            raise LoraConfigError(
                f"leaf {path!r}: rank {rank} is larger than {what} = {limit} "
                f"of its kernel (shape {shape}, layout {layout.axes!r})"
            )
        joint = rank * (len(sizes) if sizes else 1)
        targets[path] = Target(
            path, shape, leaf.dtype, layout, joint, config.alpha_for(path), sizes
        )
    return targets


def _is_target(config: LoraConfig, path: str, leaf: Any) -> bool:
    if config.is_excluded(path):
        return False
    if callable(config.targets):
        return bool(config.targets(path, leaf))
    return any(re.fullmatch(p, path) for p in config.targets)


def _check_every_pattern_matches(config: LoraConfig, paths: list[str], matched: list[str]):
    if callable(config.targets):
        if not matched:
            raise LoraTargetError("the targets predicate selected no leaf of the params")
        return
    for pattern in config.targets:
        if not any(re.fullmatch(pattern, p) for p in matched):
            hits = [p for p in paths if re.fullmatch(pattern, p)]
            why = f"only excluded leaves ({hits[:3]})" if hits else "no leaf"
            sample = ", ".join(repr(p) for p in paths[:6])
            raise LoraTargetError(
                f"target pattern {pattern!r} matches {why}; patterns are matched in full "
                f"against '/'-joined paths such as {sample}"
            )
    for field in ("rank_pattern", "alpha_pattern", "layouts", "segments"):
        for pattern in getattr(config, field):
            if not any(re.fullmatch(pattern, p) for p in matched):
                raise LoraConfigError(
                    f"{field} pattern {pattern!r} matches no targeted leaf "
                    f"(targeted: {matched[:6]})"
                )


def _is_supported(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    shape = getattr(leaf, "shape", ())
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(shape) >= 2


def _dtype_name(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return str(dtype) if dtype is not None else type(leaf).__name__


def select_extra_trainable(
    params: Any, config: LoraConfig, targets: Mapping[str, Target]
) -> list[str]:
    """Paths of the leaves trained in full: ``config.trainable`` matches and ``config.bias``.

    Raises:
      LoraTargetError: a ``trainable`` pattern matches no leaf, a match is
        also a LoRA target, or is not a floating array.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
      >>> cfg = lj.LoraConfig(targets=".*kernel", rank=2, bias="lora_only")
      >>> lj.advanced.select_extra_trainable(params, cfg, lj.advanced.select_targets(params, cfg))
      ['dense/bias']
    """
    leaves, _ = leaves_with_paths(params)
    paths = [p for p, _ in leaves]
    chosen = set()
    for pattern in config.trainable:
        hits = [p for p in paths if re.fullmatch(pattern, p)]
        if not hits:
            raise LoraTargetError(
                f"trainable pattern {pattern!r} matches no leaf (leaves such as {paths[:6]})"
            )
        chosen.update(hits)
    parents = {t.rsplit("/", 1)[0] for t in targets}
    for p in paths:
        name = p.rsplit("/", 1)
        if name[-1] == "bias" and (
            config.bias == "all"
            or (config.bias == "lora_only" and len(name) == 2 and name[0] in parents)
        ):
            chosen.add(p)
    for path, leaf in leaves:
        if path not in chosen:
            continue
        if path in targets:
            raise LoraTargetError(f"leaf {path!r} is both a LoRA target and trained in full")
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise LoraTargetError(f"leaf {path!r} is trained in full but is not a floating array")
    return [p for p in paths if p in chosen]
