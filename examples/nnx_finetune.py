"""LoRA on a Flax NNX model with lora_jax: split, adapt the state, merge back.

lora_jax works on pytrees, and ``nnx.split`` turns any NNX module into one:

    graphdef, state = nnx.split(model)            # structure + nnx.State of arrays
    base, delta = init_lora(key, state, config)   # delta: factors at targeted kernels
    apply = implicit(lambda state, x: nnx.merge(graphdef, state)(x))
    logits = apply(base, delta, x)                # the adapted model, low-rank

The model is a tiny byte-level MLP language model (it predicts the next byte
from the previous 8). It is first trained in full on Python's documentation,
then adapted with LoRA to Python source code, then the adapter is merged into
the module for inference. Runs in well under a minute on a laptop CPU::

    python -m examples.nnx_finetune
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax
from examples.common.lm import cross_entropy
from examples.common.text import (
    VOCAB_SIZE,
    encode,
    eval_windows,
    pydoc_text,
    random_batches,
    stdlib_source_text,
    train_eval_split,
)

CONTEXT = 8  # bytes of context per prediction
BATCH_SIZE = 256


class ByteMLP(nnx.Module):
    """(batch, CONTEXT) bytes -> (batch, VOCAB_SIZE) next-byte logits."""

    def __init__(self, rngs: nnx.Rngs, embed_dim: int = 16, hidden: int = 256):
        self.embed = nnx.Embed(VOCAB_SIZE, embed_dim, rngs=rngs)
        self.fc1 = nnx.Linear(CONTEXT * embed_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, VOCAB_SIZE, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x).reshape(x.shape[0], -1)  # concatenate the context embeddings
        return self.fc2(nnx.gelu(self.fc1(h)))


def train(loss_fn, params, tokens, steps: int, lr: float, seed: int):
    """Minimizes ``loss_fn(params, batch)`` with AdamW; returns (params, optimizer state).

    ``params`` is whatever pytree is trained: the full model state in
    pretraining, only the LoRA delta in fine-tuning.
    """
    optimizer = optax.adamw(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = random_batches(tokens, BATCH_SIZE, CONTEXT, seed)
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state, next(batches))
    return params, opt_state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--lora-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    # Data: windows of CONTEXT + 1 bytes; the model sees the first CONTEXT and
    # predicts the last one.
    base_train, base_heldout = train_eval_split(encode(pydoc_text()))
    target_train, target_heldout = train_eval_split(encode(stdlib_source_text()))
    base_eval = jnp.asarray(eval_windows(base_heldout, CONTEXT, 4096))
    target_eval = jnp.asarray(eval_windows(target_heldout, CONTEXT, 4096))

    # --- 1. The NNX module, and its pytree view. -----------------------------
    model = ByteMLP(nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)  # state: an nnx.State (a pytree) of nnx.Param

    def model_loss(state, windows):
        logits = nnx.merge(graphdef, state)(windows[:, :-1])
        return cross_entropy(logits, windows[:, -1])

    # Pretrain every parameter on the base domain, and load the result back
    # into the module.
    state, _ = train(model_loss, state, base_train, args.pretrain_steps, 3e-3, args.seed)
    nnx.update(model, state)
    print(f"pretrained: base-domain loss {float(model_loss(state, base_eval)):.4f}")

    # --- 2. LoRA on the nnx.State. --------------------------------------------
    # Paths in an nnx.State are attribute names: 'fc1/kernel', 'embed/embedding'.
    config = lora_jax.LoraConfig(targets=r"(fc1|fc2)/kernel", rank=4, alpha=8)
    base, delta = lora_jax.init_lora(jax.random.key(args.seed), state, config)
    lora_jax.print_summary(base, delta)

    # The adapted model: rebuild the module from a state and call it. `implicit`
    # runs it with x @ W + s * (x @ A) @ B at every adapted kernel, never forming
    # W + s*A@B (`nnx.merge(graphdef, lora_jax.merge(base, delta))(x)` is the
    # same function, merged on the fly).
    forward = lora_jax.implicit(lambda state, x: nnx.merge(graphdef, state)(x), strict=True)

    def lora_loss(delta, windows):
        # `base` is closed over, so jax.grad w.r.t. `delta` leaves it frozen.
        return cross_entropy(forward(base, delta, windows[:, :-1]), windows[:, -1])

    before = float(lora_loss(delta, target_eval))
    delta, opt_state = train(lora_loss, delta, target_train, args.lora_steps, 1e-2, args.seed + 1)
    after = float(lora_loss(delta, target_eval))
    print(
        f"optimizer state: {lora_jax.advanced.tree_bytes(opt_state):,} bytes (full fine-tuning: "
        f"{lora_jax.advanced.tree_bytes(jax.eval_shape(optax.adamw(1e-2).init, state)):,})"
    )
    print(f"target loss: before {before:.4f} after {after:.4f}   (held-out stdlib source)")

    # --- 3. Merge the adapter into the module for inference. -----------------
    nnx.update(model, lora_jax.merge(base, delta))  # the module now holds W + s*A@B
    x = target_eval[:, :-1]
    diff = float(jnp.max(jnp.abs(model(x) - forward(base, delta, x))))
    print(f"max |merged module - training forward|: {diff:.3e}")
    # Unmerging recovers the pretrained module: its base-domain loss is unchanged.
    nnx.update(model, lora_jax.unmerge(nnx.state(model), delta))
    base_after = float(cross_entropy(model(base_eval[:, :-1]), base_eval[:, -1]))
    print(
        f"base loss: before {float(model_loss(base, base_eval)):.4f} after {base_after:.4f}"
        "   (module after unmerge)"
    )
    print(f"total time: {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
