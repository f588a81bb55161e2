"""The demo's base model: the byte-level LM, pretrained on built-in text and cached on disk.

Shared by the demo (``examples/finetune_lm.py``), the serving example
(``examples/serve_many_adapters.py``) and the LoRA-vs-adapters study
(``studies/lora_vs_adapters``), so all three adapt the same pretrained model:

* :data:`MODEL`: :class:`examples.common.lm.TransformerLM` at the demo's size
  (:data:`CONFIG`: bytes in, d_model 128, 2 blocks, 4 heads);
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

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.common import lm
from examples.common.lm import LMConfig, TransformerLM, cross_entropy
from examples.common.text import VOCAB_SIZE, fingerprint, random_batches
from lora_jax.advanced import atomic_write

CONFIG = LMConfig(vocab_size=VOCAB_SIZE)
MODEL = TransformerLM(CONFIG)
BATCH_SIZE = 16
PRETRAIN_LR = 3e-3


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
        0.0,
        PRETRAIN_LR,
        warmup_steps=max(1, steps // 20),
        decay_steps=max(steps, 2),
        end_value=PRETRAIN_LR / 10,
    )
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(MODEL.apply(p, batch[:, :-1]), batch[:, 1:])
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = random_batches(tokens, BATCH_SIZE, CONFIG.seq_len, seed)
    losses = []
    for _ in (progress or (lambda r: r))(range(steps)):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses), np.float32)


def load_or_pretrain(
    tokens, steps: int, seed: int, out: Path, use_cache: bool = True, progress=None
):
    """Pretrained params from ``out``'s cache if present, else trains (and caches) them.

    The cache file name holds a hash of everything the result depends on: the
    model's code and config, the training code and settings, and the corpus.
    Returns ``(params, per-step pretraining losses)``.
    """
    code = inspect.getsource(lm) + inspect.getsource(pretrain)
    key = json.dumps(
        [
            code,
            dataclasses.asdict(CONFIG),
            steps,
            seed,
            BATCH_SIZE,
            PRETRAIN_LR,
            fingerprint(tokens),
        ]
    )
    path = Path(out) / f"base_params-{hashlib.sha256(key.encode()).hexdigest()[:12]}.msgpack"
    if use_cache and path.exists():
        state = flax.serialization.msgpack_restore(path.read_bytes())
        print(f"pretrained params: loaded from cache {path}")
        return jax.tree.map(jnp.asarray, state["params"]), state["losses"]
    params, losses = pretrain(tokens, steps, seed, progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = flax.serialization.msgpack_serialize(
            {"params": jax.device_get(params), "losses": losses}
        )
        atomic_write(path, lambda tmp: tmp.write_bytes(data))  # never a half-written cache
        print(f"pretrained params: trained and cached to {path}")
    else:
        print("pretrained params: trained (--no-cache: cache not read or written)")
    return params, losses
