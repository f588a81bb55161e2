"""GRPO with LoRA: sample from each tenant's current adapter, score, update, sync one slot.

    python -m examples.rl_grpo                  # demo LM, 3 tenants, 200 steps (about a minute)
    python -m examples.rl_grpo --tenants 1 --steps 120
    python -m examples.rl_grpo --gemma --steps 3 --prompts 1 --group 4   # Gemma 3 270M

The task is verifiable: a prompt is 6 random digits and the answer is one digit
given by the tenant's own rule (:data:`RULES`): tenant 0 repeats the last digit
(``"483920"`` -> ``"0"``), tenant 1 the first (``"4"``), tenant 2 answers the
last digit + 1 (``"1"``), tenant 3 the second-last (``"2"``). The tenants see the
same kind of prompts, so each slot must learn its own rule. The reward is 1 for
the exact answer and 0 otherwise (``--partial`` credits any other digit; with
0.25 the policy learns to answer with *a* digit, about 0.33 of reward, and stalls
there). Every step:

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

Before and after training each tenant answers the same held-out prompts greedily:
its exact-task accuracy (printed, and in ``--json``). ``lora_jax.debug.CompileCounter``
counts compilations after the first step: 0 (the adapters are arguments of every
jitted function, never constants). The curve of each tenant's exact accuracy over
the sampled groups is saved as ``<out>/rl_grpo_reward.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from examples.common.generation import Generator
from lora_jax.debug import CompileCounter

# Each tenant's rule: (name, the answer as a function of the prompt's digits).
RULES: tuple[tuple[str, Callable[[list[int]], int]], ...] = (
    ("repeat the last digit", lambda d: d[-1]),
    ("repeat the first digit", lambda d: d[0]),
    ("the last digit + 1", lambda d: (d[-1] + 1) % 10),
    ("repeat the second-last digit", lambda d: d[-2]),
)


def make_prompts(rng, rule: int, n: int, length: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs: ``length`` random digits and the one digit that
    ``RULES[rule]`` answers (``("48392", "2")`` for "repeat the last digit")."""
    out = []
    for _ in range(n):
        digits = [int(x) for x in rng.integers(0, 10, length)]
        out.append(("".join(map(str, digits)), str(RULES[rule][1](digits))))
    return out


def reward(completion: str, expected: str, partial: float = 0.0) -> float:
    """1 for the exact answer, ``partial`` for another digit, 0 otherwise.

    >>> reward("7", "7"), reward("3", "7"), reward("3", "7", partial=0.25), reward("x", "7")
    (1.0, 0.0, 0.25, 0.0)
    """
    if completion[: len(expected)] == expected:
        return 1.0
    return partial if completion[:1].isdigit() else 0.0


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


