"""Built-in byte-level text data shared by the examples and the study.

Both corpora ship with every CPython, so the examples need no download:

* the *base* domain: Python's own documentation, ``pydoc_data.topics`` (the
  text ``help("if")`` prints): English prose with reStructuredText markup;
* the *target* domain: the source code of a few pure-Python standard library
  modules: indented code, ``def``/``self``/``return``, docstrings.

Text is tokenized as UTF-8 bytes (vocabulary 256), so there is no tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

import numpy as np

VOCAB_SIZE = 256

# Pure-Python standard library modules whose source makes the target domain.
SOURCE_MODULES = (
    "argparse",
    "calendar",
    "configparser",
    "difflib",
    "fractions",
    "heapq",
    "json.decoder",
    "json.encoder",
    "shlex",
    "statistics",
    "string",
    "textwrap",
)


def pydoc_text() -> str:
    """Python's documentation topics, joined in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def stdlib_source_text(modules=SOURCE_MODULES) -> str:
    """The source code of ``modules``, concatenated."""
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as an int32 array of token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 becomes U+FFFD."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def fingerprint(tokens: np.ndarray) -> str:
    """A short content hash (the corpus differs between Python versions)."""
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


def train_eval_split(tokens: np.ndarray, block: int = 4096, every: int = 10):
    """Splits ``tokens`` into training and held-out parts.

    The text is cut into blocks of ``block`` tokens and every ``every``-th
    block is held out, so the held-out text is spread over the whole corpus
    (every module / every topic) rather than being its last few pages.
    """
    starts = np.arange(0, len(tokens), block)
    held_out = (np.arange(len(starts)) % every) == every - 1
    pick = lambda mask: np.concatenate([tokens[s : s + block] for s in starts[mask]])  # noqa: E731
    return pick(~held_out), pick(held_out)


def eval_windows(tokens: np.ndarray, seq_len: int, num: int) -> np.ndarray:
    """``num`` fixed windows of ``seq_len + 1`` tokens, evenly spaced over ``tokens``.

    Deterministic (no randomness at all), so every run and every seed is
    evaluated on exactly the same held-out text.
    """
    starts = np.linspace(0, len(tokens) - seq_len - 1, num).astype(np.int64)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def random_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """An endless stream of ``(batch_size, seq_len + 1)`` random windows of ``tokens``.

    Inputs are ``batch[:, :-1]`` and next-token targets ``batch[:, 1:]``.
    """
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        yield tokens[starts[:, None] + offsets]
