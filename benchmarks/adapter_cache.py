"""The adapter cache under a Zipf-distributed request trace: 100 adapters, 16 device slots.

    python -m benchmarks.adapter_cache --json adapter_cache.json   # from the repository root

The demo LM (``examples/common/pretrained.py``'s model, random weights) with
LoRA on every attention and MLP kernel, 100 adapters of ranks 2, 4 and 8 (8
is the slot rank), decoded with a KV cache (``examples/common/generation.py``'s
jitted prefill + decode loop), batches of 16 prompts whose adapters are drawn
from a Zipf law (``p(k) ~ 1 / k**s`` over the adapters' popularity ranks,
``s = --zipf``). Two configurations serve the same batches, interleaved
(alternating which goes first):

  resident   all 100 adapters in one stack of 100 slots (``stack_adapters``): no swaps
  cache16    ``AdapterCache(max_slots=16, host_capacity=100)``: each batch calls
             ``resolve(names)`` (slot writes dispatched asynchronously) and decodes
             on ``cache.stack``; the cache starts empty (cold) at the timed pass

Reported: decode tokens/s (the decode loop) and end-to-end tokens/s
(``resolve`` + prefill + decode) of both, and their ratios (the median over
batches of each batch's cache16 / resident ratio: the two runs of a batch are
back to back, so a change in the machine's load cancels); the cache's
hits, misses and evictions; XLA compilations during the timed pass of
``cache16`` (the serving programs are compiled in an untimed warm-up pass over
the same trace); the time of one slot swap alone, as dispatched (``resolve``
returns) and as landed (the new stack ready), and per slot write within the
trace's ``resolve`` calls (misses written four per call), against one decode
step; the
overlap: a swap issued while a forward reading the stack is in flight returns
before that forward ends (the write queues behind it; on CPU a small write
runs inline, so with an idle device "dispatched" and "landed" are close); and
each batch's output tokens, checked equal between the two configurations.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from benchmarks import harness, report
from benchmarks import workload as W
from lora_jax.debug import CompileCounter

N_ADAPTERS = 100
SLOTS = 16
BATCH = 16
RANKS = (2, 4, 8)
TARGETS = r".*/(q|k|v|out|fc1|fc2)/kernel"


def zipf_trace(n_batches: int, s: float, seed: int = 0) -> list[list[str]]:
    """``n_batches`` batches of ``BATCH`` adapter names, Zipf(s) over ``N_ADAPTERS``."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, N_ADAPTERS + 1) ** s
    popularity = rng.permutation(N_ADAPTERS)  # which adapter has which popularity rank
    draws = rng.choice(N_ADAPTERS, size=(n_batches, BATCH), p=p / p.sum())
    return [[f"a{popularity[k]}" for k in row] for row in draws]


def build(model):
    """Base params and the 100 adapters (B drawn at random so each differs from the base)."""
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    deltas = {}
    for r in RANKS:
        cfg = lora_jax.LoraConfig(targets=TARGETS, rank=r, alpha=2.0 * r)
        base, d = lora_jax.init_lora(jax.random.key(r), params, cfg)
        deltas[r] = d
    adapters = {
        f"a{i}": W.trained_like(deltas[RANKS[i % len(RANKS)]], seed=300 + i, std=0.05)
        for i in range(N_ADAPTERS)
    }
    return base, adapters


def swap_times(cache, names, reps: int) -> dict:
    """Median seconds for one slot swap: ``resolve`` of an adapter not in a slot returning
    (dispatched) and the new stack being ready (landed)."""
    dispatched, landed = [], []
    jax.block_until_ready(cache.stack)
    for i in range(reps):
        absent = [n for n in names if n not in cache.state().slots]
        t0 = time.perf_counter()
        cache.resolve([absent[i % len(absent)]])
        t1 = time.perf_counter()
        jax.block_until_ready(cache.stack)
        t2 = time.perf_counter()
        dispatched.append(t1 - t0)
        landed.append(t2 - t0)
    return {"dispatched_s": float(np.median(dispatched)), "landed_s": float(np.median(landed))}


