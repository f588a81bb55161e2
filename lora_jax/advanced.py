"""Lower-level building blocks of lora_jax, for users who extend it.

No stability promise: names here may change between minor versions. The
public API is what ``lora_jax`` itself exports.

========================  =====================================================
name                      what it is
========================  =====================================================
``LayerSelection``        which stacked layers a kernel's factors hold
``Target``                one kernel chosen by a config (shape, layout, rank, alpha)
``select_targets``        the validated targets of a config, without making arrays
``select_extra_trainable``  the leaves a config trains in full
``default_layout``        the layout assumed for a 2-D kernel
``init_factors``          one target's freshly drawn factors
``lora_scale``            ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
``dense_delta``           the dense update ``s A B`` of one factor pair
``column_norm``           DoRA's ``||W + s A B||_c``
``align``                 every base leaf paired with its delta entry
``is_factors``            ``is_leaf`` for :class:`~lora_jax.LoraFactors`
``is_delta_leaf``         ``is_leaf`` for factors and :class:`~lora_jax.LeafDelta`
``trainable_mask``        the mask behind :func:`~lora_jax.train_delta_only`
``factor_specs``          ``PartitionSpec`` s of ``A``, ``B``, magnitude from a kernel's
``leaves_with_paths``     ``[(path, leaf)]`` with lora_jax's path strings
``path_str``              a JAX key path as a lora_jax path string
``tree_bytes``            bytes held by a pytree's arrays
``is_quantized``          ``is_leaf`` for :class:`~lora_jax.QuantizedArray`
``kernel_bits``           stored bits per parameter of quantized (or given) kernels
``quantized_shardings``   shardings of quantized params from their dense kernels' shardings
``storage_specs``         ``PartitionSpec`` s of a quantized kernel's stored arrays
``LoraSummary``           the report :func:`~lora_jax.summarize` returns
``LeafSummary``           one row of a ``LoraSummary``
``unstack``               one slot of an adapter stack as a plain delta (to merge it)
``is_stacked``            ``is_leaf`` for :class:`~lora_jax.StackedFactors`
``atomic_write``          writes a file atomically (temp sibling, fsync, rename), as ``save`` does
``tenant_weights``        each row's weight ``1 / count(its tenant)`` in a mixed batch
``rows_per_slot``         each slot's row count in a mixed batch
``TenantSettings``        per-slot optimizer settings (:func:`~lora_jax.tenant_settings` makes them)
``TenantOptState``        the per-slot state of :func:`~lora_jax.tenant_optimizer`
``copy_slot``             one slot copied exactly from one stack to another (an RL sync)
``slot_nbytes``           the bytes of one slot of a stack
``split_segments``        a fused kernel's per-projection adapters as one plain delta entry each
``join_segments``         the inverse: per-segment factors back into the fused kernel's
``segment_params``        params shapes with fused kernels split per segment (for ``import_peft``)
``segment_rules``         name-map rules from a fused kernel's segments to PyTorch modules
========================  =====================================================

Example:
  >>> import jax.numpy as jnp
  >>> from lora_jax import advanced
  >>> advanced.lora_scale(16.0, 8)
  2.0
"""

from lora_jax._delta import (
    LayerSelection,
    align,
    column_norm,
    dense_delta,
    is_delta_leaf,
    is_factors,
    lora_scale,
)
from lora_jax._files.atomic import atomic_write
from lora_jax._files.peft.fused import join_segments, segment_params, split_segments
from lora_jax._files.peft.names import segment_rules
from lora_jax._init_lora import init_factors
from lora_jax._layout import default_layout
from lora_jax._optim import trainable_mask
from lora_jax._paths import leaves_with_paths, path_str
from lora_jax._quant.array import is_quantized
from lora_jax._quant.storage_sharding import quantized_shardings, storage_specs
from lora_jax._quant.trees import kernel_bits
from lora_jax._serving.stack import is_stacked, unstack
from lora_jax._serving.tenants import (
    TenantOptState,
    TenantSettings,
    copy_slot,
    rows_per_slot,
    slot_nbytes,
    tenant_weights,
)
from lora_jax._sharding import factor_specs
from lora_jax._summary import LeafSummary, LoraSummary, tree_bytes
from lora_jax._targets import Target, select_extra_trainable, select_targets

__all__ = [
    "LayerSelection",
    "LeafSummary",
    "LoraSummary",
    "Target",
    "TenantOptState",
    "TenantSettings",
    "align",
    "atomic_write",
    "column_norm",
    "copy_slot",
    "default_layout",
    "dense_delta",
    "factor_specs",
    "init_factors",
    "is_delta_leaf",
    "is_factors",
    "is_quantized",
    "is_stacked",
    "join_segments",
    "kernel_bits",
    "leaves_with_paths",
    "lora_scale",
    "path_str",
    "quantized_shardings",
    "rows_per_slot",
    "segment_params",
    "segment_rules",
    "select_extra_trainable",
    "select_targets",
    "slot_nbytes",
    "split_segments",
    "storage_specs",
    "tenant_weights",
    "trainable_mask",
    "tree_bytes",
    "unstack",
]
