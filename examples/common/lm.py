"""The one transformer LM of the examples, the study and the benchmarks.

A pre-LayerNorm decoder-only transformer in Flax linen: token embeddings plus
learned positions, ``num_layers`` blocks (causal self-attention through
separate ``q``/``k``/``v``/out ``nn.Dense`` layers, a GELU MLP ``fc1``/``fc2``),
a final LayerNorm and an untied output head. Its kernels are plain 2-D
``(in, out)`` Dense kernels, so lora_jax's default layouts apply as they are.

It is used at two sizes:

* the demo's byte-level LM (:mod:`examples.common.pretrained`: vocabulary 256,
  d_model 128, 2 blocks), adapted by the demo, the serving example and the
  LoRA-vs-adapters study; with an explicit, functional KV cache
  (``init_cache`` makes it; ``apply(..., cache=cache)`` returns the updated
  one), so one jitted function serves prefill and decoding and works under
  ``lora_jax.implicit`` unchanged;
* the benchmarks' reference workload (``benchmarks/workload.py``: vocabulary
  4096, d_model 512, 4 blocks, about 16.9M parameters).

:class:`ParamNames` says where each weight sits in the params tree. The names
are part of what each user has measured or saved: the demo's pretrained
weights are initialised from its names (Flax derives each parameter's random
key from its path) and the benchmarks' compiled train step names its
arguments by their tree paths, so each keeps its own names.

:func:`cross_entropy` is the one next-token loss of all of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ParamNames:
    """Where each weight of :class:`TransformerLM` sits in its params tree.

    The defaults are the demo's: ``tok_embed/embedding``, ``pos_embed`` (a
    ``(seq_len, d_model)`` table), ``block_{i}/attn/{q,k,v,out}``,
    ``block_{i}/mlp/{fc1,fc2}``, ``block_{i}/{ln1,ln2}``, ``ln_f``, ``head``.

    * ``tok``: the token ``nn.Embed``;
    * ``pos``: the position table: a parameter name (``"pos_embed"``) or
      ``"<module>/embedding"`` for an ``nn.Embed`` named ``<module>``;
    * ``block``: the blocks' names, formatted with the block index;
    * ``attn_out``: the attention output projection (q, k and v are ``q``, ``k``, ``v``);
    * ``mlp``: the module holding ``fc1``/``fc2``, or None for directly in the block.

    >>> ParamNames(block="blocks_{}").block.format(3)
    'blocks_3'
    """

    tok: str = "tok_embed"
    pos: str = "pos_embed"
    block: str = "block_{}"
    attn_out: str = "out"
    mlp: str | None = "mlp"


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes of :class:`TransformerLM` (and its :class:`ParamNames`).

    >>> cfg = LMConfig(d_model=64, num_heads=4)
    >>> cfg.d_model // cfg.num_heads  # the head width
    16
    """

    vocab_size: int = 256
    seq_len: int = 128  # the longest sequence (learned position embeddings)
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    names: ParamNames = ParamNames()


