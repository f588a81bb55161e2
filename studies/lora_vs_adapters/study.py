"""LoRA vs adapters vs prefix tuning vs full fine-tuning, measured on one workload.

The claims LoRA was introduced with (the project's seed article), checked on
the demo's setting (``examples/common/pretrained.py``: the byte-level LM pretrained on
Python's docs, adapted to stdlib source code) every method trains for the same
steps x batch with a learning rate picked from a small sweep by held-out
target loss, and one table compares them: trainable parameters, Adam state,
train-step time (interleaved, ratio to full fine-tuning), XLA's memory for the
step, held-out loss on the target and on the base domain (forgetting), decode
latency with a KV cache (ratio to the base model), collectives in a
tensor-parallel forward (``tensor_parallel.py``) and the context left for the text.

    python -m studies.lora_vs_adapters.study           # the full run (about 25 min on 2 loaded cores)
    python -m studies.lora_vs_adapters.study --quick   # a reduced run (tests)

(from the repository root, or with it on ``PYTHONPATH``).

Writes ``table.md``, ``results.json``, ``curves.png`` and ``rank.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from benchmarks.harness import gflop, time_interleaved
from examples.common.generation import Generator
from examples.common.lm import cross_entropy
from examples.common.pretrained import BATCH_SIZE, CONFIG, MODEL, load_or_pretrain
from examples.common.text import (
    encode,
    eval_windows,
    pydoc_text,
    random_batches,
    stdlib_source_text,
    train_eval_split,
)
from studies.lora_vs_adapters import report as study_report
from studies.lora_vs_adapters.baselines import (
    adapter_apply,
    init_adapters,
    init_prefix,
    prefix_apply,
    prefix_cache,
    prefix_kv,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `-m studies...` runs here

TARGETS = [r".*/attn/(q|k|v|out)/kernel", r".*/mlp/(fc1|fc2)/kernel"]
ALPHA = 64
IMPLICIT = lora_jax.implicit(MODEL.apply)
SEQ = CONFIG.seq_len


@dataclasses.dataclass
class Method:
    name: str
    kind: str  # full | adapter | prefix | lora
    init: Callable[[Any, Any], tuple]  # (key, params) -> (base, trainable)
    apply: Callable[..., Any]  # (base, trainable, tokens) -> logits
    lrs: tuple
    info: dict = dataclasses.field(default_factory=dict)
    in_table: bool = True  # False: an extra point of the r sweep (figure only)

    @property
    def text_len(self) -> int:  # tokens of text per window: the prefix takes P of SEQ positions
        return SEQ - self.info.get("prefix", 0)


def lora_method(r, init="gaussian", rslora=False, lrs=(5e-4, 1.5e-3, 5e-3, 1.5e-2), in_table=True):
    config = lora_jax.LoraConfig(targets=TARGETS, rank=r, alpha=ALPHA, init=init, use_rslora=rslora)
    name = (
        f"LoRA r={r} alpha={ALPHA}"
        + (", swapped init" if init == "swapped" else "")
        + (", rsLoRA" if rslora else "")
    )
    return Method(
        name,
        "lora",
        lambda key, p: lora_jax.init_lora(key, p, config),
        lambda base, d, x: IMPLICIT(base, d, x),
        lrs,
        dict(r=r, init=init, rslora=rslora, scale=config.scale_for(r, ALPHA)),
        in_table,
    )


def methods(extra_ranks=()) -> list[Method]:
    adapter = lambda m: Method(  # noqa: E731
        f"Houlsby adapters m={m}",
        "adapter",
        lambda key, p: (p, init_adapters(key, m)),
        adapter_apply,
        (3e-3, 1e-2, 3e-2),
        dict(m=m),
    )
    prefix = lambda n: Method(  # noqa: E731
        f"prefix tuning P={n}",
        "prefix",
        lambda key, p: (p, init_prefix(key, n)),
        lambda base, tr, x: prefix_apply(prefix_kv(tr), base, x),
        (1e-3, 3e-3, 1e-2),
        dict(prefix=n),
    )
    full = Method(
        "full fine-tuning",
        "full",
        lambda key, p: (None, p),
        lambda base, tr, x: MODEL.apply(tr, x),
        (3e-4, 1e-3, 3e-3),
    )
    out = [
        full,
        adapter(36),
        adapter(144),
        prefix(4),
        prefix(16),
        prefix(64),
        lora_method(64),
        lora_method(8),
        lora_method(4),
        lora_method(8, init="swapped"),
        lora_method(64, rslora=True),
    ]
    return out + [lora_method(r, in_table=False) for r in extra_ranks]


# -----------------------------------------------------------------------------
# Training: Adam over the trainable tree only, the LR an argument (one compile per method)
# -----------------------------------------------------------------------------


def loss_fn(m: Method):
    return lambda tr, base, batch: cross_entropy(m.apply(base, tr, batch[:, :-1]), batch[:, 1:])


def compile_step(m: Method, base, tr, batch):
    adam = optax.scale_by_adam()

    def step(tr, opt_state, base, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn(m))(tr, base, batch)
        updates, opt_state = adam.update(grads, opt_state, tr)
        return optax.apply_updates(tr, jax.tree.map(lambda u: -lr * u, updates)), opt_state, loss

    return jax.jit(step).lower(tr, adam.init(tr), base, batch, jnp.float32(0)).compile(), adam


def train(m, step, adam, base, tr, data, lr, steps, seed):
    """Warmup + cosine decay to lr/10, as the demo; returns (trained tree, per-step losses)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, steps // 20), max(steps, 2), lr / 10
    )
    opt_state, losses = adam.init(tr), []
    batches = random_batches(data, BATCH_SIZE, m.text_len, seed)
    for i in range(steps):
        tr, opt_state, loss = step(tr, opt_state, base, next(batches), jnp.float32(schedule(i)))
        losses.append(loss)
    return tr, np.asarray(jax.device_get(losses), np.float32)


