"""A Flax linen Qwen3-MoE text model (HF transformers' ``Qwen3MoeForCausalLM``).

Written to Qwen3-MoE's published conventions, the ones transformers implements:

* per layer: ``input_layernorm`` -> attention -> residual;
  ``post_attention_layernorm`` -> mixture of experts (or a dense MLP on the
  layers ``mlp_only_layers`` / ``decoder_sparse_step`` name) -> residual; a
  final ``norm``; RMSNorm multiplies by ``w`` (computed in float32);
* grouped-query attention (``num_attention_heads`` query heads share
  ``num_key_value_heads`` key/value heads), RMSNorm over ``head_dim`` on queries
  and keys before RoPE (rotate-half form, base ``rope_theta``), scores scaled
  by ``head_dim ** -0.5``;
* the router ``mlp.gate`` is a bias-free linear map to ``num_experts`` logits;
  each token goes to the ``num_experts_per_tok`` experts of highest softmax
  probability, weighted by those probabilities (renormalised to sum to one
  when ``norm_topk_prob``);
* each expert is a SiLU-gated MLP; the experts' weights are stacked into two
  3-D kernels, ``gate_up_proj: (E, hidden, 2 * moe_intermediate_size)`` (gate
  then up along the last axis, transformers v5's fused parameter transposed
  to ``(E, in, out)``) and ``down_proj: (E, moe_intermediate_size, hidden)``,
  applied with :func:`jax.lax.ragged_dot` to the token copies sorted by
  expert (``group_sizes`` = tokens per expert);
* the output head is ``lm_head`` or, with ``tie_word_embeddings``, the
  embedding itself.

Parameter paths mirror HF's names: ``params/layers_3/self_attn/q_proj/kernel``
is ``model.layers.3.self_attn.q_proj`` and
``params/layers_3/mlp/experts/gate_up_proj`` is the parameter
``model.layers.3.mlp.experts.gate_up_proj``; :data:`HF_NAMES` is the
:class:`lora_jax.NameMap` between the two. Dense projections are 2-D
``nn.Dense`` kernels ``(in, out)`` (the transposed PyTorch weights); expert
kernels have layout ``"eio"`` (:data:`EXPERT_LAYOUT`).

The router's choices are recorded with ``sow`` in the ``intermediates``
collection (``apply(..., mutable=["intermediates"])``): per MoE layer
``router_logits (T, E)``, ``top_k_index (T, k)`` and ``tokens_per_expert (E,)``
(:func:`load_balancing_loss` reads them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from examples.common.layers import rms_normalize, rope

EXPERT_LAYOUT = "eio"
"""The layout of the stacked expert kernels ``(E, in, out)``."""


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    """Hyper-parameters, named as in transformers' ``Qwen3MoeConfig`` (the defaults are tiny)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128  # the dense MLP layers' width
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32

    def is_moe(self, layer: int) -> bool:
        """Whether ``layer`` has a mixture of experts (else a dense MLP), as transformers decides."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> Qwen3MoeConfig:
        """The config of a transformers ``config.json`` (a dict).

        Example:
          >>> Qwen3MoeConfig.from_hf({"hidden_size": 48, "num_experts": 6}).num_experts
          6
        """
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is implemented, got {rope!r}")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not implemented")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "rope_theta"}
        kwargs: dict[str, Any] = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        if "num_experts" not in kwargs and hf.get("num_local_experts") is not None:
            kwargs["num_experts"] = hf["num_local_experts"]  # transformers v5's name
        if "head_dim" not in kwargs:
            width = kwargs.get("hidden_size", cls.hidden_size)
            kwargs["head_dim"] = width // kwargs.get("num_attention_heads", cls.num_attention_heads)
        kwargs["mlp_only_layers"] = tuple(kwargs.get("mlp_only_layers", ()))
        kwargs["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> Qwen3MoeConfig:
        """The config of a transformers checkpoint directory's ``config.json`` (or the file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        return cls.from_hf(json.loads(file.read_text(encoding="utf-8")), **overrides)


