"""Preemption-safe LoRA training: checkpoint the delta, optimizer state, step and RNG with
orbax's ``CheckpointManager`` (async saves), and resume exactly where a killed run left off.

Run it, kill it at any moment (``kill -9``, a preempted VM), run the same command again::

    python -m examples.resumable_training --ckpt /tmp/lora_run --steps 30 --out /tmp/lora_adapter

The second run restores the latest *complete* checkpoint and continues; its
losses and final delta are bit-identical to a run that was never interrupted.
What makes that true:

* **Everything that changes is in the checkpoint**: the delta, the optax
  state, the step and the RNG key (as raw ``key_data``; it drives LoRA
  dropout here). The frozen base is rebuilt from its own source, not saved.
* **The data is a function of the step** (``fold_in(data_key, step)`` here; a
  real loader would seek to ``step * batch_size``), so a resumed run sees the
  same batches.
* **orbax commits a checkpoint atomically**: it writes ``<step>.orbax-checkpoint-tmp-*``
  and renames it to ``<step>`` only after every array and its metadata are
  on disk, so a kill leaves the previous complete step as ``latest_step()``.
  ``save`` returns once the arrays are copied to host; the writing overlaps
  the next steps, and ``wait_until_finished`` before exit commits the last.
* **Nothing is donated** while a save may still read the arrays.

Each step appends ``step loss`` (the float's hex, so equality is exact) to
``--log``; the final delta goes to ``--out`` with ``lora_jax.save`` (itself
atomic: a kill during it leaves the previous adapter loadable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lora_jax as lj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(8, name="fc2")(h)


MODEL = MLP()
CONFIG = lj.LoraConfig(targets=r"params/fc[12]/kernel", rank=4, alpha=8)
OPT = optax.adamw(3e-2)
APPLY = lj.implicit(MODEL.apply, dropout=0.1)
DATA_KEY = jax.random.key(7)


def base_params():
    """The frozen base: rebuilt from its source (here a seed) on every start, never checkpointed."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 16)))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def initial_state(base) -> dict:
    """The train state at step 0: ``{"delta", "opt_state", "step", "rng"}`` (all arrays)."""
    _, delta = lj.init_lora(jax.random.key(1), base, CONFIG)
    return {
        "delta": delta,
        "opt_state": OPT.init(delta),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(2)),
    }


def batch(step):
    """The batch of a step: a function of the step alone, so a resumed run sees the same data."""
    kx = jax.random.fold_in(DATA_KEY, step)
    x = jax.random.normal(kx, (64, 16))
    return x, jnp.sin(x[:, :8] * 2.0) + x[:, 8:]


@jax.jit
def train_step(base, state):
    """One step: LoRA dropout from the state's key, Adam on the delta; returns (state, loss)."""
    key, dropout_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    x, y = batch(state["step"])

    def loss_fn(delta):
        out = APPLY(base, delta, x, lora_dropout_key=dropout_key)
        return jnp.mean((out - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["delta"])
    updates, opt_state = OPT.update(grads, state["opt_state"], state["delta"])
    new = {
        "delta": optax.apply_updates(state["delta"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": jax.random.key_data(key),
    }
    return new, loss


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    """Async saves every step, the last two kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def restore_or_init(manager: ocp.CheckpointManager, base) -> dict:
    """The latest complete checkpoint, restored into the train state's structure; else step 0."""
    state = initial_state(base)
    step = manager.latest_step()
    if step is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def train(args) -> dict:
    base = base_params()
    manager = checkpoint_manager(args.ckpt)
    state = restore_or_init(manager, base)
    start = int(state["step"])
    print(f"starting at step {start}", flush=True)
    with open(args.log, "a") as log:
        while int(state["step"]) < args.steps:
            state, loss = train_step(base, state)
            step = int(state["step"])
            log.write(f"{step} {float(loss).hex()}\n")
            log.flush()
            if step % args.save_every == 0 or step == args.steps:
                manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()  # the last async save is committed before exit
    manager.close()
    return state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (resumed if it has steps)")
    p.add_argument("--steps", type=int, default=30, help="total steps to train to")
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every N steps")
    p.add_argument("--log", default="losses.txt", help="appends 'step loss.hex()' per step")
    p.add_argument("--out", help="write the final delta here with lora_jax.save")
    args = p.parse_args(argv)
    state = train(args)
    if args.out:
        lj.save(args.out, state["delta"], CONFIG)
    print(f"done at step {int(state['step'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
