"""Gemma 3 270M in Flax linen, loadable from the packaged GGUF weights, for your own scripts.

From the repository root (or with it on ``PYTHONPATH``)::

    import jax.numpy as jnp
    from examples.gemma3 import Gemma3, Tokenizer, load

    cfg, params, fields = load()              # converted from the GGUF once, then cached
    tok = Tokenizer(fields)
    tokens = jnp.asarray([tok.encode("The Python module json", add_bos=True)])
    logits, _ = Gemma3(cfg).apply(params, tokens)   # (1, T, vocab)

* :class:`Gemma3` / :class:`Gemma3Config`: the model (``model.py``);
  :data:`ALL_PROJECTIONS` targets every attention and MLP projection for LoRA;
  :data:`HF_NAMES` maps its parameter paths to HF transformers' names;
* :func:`load`: the params from a GGUF file (``gguf_loader.py``);
* :class:`Tokenizer`: Gemma's SentencePiece tokenizer from the GGUF's fields.

``finetune.py`` beside them is the recipe (``python -m examples.gemma3.finetune``).
"""

from examples.gemma3.gguf_loader import load
from examples.gemma3.model import ALL_PROJECTIONS, HF_NAMES, Gemma3, Gemma3Config
from examples.gemma3.tokenizer import Tokenizer

__all__ = ["ALL_PROJECTIONS", "HF_NAMES", "Gemma3", "Gemma3Config", "Tokenizer", "load"]
