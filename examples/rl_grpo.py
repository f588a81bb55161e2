"""GRPO with LoRA: sample from each tenant's current adapter, score, update, sync one slot.

    python -m examples.rl_grpo                  # demo LM, 1 tenant (about a minute)
    python -m examples.rl_grpo --tenants 4      # 4 tenants' runs share one base in one batch
    python -m examples.rl_grpo --gemma --steps 3 --prompts 1 --group 4   # Gemma 3 270M

The task is verifiable: a prompt counts in steps of ``k`` modulo 10 from a random
digit (``"036925814703"`` for ``k = 3``) and the reward of a completion is the
mean over its first characters of 1 for continuing the count (``"69258147"``),
0.25 for another digit and 0 otherwise. Each
tenant has its own step ``k`` (1, 9, 3, 7, ...): its own rule to learn. Every step:

1. **Sample** ``--group`` completions of each of ``--prompts`` prompts per tenant,
   at temperature 1, from the sampler's adapter stack through the KV-cache
   generator (``examples/common/generation.py``; ``adapter_ids`` pick each row's
   tenant slot): one batch for every tenant.
2. **Score** every completion; the advantage of a completion is its reward minus
   its group's mean, over the group's standard deviation (GRPO).
3. **Update** in one jitted step: the batch holds each completion twice, once
   with its tenant's slot (the policy) and once with id ``-1`` (the base alone:
   the reference model, with no second copy of the weights in memory). The loss
   is GRPO's clipped-ratio policy gradient (one update per batch, so the ratio
   is 1) plus ``--beta`` times the k3 estimate of KL(policy || reference);
   ``lora_jax.tenant_loss`` makes each tenant's loss its own mean and
   ``lora_jax.tenant_optimizer`` keeps each tenant's Adam state in its slot.
4. **Sync** each tenant's new adapter into the sampler's stack with
   ``lora_jax.advanced.copy_slot``: only the slot's factors move (the bytes are printed
   against a full-weight sync).

``lora_jax.debug.CompileCounter`` counts compilations after the first step: 0
(the adapters are arguments of every jitted function, never constants). The
reward curve is saved as ``<out>/rl_grpo_reward.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from examples.common.generation import Generator
from lora_jax.debug import CompileCounter

STRIDES = (1, 9, 3, 7, 2, 8, 4, 6, 5)  # tenant t counts in steps of STRIDES[t % 9], mod 10


def make_prompts(rng, stride: int, n: int, length: int, answer: int):
    """``n`` (prompt, expected continuation) pairs: digits counting from a random start in
    steps of ``stride`` modulo 10 (``"4703692581"`` for stride 3), ``length`` of them in the
    prompt and the next ``answer`` expected."""
    out = []
    for _ in range(n):
        start = int(rng.integers(0, 10))
        digits = [str((start + stride * i) % 10) for i in range(length + answer)]
        out.append(("".join(digits[:length]), "".join(digits[length:])))
    return out


def reward(completion: str, expected: str, partial: float = 0.25) -> float:
    """The mean over ``expected``'s positions of 1 for the right digit, ``partial`` for
    another digit and 0 otherwise (a wrong character early does not shift the rest)."""
    credit = [
        1.0 if a == b else partial if a.isdigit() else 0.0 for a, b in zip(completion, expected)
    ]
    return sum(credit) / len(expected)


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """GRPO's advantages: each reward minus its group's mean, over the group's std (+1e-4)."""
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    return adv.reshape(-1).astype(np.float32)


# -----------------------------------------------------------------------------
# The base models
# -----------------------------------------------------------------------------


def demo_setup(args) -> dict[str, Any]:
    """The demo's byte-level LM, pretrained on Python's documentation (cached)."""
    from examples.common.pretrained import (
        MODEL,
        load_or_pretrain,  # noqa: PLC0415
    )
    from examples.common.text import decode, encode, pydoc_text, train_eval_split  # noqa: PLC0415

    base_train, _ = train_eval_split(encode(pydoc_text()))
    params, _ = load_or_pretrain(
        base_train, args.pretrain_steps, args.seed, args.out, use_cache=not args.no_cache
    )
    return dict(
        model=MODEL,
        params=params,
        targets=[r".*/attn/(q|k|v|out)/kernel", r".*/mlp/(fc1|fc2)/kernel"],
        encode=lambda s: [int(t) for t in encode(s)],
        decode=lambda ids: decode(np.asarray(ids, np.uint8)),
        answer_tokens=lambda units: units,  # one byte per digit
        max_prompt_tokens=lambda units: units,
    )


