"""Forward-only (inference) speed: base, merged and unmerged implicit LoRA.

    python -m benchmarks.inference --json inference.json   # from the repository root

Configurations (the reference workload's forward pass on one batch):

  base      jit(model.apply)(base, x): the dense model
  merged    the same jitted function on lora_jax.merge(base, delta): the lowered
            program text is checked to be identical to the base's
  implicit  jit(lora_jax.implicit(model.apply))(base, delta, x): x@W + s(x@A)@B,
            the delta kept separate (skipped with a note if lora_jax has no
            ``implicit``)

The delta has random B (a "trained" delta), so the merged model differs from
the base; the implicit output is checked against the merged one.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from benchmarks import harness, report
from benchmarks import workload as W

CONFIGS = ("base", "merged", "implicit")


class Fwd:
    def __init__(self, jitted, args):
        self.args = args
        t0 = time.perf_counter()
        self.lowered = jitted.lower(*args)
        self.compiled = self.lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.gflop = harness.gflop(self.compiled)
        self.note = ""

    def step(self):
        self.out = self.compiled(*self.args)
        jax.block_until_ready(self.out)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (base is always run)",
    )
    ap.add_argument("--rounds", type=int, default=25, help="round-robin rounds (default 25)")
    ap.add_argument(
        "--steps", type=int, default=2, help="timed forwards per config per round (default 2)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny dims (for tests)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    names, wl, run_meta = harness.start(ap, args, CONFIGS, "forwards")
    if "base" not in names:
        names.insert(0, "base")
    base, x = wl.variables, wl.inputs
    delta = W.trained_like(wl.delta)
    print(
        f"workload: {'SMALL' if args.small else 'reference'} {wl.dims}; forward of "
        f"{x.shape[0]}x{x.shape[1]} tokens; {run_meta['device']}, {run_meta['cores']} cores"
    )

    fwd = jax.jit(lambda v, x: wl.model.apply(v, x))
    runs, skipped = {}, {}
    runs["base"] = Fwd(fwd, (base, x))
    if "merged" in names:
        merged = jax.jit(lora_jax.merge)(base, delta)
        r = runs["merged"] = Fwd(fwd, (merged, x))
        r.same_program = r.lowered.as_text() == runs["base"].lowered.as_text()
        if not r.same_program:
            r.note = "PROGRAM DIFFERS from the base's"
    if "implicit" in names:
        if hasattr(lora_jax, "implicit"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runs["implicit"] = Fwd(jax.jit(lora_jax.implicit(wl.model.apply)), (base, delta, x))
            fallbacks = sorted(
                {
                    str(w.message).splitlines()[0]
                    for w in caught
                    if type(w.message).__name__ == "LoraFallbackWarning"
                }
            )
            if fallbacks:
                runs["implicit"].note = "FALLBACK (kernel materialised): " + "; ".join(fallbacks)
        else:
            skipped["implicit"] = (
                "lora_jax.implicit is not in this lora_jax build yet; "
                "skipped (merge is NOT substituted for it)"
            )
            print(f"skip implicit: {skipped['implicit']}")
    for name, r in runs.items():
        print(f"compiled {name}: {r.compile_s:.1f} s, {r.gflop:.4g} GFLOP")

    samples = harness.time_interleaved(
        {n: r.step for n, r in runs.items()}, args.rounds, args.steps, args.warmup
    )
    results = {}
    base_ms = float(np.median(samples["base"]))
    ref = runs["merged"].out if "merged" in runs else None
    base_out = runs["base"].out
    for name, r in runs.items():
        res = {**harness.summary_stats(samples[name]), "compile_s": r.compile_s, "gflop": r.gflop}
        res["x_base"] = report.ratio(res["ms"], base_ms)
        if name == "merged":
            res["same_program"] = r.same_program
            res["max_abs_diff_vs_base"] = float(jnp.max(jnp.abs(r.out - base_out)))
        if name == "implicit" and ref is not None:
            res["max_abs_diff_vs_merged"] = float(jnp.max(jnp.abs(r.out - ref)))
        if r.note:
            res["note"] = r.note
        results[name] = res
    run_meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    f = lambda v, fmt: (
        "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    )  # noqa: E731
    header = ["config", "ms/forward", "x base", "compile s", "GFLOP", "check"]
    rows = []
    for name, res in results.items():
        check = ""
        if "same_program" in res:
            check = "same program as base" if res["same_program"] else "PROGRAM DIFFERS"
        if "max_abs_diff_vs_merged" in res:
            check = f"max |implicit - merged| = {res['max_abs_diff_vs_merged']:.1e}"
        rows.append(
            [
                name,
                f(res["ms"], ".2f"),
                f(res["x_base"], ".2f"),
                f(res["compile_s"], ".1f"),
                f(res["gflop"], ".4g"),
                check + (f" ({res['note']})" if "note" in res else ""),
            ]
        )
    print()
    print(report.fmt_table(header, rows, left=(0, 5)))
    report.print_skipped(skipped)
    if args.json:
        report.write_json(args.json, results, skipped, run_meta)
    return results


if __name__ == "__main__":
    main()
