"""A Flax linen Gemma 3 text model (the decoder of ``google/gemma-3-270m`` and its siblings).

Written to Gemma 3's published conventions (the same ones HF transformers'
``Gemma3ForCausalLM`` implements):

* token embedding scaled by ``sqrt(width)``; the output head is the embedding
  itself (``Embed.attend``, tied weights);
* per layer: ``input_layernorm`` -> attention -> ``post_attention_layernorm``
  -> residual; ``pre_feedforward_layernorm`` -> GELU-tanh gated MLP ->
  ``post_feedforward_layernorm`` -> residual; a final ``norm``;
* RMSNorm multiplies by ``(1 + w)`` (computed in float32);
* grouped-query attention (``num_heads`` query heads share ``num_kv_heads``
  key/value heads), RMSNorm over ``head_dim`` on queries and keys *before*
  RoPE (rotate-half form), queries scaled by ``query_pre_attn_scalar ** -0.5``;
* every ``global_every``-th layer (5, 11, 17 in the 18-layer model) attends
  globally with RoPE base 1e6; the others attend within a sliding window
  (512) with RoPE base 1e4.

Parameter paths mirror HF's module names: ``params/layers_3/self_attn/q_proj/kernel``
is ``model.layers.3.self_attn.q_proj``; :data:`HF_NAMES` is the
:class:`lora_jax.NameMap` between the two. All projections are 2-D ``nn.Dense``
kernels ``(in, out)`` without bias (the transposed PyTorch weights).

The KV cache is explicit and functional: ``init_cache`` makes it, ``__call__``
takes it and returns the updated one, so one jitted function (the plain
``model.apply``, or ``lora_jax.implicit(model.apply)``) serves prefill and
decoding with the params as arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax as lj
from examples.common.layers import rms_normalize, rope


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Hyper-parameters; the defaults are Gemma 3 270M."""

    vocab_size: int = 262_144
    width: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    mlp_dim: int = 2048
    norm_eps: float = 1e-6
    sliding_window: int = 512
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    query_pre_attn_scalar: float = 256.0
    global_every: int = 6  # layer i is global when (i + 1) % global_every == 0
    dtype: Any = jnp.float32
    # generation stops at these (the tokenizer's <eos> and the chat turn's <end_of_turn>, as
    # the model's generation_config.json lists them)
    eos_ids: tuple[int, ...] = (1, 106)

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @classmethod
    def tiny(cls, **overrides) -> Gemma3Config:
        """A small random-init config for tests (same structure, tiny sizes)."""
        base = dict(
            vocab_size=512,
            width=32,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            mlp_dim=64,
            sliding_window=4,
            global_every=3,
            query_pre_attn_scalar=8.0,
        )
        base.update(overrides)
        return cls(**base)


# Flax leaf paths <-> HF module names (``model.layers.N.self_attn.q_proj`` ...).
HF_NAMES = lj.NameMap(
    to_peft=[
        (r"params/layers_(\d+)/(self_attn|mlp)/(\w+)/kernel", r"model.layers.\1.\2.\3"),
        (r"params/embed_tokens/embedding", r"model.embed_tokens"),
    ],
    to_flax=[
        (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", r"params/layers_\1/\2/\3/kernel"),
        (r"model\.embed_tokens", r"params/embed_tokens/embedding"),
    ],
)

# Regex (for lora_jax.LoraConfig.targets) of the seven projections of every layer.
ALL_PROJECTIONS = r"params/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``, computed in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
        return (rms_normalize(x, self.eps) * (1.0 + scale)).astype(x.dtype)


def dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(
        features, use_bias=False, name=name, dtype=dtype, kernel_init=nn.initializers.normal(0.02)
    )


class Attention(nn.Module):
    config: Gemma3Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache: dict | None):
        cfg = self.config
        b, t, _ = x.shape
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = dense(h * d, "q_proj", cfg.dtype)(x).reshape(b, t, h, d)
        k = dense(kv * d, "k_proj", cfg.dtype)(x).reshape(b, t, kv, d)
        v = dense(kv * d, "v_proj", cfg.dtype)(x).reshape(b, t, kv, d)
        q = RMSNorm(cfg.norm_eps, name="q_norm")(q)
        k = RMSNorm(cfg.norm_eps, name="k_norm")(k)
        is_global = cfg.is_global(self.layer)
        base = cfg.global_rope_base if is_global else cfg.local_rope_base
        q = rope(q, positions, base) * jnp.asarray(cfg.query_pre_attn_scalar**-0.5, q.dtype)
        k = rope(k, positions, base)

        if cache is None:
            keys, values, key_pos = k, v, positions  # (B, S=T, kv, d), (B, S)
            new_cache = None
        else:
            rows = jnp.arange(b)[:, None]
            keys = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype))
            values = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
            new_cache = {"k": keys, "v": values}

        # GQA: (B, T, kv, groups, d) queries against (B, S, kv, d) keys.
        qg = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype)).astype(jnp.float32)
        qp, kp = positions[:, :, None], key_pos[:, None, :]  # (B, T, 1), (B, 1, S)
        allowed = kp <= qp
        if not is_global:
            allowed &= kp > qp - cfg.sliding_window
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h * d)
        return dense(cfg.width, "o_proj", cfg.dtype)(out.astype(cfg.dtype)), new_cache


