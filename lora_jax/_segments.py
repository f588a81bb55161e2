"""Fused projections with separate adapters: segments of a kernel's fan-out.

A fused kernel holds several projections side by side along its fan-out:
k/v as ``(d, 2, h, k)`` or ``(d, 2*h*k)``, gate/up as ``(d, 2*f)``. PEFT and
transformers give each projection ``j`` its own factors ``A_j (d, r)``,
``B_j (r, out_j)`` and scale ``s = alpha / r``. Those adapters are exactly one
LoRA of rank ``n*r`` with

* ``A = concat_j A_j`` -- ``(*stack, *fan_in, n*r)``, every entry a parameter;
* ``B`` block-diagonal -- ``(*stack, n*r, *fan_out)``, rows ``j*r:(j+1)*r``
  nonzero only over segment ``j``'s columns of the fan-out (flattened in the
  kernel's axis order);

so ``W + s * A @ B = W + s * concat_j(A_j @ B_j)`` along the fan-out. The
segments are a static field of :class:`~lora_jax.LoraFactors`
(``segments``, the sizes along the flattened fan-out); every use of ``B``
(``merge``, ``implicit``, DoRA) multiplies it by the block mask first, so the
off-diagonal blocks get exactly zero gradient and stay zero under any
gradient-based optimizer: merge, unmerge, ``implicit``'s low-rank branch and
the files all reuse the joint machinery unchanged.

This module holds the array-level helpers (no delta types): sizes from a
config entry, the block mask, and counting the real parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._errors import LoraConfigError, LoraStructureError

SegmentSpec = int | Sequence[int]
"""A config entry: ``n`` equal segments, or their sizes along the flattened fan-out."""


def check_spec(spec: Any, field: str) -> int | tuple[int, ...]:
    """A ``segments`` config value, validated without any kernel: an int >= 2 or >= 2 sizes >= 1.

    Example:
      >>> check_spec(2, "segments"), check_spec([4, 2], "segments")
      (2, (4, 2))
    """

    def is_int(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, np.integer))

    if is_int(spec) and spec >= 2:
        return int(spec)
    if (
        isinstance(spec, (list, tuple))
        and len(spec) >= 2
        and all(is_int(s) and s >= 1 for s in spec)
    ):
        return tuple(int(s) for s in spec)
    raise LoraConfigError(
        f"{field} must be a number of equal segments >= 2 or a list of >= 2 sizes >= 1 along "
        f"the kernel's fan-out, got {spec!r}"
    )


def segment_sizes(spec: SegmentSpec, fan_out: int, path: str) -> tuple[int, ...]:
    """The sizes of the segments of a kernel with ``fan_out`` output features.

    Raises:
      LoraConfigError: ``n`` does not divide ``fan_out``, or the sizes do not add
        up to it; the message names ``path``.

    Example:
      >>> segment_sizes(2, 8, "kv"), segment_sizes((6, 2), 8, "qk")
      ((4, 4), (6, 2))
    """
    if isinstance(spec, (int, np.integer)):
        n = int(spec)
        if fan_out % n:
            raise LoraConfigError(
                f"leaf {path!r}: {n} equal segments do not divide its fan-out of {fan_out}"
            )
        return (fan_out // n,) * n
    sizes = tuple(int(s) for s in spec)
    if sum(sizes) != fan_out:
        raise LoraConfigError(
            f"leaf {path!r}: segment sizes {sizes} add up to {sum(sizes)}, but its fan-out "
            f"(the product of the 'o' axes) is {fan_out}"
        )
    return sizes


def check_fits(sizes: Sequence[int], rank: int, fan_out: int, path: str) -> None:
    """Raises :class:`LoraStructureError` unless ``sizes`` split ``fan_out`` and ``n`` divides
    the joint ``rank``.

    Example:
      >>> check_fits((4, 4), 3, 8, "kv")
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraStructureError: leaf 'kv': factors of joint rank 3 cannot hold 2 segments of equal rank
    """
    n = len(sizes)
    if sum(sizes) != fan_out:
        raise LoraStructureError(
            f"leaf {path!r}: segments {tuple(sizes)} add up to {sum(sizes)}, but the kernel's "
            f"fan-out is {fan_out}"
        )
    if rank % n:
        raise LoraStructureError(
            f"leaf {path!r}: factors of joint rank {rank} cannot hold {n} segments of equal rank"
        )


def block_mask(sizes: Sequence[int], rank: int) -> np.ndarray:
    """The 0/1 mask of a block-diagonal ``B``: ``(rank, sum(sizes))``, ``rank = n * r``.

    Example:
      >>> block_mask((1, 2), 2).astype(int).tolist()
      [[1, 0, 0], [0, 1, 1]]
    """
    n = len(sizes)
    r = rank // n
    mask = np.zeros((rank, sum(sizes)), np.float32)
    start = 0
    for j, size in enumerate(sizes):
        mask[j * r : (j + 1) * r, start : start + size] = 1.0
        start += size
    return mask


def mask_b(b: Any, sizes: Sequence[int], n_fan_out: int) -> Any:
    """``B`` with its off-diagonal blocks zeroed; ``b``: ``(..., n*r, *fan_out)``.

    ``n_fan_out`` is the number of fan-out axes at the end of ``b``. The mask
    is a constant, so the gradient of the off-diagonal blocks is exactly zero.

    Example:
      >>> mask_b(jnp.ones((2, 2, 2)), (2, 2), 2)[1].tolist()
      [[0.0, 0.0], [1.0, 1.0]]
    """
    b = jnp.asarray(b)
    fan_out = b.shape[b.ndim - n_fan_out :]
    rank = b.shape[b.ndim - n_fan_out - 1]
    mask = block_mask(sizes, rank).reshape((rank,) + tuple(fan_out))
    return b * jnp.asarray(mask, b.dtype)


def real_b_size(b_shape: Sequence[int], sizes: Sequence[int]) -> int:
    """Parameters of ``B`` outside its structural zeros: ``size(B) / n``.

    Example:
      >>> real_b_size((4, 6), (3, 3))
      12
    """
    return math.prod(b_shape) // len(sizes)


__all__ = ["block_mask", "check_fits", "check_spec", "mask_b", "real_b_size", "segment_sizes"]
