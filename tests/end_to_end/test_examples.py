"""End-to-end runs of the examples, with tiny step counts.

Each example runs as a subprocess (exactly as a user would run it) and the
test checks the outcomes it prints: LoRA lowers the target-domain loss, the
merged model matches the training forward, and the base model is untouched.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax
from examples.common import generation, pretrained

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str, cwd: Path) -> str:
    """``python -m examples.<name> *args`` in ``cwd``, with the repository root on the path."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", f"examples.{name}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    """The floats captured by ``pattern`` in ``text`` (which must match)."""
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in output:\n{text}"
    return tuple(float(g) for g in match.groups())


FLOAT = r"([-+0-9.eE]+)"


def check_lora_outcomes(out: str, merge_tol: float) -> None:
    before, after = numbers(rf"target loss: before {FLOAT} after {FLOAT}", out)
    assert after < before, "LoRA fine-tuning did not lower the target-domain loss"
    base_before, base_after = numbers(rf"base loss: before {FLOAT} after {FLOAT}", out)
    assert abs(base_before - base_after) <= 1e-4, "unmerge did not restore the base model"
    (diff,) = numbers(rf"max \|merged .*\|: {FLOAT}", out)
    assert diff < merge_tol, "merged weights disagree with the training forward"


needs_extras = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("tqdm", "matplotlib")),
    reason="the demo needs the [examples] extras (tqdm, matplotlib)",
)


@needs_extras
def test_finetune_lm(tmp_path):
    out_dir = tmp_path / "out"
    out = run_example(
        "finetune_lm",
        "--pretrain-steps",
        "20",
        "--lora-steps",
        "20",
        "--out",
        str(out_dir),
        cwd=tmp_path,
    )

    assert "pretrained params: trained and cached" in out
    assert len(list(out_dir.glob("base_params-*.msgpack"))) == 1
    check_lora_outcomes(out, merge_tol=1e-3)
    assert "base params never modified: True" in out

    # The LoRA summary table and the labelled results are all printed.
    trainable, total, percent = numbers(
        r"trainable params: ([\d,]+) of ([\d,]+) \(([\d.]+)%\)", out.replace(",", "")
    )
    assert 0 < trainable < total and 0 < percent < 10
    (tokens_per_s,) = numbers(r"LoRA training throughput: ([\d,]+) tokens/s", out.replace(",", ""))
    assert tokens_per_s > 0
    lora_bytes, full_bytes = numbers(
        r"optimizer state: LoRA ([\d]+) bytes vs full fine-tuning ([\d]+) bytes",
        out.replace(",", ""),
    )
    assert 0 < lora_bytes < full_bytes / 5
    for label in (
        "params/block_0/attn/q/kernel",
        "--- base model ---",
        "--- LoRA fine-tuned model ---",
        "loss curve:",
        "adapter:",
    ):
        assert label in out

    # Files: the loss curve and the adapter (two factors per adapted kernel).
    png = out_dir / "loss_curve.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = out_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "adapter_config.json").is_file()
    delta, config = lora_jax.load(adapter)
    kernels = lora_jax.advanced.leaves_with_paths(delta, is_leaf=lora_jax.advanced.is_factors)[0]
    factors = {p: f for p, f in kernels if lora_jax.advanced.is_factors(f)}
    assert len(factors) == 12  # q, k, v, out, fc1, fc2 in 2 blocks
    assert factors["params/block_0/mlp/fc1/kernel"].a.shape == (128, 8)
    assert factors["params/block_0/mlp/fc1/kernel"].b.shape == (8, 512)
    assert config.rank == 8


@pytest.mark.slow
@needs_extras
def test_finetune_lm_over_a_quantized_base(tmp_path):
    out_dir = tmp_path / "out"
    out = run_example(
        "finetune_lm",
        "--pretrain-steps",
        "20",
        "--lora-steps",
        "20",
        "--quantize",
        "nf4",
        "--out",
        str(out_dir),
        cwd=tmp_path,
    )
    check_lora_outcomes(out, merge_tol=1e-3)
    n, dense, packed, bits = numbers(
        r"quantized base \(nf4\): (\d+) adapted kernels (\d+) bytes float32 -> (\d+) bytes "
        rf"\({FLOAT} bits/param",
        out.replace(",", ""),
    )
    assert n == 12 and packed < dense / 7 and 4.0 < bits <= 4.2
    f32, nf4 = numbers(rf"target loss of the base alone: float32 {FLOAT}, nf4 {FLOAT}", out)
    assert nf4 != f32 and abs(nf4 - f32) < 0.1 * f32


def test_pretrain_cache(tmp_path, capsys):
    """A second run loads the pretrained params from the cache instead of training."""
    tokens = np.arange(4096, dtype=np.int32) % 256

    trained, losses = pretrained.load_or_pretrain(tokens, 2, 0, tmp_path, use_cache=True)
    loaded, cached_losses = pretrained.load_or_pretrain(tokens, 2, 0, tmp_path, use_cache=True)
    printed = capsys.readouterr().out
    assert "trained and cached" in printed and "loaded from cache" in printed
    assert len(list(tmp_path.glob("base_params-*.msgpack"))) == 1
    np.testing.assert_array_equal(losses, cached_losses)
    assert jax.tree.structure(trained) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_demo_lm_kv_cache_generation_equals_full_recompute():
    """Greedy decoding with the KV cache (prompts of different lengths in one batch,
    right-padded) gives the tokens of re-running the whole prefix at every step,
    for the base and for an unmerged adapter under ``implicit``."""
    model = pretrained.MODEL
    params = model.init(jax.random.key(3), np.zeros((1, 8), np.int32))
    base, delta = lora_jax.init_lora(
        jax.random.key(4),
        params,
        lora_jax.LoraConfig(targets=r".*/(q|v|fc1)/kernel", rank=4, alpha=8),
    )
    delta = jax.tree.map(lambda x: x + 0.05, delta)  # B != 0: the adapter changes the model
    merged = lora_jax.merge(base, delta)
    prompts = [[5, 77, 3, 9, 120, 64, 2], [200, 11], list(range(40, 57))]
    n = 12

    forward = jax.jit(model.apply)  # on a fixed-width buffer: causal, so the tail is inert

    def recompute(p, prompt):
        buf = np.zeros((1, 64), np.int32)
        buf[0, : len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + n):
            buf[0, t] = int(np.argmax(forward(p, buf)[0, t - 1]))
        return buf[0, len(prompt) : len(prompt) + n].tolist()

    want = [recompute(merged, p) for p in prompts]
    assert want != [recompute(params, p) for p in prompts]  # the adapter matters
    got_merged = generation.Generator(model.apply, model)((merged,), prompts, n).tokens
    got_implicit = generation.Generator(lora_jax.implicit(model.apply), model)(
        (base, delta), prompts, n
    ).tokens
    assert got_merged == want
    assert got_implicit == want


def test_nnx_finetune(tmp_path):
    out = run_example(
        "nnx_finetune", "--pretrain-steps", "100", "--lora-steps", "100", cwd=tmp_path
    )
    assert "fc1/kernel" in out and "trainable params:" in out
    check_lora_outcomes(out, merge_tol=1e-4)
