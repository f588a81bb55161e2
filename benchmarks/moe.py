"""Train step of LoRA on mixture-of-experts kernels through ``ragged_dot``.

    python -m benchmarks.moe --json moe.json          # from the repository root, ~1 min

A small MoE language model (embedding, ``layers`` scan-stacked blocks of a
router with top-k normalised weights and SwiGLU experts applied with
``lax.ragged_dot`` to the tokens sorted by expert, a tied read-out), trained
four ways, timed interleaved in one process (medians of the timed steps):

* ``floor``: differentiates only the activations (the input embeddings, SGD):
  the forward and backward of the frozen model, the least a LoRA step can cost;
* ``lora``: LoRA on the experts (``seio``: per layer and expert ``A``, ``B``)
  and the router, through ``lj.implicit(strict=True)``, Adam on the factors;
* ``merge``: the same LoRA, merged on the fly (``fn(lj.merge(base, delta))``):
  ``W + s A B`` for every expert, and its dense gradient, every step;
* ``full``: full fine-tuning of every parameter, Adam.

Printed: median ms per step, the ratios ``lora / floor``, ``merge / lora``
and ``full / lora``, XLA's temporaries per program, and whether the compiled
LoRA step computes any tensor of an experts kernel's size (it should not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import lora_jax as lj
from benchmarks.harness import meta, summary_stats, time_interleaved, xla_temp_mib

CONFIGS = ("floor", "lora", "merge", "full")


@dataclasses.dataclass(frozen=True)
class Dims:
    vocab: int = 512
    hidden: int = 256
    inter: int = 512  # per-expert SwiGLU width
    experts: int = 8
    top_k: int = 2
    layers: int = 2
    batch: int = 4
    seq: int = 96  # 384 tokens: no activation shaped like an experts kernel
    rank: int = 8


SMALL = Dims(vocab=64, hidden=32, inter=48, experts=8, top_k=2, layers=2, batch=2, seq=16, rank=4)


def init_params(d: Dims, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)

    n, e, h, f = d.layers, d.experts, d.hidden, d.inter
    return {
        "embed": normal((d.vocab, h), 1.0) * 0.5,
        "layers": {
            "router": normal((n, h, e), h),
            "gate": normal((n, e, h, f), h),
            "up": normal((n, e, h, f), h),
            "down": normal((n, e, f, h), f),
        },
    }


def moe_block(p: dict, h: jax.Array, top_k: int) -> jax.Array:
    """One block: RMS-normed input, router, tokens sorted by expert, SwiGLU experts through
    ``ragged_dot``, weighted combine, residual."""
    t, e = h.shape[0], p["router"].shape[-1]
    x = h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    weights, experts = lax.top_k(jax.nn.softmax(x @ p["router"], axis=-1), top_k)
    weights = weights / weights.sum(-1, keepdims=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    groups = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.repeat(x, top_k, axis=0)[order]
    act = jax.nn.silu(lax.ragged_dot(xs, p["gate"], groups)) * lax.ragged_dot(xs, p["up"], groups)
    y = lax.ragged_dot(act, p["down"], groups)
    y = jnp.zeros_like(y).at[order].set(y).reshape(t, top_k, -1)
    return h + jnp.einsum("tkd,tk->td", y, weights)


def hidden_states(params: dict, h: jax.Array, top_k: int) -> jax.Array:
    return lax.scan(lambda c, layer: (moe_block(layer, c, top_k), None), h, params["layers"])[0]


def loss_from_embeddings(params: dict, h: jax.Array, targets: jax.Array, top_k: int) -> jax.Array:
    out = hidden_states(params, h, top_k)
    logits = out @ params["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_fn(params: dict, tokens: jax.Array, targets: jax.Array, top_k: int) -> jax.Array:
    return loss_from_embeddings(params, params["embed"][tokens], targets, top_k)


def lora_config(d: Dims) -> lj.LoraConfig:
    return lj.LoraConfig(targets=[r"layers/(gate|up|down|router)"], rank=d.rank, alpha=2.0 * d.rank)


def build(d: Dims, configs: tuple[str, ...]) -> dict:
    """``{name: (jitted step, state, consts)}``: each step returns ``(new state, loss)``."""
    params = init_params(d)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, d.vocab, (d.batch * d.seq,)), jnp.int32)
    targets = jnp.roll(tokens, -1)
    k = d.top_k
    fn = lambda p, x, y: loss_fn(p, x, y, k)  # noqa: E731
    layouts = lj.infer_layouts(fn, params, tokens, targets)
    base, delta = lj.init_lora(jax.random.key(0), params, lora_config(d), layouts=layouts)
    delta = jax.tree.map(lambda v: v + 0.01, delta)  # B != 0: every branch does real work
    opt = optax.adam(1e-3)
    steps = {}

    def delta_step(apply):
        def step(state, base, x, y):
            dl, o = state
            loss, g = jax.value_and_grad(lambda dl: apply(base, dl, x, y))(dl)
            u, o = opt.update(g, o, dl)
            return (optax.apply_updates(dl, u), o), loss

        return step

    if "floor" in configs:
        h0 = params["embed"][tokens]

        def floor(h, params, y):
            loss, g = jax.value_and_grad(lambda h: loss_from_embeddings(params, h, y, k))(h)
            return h - 1e-3 * g, loss

        steps["floor"] = (floor, h0, (params, targets))
    if "lora" in configs:
        run = lj.implicit(fn, strict=True)
        steps["lora"] = (delta_step(run), (delta, opt.init(delta)), (base, tokens, targets))
    if "merge" in configs:
        merged = lambda b, dl, x, y: fn(lj.merge(b, dl), x, y)  # noqa: E731
        steps["merge"] = (delta_step(merged), (delta, opt.init(delta)), (base, tokens, targets))
    if "full" in configs:

        def full(state, x, y):
            p, o = state
            loss, g = jax.value_and_grad(lambda p: fn(p, x, y))(p)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        steps["full"] = (full, (params, opt.init(params)), (tokens, targets))
    fresh = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - each state is donated
    return {n: (jax.jit(s, donate_argnums=0), fresh(st), c) for n, (s, st, c) in steps.items()}


INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
SHAPE = re.compile(r"(?:f32|bf16)\[([\d,]*)\]")


#: Operations that compute values (not moves of an existing array).
COMPUTING = ("dot", "fusion", "add", "multiply", "subtract", "reduce", "custom-call", "convolution")


def experts_kernel_sized(hlo: str, dims: tuple[int, int, int]) -> list[str]:
    """Instructions that compute a tensor shaped like an experts kernel ``(E, in, out)`` in
    any axis order, or flattened to ``(E*in, out)`` / ``(in, E*out)`` (size-1 axes
    dropped): a merged kernel or a dense kernel gradient. Moving the frozen kernel
    (parameters, transposes, copies, bitcasts, slices, and fusions of only those) does
    not count."""
    e, i, o = dims
    shapes = {tuple(sorted(s)) for s in ((e, i, o), (e * i, o), (i, e * o), (e * o, i), (e, i * o))}
    found = []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m:
            continue
        name, out, op = m.groups()
        if op not in COMPUTING or re.match(r"^((copy|bitcast|transpose|slice)_)+fusion", name):
            continue
        for s in SHAPE.findall(out):
            if tuple(sorted(int(v) for v in s.split(",") if v and int(v) != 1)) in shapes:
                found.append(line.strip()[:200])
                break
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="toy dims (tests)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = tuple(n.strip() for n in args.configs.split(",") if n.strip())
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    d = SMALL if args.small else Dims()
    built = build(d, names)
    states = {n: st for n, (_, st, _) in built.items()}
    results: dict = {}
    kernel = (d.experts, d.hidden, d.inter)  # gate / up (and down, transposed)
    for n, (step, st, consts) in built.items():
        compiled = step.lower(st, *consts).compile()
        results[n] = {"xla_temp_mib": xla_temp_mib(compiled)}
        found = experts_kernel_sized(compiled.as_text(), kernel)
        results[n]["experts_kernel_sized_ops"] = len(found)
        results[n]["experts_kernel_sized_examples"] = found[:3]

    def runner(n):
        step, _, consts = built[n]

        def one():
            states[n], loss = step(states[n], *consts)
            loss.block_until_ready()
            results[n]["loss"] = float(loss)

        return one

    samples = time_interleaved({n: runner(n) for n in built}, args.rounds, args.steps, args.warmup)
    for n, ms in samples.items():
        results[n].update(summary_stats(ms))
    ms = {n: results[n]["ms"] for n in results}
    ratios = {}
    if "lora" in ms and "floor" in ms:
        ratios["lora/floor"] = ms["lora"] / ms["floor"]
    if "lora" in ms and "merge" in ms:
        ratios["merge/lora"] = ms["merge"] / ms["lora"]
    if "lora" in ms and "full" in ms:
        ratios["full/lora"] = ms["full"] / ms["lora"]
    print(f"MoE train step: {d}")
    for n in built:
        r = results[n]
        print(
            f"  {n:6s} {r['ms']:8.1f} ms (p25 {r['ms_p25']:.1f}, p75 {r['ms_p75']:.1f})  "
            f"temp {r['xla_temp_mib']:.1f} MiB  E*in*out-sized ops {r['experts_kernel_sized_ops']}"
        )
    for k, v in ratios.items():
        print(f"  {k} = {v:.2f}")
    out = {
        "meta": meta(rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup),
        "dims": dataclasses.asdict(d),
        "configs": results,
        "ratios": ratios,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
