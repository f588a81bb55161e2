"""LoRA fine-tuning of a small byte-level transformer language model with lora_jax.

The story, in three acts:

1. **Pretrain** a tiny decoder-only transformer (Flax linen, ``common/lm.py``) on
   Python's documentation (``pydoc_data.topics``), by ordinary full
   fine-tuning. The result is cached on disk, so later runs skip this step.
2. **LoRA fine-tune** it on a different domain, the source code of a few
   standard library modules. ``lora_jax.init_lora`` splits the params into a
   frozen ``base`` and a small trainable ``delta``; ``jax.grad`` is taken with
   respect to the delta only, and the optimizer state covers only the delta.
3. **Report**: target-domain loss before/after, that the base model is
   untouched (bit for bit), merged vs. training forward, throughput,
   optimizer-state and adapter size, and greedy samples from both models.

Everything is built in (no downloads) and deterministic given ``--seed``::

    python -m examples.finetune_lm                 # or: make demo
    python -m examples.finetune_lm --lora-steps 50 --out /tmp/lora-demo
    python -m examples.finetune_lm --quantize nf4  # QLoRA: train over a 4-bit base

(run from the repository root, or with it on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lora_jax
from examples.common.generation import Generator
from examples.common.lm import cross_entropy
from examples.common.pretrained import BATCH_SIZE, CONFIG, MODEL, eval_loss, load_or_pretrain
from examples.common.text import (
    decode,
    encode,
    eval_windows,
    pydoc_text,
    random_batches,
    stdlib_source_text,
    train_eval_split,
)

IMPLICIT_APPLY = lora_jax.implicit(MODEL.apply, strict=True)  # training forward, see forward()
LORA_LR = 1e-2
NUM_EVAL_WINDOWS = 128

# LoRA on every attention projection and both MLP layers of every block.
LORA_CONFIG = lora_jax.LoraConfig(
    targets=[r".*/attn/(q|k|v|out)/kernel", r".*/mlp/(fc1|fc2)/kernel"],
    rank=8,
    alpha=16,
)


# -----------------------------------------------------------------------------
# Act 2: LoRA fine-tuning. Only `delta` is trained; `base` is never modified.
# -----------------------------------------------------------------------------


def forward(base, delta, tokens):
    """The forward pass used for LoRA training: logits of the adapted model.

    `lora_jax.implicit` runs `MODEL.apply` with every adapted kernel applied as
    x @ W + s * (x @ A) @ B: the dense W + s*A@B is never formed and W (under
    stop_gradient) gets no gradient, so a step costs about what the frozen
    model's forward and activation backward cost.
    """
    return IMPLICIT_APPLY(base, delta, tokens)


def lora_loss(delta, base, batch):
    return cross_entropy(forward(base, delta, batch[:, :-1]), batch[:, 1:])


def lora_finetune(
    base,
    delta,
    tokens,
    steps: int,
    seed: int,
    *,
    loss=lora_loss,
    batch_size: int = BATCH_SIZE,
    seq_len: int = CONFIG.seq_len,
):
    """Trains the delta with AdamW on ``loss(delta, base, batch)`` (this LM's by default; the
    Qwen3-MoE example passes its own). Returns (delta, losses, opt_state, tokens/s)."""
    optimizer = optax.adamw(
        optax.warmup_cosine_decay_schedule(
            0.0, LORA_LR, max(1, steps // 20), max(steps, 2), LORA_LR / 10
        ),
        weight_decay=0.0,
    )
    opt_state = optimizer.init(delta)  # Adam moments for the delta only

    def step(delta, opt_state, base, batch):
        # Differentiate w.r.t. the delta (argument 0) only: the base gets no gradient.
        value, grads = jax.value_and_grad(loss)(delta, base, batch)
        updates, opt_state = optimizer.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, value

    batches = random_batches(tokens, batch_size, seq_len, seed + 1)
    batch = next(batches)
    # Compile ahead of time, so the throughput below measures training only.
    t0 = time.perf_counter()
    step = jax.jit(step).lower(delta, opt_state, base, batch).compile()
    print(f"LoRA train step compiled in {time.perf_counter() - t0:.1f}s")

    losses = []
    t0 = time.perf_counter()
    with tqdm(range(steps), desc="LoRA fine-tune", unit="step") as bar:
        for i in bar:
            delta, opt_state, value = step(delta, opt_state, base, batch)
            losses.append(value)
            batch = next(batches)
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(value):.3f}")
    jax.block_until_ready(delta)
    tokens_per_s = steps * batch_size * seq_len / (time.perf_counter() - t0)
    return delta, np.asarray(jax.device_get(losses), np.float32), opt_state, tokens_per_s


# -----------------------------------------------------------------------------
# Act 3: helpers for the report.
# -----------------------------------------------------------------------------


def directory_bytes(path: Path) -> int:
    """Total size of the files in a directory (an adapter directory)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


GENERATOR = Generator(MODEL.apply, MODEL)  # jitted prefill + decode with a KV cache