def gemma_setup(args) -> dict[str, Any]:
    """Gemma 3 270M (converted weights); its tokenizer splits digits, one token each."""
    from examples.gemma3 import gguf_loader as gl  # noqa: PLC0415
    from examples.gemma3 import model as gm  # noqa: PLC0415
    from examples.gemma3.tokenizer import Tokenizer  # noqa: PLC0415

    cfg, params, fields = gl.load(cache_dir=args.cache_dir, verbose=True)
    tok = Tokenizer(fields)
    return dict(
        model=gm.Gemma3(cfg),
        params=jax.tree.map(jnp.asarray, params),
        targets=gm.ALL_PROJECTIONS,
        encode=lambda s: tok.encode(s, add_bos=True),
        decode=tok.decode,
        answer_tokens=lambda units: units,
        max_prompt_tokens=lambda units: units + 1,  # bos
    )


# -----------------------------------------------------------------------------
# The GRPO step: policy and reference in one batch, every tenant at once
# -----------------------------------------------------------------------------


def make_train_step(model, opt, tenants: int, answer_len: int, beta: float):
    """The jitted update of every tenant's slot from one batch of scored completions.

    ``tokens`` (rows, width): each prompt followed by its completion, right-padded;
    ``prompt_lens`` (rows,); ``ids`` (rows,) each row's tenant; ``advantages`` (rows,).
    """
    apply = lj.implicit(model.apply)

    def logprobs(base, stack, tokens, prompt_lens, ids):
        """Log-probabilities of each completion token, ``(rows, answer_len)``."""
        index = prompt_lens[:, None] - 1 + jnp.arange(answer_len)  # logits predicting them
        out = apply(base, stack, tokens, adapter_ids=ids, logits_index=index)
        logits = (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)
        targets = jnp.take_along_axis(tokens, index + 1, axis=1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    def loss_fn(stack, base, tokens, prompt_lens, ids, advantages):
        n = tokens.shape[0]
        # each completion twice: with its tenant's slot (policy) and id -1 (reference)
        both = lambda x, other: jnp.concatenate([x, other])  # noqa: E731
        logp = logprobs(
            base,
            stack,
            both(tokens, tokens),
            both(prompt_lens, prompt_lens),
            both(ids, jnp.full_like(ids, -1)),
        )
        policy, ref = logp[:n], jax.lax.stop_gradient(logp[n:])
        ratio = jnp.exp(policy - jax.lax.stop_gradient(policy))  # 1, with the policy's gradient
        log_r = ref - policy
        kl = jnp.exp(log_r) - log_r - 1.0  # k3: an unbiased, positive KL(policy || ref)
        per_row = -(ratio * advantages[:, None] - beta * kl).mean(-1)
        total, _ = lj.tenant_loss(per_row, ids, tenants)
        return total, kl.mean(-1)

    @jax.jit  # the base is an argument, never a constant (XLA would fold it)
    def step(stack, opt_state, base, tokens, prompt_lens, ids, advantages, settings):
        (_, kl), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            stack, base, tokens, prompt_lens, ids, advantages
        )
        updates, opt_state = opt.update(grads, opt_state, stack, settings=settings, adapter_ids=ids)
        return optax.apply_updates(stack, updates), opt_state, kl

    return step


# -----------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------


