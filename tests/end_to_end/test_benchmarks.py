"""Smoke tests of ``python -m benchmarks.train_step`` and ``python -m benchmarks.inference``.

Each script runs once, in a subprocess, on the ``--small`` workload with one
round of one or two steps; the tests check the JSON it writes: every expected
configuration is there with positive finite numbers, every configuration
computes the same loss at step 0 (LoRA starts at the base model), and the
optimizer-state sizes are exactly Adam's ``2 x trainable bytes + a step
counter``, computed here from the model's dimensions. No wall-time ratio is
asserted: timings on a shared CPU are not a test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import lora_jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
F32 = 4  # bytes per float32
COUNTER = 4  # adamw's one int32 step count (scale_by_adam); its other parts hold no arrays


def _run(script: str, tmp_path: pathlib.Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Compile faster: these runs check plumbing and numbers, not speed.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    module = "benchmarks." + script.removesuffix(".py")  # run from the root: `python -m` finds it
    cmd = [
        sys.executable,
        "-m",
        module,
        "--small",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--json",
        str(out),
        *args,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(out.read_text())


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _params(d: dict) -> int:
    """Parameters of the benchmark LM, from its dims."""
    dm, f, v = d["d_model"], d["d_mlp"], d["vocab"]
    attn = 4 * (dm * dm + dm)  # q, k, v, o Dense with bias
    mlp = dm * f + f + f * dm + dm  # fc1, fc2 with bias
    block = attn + mlp + 2 * 2 * dm  # + two LayerNorms (scale, bias)
    return v * dm + d["seq"] * dm + d["n_blocks"] * block + 2 * dm + dm * v + v


def _lora_params(d: dict) -> int:
    """A (fan_in x r) + B (r x fan_out) for q, k, v, o (d x d), fc1 (d x f), fc2 (f x d)."""
    dm, f, r = d["d_model"], d["d_mlp"], d["rank"]
    return d["n_blocks"] * (4 * r * (dm + dm) + 2 * r * (dm + f))


def _has_qwix() -> bool:
    return importlib.util.find_spec("qwix") is not None


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    return _run("train_step.py", tmp_path_factory.mktemp("train"), "--steps", "2")


@pytest.fixture(scope="module")
def inference_json(tmp_path_factory):
    return _run("inference.py", tmp_path_factory.mktemp("inference"), "--steps", "2")


def test_reference_counts_match_the_spec():
    # The anchors' reference workload: ~16.9M params, 24 kernels, 295k LoRA params.
    d = dict(vocab=4096, d_model=512, n_blocks=4, d_mlp=2048, seq=128, rank=8)
    assert round(_params(d) / 1e6, 1) == 16.9
    assert _lora_params(d) == 294_912


def test_train_step_reports_every_config(train_json):
    configs, skipped = train_json["configs"], train_json["skipped"]
    expected = {"full", "floor", "merge", "nnx_lora"}
    expected |= {"lora_jax", "lora_jax_dora", "lora_jax_rslora", *QUANTIZED, "lora_jax_bf16"}
    expected |= {"qwix"} if _has_qwix() else set()
    assert expected <= set(configs), (sorted(configs), skipped)
    assert set(configs) | set(skipped) == expected | {"qwix"}
    if "qwix" not in configs:  # the benchmark itself says why the peer did not run
        assert "qwix is not importable" in skipped["qwix"], skipped
    if not hasattr(lora_jax, "implicit"):
        assert "implicit" in skipped["lora_jax"]
    for name, res in configs.items():
        for key in ("ms", "x_full", "x_floor", "compile_s", "gflop", "xla_temp_mib"):
            assert _positive_finite(res[key]), (name, key, res[key])
        assert math.isfinite(res["loss0"]) and math.isfinite(res["loss_end"]), (name, res)
        assert "FALLBACK" not in res.get("note", ""), (name, res["note"])
    assert configs["full"]["x_full"] == 1.0 and configs["floor"]["x_floor"] == 1.0
    meta = train_json["meta"]
    assert meta["versions"]["jax"] and meta["cores"] >= 1 and meta["rounds"] == 1


def test_every_config_starts_from_the_base_model(train_json):
    configs = train_json["configs"]
    loss0 = configs["full"]["loss0"]
    for name, res in configs.items():
        if name in QUANTIZED or name in BF16:  # rounded base: close, not equal
            assert res["loss0"] == pytest.approx(loss0, rel=0.05), name
            assert res["loss0"] != pytest.approx(loss0, rel=1e-7), name
            continue
        assert res["loss0"] == pytest.approx(loss0, rel=1e-5, abs=1e-5), name


QUANTIZED = ("lora_jax_nf4", "lora_jax_int8", "lora_jax_nf4_bf16", "lora_jax_int8_bf16")
BF16 = ("lora_jax_bf16",)


def test_base_kernel_bits(train_json):
    configs, d = train_json["configs"], train_json["meta"]["dims"]
    for name, res in configs.items():
        if name not in QUANTIZED:
            assert res["base_kernel_bits"] == (16.0 if name in BF16 else 32.0), name
    # int8 per output channel: 8 bits + one float32 scale per fan-in column of each kernel
    dm, f, n = d["d_model"], d["d_mlp"], d["n_blocks"]
    weights = n * (4 * dm * dm + 2 * dm * f)
    scales = n * (4 * dm + f + dm)
    for suffix in ("", "_bf16"):  # the same storage whatever the base dtype
        assert 4.0 < configs["lora_jax_nf4" + suffix]["base_kernel_bits"] <= 4.2
        assert configs["lora_jax_int8" + suffix]["base_kernel_bits"] == pytest.approx(
            8 + 32 * scales / weights
        )
    for name in QUANTIZED:  # the ratio to the LoRA step over the same base dtype is reported
        lora = configs["lora_jax_bf16" if name.endswith("_bf16") else "lora_jax"]
        assert configs[name]["x_lora_same_dtype"] == pytest.approx(
            configs[name]["ms"] / lora["ms"]
        ), name
        assert "x_lora_same_dtype" not in lora


def test_lora_jax_step_computes_the_same_update_as_merge(train_json):
    # Equal losses at step 0 prove nothing (B = 0); after several Adam steps from the same
    # delta, only the same gradients give the same factors.
    agreement = train_json["configs"]["lora_jax"]["update_vs_merge"]
    assert agreement["steps"] >= 3 and agreement["max_abs_update"] > 1e-4, agreement
    assert agreement["rel_diff"] < 1e-3, agreement


def test_optimizer_state_is_adam_over_the_trainable_leaves_only(train_json):
    configs, d = train_json["configs"], train_json["meta"]["dims"]
    full = 2 * F32 * _params(d) + COUNTER
    lora = 2 * F32 * _lora_params(d) + COUNTER
    assert configs["full"]["opt_state_bytes"] == full
    assert configs["floor"]["opt_state_bytes"] == 0
    for name in ("merge", "lora_jax", "lora_jax_rslora", *QUANTIZED, *BF16, "nnx_lora", "qwix"):
        if name in configs:
            assert configs[name]["opt_state_bytes"] == lora, name
            assert configs[name]["opt_state_bytes"] < full / 10, name
    # DoRA adds one magnitude per output feature of each kernel: 4 x d + (d_mlp + d) per block.
    magnitudes = d["n_blocks"] * (5 * d["d_model"] + d["d_mlp"])
    assert configs["lora_jax_dora"]["opt_state_bytes"] == lora + 2 * F32 * magnitudes


def test_lora_does_less_work_than_merge_on_the_fly(train_json):
    # FLOP counts are deterministic (unlike times): the implicit form skips the
    # dense weight gradient that merge-on-the-fly computes.
    configs = train_json["configs"]
    if "lora_jax" not in configs:
        pytest.skip("lora_jax.implicit not available")
    assert configs["lora_jax"]["gflop"] < configs["merge"]["gflop"]


def test_memory_mode_reports_the_stepping_peak_apart_from_compiling(tmp_path):
    out = _run(
        "train_step.py",
        tmp_path,
        "--steps",
        "1",
        "--configs",
        "floor,lora_jax,lora_jax_nf4",
        "--memory",
        "--memory-steps",
        "3",
    )
    assert out["meta"]["baseline_rss_mb"] > 0
    for name, res in out["configs"].items():
        assert _positive_finite(res["peak_rss_mb"]), name
        assert _positive_finite(res["compile_peak_rss_mb"]), name
        assert _positive_finite(res["x_floor_rss"]), name
        assert _positive_finite(res["live_arrays_mb"]), name
        if sys.platform.startswith("linux"):  # the peak was reset after compiling
            assert res["rss_peak_reset"] is True, name
    # the README's "live arrays smaller over NF4": the process stepping over an NF4 base holds
    # fewer bytes of live arrays than over float32 (deterministic, unlike RSS)
    live = {name: out["configs"][name]["live_arrays_mb"] for name in ("lora_jax", "lora_jax_nf4")}
    assert live["lora_jax_nf4"] < live["lora_jax"], live


def test_inference_reports_base_merged_implicit(inference_json):
    configs, skipped = inference_json["configs"], inference_json["skipped"]
    expected = {"base", "merged"} | ({"implicit"} if hasattr(lora_jax, "implicit") else set())
    assert set(configs) == expected, (sorted(configs), skipped)
    for name, res in configs.items():
        for key in ("ms", "x_base", "compile_s", "gflop"):
            assert _positive_finite(res[key]), (name, key, res[key])
        assert "FALLBACK" not in res.get("note", ""), (name, res["note"])
    assert configs["base"]["x_base"] == 1.0
    merged = configs["merged"]
    assert merged["same_program"] is True
    assert merged["gflop"] == configs["base"]["gflop"]
    assert merged["max_abs_diff_vs_base"] > 0  # the delta is not zero
    if "implicit" in configs:
        diff = configs["implicit"]["max_abs_diff_vs_merged"]
        assert diff < 1e-3 and diff < 0.01 * merged["max_abs_diff_vs_base"]
