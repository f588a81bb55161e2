"""Jitted prefill + decode with a KV cache, for any apply-like function.

``model`` is any model with ``init_cache(batch, length)`` whose
``apply(params, tokens, positions=, cache=, logits_index=)`` returns
``(logits, new_cache)``: Gemma 3 (``examples/gemma3/model.py``) and the demo
LM (``examples/common/lm.py``). ``Generator(apply_fn, model)`` works with

* ``model.apply`` and ``params=(params,)`` (the base or the merged params), and
* ``lora_jax.implicit(model.apply)`` and ``params=(base, delta)`` (unmerged LoRA),

because the params are always **arguments** of the jitted prefill and decode
step, never constants closed over (closing over 268M parameters makes XLA
constant-fold them: a 95 s compile and 13.5 GB here).

Prompts of different lengths are right-padded to a bucket (a multiple of 16)
and share one batch: each row's last prompt position gives its first token,
and each row then decodes at its own position. Padding never leaks into
attention: a decode step writes its key/value at its position before
attending to positions up to it.

**Stopping.** Like ``transformers.generate``, the loop stops at the model's
end-of-sequence tokens by default: ``eos_id=MODEL_EOS`` reads
``model.eos_ids`` (Gemma 3: ``<eos>`` 1 and ``<end_of_turn>`` 106, from
``Gemma3Config.eos_ids``); a model without ``eos_ids`` never stops early.
Pass an id or a list of ids to choose others, and ``eos_id=None`` to
generate exactly ``max_new_tokens`` (``min_new_tokens=max_new_tokens`` in
transformers). A row that has stopped is padded with ``pad_id`` while the
others finish; :attr:`Generation.tokens` ends before each row's first stop id.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (up to and excluding eos)
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second by the decode loop (batch x steps / time)."""
        return self.batch * self.decode_steps / max(self.decode_s, 1e-9)


class _ModelEos:
    """The default of ``eos_id``: the model's own ``eos_ids`` (see the module doc)."""

    def __repr__(self) -> str:
        return "MODEL_EOS"


MODEL_EOS: Any = _ModelEos()


def stop_ids(eos_id: Any, model: Any) -> tuple[int, ...]:
    """The ids that end a row: ``model.eos_ids`` for :data:`MODEL_EOS`, none for ``None``.

    >>> class M: eos_ids = (1, 106)
    >>> stop_ids(MODEL_EOS, M()), stop_ids(None, M()), stop_ids(7, M()), stop_ids([3, 4], None)
    ((1, 106), (), (7,), (3, 4))
    """
    if eos_id is MODEL_EOS:
        eos_id = getattr(model, "eos_ids", None)
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(i) for i in eos_id)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sample(logits, key, temperature: float, top_k: int | None):
    """Greedy (``temperature == 0``) or temperature / top-k sampling; ``logits`` (B, V)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Prefill + decode loop; one compile per (params structure, bucket) shape."""

    def __init__(self, apply_fn: Callable[..., Any], model, bucket: int = 16):
        self.model = model
        self.bucket = bucket

        def prefill(params, tokens, lengths, cache, key, temperature, top_k):
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            logits, cache = apply_fn(
                *params,
                tokens,
                positions=positions,
                cache=cache,
                logits_index=(lengths - 1)[:, None],
            )
            return sample(logits[:, 0], key, temperature, top_k), cache

        def step(params, token, position, cache, key, temperature, top_k):
            logits, cache = apply_fn(
                *params, token[:, None], positions=position[:, None], cache=cache
            )
            return sample(logits[:, 0], key, temperature, top_k), cache

        self._prefill = jax.jit(prefill, static_argnums=(5, 6), donate_argnums=(3,))
        self._step = jax.jit(step, static_argnums=(5, 6), donate_argnums=(3,))

    def __call__(
        self,
        params: Sequence[Any],
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        eos_id: Any = MODEL_EOS,
        pad_id: int = 0,
        temperature: float = 0.0,
        top_k: int | None = None,
        key: jax.Array | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Generates up to ``max_new_tokens`` per prompt (prompts: lists of ids, bos included).

        ``eos_id``: :data:`MODEL_EOS` (the model's ``eos_ids``), an id, a list
        of ids, or ``None`` (never stop early); with ``stop_at_eos`` (default)
        the loop ends once every row has produced one, and a stopped row is
        padded with ``pad_id``.
        """
        params = tuple(params)
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        width = _round_up(int(lengths.max()), self.bucket)
        tokens = np.zeros((b, width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        cache = self.model.init_cache(b, _round_up(width + max_new_tokens, self.bucket))
        key = jax.random.key(0) if key is None else key
        temperature = float(temperature)

        t0 = time.perf_counter()
        key, sub = jax.random.split(key)
        tok, cache = self._prefill(
            params, jnp.asarray(tokens), jnp.asarray(lengths), cache, sub, temperature, top_k
        )
        tok = jax.block_until_ready(tok)
        t1 = time.perf_counter()
        out = [np.asarray(tok)]
        stops = np.asarray(stop_ids(eos_id, self.model), np.int64)
        done = np.isin(out[0], stops)
        position = jnp.asarray(lengths)
        steps = 0
        for _ in range(max_new_tokens - 1):
            if stop_at_eos and done.all():
                break
            key, sub = jax.random.split(key)
            tok, cache = self._step(params, tok, position, cache, sub, temperature, top_k)
            position = position + 1
            steps += 1
            new = np.asarray(tok)  # forces the step (and keeps the loop honest for timing)
            out.append(np.where(done, pad_id, new))
            done |= np.isin(new, stops)
        t2 = time.perf_counter()
        ids = np.stack(out, axis=1)
        result = []
        for row in ids.tolist():
            ends = [i for i, t in enumerate(row) if t in set(stops.tolist())]
            if ends:
                row = row[: ends[0]]
            result.append(row)
        return Generation(result, t1 - t0, t2 - t1, steps, b)
