"""Loads a transformers Qwen3-MoE checkpoint (``save_pretrained``'s safetensors) by name.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or
shards listed in ``model.safetensors.index.json``), with PyTorch's names and
``(out, in)`` weights. The experts are stored as one 2-D tensor per expert, the
hub checkpoints' format that transformers fuses when it loads them:

===================================================  ==============================================
checkpoint tensor                                     Flax leaf (:mod:`examples.qwen3_moe.model`)
===================================================  ==============================================
``model.embed_tokens.weight (V, H)``                  ``params/embed_tokens/embedding (V, H)``
``model.layers.N.self_attn.q_proj.weight (o, i)``     ``params/layers_N/self_attn/q_proj/kernel (i, o)``
``...self_attn.q_norm.weight (D,)`` (and ``k_norm``)  ``params/layers_N/self_attn/q_norm/weight``
``model.layers.N.mlp.gate.weight (E, H)``             ``params/layers_N/mlp/gate/kernel (H, E)``
``...mlp.experts.{e}.gate_proj.weight (I, H)``,       ``params/layers_N/mlp/experts/gate_up_proj``
``...mlp.experts.{e}.up_proj.weight (I, H)``          ``(E, H, 2I)``: gate then up on the last axis
``...mlp.experts.{e}.down_proj.weight (H, I)``        ``params/layers_N/mlp/experts/down_proj (E, I, H)``
``model.norm.weight``, ``lm_head.weight (V, H)``      ``params/norm/weight``, ``params/lm_head/kernel``
===================================================  ==============================================

Fused expert tensors (``mlp.experts.gate_up_proj (E, 2I, H)`` and
``mlp.experts.down_proj (E, H, I)``, transformers v5's in-memory form) load
too, as do dense-MLP layers (``mlp.gate_proj`` / ``up_proj`` / ``down_proj``)
and attention biases. Every tensor of the file must find a leaf and every leaf
a tensor (``lm_head`` may be absent when the embedding is tied).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from examples.qwen3_moe.model import Qwen3Moe, Qwen3MoeConfig


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (one file or the shards of its index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def _stack_experts(tensors: dict[str, np.ndarray], cfg: Qwen3MoeConfig) -> dict[str, np.ndarray]:
    """The per-expert 2-D tensors as fused ``gate_up_proj`` / ``down_proj`` (PyTorch's
    ``(E, out, in)`` order), removed from ``tensors``."""
    per: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for key in [k for k in tensors if _EXPERT.fullmatch(k)]:
        m = _EXPERT.fullmatch(key)
        assert m is not None
        per.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensors.pop(key)
    fused = {}
    for layer in sorted({layer for layer, _ in per}):
        stacks = {}
        for part in ("gate", "up", "down"):
            experts = per.get((layer, part), {})
            if sorted(experts) != list(range(cfg.num_experts)):
                raise ValueError(
                    f"layer {layer}: {part}_proj has experts {sorted(experts)}, expected "
                    f"0..{cfg.num_experts - 1}"
                )
            stacks[part] = np.stack([experts[e] for e in range(cfg.num_experts)])
        prefix = f"model.layers.{layer}.mlp.experts."
        fused[prefix + "gate_up_proj"] = np.concatenate([stacks["gate"], stacks["up"]], axis=1)
        fused[prefix + "down_proj"] = stacks["down"]
    return fused


def _flax_path(name: str) -> tuple[str, bool]:
    """``(Flax leaf path, transpose?)`` of a checkpoint tensor name (fused experts included)."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if parts[0] == "layers":
        parts = [f"layers_{parts[1]}"] + parts[2:]
    leaf = parts[-1]
    if parts[-2:] in (["experts", "gate_up_proj"], ["experts", "down_proj"]):
        return "params/" + "/".join(parts), True
    if parts[0] == "embed_tokens":
        return "params/embed_tokens/embedding", False
    if leaf == "weight" and parts[-2].endswith("norm"):
        return "params/" + "/".join(parts), False
    if leaf == "weight":
        return "params/" + "/".join(parts[:-1] + ["kernel"]), True
    return "params/" + "/".join(parts), False  # a bias


def load(directory: str | os.PathLike, dtype: Any = None) -> tuple[Qwen3MoeConfig, dict]:
    """``(config, params)`` of a transformers Qwen3-MoE checkpoint directory.

    ``dtype``: the compute dtype of the model (the config's; default float32).
    Parameters are kept as float32.

    Raises:
      ValueError: a tensor with no leaf, a leaf with no tensor, or a shape that does not fit.
    """
    cfg = Qwen3MoeConfig.from_json(directory, **({} if dtype is None else {"dtype": dtype}))
    tensors = read_tensors(directory)
    tensors.update(_stack_experts(tensors, cfg))
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    template = jax.eval_shape(Qwen3Moe(cfg).init, jax.random.key(0), tokens)  # shapes only
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        for k, v in node.items():
            path = f"{prefix}/{k}" if prefix else k
            if isinstance(v, dict) or hasattr(v, "items"):
                visit(path, v)
            else:
                flat[path] = v

    visit("", template)
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        path, transpose = _flax_path(name)
        if path not in flat:
            raise ValueError(f"checkpoint tensor {name!r} has no Flax leaf (looked for {path!r})")
        value = np.asarray(value, np.float32)
        if transpose:
            value = np.swapaxes(value, -1, -2)
        if value.shape != tuple(flat[path].shape):
            raise ValueError(
                f"checkpoint tensor {name!r} gives {path!r} shape {value.shape}, the model "
                f"expects {tuple(flat[path].shape)}"
            )
        out[path] = value
    missing = sorted(set(flat) - set(out))
    if missing:
        raise ValueError(f"no checkpoint tensor for Flax leaves {missing[:5]} ({len(missing)})")
    params: dict = {}
    for path, value in out.items():
        node = params
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(value)
    return cfg, params
