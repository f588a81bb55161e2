"""The reference workload every lora_jax speed figure is quoted on.

As fixed in the project's performance anchors:

* a decoder-only transformer LM in Flax linen, float32: vocab 4096, d_model 512,
  4 blocks, 8 heads, MLP 2048 (GELU), pre-LayerNorm, learned positions, untied
  output head; about 16.9M parameters;
* sequence 128, batch 8, next-token cross-entropy on random tokens;
* LoRA rank 8, alpha 16 on the q, k, v, o, fc1 and fc2 kernels of every block
  (24 kernels, 294,912 trainable parameters); head and embeddings frozen.

The q/k/v/o projections are plain ``nn.Dense`` layers (2-D ``(in, out)``
kernels), so lora_jax's default layouts apply without any ``layouts=``.

``--small`` dims (:data:`SMALL`) keep the same structure at toy size for tests.

The module also rebuilds the same architecture in Flax NNX (:func:`nnx_model`),
optionally with ``nnx.LoRALinear`` projections, with the linen weights copied
in, so every configuration of the benchmarks starts from the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import lora_jax


@dataclasses.dataclass(frozen=True)
class Dims:
    vocab: int = 4096
    d_model: int = 512
    n_blocks: int = 4
    n_heads: int = 8
    d_mlp: int = 2048
    seq: int = 128
    batch: int = 8
    rank: int = 8
    alpha: float = 16.0

    @property
    def n_targets(self) -> int:
        return 6 * self.n_blocks

    def n_params(self) -> int:
        """Parameter count of the model, from the dims alone."""
        d, f, v = self.d_model, self.d_mlp, self.vocab
        attn = 4 * (d * d + d)
        mlp = d * f + f + f * d + d
        ln = 2 * d
        block = attn + mlp + 2 * ln
        return v * d + self.seq * d + self.n_blocks * block + ln + d * v + v

    def n_trainable(self) -> int:
        """LoRA parameter count (A and B of every targeted kernel), from the dims alone."""
        d, f, r = self.d_model, self.d_mlp, self.rank
        per_block = 4 * r * (d + d) + 2 * r * (d + f)
        return self.n_blocks * per_block


REFERENCE = Dims()
# Rank 2 (alpha 4: the same scale 2) keeps the LoRA share of the toy model small.
SMALL = Dims(vocab=64, d_model=32, n_blocks=2, n_heads=2, d_mlp=64, seq=16, batch=2,
             rank=2, alpha=4.0)

# Selects exactly the q, k, v, o, fc1 and fc2 kernels of every block.
TARGETS = r".*/(q|k|v|o|fc1|fc2)/kernel"
# The same modules, as a module-path regex (qwix matches module paths).
MODULE_TARGETS = r".*/(q|k|v|o|fc1|fc2)"
LR = 1e-3
WEIGHT_DECAY = 0.01


def dims(small: bool) -> Dims:
    return SMALL if small else REFERENCE


# ---------------------------------------------------------------------------
# Flax linen model
# ---------------------------------------------------------------------------


def causal_attention(q, k, v, n_heads: int):
    """Multi-head causal self-attention core: (B, T, D) q, k, v -> (B, T, D)."""
    b, t, d = q.shape
    dh = d // n_heads
    q, k, v = (x.reshape(b, t, n_heads, dh) for x in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)   # weak: keeps bf16 bf16
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return out.reshape(b, t, d)


class Attention(nn.Module):
    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.d_model, name="q")(x)
        k = nn.Dense(self.d_model, name="k")(x)
        v = nn.Dense(self.d_model, name="v")(x)
        return nn.Dense(self.d_model, name="o")(causal_attention(q, k, v, self.n_heads))


class Block(nn.Module):
    d_model: int
    n_heads: int
    d_mlp: int

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.d_model, self.n_heads, name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(self.d_model, name="fc2")(nn.gelu(nn.Dense(self.d_mlp, name="fc1")(h)))
        return x + h


class TransformerLM(nn.Module):
    """Decoder-only LM: pre-LN blocks, learned positions, untied head.

    ``apply(v, tokens)`` gives logits; ``apply(v, tokens, method="embed")``
    the input embeddings (token + position) and
    ``apply(v, h, method="from_embeddings")`` the logits from them (the trunk).
    """

    dims: Dims

    def setup(self):
        d = self.dims
        self.tok = nn.Embed(d.vocab, d.d_model)
        self.pos = nn.Embed(d.seq, d.d_model)
        self.blocks = [Block(d.d_model, d.n_heads, d.d_mlp) for _ in range(d.n_blocks)]
        self.ln_f = nn.LayerNorm()
        self.head = nn.Dense(d.vocab)

    def embed(self, tokens):
        return self.tok(tokens) + self.pos(jnp.arange(tokens.shape[-1]))

    def from_embeddings(self, h):
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def __call__(self, tokens):
        return self.from_embeddings(self.embed(tokens))


def cross_entropy(logits, targets):
    """Mean token cross-entropy, in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()