def plot(curves: np.ndarray, path: Path, title: str, labels: list[str]) -> bool:
    """Exact accuracy per step, one line per tenant; False where matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = np.arange(1, len(curves) + 1)
    w = min(5, len(curves))  # a 5-step moving average over the noisy per-step accuracy
    for t, curve in enumerate(curves.T):
        (line,) = ax.plot(steps, curve, lw=0.6, alpha=0.35)
        smooth = np.convolve(curve, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1.6, color=line.get_color(), label=labels[t])
    ax.axhline(0.1, color="gray", ls="--", lw=0.8, label="a random digit (0.1)")
    ax.set(xlabel="GRPO step", ylabel="exact accuracy of the sampled group", title=title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tenants", type=int, default=3, help=f"1 to {len(RULES)}, one rule each")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per tenant per step")
    ap.add_argument("--group", type=int, default=8, help="completions sampled per prompt")
    ap.add_argument("--prompt-units", type=int, default=6, help="digits in a prompt")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="2e-3 (demo LM), 5e-4 (Gemma)")
    ap.add_argument(
        "--partial", type=float, default=0.0, help="reward of a wrong digit (0: exact only)"
    )
    ap.add_argument("--beta", type=float, default=0.02, help="KL(policy || reference) weight")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--no-cache", action="store_true", help="pretrain the demo base afresh")
    ap.add_argument("--gemma", action="store_true", help="Gemma 3 270M as the base")
    ap.add_argument("--cache-dir", default=None, help="Gemma's converted-weights cache")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not 1 <= args.tenants <= len(RULES):
        ap.error(f"--tenants must be 1 to {len(RULES)} (one rule each)")
    if args.prompt_units < 2:
        ap.error("--prompt-units must be at least 2")
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
    sample = Generator(
        lambda b, s, i, t, **kw: lj.implicit(model.apply)(b, s, t, adapter_ids=i, **kw), model
    )
    answer_len = m["answer_tokens"](1)  # the answer is one digit
    width = -(-(m["max_prompt_tokens"](args.prompt_units) + answer_len) // 16) * 16
    step = make_train_step(model, opt, T, answer_len, args.beta)
    sync = jax.jit(lj.advanced.copy_slot, donate_argnums=0)

    def answers(stack_now, pairs, temperature, key):
        """Each pair's prompt answered by its tenant's slot: the decoded first characters."""
        requests = [m["encode"](p) for p, _ in pairs]
        gen = sample(
            (base, stack_now, jnp.asarray(ids)),
            requests,
            answer_len,
            temperature=temperature,
            key=key,
            stop_at_eos=False,
        )
        return requests, gen.tokens, [m["decode"](c)[:1] for c in gen.tokens]

    # Held-out prompts (as many rows as a step, so the same compiled shapes), answered
    # greedily before and after training: the exact-task accuracy of each tenant.
    eval_rng = np.random.default_rng(args.seed + 10_000)
    eval_pairs = [
        p for t in range(T) for p in make_prompts(eval_rng, t, rows_per_tenant, args.prompt_units)
    ]

    def greedy_accuracy(stack_now) -> np.ndarray:
        got = answers(stack_now, eval_pairs, 0.0, jax.random.key(0))[2]
        hits = np.array([g == e for g, (_, e) in zip(got, eval_pairs)], np.float32)
        return hits.reshape(T, -1).mean(1)

    slot_bytes = lj.advanced.slot_nbytes(stack)
    full_bytes = lj.advanced.tree_bytes(params)
    print(
        f"{T} tenant(s), {args.prompts} prompts x {args.group} samples each per step; "
        f"rank {args.rank}; a sync moves one slot: {slot_bytes:,} bytes per tenant vs "
        f"{full_bytes:,} for a full-weight sync ({100 * slot_bytes / full_bytes:.2f}%)"
    )
    for t in range(T):
        print(f"tenant {t}: {RULES[t][0]}")
    acc_start = greedy_accuracy(sampler_stack)
    print("greedy accuracy before training: " + " ".join(f"{a:.3f}" for a in acc_start))

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    curves, accs, kls = [], [], []
    counter = CompileCounter()
    for it in range(args.steps):
        if it == 1:
            counter.__enter__()  # everything has compiled once: count from here
        pairs = [
            p
            for t in range(T)
            for p in make_prompts(rng, t, args.prompts, args.prompt_units)
            for _ in range(args.group)
        ]
        key, sub = jax.random.split(key)
        requests, completions, got = answers(sampler_stack, pairs, 1.0, sub)
        rewards = np.array(
            [reward(g, e, args.partial) for g, (_, e) in zip(got, pairs)], np.float32
        )
        exact = np.array([g == e for g, (_, e) in zip(got, pairs)], np.float32)
        tokens = np.zeros((len(requests), width), np.int32)
        for r, (req, comp) in enumerate(zip(requests, completions)):
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
        accs.append(exact.reshape(T, -1).mean(1))
        kls.append(float(jnp.mean(kl)))
        if it % 10 == 0 or it == args.steps - 1:
            print(
                f"step {it:3d}: exact accuracy "
                + " ".join(f"{a:.3f}" for a in accs[-1])
                + "   reward "
                + " ".join(f"{r:.3f}" for r in curves[-1])
                + f"   KL(policy||ref) {kls[-1]:.4f}"
            )
    acc_end = greedy_accuracy(sampler_stack)  # same shapes: compiled before the count began
    compiles_after_warmup = 0
    if args.steps > 1:
        counter.__exit__(None, None, None)
        compiles_after_warmup = counter.count
    curves_arr, accs_arr = np.array(curves), np.array(accs)
    k = max(1, min(10, len(curves) // 4))
    first, last = accs_arr[:k].mean(0), accs_arr[-k:].mean(0)
    print(
        f"sampled exact accuracy, mean of the first {k} steps -> the last {k}: "
        + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(first, last))
    )
    print(
        "greedy accuracy on held-out prompts, before -> after: "
        + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(acc_start, acc_end))
    )
    print(f"compilations after the first step: {compiles_after_warmup}")
    print(
        f"sync bytes per step: {T * slot_bytes:,} ({T} slot(s)) vs full weights "
        f"{T * full_bytes:,}: {100 * slot_bytes / full_bytes:.2f}%"
    )
    png = args.out / "rl_grpo_reward.png"
    name = "Gemma 3 270M" if args.gemma else "demo byte LM"
    labels = [f"tenant {t}: {RULES[t][0]}" for t in range(T)]
    if plot(accs_arr, png, f"GRPO with LoRA on the {name}, {T} tenant{'s' * (T > 1)}", labels):
        print(f"accuracy curve: {png}")
    result = dict(
        tenants=T,
        rules=[RULES[t][0] for t in range(T)],
        steps=args.steps,
        greedy_accuracy_start=acc_start.tolist(),
        greedy_accuracy_end=acc_end.tolist(),
        accuracy_first=first.tolist(),
        accuracy_last=last.tolist(),
        accuracy=accs_arr.tolist(),
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
