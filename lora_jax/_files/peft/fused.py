"""A fused kernel's per-projection adapters as separate PEFT modules, both ways.

A kernel with ``segments`` (k/v fused as one ``(d, 2*h*k)`` kernel) holds one
adapter per projection (:mod:`lora_jax._segments`); PEFT holds the same
adapters on two ``nn.Linear`` modules (``k_proj``, ``v_proj``). The bridge
is three pure tree functions around the unchanged :func:`~lora_jax.export_peft`
/ :func:`~lora_jax.import_peft`:

* :func:`split_segments` -- a delta whose segmented kernels are replaced by one
  plain :class:`~lora_jax.LoraFactors` per segment, at ``<path>/<j>``
  (``A_j (*stack, *fan_in, r)``, ``B_j (*stack, r, out_j)``, layout
  ``s..i..o``), ready for ``export_peft``;
* :func:`segment_params` -- the params' shapes with the same replacement, the
  ``params`` ``import_peft`` fits the PEFT modules to;
* :func:`join_segments` -- the inverse of :func:`split_segments`: per-segment
  factors back into the fused kernel's block-diagonal factors.

The name map then sends ``<path>/<j>`` to PEFT module ``j``
(:func:`~lora_jax._files.peft.names.segment_rules` writes those rules).

Example:
  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> params = {"kv": {"kernel": jnp.ones((4, 6))}}
  >>> cfg = lj.LoraConfig(targets=".*kernel", rank=1, segments={"kv/kernel": 2})
  >>> _, delta = lj.init_lora(jax.random.key(0), params, cfg)
  >>> parts = split_segments(delta)
  >>> parts["kv"]["kernel"]["1"].b.shape
  (1, 3)
  >>> back = join_segments(parts, delta)
  >>> bool((back["kv"]["kernel"].a == delta["kv"]["kernel"].a).all())
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LoraFactors, delta_entries, is_delta_leaf
from lora_jax._errors import LoraStructureError
from lora_jax._files.safetensors_io import nested_from_paths
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths


def _segment_layout(f: LoraFactors) -> KernelLayout:
    """The layout of one segment's factors: ``s..e..`` + ``i..`` + ``o`` (factor order)."""
    layout = f.layout
    batch = "".join(layout.axes[a] for a in layout.batch_axes)
    return KernelLayout(batch + "i" * len(layout.in_axes) + "o", layout.kind)


def _starts(sizes: tuple[int, ...]) -> list[int]:
    return [int(x) for x in np.cumsum((0,) + sizes[:-1])]


def split_one(f: LoraFactors) -> list[LoraFactors]:
    """One segmented kernel's factors as one plain :class:`LoraFactors` per segment.

    Segment ``j`` holds ``A_j = a[..., j*r:(j+1)*r]`` and ``B_j`` the block of
    rows ``j*r:(j+1)*r`` and columns ``start_j:start_j+out_j`` of ``b`` with its
    fan-out flattened; ``alpha``, ``rslora`` and ``layers`` are kept, so each
    has the scale ``alpha / r`` of the fused kernel's segments.

    Example:
      >>> f = LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0,
      ...                 layout=KernelLayout("io"), segments=(1, 3))
      >>> [(p.a.shape, p.b.shape, p.scale) for p in split_one(f)]
      [((3, 1), (1, 1), 1.0), ((3, 1), (1, 3), 1.0)]
    """
    if not f.segments:
        raise LoraStructureError("split_one: the factors have no segments")
    ns = len(f.layout.batch_axes)
    r = f.segment_rank
    b = jnp.asarray(f.b)
    flat = b.reshape(b.shape[: ns + 1] + (-1,))
    out = []
    for j, (start, size) in enumerate(zip(_starts(f.segments), f.segments)):
        out.append(
            LoraFactors(
                jnp.asarray(f.a)[..., j * r : (j + 1) * r],
                flat[..., j * r : (j + 1) * r, start : start + size],
                alpha=f.alpha,
                layout=_segment_layout(f),
                rslora=f.rslora,
                magnitude=None,
                layers=f.layers,
            )
        )
    return out


def split_segments(delta: Any) -> dict:
    """``delta`` as nested dicts, each segmented kernel's entry replaced by ``{"0": f_0, ...}``.

    Args:
      delta: a lora_jax delta (any tree); kernels with ``segments`` are split
        (:func:`split_one`), every other entry is kept at its path.

    Returns:
      A nested dict of delta entries (paths as :func:`~lora_jax.export_peft`
      sees them: ``<path>/0``, ``<path>/1``, ...).

    Example:
      >>> f = LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0,
      ...                 layout=KernelLayout("io"), segments=(2, 2))
      >>> sorted(split_segments({"kv": f})["kv"])
      ['0', '1']
    """
    items: list[tuple[str, Any]] = []
    for path, entry in delta_entries(delta):
        if isinstance(entry, LoraFactors) and entry.segments:
            items += [(f"{path}/{j}", part) for j, part in enumerate(split_one(entry))]
        else:
            items.append((path, entry))
    return nested_from_paths(items)


