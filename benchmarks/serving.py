"""Serving many adapters over one base: throughput of mixed-adapter batches.

    python -m benchmarks.serving --json serving.json   # from the repository root

The reference workload's model (``workload.py``) at batch 16 (sequence 128),
16 adapters of rank 8 (random B, so each differs from the base), all timed
interleaved in one process:

  merged      jit(model.apply) on merge(base, adapter 0): one adapter, the dense model
  unmerged    jit(implicit(model.apply))(base, adapter 0, x): one adapter, not merged
  mixed16     jit(implicit(model.apply))(base, stack of 16, x, adapter_ids=0..15):
              16 distinct adapters in one batch, one program
  loop16      each adapter's rows served separately (PEFT's way): 16 calls of the
              unmerged forward on one row each

``formulations`` times three ways to compute the mixed low-rank branch of one
fc1-sized kernel (x (16, 128, 512), factors of rank 8 into 2048), same numbers:
``gather`` (each example's factors gathered, batched matmuls: what lora_jax
does), ``onehot`` (x @ A_n for all 16 adapters, weighted by a one-hot of the
ids) and ``ragged`` (``lax.ragged_dot`` over the tokens sorted by adapter).

``compilations_on_swap`` counts XLA compilations of the serving function
after a new adapter (another rank and alpha) is loaded into a slot.
``decode``: decode tokens/s with a KV cache (``examples/common/generation.py``'s
jitted prefill + decode loop) on the demo LM (``examples/common/pretrained.py``, random
weights; the reference workload has no cache), 16 prompts: ``merged`` (one
adapter), ``unmerged`` (one adapter, implicit), ``mixed16`` (16 adapters, one
batch) and ``loop16`` (each adapter's prompt decoded separately).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lora_jax
from benchmarks import harness, report
from benchmarks import workload as W
from lora_jax.debug import CompileCounter

CONFIGS = ("merged", "unmerged", "mixed16", "loop16")
N_ADAPTERS = 16
BATCH = 16


class Run:
    """A compiled step: ``fn()`` runs it, blocking until the output is ready."""

    def __init__(self, fn, tokens_per_step: int):
        self.fn = fn
        self.tokens = tokens_per_step
        self.out = None

    def step(self):
        self.out = jax.block_until_ready(self.fn())


def adapters(wl, n: int):
    """``n`` distinct "trained" adapters of the workload (random B, different seeds)."""
    return [W.trained_like(wl.delta, seed=100 + i) for i in range(n)]


def formulations(rng, n: int, batch: int, seq: int, d_in: int, d_out: int, rank: int):
    """The mixed low-rank branch of one kernel three ways; returns {name: callable}."""
    x = jnp.asarray(rng.standard_normal((batch, seq, d_in)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((n, d_in, rank)) / np.sqrt(d_in), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, rank, d_out)), jnp.float32)
    s = jnp.full((n,), 2.0, jnp.float32)
    ids = jnp.asarray(rng.permutation(batch) % n, jnp.int32)

    @jax.jit
    def gather(x, a, b, s, ids):
        u = jnp.matmul(x, a[ids]) * s[ids][:, None, None]
        return jnp.matmul(u, b[ids])

    @jax.jit
    def onehot(x, a, b, s, ids):
        hot = jax.nn.one_hot(ids, n, dtype=x.dtype) * s
        u = jnp.einsum("btk,nkr,bn->btnr", x, a, hot)
        return jnp.einsum("btnr,nrm->btm", u, b)

    @jax.jit
    def ragged(x, a, b, s, ids):
        order = jnp.argsort(ids)
        tokens = x[order].reshape(-1, d_in)
        sizes = (jnp.bincount(ids, length=n) * seq).astype(jnp.int32)
        u = lax.ragged_dot(tokens, a, sizes)
        u = u * jnp.repeat(s[ids[order]], seq, total_repeat_length=batch * seq)[:, None]
        y = lax.ragged_dot(u, b, sizes).reshape(batch, seq, d_out)
        return jnp.zeros_like(y).at[order].set(y)

    args = (x, a, b, s, ids)
    fns = {"gather": gather, "onehot": onehot, "ragged": ragged}
    ref = np.asarray(gather(*args))
    for name, fn in fns.items():
        err = float(np.abs(np.asarray(fn(*args)) - ref).max() / np.abs(ref).max())
        assert err < 1e-4, (name, err)
    return {name: Run(lambda fn=fn: fn(*args), batch * seq) for name, fn in fns.items()}


def decode_figures(args) -> dict:
    """Decode tokens/s of the demo LM with a KV cache (see the module docstring)."""
    from examples.common.generation import Generator  # noqa: PLC0415
    from examples.common.pretrained import MODEL  # noqa: PLC0415

    n, new_tokens, rounds = N_ADAPTERS, (4 if args.small else 32), max(1, args.rounds // 3)
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    cfg = lora_jax.LoraConfig(targets=r".*/(q|k|v|out|fc1|fc2)/kernel", rank=8, alpha=16.0)
    base, delta = lora_jax.init_lora(jax.random.key(1), params, cfg)
    deltas = [W.trained_like(delta, seed=200 + i) for i in range(n)]
    stack = lora_jax.stack_adapters(deltas)
    ids = jnp.arange(n, dtype=jnp.int32)
    prompts = [list(np.random.default_rng(i).integers(1, 256, 12)) for i in range(n)]
    mixed_apply = lambda b, s, i, t, **kw: lora_jax.implicit(MODEL.apply)(  # noqa: E731
        b, s, t, adapter_ids=i, **kw
    )
    plain, lora, mixed = (
        Generator(MODEL.apply, MODEL),
        Generator(lora_jax.implicit(MODEL.apply), MODEL),
        Generator(mixed_apply, MODEL),
    )
    merged = lora_jax.merge(base, deltas[0])
    runs = {
        "merged": lambda: [plain((merged,), prompts, new_tokens, stop_at_eos=False)],
        "unmerged": lambda: [lora((base, deltas[0]), prompts, new_tokens, stop_at_eos=False)],
        "mixed16": lambda: [mixed((base, stack, ids), prompts, new_tokens, stop_at_eos=False)],
        "loop16": lambda: [
            lora((base, deltas[i]), prompts[i : i + 1], new_tokens, stop_at_eos=False)
            for i in range(n)
        ],
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    for r in range(rounds + 1):  # round 0 compiles
        for name, run in runs.items():
            gens = run()
            outs[name] = gens
            steps = sum(g.batch * g.decode_steps for g in gens)
            if r:
                rates[name].append(steps / sum(g.decode_s for g in gens))
    mixed_tokens = outs["mixed16"][0].tokens
    loop_tokens = [g.tokens[0] for g in outs["loop16"]]
    result = {k: {"tokens_per_s": float(np.median(v))} for k, v in rates.items()}
    result["mixed16_equals_loop16_tokens"] = mixed_tokens == loop_tokens
    print()
    print(
        report.fmt_table(
            ["decode (demo LM, KV cache, 16 prompts)", "tokens/s"],
            [[k, f"{v['tokens_per_s']:.0f}"] for k, v in result.items() if isinstance(v, dict)],
        )
    )
    print(f"mixed16 tokens == each adapter decoded alone: {result['mixed16_equals_loop16_tokens']}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)}",
    )
    ap.add_argument("--rounds", type=int, default=10, help="round-robin rounds (default 10)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny dims (for tests)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    names, wl, run_meta = harness.start(ap, args, CONFIGS, "forwards")
    d = wl.dims
    n = N_ADAPTERS
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, d.vocab, (BATCH, d.seq)), jnp.int32)
    ids = jnp.asarray(np.arange(BATCH) % n, jnp.int32)
    base = wl.variables
    deltas = adapters(wl, n)
    stack = lora_jax.stack_adapters(deltas)
    apply = jax.jit(wl.model.apply)
    serve = jax.jit(lora_jax.implicit(wl.model.apply, strict=True))
    tokens = BATCH * d.seq
    print(
        f"workload: {'SMALL' if args.small else 'reference'} {d}; {n} adapters, batch "
        f"{BATCH} x {d.seq} tokens; {run_meta['device']}, {run_meta['cores']} cores"
    )

    merged = jax.jit(lora_jax.merge)(base, deltas[0])
    runs = {}
    if "merged" in names:
        runs["merged"] = Run(lambda: apply(merged, x), tokens)
    if "unmerged" in names:
        runs["unmerged"] = Run(lambda: serve(base, deltas[0], x), tokens)
    if "mixed16" in names:
        runs["mixed16"] = Run(lambda: serve(base, stack, x, adapter_ids=ids), tokens)
    if "loop16" in names:
        rows = [np.flatnonzero(np.asarray(ids) == i) for i in range(n)]
        runs["loop16"] = Run(
            lambda: [serve(base, deltas[i], x[r]) for i, r in enumerate(rows) if r.size], tokens
        )
    forms = formulations(rng, n, BATCH, d.seq, d.d_model, d.d_mlp, d.rank)
    timed = {**runs, **{f"branch_{k}": v for k, v in forms.items()}}
    samples = harness.time_interleaved(
        {k: r.step for k, r in timed.items()}, args.rounds, args.steps, args.warmup
    )

    # correctness: every mixed row equals its adapter merged alone
    check = {}
    if "mixed16" in runs:
        mixed = np.asarray(runs["mixed16"].out)
        errs = []
        for e in (0, BATCH - 1):
            want = np.asarray(apply(lora_jax.merge(base, deltas[int(ids[e])]), x[e : e + 1]))[0]
            errs.append(float(np.abs(mixed[e] - want).max() / np.abs(want).max()))
        check["mixed16_rel_err_vs_merged"] = max(errs)

    # hot swap: a rank-4, alpha-5 adapter into slot 3, twice; the serving function must not
    # compile again (set_adapter's own small update programs are compiled before counting)
    small = lora_jax.LoraConfig(targets=W.TARGETS, rank=max(1, d.rank // 2), alpha=5.0)
    new = W.trained_like(lora_jax.init_lora(jax.random.key(7), base, small)[1], seed=7)
    jax.block_until_ready(lora_jax.set_adapter(stack, 3, new))
    jax.block_until_ready(serve(base, stack, x, adapter_ids=ids))
    with CompileCounter() as counter:
        for slot in (3, 5):
            swapped = lora_jax.set_adapter(stack, slot, new)
            jax.block_until_ready(serve(base, swapped, x, adapter_ids=ids))
    compilations = counter.count

    results = {}
    for name, r in runs.items():
        st = harness.summary_stats(samples[name])
        results[name] = {**st, "tokens_per_s": r.tokens / (st["ms"] / 1e3)}
    branch = {k: harness.summary_stats(samples[f"branch_{k}"]) for k in forms}
    ratios = {
        "mixed16_over_merged": report.ratio(
            results.get("mixed16", {}).get("tokens_per_s"),
            results.get("merged", {}).get("tokens_per_s"),
        ),
        "mixed16_over_loop16": report.ratio(
            results.get("mixed16", {}).get("tokens_per_s"),
            results.get("loop16", {}).get("tokens_per_s"),
        ),
        "unmerged_over_merged": report.ratio(
            results.get("unmerged", {}).get("tokens_per_s"),
            results.get("merged", {}).get("tokens_per_s"),
        ),
    }
    rows = [[k, f"{v['ms']:.2f}", f"{v['tokens_per_s']:.0f}"] for k, v in results.items()]
    print()
    print(report.fmt_table(["config", "ms/forward", "tokens/s"], rows))
    print()
    print(
        report.fmt_table(
            ["mixed branch (one fc1 kernel)", "ms"],
            [[k, f"{v['ms']:.3f}"] for k, v in branch.items()],
        )
    )
    print()
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else format(v, '.2f')}")
    print(f"compilations_on_swap: {compilations}")
    for k, v in check.items():
        print(f"{k}: {v:.1e}")
    out = {
        "configs": results,
        "formulations": branch,
        "ratios": ratios,
        "compilations_on_swap": compilations,
        "check": check,
        "meta": run_meta,
    }
    out["decode"] = decode_figures(args)
    if args.json:
        report.dump_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
