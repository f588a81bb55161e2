"""Serving many adapters over one base: throughput of mixed-adapter batches.

    .venv/bin/python benchmarks/serving.py --json serving.json

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
Decode figures (tokens/s with a KV cache: merged vs unmerged vs mixed) are in
``decode`` when the demo LM with a KV cache is available.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lora_jax  # noqa: E402
import workload as W  # noqa: E402
from lora_jax.advanced import CompileCounter  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=10, help="round-robin rounds (default 10)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny dims (for tests)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    names, wl, run_meta = W.start(ap, args, CONFIGS, "forwards")
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
    print(f"workload: {'SMALL' if args.small else 'reference'} {d}; {n} adapters, batch "
          f"{BATCH} x {d.seq} tokens; {run_meta['device']}, {run_meta['cores']} cores")

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
        runs["loop16"] = Run(lambda: [serve(base, deltas[i], x[r]) for i, r in enumerate(rows)
                                      if r.size], tokens)
    forms = formulations(rng, n, BATCH, d.seq, d.d_model, d.d_mlp, d.rank)
    timed = {**runs, **{f"branch_{k}": v for k, v in forms.items()}}
    samples = W.time_interleaved({k: r.step for k, r in timed.items()}, args.rounds, args.steps,
                                 args.warmup)

    # correctness: every mixed row equals its adapter merged alone
    check = {}
    if "mixed16" in runs:
        mixed = np.asarray(runs["mixed16"].out)
        errs = []
        for e in (0, BATCH - 1):
            want = np.asarray(apply(lora_jax.merge(base, deltas[int(ids[e])]), x[e:e + 1]))[0]
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
        st = W.summary_stats(samples[name])
        results[name] = {**st, "tokens_per_s": r.tokens / (st["ms"] / 1e3)}
    branch = {k: W.summary_stats(samples[f"branch_{k}"]) for k in forms}
    ratios = {
        "mixed16_over_merged": W.ratio(results.get("mixed16", {}).get("tokens_per_s"),
                                       results.get("merged", {}).get("tokens_per_s")),
        "mixed16_over_loop16": W.ratio(results.get("mixed16", {}).get("tokens_per_s"),
                                       results.get("loop16", {}).get("tokens_per_s")),
        "unmerged_over_merged": W.ratio(results.get("unmerged", {}).get("tokens_per_s"),
                                        results.get("merged", {}).get("tokens_per_s")),
    }
    rows = [[k, f"{v['ms']:.2f}", f"{v['tokens_per_s']:.0f}"] for k, v in results.items()]
    print()
    print(W.fmt_table(["config", "ms/forward", "tokens/s"], rows))
    print()
    print(W.fmt_table(["mixed branch (one fc1 kernel)", "ms"],
                      [[k, f"{v['ms']:.3f}"] for k, v in branch.items()]))
    print()
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else format(v, '.2f')}")
    print(f"compilations_on_swap: {compilations}")
    for k, v in check.items():
        print(f"{k}: {v:.1e}")
    out = {"configs": results, "formulations": branch, "ratios": ratios,
           "compilations_on_swap": compilations, "check": check, "meta": run_meta}
    decode = decode_figures(args, wl) if "decode_figures" in globals() else None
    if decode is not None:
        out["decode"] = decode
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