def evaluator(m: Method):
    """Held-out loss on windows cut to the method's text length."""
    fn = jax.jit(loss_fn(m))
    return lambda tr, base, windows: float(fn(tr, base, windows[:, : m.text_len + 1]))


def run_method(m, params, data, evals, steps, seed):
    """Every LR of ``m``; keeps the best by held-out target loss."""
    base, tr0 = m.init(jax.random.key(seed), params)
    step, adam = compile_step(
        m, base, tr0, next(random_batches(data, BATCH_SIZE, m.text_len, seed))
    )
    evaluate = evaluator(m)
    runs = []
    for lr in m.lrs:
        tr, losses = train(m, step, adam, base, tr0, data, lr, steps, seed + 1)
        runs.append(dict(lr=lr, tr=tr, losses=losses, target=evaluate(tr, base, evals["target"])))
    best = min(runs, key=lambda r: r["target"])
    mem = step.memory_analysis()
    return dict(
        method=m,
        base=base,
        tr=best["tr"],
        step=step,
        lr=best["lr"],
        losses=best["losses"],
        target=best["target"],
        base_loss=evaluate(best["tr"], base, evals["base"]),
        loss0=evaluate(tr0, base, evals["target"]),
        by_lr={r["lr"]: r["target"] for r in runs},
        trainable=lora_jax.count_params(tr0),
        opt_bytes=lora_jax.advanced.tree_bytes(adam.init(tr0)),
        step_mib=(mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**20,
        step_gflop=gflop(step),
        batch=next(random_batches(data, BATCH_SIZE, m.text_len, seed)),
    )


# -----------------------------------------------------------------------------
# Timing: train steps and decode steps, interleaved round robin, medians
# -----------------------------------------------------------------------------


def time_steps(results, rounds, steps):
    def runner(r):
        opt_state = optax.scale_by_adam().init(r["tr"])
        return lambda: jax.block_until_ready(
            r["step"](r["tr"], opt_state, r["base"], r["batch"], jnp.float32(0))
        )

    ms = time_interleaved(
        {r["method"].name: runner(r) for r in results}, rounds, steps, 1, log=None
    )
    return {k: float(np.median(v)) for k, v in ms.items()}


def decoders(params, results):
    """name -> (Generator, params tuple, cache) for one-token decode steps at batch 1."""
    plain, unmerged = Generator(MODEL.apply, MODEL), Generator(IMPLICIT, MODEL)
    adapted, prefixed = Generator(adapter_apply, MODEL), Generator(prefix_apply, MODEL)
    out = {"base": (plain, (params,), None)}
    for r in results:
        m, tr, base = r["method"], r["tr"], r["base"]
        if m.kind == "lora":
            out[m.name + " merged"] = (plain, (lora_jax.merge(base, tr),), None)
            out[m.name + " unmerged"] = (unmerged, (base, tr), None)
        elif m.kind == "adapter":
            out[m.name] = (adapted, (base, tr), None)
        elif m.kind == "prefix":
            kv = prefix_kv(tr)
            out[m.name] = (prefixed, (kv, base), prefix_cache(kv, 1, SEQ))
    return out


def compile_decode(gen, params, cache):
    """Generator's decode step compiled for batch 1 (one token at position 40 of a SEQ-slot
    cache), with its arguments: ``compiled(*args) -> (token, new cache)``."""
    cache = MODEL.init_cache(1, SEQ) if cache is None else cache
    args = [params, jnp.zeros(1, jnp.int32), jnp.full(1, 40, jnp.int32), cache, jax.random.key(0)]
    return gen._step.lower(*args, 0.0, None).compile(), args


def time_decode(programs, rounds, steps):
    def runner(compiled, args):
        def one():
            token, args[3] = compiled(*args)  # the cache is donated: carry the new one
            jax.block_until_ready(token)

        return one

    ms = time_interleaved({k: runner(*v) for k, v in programs.items()}, rounds, steps, 2, log=None)
    return {k: float(np.median(v)) for k, v in ms.items()}


# -----------------------------------------------------------------------------


def data_and_evals(num_eval):
    base_train, base_heldout = train_eval_split(encode(pydoc_text()))
    target_train, target_heldout = train_eval_split(encode(stdlib_source_text()))
    evals = {
        "target": eval_windows(target_heldout, SEQ, num_eval),
        "base": eval_windows(base_heldout, SEQ, num_eval),
    }
    return base_train, target_train, evals


def start_tp_count():
    return subprocess.Popen(
        [sys.executable, "-m", "studies.lora_vs_adapters.tensor_parallel"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a reduced run (CI): tiny steps, one LR"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per method and LR")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument(
        "--ranks",
        default="16,32",
        help="extra LoRA ranks for the r sweep figure (comma separated; '' for none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "examples" / "out",
        help="where the pretrained params are cached (shared with the demo)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "out" / "lora_vs_adapters")
    args = parser.parse_args(argv)
    q = args.quick
    steps = args.steps or (8 if q else 300)
    t0 = time.perf_counter()
    tp = start_tp_count()  # runs alongside (its own process, 8 simulated devices)
    base_train, target_train, evals = data_and_evals(16 if q else 128)
    params, _ = load_or_pretrain(
        base_train, args.pretrain_steps or (20 if q else 600), args.seed, args.cache
    )
    results = []
    for m in methods([] if q else [int(r) for r in args.ranks.split(",") if r]):
        if q:
            m.lrs = m.lrs[1:2]
        results.append(run_method(m, params, target_train, evals, steps, args.seed))
        print(
            f"{m.name}: lr {results[-1]['lr']:g} target {results[-1]['target']:.4f} "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    table = [r for r in results if r["method"].in_table]
    step_ms = time_steps(table, 1 if q else 8, 1 if q else 3)
    programs = {k: compile_decode(*v) for k, v in decoders(params, table).items()}
    merged = next(k for k in programs if k.endswith(" merged"))
    same_program = programs["base"][0].as_text() == programs[merged][0].as_text()
    decode_ms = time_decode(programs, 2 if q else 20, 3 if q else 10)
    decode_flops = {k: gflop(c) for k, (c, _) in programs.items()}
    base_eval = jax.jit(lambda p, w: cross_entropy(MODEL.apply(p, w[:, :-1]), w[:, 1:]))
    reference = lambda windows, n: float(base_eval(params, windows[:, : n + 1]))  # noqa: E731
    tp_counts = json.loads(tp.communicate()[0].strip().splitlines()[-1])
    lora = next(r for r in table if r["method"].kind == "lora")  # merged vs base vs unmerged
    window = evals["target"][:4, :-1]
    logits = [
        np.asarray(MODEL.apply(p, window))
        for p in (lora["base"], lora_jax.merge(lora["base"], lora["tr"]))
    ]
    logits.append(np.asarray(IMPLICIT(lora["base"], lora["tr"], window)))
    merged_logits = dict(
        method=lora["method"].name,
        vs_base=float(np.abs(logits[1] - logits[0]).max()),
        vs_unmerged=float(np.abs(logits[1] - logits[2]).max()),
    )
    report = study_report.build(
        results,
        reference,
        evals,
        step_ms,
        (decode_ms, decode_flops),
        tp_counts,
        same_program,
        dict(steps=steps, batch=BATCH_SIZE, seq=SEQ, quick=q),
    )
    report["merged_logits"] = merged_logits
    study_report.write(report, results, args.out)
    print(study_report.markdown(report))
    print(f"merged LoRA decode program identical to the base's: {same_program}")
    print(f"total time: {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
