"""lora_jax: functional LoRA for JAX and Flax.

LoRA as a pytree transform: a :class:`LoraConfig` picks target leaves of any
params pytree, :func:`init_lora` splits the params into a frozen base and a
trainable low-rank delta, :func:`merge` returns dense params, :func:`freeze`
masks an optax optimizer so only the delta trains.
"""

from lora_jax.adapter_io import LoraBaseMismatchError, LoraFileError, load, save
from lora_jax.config import LoraConfig
from lora_jax.errors import (
    LoraConfigError,
    LoraError,
    LoraLayoutError,
    LoraStructureError,
    LoraTargetError,
)
from lora_jax.factors import LeafDelta, LoraFactors, column_norm, is_factors, lora_update
from lora_jax.implicit import LoraFallbackWarning, LoraImplicitError, implicit
from lora_jax.infer import infer_layouts
from lora_jax.init import init_factors, init_lora
from lora_jax.layout import KernelLayout, default_layout
from lora_jax.loraplus import lora_plus
from lora_jax.merge import align, dora_norms, merge, unmerge
from lora_jax.optim import count_params, freeze, trainable_mask, tree_bytes
from lora_jax.paths import leaves_with_paths, path_str
from lora_jax.peft_format import NameMap, export_peft, import_peft
from lora_jax.sharding import (
    LoraShardingError,
    delta_shardings,
    factor_specs,
    init_lora_sharded,
    opt_state_shardings,
    param_shardings,
)
from lora_jax.summary import LeafSummary, LoraSummary, print_summary, summarize
from lora_jax.targets import Target, select_extra_trainable, select_targets
from lora_jax.variants import olora, pissa, with_dora

__version__ = "0.1.0"

__all__ = [
    "KernelLayout",
    "LeafDelta",
    "LeafSummary",
    "LoraBaseMismatchError",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "LoraFactors",
    "LoraFallbackWarning",
    "LoraFileError",
    "LoraImplicitError",
    "LoraLayoutError",
    "LoraShardingError",
    "LoraStructureError",
    "LoraSummary",
    "LoraTargetError",
    "NameMap",
    "Target",
    "align",
    "column_norm",
    "count_params",
    "default_layout",
    "delta_shardings",
    "dora_norms",
    "export_peft",
    "factor_specs",
    "freeze",
    "implicit",
    "import_peft",
    "infer_layouts",
    "init_factors",
    "init_lora",
    "init_lora_sharded",
    "is_factors",
    "leaves_with_paths",
    "load",
    "lora_plus",
    "lora_update",
    "merge",
    "olora",
    "opt_state_shardings",
    "param_shardings",
    "path_str",
    "pissa",
    "print_summary",
    "save",
    "select_extra_trainable",
    "select_targets",
    "summarize",
    "trainable_mask",
    "tree_bytes",
    "unmerge",
    "with_dora",
]
