"""The generation loop stops at the model's EOS ids by default, as transformers.generate does."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from examples.common import generation
from examples.gemma3 import model as gm

VOCAB, EOS, TURN = 8, 1, 6


class StubModel:
    """Emits token 5 for every row, except the stop id ``eos[row]`` at absolute position
    ``stop_at[row]`` (a decode step's own position)."""

    eos_ids = (EOS, TURN)

    def __init__(self, stop_at, eos):
        self.stop_at = jnp.asarray(stop_at)
        self.eos = jnp.asarray(eos)

    def init_cache(self, batch, length):
        return {"n": jnp.zeros((batch,), jnp.int32)}

    def apply(self, params, tokens, *, positions, cache, logits_index=None):
        pos = positions[:, -1] if logits_index is None else positions[:, 0] + logits_index[:, 0]
        tok = jnp.where(pos + 1 == self.stop_at, self.eos, 5)
        logits = jnp.where(jnp.arange(VOCAB)[None] == tok[:, None], 10.0, 0.0) * params
        return logits[:, None, :], cache


def test_stops_at_model_eos_and_pads_stopped_rows():
    # prompts of length 2: generated token j (j = 0, 1, ...) sits at position 2 + j
    model = StubModel(stop_at=[2 + 3, 2 + 1], eos=[EOS, TURN])  # row 0 at its 4th, row 1 its 2nd
    gen = generation.Generator(model.apply, model)
    out = gen((jnp.float32(1.0),), [[2, 3], [2, 4]], 10)
    assert out.tokens == [[5, 5, 5], [5]]
    assert out.decode_steps == 3  # the loop ended when the last row stopped, not after 10
    never = gen((jnp.float32(1.0),), [[2, 3], [2, 4]], 10, eos_id=None)
    assert never.decode_steps == 9 and [len(t) for t in never.tokens] == [10, 10]
    assert never.tokens[0][3] == EOS  # generated, but not a stop id when eos_id=None
    other = gen((jnp.float32(1.0),), [[2, 3], [2, 4]], 10, eos_id=TURN)
    assert other.tokens[1] == [5] and len(other.tokens[0]) == 10


def test_stopped_rows_padded_while_others_finish():
    model = StubModel(stop_at=[2 + 1, 2 + 4], eos=[EOS, EOS])
    gen = generation.Generator(model.apply, model)
    out = gen((jnp.float32(1.0),), [[2, 3], [2, 4]], 10, pad_id=0)
    assert out.tokens == [[5], [5, 5, 5, 5]]
    assert out.decode_steps == 4


def test_gemma3_default_stop_ids():
    assert generation.stop_ids(generation.MODEL_EOS, gm.Gemma3(gm.Gemma3Config.tiny())) == (1, 106)
    assert np.array_equal(generation.stop_ids(None, gm.Gemma3(gm.Gemma3Config.tiny())), ())
