"""Train-step speed of LoRA implementations on the reference workload.

One jit-compiled ``loss + grad + optax.adamw`` step per configuration, all in
one process: every configuration is compiled first, then they are timed
interleaved (round robin), and the median ms/step is quoted as ratios to full
fine-tuning and to the floor. See benchmarks/README.md.

    python -m benchmarks.train_step --json out.json [--memory]   # from the repository root

Configurations:

  full      all weights trainable, adamw over all of them
  floor     gradient w.r.t. the input embeddings only, all weights frozen (plain
            SGD on the embeddings, no optimizer state): the physical limit
  merge     model.apply(lora_jax.merge(base, delta), x), grads for the delta only
  lora_jax  lora_jax.implicit(model.apply)(base, delta, x): x@W + s(x@A)@B
  lora_jax_nf4 / lora_jax_int8
            the same over a quantized base (QLoRA): the 24 targeted kernels stored
            NF4 with double quantization (blocks of 64) / int8 per output channel,
            dequantized (in float32) where each meets its input
  lora_jax_bf16
            lora_jax over a bfloat16 base, as a user loading a bf16 checkpoint
            runs it: every weight bfloat16, so Flax computes in bfloat16 (the loss
            in float32); the LoRA factors and Adam stay float32
  lora_jax_nf4_bf16 / lora_jax_int8_bf16
            the bf16 base with its 24 targeted kernels quantized: dequantized to
            bfloat16, the same compute as lora_jax_bf16 (the QLoRA/LoRA ratio on
            the same base dtype)
  nnx_lora  Flax nnx.LoRALinear on the same architecture rebuilt in NNX
  qwix      qwix LoRA (intercepts dot_general) on the linen model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from benchmarks import harness, report
from benchmarks import workload as W
from benchmarks.rss import maxrss_mb, reset_peak_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `-m benchmarks.x` runs here
CONFIGS = (
    "full",
    "floor",
    "merge",
    "lora_jax",
    "lora_jax_dora",
    "lora_jax_rslora",
    "lora_jax_nf4",
    "lora_jax_int8",
    "lora_jax_bf16",
    "lora_jax_nf4_bf16",
    "lora_jax_int8_bf16",
    "nnx_lora",
    "qwix",
)
NF4 = dict(scheme="nf4", double_quant=True)
INT8 = dict(scheme="int8")
# name -> (dtype of every base weight, quantization of the 24 targeted kernels or None)
BASES = {
    "lora_jax_nf4": (jnp.float32, NF4),
    "lora_jax_int8": (jnp.float32, INT8),
    "lora_jax_bf16": (jnp.bfloat16, None),
    "lora_jax_nf4_bf16": (jnp.bfloat16, NF4),
    "lora_jax_int8_bf16": (jnp.bfloat16, INT8),
}


class Runner:
    """One configuration: a compiled step over a donated state.

    ``fn(*state, *consts) -> (*new_state, loss)``; ``state`` is donated.
    """

    def __init__(self, name, fn, state, consts, opt_state_bytes, note=""):
        self.name = name
        self.state = tuple(state)
        self.consts = tuple(consts)
        self.opt_state_bytes = int(opt_state_bytes)
        self.note = note
        n = len(self.state)
        t0 = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=tuple(range(n))).lower(*self.state, *self.consts)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.gflop = harness.gflop(self.compiled)
        self.xla_temp_mib = harness.xla_temp_mib(self.compiled)
        self.loss0 = None  # the loss of the first step: the model before any update
        self.steps = 0

    def step(self):
        out = self.compiled(*self.state, *self.consts)
        jax.block_until_ready(out)
        self.state = tuple(out[:-1])
        self.steps += 1
        if self.loss0 is None:
            self.loss0 = float(out[-1])
        self.last = out[-1]


def fresh(tree):
    """A copy with its own buffers (so donating it leaves the workload's intact)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def build_full(wl, copy=True):
    opt = wl.optimizer()
    params = fresh(wl.variables["params"]) if copy else wl.variables["params"]
    opt_state = opt.init(params)

    def step(params, opt_state, x, y):
        loss, g = jax.value_and_grad(lambda p: wl.loss({"params": p}, x, y))(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return Runner(
        "full",
        step,
        (params, opt_state),
        (wl.inputs, wl.targets),
        lora_jax.advanced.tree_bytes(opt_state),
    )


def build_floor(wl, copy=True):
    model, v = wl.model, wl.variables
    h0 = jax.jit(W.input_embeddings)(v, wl.inputs)

    def step(h, v, y):
        def loss_fn(h):
            return W.cross_entropy(model.apply(v, None, embeddings=h), y)

        loss, g = jax.value_and_grad(loss_fn)(h)
        return h - W.LR * g, loss  # SGD on the input embeddings: no optimizer state

    return Runner("floor", step, (h0,), (v, wl.targets), 0)


def _delta_runner(name, wl, apply_fn, note="", delta=None, base=None):
    opt = wl.optimizer()
    delta = fresh(wl.delta if delta is None else delta)
    opt_state = opt.init(delta)

    def step(delta, opt_state, base, x, y):
        loss, g = jax.value_and_grad(lambda d: W.cross_entropy(apply_fn(base, d, x), y))(delta)
        updates, opt_state = opt.update(g, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, loss

    base = wl.variables if base is None else base
    return Runner(
        name,
        step,
        (delta, opt_state),
        (base, wl.inputs, wl.targets),
        lora_jax.advanced.tree_bytes(opt_state),
        note,
    )


def build_merge(wl, copy=True):
    model = wl.model

    def apply_fn(base, delta, x):
        return model.apply(lora_jax.merge(base, delta), x)

    return _delta_runner("merge", wl, apply_fn)


def build_lora_jax(wl, copy=True, name="lora_jax", delta=None, base=None):
    if not hasattr(lora_jax, "implicit"):
        raise harness.Skip(
            "lora_jax.implicit is not in this lora_jax build yet; skipped "
            "(merge is NOT substituted for it)"
        )
    # A kernel use with no low-rank rule would be materialised (W + s A B) with a
    # LoraFallbackWarning: that would make this a merge benchmark, so say so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = _delta_runner(name, wl, lora_jax.implicit(wl.model.apply), delta=delta, base=base)
    fallbacks = sorted(
        {
            str(w.message).splitlines()[0]
            for w in caught
            if type(w.message).__name__ == "LoraFallbackWarning"
        }
    )
    if fallbacks:
        runner.note = "FALLBACK (kernel materialised): " + "; ".join(fallbacks)
    return runner


def build_lora_jax_dora(wl, copy=True):
    """DoRA on the same 24 kernels: magnitudes m = ||W||_c added to the delta."""
    return build_lora_jax(wl, copy, "lora_jax_dora", lora_jax.with_dora(wl.variables, wl.delta))


def build_lora_jax_rslora(wl, copy=True):
    """rsLoRA: the same factors scaled by alpha / sqrt(r)."""
    delta = jax.tree.map(
        lambda f: dataclasses.replace(f, rslora=True),
        wl.delta,
        is_leaf=lora_jax.advanced.is_factors,
    )
    return build_lora_jax(wl, copy, "lora_jax_rslora", delta)


def other_base(wl, name):
    """The workload's params as ``BASES[name]`` says: cast (bf16), and the 24 LoRA-targeted
    kernels quantized (NF4 + double quant / int8 per channel) from the cast weights."""
    dtype, quant = BASES[name]
    base = jax.tree.map(lambda x: x.astype(dtype), wl.variables)
    return base if quant is None else lora_jax.quantize(base, W.TARGETS, **quant)


def build_other_base(name):
    """The builder of ``lora_jax`` over ``other_base(wl, name)`` (the same delta)."""

    def build(wl, copy=True):
        return build_lora_jax(wl, copy, name, base=other_base(wl, name))

    return build


def same_dtype_lora(name: str) -> str | None:
    """The unquantized LoRA config over the same base dtype as ``name`` (None if not quantized)."""
    if name not in BASES or BASES[name][1] is None:
        return None
    return "lora_jax_bf16" if BASES[name][0] == jnp.bfloat16 else "lora_jax"


def base_kernel_bits(wl, name) -> float:
    """Stored bits per parameter of the 24 targeted kernels in ``name``'s base, scales included."""
    paths = [
        p
        for p, f in lora_jax.advanced.leaves_with_paths(
            wl.delta, is_leaf=lora_jax.advanced.is_factors
        )[0]
        if lora_jax.advanced.is_factors(f)
    ]
    base = other_base(wl, name) if name in BASES else wl.variables
    return lora_jax.advanced.kernel_bits(base, paths)


def build_nnx_lora(wl, copy=True):
    from flax import nnx

    d = wl.dims
    model = W.nnx_model(wl, lora_rank=d.rank, lora_alpha=d.alpha)
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    del model
    opt = wl.optimizer()
    opt_state = opt.init(lora_state)

    def step(lora_state, opt_state, rest, x, y):
        def loss_fn(ls):
            return W.cross_entropy(nnx.merge(graphdef, ls, rest)(x), y)

        loss, g = jax.value_and_grad(loss_fn)(lora_state)
        updates, opt_state = opt.update(g, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    n = lora_jax.count_params(lora_state)
    assert n == d.n_trainable(), (n, d.n_trainable())
    return Runner(
        "nnx_lora",
        step,
        (lora_state, opt_state),
        (rest, wl.inputs, wl.targets),
        lora_jax.advanced.tree_bytes(opt_state),
        note=f"nnx.LoRA has no alpha: s = alpha/r = {d.alpha / d.rank:g} folded into A's init",
    )


def _deep_merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(a[k], v) if isinstance(v, dict) and k in a else v
    return out


def _lora_only(tree):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _lora_only(v)
            if sub:
                out[k] = sub
        elif "_lora_" in k:
            out[k] = v
    return out


def build_qwix(wl, copy=True):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import qwix
    except Exception as e:  # noqa: BLE001
        raise harness.Skip(
            f"qwix is not importable ({type(e).__name__}: {e}); pip install -e '.[bench]'"
        ) from None
    d = wl.dims
    provider = qwix.LoraProvider(module_path=W.MODULE_TARGETS, rank=d.rank, alpha=d.alpha)
    lora_model = qwix.apply_lora_to_model(wl.model, provider)
    # qwix adds `<kernel>_lora_a` / `_lora_b` params next to each targeted
    # kernel. Take their shapes from an abstract init and fill them as qwix's
    # defaults do (A ~ he_uniform, B = 0) with NumPy; the base weights are
    # the workload's.
    shapes = _lora_only(jax.eval_shape(lora_model.init, jax.random.key(1), wl.inputs)["params"])
    rng = np.random.default_rng(2)

    def fill(path, leaf):
        if path[-1].key.endswith("_lora_b"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = np.sqrt(6.0 / leaf.shape[0])
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    lora = jax.tree_util.tree_map_with_path(fill, shapes)
    n = lora_jax.count_params(lora)
    assert n == d.n_trainable(), (n, d.n_trainable())
    opt = wl.optimizer()
    opt_state = opt.init(lora)

    def step(lora, opt_state, base, x, y):
        def loss_fn(lora):
            params = _deep_merge(base["params"], lora)
            return W.cross_entropy(lora_model.apply({"params": params}, x), y)

        loss, g = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(g, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    note = "" if qwix.__version__ == "0.1.8" else f"qwix {qwix.__version__}, not 0.1.8"
    return Runner(
        "qwix",
        step,
        (lora, opt_state),
        (wl.variables, wl.inputs, wl.targets),
        lora_jax.advanced.tree_bytes(opt_state),
        note,
    )


BUILDERS = {
    "full": build_full,
    "floor": build_floor,
    "merge": build_merge,
    "lora_jax": build_lora_jax,
    "lora_jax_dora": build_lora_jax_dora,
    "lora_jax_rslora": build_lora_jax_rslora,
    **{name: build_other_base(name) for name in BASES},
    "nnx_lora": build_nnx_lora,
    "qwix": build_qwix,
}


def child(args) -> None:
    """``--child NAME``: build one configuration, run it, print peak RSS as JSON.

    The first step (which compiles) runs before the peak is reset, so
    ``maxrss_mb`` is the peak while the remaining steps run, with the weights,
    the compiled program and the optimizer state resident; ``compile_peak_mb``
    is the peak up to then. ``live_arrays_mb`` is what the process's live JAX
    arrays hold while stepping (weights, delta, optimizer state, batch): unlike
    RSS it does not count pages the allocator kept after the dense weights a
    quantized config was built from were freed.
    """
    wl = W.build(small=args.small)
    out = {"name": args.child}
    runner = None
    if args.child != "none":
        try:
            runner = BUILDERS[args.child](wl, copy=False)
        except harness.Skip as e:
            print(json.dumps({"name": args.child, "skipped": str(e)}))
            return
        del wl
        runner.step()
    out["compile_peak_mb"] = maxrss_mb()
    out["peak_reset"] = reset_peak_rss()
    if runner is not None:
        for _ in range(args.memory_steps - 1):
            runner.step()
        out["loss_end"] = float(runner.last)
    out["live_arrays_mb"] = sum(a.nbytes for a in jax.live_arrays()) / 2**20
    out["maxrss_mb"] = maxrss_mb()
    print(json.dumps(out))


def measure_memory(names, args, log=print) -> tuple[dict, float | None]:
    """Peak RSS of each configuration in its own process; and of imports + weights alone."""
    res = {}
    for name in ["none", *names]:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--child",
            name,
            "--memory-steps",
            str(args.memory_steps),
        ] + (["--small"] if args.small else [])
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = (p.stdout.strip().splitlines() or [""])[-1]
        try:
            info = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"--child {name} failed (rc {p.returncode}):\n{p.stderr[-3000:]}"
            ) from None
        if "maxrss_mb" in info:
            res[name] = info
            log(
                f"  {name}: peak RSS {info['maxrss_mb']:.0f} MB while stepping, live arrays "
                f"{info['live_arrays_mb']:.1f} MiB"
                + (
                    ""
                    if info.get("peak_reset")
                    else " (could not reset the peak: includes compiling)"
                )
                + f", {info['compile_peak_mb']:.0f} MB up to the first step"
            )
    return res, res.pop("none", {}).get("maxrss_mb")


def update_vs_merge(runners, wl) -> dict | None:
    """How far lora_jax's delta is from merge-on-the-fly's after the same steps from the same
    delta: ``max |D_lora_jax - D_merge| / max |D_merge - D_0|`` over every factor (D_0: the
    initial delta). At step 0 B = 0 makes both losses equal whatever the backward does;
    after several Adam steps only the same gradients give the same delta."""
    a, b = runners.get("lora_jax"), runners.get("merge")
    if a is None or b is None:
        return None
    if a.steps != b.steps:
        raise RuntimeError(f"lora_jax ran {a.steps} steps, merge {b.steps}")
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]  # noqa: E731
    got, want, init = leaves(a.state[0]), leaves(b.state[0]), leaves(wl.delta)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    moved = max(float(np.abs(w - i).max()) for w, i in zip(want, init))
    return {
        "steps": a.steps,
        "max_abs_diff": diff,
        "max_abs_update": moved,
        "rel_diff": diff / moved if moved else float("inf"),
    }


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
    ap.add_argument(
        "--steps", type=int, default=3, help="timed steps per configuration per round (default 3)"
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    ap.add_argument("--small", action="store_true", help="tiny dims (for tests)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak RSS of each configuration in its own process",
    )
    ap.add_argument("--memory-steps", type=int, default=30)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*VariableState.*")  # qwix on flax 0.12

    if args.child:
        return child(args)

    names, wl, run_meta = harness.start(ap, args, CONFIGS, "steps")
    d = wl.dims
    print(
        f"workload: {'SMALL' if args.small else 'reference'} {d}; "
        f"{lora_jax.count_params(wl.variables):,} params, "
        f"{lora_jax.count_params(wl.delta):,} LoRA params"
    )
    print(
        f"{run_meta['device']} ({run_meta['cpu']}, {run_meta['cores']} cores), "
        f"jax {jax.__version__}, flax {run_meta['versions']['flax']}"
    )

    runners, skipped = {}, {}
    for name in names:
        try:
            r = BUILDERS[name](wl)
        except harness.Skip as e:
            skipped[name] = str(e)
            print(f"skip {name}: {e}")
            continue
        runners[name] = r
        print(
            f"compiled {name}: {r.compile_s:.1f} s, {r.gflop:.4g} GFLOP/step"
            + (f"  ({r.note})" if r.note else "")
        )

    samples = harness.time_interleaved(
        {n: r.step for n, r in runners.items()}, args.rounds, args.steps, args.warmup
    )
    results = {}
    for name, r in runners.items():
        results[name] = {
            **harness.summary_stats(samples[name]),
            "compile_s": r.compile_s,
            "gflop": r.gflop,
            "opt_state_bytes": r.opt_state_bytes,
            "xla_temp_mib": r.xla_temp_mib,
            "loss0": r.loss0,
            "loss_end": float(r.last),
            "base_kernel_bits": base_kernel_bits(wl, name),
        }
        if r.note:
            results[name]["note"] = r.note
    agreement = update_vs_merge(runners, wl)
    if agreement is not None:
        results["lora_jax"]["update_vs_merge"] = agreement
        print(
            f"lora_jax vs merge after {agreement['steps']} steps: max |delta diff| "
            f"{agreement['max_abs_diff']:.3g} = {agreement['rel_diff']:.3g} of the largest update"
        )
    full = results.get("full", {}).get("ms")
    floor = results.get("floor", {}).get("ms")
    for name, res in results.items():
        res["x_full"] = report.ratio(res["ms"], full)
        res["x_floor"] = report.ratio(res["ms"], floor)
        lora = same_dtype_lora(name)
        if lora in results:  # QLoRA step / LoRA step over the same base dtype
            res["x_lora_same_dtype"] = report.ratio(res["ms"], results[lora]["ms"])

    baseline = None
    if args.memory:
        print(
            f"peak resident memory while running steps 2-{args.memory_steps} (after the "
            "compiling first step), one process per config:"
        )
        rss, baseline = measure_memory(list(runners), args)
        floor_rss = rss.get("floor", {}).get("maxrss_mb")
        for name, info in rss.items():
            results[name]["peak_rss_mb"] = info["maxrss_mb"]
            results[name]["live_arrays_mb"] = info["live_arrays_mb"]
            results[name]["compile_peak_rss_mb"] = info["compile_peak_mb"]
            results[name]["rss_peak_reset"] = info["peak_reset"]
            results[name]["x_floor_rss"] = report.ratio(info["maxrss_mb"], floor_rss)
    run_meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    run_meta["baseline_rss_mb"] = baseline

    f = lambda x, fmt: (
        "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
    )  # noqa: E731
    header = [
        "config",
        "ms/step",
        "x full",
        "x floor",
        "x LoRA same dtype",
        "compile s",
        "GFLOP/step",
        "opt-state bytes",
        "XLA temp MiB",
        "kernel bits",
    ]
    if args.memory:
        header += ["peak RSS MB", "x floor RSS"]
    rows = []
    for name, res in results.items():
        row = [
            name,
            f(res["ms"], ".1f"),
            f(res["x_full"], ".2f"),
            f(res["x_floor"], ".2f"),
            f(res.get("x_lora_same_dtype"), ".2f"),
            f(res["compile_s"], ".1f"),
            f(res["gflop"], ".4g"),
            f"{res['opt_state_bytes']:,}",
            f(res["xla_temp_mib"], ".1f"),
            f(res["base_kernel_bits"], ".3f"),
        ]
        if args.memory:
            row += [f(res.get("peak_rss_mb"), ".0f"), f(res.get("x_floor_rss"), ".2f")]
        rows.append(row)
    print()
    print(report.fmt_table(header, rows))
    report.print_skipped(skipped)
    if args.memory and baseline is not None:
        print(f"(imports + weights alone, no step: {baseline:.0f} MB)")

    if args.json:
        report.write_json(args.json, results, skipped, run_meta)
    return results


if __name__ == "__main__":
    main()
