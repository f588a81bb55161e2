"""LoRA on the attention and the experts of a small mixture-of-experts LM (Qwen3-MoE).

The demo's story (``examples/finetune_lm.py``) on a mixture of experts:

1. **Pretrain** a small byte-level Qwen3-MoE (``model.py``: 8 experts, top-2
   routing, experts through ``jax.lax.ragged_dot``) on Python's documentation,
   by ordinary full training plus the load-balancing loss (no expert starves).
2. **LoRA fine-tune** it on the source code of a few standard library modules:
   ``lora_jax.init_lora`` puts factors on every attention projection and on
   both expert kernels of every layer (layout ``"eio"``: per-expert factors
   ``A (E, in, r)``, ``B (E, r, out)``); the train step runs under
   ``lora_jax.implicit(strict=True)``, which computes the experts low-rank
   (two ragged dots through the rank axis; no ``E x in x out`` update is formed).
3. **Report**: the demo's before / after table (target and base loss, the base
   untouched, merge / unmerge, throughput, optimizer state), the adapter
   written as a HuggingFace PEFT adapter (``target_parameters`` for the
   experts), and how many tokens each expert receives before and after.

Everything is built in (no downloads) and deterministic given ``--seed``::

    python -m examples.qwen3_moe.finetune
    python -m examples.qwen3_moe.finetune --pretrain-steps 100 --lora-steps 40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from examples.common.lm import cross_entropy
from examples.common.text import (
    VOCAB_SIZE,
    encode,
    eval_windows,
    pydoc_text,
    random_batches,
    stdlib_source_text,
    train_eval_split,
)
from examples.finetune_lm import lora_finetune, max_abs_diff
from examples.qwen3_moe.model import (
    ATTENTION,
    EXPERT_LAYOUT,
    EXPERTS,
    HF_NAMES,
    Qwen3Moe,
    Qwen3MoeConfig,
    init_params,
    load_balancing_loss,
)

CONFIG = Qwen3MoeConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    tie_word_embeddings=True,
)
MODEL = Qwen3Moe(CONFIG)
SEQ_LEN = 64
BATCH_SIZE = 16
PRETRAIN_LR = 3e-3
ROUTER_AUX_LOSS_COEF = 0.01
LORA_LR = 1e-2
NUM_EVAL_WINDOWS = 64

LORA_CONFIG = lj.LoraConfig(
    targets=[ATTENTION, EXPERTS],
    rank=8,
    alpha=16,
    layouts={EXPERTS: EXPERT_LAYOUT},
)
IMPLICIT_APPLY = lj.implicit(MODEL.apply, strict=True)  # no dense fallback for any target


@jax.jit
def eval_loss(params, windows):
    """Loss of dense ``params`` on fixed ``(n, SEQ_LEN + 1)`` windows."""
    return cross_entropy(MODEL.apply(params, windows[:, :-1]), windows[:, 1:])


@jax.jit
def tokens_per_expert(params, windows):
    """``(layers, E)``: how many of the windows' token copies each MoE layer sends to each expert."""
    _, state = MODEL.apply(params, windows[:, :-1], mutable=["intermediates"])
    inter = state["intermediates"]
    return jnp.stack([inter[k]["mlp"]["tokens_per_expert"][0] for k in sorted(inter)])


def pretrain(tokens, steps: int, seed: int):
    """Full training of every parameter with AdamW, plus the load-balancing loss that keeps
    experts from starving (as transformers' ``router_aux_loss_coef``); returns (params,
    losses)."""
    params = init_params(CONFIG, seed)
    optimizer = optax.adamw(
        optax.warmup_cosine_decay_schedule(
            0.0, PRETRAIN_LR, max(1, steps // 20), max(steps, 2), PRETRAIN_LR / 10
        ),
        weight_decay=0.01,
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits, state = MODEL.apply(p, batch[:, :-1], mutable=["intermediates"])
            aux = load_balancing_loss(state["intermediates"], CONFIG.num_experts)
            return cross_entropy(logits, batch[:, 1:]) + ROUTER_AUX_LOSS_COEF * aux

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = random_batches(tokens, BATCH_SIZE, SEQ_LEN, seed)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses), np.float32)


def lora_loss(delta, base, batch):
    return cross_entropy(IMPLICIT_APPLY(base, delta, batch[:, :-1]), batch[:, 1:])


