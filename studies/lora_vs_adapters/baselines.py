"""The study's two pre-LoRA baselines on the demo LM (``examples/common/pretrained.py``), written functionally.

Neither changes the model's code or its params tree: each is a function of
``(base, trainable, tokens, ...)`` around ``pretrained.MODEL.apply``, so the base
stays frozen and only the small trainable tree gets gradients and optimizer state.

* **Houlsby adapters** (Houlsby et al. 2019): a bottleneck MLP
  ``h + up(gelu(down(h)))`` on the output of every attention and every FFN,
  before the residual add. Inserted with ``flax.linen.intercept_methods``;
  ``up`` starts at zero, so step 0 is the base model. (Houlsby also trains the
  layer norms; here only the adapters train.)
* **Prefix tuning** (Li & Liang 2021): ``P`` trainable key/value vectors per
  layer and head, which every token attends to. Trained through the MLP
  reparametrisation ``kv = MLP(E)`` (``E``: ``P x d_model``); for inference the
  keys/values are computed once (:func:`prefix_kv`). The prefix lives in the
  model's KV cache: it fills slots ``0..P-1`` and the text starts at position
  ``P``, so with learned positions up to ``seq_len`` only ``seq_len - P``
  positions are left for the text.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from examples.common.pretrained import CONFIG, MODEL

PREFIX_HIDDEN = 256  # the reparametrisation MLP's hidden width
ADAPTED = ("attn", "mlp")  # the sublayers whose outputs get an adapter


def _dense(key, fan_in, fan_out, std):
    return {"kernel": std * jax.random.normal(key, (fan_in, fan_out)), "bias": jnp.zeros(fan_out)}


# -----------------------------------------------------------------------------
# Houlsby adapters
# -----------------------------------------------------------------------------


def init_adapters(key, dim: int, cfg=CONFIG) -> dict:
    """``{block_i: {attn|mlp: {down, up}}}``: down ``N(0, 1/d)``, up zero."""
    d, tree = cfg.d_model, {}
    for i in range(cfg.num_layers):
        tree[f"block_{i}"] = {}
        for j, name in enumerate(ADAPTED):
            k = jax.random.fold_in(key, 2 * i + j)
            tree[f"block_{i}"][name] = {
                "down": _dense(k, d, dim, d**-0.5),
                "up": _dense(k, dim, d, 0.0),
            }
    return tree


def adapter(p, h):
    return (
        h
        + nn.gelu(h @ p["down"]["kernel"] + p["down"]["bias"]) @ p["up"]["kernel"]
        + p["up"]["bias"]
    )


def adapter_apply(base, adapters, tokens, **kwargs):
    """``MODEL.apply(base, tokens, **kwargs)`` with an adapter after every attention and FFN."""

    def interceptor(next_fn, args, kw, context):
        out = next_fn(*args, **kw)
        path = context.module.path
        if context.method_name != "__call__" or len(path) != 2 or path[1] not in ADAPTED:
            return out
        p = adapters[path[0]][path[1]]
        return (adapter(p, out[0]), out[1]) if path[1] == "attn" else adapter(p, out)

    with nn.intercept_methods(interceptor):
        return MODEL.apply(base, tokens, **kwargs)


# -----------------------------------------------------------------------------
# Prefix tuning
# -----------------------------------------------------------------------------


def init_prefix(key, length: int, cfg=CONFIG) -> dict:
    """The reparametrised prefix: an embedding ``E`` (P x d) and the MLP that maps it to K/V."""
    k0, k1, k2 = jax.random.split(key, 3)
    out = 2 * cfg.num_layers * cfg.d_model
    return {
        "embed": jax.random.normal(k0, (length, cfg.d_model)),
        "mlp1": _dense(k1, cfg.d_model, PREFIX_HIDDEN, cfg.d_model**-0.5),
        "mlp2": _dense(k2, PREFIX_HIDDEN, out, PREFIX_HIDDEN**-0.5),
    }


def prefix_kv(prefix, cfg=CONFIG) -> list:
    """Per layer ``{"k", "v"}`` of shape (P, heads, head_dim): the MLP applied to ``E``."""
    h = jnp.tanh(prefix["embed"] @ prefix["mlp1"]["kernel"] + prefix["mlp1"]["bias"])
    kv = h @ prefix["mlp2"]["kernel"] + prefix["mlp2"]["bias"]
    kv = kv.reshape(-1, cfg.num_layers, 2, cfg.num_heads, cfg.d_model // cfg.num_heads)
    return [{"k": kv[:, i, 0], "v": kv[:, i, 1]} for i in range(cfg.num_layers)]


def prefix_cache(kv, batch: int, length: int) -> list:
    """A KV cache of ``length`` slots whose first ``P`` hold the prefix (the rest zeros)."""

    def fill(x):
        slots = jnp.zeros((batch, length, *x.shape[1:]), x.dtype)
        return slots.at[:, : x.shape[0]].set(x)

    return jax.tree.map(fill, kv)


def prefix_apply(kv, base, tokens, positions=None, cache=None, logits_index=None):
    """The model with prefix keys/values ``kv`` (from :func:`prefix_kv`): the text sits after them.

    Without ``cache`` (training, evaluation) returns the logits; with a cache
    made by :func:`prefix_cache` (decoding) returns ``(logits, new_cache)``.
    ``positions`` count from the text's start; the model sees them shifted by P.
    """
    b, t = tokens.shape
    p = kv[0]["k"].shape[0]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    full = prefix_cache(kv, b, p + t) if cache is None else cache
    logits, new_cache = MODEL.apply(
        base, tokens, positions=positions + p, cache=full, logits_index=logits_index
    )
    return logits if cache is None else (logits, new_cache)