def generate(params, prompt: str) -> str:
    """Greedy continuation of ``prompt`` up to the model's context length."""
    ids = encode(prompt).tolist()
    return decode(GENERATOR((params,), [ids], CONFIG.seq_len - len(ids)).tokens[0])


def max_abs_diff(tree_a, tree_b) -> float:
    diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), tree_a, tree_b)
    return float(max(jax.tree.leaves(diffs)))


def plot_losses(pretrain_losses, lora_losses, path: Path) -> None:
    """Training loss of both phases, raw (faint) and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(x, beta=0.9):  # bias-corrected exponential moving average
        out, avg = np.empty(len(x)), 0.0
        for i, v in enumerate(x):
            avg = beta * avg + (1 - beta) * v
            out[i] = avg / (1 - beta ** (i + 1))
        return out

    fig, ax = plt.subplots(figsize=(8, 4.5))
    p = len(pretrain_losses)
    phases = [
        (np.arange(p), pretrain_losses, "C0", "pretraining, full fine-tuning (pydoc text)"),
        (
            p + np.arange(len(lora_losses)),
            lora_losses,
            "C1",
            f"LoRA r={LORA_CONFIG.rank}, base frozen (stdlib source code)",
        ),
    ]
    for steps, losses, color, label in phases:
        if len(losses):
            ax.plot(steps, losses, color=color, alpha=0.25, lw=0.7)
            ax.plot(steps, smooth(losses), color=color, lw=1.5, label=label)
    ax.axvline(p, color="gray", ls="--", lw=0.8)
    ax.set(
        xlabel="step",
        ylabel="training loss (nats / byte)",
        title="Byte-level transformer LM: pretraining, then LoRA on a new domain",
    )
    ax.legend()
    fig.tight_layout()
    lora_jax.advanced.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def show_sample(title: str, prompt: str, continuation: str) -> None:
    print(f"--- {title} ---")
    print(prompt + continuation.rstrip())
    print("-" * (len(title) + 8))


# -----------------------------------------------------------------------------


def quantized(base, scheme: str):
    """The base with LORA_CONFIG's targets quantized (``scheme`` 'none': the base itself)."""
    if scheme == "none":
        return base
    kwargs = {"double_quant": True} if scheme == "nf4" else {}
    return lora_jax.quantize(base, LORA_CONFIG.targets, scheme=scheme, **kwargs)


def training_base(base, scheme: str, dtype: str):
    """The base the adapter trains over: every weight cast to ``dtype`` (``bfloat16``: the
    model then computes in bfloat16 where its code does not promote), then LORA_CONFIG's
    targets quantized from the cast weights (dequantized to ``dtype`` where used)."""
    if dtype != "float32":
        base = jax.tree.map(lambda x: x.astype(dtype), base)
    return quantized(base, scheme)