class MLP(nn.Module):
    config: Gemma3Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense(cfg.mlp_dim, "gate_proj", cfg.dtype)(x)
        up = dense(cfg.mlp_dim, "up_proj", cfg.dtype)(x)
        return dense(cfg.width, "down_proj", cfg.dtype)(nn.gelu(gate, approximate=True) * up)


class DecoderLayer(nn.Module):
    config: Gemma3Config
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache):
        cfg = self.config
        h, cache = Attention(cfg, self.layer, name="self_attn")(
            RMSNorm(cfg.norm_eps, name="input_layernorm")(x), positions, cache
        )
        x = x + RMSNorm(cfg.norm_eps, name="post_attention_layernorm")(h)
        h = MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, name="pre_feedforward_layernorm")(x))
        x = x + RMSNorm(cfg.norm_eps, name="post_feedforward_layernorm")(h)
        return x, cache


class Gemma3(nn.Module):
    """Gemma 3 text decoder with a tied output head.

    ``apply(params, tokens, positions=None, cache=None, last_k=None, logits_index=None)``
    returns ``(logits, cache)``:

    * ``tokens``: (B, T) int32; ``positions``: (B, T) int32 absolute positions
      (default ``arange(T)`` per row);
    * ``cache``: None (no cache: a plain causal forward over ``tokens``) or the
      list :meth:`init_cache` makes; the new ``k``/``v`` are written at
      ``positions`` and the updated cache is returned;
    * logits only where needed (the 262k-vocab head is the costliest layer):
      ``last_k`` keeps the last ``k`` positions, ``logits_index`` (B, K)
      gathers the given positions per row; otherwise every position;
    * ``return_hidden``: return the final-norm hidden states instead of logits.
    """

    config: Gemma3Config

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        cache=None,
        last_k: int | None = None,
        logits_index=None,
        input_embeds=None,
        return_hidden: bool = False,
    ):
        cfg = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=cfg.dtype,
            name="embed_tokens",
            embedding_init=nn.initializers.normal(1.0),
        )
        x = embed(tokens) if input_embeds is None else input_embeds
        x = x * jnp.asarray(cfg.width**0.5, x.dtype)
        new_cache = [] if cache is not None else None
        for i in range(cfg.num_layers):
            x, layer_cache = DecoderLayer(cfg, i, name=f"layers_{i}")(
                x, positions, None if cache is None else cache[i]
            )
            if cache is not None:
                new_cache.append(layer_cache)
        if last_k is not None:
            x = x[:, -last_k:]
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        x = RMSNorm(cfg.norm_eps, name="norm")(x)
        if return_hidden:
            return x, new_cache
        return embed.attend(x).astype(jnp.float32), new_cache

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end generation (``examples.common.generation`` stops at them)."""
        return tuple(self.config.eos_ids)

    def init_cache(self, batch: int, length: int, dtype=None) -> list:
        """An empty KV cache for ``batch`` rows of up to ``length`` positions.

        A list with one ``{"k", "v"}`` dict per layer, each (B, length, kv_heads, head_dim).
        """
        cfg = self.config
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.dtype
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)
        ]


def init_params(config: Gemma3Config, seed: int = 0) -> dict:
    """Random params (for tests); the real ones come from :mod:`gguf_loader`."""
    model = Gemma3(config)
    return model.init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))