def causal_attention(q, k, v, q_pos=None, k_pos=None):
    """Causal attention of ``q`` (B, T, H, Dh) over ``k``/``v`` (B, S, H, Dh) -> (B, T, H, Dh).

    With ``q_pos``/``k_pos`` None (no cache, T == S), query ``t`` sees keys
    ``0..t``; else query ``t`` of row ``b`` sees key ``s`` iff
    ``k_pos[b, s] <= q_pos[b, t]`` (``q_pos`` (B, T), ``k_pos`` (B, S)).
    Scores are computed in the inputs' dtype (the scale is a weak Python float).

    >>> x = jnp.ones((1, 3, 2, 4))
    >>> causal_attention(x, x, x).shape
    (1, 3, 2, 4)
    """
    t, s = q.shape[1], k.shape[1]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if q_pos is None:
        mask = jnp.tril(jnp.ones((t, s), bool))
    else:
        mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class CausalSelfAttention(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, cache: dict | None):
        """``x`` (B, T, d_model), ``positions`` (B, T) or None -> (out (B, T, d_model), new cache)."""
        cfg = self.config
        b, t, d = x.shape
        # Separate q/k/v/out Dense layers: their kernels are what LoRA targets.
        q = nn.Dense(d, name="q")(x)
        k = nn.Dense(d, name="k")(x)
        v = nn.Dense(d, name="v")(x)
        q, k, v = (y.reshape(b, t, cfg.num_heads, d // cfg.num_heads) for y in (q, k, v))
        if cache is None:
            keys, values, key_pos, new_cache = k, v, positions, None
        else:  # write this step's keys/values at their positions, then attend to the cache
            rows = jnp.arange(b)[:, None]
            keys = cache["k"].at[rows, positions].set(k)
            values = cache["v"].at[rows, positions].set(v)
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
            new_cache = {"k": keys, "v": values}
        y = causal_attention(q, keys, values, positions, key_pos).reshape(b, t, d)
        return nn.Dense(d, name=cfg.names.attn_out)(y), new_cache


def feed_forward(config: LMConfig, x):
    """``fc2(gelu(fc1(x)))``, its Dense layers created in the calling module's scope."""
    h = nn.gelu(nn.Dense(config.d_ff, name="fc1")(x))
    return nn.Dense(config.d_model, name="fc2")(h)


class MLP(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x):
        return feed_forward(self.config, x)


class Block(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, cache):
        cfg = self.config
        h, cache = CausalSelfAttention(cfg, name="attn")(
            nn.LayerNorm(name="ln1")(x), positions, cache
        )
        x = x + h
        h = nn.LayerNorm(name="ln2")(x)
        if cfg.names.mlp is None:
            return x + feed_forward(cfg, h), cache
        return x + MLP(cfg, name=cfg.names.mlp)(h), cache


class TransformerLM(nn.Module):
    """tokens (B, T) int32 -> next-token logits (B, T, vocab).

    ``apply(params, tokens, positions=None, cache=None, logits_index=None, embeddings=None)``:

    * ``positions``: (B, T) absolute positions (default ``arange(T)`` per row);
    * ``cache``: None (a plain causal forward; returns the logits) or the list
      :meth:`init_cache` makes (the new keys/values are written at
      ``positions``; returns ``(logits, new_cache)``);
    * ``logits_index``: (B, K) positions whose logits to return (default all);
    * ``embeddings``: (B, T, d_model) input embeddings to use instead of
      looking ``tokens`` up (``tokens`` is then ignored; no cache).

    >>> model = TransformerLM(LMConfig(vocab_size=11, seq_len=8, d_model=8, num_heads=2, d_ff=16))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    >>> model.apply(params, jnp.zeros((3, 5), jnp.int32)).shape
    (3, 5, 11)
    """

    config: LMConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, logits_index=None, embeddings=None):
        cfg = self.config
        if cache is not None and positions is None:
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._embed(tokens, positions) if embeddings is None else embeddings
        new_cache = None if cache is None else []
        for i in range(cfg.num_layers):
            x, layer_cache = Block(cfg, name=cfg.names.block.format(i))(
                x, positions, None if cache is None else cache[i]
            )
            if cache is not None:
                new_cache.append(layer_cache)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        logits = nn.Dense(cfg.vocab_size, name="head")(nn.LayerNorm(name="ln_f")(x))
        return logits if cache is None else (logits, new_cache)

    def _embed(self, tokens, positions):
        """Token plus position embeddings, (B, T, d_model) (called within ``__call__``).

        An ``nn.Embed`` position table is looked up at ``arange(T)`` and broadcast
        over the batch; a table parameter is indexed per row. The values are the
        same; the gradients sum in a different order (to float rounding), and each
        form is the one its users' results were computed with.
        """
        cfg = self.config
        # Small (GPT-2 style) embedding init, so token and position signals start
        # at the same scale; the default unit-variance init slows training down.
        embed_init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init, name=cfg.names.tok)
        b, t = tokens.shape
        module, _, param = cfg.names.pos.rpartition("/")
        if module:
            if param != "embedding":
                raise ValueError(
                    f"ParamNames.pos {cfg.names.pos!r}: an nn.Embed's table is '<module>/embedding'"
                )
            pos = nn.Embed(cfg.seq_len, cfg.d_model, embedding_init=embed_init, name=module)
            return tok(tokens) + pos(jnp.arange(t) if positions is None else positions)
        table = self.param(param, embed_init, (cfg.seq_len, cfg.d_model))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return tok(tokens) + table[positions]

    def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> list:
        """An empty KV cache: one ``{"k", "v"}`` dict per block, each (B, length, heads, head_dim)."""
        cfg = self.config
        shape = (batch, length, cfg.num_heads, cfg.d_model // cfg.num_heads)
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)
        ]


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in nats, computed in float32 whatever the logits' dtype
    (bfloat16's 8-bit mantissa would round a loss near 2 to steps of 1/64).

    ``logits`` (..., vocab), ``targets`` (...) int.

    >>> float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log(4)
    1.3862943649291992
    """
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    ).mean()
