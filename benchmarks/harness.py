"""The timing harness of the benchmarks: compile-time figures, interleaved timing, run metadata.

* :func:`gflop` / :func:`xla_temp_mib`: XLA's FLOP count and temporaries of a compiled step;
* :func:`time_interleaved`: every configuration timed round robin in one process;
* :func:`summary_stats`: median and quartiles of the timed samples;
* :func:`meta`: versions, device, cores and load of a run;
* :func:`start`: the common start of a benchmark script (configs, workload, metadata).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

import lora_jax
from benchmarks.workload import build


class Skip(Exception):
    """A configuration that cannot run here (missing package or API); the message says why."""


def gflop(compiled) -> float:
    """XLA's FLOP count of a compiled executable, in GFLOP (NaN if unavailable).

    ``Compiled.cost_analysis()`` returns a dict in recent JAX and a list of
    dicts (one per computation) in older ones.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return float("nan")
    return float(ca["flops"]) / 1e9


def xla_temp_mib(compiled) -> float:
    """XLA's buffer assignment for a compiled program: its temporaries, in MiB (NaN if unknown).

    Deterministic for a given program and XLA version: the working memory of a
    step beyond its arguments and outputs, free of the noise of RSS readings.
    """
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - not every backend reports it
        return float("nan")


def time_interleaved(steps_by_name, rounds: int, steps: int, warmup: int, log=print):
    """Times callables round robin; returns ``{name: [ms, ...]}``.

    Each callable runs one step and blocks until its results are ready. Every
    one is first run ``warmup`` times; then ``rounds`` rounds each run every
    callable ``steps`` times in a row, starting each round at the next name so
    that no configuration always follows the same one.
    """
    import time

    names = list(steps_by_name)
    for name in names:
        for _ in range(warmup):
            steps_by_name[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            fn = steps_by_name[name]
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                samples[name].append(1e3 * (time.perf_counter() - t0))
        if log is not None:
            log(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(f"{n} {np.median(samples[n]):.1f}" for n in names)
                + " ms (running medians)"
            )
    return samples


def summary_stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "ms": float(np.median(a)),
        "ms_p25": float(np.percentile(a, 25)),
        "ms_p75": float(np.percentile(a, 75)),
        "samples": int(a.size),
    }


def meta(**extra) -> dict:
    """Versions, device, cores, load and date of this run."""
    import datetime
    import os
    import platform
    import sys

    import flax

    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "lora_jax": lora_jax.__version__,
    }
    try:
        import qwix

        versions["qwix"] = qwix.__version__
    except Exception:  # noqa: BLE001
        versions["qwix"] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "device": f"{dev.platform}:{dev.device_kind}",
        "num_devices": jax.device_count(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv[1:],
    }
    try:
        import psutil

        out["physical_cores"] = psutil.cpu_count(logical=False)
        out["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    out.update(extra)
    return out


def start(ap, args, configs, unit: str):
    """The common start of a benchmark script: the chosen configs, the workload, run metadata.

    Rejects unknown ``--configs`` through ``ap.error``, says when ``rounds x
    steps`` is too few timed ``unit`` to quote, builds the (``--small``) workload.
    """
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(configs))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(configs)}")
    if args.rounds * args.steps < 20:
        print(
            f"note: {args.rounds * args.steps} timed {unit} per config (< 20): a smoke run, "
            "not a quotable measurement"
        )
    run_meta = meta(
        rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup, small=args.small
    )
    wl = build(small=args.small)
    run_meta["dims"] = dataclasses.asdict(wl.dims)
    return names, wl, run_meta
