"""Many tenants' adapters trained on one base: mixed batches, RL sync bytes, reference memory.

    python -m benchmarks.multitenant --json multitenant.json   # from the repository root

Three figures, each measured in one process:

``training``: 16 tenants, each with a small batch (one sequence of ``--tokens``
tokens), trained for one step

  mixed16     one jitted step over one batch of all 16 tenants' rows: the stack,
              ``lora_jax.tenant_loss`` (each tenant's own mean) and
              ``lora_jax.tenant_optimizer`` (per-slot AdamW)
  separate16  16 calls of one jitted step, each on one tenant's adapter (a plain
              delta) with ``optax.adamw``: what training each tenant alone costs

on two models: the demo LM (``examples/common/pretrained.py``: d_model 128, 2
blocks, random weights) and the reference workload (``workload.py``: 16.9M
parameters), rank 8 on every projection. Timed interleaved (medians); the mixed
step's tenant 3 is checked against its separate step (same numbers to float
rounding: two programs of different shapes; compared as Adam's first moment
after one step, ``0.1 g``).

``sync``: the bytes an RL trainer sends the sampler per tenant per step with
``lora_jax.advanced.copy_slot`` (one slot's factors) against a full-weight sync, for the
demo LM, the reference workload and Gemma 3 270M (shapes only: ``jax.eval_shape``,
no weights needed), all at rank 8 on every projection.

``reference_memory``: a GRPO step's memory (XLA's compiled
``memory_analysis``: arguments + temporaries) on the reference workload, 16
completions of 64 tokens: ``policy`` alone (no KL term), ``policy+ref in
batch`` (each row twice, the second with id -1: the base alone, lora_jax's
way) and ``policy+ref copy`` (a second full model as the reference, the usual
way without LoRA); the weights held (params + stack + optimizer state) are
reported apart from the activations.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from benchmarks import harness, report
from benchmarks import workload as W
from examples.common.lm import LMConfig, TransformerLM, cross_entropy

TENANTS = 16
RANK = 8
TARGETS = r".*/(q|k|v|o|out|fc1|fc2)/kernel"


def _model(name: str, small: bool):
    """(model, params) of the demo LM or the reference workload (random weights)."""
    if name == "demo":
        cfg = LMConfig(d_model=32, num_heads=2, d_ff=64) if small else LMConfig()
        model = TransformerLM(cfg)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return model, params
    wl = W.build(small=small)
    return wl.model, wl.variables


def training_runs(name: str, args) -> tuple[dict, dict]:
    """The mixed16 and separate16 steps of one model; returns (runs, check)."""
    model, params = _model(name, args.small)
    vocab = model.config.vocab_size
    config = lj.LoraConfig(targets=TARGETS, rank=RANK, alpha=2.0 * RANK)
    base, delta0 = lj.init_lora(jax.random.key(0), params, config)
    deltas = [W.trained_like(delta0, seed=300 + t) for t in range(TENANTS)]
    stack = lj.stack_adapters(deltas)
    t = min(args.tokens, model.config.seq_len)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (TENANTS, t + 1)), jnp.int32)
    ids = jnp.asarray(rng.permutation(TENANTS), jnp.int32)  # one row per tenant, shuffled
    fwd = lj.implicit(model.apply)

    topt = lj.tenant_optimizer()
    settings = lj.tenant_settings(TENANTS, learning_rate=1e-3, weight_decay=0.01)

    @jax.jit  # the base is an argument: a closed-over base would be constant-folded
    def mixed_step(stack, state, base, tokens, ids):
        def loss(s):
            logits = fwd(base, s, tokens[:, :-1], adapter_ids=ids)
            rows = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)
            return lj.tenant_loss(rows, ids, TENANTS)[0]

        grads = jax.grad(loss)(stack)
        updates, state = topt.update(grads, state, stack, settings=settings, adapter_ids=ids)
        return optax.apply_updates(stack, updates), state

    opt = optax.adamw(1e-3, weight_decay=0.01)

    @jax.jit
    def separate_step(delta, state, base, tokens):
        def loss(d):
            return cross_entropy(fwd(base, d, tokens[:, :-1]), tokens[:, 1:])

        grads = jax.grad(loss)(delta)
        updates, state = opt.update(grads, state, delta)
        return optax.apply_updates(delta, updates), state

    state = topt.init(stack)
    states = [opt.init(d) for d in deltas]
    rows = {int(i): tokens[r : r + 1] for r, i in enumerate(np.asarray(ids))}
    out: dict = {}

    def mixed():
        out["mixed"] = jax.block_until_ready(mixed_step(stack, state, base, tokens, ids))

    def separate():
        out["separate"] = jax.block_until_ready(
            [separate_step(deltas[n], states[n], base, rows[n]) for n in range(TENANTS)]
        )

    mixed()
    separate()
    # Tenant 3's gradient both ways, read off Adam's first moment after one step from zero
    # (mu = 0.1 g exactly): Adam's first update, about lr * sign(g), would turn rounding
    # differences in near-zero gradients into differences of 2 lr.
    mixed_mu = [(a[3], b[3]) for a, b in out["mixed"][1].inner.mu]
    separate_mu = jax.tree.leaves(out["separate"][3][1][0].mu, is_leaf=lj.advanced.is_factors)
    err = 0.0
    for (ma, mb), f in zip(mixed_mu, [f for f in separate_mu if f is not None]):
        for x, y in ((ma, f.a), (mb, f.b)):
            err = max(err, float(jnp.abs(x - y).max() / (jnp.abs(y).max() + 1e-30)))
    return {"mixed16": mixed, "separate16": separate}, {
        "tokens_per_step": TENANTS * t,
        "tenant3_grad_rel_diff_mixed_vs_separate": err,
    }


def sync_bytes(small: bool) -> dict:
    """Bytes of one slot vs the full weights, per model (shapes only)."""
    from examples.gemma3 import model as gm  # noqa: PLC0415

    out = {}
    models = {"demo": _model("demo", small), "reference": _model("reference", small)}
    gcfg = gm.Gemma3Config.tiny() if small else gm.Gemma3Config()
    gmodel = gm.Gemma3(gcfg)
    models["gemma3_270m"] = (
        gmodel,
        jax.eval_shape(gmodel.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)),
    )
    for name, (_, params) in models.items():
        targets = gm.ALL_PROJECTIONS if name.startswith("gemma") else TARGETS
        config = lj.LoraConfig(targets=targets, rank=RANK, alpha=2.0 * RANK)
        # the stack's shapes without drawing anything: init_lora on shapes
        stack = jax.eval_shape(
            lambda p, c=config: lj.stack_adapters([lj.init_lora(jax.random.key(0), p, c)[1]]),
            params,
        )
        full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
        one = lj.advanced.slot_nbytes(stack)
        out[name] = {
            "slot_bytes": one,
            "full_weight_bytes": full,
            "percent": 100.0 * one / full,
        }
    return out


def reference_memory(small: bool) -> dict:
    """A GRPO step's compiled memory: policy alone, reference in the batch, reference copy."""
    wl = W.build(small=small)
    model, params = wl.model, wl.variables
    config = lj.LoraConfig(targets=TARGETS, rank=RANK, alpha=2.0 * RANK)
    base, delta = lj.init_lora(jax.random.key(0), params, config)
    stack = lj.stack_adapters([delta])
    rows, length, answer = (4, 16, 4) if small else (16, 64, 16)
    fwd = lj.implicit(model.apply)
    topt = lj.tenant_optimizer()
    state = topt.init(stack)
    settings = lj.tenant_settings(1, learning_rate=1e-3)
    index = jnp.broadcast_to(length - answer - 1 + jnp.arange(answer), (rows, answer))

    def logp(logits, tokens):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tgt = tokens[:, length - answer :]
        return jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]

    def make(mode: str):
        def loss(s, base, ref_params, tokens, ids, adv):
            if mode == "batch":
                both = jnp.concatenate([tokens, tokens])
                both_ids = jnp.concatenate([ids, jnp.full_like(ids, -1)])
                both_index = jnp.concatenate([index, index])
                lp = logp(fwd(base, s, both, adapter_ids=both_ids, logits_index=both_index), both)
                pol, ref = lp[:rows], jax.lax.stop_gradient(lp[rows:])
            else:
                pol = logp(fwd(base, s, tokens, adapter_ids=ids, logits_index=index), tokens)
                ref = pol
                if mode == "copy":
                    ref = jax.lax.stop_gradient(
                        logp(model.apply(ref_params, tokens, logits_index=index), tokens)
                    )
            kl = jnp.exp(ref - pol) - (ref - pol) - 1.0
            per_row = -(jnp.exp(pol - jax.lax.stop_gradient(pol)) * adv[:, None] - 0.02 * kl)
            return lj.tenant_loss(per_row.mean(-1), ids, 1)[0]

        def step(s, st, base, ref_params, tokens, ids, adv):
            grads = jax.grad(loss)(s, base, ref_params, tokens, ids, adv)
            u, st = topt.update(grads, st, s, settings=settings, adapter_ids=ids)
            return optax.apply_updates(s, u), st

        return jax.jit(step)

    tokens = jnp.zeros((rows, length), jnp.int32)
    ids = jnp.zeros((rows,), jnp.int32)
    adv = jnp.zeros((rows,), jnp.float32)
    ref_copy = jax.tree.map(jnp.copy, base)
    weights = lj.advanced.tree_bytes((base, stack, state))
    out = {}
    for mode, ref_params in (("policy", None), ("batch", None), ("copy", ref_copy)):
        compiled = make(mode).lower(stack, state, base, ref_params, tokens, ids, adv).compile()
        m = compiled.memory_analysis()
        args_b, temp_b = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
        held = weights + (lj.advanced.tree_bytes(ref_copy) if mode == "copy" else 0)
        out[mode] = {
            "weights_bytes": held,
            "argument_bytes": args_b,
            "temp_bytes": temp_b,
            "total_bytes": args_b + temp_b,
        }
    for mode in ("batch", "copy"):
        out[f"{mode}_over_policy_weights"] = (
            out[mode]["weights_bytes"] / out["policy"]["weights_bytes"]
        )
        out[f"{mode}_over_policy_total"] = out[mode]["total_bytes"] / out["policy"]["total_bytes"]
    out["shape"] = {"rows": rows, "tokens": length, "scored": answer}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="demo,reference", help="demo, reference or both")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per tenant (one sequence)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds (default 5)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="tiny dims (for tests)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    run_meta = harness.meta(
        rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup, small=args.small
    )
    print(f"{TENANTS} tenants, rank {RANK}, one sequence of {args.tokens} tokens per tenant")

    training = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        runs, check = training_runs(name, args)
        samples = harness.time_interleaved(runs, args.rounds, args.steps, args.warmup)
        res = {k: harness.summary_stats(v) for k, v in samples.items()}
        for v in res.values():
            v["tokens_per_s"] = check["tokens_per_step"] / (v["ms"] / 1e3)
        training[name] = {
            **res,
            "mixed16_over_separate16": res["mixed16"]["tokens_per_s"]
            / res["separate16"]["tokens_per_s"],
            **check,
        }
    print()
    print(
        report.fmt_table(
            [
                "model",
                "mixed16 ms",
                "separate16 ms",
                "mixed16 tok/s",
                "ratio",
                "tenant 3 grad diff",
            ],
            [
                [
                    k,
                    f"{v['mixed16']['ms']:.1f}",
                    f"{v['separate16']['ms']:.1f}",
                    f"{v['mixed16']['tokens_per_s']:.0f}",
                    f"{v['mixed16_over_separate16']:.2f}x",
                    f"{v['tenant3_grad_rel_diff_mixed_vs_separate']:.1e}",
                ]
                for k, v in training.items()
            ],
        )
    )
    sync = sync_bytes(args.small)
    print()
    print(
        report.fmt_table(
            ["sync (rank 8, every projection)", "one slot", "full weights", "%"],
            [
                [k, f"{v['slot_bytes']:,}", f"{v['full_weight_bytes']:,}", f"{v['percent']:.2f}"]
                for k, v in sync.items()
            ],
        )
    )
    memory = reference_memory(args.small)
    print()
    print(
        report.fmt_table(
            ["GRPO step (reference workload)", "weights MiB", "args+temps MiB"],
            [
                [k, f"{v['weights_bytes'] / 2**20:.1f}", f"{v['total_bytes'] / 2**20:.1f}"]
                for k, v in memory.items()
                if isinstance(v, dict) and "weights_bytes" in v
            ],
        )
    )
    for k in ("batch_over_policy_weights", "batch_over_policy_total", "copy_over_policy_weights"):
        print(f"{k}: {memory[k]:.3f}x")
    out = {"training": training, "sync": sync, "reference_memory": memory, "meta": run_meta}
    if args.json:
        report.dump_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