def overlap(cache, names, base, model, reps: int) -> dict:
    """A slot swap issued while a forward that reads the stack is in flight: how often
    ``resolve`` returned before that forward finished (the write queues behind it, the host
    goes on), with the median forward and ``resolve`` times."""
    step = jax.jit(lambda b, s, t, i: lora_jax.implicit(model.apply)(b, s, t, adapter_ids=i))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (BATCH, 64)), jnp.int32)
    ids = cache.resolve(names[:BATCH])
    jax.block_until_ready(step(base, cache.stack, tokens, ids))
    before, forward, swap = 0, [], []
    for i in range(reps):
        absent = [n for n in names if n not in cache.state().slots]
        ids = cache.resolve(names[:BATCH])
        jax.block_until_ready(cache.stack)
        t0 = time.perf_counter()
        out = step(base, cache.stack, tokens, ids)
        t1 = time.perf_counter()
        cache.resolve([absent[i % len(absent)]])
        t2 = time.perf_counter()
        before += not out.is_ready()
        jax.block_until_ready(out)
        t3 = time.perf_counter()
        forward.append(t3 - t0)
        swap.append(t2 - t1)
    return {
        "resolve_returned_before_forward_done": before,
        "reps": reps,
        "forward_s": float(np.median(forward)),
        "resolve_s": float(np.median(swap)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, default=24, help="batches in the trace (default 24)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s (default 1.0)")
    ap.add_argument("--small", action="store_true", help="a short trace (for tests)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    from examples.common.generation import Generator  # noqa: PLC0415
    from examples.common.pretrained import MODEL  # noqa: PLC0415

    n_batches, new_tokens = (4, 4) if args.small else (args.batches, args.new_tokens)
    run_meta = harness.meta(
        batches=n_batches, new_tokens=new_tokens, zipf=args.zipf, small=args.small
    )
    base, adapters = build(MODEL)
    names = list(adapters)
    index = {n: i for i, n in enumerate(names)}
    resident = lora_jax.stack_adapters([adapters[n] for n in names], rank=max(RANKS))
    trace = zipf_trace(n_batches, args.zipf)
    prompts = [list(np.random.default_rng(i).integers(1, 256, 12)) for i in range(BATCH)]
    gen = Generator(
        lambda b, s, i, t, **kw: lora_jax.implicit(MODEL.apply)(b, s, t, adapter_ids=i, **kw),
        MODEL,
    )

    def new_cache():
        cache = lora_jax.AdapterCache(
            base,
            lora_jax.LoraConfig(targets=TARGETS, rank=max(RANKS)),
            max_slots=SLOTS,
            host_capacity=N_ADAPTERS,
        )
        for n in names:
            cache.add(n, adapters[n])
        return cache

    def serve_resident(batch):
        t0 = time.perf_counter()
        ids = np.asarray([index[n] for n in batch], np.int32)
        t1 = time.perf_counter()
        g = gen((base, resident, ids), prompts, new_tokens, stop_at_eos=False)
        return g, time.perf_counter() - t0, t1 - t0

    def serve_cache(cache, batch):
        t0 = time.perf_counter()
        ids = cache.resolve(batch)
        t1 = time.perf_counter()
        g = gen((base, cache.stack, ids), prompts, new_tokens, stop_at_eos=False)
        return g, time.perf_counter() - t0, t1 - t0

    print(
        f"demo LM, {N_ADAPTERS} adapters (ranks {RANKS}), {SLOTS} slots, {n_batches} batches of "
        f"{BATCH} x {new_tokens} tokens, Zipf s={args.zipf}; {run_meta['device']}, "
        f"{run_meta['cores']} cores"
    )
    warm = new_cache()  # untimed pass: compiles prefill, decode and the slot write
    for batch in trace:
        serve_resident(batch)
        serve_cache(warm, batch)

    cache = new_cache()
    rows: dict[str, dict[str, list[float]]] = {
        k: {"decode": [], "total": [], "step": [], "resolve": [], "prefill": []}
        for k in ("resident", "cache16")
    }
    same = True
    with CompileCounter() as compiles:
        for i, batch in enumerate(trace):  # alternating which goes first
            if i % 2:
                g_cache, t_cache, r_cache = serve_cache(cache, batch)
                g_res, t_res, r_res = serve_resident(batch)
            else:
                g_res, t_res, r_res = serve_resident(batch)
                g_cache, t_cache, r_cache = serve_cache(cache, batch)
            same &= g_res.tokens == g_cache.tokens
            for k, g, t, r in (
                ("resident", g_res, t_res, r_res),
                ("cache16", g_cache, t_cache, r_cache),
            ):
                rows[k]["resolve"].append(r)
                rows[k]["prefill"].append(g.prefill_s)
                rows[k]["decode"].append(g.decode_tokens_per_s)
                rows[k]["total"].append(g.batch * (g.decode_steps + 1) / t)
                rows[k]["step"].append(g.decode_s / max(g.decode_steps, 1))
    stats = dict(cache.stats)
    swap = swap_times(cache, names, reps=8 if args.small else 30)
    ov = overlap(cache, names, base, MODEL, reps=4 if args.small else 20)
    slot_bytes = sum(x.nbytes for k in cache.host_arrays(names[0]).values() for x in k)

    configs = {
        k: {
            "decode_tokens_per_s": float(np.median(v["decode"])),
            "total_tokens_per_s": float(np.median(v["total"])),
            "decode_step_s": float(np.median(v["step"])),
            "resolve_s_per_batch": float(np.median(v["resolve"])),
            "prefill_s": float(np.median(v["prefill"])),
        }
        for k, v in rows.items()
    }
    step = configs["cache16"]["decode_step_s"]
    paired = {  # each batch's two runs are back to back: their ratio cancels slow load drifts
        k: float(np.median(np.divide(rows["cache16"][k], rows["resident"][k])))
        for k in ("decode", "total")
    }
    per_miss = sum(rows["cache16"]["resolve"]) / max(stats["misses"], 1)
    ratios = {
        "cache16_over_resident_decode": paired["decode"],
        "cache16_over_resident_total": paired["total"],
        "swap_landed_over_decode_step": swap["landed_s"] / step,
        "swap_dispatched_over_decode_step": swap["dispatched_s"] / step,
        "resolve_per_miss_over_decode_step": per_miss / step,
    }
    swap["resolve_s_per_miss"] = per_miss
    requests = n_batches * BATCH
    print()
    print(
        report.fmt_table(
            [
                "config",
                "decode tokens/s",
                "end-to-end tokens/s",
                "ms/decode step",
                "ms/resolve",
                "ms/prefill",
            ],
            [
                [
                    k,
                    f"{v['decode_tokens_per_s']:.0f}",
                    f"{v['total_tokens_per_s']:.0f}",
                    f"{1e3 * v['decode_step_s']:.2f}",
                    f"{1e3 * v['resolve_s_per_batch']:.2f}",
                    f"{1e3 * v['prefill_s']:.2f}",
                ]
                for k, v in configs.items()
            ],
        )
    )
    print()
    print(
        f"cache16: {stats['hits']} hits, {stats['misses']} misses (slot writes), "
        f"{stats['evictions']} evictions over {requests} requests ({n_batches} batches)"
    )
    print(
        f"one slot swap ({slot_bytes / 1024:.0f} KiB): dispatched in "
        f"{1e6 * swap['dispatched_s']:.0f} us, landed in {1e6 * swap['landed_s']:.0f} us; "
        f"within a batch's resolve {1e6 * per_miss:.0f} us per slot write; "
        f"one decode step {1e3 * step:.2f} ms"
    )
    print(
        f"swap during a forward (16 x 64 tokens, {1e3 * ov['forward_s']:.1f} ms): resolve "
        f"returned in {1e6 * ov['resolve_s']:.0f} us, before the forward finished in "
        f"{ov['resolve_returned_before_forward_done']}/{ov['reps']} tries"
    )
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else format(v, '.3f')}")
    print(f"compilations during the timed cache16 pass: {compiles.count}")
    print(f"cache16 tokens == resident tokens on every batch: {same}")
    out = {
        "configs": configs,
        "ratios": ratios,
        "cache": {**stats, "requests": requests, "slot_bytes": slot_bytes},
        "swap": swap,
        "overlap": ov,
        "compilations": compiles.count,
        "tokens_equal": same,
        "meta": run_meta,
    }
    if args.json:
        report.dump_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