def hf_module_name(path: str) -> str | None:
    """The transformers name of a Flax leaf path: the module for a Dense kernel or embedding,
    the parameter for an expert kernel (PEFT's ``target_parameters``).

    Example:
      >>> hf_module_name("params/layers_1/self_attn/q_proj/kernel")
      'model.layers.1.self_attn.q_proj'
      >>> hf_module_name("params/layers_0/mlp/experts/gate_up_proj")
      'model.layers.0.mlp.experts.gate_up_proj'
      >>> hf_module_name("params/embed_tokens/embedding"), hf_module_name("params/lm_head/kernel")
      ('model.embed_tokens', 'lm_head')
    """
    parts = path.split("/")
    if parts[0] != "params" or parts[-1] not in (
        "kernel",
        "embedding",
        "gate_up_proj",
        "down_proj",
    ):
        return None
    if parts[-1] in ("kernel", "embedding"):
        parts = parts[:-1]
    parts = parts[1:]
    if parts[0].startswith("layers_"):
        parts = ["model", "layers", parts[0][len("layers_") :]] + parts[1:]
    elif parts[0] in ("embed_tokens", "norm"):
        parts = ["model"] + parts
    return ".".join(parts)


HF_NAMES = lj.NameMap(to_peft=hf_module_name)
"""Flax leaf paths -> transformers' module (or expert parameter) names, for ``export_peft`` /
``import_peft``."""

# Regexes (for lora_jax.LoraConfig.targets) of the attention projections and the experts.
ATTENTION = r"params/layers_\d+/self_attn/(q|k|v|o)_proj/kernel"
EXPERTS = r"params/layers_\d+/mlp/experts/(gate_up_proj|down_proj)"


