"""Qwen3-MoE in Flax linen, loadable from transformers' safetensors checkpoints.

From the repository root (or with it on ``PYTHONPATH``)::

    from examples.qwen3_moe import Qwen3Moe, load

    cfg, params = load("path/to/checkpoint")     # config.json + model.safetensors
    logits = Qwen3Moe(cfg).apply(params, tokens)  # (B, T, vocab)

* :class:`Qwen3Moe` / :class:`Qwen3MoeConfig`: the model (``model.py``), experts
  through ``jax.lax.ragged_dot``; :data:`ATTENTION` and :data:`EXPERTS` are
  LoRA target regexes, :data:`EXPERT_LAYOUT` the expert kernels' layout and
  :data:`HF_NAMES` the :class:`lora_jax.NameMap` to transformers' names;
* :func:`load`: a checkpoint directory by name (``loader.py``).

``finetune.py`` beside them is the recipe (``python -m examples.qwen3_moe.finetune``).
"""

from examples.qwen3_moe.loader import load
from examples.qwen3_moe.model import (
    ATTENTION,
    EXPERT_LAYOUT,
    EXPERTS,
    HF_NAMES,
    Qwen3Moe,
    Qwen3MoeConfig,
    init_params,
)

__all__ = [
    "ATTENTION",
    "EXPERTS",
    "EXPERT_LAYOUT",
    "HF_NAMES",
    "Qwen3Moe",
    "Qwen3MoeConfig",
    "init_params",
    "load",
]
