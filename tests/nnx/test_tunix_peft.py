"""tunix's PeftTrainer, unmodified, trains a tunix Qwen3 made LoRA by lora_jax.nnx.

A tiny random-weight Qwen3 config (tunix's own model code: einsum projections with
3-D kernels, nnx.Linear MLPs in an nnx.List of layers) is adapted with
``lora_nnx.lora`` and trained a few steps by ``PeftTrainer`` (its ``nnx.Optimizer(...,
wrt=nnx.LoRAParam)``, ``nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))``
and ``nnx.jit``). The result must equal the same steps taken by hand with lora_jax's
functional API (``lj.implicit`` on ``(base, delta)``, ``jax.grad``, optax), and only
the LoRA Variables may change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import nnx as lora_nnx

pytestmark = pytest.mark.tunix

BATCH, LENGTH, VOCAB, STEPS, LR = 4, 12, 64, 4, 1e-2
TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj/w|mlp/(gate|up|down)_proj/kernel)"


def _batches():
    """Two fixed batches (token 0 is padding), cycled: a loss that can only go down."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
        mask = np.ones((BATCH, LENGTH), np.int32)
        mask[:, -3:] = 0  # padded tail
        out.append({"input_tokens": tokens, "input_mask": mask})
    return out


def _model_inputs(batch):
    """tunix's inputs: positions and a causal mask over the valid tokens."""
    tokens, mask = jnp.asarray(batch["input_tokens"]), jnp.asarray(batch["input_mask"])
    positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
    attention_mask = causal[None] & mask[:, None, :].astype(bool)
    return {
        "input_tokens": tokens,
        "input_mask": mask,
        "positions": positions,
        "attention_mask": attention_mask,
    }


def _nll(logits, tokens, mask):
    """Next-token NLL over the valid targets, written here (not tunix's)."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(logp.dtype)
    return -(picked * m).sum() / m.sum()


def _state_arrays(module, what) -> dict[str, np.ndarray]:
    return {p: np.array(x) for p, x in lj.advanced.leaves_with_paths(nnx.state(module, what))[0]}


def test_peft_trainer_trains_a_lora_nnx_model_as_the_functional_api_does(tiny_qwen3, tmp_path):
    peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
    model = tiny_qwen3()
    batches = _batches()
    example = _model_inputs(batches[0])
    config = lj.LoraConfig(targets=TARGETS, rank=4, alpha=8.0, init="gaussian")
    lm = lora_nnx.lora(
        model,
        config,
        jax.random.key(0),
        example["input_tokens"],
        example["positions"],
        None,
        example["attention_mask"],
    )
    assert len(lm.adapted) == 2 * 7
    # The functional view of the same starting point, for the by-hand run.
    graphdef, base, delta = lora_nnx.split(lm)
    start_delta = delta
    frozen_before = _state_arrays(lm, nnx.Not(nnx.LoRAParam))
    lora_before = _state_arrays(lm, nnx.LoRAParam)

    def eval_loss(module, batch):
        x = _model_inputs(batch)
        logits, _ = module(x["input_tokens"], x["positions"], None, x["attention_mask"])
        return float(_nll(logits, x["input_tokens"], x["input_mask"]))

    loss_before = np.mean([eval_loss(lm, b) for b in batches])

    # --- tunix's trainer, as a tunix user runs it -------------------------------------
    trainer = peft_trainer.PeftTrainer(
        lm,
        optax.adamw(LR),
        peft_trainer.TrainingConfig(
            eval_every_n_steps=1000,
            max_steps=STEPS,
            pbar_description=None,
            checkpoint_root_directory=str(tmp_path / "ckpt"),
        ),
    )
    trainer = trainer.with_gen_model_input_fn(_model_inputs)
    trainer.train([batches[i % 2] for i in range(STEPS)])
    assert trainer.train_steps == STEPS

    loss_after = np.mean([eval_loss(lm, b) for b in batches])
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)

    frozen_after = _state_arrays(lm, nnx.Not(nnx.LoRAParam))
    assert frozen_after.keys() == frozen_before.keys()
    for path, x in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[path], x, err_msg=path)
    lora_after = _state_arrays(lm, nnx.LoRAParam)
    assert sorted(lora_after) == sorted(lora_before)
    unchanged = [p for p in lora_before if np.array_equal(lora_after[p], lora_before[p])]
    assert not unchanged, unchanged

    # --- the same steps by hand with the functional API -------------------------------
    forward = lj.implicit(lambda s, *a: nnx.merge(graphdef, s)(*a)[0])

    def loss_fn(d, x):
        logits = forward(base, d, x["input_tokens"], x["positions"], None, x["attention_mask"])
        return _nll(logits, x["input_tokens"], x["input_mask"])

    tx = optax.adamw(LR)
    opt_state = tx.init(delta)

    @jax.jit
    def step(d, opt_state, x):
        grads = jax.grad(loss_fn)(d, x)
        updates, opt_state = tx.update(grads, opt_state, d)
        return optax.apply_updates(d, updates), opt_state

    for i in range(STEPS):
        delta, opt_state = step(delta, opt_state, _model_inputs(batches[i % 2]))

    _, _, trained = lora_nnx.split(lm)
    rows = lj.advanced.leaves_with_paths(trained)[0]
    want = dict(lj.advanced.leaves_with_paths(delta)[0])
    start = dict(lj.advanced.leaves_with_paths(start_delta)[0])
    assert len(rows) == len(want) == 28
    worst = moved = 0.0
    for path, got in rows:
        ref = np.asarray(want[path])
        worst = max(worst, float(np.abs(np.asarray(got) - ref).max()))
        moved = max(moved, float(np.abs(ref - np.asarray(start[path])).max()))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=5e-5, err_msg=path)
    # Four AdamW steps of lr 1e-2 move the factors by ~4e-2; the two programs (tunix's
    # nnx.jit step, the functional jax.jit step) differ by float32 rounding only: measured
    # 1.3e-05 on jax 0.10.2 and 2.4e-05 on jax 0.12.0.1 (AdamW's m / sqrt(v) magnifies
    # rounding in tiny gradients).
    print(
        f"PeftTrainer vs functional: max |diff| {worst:.2e}, max movement {moved:.2e}, "
        f"loss {loss_before:.4f} -> {loss_after:.4f}"
    )
    assert moved > 1e-2 and worst < 1e-3 * moved, (worst, moved)

    # tunix's checkpoints (save_only_lora_params) restore into a fresh LoraModel.
    fresh = lora_nnx.lora(
        model,
        config,
        jax.random.key(1),
        example["input_tokens"],
        example["positions"],
        None,
        example["attention_mask"],
    )
    resumed = peft_trainer.PeftTrainer(
        fresh,
        optax.adamw(LR),
        peft_trainer.TrainingConfig(
            eval_every_n_steps=1000,
            max_steps=STEPS,
            pbar_description=None,
            checkpoint_root_directory=str(tmp_path / "ckpt"),
        ),
    )
    assert resumed.train_steps == STEPS
    restored = _state_arrays(fresh, nnx.LoRAParam)
    for path, x in lora_after.items():
        np.testing.assert_array_equal(restored[path], x, err_msg=path)
