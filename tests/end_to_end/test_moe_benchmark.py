"""Smoke test of ``python -m benchmarks.moe --small`` (slow: four programs compile): every
configuration reports positive finite times, the LoRA step computes no tensor shaped like
an experts kernel while merge-on-the-fly does, and the LoRA step through ``implicit`` and
the merge-on-the-fly step, started from the same delta and run the same steps, end at the
same loss. No wall-time ratio is asserted."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_moe_benchmark_small(tmp_path):
    out = tmp_path / "moe.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    cmd = [sys.executable, "-m", "benchmarks.moe", "--small", "--rounds", "1", "--steps", "2"]
    cmd += ["--warmup", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert set(configs) == {"floor", "lora", "merge", "full"}
    for r in configs.values():
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["loss"])
    assert configs["lora"]["experts_kernel_sized_ops"] == 0
    assert configs["merge"]["experts_kernel_sized_ops"] > 0
    assert configs["lora"]["loss"] == pytest.approx(configs["merge"]["loss"], rel=1e-4)
    assert set(result["ratios"]) == {"lora/floor", "merge/lora", "full/lora"}
