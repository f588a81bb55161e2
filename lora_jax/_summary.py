"""A report of what LoRA adapted: per-kernel shapes, ranks, alphas, counts.

Like PEFT's ``print_trainable_parameters``, with one row per targeted kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lora_jax._delta import LeafDelta, LoraBias, TokenRows, align, is_factors


@dataclasses.dataclass(frozen=True)
class LeafSummary:
    """One adapted kernel: path, kind, shape, layout, rank, alpha, scale, factor count."""

    path: str
    kind: str
    shape: tuple[int, ...]
    layout: str
    rank: int
    alpha: float
    scale: float
    params: int


@dataclasses.dataclass(frozen=True)
class LoraSummary:
    """The whole report.

    Attributes:
      leaves: one :class:`LeafSummary` per adapted kernel.
      base_params: scalars in the base params.
      trainable_params: scalars in the delta's factors.
    """

    leaves: tuple[LeafSummary, ...]
    base_params: int
    trainable_params: int

    @property
    def total_params(self) -> int:
        """Base plus trainable, as PEFT's ``all params``."""
        return self.base_params + self.trainable_params

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def table(self) -> str:
        """The report as a fixed-width text table."""
        head = ("path", "kind", "shape", "layout", "r", "alpha", "scale", "params")
        rows = [
            (
                l.path,
                l.kind,
                "x".join(map(str, l.shape)),
                l.layout,
                str(l.rank),
                f"{l.alpha:g}",
                f"{l.scale:g}",
                f"{l.params:,}",
            )
            for l in self.leaves
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: "
            f"{self.total_params:,} || trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)


def summarize(params: Any, delta: Any) -> LoraSummary:
    """Reports each adapted kernel and the trainable share of all parameters.

    Args:
      params: the base params.
      delta: its delta.

    Returns:
      A :class:`LoraSummary`; ``print(summary.table())`` shows it.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> s = lj.summarize(base, delta)
      >>> s.trainable_params, round(s.trainable_percent, 2)
      (16, 50.0)
    """
    rows, _ = align(params, delta)
    leaves = tuple(_row(path, tuple(leaf.shape), f) for path, leaf, f in rows if f is not None)
    return LoraSummary(leaves, count_params(params), sum(l.params for l in leaves))


def _row(path: str, shape: tuple[int, ...], f: Any) -> LeafSummary:
    if isinstance(f, LeafDelta):  # trained in full: no rank, no scale
        return LeafSummary(path, "full", shape, "-", 0, 0.0, 1.0, int(np.size(f.diff)))
    if isinstance(f, LoraBias):  # lora_B's bias: scaled like the factors beside it
        return LeafSummary(path, "lora_bias", shape, "-", 0, 0.0, f.scale, f.num_params)
    if isinstance(f, TokenRows):  # a few embedding rows trained in full
        return LeafSummary(path, "tokens", shape, "-", 0, 0.0, 1.0, f.num_params)
    kind = f.layout.kind + ("+dora" if f.magnitude is not None else "")
    return LeafSummary(path, kind, shape, f.layout.axes, f.rank, f.alpha, f.scale, f.num_params)


def print_summary(params: Any, delta: Any) -> LoraSummary:
    """Prints :func:`summarize`'s table and returns the summary.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                            lj.LoraConfig(targets="w", rank=2))
      >>> _ = lj.print_summary(base, delta)
      path  kind   shape  layout  r  alpha  scale  params
      ----  -----  -----  ------  -  -----  -----  ------
      w     dense  4x4    io      2  16     8      16
      trainable params: 16 || all params: 32 || trainable%: 50.0000
    """
    summary = summarize(params, delta)
    print(summary.table())
    return summary


def count_params(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree``; at :class:`~lora_jax.LoraFactors`,
    their ``num_params`` (a fused kernel's block-diagonal ``B`` counts its real blocks only).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.count_params({"a": jnp.ones((2, 3)), "b": None})
      6
    """
    leaves = jax.tree.leaves(tree, is_leaf=is_factors)
    return int(sum(x.num_params if is_factors(x) else np.size(x) for x in leaves))


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (e.g. an optimizer state).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> lj.advanced.tree_bytes({"a": jnp.ones((2, 3), jnp.float32)})
      24
    """
    return int(
        sum(
            np.size(x) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype")
        )
    )