def report_quantized(base, train_base, target_eval, scheme: str) -> None:
    """Memory of the adapted kernels, dense vs quantized, and what quantizing alone cost."""
    paths = [
        p
        for p, x in lora_jax.advanced.leaves_with_paths(train_base)[0]
        if lora_jax.advanced.is_quantized(x)
    ]
    dense_bytes = sum(
        np.asarray(x).nbytes for p, x in lora_jax.advanced.leaves_with_paths(base)[0] if p in paths
    )
    q_bytes = sum(
        x.nbytes
        for x in jax.tree.leaves(train_base, is_leaf=lora_jax.advanced.is_quantized)
        if lora_jax.advanced.is_quantized(x)
    )
    bits = lora_jax.advanced.kernel_bits(train_base)
    print(
        f"quantized base ({scheme}): {len(paths)} adapted kernels, {dense_bytes:,} bytes "
        f"float32 -> {q_bytes:,} bytes ({bits:.3f} bits/param, scales included)"
    )
    print(
        f"target loss of the base alone: float32 {float(eval_loss(base, target_eval)):.4f}, "
        f"{scheme} {float(eval_loss(lora_jax.dequantize(train_base), target_eval)):.4f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="pretrain from scratch; neither read nor write the params cache",
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "nf4", "int8"),
        default="none",
        help="QLoRA: train the adapter over the base with its adapted kernels "
        "quantized (nf4: NF4 + double quantization; int8: per channel)",
    )
    parser.add_argument(
        "--base-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the frozen base weights LoRA trains over (the LoRA "
        "factors and Adam stay float32)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # Data: two built-in corpora, each split into training and held-out text.
    base_train, base_heldout = train_eval_split(encode(pydoc_text()))
    target_train, target_heldout = train_eval_split(encode(stdlib_source_text()))
    base_eval = eval_windows(base_heldout, CONFIG.seq_len, NUM_EVAL_WINDOWS)
    target_eval = eval_windows(target_heldout, CONFIG.seq_len, NUM_EVAL_WINDOWS)
    print(
        f"base domain   (pydoc topics):   {len(base_train):,} training bytes, "
        f"{len(base_heldout):,} held out"
    )
    print(
        f"target domain (stdlib source):  {len(target_train):,} training bytes, "
        f"{len(target_heldout):,} held out"
    )

    # Act 1: the pretrained model.
    print("\n== 1. Pretraining (full fine-tuning) ==")
    params, pretrain_losses = load_or_pretrain(
        base_train,
        args.pretrain_steps,
        args.seed,
        args.out,
        use_cache=not args.no_cache,
        progress=lambda steps: tqdm(steps, desc="pretrain (full)", unit="step"),
    )
    print(f"model params: {lora_jax.count_params(params):,}")
    pretrained_copy = jax.tree.map(np.array, params)  # a host copy, to check later

    # Act 2: LoRA.
    print("\n== 2. LoRA fine-tuning ==")
    base, delta = lora_jax.init_lora(jax.random.key(args.seed), params, LORA_CONFIG)
    summary = lora_jax.print_summary(base, delta)
    # With --quantize the adapter trains over the quantized base (QLoRA); `base`
    # itself stays the dense pretrained params, untouched.
    train_base = training_base(base, args.quantize, args.base_dtype)
    model_before = lora_jax.dequantize(train_base)  # the model LoRA starts from
    target_before = float(eval_loss(model_before, target_eval))
    base_before = float(eval_loss(model_before, base_eval))
    delta, lora_losses, opt_state, tokens_per_s = lora_finetune(
        train_base, delta, target_train, args.lora_steps, args.seed
    )

    # Act 3: the report.
    merged = lora_jax.merge(train_base, delta)
    restored = lora_jax.unmerge(merged, delta)
    target_after = float(eval_loss(merged, target_eval))
    base_merged = float(eval_loss(merged, base_eval))
    base_after = float(eval_loss(restored, base_eval))
    base_identical = all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(pretrained_copy))
    )
    restore_error = max_abs_diff(restored, model_before)
    inputs = jnp.asarray(target_eval[:16, :-1])
    merged_vs_unmerged = max_abs_diff(
        jax.jit(MODEL.apply)(merged, inputs), jax.jit(forward)(train_base, delta, inputs)
    )

    lora_state_bytes = lora_jax.advanced.tree_bytes(opt_state)
    full_state_bytes = lora_jax.advanced.tree_bytes(
        jax.eval_shape(optax.adamw(LORA_LR).init, params)
    )

    # The adapter directory: adapter_config.json + adapter_model.safetensors,
    # written atomically; lora_jax.export_peft writes the HuggingFace PEFT form.
    adapter_path = lora_jax.save(args.out / "adapter", delta, LORA_CONFIG)
    reloaded, _ = lora_jax.load(adapter_path, base=base)
    num_arrays = 2 * len(lora_jax.summarize(base, reloaded).leaves)
    reload_diff = max_abs_diff(lora_jax.merge(train_base, reloaded), merged)

    plot_path = args.out / "loss_curve.png"
    plot_losses(pretrain_losses, lora_losses, plot_path)

    prompt = "    def __init__(self, "
    base_sample, lora_sample = generate(model_before, prompt), generate(merged, prompt)

    print("\n== 3. Results ==")
    print(
        f"trainable params: {summary.trainable_params:,} of {summary.total_params:,} "
        f"({summary.trainable_percent:.2f}%)"
    )
    print(
        f"optimizer state: LoRA {lora_state_bytes:,} bytes vs full fine-tuning "
        f"{full_state_bytes:,} bytes ({100 * lora_state_bytes / full_state_bytes:.1f}%)"
    )
    if args.quantize != "none":
        report_quantized(base, train_base, target_eval, args.quantize)
    print(
        f"target loss: before {target_before:.4f} after {target_after:.4f}"
        "   (held-out stdlib source, nats/byte)"
    )
    print(
        f"base loss: before {base_before:.4f} after {base_after:.4f}"
        "   (held-out pydoc text; base model = unmerge(merge(base, delta), delta))"
    )
    print(
        f"base loss with the adapter merged: {base_merged:.4f}   (how much of the base domain "
        "the adapted model forgot)"
    )
    print(
        f"base params never modified: {base_identical}   (bit-identical to the pretrained "
        "params after training, merge and unmerge)"
    )
    print(
        f"unmerge(merge(base, delta), delta) equals base to {restore_error:.1e}   "
        "(float32 rounding of adding and subtracting s*A@B)"
    )
    print(
        f"max |merged - unmerged forward|: {merged_vs_unmerged:.3e}   (logits, "
        "model.apply(merge(base, delta)) vs the training forward)"
    )
    print(
        f"LoRA training throughput: {tokens_per_s:,.0f} tokens/s   "
        f"({args.lora_steps} steps x {BATCH_SIZE} x {CONFIG.seq_len} tokens, compile excluded)"
    )
    print(
        f"adapter: {adapter_path} ({directory_bytes(adapter_path):,} bytes on disk, "
        f"{num_arrays} arrays; reloaded and re-merged: max diff {reload_diff:.1e})"
    )
    print(f"loss curve: {plot_path}")
    print()
    show_sample("base model", prompt, base_sample)
    show_sample("LoRA fine-tuned model", prompt, lora_sample)
    print(f"\ntotal time: {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
