"""LoRA configuration: which leaves, what rank and alpha, which init.

Patterns are regular expressions matched **in full** (``re.fullmatch``)
against ``'/'``-joined leaf paths (see :mod:`lora_jax._paths`). Per-pattern
overrides work like PEFT's ``rank_pattern`` / ``alpha_pattern``: the first
pattern (in insertion order) that matches a path wins; paths no override
matches take ``rank`` and ``alpha``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._delta import lora_scale
from lora_jax._errors import LoraConfigError
from lora_jax._layout import KernelLayout
from lora_jax._segments import check_spec

Predicate = Callable[[str, Any], bool]
Targets = str | Sequence[str] | Predicate

INIT_SCHEMES = ("kaiming", "gaussian", "swapped", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")


def _compile(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise LoraConfigError(
            f"{field}: {pattern!r} is not a valid regular expression: {e}"
        ) from None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
      targets: a regex (or a list of them) matched in full against leaf paths,
        or a predicate ``(path, leaf) -> bool``. Every regex must match at
        least one leaf.
      rank: default rank ``r`` (>= 1, <= min(fan_in, fan_out) of each kernel).
      alpha: default alpha (> 0). The update is scaled by ``alpha / r``.
      exclude: regexes of paths never adapted, even if a target matches.
      rank_pattern: ``{regex: rank}`` overrides; first full match wins.
      alpha_pattern: ``{regex: alpha}`` overrides; first full match wins.
      layouts: ``{regex: KernelLayout | axes string}`` for kernels whose
        fan-in / fan-out split cannot be read off their shape (N-D kernels).
      init: ``"kaiming"`` (PEFT's default: ``A ~ U(-1/sqrt(fan_in),
        1/sqrt(fan_in))``, ``B = 0``), ``"gaussian"`` (``A ~ N(0, (1/r)^2)``
        as PEFT's ``init_lora_weights="gaussian"``, ``B = 0``) or
        ``"swapped"`` (``A = 0``, ``B ~ U(-1/sqrt(r), 1/sqrt(r))``).
        Embedding tables always start with ``A = 0``, ``B ~ N(0, 1)`` (PEFT),
        or the reverse under ``"swapped"``.
        ``"pissa"`` (factors from the top-r singular triplets of ``W``, base
        replaced by the residual; ``svd_niter`` selects a randomised SVD) and
        ``"olora"`` (QR-based, base replaced by the residual) change the base:
        :func:`~lora_jax.init_lora` returns the new one.
      svd_niter: PiSSA only: ``None`` for an exact SVD, or the number of power
        iterations of a randomised SVD (PEFT's ``pissa_niter_[n]``).
      use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
      use_dora: DoRA: add a trainable magnitude per output feature.
      trainable: regexes of further leaves trained in full beside the factors
        (a classifier head, layer norms: PEFT's ``modules_to_save``).
      bias: ``"none"``, ``"all"`` (every leaf named ``bias`` trains in full) or
        ``"lora_only"`` (the biases beside adapted kernels), as PEFT's ``bias``.
      lora_bias: PEFT's ``lora_bias``: each adapted kernel's ``lora_B`` gets a
        trainable bias ``b`` (zero at init), a :class:`~lora_jax.LoraBias` at
        the base ``bias`` leaf beside the kernel (same parent, name ``bias``);
        the layer computes ``x W + c + s (x A B + b)``. A kernel without a
        bias leaf is an error (as in PEFT); not with DoRA or embeddings (PEFT
        refuses both).
      trainable_tokens: ``{regex: [row indices]}``: PEFT's
        ``trainable_token_indices``: those rows of each embedding table the
        regex matches train in full (a :class:`~lora_jax.TokenRows`, zero at
        init); a tied output head reading the same table sees them too.
      layers: for scan-stacked kernels, the layer indices (along the first
        stacked axis) to adapt, as PEFT's ``layers_to_transform``; the other
        layers get an exactly zero update and no parameters. ``None``: all.
      dtype: dtype of the factors (float32 by default, even for a bf16 base).
      skip_unsupported: if true, leaves a broad target matches but LoRA cannot
        serve (integer, bool or fewer than 2 axes) are skipped; by default
        they are an error.
      segments: ``{regex: n | (size, ...)}`` for fused kernels whose
        projections each get their own adapter, as PEFT gives ``k_proj`` and
        ``v_proj`` (k/v fused as ``(d, 2, h, k)`` or ``(d, 2*h*k)``, gate/up as
        ``(d, 2*f)``): ``n`` equal segments of the kernel's fan-out (its ``o``
        axes flattened in order) or their sizes. Each segment gets rank
        ``rank_for(path)``, alpha ``alpha_for(path)`` and scale ``alpha / r``;
        the factors hold them as one joint adapter of rank ``n * r`` with a
        block-diagonal ``B`` (:mod:`lora_jax._segments`). Kernels no pattern
        matches keep one joint adapter. Not with DoRA, PiSSA or OLoRA.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> cfg = lj.LoraConfig(targets=r".*/(query|value)/kernel", rank=8, alpha=16)
      >>> cfg.rank_for("params/block_0/query/kernel"), cfg.scale_for(8, 16.0)
      (8, 2.0)
    """

    targets: Targets
    rank: int = 8
    alpha: float = 16.0
    exclude: Sequence[str] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layouts: Mapping[str, KernelLayout | str] = dataclasses.field(default_factory=dict)
    init: str = "kaiming"
    svd_niter: int | None = None
    use_rslora: bool = False
    use_dora: bool = False
    trainable: Sequence[str] = ()
    bias: str = "none"
    layers: Sequence[int] | None = None
    dtype: Any = jnp.float32
    lora_bias: bool = False
    trainable_tokens: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    skip_unsupported: bool = False
    segments: Mapping[str, int | Sequence[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        elif not callable(self.targets):
            if not isinstance(self.targets, (list, tuple)) or not all(
                isinstance(t, str) for t in self.targets
            ):
                raise LoraConfigError(
                    "targets must be a regex, a list of regexes or a predicate (path, leaf) -> "
                    f"bool, got {self.targets!r}"
                )
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise LoraConfigError("targets is empty: give at least one pattern")
        for field in ("exclude", "trainable"):
            if isinstance(getattr(self, field), str):
                object.__setattr__(self, field, (getattr(self, field),))
        if self.layers is not None:
            layers = tuple(self.layers)
            if (
                not layers
                or any(
                    isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0
                    for i in layers
                )
                or len(set(layers)) != len(layers)
            ):
                raise LoraConfigError(f"layers must be distinct integers >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(int(i) for i in layers)))
        if not isinstance(self.lora_bias, bool):
            raise LoraConfigError(f"lora_bias must be a bool, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise LoraConfigError("lora_bias=True does not combine with use_dora (nor in PEFT)")
        if self.lora_bias and self.init in ("pissa", "olora"):
            raise LoraConfigError(
                f"lora_bias=True does not combine with init={self.init!r} (nor in PEFT)"
            )
        if self.lora_bias and self.layers is not None:
            raise LoraConfigError(
                "lora_bias=True does not combine with layers= (the bias would reach the layers "
                "left out); adapt those layers' kernels with the target regex instead"
            )
        object.__setattr__(self, "trainable_tokens", _token_table(self.trainable_tokens))
        if self.bias not in BIAS_MODES:
            raise LoraConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.svd_niter is not None and (
            isinstance(self.svd_niter, bool)
            or not isinstance(self.svd_niter, int)
            or self.svd_niter < 0
        ):
            raise LoraConfigError(
                f"svd_niter must be None or an integer >= 0, got {self.svd_niter!r}"
            )
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        for pattern, r in self.rank_pattern.items():
            _check_rank(r, f"rank_pattern[{pattern!r}]")
        for pattern, a in self.alpha_pattern.items():
            _check_alpha(a, f"alpha_pattern[{pattern!r}]")
        if self.init not in INIT_SCHEMES:
            raise LoraConfigError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        try:
            floating = self.dtype is not None and jnp.issubdtype(np.dtype(self.dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise LoraConfigError(f"dtype of the factors must be floating, got {self.dtype!r}")
        object.__setattr__(
            self,
            "segments",
            {p: check_spec(v, f"segments[{p!r}]") for p, v in dict(self.segments).items()},
        )
        if self.segments and (self.use_dora or self.init in ("pissa", "olora")):
            what = "use_dora=True" if self.use_dora else f"init={self.init!r}"
            raise LoraConfigError(
                f"segments (one adapter per fused projection) cannot be combined with {what}"
            )
        layouts = {}
        for pattern, layout in self.layouts.items():
            layouts[pattern] = KernelLayout(layout) if isinstance(layout, str) else layout
        object.__setattr__(self, "layouts", layouts)
        # Compile every pattern now so a bad regex fails at construction.
        for field in (
            "exclude",
            "trainable",
            "rank_pattern",
            "alpha_pattern",
            "layouts",
            "trainable_tokens",
            "segments",
        ):
            for pattern in getattr(self, field):
                _compile(pattern, field)
        if not callable(self.targets):
            for pattern in self.targets:
                _compile(pattern, "targets")

    def rank_for(self, path: str) -> int:
        """The rank of the kernel at ``path``."""
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the kernel at ``path``."""
        return float(_first_match(self.alpha_pattern, path, self.alpha))

    def layout_for(self, path: str) -> KernelLayout | None:
        """The explicit layout of ``path``, or None."""
        return _first_match(self.layouts, path, None)

    def segments_for(self, path: str) -> int | tuple[int, ...] | None:
        """The ``segments`` entry of ``path`` (first full match), or None: one joint adapter."""
        return _first_match(self.segments, path, None)

    def is_excluded(self, path: str) -> bool:
        return any(re.fullmatch(p, path) for p in self.exclude)

    def scale_for(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (:func:`lora_scale`)."""
        return lora_scale(alpha, rank, self.use_rslora)


def _first_match(table: Mapping[str, Any], path: str, default: Any) -> Any:
    for pattern, value in table.items():
        if re.fullmatch(pattern, path):
            return value
    return default


def _token_table(table: Any) -> dict[str, tuple[int, ...]]:
    """``trainable_tokens`` checked: ``{regex: distinct indices >= 0}``, indices as a tuple."""
    if not isinstance(table, Mapping):
        raise LoraConfigError(f"trainable_tokens must be {{regex: [row indices]}}, got {table!r}")
    out = {}
    for pattern, indices in table.items():
        idx = list(indices) if isinstance(indices, (list, tuple)) else None
        if (
            not isinstance(pattern, str)
            or not idx
            or any(
                isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in idx
            )
            or len(set(idx)) != len(idx)
        ):
            raise LoraConfigError(
                f"trainable_tokens[{pattern!r}] must be a non-empty list of distinct row indices "
                f">= 0, got {indices!r}"
            )
        out[pattern] = tuple(int(i) for i in idx)
    return out


def _check_rank(rank: Any, field: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise LoraConfigError(f"{field} must be an integer >= 1, got {rank!r}")


def _check_alpha(alpha: Any, field: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not alpha > 0:
        raise LoraConfigError(f"{field} must be a number > 0, got {alpha!r}")
    if not math.isfinite(alpha):
        raise LoraConfigError(f"{field} must be finite, got {alpha!r}")