def plot(curves: np.ndarray, path: Path, title: str) -> bool:
    """Mean reward per step, one line per tenant; False where matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for t, curve in enumerate(curves.T):
        ax.plot(np.arange(1, len(curve) + 1), curve, lw=1.2, label=f"tenant {t}")
    ax.set(xlabel="GRPO step", ylabel="mean reward of the sampled group", title=title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if curves.shape[1] > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tenants", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per tenant per step")
    ap.add_argument("--group", type=int, default=8, help="completions sampled per prompt")
    ap.add_argument("--prompt-units", type=int, default=12, help="pattern units in a prompt")
    ap.add_argument("--answer-units", type=int, default=8, help="units scored")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="2e-3 (demo LM), 5e-4 (Gemma)")
    ap.add_argument("--beta", type=float, default=0.02, help="KL(policy || reference) weight")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--no-cache", action="store_true", help="pretrain the demo base afresh")
    ap.add_argument("--gemma", action="store_true", help="Gemma 3 270M as the base")
    ap.add_argument("--cache-dir", default=None, help="Gemma's converted-weights cache")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-4 if args.gemma else 2e-3
    t_start = time.perf_counter()

    m = (gemma_setup if args.gemma else demo_setup)(args)
    model, params, T = m["model"], m["params"], args.tenants
    config = lj.LoraConfig(targets=m["targets"], rank=args.rank, alpha=2.0 * args.rank)
    base = lj.init_lora(jax.random.key(args.seed), params, config)[0]
    deltas = [lj.init_lora(jax.random.key(args.seed + 1 + t), params, config)[1] for t in range(T)]
    stack = lj.stack_adapters(deltas)  # the trainer's: slot t is tenant t's adapter
    sampler_stack = jax.tree.map(jnp.copy, stack)  # the sampler's own copy
    opt = lj.tenant_optimizer()
    opt_state = opt.init(stack)
    settings = lj.tenant_settings(T, learning_rate=args.lr)

    # One request per (tenant, prompt, sample): rows grouped by prompt, tenants in turn.
    rows_per_tenant = args.prompts * args.group
    ids = np.repeat(np.arange(T, dtype=np.int32), rows_per_tenant)
    answer_chars = args.answer_units  # one character per digit
    sample = Generator(
        lambda b, s, i, t, **kw: lj.implicit(model.apply)(b, s, t, adapter_ids=i, **kw), model
    )
    answer_len = m["answer_tokens"](args.answer_units)
    width = -(-(m["max_prompt_tokens"](args.prompt_units) + answer_len) // 16) * 16
    step = make_train_step(model, opt, T, answer_len, args.beta)
    sync = jax.jit(lj.advanced.copy_slot, donate_argnums=0)

    slot_bytes = lj.advanced.slot_nbytes(stack)
    full_bytes = lj.advanced.tree_bytes(params)
    print(
        f"{T} tenant(s), {args.prompts} prompts x {args.group} samples each per step; "
        f"rank {args.rank}; a sync moves one slot: {slot_bytes:,} bytes per tenant vs "
        f"{full_bytes:,} for a full-weight sync ({100 * slot_bytes / full_bytes:.2f}%)"
    )

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    curves, kls = [], []
    counter = CompileCounter()
    for it in range(args.steps):
        if it == 1:
            counter.__enter__()  # everything has compiled once: count from here
        pairs = [
            p
            for t in range(T)
            for p in make_prompts(
                rng,
                STRIDES[t % len(STRIDES)],
                args.prompts,
                args.prompt_units,
                args.answer_units,
            )
        ]
        requests = [m["encode"](p) for p, _ in pairs for _ in range(args.group)]
        key, sub = jax.random.split(key)
        gen = sample(
            (base, sampler_stack, jnp.asarray(ids)),
            requests,
            answer_len,
            temperature=1.0,
            key=sub,
            stop_at_eos=False,
        )
        expected = [x for _, x in pairs for _ in range(args.group)]
        rewards = np.array(
            [reward(m["decode"](c)[:answer_chars], e) for c, e in zip(gen.tokens, expected)],
            np.float32,
        )
        tokens = np.zeros((len(requests), width), np.int32)
        for r, (req, comp) in enumerate(zip(requests, gen.tokens)):
            tokens[r, : len(req) + len(comp)] = req + comp
        prompt_lens = np.array([len(r) for r in requests], np.int32)
        adv = group_advantages(rewards, args.group)
        stack, opt_state, kl = step(
            stack,
            opt_state,
            base,
            jnp.asarray(tokens),
            jnp.asarray(prompt_lens),
            jnp.asarray(ids),
            jnp.asarray(adv),
            settings,
        )
        for t in range(T):  # the trainer hands each tenant's new adapter to the sampler
            sampler_stack = sync(sampler_stack, stack, jnp.int32(t))
        curves.append(rewards.reshape(T, -1).mean(1))
        kls.append(float(jnp.mean(kl)))
        if it % 10 == 0 or it == args.steps - 1:
            print(
                f"step {it:3d}: reward "
                + " ".join(f"{r:.3f}" for r in curves[-1])
                + f"   KL(policy||ref) {kls[-1]:.4f}"
            )
    compiles_after_warmup = 0
    if args.steps > 1:
        counter.__exit__(None, None, None)
        compiles_after_warmup = counter.count
    curves_arr = np.array(curves)
    k = max(1, min(10, len(curves) // 4))
    first, last = curves_arr[:k].mean(0), curves_arr[-k:].mean(0)
    print(
        f"reward, mean of the first {k} steps -> the last {k}: "
        + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(first, last))
    )
    print(f"compilations after the first step: {compiles_after_warmup}")
    print(
        f"sync bytes per step: {T * slot_bytes:,} ({T} slot(s)) vs full weights "
        f"{T * full_bytes:,}: {100 * slot_bytes / full_bytes:.2f}%"
    )
    png = args.out / "rl_grpo_reward.png"
    name = "Gemma 3 270M" if args.gemma else "demo byte LM"
    if plot(curves_arr, png, f"GRPO with LoRA on the {name}: continue the count"):
        print(f"reward curve: {png}")
    result = dict(
        tenants=T,
        steps=args.steps,
        reward_first=first.tolist(),
        reward_last=last.tolist(),
        rewards=curves_arr.tolist(),
        kl=kls,
        compilations_after_warmup=compiles_after_warmup,
        sync_bytes_per_tenant=slot_bytes,
        full_weight_bytes=full_bytes,
        seconds=time.perf_counter() - t_start,
    )
    print(f"total time {result['seconds']:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
