"""lora_jax: functional LoRA for JAX and Flax.

LoRA as a pytree transform: a :class:`LoraConfig` picks target leaves of any
params pytree, :func:`init_lora` splits the params into a frozen base and a
trainable low-rank delta, :func:`implicit` runs a model on ``(base, delta)``
without merging, :func:`merge` returns dense params for serving, and
:func:`train_delta_only` masks an optax optimizer so only the delta trains.
:func:`quantize` stores a frozen base in 4 or 8 bits (QLoRA), and
:func:`stack_adapters` puts many adapters in one stack that ``implicit``
serves per example (``adapter_ids=``) in one batch; :class:`AdapterCache`
keeps many named adapters in a host tier and moves them into a stack's device
slots on demand; :func:`tenant_optimizer` and :func:`tenant_loss` train every
slot of a stack at once, each as if alone.

Everything here is the public API. :mod:`lora_jax.advanced` holds lower-level
building blocks with no stability promise; every other module is private.
"""

from lora_jax import advanced as advanced
from lora_jax import debug as debug
from lora_jax._config import LoraConfig
from lora_jax._delta import LeafDelta, LoraBias, LoraFactors, TokenRows
from lora_jax._errors import (
    LoraArgumentError,
    LoraBaseMismatchError,
    LoraConfigError,
    LoraError,
    LoraFallbackWarning,
    LoraFileError,
    LoraImplicitError,
    LoraLayoutError,
    LoraShardingError,
    LoraStructureError,
    LoraTargetError,
)
from lora_jax._files.base_files import load_base, save_base
from lora_jax._files.lora_format import load, save
from lora_jax._files.peft.format import NameMap, export_peft, import_peft
from lora_jax._implicit.interpreter import implicit
from lora_jax._implicit.layout_inference import infer_layouts
from lora_jax._init_lora import init_lora
from lora_jax._layout import KernelLayout
from lora_jax._merge import dora_norms, merge, unmerge
from lora_jax._optim import lora_plus, train_delta_only
from lora_jax._quant.array import QuantizedArray
from lora_jax._quant.qlora import loftq, requantize
from lora_jax._quant.trees import dequantize, quantize
from lora_jax._serving.cache import AdapterCache
from lora_jax._serving.combine import combine, truncate_rank
from lora_jax._serving.stack import StackedFactors, set_adapter, stack_adapters
from lora_jax._serving.tenants import tenant_loss, tenant_optimizer, tenant_settings
from lora_jax._sharding import (
    delta_shardings,
    init_lora_sharded,
    opt_state_shardings,
    param_shardings,
)
from lora_jax._summary import count_params, print_summary, summarize
from lora_jax._variants import olora, pissa, with_dora

__version__ = "0.1.0"

__all__ = [
    "AdapterCache",
    "KernelLayout",
    "LeafDelta",
    "LoraArgumentError",
    "LoraBaseMismatchError",
    "LoraBias",
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
    "LoraTargetError",
    "NameMap",
    "QuantizedArray",
    "StackedFactors",
    "TokenRows",
    "combine",
    "count_params",
    "delta_shardings",
    "dequantize",
    "dora_norms",
    "export_peft",
    "implicit",
    "import_peft",
    "infer_layouts",
    "init_lora",
    "init_lora_sharded",
    "load",
    "load_base",
    "loftq",
    "lora_plus",
    "merge",
    "olora",
    "opt_state_shardings",
    "param_shardings",
    "pissa",
    "print_summary",
    "quantize",
    "requantize",
    "save",
    "save_base",
    "set_adapter",
    "stack_adapters",
    "summarize",
    "tenant_loss",
    "tenant_optimizer",
    "tenant_settings",
    "train_delta_only",
    "truncate_rank",
    "unmerge",
    "with_dora",
]