def print_expert_counts(before: np.ndarray, after: np.ndarray) -> None:
    """Token copies per expert and MoE layer, on the held-out target text."""
    print("tokens per expert (held-out stdlib source, top-2 so each token counts twice):")
    header = "".join(f"{f'e{e}':>7}" for e in range(before.shape[1]))
    print(f"  {'layer':<14}{header}")
    for layer in range(before.shape[0]):
        for label, counts in (("before", before), ("after", after)):
            row = "".join(f"{int(c):>7}" for c in counts[layer])
            print(f"  {layer:<5} {label:<8}{row}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "out" / "qwen3_moe")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    base_train, base_heldout = train_eval_split(encode(pydoc_text()))
    target_train, target_heldout = train_eval_split(encode(stdlib_source_text()))
    base_eval = jnp.asarray(eval_windows(base_heldout, SEQ_LEN, NUM_EVAL_WINDOWS))
    target_eval = jnp.asarray(eval_windows(target_heldout, SEQ_LEN, NUM_EVAL_WINDOWS))

    print("== 1. Pretraining (full training of the MoE) ==")
    t0 = time.perf_counter()
    params, _ = pretrain(base_train, args.pretrain_steps, args.seed)
    print(
        f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - t0:.1f}s; model "
        f"params: {lj.count_params(params):,} ({CONFIG.num_experts} experts, top-"
        f"{CONFIG.num_experts_per_tok}, {CONFIG.num_hidden_layers} layers)"
    )
    pretrained_copy = jax.tree.map(np.array, params)

    print("\n== 2. LoRA fine-tuning (attention + experts) ==")
    base, delta = lj.init_lora(jax.random.key(args.seed), params, LORA_CONFIG)
    summary = lj.print_summary(base, delta)
    target_before = float(eval_loss(base, target_eval))
    base_before = float(eval_loss(base, base_eval))
    counts_before = np.asarray(tokens_per_expert(base, target_eval))
    delta, _, opt_state, tokens_per_s = lora_finetune(
        base,
        delta,
        target_train,
        args.lora_steps,
        args.seed,
        loss=lora_loss,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
    )

    merged = lj.merge(base, delta)
    restored = lj.unmerge(merged, delta)
    target_after = float(eval_loss(merged, target_eval))
    base_merged = float(eval_loss(merged, base_eval))
    base_after = float(eval_loss(restored, base_eval))
    counts_after = np.asarray(tokens_per_expert(merged, target_eval))
    base_identical = all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(pretrained_copy))
    )
    restore_error = max_abs_diff(restored, base)
    inputs = target_eval[:8, :-1]
    merged_vs_unmerged = max_abs_diff(
        jax.jit(MODEL.apply)(merged, inputs), jax.jit(IMPLICIT_APPLY)(base, delta, inputs)
    )
    lora_state_bytes = lj.advanced.tree_bytes(opt_state)
    full_state_bytes = lj.advanced.tree_bytes(jax.eval_shape(optax.adamw(LORA_LR).init, params))

    peft_dir = args.out / "peft_adapter"
    peft_config = lj.export_peft(peft_dir, delta, name_map=HF_NAMES)
    reloaded = lj.import_peft(peft_dir, base, name_map=HF_NAMES)
    reload_diff = max_abs_diff(lj.merge(base, reloaded), merged)

    print("\n== 3. Results ==")
    print(
        f"trainable params: {summary.trainable_params:,} of {summary.total_params:,} "
        f"({summary.trainable_percent:.2f}%)"
    )
    print(
        f"optimizer state: LoRA {lora_state_bytes:,} bytes vs full fine-tuning "
        f"{full_state_bytes:,} bytes ({100 * lora_state_bytes / full_state_bytes:.1f}%)"
    )
    print(
        f"target loss: before {target_before:.4f} after {target_after:.4f}"
        "   (held-out stdlib source, nats/byte)"
    )
    print(
        f"base loss: before {base_before:.4f} after {base_after:.4f}"
        "   (held-out pydoc text; base model = unmerge(merge(base, delta), delta))"
    )
    print(f"base loss with the adapter merged: {base_merged:.4f}")
    print(f"base params never modified: {base_identical}")
    print(f"unmerge(merge(base, delta), delta) equals base to {restore_error:.1e}")
    print(
        f"max |merged - unmerged forward|: {merged_vs_unmerged:.3e}   (logits, "
        "model.apply(merge(base, delta)) vs the training forward)"
    )
    print(
        f"LoRA training throughput: {tokens_per_s:,.0f} tokens/s   "
        f"({args.lora_steps} steps x {BATCH_SIZE} x {SEQ_LEN} tokens, compile excluded)"
    )
    print(
        f"PEFT adapter: {peft_dir} (target_modules {peft_config['target_modules']}, "
        f"target_parameters {peft_config['target_parameters']}; re-imported and re-merged: "
        f"max diff {reload_diff:.1e})"
    )
    print_expert_counts(counts_before, counts_after)
    print(f"\ntotal time: {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