# ---------------------------------------------------------------------------
# The workload: model, weights, batch, LoRA delta
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    dims: Dims
    model: TransformerLM
    variables: Any          # {"params": ...}: the base (frozen) weights
    delta: Any              # lora_jax delta over ``variables`` (B = 0 at init)
    config: lora_jax.LoraConfig
    inputs: jax.Array       # (batch, seq) int32
    targets: jax.Array      # (batch, seq) int32

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss(self, variables, inputs, targets):
        return cross_entropy(self.model.apply(variables, inputs), targets)


def lora_config(d: Dims) -> lora_jax.LoraConfig:
    return lora_jax.LoraConfig(targets=TARGETS, rank=d.rank, alpha=d.alpha)


def build(small: bool = False, seed: int = 0) -> Workload:
    """Builds the workload and checks its parameter counts against the spec."""
    d = dims(small)
    model = TransformerLM(d)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, d.vocab, (d.batch, d.seq + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    variables = {"params": _fill(shapes["params"], rng)}
    config = lora_config(d)
    base, delta = lora_jax.init_lora(jax.random.key(seed), variables, config)

    n_params = lora_jax.count_params(base)
    n_train = lora_jax.count_params(delta)
    paths = [p for p, _ in lora_jax.advanced.leaves_with_paths(variables)[0]]
    n_targets = sum(bool(re.fullmatch(TARGETS, p)) for p in paths)
    assert n_params == d.n_params(), (n_params, d.n_params())
    assert n_train == d.n_trainable(), (n_train, d.n_trainable())
    assert n_targets == d.n_targets, (n_targets, d.n_targets)
    if not small:
        assert n_params == 16_874_496, n_params       # "about 16.9M"
        assert n_train == 294_912, n_train            # "295k"
        assert n_targets == 24, n_targets
    return Workload(d, model, base, delta, config, inputs, targets)


def _fill(shapes: Any, rng: np.random.Generator) -> Any:
    """Weights drawn with NumPy (jax.random compiles a program per shape: slow on a small CPU).

    LayerNorm scales 1, biases 0, kernels and tables N(0, 1/fan_in) (tables: 1/dim).
    """

    def fill(path, leaf):
        name = lora_jax.advanced.path_str(path).rsplit("/", 1)[-1]
        if name == "scale":
            value = np.ones(leaf.shape)
        elif name == "bias":
            value = np.zeros(leaf.shape)
        else:
            fan_in = leaf.shape[-1] if name == "embedding" else leaf.shape[0]
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def trained_like(delta: Any, seed: int = 1, std: float = 0.02) -> Any:
    """The delta with B drawn at random, so ``merge(base, delta) != base`` (for inference)."""
    leaves, treedef = jax.tree_util.tree_flatten(delta, is_leaf=lora_jax.advanced.is_factors)
    rng = np.random.default_rng(seed)
    out = [
        dataclasses.replace(f, b=jnp.asarray(std * rng.standard_normal(f.b.shape), f.b.dtype))
        if lora_jax.advanced.is_factors(f) else f
        for f in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------
# The same architecture in Flax NNX (for the nnx.LoRALinear configuration)
# ---------------------------------------------------------------------------


def nnx_model(wl: Workload, lora_rank: int | None = None, lora_alpha: float | None = None):
    """The workload's model rebuilt in NNX, with the linen weights copied in.

    With ``lora_rank``, q/k/v/o/fc1/fc2 are ``nnx.LoRALinear``. ``nnx.LoRA``
    computes ``x @ A @ B`` with no ``alpha / r`` factor, so the scale
    ``s = alpha / lora_rank`` is folded into A: A is ``s`` times a draw of
    nnx's default ``he_uniform``, B is 0 (so step 0 equals the base model).
    The layer's cost is exactly what Flax ships.

    The module is built abstractly (``nnx.eval_shape``) and every variable
    filled afterwards: no jax.random program is compiled.
    """
    from flax import nnx

    d = wl.dims

    def linear(n_in, n_out, rngs):
        if lora_rank is None:
            return nnx.Linear(n_in, n_out, rngs=rngs)
        return nnx.LoRALinear(n_in, n_out, lora_rank=lora_rank, rngs=rngs)

    class NnxBlock(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d.d_model, rngs=rngs)
            self.q = linear(d.d_model, d.d_model, rngs)
            self.k = linear(d.d_model, d.d_model, rngs)
            self.v = linear(d.d_model, d.d_model, rngs)
            self.o = linear(d.d_model, d.d_model, rngs)
            self.ln2 = nnx.LayerNorm(d.d_model, rngs=rngs)
            self.fc1 = linear(d.d_model, d.d_mlp, rngs)
            self.fc2 = linear(d.d_mlp, d.d_model, rngs)

        def __call__(self, x):
            h = self.ln1(x)
            x = x + self.o(causal_attention(self.q(h), self.k(h), self.v(h), d.n_heads))
            return x + self.fc2(nn.gelu(self.fc1(self.ln2(x))))

    class NnxLM(nnx.Module):
        def __init__(self, rngs):
            self.tok = nnx.Embed(d.vocab, d.d_model, rngs=rngs)
            self.pos = nnx.Embed(d.seq, d.d_model, rngs=rngs)
            self.blocks = nnx.List([NnxBlock(rngs) for _ in range(d.n_blocks)]) if hasattr(
                nnx, "List") else [NnxBlock(rngs) for _ in range(d.n_blocks)]
            self.ln_f = nnx.LayerNorm(d.d_model, rngs=rngs)
            self.head = nnx.Linear(d.d_model, d.vocab, rngs=rngs)

        def __call__(self, tokens):
            h = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
            for block in self.blocks:
                h = block(h)
            return self.head(self.ln_f(h))

    model = nnx.eval_shape(lambda: NnxLM(nnx.Rngs(0)))
    p = wl.variables["params"]
    rng = np.random.default_rng(1)

    def copy(module, tree):
        for name, value in tree.items():
            var = getattr(module, name)
            if isinstance(value, dict):
                copy(var, value)
            else:
                assert var.shape == value.shape, (name, var.shape, value.shape)
                if hasattr(var, "set_value"):
                    var.set_value(value)
                else:  # older flax
                    var.value = value

    copy(model.tok, p["tok"])
    copy(model.pos, p["pos"])
    copy(model.ln_f, p["ln_f"])
    copy(model.head, p["head"])
    for i, block in enumerate(model.blocks):
        bp = p[f"blocks_{i}"]
        for name in ("ln1", "ln2", "fc1", "fc2"):
            copy(getattr(block, name), bp[name])
        for name in ("q", "k", "v", "o"):
            copy(getattr(block, name), bp["attn"][name])
        if lora_rank is not None:
            scale = (lora_alpha if lora_alpha is not None else lora_rank) / lora_rank
            for name in ("q", "k", "v", "o", "fc1", "fc2"):
                lora = getattr(block, name).lora
                fan_in = lora.lora_a.shape[0]
                bound = np.sqrt(6.0 / fan_in)  # he_uniform
                copy(lora, {
                    "lora_a": jnp.asarray(scale * rng.uniform(-bound, bound, lora.lora_a.shape),
                                          jnp.float32),
                    "lora_b": jnp.zeros(lora.lora_b.shape, jnp.float32),
                })
    left = [x for x in jax.tree.leaves(nnx.state(model)) if not isinstance(x, jax.Array)]
    assert not left, f"{len(left)} NNX variables were not filled"
    return model


# ---------------------------------------------------------------------------
# Measurement helpers shared by train_step.py and inference.py
# ---------------------------------------------------------------------------


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
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            fn = steps_by_name[name]
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                samples[name].append(1e3 * (time.perf_counter() - t0))
        if log is not None:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {np.median(samples[n]):.1f}" for n in names) + " ms (running medians)")
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

    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
                "flax": flax.__version__, "optax": optax.__version__,
                "lora_jax": lora_jax.__version__}
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


def fmt_table(header, rows, left=(0,)) -> str:
    """A fixed-width text table; columns in ``left`` are left-aligned, others right-aligned."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = lambda r: "  ".join(  # noqa: E731
        (c.ljust(w) if i in left else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths]),
                      *map(line, rows)])


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def print_skipped(skipped: dict) -> None:
    """One line per configuration that could not run, with the reason."""
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


def write_json(path: str, results: dict, skipped: dict, run_meta: dict) -> None:
    """``{"configs": ..., "skipped": ..., "meta": ...}`` as the benchmarks' JSON output."""
    dump_json(path, {"configs": results, "skipped": skipped, "meta": run_meta})


def dump_json(path: str, doc: Any) -> None:
    """``doc`` as JSON at ``path``, written atomically (never half a file)."""
    import json
    from pathlib import Path

    text = json.dumps(doc, indent=2)
    lora_jax.advanced.atomic_write(Path(path), lambda tmp: tmp.write_text(text))
    print(f"wrote {path}")


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
        print(f"note: {args.rounds * args.steps} timed {unit} per config (< 20): a smoke run, "
              "not a quotable measurement")
    run_meta = meta(rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup,
                    small=args.small)
    wl = build(small=args.small)
    run_meta["dims"] = dataclasses.asdict(wl.dims)
    return names, wl, run_meta
