"""Train-step speed on a real pretrained model: Gemma 3 270M (examples/gemma3), float32, CPU.

    python -m benchmarks.gemma3_step [--seqs 64,128] [--rounds 10] [--memory] [--json out.json]

Batch 1, sequence T, next-token cross-entropy on the last 32 positions only
(the 262k-vocab output head runs on those 32 rows), one jit-compiled
``loss + grad + update`` step per configuration, the params always jit
arguments. Every configuration is compiled first (compile time reported),
then timed interleaved (round robin, ``block_until_ready``), and the median
is quoted as ratios to the floor and to full fine-tuning:

  floor     gradient w.r.t. the input embeddings only, every weight frozen
            (plain SGD on the embeddings): the activation backward alone
  lora_jax  lora_jax.implicit(model.apply)(base, delta, x), grads for the delta, adamw
  merge     model.apply(lora_jax.merge(base, delta), x), grads for the delta, adamw
  full      every weight trainable, adamw over all 268M of them

LoRA: rank 8 on q/k/v/o/gate/up/down of all 18 layers (1.9M parameters).
``--memory`` measures each configuration's peak RSS in a child process of its
own (load, compile, a few steps). Decode throughput (batch 1, greedy, KV
cache) of the merged params vs the unmerged ``implicit`` model closes the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from benchmarks.report import dump_json
from benchmarks.rss import current_rss_mb, maxrss_mb, reset_peak_rss
from examples.common import generation as gg
from examples.common.lm import cross_entropy
from examples.gemma3 import gguf_loader as gl
from examples.gemma3 import model as gm

ROOT = Path(__file__).resolve().parent.parent  # `-m benchmarks.gemma3_step` runs here

CONFIGS = ("floor", "lora_jax", "merge", "full")
LOSS_POSITIONS = 32


class Setup:
    def __init__(self, seq: int, rank: int = 8):
        cfg, params, _ = gl.load()
        self.params = jax.tree.map(jnp.asarray, params)
        self.model = gm.Gemma3(cfg)
        rng = np.random.default_rng(0)
        ids = rng.integers(3, 20_000, size=(1, seq + 1)).astype(np.int32)
        self.x = jnp.asarray(ids[:, :seq])
        self.y = jnp.asarray(ids[:, seq + 1 - LOSS_POSITIONS :])
        self.config = lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=rank, alpha=2 * rank)


def build(name: str, s: Setup):
    """``(jitted step, state tuple (donated), consts tuple)``; ``step(*state, *consts) -> (*state, loss)``."""
    model, opt = s.model, optax.adamw(1e-4)
    if name == "full":
        params = jax.tree.map(jnp.copy, s.params)

        def step(params, opt_state, x, y):
            loss, g = jax.value_and_grad(
                lambda p: cross_entropy(model.apply(p, x, last_k=LOSS_POSITIONS)[0], y)
            )(params)
            updates, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1)), (params, opt.init(params)), (s.x, s.y)
    if name == "floor":
        h0 = jnp.take(s.params["params"]["embed_tokens"]["embedding"], s.x, axis=0)

        def step(h, params, x, y):
            loss, g = jax.value_and_grad(
                lambda h: cross_entropy(
                    model.apply(params, x, input_embeds=h, last_k=LOSS_POSITIONS)[0], y
                )
            )(h)
            return h - 1e-3 * g, loss

        return jax.jit(step, donate_argnums=(0,)), (h0,), (s.params, s.x, s.y)
    base, delta = lj.init_lora(jax.random.key(1), s.params, s.config)
    if name == "lora_jax":
        apply = lj.implicit(model.apply, strict=True)
    elif name == "merge":

        def apply(base, delta, x, **kw):
            return model.apply(lj.merge(base, delta), x, **kw)
    else:
        raise ValueError(name)

    def step(delta, opt_state, base, x, y):
        loss, g = jax.value_and_grad(
            lambda d: cross_entropy(apply(base, d, x, last_k=LOSS_POSITIONS)[0], y)
        )(delta)
        updates, opt_state = opt.update(g, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), (delta, opt.init(delta)), (base, s.x, s.y)


class Runner:
    def __init__(self, name, s: Setup):
        self.name = name
        fn, self.state, self.consts = build(name, s)
        t0 = time.perf_counter()
        self.compiled = fn.lower(*self.state, *self.consts).compile()
        self.compile_s = time.perf_counter() - t0
        self.times = []
        self.loss0 = None

    def step(self) -> float:
        t0 = time.perf_counter()
        *state, loss = self.compiled(*self.state, *self.consts)
        loss = jax.block_until_ready(loss)
        dt = time.perf_counter() - t0
        self.state = tuple(state)
        if self.loss0 is None:
            self.loss0 = float(loss)
        return dt


def child(name: str, seq: int, steps: int) -> None:
    """``--child NAME``: one configuration alone; prints its RSS figures as JSON.

    ``loaded_mb``: the weights loaded (float32, 1 GiB); ``compile_peak_mb``: the peak while
    building and compiling the step; ``maxrss_mb``: the peak while ``steps`` steps run
    (counted from after the compile, so it measures the step, not XLA's compiler).
    """
    s = Setup(seq)
    reset_peak_rss()
    out = {"name": name, "loaded_mb": current_rss_mb()}
    r = Runner(name, s)
    out["compile_peak_mb"] = maxrss_mb()
    out["reset"] = reset_peak_rss()
    for _ in range(steps):
        r.step()
    out.update(maxrss_mb=maxrss_mb(), compile_s=r.compile_s)
    print(json.dumps(out))


def measure_memory(seq: int, steps: int = 3) -> dict:
    out = {}
    for name in CONFIGS:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.gemma3_step",
                "--child",
                name,
                "--seqs",
                str(seq),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"  memory child {name} failed:\n{proc.stderr[-2000:]}")
            continue
        info = json.loads(lines[-1])
        out[name] = info["maxrss_mb"]
        print(
            f"  RSS {name:9s} (own process): weights loaded {info['loaded_mb']:6.0f} MB, "
            f"peak while compiling {info['compile_peak_mb']:6.0f} MB, peak over {steps} "
            f"steps {info['maxrss_mb']:6.0f} MB"
        )
    return out


def decode_speed(rounds: int = 5, prompt_len: int = 16, new_tokens: int = 32) -> dict:
    cfg, params, _ = gl.load()
    params = jax.tree.map(jnp.asarray, params)
    model = gm.Gemma3(cfg)
    base, delta = lj.init_lora(
        jax.random.key(1), params, lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=8, alpha=16)
    )
    leaves, tdef = jax.tree.flatten(delta)
    rng = np.random.default_rng(0)
    delta = jax.tree.unflatten(
        tdef, [x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    )
    merged = lj.merge(base, delta)
    prompt = [[2] + list(rng.integers(3, 20_000, prompt_len - 1))]
    gens = {
        "merged": (gg.Generator(model.apply, model), (merged,)),
        "implicit": (gg.Generator(lj.implicit(model.apply, strict=True), model), (base, delta)),
    }
    speeds = {k: [] for k in gens}
    for g, p in gens.values():
        g(p, prompt, new_tokens, stop_at_eos=False)  # compile
    for _ in range(rounds):
        for k, (g, p) in gens.items():
            speeds[k].append(g(p, prompt, new_tokens, stop_at_eos=False).decode_tokens_per_s)
    return {k: float(np.median(v)) for k, v in speeds.items()}


def time_configs(seq: int, names, args, mem: dict) -> dict:
    """Compiles every configuration, times them interleaved, prints the table; returns the results."""
    s = Setup(seq)
    runners = []
    for name in names:
        r = Runner(name, s)
        print(f"  compiled {name:9s} in {r.compile_s:5.1f} s")
        runners.append(r)
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    for _ in range(args.rounds):
        for r in runners:
            r.times.append(r.step())
    med = {r.name: float(np.median(r.times)) for r in runners}
    floor, full = med.get("floor"), med.get("full")
    print(
        f"\nsequence {seq} (medians of {args.rounds} interleaved steps; process peak RSS "
        f"{maxrss_mb():.0f} MB; load {os.getloadavg()[0]:.1f})"
    )
    print(
        "| train step | s/step | x floor | x full | compile s | peak RSS MB over steps (own process) | loss at step 0 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runners:
        xf = f"{med[r.name] / floor:.2f}" if floor else "-"
        xu = f"{med[r.name] / full:.2f}" if full else "-"
        m = f"{mem[r.name]:.0f}" if r.name in mem else "-"
        print(
            f"| {r.name} | {med[r.name]:.3f} | {xf} | {xu} | {r.compile_s:.1f} | {m} | {r.loss0:.4f} |"
        )
    return {
        r.name: {
            "median_s": med[r.name],
            "compile_s": r.compile_s,
            "times": r.times,
            "loss0": r.loss0,
            "peak_rss_mb": mem.get(r.name),
        }
        for r in runners
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="128", help="comma-separated sequence lengths")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per config (round robin)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--memory", action="store_true", help="peak RSS per config, each in its own process"
    )
    ap.add_argument("--steps", type=int, default=3, help="(memory children) steps to run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")]
    if args.child:
        child(args.child, seqs[0], args.steps)
        return
    names = args.configs.split(",")
    report = {
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "batch": 1,
        "loss_positions": LOSS_POSITIONS,
        "runs": {},
    }
    print(
        f"Gemma 3 270M train step, float32, batch 1, loss on the last {LOSS_POSITIONS} "
        f"positions, JAX {jax.__version__}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    for seq in seqs:
        mem = measure_memory(seq, args.steps) if args.memory else {}
        report["runs"][str(seq)] = time_configs(seq, names, args, mem)
    dec = decode_speed()
    print(
        f"\ndecode (batch 1, 16-token prompt, 32 greedy tokens, KV cache): merged "
        f"{dec['merged']:.1f} tokens/s, implicit unmerged {dec['implicit']:.1f} tokens/s "
        f"({dec['implicit'] / dec['merged']:.2f}x)"
    )
    report["decode_tokens_per_s"] = dec
    report["process_peak_rss_mb"] = maxrss_mb()
    if args.json:
        dump_json(args.json, report)


if __name__ == "__main__":
    main()
