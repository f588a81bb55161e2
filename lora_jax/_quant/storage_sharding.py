"""Shardings of a quantized kernel's stored arrays, derived from the dense kernel's spec."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax._errors import LoraShardingError
from lora_jax._paths import leaves_with_paths
from lora_jax._quant.array import QuantizedArray, is_quantized, layer_shaped, row_unit, split_axes


def storage_specs(
    q: QuantizedArray, kernel_spec: Any, mesh_sizes: Mapping[str, int], path: str = "<kernel>"
) -> QuantizedArray:
    """``PartitionSpec`` s of ``q``'s stored arrays from the dense kernel's spec.

    Stacked axes keep their specs (they lead every stored array). When each
    layer is stored in the kernel's shape (its last axis holds whole blocks,
    the usual case), the codes and blockwise scales take the spec of every
    kernel axis: fan-in, fan-out or both (tensor parallel), a shard of the
    last axis holding whole blocks with their scales. A layer stored
    flattened takes only its first axis's spec. Per-channel scales take the
    fan-out axes' specs; double-quantization scales and offsets (4 bytes per
    16384 weights) are replicated but for stacked axes.

    Args:
      q: the quantized kernel.
      kernel_spec: the ``PartitionSpec`` the dense kernel has (kernel axis order).
      mesh_sizes: ``{mesh axis name: size}`` (``dict(mesh.shape)``).
      path: the leaf path, for messages.

    Raises:
      LoraShardingError: a shard would split a block (or a byte of two 4-bit
        codes), or a flattened layer is sharded on another than its first axis
        (the message names the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from lora_jax import quantize
      >>> q = quantize({"w": jnp.ones((256, 128))}, "w", double_quant=True)["w"]
      >>> q.codes.shape, q.scales.shape
      ((256, 64), (256, 2))
      >>> s = storage_specs(q, P(None, "tp"), {"tp": 2})       # fan-out sharded
      >>> [tuple(x) for x in (s.codes, s.scales, s.dq_scales, s.dq_offset)]
      [(None, 'tp'), (None, 'tp'), (None,), (None,)]
    """
    from jax.sharding import PartitionSpec as P

    entries = list(tuple(kernel_spec)) + [None] * (q.ndim - len(tuple(kernel_spec)))
    stack_axes, rest_axes, roles = split_axes(q.axes)
    stack = [entries[d] for d in stack_axes]
    rest = [entries[d] for d in rest_axes]

    def shards(entry: Any) -> int:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return math.prod(mesh_sizes[n] for n in names)

    unit = row_unit(q.scheme, q.block_size)
    if layer_shaped(q.shape, q.axes, q.scheme, q.block_size):
        last = q.shape[rest_axes[-1]]
        if (last // shards(rest[-1])) % unit:
            raise LoraShardingError(
                f"leaf {path!r}: {shards(rest[-1])} shards of its last axis ({last}) would "
                f"split a block of {q.block_size or 1} ({q.scheme}); use fewer shards or a "
                "smaller block_size"
            )
        codes = P(*stack, *rest)
    else:
        if any(e is not None for e in rest[1:]):
            raise LoraShardingError(
                f"leaf {path!r}: its last axis ({q.shape[rest_axes[-1]]}) holds no whole "
                f"blocks of {unit}, so each layer is stored flattened and only its first "
                f"non-stacked axis can be sharded; spec {tuple(entries)} shards another "
                f"(axes {q.axes!r}). Shard the first axis, or keep this kernel dense"
            )
        n = math.prod(q.shape[d] for d in rest_axes)
        if shards(rest[0]) > 1 and (n // shards(rest[0])) % unit:
            raise LoraShardingError(
                f"leaf {path!r}: {shards(rest[0])} shards of {n} weights per layer would split "
                f"a block of {q.block_size or 1} ({q.scheme}); use fewer shards or a smaller "
                "block_size"
            )
        codes = P(*stack, rest[0])
    if q.block_size is None:
        scales = P(*stack, *[e for e, c in zip(rest, roles) if c == "o"])
    else:
        scales = codes
    flat = None if q.dq_scales is None else P(*stack, None)
    return dataclasses.replace(q, codes=codes, scales=scales, dq_scales=flat, dq_offset=flat)


def quantized_shardings(params: Any, kernel_shardings: Any) -> Any:
    """Shardings for quantized params, from the shardings their dense kernels have.

    Args:
      params: params with :class:`QuantizedArray` leaves (arrays or abstract).
      kernel_shardings: ``NamedSharding`` s shaped like the dense params (e.g.
        :func:`lora_jax.param_shardings` of the unquantized params); also what
        :func:`lora_jax.delta_shardings` takes for the delta.

    Returns:
      A tree like ``params``: a ``NamedSharding`` per dense leaf, and at each
      quantized leaf a :class:`QuantizedArray` of ``NamedSharding`` s (see
      :func:`storage_specs`), ready for ``jax.device_put`` / ``jit``'s shardings.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> import jax.numpy as jnp
      >>> from lora_jax import quantize
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
      >>> q = quantize({"w": jnp.ones((128, 64))}, "w")
      >>> s = quantized_shardings(q, {"w": NamedSharding(mesh, P("fsdp"))})
      >>> tuple(s["w"].codes.spec), tuple(s["w"].scales.spec)
      (('fsdp', None), ('fsdp', None))
    """
    from jax.sharding import NamedSharding

    leaves, treedef = leaves_with_paths(params)
    given, _ = leaves_with_paths(kernel_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = dict(given)
    out = []
    for path, leaf in leaves:
        sh = by_path.get(path)
        if sh is None:
            raise LoraShardingError(f"leaf {path!r} has no entry in the kernel shardings")
        if not is_quantized(leaf):
            out.append(sh)
            continue
        specs = storage_specs(leaf, sh.spec, dict(sh.mesh.shape), path)
        out.append(_on_mesh(sh.mesh, specs))
    return jax.tree_util.tree_unflatten(treedef, out)


def _on_mesh(mesh: Any, specs: QuantizedArray) -> QuantizedArray:
    """A ``NamedSharding`` on ``mesh`` for each ``PartitionSpec`` of ``specs`` (a tree of specs)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
