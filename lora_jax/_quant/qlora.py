"""LoRA over a quantized base: explicit re-quantization of merged weights, and LoftQ.

* :func:`requantize` quantizes merged dense kernels again, with the scheme of
  the quantized base they came from, and reports per kernel how much of the
  delta the rounding lost:

  .. math::

     \\text{lost} = \\frac{\\| \\hat Q(W') - W' \\|_F}{\\| W' - \\hat Q(W) \\|_F},
     \\qquad W' = \\hat Q(W) + s A B

  where ``Q̂`` is quantize-then-dequantize. 0 keeps the adapter exactly; near 1
  (or above) the adapter is mostly gone.
* :func:`loftq` initialises the factors so that ``Q̂(W') + s A B`` is close to
  ``W``: for ``t = 1..T``, ``Q = quantize(W - s A B)``, then ``s A B`` = the
  best rank-``r`` approximation (SVD) of ``W - Q̂`` (Li et al. 2023; PEFT's
  ``loftq_iter``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._delta import LoraFactors, align, dense_delta, is_factors
from lora_jax._errors import LoraArgumentError, LoraStructureError, LoraTargetError
from lora_jax._layout import KernelLayout  # noqa: F401  (doctests)
from lora_jax._paths import leaves_with_paths
from lora_jax._quant.array import QuantizedArray, dequantize_leaf, is_quantized, quantize_leaf
from lora_jax._quant.trees import check_leaf, check_scheme

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RequantReport:
    """What re-quantizing one merged kernel did to its delta.

    Attributes:
      delta_norm: ``||W' - Q̂(W)||_F``, the merged-in delta.
      lost_norm: ``||Q̂(W') - W'||_F``, the rounding the re-quantization added.
      fraction_lost: ``lost_norm / delta_norm`` (0 when both are 0, inf when only
        the delta is).
    """

    delta_norm: float
    lost_norm: float
    fraction_lost: float


def _like(q: QuantizedArray, w: Array, path: str) -> QuantizedArray:
    """``w`` quantized with ``q``'s scheme, block size, double quantization and axes."""
    if tuple(w.shape) != q.shape:
        raise LoraStructureError(
            f"leaf {path!r}: the merged kernel has shape {tuple(w.shape)}, the quantized base "
            f"{q.shape}"
        )
    return quantize_leaf(
        jnp.asarray(w), q.scheme, q.block_size, q.dq_scales is not None, q.axes, path
    )


def requantize(merged: Any, base: Any) -> tuple[Any, dict[str, RequantReport]]:
    """Quantizes merged kernels like the quantized base they came from, and reports the loss.

    Args:
      merged: dense params, e.g. ``merge(base, delta)``.
      base: the quantized base the delta was trained on: every leaf that is a
        :class:`~lora_jax.QuantizedArray` there is re-quantized in ``merged`` with
        the same scheme, block size, double quantization and axes.

    Returns:
      ``(params, report)``: ``merged`` with those leaves quantized, and
      ``{path: RequantReport}`` per re-quantized kernel (see the module docstring).

    Raises:
      LoraStructureError: ``merged`` and ``base`` differ in structure or shapes.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> w = jnp.linspace(-1.0, 1.0, 64 * 8).reshape(64, 8)
      >>> base = lj.quantize({"w": w}, "w", scheme="int8")
      >>> merged = {"w": lj.dequantize(base["w"]) + 1e-4}     # a delta far below one step
      >>> q, report = lj.requantize(merged, base)
      >>> report["w"].fraction_lost > 0.9                    # the rounding took (almost) all of it
      True
    """
    m_leaves, m_def = leaves_with_paths(merged)
    b_leaves, b_def = leaves_with_paths(base)
    if [p for p, _ in m_leaves] != [p for p, _ in b_leaves]:
        raise LoraStructureError(
            "requantize: the merged params and the base have different leaves "
            f"({[p for p, _ in m_leaves][:4]}... vs {[p for p, _ in b_leaves][:4]}...)"
        )
    out, report = [], {}
    for (path, w), (_, q) in zip(m_leaves, b_leaves):
        if not is_quantized(q):
            out.append(w)
            continue
        new = _like(q, w, path)
        report[path] = _report(w, q, new)
        out.append(new)
    return jax.tree_util.tree_unflatten(m_def, out), report


def _report(w: Array, old: QuantizedArray, new: QuantizedArray) -> RequantReport:
    w32 = jnp.asarray(w, jnp.float32)
    d = float(jnp.linalg.norm((w32 - dequantize_leaf(old, jnp.float32)).ravel()))
    lost = float(jnp.linalg.norm((dequantize_leaf(new, jnp.float32) - w32).ravel()))
    frac = lost / d if d > 0 else (0.0 if lost == 0 else math.inf)
    return RequantReport(d, lost, frac)


# --------------------------------------------------------------------------- LoftQ


def low_rank_factors(residual: Array, f: LoraFactors) -> tuple[Array, Array]:
    """``A, B`` with ``s A B`` the best rank-``r`` approximation of ``residual`` (per layer).

    With ``R = U S Vᵀ`` (factor order ``(*stack, fan_in, fan_out)``):
    ``A = U_r √(S_r / s)``, ``B = √(S_r / s) V_rᵀ``, in the factors' dtypes.

    Example:
      >>> f = LoraFactors(jnp.zeros((3, 1)), jnp.zeros((1, 2)), alpha=2.0,
      ...                 layout=KernelLayout("io"))
      >>> a, b = low_rank_factors(jnp.ones((3, 2)), f)
      >>> bool(jnp.allclose(f.scale * a @ b, 1.0, atol=1e-5))
      True
    """
    layout, r = f.layout, f.rank
    ns = len(layout.batch_axes)
    rf = jnp.transpose(jnp.asarray(residual, jnp.float32), layout.permutation)
    stack, fan_in = rf.shape[:ns], rf.shape[ns : ns + len(layout.in_axes)]
    fan_out = rf.shape[ns + len(layout.in_axes) :]
    mat = rf.reshape(stack + (math.prod(fan_in), math.prod(fan_out)))
    u, s, vh = jnp.linalg.svd(mat, full_matrices=False)
    root = jnp.sqrt(s[..., :r] / f.scale)
    a = (u[..., :r] * root[..., None, :]).reshape(stack + fan_in + (r,))
    b = (root[..., :, None] * vh[..., :r, :]).reshape(stack + (r,) + fan_out)
    return a.astype(jnp.asarray(f.a).dtype), b.astype(jnp.asarray(f.b).dtype)


def _loftq_one(
    path: str,
    w: Array,
    f: LoraFactors,
    scheme: str,
    block_size: int | None,
    double_quant: bool,
    num_iter: int,
) -> tuple[QuantizedArray, LoraFactors]:
    w32 = jnp.asarray(w, jnp.float32)
    low = jnp.zeros_like(w32)
    for _ in range(num_iter):
        q = quantize_leaf(
            (w32 - low).astype(w.dtype), scheme, block_size, double_quant, f.layout.axes, path
        )
        a, b = low_rank_factors(w32 - dequantize_leaf(q, jnp.float32), f)
        f = f.replace(a=a, b=b)
        low = dense_delta(f)
    return q, f


def loftq(
    params: Any,
    delta: Any,
    *,
    scheme: str = "nf4",
    block_size: Any = "auto",
    double_quant: bool = False,
    num_iter: int = 1,
) -> tuple[Any, Any]:
    """LoftQ: a quantized base and factors with ``Q̂ + s A B ≈ W`` at every LoRA kernel.

    Each kernel with :class:`~lora_jax.LoraFactors` in ``delta`` is quantized
    (see the module docstring for the alternation); other leaves stay dense.
    Keep the returned base: it is what the returned factors complement.

    Args:
      params: the dense base params.
      delta: a delta from :func:`~lora_jax.init_lora` (gives ranks, alphas,
        layouts); plain LoRA factors of every layer (no DoRA, no ``layers=``).
      scheme, block_size, double_quant: as :func:`~lora_jax.quantize`.
      num_iter: alternations (PEFT's ``loftq_iter``), >= 1.

    Returns:
      ``(quantized base, delta)``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, lora_jax as lj
      >>> w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": w},
      ...                            lj.LoraConfig(targets="w", rank=4))
      >>> qbase, delta = lj.loftq(base, delta, scheme="nf4")
      >>> plain = jnp.linalg.norm(lj.dequantize(lj.quantize(base, "w")["w"]) - w)
      >>> bool(jnp.linalg.norm(lj.merge(qbase, delta)["w"] - w) < plain)
      True
    """
    block_size = check_scheme(scheme, block_size, double_quant)
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise LoraArgumentError(f"loftq num_iter must be an integer >= 1, got {num_iter!r}")
    rows, treedef = align(params, delta)
    new_base, new_delta = [], []
    for path, w, f in rows:
        if not is_factors(f):
            new_base.append(w)
            new_delta.append(f)
            continue
        if f.magnitude is not None or f.layers is not None or f.segments:
            raise LoraTargetError(
                f"leaf {path!r}: loftq initialises plain LoRA factors of "
                "every layer (not DoRA, not a layer selection, not per-projection segments)"
            )
        check_leaf(path, w, f.layout)
        q, f = _loftq_one(path, jnp.asarray(w), f, scheme, block_size, double_quant, num_iter)
        new_base.append(q)
        new_delta.append(f)
    return (
        jax.tree_util.tree_unflatten(treedef, new_base),
        jax.tree_util.tree_unflatten(treedef, new_delta),
    )
