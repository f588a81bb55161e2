"""Serve many LoRA adapters over one base model in one batch, with a KV cache.

    python -m examples.serve_many_adapters                 # demo LM, 16 adapters
    python -m examples.serve_many_adapters --gemma         # Gemma 3 270M (converted weights)

1. A base model: the demo byte-level LM (``examples/common/pretrained.py``, pretrained on
   Python's documentation and cached), or Gemma 3 270M with ``--gemma``.
2. 16 adapters: each trained briefly (``--steps``) on its own slice of the
   standard library's source (with ``--gemma``: random adapters, or
   ``--adapters-dir`` with lora_jax adapter directories to load).
3. ``lora_jax.stack_adapters`` puts them in one stack (ranks padded, scales as
   data); one request per adapter plus one for the bare base (id -1) are served
   in ONE batch by the jitted prefill + decode loop of ``examples/common/generation.py``
   over ``lora_jax.implicit(model.apply)`` with ``adapter_ids``.
4. Checks: every request's prefill logits and generated tokens against its
   adapter merged alone (``lora_jax.merge``) and served by itself; then a
   hot-swap (a new adapter into slot 0) that compiles nothing. Decode tokens/s
   are printed for the mixed batch and for serving each adapter separately.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from examples.common.generation import Generator
from lora_jax.debug import CompileCounter


def demo_setup(args):
    """(model, base params, adapters, prompts, decode) for the demo LM."""
    from examples.common.lm import cross_entropy
    from examples.common.pretrained import BATCH_SIZE, CONFIG, MODEL, load_or_pretrain
    from examples.common.text import (
        decode,
        encode,
        pydoc_text,
        random_batches,
        stdlib_source_text,
        train_eval_split,
    )

    base_train, _ = train_eval_split(encode(pydoc_text()))
    params, _ = load_or_pretrain(
        base_train, args.pretrain_steps, args.seed, args.out, use_cache=not args.no_cache
    )
    config = lj.LoraConfig(
        targets=[r".*/attn/(q|k|v|out)/kernel", r".*/mlp/(fc1|fc2)/kernel"], rank=8, alpha=16.0
    )
    base, delta0 = lj.init_lora(jax.random.key(args.seed), params, config)
    source = encode(stdlib_source_text())
    slices = np.array_split(source, args.adapters)
    opt = optax.adamw(3e-3, weight_decay=0.0)
    forward = lj.implicit(MODEL.apply)

    @jax.jit
    def step(delta, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda d: cross_entropy(forward(base, d, batch[:, :-1]), batch[:, 1:])
        )(delta)
        updates, opt_state = opt.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, loss

    adapters = []
    t0 = time.perf_counter()
    for i, text in enumerate(slices):
        _, delta = lj.init_lora(jax.random.key(args.seed + 1 + i), params, config)
        opt_state = opt.init(delta)
        batches = random_batches(text, BATCH_SIZE, CONFIG.seq_len, args.seed + i)
        for _ in range(args.steps):
            delta, opt_state, loss = step(delta, opt_state, next(batches))
        adapters.append(delta)
        print(
            f"adapter {i:2d}: {args.steps} steps on bytes {sum(map(len, slices[:i])):,}.., "
            f"loss {float(loss):.3f}"
        )
    print(f"trained {len(adapters)} adapters in {time.perf_counter() - t0:.1f}s")
    prompts = [[int(t) for t in s[:24]] for s in slices]
    del delta0
    return MODEL, base, adapters, prompts, lambda ids: decode(np.asarray(ids, np.uint8))


def gemma_adapter(args, i: int, params, config: lj.LoraConfig):
    """Adapter ``i`` for Gemma: ``adapters_dir/adapter_<i>`` if given, else a random one
    (B drawn small instead of zero, so each adapter changes the model)."""
    if args.adapters_dir:
        delta, _ = lj.load(Path(args.adapters_dir) / f"adapter_{i}", base=params)
        return delta
    _, delta = lj.init_lora(jax.random.key(args.seed + i), params, config)
    key = jax.random.key(100 + i)

    def random_b(f):
        if not lj.advanced.is_factors(f):
            return f
        nonlocal key
        key, sub = jax.random.split(key)
        return f.replace(b=0.01 * jax.random.normal(sub, f.b.shape, f.b.dtype))

    return jax.tree.map(random_b, delta, is_leaf=lj.advanced.is_factors)


def gemma_setup(args):
    """(model, base params, adapters, prompts, decode) for Gemma 3 270M."""
    from examples.gemma3 import gguf_loader as gl  # noqa: PLC0415
    from examples.gemma3 import model as gm  # noqa: PLC0415
    from examples.gemma3.tokenizer import Tokenizer  # noqa: PLC0415

    cfg, params, fields = gl.load(cache_dir=args.cache_dir, verbose=True)
    params = jax.tree.map(jnp.asarray, params)
    tok = Tokenizer(fields)
    model = gm.Gemma3(cfg)
    config = lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=8, alpha=16.0)
    base = lj.init_lora(jax.random.key(0), params, config)[0]
    adapters = [gemma_adapter(args, i, params, config) for i in range(args.adapters)]
    prompts = [
        tok.encode(f"Question {i}: what does the Python module", add_bos=True)
        for i in range(args.adapters)
    ]
    return model, base, adapters, prompts, tok.decode


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30, help="LoRA steps per adapter (demo LM)")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--no-cache", action="store_true", help="pretrain the demo base afresh")
    ap.add_argument("--gemma", action="store_true", help="Gemma 3 270M as the base")
    ap.add_argument("--cache-dir", default=None, help="Gemma's converted-weights cache")
    ap.add_argument(
        "--adapters-dir", default=None, help="with --gemma: load adapter_0..adapter_{N-1} from here"
    )
    args = ap.parse_args(argv)

    model, base, adapters, prompts, decode = (gemma_setup if args.gemma else demo_setup)(args)
    n = len(adapters)
    stack = lj.stack_adapters(adapters)
    # One request per adapter, in shuffled order, plus one for the bare base (id -1).
    order = np.random.default_rng(args.seed).permutation(n)
    ids = np.concatenate([order, [-1]]).astype(np.int32)
    requests = [prompts[i] for i in order] + [prompts[0]]

    mixed_apply = lambda b, s, i, t, **kw: lj.implicit(model.apply)(  # noqa: E731
        b, s, t, adapter_ids=i, **kw
    )
    mixed = Generator(mixed_apply, model)
    plain = Generator(model.apply, model)
    lora = Generator(lj.implicit(model.apply), model)

    out = mixed(
        (base, stack, jnp.asarray(ids)), requests, args.max_new_tokens, stop_at_eos=False
    )  # compiles
    out = mixed((base, stack, jnp.asarray(ids)), requests, args.max_new_tokens, stop_at_eos=False)
    print(
        f"\nmixed batch: {len(requests)} requests over {n} adapters + the base, one batch: "
        f"{out.decode_tokens_per_s:.0f} decode tokens/s"
    )

    # Check every request against its adapter merged alone, served by itself.
    logits = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731  (Gemma: (logits, cache))
    width = -(-max(map(len, requests)) // 16) * 16
    batch = np.zeros((len(requests), width), np.int32)
    for r, p in enumerate(requests):
        batch[r, : len(p)] = p
    logits_mixed = logits(
        jax.jit(lj.implicit(model.apply))(
            base, stack, jnp.asarray(batch), adapter_ids=jnp.asarray(ids)
        )
    )
    dense_apply = jax.jit(model.apply)
    agree, worst = 0, 0.0
    for row, (i, prompt) in enumerate(zip(ids, requests)):
        params = base if i < 0 else lj.merge(base, adapters[i])
        alone = plain((params,), [prompt], args.max_new_tokens, stop_at_eos=False)
        agree += alone.tokens[0] == out.tokens[row]
        want = logits(dense_apply(params, jnp.asarray(batch[row : row + 1])))[0, len(prompt) - 1]
        got = logits_mixed[row, len(prompt) - 1]
        worst = max(worst, float(jnp.abs(got - want).max() / jnp.abs(want).max()))
    print(
        f"checked against each adapter merged alone: {agree}/{len(requests)} identical "
        f"generations, prefill logits max rel. diff {worst:.1e}"
    )
    assert worst < 1e-4, worst

    # Each adapter's request served separately (unmerged, batch 1), for comparison.
    lora((base, adapters[0]), [requests[0]], args.max_new_tokens, stop_at_eos=False)  # compiles
    steps, decode_s = 0, 0.0
    for i, prompt in zip(ids[:-1], requests[:-1]):
        g = lora((base, adapters[i]), [prompt], args.max_new_tokens, stop_at_eos=False)
        decode_s += g.decode_s
        steps += g.decode_steps
    loop_rate = steps / max(decode_s, 1e-9)
    print(
        f"served one adapter at a time: {loop_rate:.0f} decode tokens/s "
        f"(mixed batch: {out.decode_tokens_per_s / max(loop_rate, 1e-9):.1f}x)"
    )

    # Hot-swap: adapter 1 into slot 0; nothing compiles (the stack is an argument).
    jax.block_until_ready(lj.set_adapter(stack, n - 1, adapters[0]))  # compiles the .at updates
    with CompileCounter() as counter:
        swapped = lj.set_adapter(stack, 0, adapters[1 % n])
        after = mixed(
            (base, swapped, jnp.asarray(ids)), requests, args.max_new_tokens, stop_at_eos=False
        )
    print(f"hot-swap into slot 0: {counter.count} compilations")
    for row in range(min(3, len(requests))):
        tag = "base" if ids[row] < 0 else f"adapter {ids[row]}"
        print(f"  [{tag}] {decode(requests[row])!r} -> {decode(out.tokens[row])!r}")
    return {
        "agree": int(agree),
        "requests": len(requests),
        "max_rel_diff": worst,
        "tokens_per_s": out.decode_tokens_per_s,
        "loop_tokens_per_s": loop_rate,
        "swap_compilations": counter.count,
        "after_swap_rows": len(after.tokens),
    }


if __name__ == "__main__":
    main()