def segment_params(params: Any, like: Any) -> dict:
    """``params``' shapes as nested dicts, each kernel segmented in ``like`` replaced by one
    ``jax.ShapeDtypeStruct`` ``(*stack, *fan_in, out_j)`` per segment at ``<path>/<j>``.

    Pass it as :func:`~lora_jax.import_peft`'s ``params`` to read PEFT modules
    that are the projections of a fused kernel, then :func:`join_segments`.

    Args:
      params: the base params (arrays or shapes).
      like: a delta with the fused kernels' segmented factors (for example
        from :func:`~lora_jax.init_lora` with ``LoraConfig(segments=...)``).

    Example:
      >>> f = LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0,
      ...                 layout=KernelLayout("io"), segments=(1, 3))
      >>> segment_params({"kv": jnp.ones((3, 4))}, {"kv": f})["kv"]["1"].shape
      (3, 3)
    """
    segmented = {p: e for p, e in delta_entries(like) if isinstance(e, LoraFactors) and e.segments}
    items: list[tuple[str, Any]] = []
    for path, leaf in leaves_with_paths(params)[0]:
        f = segmented.get(path)
        shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
        dtype = getattr(leaf, "dtype", np.float32)
        if f is None:
            items.append((path, jax.ShapeDtypeStruct(shape, dtype)))
            continue
        layout = f.layout
        f.check_fits(path, shape)
        lead = tuple(shape[a] for a in layout.batch_axes + layout.in_axes)
        items += [
            (f"{path}/{j}", jax.ShapeDtypeStruct(lead + (size,), dtype))
            for j, size in enumerate(f.segments or ())
        ]
    return nested_from_paths(items)


def join_one(path: str, parts: list[Any], like: LoraFactors) -> LoraFactors:
    """Per-segment factors (from :func:`split_one`, or imported) as ``like``'s fused factors.

    Raises:
      LoraStructureError: a segment is missing or not plain LoRA factors, or the
        segments' rank, alpha, rsLoRA or layers differ (one fused kernel holds
        one of each), or their shapes do not fit ``like``.

    Example:
      >>> f = LoraFactors(jnp.ones((3, 2)), jnp.arange(8.0).reshape(2, 4), alpha=1.0,
      ...                 layout=KernelLayout("io"), segments=(1, 3))
      >>> join_one("kv", split_one(f), f).b.tolist()
      [[0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 6.0, 7.0]]
    """
    sizes = like.segments or ()
    if len(parts) != len(sizes) or not all(
        isinstance(p, LoraFactors) and not p.segments and p.magnitude is None for p in parts
    ):
        raise LoraStructureError(
            f"leaf {path!r}: a fused kernel of {len(sizes)} segments needs plain LoRA factors "
            f"at {path}/0 .. {path}/{len(sizes) - 1}, got "
            f"{[type(p).__name__ for p in parts]}"
        )
    for field in ("rank", "alpha", "rslora", "layers"):
        values = {repr(getattr(p, field)) for p in parts}
        if len(values) > 1:
            raise LoraStructureError(
                f"leaf {path!r}: its segments' adapters differ in {field} ({sorted(values)}); "
                "the projections of one fused kernel share one rank, alpha, rsLoRA flag and "
                "layer selection (give the kernels separate leaves, or retrain)"
            )
    layout = like.layout
    ns = len(layout.batch_axes)
    r = parts[0].rank
    fan_out = tuple(kernel_out(like))
    dtype = jnp.result_type(*[jnp.asarray(p.b) for p in parts])
    stack = tuple(np.shape(parts[0].a)[:ns])
    blocks = []
    for j, (p, start, size) in enumerate(zip(parts, _starts(sizes), sizes)):
        b = jnp.asarray(p.b, dtype).reshape(stack + (r, -1))
        if b.shape[-1] != size:
            raise LoraStructureError(
                f"leaf {path!r}: segment {j}'s B has {b.shape[-1]} outputs, expected {size}"
            )
        pad = [(0, 0)] * (ns + 1) + [(start, sum(sizes) - start - size)]
        blocks.append(jnp.pad(b, pad))
    b_full = jnp.concatenate(blocks, axis=ns).reshape(stack + (len(sizes) * r,) + fan_out)
    a_full = jnp.concatenate([jnp.asarray(p.a) for p in parts], axis=-1)
    out = LoraFactors(
        a_full,
        b_full,
        alpha=parts[0].alpha,
        layout=layout,
        rslora=parts[0].rslora,
        layers=parts[0].layers,
        segments=like.segments,
    )
    out.check_fits(path, like.kernel_shape)
    return out


def kernel_out(f: LoraFactors) -> tuple[int, ...]:
    """The fan-out axes' sizes of the kernel ``f`` adapts, in factor order."""
    ns = len(f.layout.batch_axes)
    return tuple(np.shape(f.b)[ns + 1 :])


def join_segments(split: Any, like: Any) -> Any:
    """The inverse of :func:`split_segments`: a delta with ``like``'s tree structure.

    Args:
      split: nested dicts (or any tree) with per-segment factors at
        ``<path>/<j>`` for each kernel segmented in ``like``, and the other
        entries at their paths (for example :func:`~lora_jax.import_peft`'s
        result with ``params=segment_params(params, like)``).
      like: a delta whose segmented kernels say the fused kernels' layouts
        and sizes; its arrays are not used. Paths ``split`` lacks get ``None``.

    Returns:
      A delta with ``like``'s structure: segmented kernels joined
      (:func:`join_one`, exact), every other entry taken from ``split``.

    Example:
      >>> f = LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0,
      ...                 layout=KernelLayout("io"), segments=(2, 2))
      >>> join_segments(split_segments({"kv": f}), {"kv": f})["kv"].segments
      (2, 2)
    """
    found = dict(delta_entries(split))
    entries, treedef = leaves_with_paths(like, is_leaf=lambda x: x is None or is_delta_leaf(x))
    out: list[Any] = []
    for path, entry in entries:
        if isinstance(entry, LoraFactors) and entry.segments:
            parts = [found.get(f"{path}/{j}") for j in range(len(entry.segments))]
            out.append(join_one(path, parts, entry))
        else:
            out.append(found.get(path))
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["join_segments", "segment_params", "split_segments"]
