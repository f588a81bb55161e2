"""LoRA variants that change the starting point: DoRA, PiSSA, OLoRA.

Each is a pure function of ``(base, delta)`` returning the new pair, so they
compose with :func:`lora_jax.init_lora` (which calls them when the config asks).

* **DoRA** (:func:`with_dora`): adds a trainable magnitude per output feature,
  ``m = ||W + s A B||_c`` (norm over the fan-in axes); the model then uses
  ``W' = m * (W + s A B) / ||W + s A B||_c`` with the norm detached.
* **PiSSA** (:func:`pissa`): with ``W = U S V^T`` (per stacked kernel, ``W``
  flattened to ``(fan_in, fan_out)``), ``A = U_r sqrt(S_r / s)``,
  ``B = sqrt(S_r / s) V_r^T``, so ``s A B`` is the best rank-``r``
  approximation of ``W``; the base becomes the residual ``W - s A B``.
  ``niter`` selects a randomised SVD (Halko et al.) for large kernels.
* **OLoRA** (:func:`olora`): with ``W^T = Q R`` (PEFT's orientation),
  ``A = R_r^T``, ``B = Q_r^T``; the base becomes ``W - s A B``.

PiSSA and OLoRA return a **new base**: keep it beside the delta. ``merge(new_base,
delta)`` is the original weight at step 0 (to float tolerance) and the original
weight plus the trained update afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LoraFactors, align, column_norm, dense_delta
from lora_jax._errors import LoraConfigError

Array = jax.Array


def with_dora(base: Any, delta: Any) -> Any:
    """Adds DoRA magnitudes ``m = ||W + s A B||_c`` (``(*stack, *fan_out)``) to every target.

    At initialisation ``m`` equals the norm, so ``W' = W + s A B``: the model
    is unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 3))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> lj.with_dora(base, delta)["w"].magnitude
      Array([2., 2., 2.], dtype=float32)
    """

    def add(path, w, f):
        _need_values(path, w, "DoRA")
        _refuse_layers(path, f, "DoRA")
        if f.layout.expert_axes:
            raise LoraConfigError(
                f"leaf {path!r}: DoRA is not supported on an experts kernel (layout "
                f"{f.layout.axes!r}): its per-output norm cannot be applied after a ragged_dot "
                "or an einsum that sums over experts without forming each expert's output "
                "(PEFT's target_parameters refuse DoRA too); adapt it with plain LoRA"
            )
        return f.replace(magnitude=column_norm(w, f.layout, f).astype(f.a.dtype))

    return _map_factors(base, delta, add)


def pissa(
    base: Any, delta: Any, niter: int | None = None, key: Array | None = None
) -> tuple[Any, Any]:
    """PiSSA init: factors from the top-``r`` singular triplets, base = residual.

    Args:
      base: the params.
      delta: a delta (its factors' shapes, ranks and scales are kept, values replaced).
      niter: ``None`` for an exact SVD, or the number of power iterations of a
        randomised SVD (PEFT's ``pissa_niter_[n]``).
      key: PRNG key for the randomised SVD (default ``jax.random.key(0)``).

    Returns:
      ``(residual_base, delta)``.

    Raises:
      LoraConfigError: ``r`` exceeds the numerical rank of a kernel.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=1))
      >>> new_base, delta = lj.pissa(base, delta)
      >>> new_base["w"].diagonal(), lj.merge(new_base, delta)["w"].diagonal()
      (Array([0., 2., 1.], dtype=float32), Array([3., 2., 1.], dtype=float32))
    """
    key = jax.random.key(0) if key is None else key

    def factorize(w2, r, s, path):
        if niter is None:
            u, sv, vt = jnp.linalg.svd(w2, full_matrices=False)
        else:
            u, sv, vt = _randomized_svd(w2, r, niter, jax.random.fold_in(key, len(path)))
        _check_rank(sv, r, path, "PiSSA")
        root = jnp.sqrt(sv[..., :r] / s)
        return u[..., :, :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]

    return _reinit(base, delta, factorize, "PiSSA")


def olora(base: Any, delta: Any) -> tuple[Any, Any]:
    """OLoRA init: ``W^T = Q R``, ``A = R_r^T``, ``B = Q_r^T``; base = ``W - s A B``.

    Returns:
      ``(residual_base, delta)``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": w}, lj.LoraConfig(targets="w", rank=1))
      >>> new_base, delta = lj.olora(base, delta)
      >>> bool(jnp.allclose(lj.merge(new_base, delta)["w"], w, atol=1e-6))
      True
    """

    def factorize(w2, r, s, path):
        q, rr = jnp.linalg.qr(jnp.swapaxes(w2, -1, -2))  # W^T: (N, K) = Q (N, k) R (k, K)
        _check_rank(jnp.abs(jnp.diagonal(rr, axis1=-2, axis2=-1)), r, path, "OLoRA")
        return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)

    return _reinit(base, delta, factorize, "OLoRA")


def _reinit(
    base: Any,
    delta: Any,
    factorize: Callable[[Array, int, float, str], tuple[Array, Array]],
    name: str,
) -> tuple[Any, Any]:
    """Replaces every target's factors by ``factorize(W2)`` and its base by the residual."""
    rows, treedef = align(base, delta)
    new_base, new_delta = [], []
    for path, w, f in rows:
        if not isinstance(f, LoraFactors):  # untargeted, or trained in full (LeafDelta)
            new_base.append(w)
            new_delta.append(f)
            continue
        _need_values(path, w, name)
        _refuse_layers(path, f, name)
        if f.segments:  # its SVD / QR factors would not be block-diagonal
            raise LoraConfigError(
                f"leaf {path!r}: {name} cannot initialise per-projection segments of a fused kernel"
            )
        layout, ns = f.layout, len(f.layout.batch_axes)
        wf = jnp.transpose(jnp.asarray(w, jnp.float32), layout.permutation)
        stack, fan_in, fan_out = wf.shape[:ns], f.a.shape[ns:-1], f.b.shape[ns + 1 :]
        w2 = wf.reshape(stack + (math.prod(fan_in), math.prod(fan_out)))
        a, b = factorize(w2, f.rank, f.scale, path)
        factors = f.replace(
            a=a.reshape(f.a.shape).astype(f.a.dtype), b=b.reshape(f.b.shape).astype(f.b.dtype)
        )
        new_base.append((jnp.asarray(w, jnp.float32) - dense_delta(factors)).astype(w.dtype))
        new_delta.append(factors)
    unflatten = jax.tree_util.tree_unflatten
    return unflatten(treedef, new_base), unflatten(treedef, new_delta)