class RMSNorm(nn.Module):
    """Qwen's RMSNorm: ``w * x / rms(x)``, normalised in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        return weight.astype(x.dtype) * rms_normalize(x, self.eps).astype(x.dtype)


def dense(features: int, name: str, dtype, bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features, use_bias=bias, name=name, dtype=dtype, kernel_init=nn.initializers.normal(0.02)
    )


class Attention(nn.Module):
    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = dense(h * d, "q_proj", cfg.dtype, bias)(x).reshape(b, t, h, d)
        k = dense(kv * d, "k_proj", cfg.dtype, bias)(x).reshape(b, t, kv, d)
        v = dense(kv * d, "v_proj", cfg.dtype, bias)(x).reshape(b, t, kv, d)
        q = rope(RMSNorm(cfg.rms_norm_eps, name="q_norm")(q), positions, cfg.rope_theta)
        k = rope(RMSNorm(cfg.rms_norm_eps, name="k_norm")(k), positions, cfg.rope_theta)
        qg = q.reshape(b, t, kv, h // kv, d) * jnp.asarray(d**-0.5, q.dtype)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32)
        allowed = positions[:, None, None, None, :] <= positions[:, None, None, :, None]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)
        return dense(cfg.hidden_size, "o_proj", cfg.dtype, bias)(out)


class MLP(nn.Module):
    """The dense SiLU-gated MLP of the layers without experts."""

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense(cfg.intermediate_size, "gate_proj", cfg.dtype)(x)
        up = dense(cfg.intermediate_size, "up_proj", cfg.dtype)(x)
        return dense(cfg.hidden_size, "down_proj", cfg.dtype)(nn.silu(gate) * up)


def route(logits, k: int, normalize: bool):
    """Top-``k`` experts per token: ``(weights (T, k), experts (T, k))`` from router logits
    ``(T, E)``; the weights are the softmax probabilities (float32), renormalised to sum to
    one when ``normalize``.

    Example:
      >>> w, e = route(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2, normalize=True)
      >>> e.tolist(), [round(float(v), 4) for v in w[0]]
      ([[1, 2]], [0.6667, 0.3333])
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def sort_by_expert(experts, num_experts: int):
    """How to lay the ``(T, k)`` token copies out by expert for ``ragged_dot``.

    Returns ``(order (T*k,), group_sizes (E,) int32)``: ``order`` lists the
    flattened ``(token, slot)`` copies grouped by expert (stable, so tokens keep
    their order within a group) and ``group_sizes[e]`` counts expert ``e``'s copies.

    Example:
      >>> order, sizes = sort_by_expert(jnp.array([[2, 0], [0, 1]]), 3)
      >>> order.tolist(), sizes.tolist()
      ([1, 2, 3, 0], [2, 1, 1])
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, sizes


class Experts(nn.Module):
    """``num_experts`` SiLU-gated MLPs as two stacked kernels, applied with ``ragged_dot``."""

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, x_sorted, group_sizes):
        """``x_sorted (N, hidden)`` grouped by expert (``group_sizes (E,)``) -> ``(N, hidden)``."""
        cfg = self.config
        e, hd, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        gate_up = self.param("gate_up_proj", init, (e, hd, 2 * m), jnp.float32)
        down = self.param("down_proj", init, (e, m, hd), jnp.float32)
        h = jax.lax.ragged_dot(x_sorted, gate_up.astype(cfg.dtype), group_sizes)
        gate, up = h[:, :m], h[:, m:]
        return jax.lax.ragged_dot(nn.silu(gate) * up, down.astype(cfg.dtype), group_sizes)


class SparseMoeBlock(nn.Module):
    """Router + experts: each token's output is the weighted sum of its top-k experts'."""

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, hidden)
        logits = dense(cfg.num_experts, "gate", cfg.dtype)(x)
        weights, experts = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        order, sizes = sort_by_expert(experts, cfg.num_experts)
        self.sow("intermediates", "router_logits", logits)
        self.sow("intermediates", "top_k_index", experts)
        self.sow("intermediates", "tokens_per_expert", sizes)
        token = order // cfg.num_experts_per_tok
        y = Experts(cfg, name="experts")(x[token], sizes)
        y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
        out = jnp.zeros_like(x).at[token].add(y)
        return out.reshape(shape)


def load_balancing_loss(intermediates, num_experts: int) -> jax.Array:
    """The Switch-Transformer load-balancing loss (what transformers weights with
    ``router_aux_loss_coef``): ``E * sum_e f_e * P_e`` per MoE layer, averaged over layers,
    with ``f_e`` the fraction of token copies routed to expert ``e`` and ``P_e`` its mean
    router probability. Normalised so that uniform routing gives 1 (transformers' version
    pools the layers and is ``k`` times this); it grows as experts are starved.

    Example:
      >>> inter = {"layers_0": {"mlp": {"router_logits": (jnp.zeros((4, 2)),),
      ...                                "top_k_index": (jnp.array([[0], [1], [0], [1]]),)}}}
      >>> float(load_balancing_loss(inter, 2))
      1.0
    """
    losses = []
    for layer in sorted(intermediates):
        mlp = intermediates[layer].get("mlp", {})
        if "router_logits" not in mlp:
            continue
        probs = jax.nn.softmax(mlp["router_logits"][0].astype(jnp.float32), axis=-1)
        chosen = jax.nn.one_hot(mlp["top_k_index"][0], num_experts).sum(axis=1)  # (T, E)
        f = chosen.mean(axis=0) / chosen.sum(axis=1).mean()
        losses.append(num_experts * jnp.sum(f * probs.mean(axis=0)))
    return jnp.mean(jnp.stack(losses))


class DecoderLayer(nn.Module):
    config: Qwen3MoeConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        eps = cfg.rms_norm_eps
        x = x + Attention(cfg, name="self_attn")(RMSNorm(eps, name="input_layernorm")(x), positions)
        mlp = SparseMoeBlock(cfg, name="mlp") if cfg.is_moe(self.layer) else MLP(cfg, name="mlp")
        return x + mlp(RMSNorm(eps, name="post_attention_layernorm")(x))


class Qwen3Moe(nn.Module):
    """Qwen3-MoE causal LM: ``apply(params, tokens (B, T), positions=None) -> logits (B, T, V)``.

    ``positions`` (B, T) int32 default to ``arange(T)`` per row; logits are float32.

    Example:
      >>> cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=16, head_dim=4, moe_intermediate_size=8,
      ...                      num_experts=4, num_hidden_layers=1)
      >>> params = init_params(cfg)
      >>> Qwen3Moe(cfg).apply(params, jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 32)
    """

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, tokens, positions=None):
        cfg = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            name="embed_tokens",
            embedding_init=nn.initializers.normal(0.02),
        )
        x = embed(tokens)
        for i in range(cfg.num_hidden_layers):
            x = DecoderLayer(cfg, i, name=f"layers_{i}")(x, positions)
        x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
        if cfg.tie_word_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return dense(cfg.vocab_size, "lm_head", cfg.dtype)(x).astype(jnp.float32)


def init_params(config: Qwen3MoeConfig, seed: int = 0) -> dict:
    """Random params (the real ones come from :func:`examples.qwen3_moe.loader.load`):
    norms 1, biases 0, every other weight N(0, 0.02^2), drawn with NumPy from ``seed``
    (``model.init`` would compile the whole model's initialisers first)."""
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(Qwen3Moe(config).init, jax.random.key(0), tokens)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "weight":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def lora_layouts() -> dict[str, str]:
    """``LoraConfig(layouts=...)`` for the expert kernels (the rest are 2-D)."""
    return {EXPERTS: EXPERT_LAYOUT}
