"""The reference workload every lora_jax speed figure is quoted on.

As fixed in the project's performance anchors:

* a decoder-only transformer LM in Flax linen, float32: vocab 4096, d_model 512,
  4 blocks, 8 heads, MLP 2048 (GELU), pre-LayerNorm, learned positions, untied
  output head; about 16.9M parameters;
* sequence 128, batch 8, next-token cross-entropy on random tokens;
* LoRA rank 8, alpha 16 on the q, k, v, o, fc1 and fc2 kernels of every block
  (24 kernels, 294,912 trainable parameters); head and embeddings frozen.

The model is the examples' transformer LM (:mod:`examples.common.lm`) at the
reference size, with the parameter names every figure was measured on
(:data:`REFERENCE_NAMES`: ``tok``, ``pos``, ``blocks_{i}/attn/{q,k,v,o}``,
``blocks_{i}/{fc1,fc2}``). Its q/k/v/o projections are plain ``nn.Dense``
layers (2-D ``(in, out)`` kernels), so lora_jax's default layouts apply
without any ``layouts=``.

``--small`` dims (:data:`SMALL`) keep the same structure at toy size for tests.

The module also rebuilds the same architecture in Flax NNX (:func:`nnx_model`),
optionally with ``nnx.LoRALinear`` projections, with the linen weights copied
in, so every configuration of the benchmarks starts from the same numbers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import lora_jax
from examples.common.lm import LMConfig, ParamNames, TransformerLM, causal_attention, cross_entropy


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
SMALL = Dims(
    vocab=64, d_model=32, n_blocks=2, n_heads=2, d_mlp=64, seq=16, batch=2, rank=2, alpha=4.0
)

# Selects exactly the q, k, v, o, fc1 and fc2 kernels of every block.
TARGETS = r".*/(q|k|v|o|fc1|fc2)/kernel"
# The same modules, as a module-path regex (qwix matches module paths).
MODULE_TARGETS = r".*/(q|k|v|o|fc1|fc2)"
LR = 1e-3
WEIGHT_DECAY = 0.01


# The reference LM's parameter names. jit names a compiled step's arguments by
# their tree paths, so these names are part of the program the figures were measured on.
REFERENCE_NAMES = ParamNames(
    tok="tok", pos="pos/embedding", block="blocks_{}", attn_out="o", mlp=None
)


def dims(small: bool) -> Dims:
    return SMALL if small else REFERENCE


def lm_config(d: Dims) -> LMConfig:
    """The LM of the dims ``d``, with the reference names."""
    return LMConfig(
        vocab_size=d.vocab,
        seq_len=d.seq,
        d_model=d.d_model,
        num_heads=d.n_heads,
        num_layers=d.n_blocks,
        d_ff=d.d_mlp,
        names=REFERENCE_NAMES,
    )


def input_embeddings(variables: Any, tokens: jax.Array) -> jax.Array:
    """Token plus position embeddings of ``tokens`` (B, T) -> (B, T, d_model): the floor's variable.

    ``model.apply(variables, None, embeddings=h)`` gives the logits from them.
    """
    p = variables["params"]
    return jnp.take(p["tok"]["embedding"], tokens, axis=0) + jnp.take(
        p["pos"]["embedding"], jnp.arange(tokens.shape[-1]), axis=0
    )


# ---------------------------------------------------------------------------
# The workload: model, weights, batch, LoRA delta
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    dims: Dims
    model: TransformerLM
    variables: Any  # {"params": ...}: the base (frozen) weights
    delta: Any  # lora_jax delta over ``variables`` (B = 0 at init)
    config: lora_jax.LoraConfig
    inputs: jax.Array  # (batch, seq) int32
    targets: jax.Array  # (batch, seq) int32

    def optimizer(self) -> optax.GradientTransformation:
        return optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss(self, variables, inputs, targets):
        return cross_entropy(self.model.apply(variables, inputs), targets)


def lora_config(d: Dims) -> lora_jax.LoraConfig:
    return lora_jax.LoraConfig(targets=TARGETS, rank=d.rank, alpha=d.alpha)


def build(small: bool = False, seed: int = 0) -> Workload:
    """Builds the workload and checks its parameter counts against the spec."""
    d = dims(small)
    model = TransformerLM(lm_config(d))
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
        assert n_params == 16_874_496, n_params  # "about 16.9M"
        assert n_train == 294_912, n_train  # "295k"
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
        if lora_jax.advanced.is_factors(f)
        else f
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
            b, t, _ = h.shape
            q, k, v = (y.reshape(b, t, d.n_heads, -1) for y in (self.q(h), self.k(h), self.v(h)))
            x = x + self.o(causal_attention(q, k, v).reshape(b, t, d.d_model))
            return x + self.fc2(nn.gelu(self.fc1(self.ln2(x))))

    class NnxLM(nnx.Module):
        def __init__(self, rngs):
            self.tok = nnx.Embed(d.vocab, d.d_model, rngs=rngs)
            self.pos = nnx.Embed(d.seq, d.d_model, rngs=rngs)
            self.blocks = (
                nnx.List([NnxBlock(rngs) for _ in range(d.n_blocks)])
                if hasattr(nnx, "List")
                else [NnxBlock(rngs) for _ in range(d.n_blocks)]
            )
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
                copy(
                    lora,
                    {
                        "lora_a": jnp.asarray(
                            scale * rng.uniform(-bound, bound, lora.lora_a.shape), jnp.float32
                        ),
                        "lora_b": jnp.zeros(lora.lora_b.shape, jnp.float32),
                    },
                )
    left = [x for x in jax.tree.leaves(nnx.state(model)) if not isinstance(x, jax.Array)]
    assert not left, f"{len(left)} NNX variables were not filled"
    return model