def _randomized_svd(w: Array, r: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Top singular triplets of ``w`` ``(..., K, N)`` by a randomised range finder."""
    k = min(r + 8, *w.shape[-2:])
    omega = jax.random.normal(key, w.shape[:-2] + (w.shape[-1], k), w.dtype)
    wt = jnp.swapaxes(w, -1, -2)
    q, _ = jnp.linalg.qr(w @ omega)
    for _ in range(niter):
        q, _ = jnp.linalg.qr(wt @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u_small, sv, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w, full_matrices=False)
    return q @ u_small, sv, vt


def _check_rank(values: Array, r: int, path: str, name: str) -> None:
    """``values``: singular values (or |diag R|) of each stacked kernel, largest first."""
    v = np.asarray(values)
    tol = np.max(v, axis=-1, keepdims=True) * max(v.shape[-1], 1) * np.finfo(np.float32).eps
    numerical = int(np.min(np.sum(v > tol, axis=-1)))
    if r > numerical:
        raise LoraConfigError(
            f"leaf {path!r}: {name} with rank {r} needs a kernel of rank >= {r}, but its "
            f"numerical rank is {numerical}"
        )


def _refuse_layers(path: str, f: LoraFactors, name: str) -> None:
    if f.layers is not None:
        raise LoraConfigError(f"leaf {path!r}: {name} cannot be combined with layers= yet")


def _need_values(path: str, w: Any, name: str) -> None:
    if not isinstance(w, (jax.Array, np.ndarray)):
        raise LoraConfigError(
            f"leaf {path!r}: {name} reads the kernel's values; got {type(w).__name__} "
            "(abstract params work only for the plain LoRA inits)"
        )


def _map_factors(base: Any, delta: Any, fn: Callable[[str, Any, LoraFactors], Any]) -> Any:
    rows, treedef = align(base, delta)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(path, w, f) if isinstance(f, LoraFactors) else f for path, w, f in rows]
    )
