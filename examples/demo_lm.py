"""The demo's base model: a small byte-level transformer LM, pretrained on built-in text.

Shared by the demo (``finetune_lm.py``), the serving example
(``serve_many_adapters.py``) and the seed study (``seed_study.py``), so all
three adapt the same pretrained model:

* :class:`TransformerLM`: a pre-LayerNorm decoder-only transformer (Flax
  linen) over bytes, with learned positions and an explicit, functional KV
  cache (``init_cache`` makes it; ``apply(..., cache=cache)`` returns the
  updated one), so one jitted function serves prefill and decoding and works
  under ``lora_jax.implicit`` unchanged;
* :func:`load_or_pretrain`: its params, pretrained by full fine-tuning on
  Python's documentation and cached on disk (the cache key hashes the code,
  the settings and the corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.advanced import atomic_write

from _text import VOCAB_SIZE, fingerprint, random_batches


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = VOCAB_SIZE
    seq_len: int = 128  # the longest sequence (learned position embeddings)
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512


def _attend(q, keys, values, q_pos, k_pos):
    """Causal attention of ``q`` (B, T, H, D) over ``keys``/``values`` (B, S, H, D).

    Query ``t`` of row ``b`` sees key ``s`` iff ``k_pos[b, s] <= q_pos[b, t]``.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / q.shape[-1] ** 0.5  # weak: keeps bf16
    allowed = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), values)


class CausalSelfAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, cache: Optional[dict]):
        """``x`` (B, T, d_model), ``positions`` (B, T) -> (out (B, T, d_model), new cache)."""
        cfg = self.config
        b, t, d = x.shape
        split_heads = lambda y: y.reshape(b, t, cfg.num_heads, d // cfg.num_heads)  # noqa: E731
        # Separate q/k/v/out Dense layers: their kernels are what LoRA targets.
        q = split_heads(nn.Dense(d, name="q")(x))
        k = split_heads(nn.Dense(d, name="k")(x))
        v = split_heads(nn.Dense(d, name="v")(x))
        if cache is None:
            keys, values, key_pos, new_cache = k, v, positions, None
        else:  # write this step's keys/values at their positions, then attend to the cache
            rows = jnp.arange(b)[:, None]
            keys = cache["k"].at[rows, positions].set(k)
            values = cache["v"].at[rows, positions].set(v)
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
            new_cache = {"k": keys, "v": values}
        y = _attend(q, keys, values, positions, key_pos).reshape(b, t, d)
        return nn.Dense(d, name="out")(y), new_cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.config.d_ff, name="fc1")(x))
        return nn.Dense(self.config.d_model, name="fc2")(h)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, cache):
        h, cache = CausalSelfAttention(self.config, name="attn")(
            nn.LayerNorm(name="ln1")(x), positions, cache)
        x = x + h
        x = x + MLP(self.config, name="mlp")(nn.LayerNorm(name="ln2")(x))
        return x, cache


class TransformerLM(nn.Module):
    """tokens (B, T) int32 -> next-token logits (B, T, vocab).

    ``apply(params, tokens, positions=None, cache=None, logits_index=None)``:

    * ``positions``: (B, T) absolute positions (default ``arange(T)`` per row);
    * ``cache``: None (a plain causal forward; returns the logits) or the list
      :meth:`init_cache` makes (the new keys/values are written at
      ``positions``; returns ``(logits, new_cache)``);
    * ``logits_index``: (B, K) positions whose logits to return (default all).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, logits_index=None):
        cfg = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Small (GPT-2 style) embedding init, so token and position signals start
        # at the same scale; the default unit-variance init slows training down.
        embed_init = nn.initializers.normal(0.02)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init, name="tok_embed")
        pos = self.param("pos_embed", embed_init, (cfg.seq_len, cfg.d_model))
        x = embed(tokens) + pos[positions]
        new_cache = None if cache is None else []
        for i in range(cfg.num_layers):
            x, layer_cache = Block(cfg, name=f"block_{i}")(
                x, positions, None if cache is None else cache[i])
            if cache is not None:
                new_cache.append(layer_cache)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        logits = nn.Dense(cfg.vocab_size, name="head")(nn.LayerNorm(name="ln_f")(x))
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> list:
        """An empty KV cache: one ``{"k", "v"}`` dict per block, each (B, length, heads, head_dim)."""
        cfg = self.config
        shape = (batch, length, cfg.num_heads, cfg.d_model // cfg.num_heads)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                for _ in range(cfg.num_layers)]


CONFIG = ModelConfig()
MODEL = TransformerLM(CONFIG)
BATCH_SIZE = 16
PRETRAIN_LR = 3e-3


def cross_entropy(logits, targets):
    """Mean next-byte cross-entropy, in nats (in float32 whatever the logits' dtype:
    bfloat16's 8-bit mantissa would round a loss near 2 to steps of 1/64)."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@jax.jit
def eval_loss(params, windows):
    """Loss of dense ``params`` on fixed ``(n, seq_len + 1)`` windows."""
    return cross_entropy(MODEL.apply(params, windows[:, :-1]), windows[:, 1:])


def pretrain(tokens, steps: int, seed: int, progress=None):
    """Trains every parameter with AdamW; returns (params, per-step losses).

    ``progress``: an optional wrapper of the step range (e.g. ``tqdm``).
    """
    params = MODEL.init(jax.random.key(seed), jnp.zeros((1, CONFIG.seq_len), jnp.int32))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, PRETRAIN_LR, warmup_steps=max(1, steps // 20), decay_steps=max(steps, 2),
        end_value=PRETRAIN_LR / 10)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(MODEL.apply(p, batch[:, :-1]), batch[:, 1:]))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = random_batches(tokens, BATCH_SIZE, CONFIG.seq_len, seed)
    losses = []
    for _ in (progress or (lambda r: r))(range(steps)):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses), np.float32)


def load_or_pretrain(tokens, steps: int, seed: int, out: Path, use_cache: bool = True,
                     progress=None):
    """Pretrained params from ``out``'s cache if present, else trains (and caches) them.

    The cache file name holds a hash of everything the result depends on: the
    model's code and config, the training code and settings, and the corpus.
    Returns ``(params, per-step pretraining losses)``.
    """
    code = "".join(inspect.getsource(f) for f in (_attend, CausalSelfAttention, MLP, Block,
                                                   TransformerLM, pretrain))
    key = json.dumps([code, dataclasses.asdict(CONFIG), steps, seed, BATCH_SIZE, PRETRAIN_LR,
                      fingerprint(tokens)])
    path = Path(out) / f"base_params-{hashlib.sha256(key.encode()).hexdigest()[:12]}.msgpack"
    if use_cache and path.exists():
        state = flax.serialization.msgpack_restore(path.read_bytes())
        print(f"pretrained params: loaded from cache {path}")
        return jax.tree.map(jnp.asarray, state["params"]), state["losses"]
    params, losses = pretrain(tokens, steps, seed, progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = flax.serialization.msgpack_serialize(
            {"params": jax.device_get(params), "losses": losses})
        atomic_write(path, lambda tmp: tmp.write_bytes(data))  # never a half-written cache
        print(f"pretrained params: trained and cached to {path}")
    else:
        print("pretrained params: trained (--no-cache: cache not read or written)")
    return params, losses
