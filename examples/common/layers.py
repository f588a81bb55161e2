"""Layer functions the example models share (Gemma 3, Qwen3-MoE): RoPE and RMS normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x, positions, base: float):
    """Rotate-half RoPE. ``x``: (B, T, heads, D); ``positions``: (B, T) int.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 2, 1, 4))
      >>> y = rope(x, jnp.array([[0, 1]]), 10_000.0)
      >>> bool(jnp.allclose(y[0, 0], x[0, 0])), y.shape  # position 0 is not rotated
      (True, (1, 2, 1, 4))
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, half)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_normalize(x, eps: float):
    """``x / rms(x)`` over the last axis, in float32 (the caller applies its own weight).

    Example:
      >>> import jax.numpy as jnp
      >>> y = rms_normalize(jnp.array([[3.0, 4.0]]), 0.0)  # rms = sqrt(12.5)
      >>> [round(float(v), 4) for v in y[0]]
      [0.8485, 1.1314]
    """
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
