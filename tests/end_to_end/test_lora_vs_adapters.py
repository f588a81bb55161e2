"""``python -m studies.lora_vs_adapters.study --quick``: it runs, the table has every row, and the numbers add up.

Trainable counts and Adam-state sizes are checked against formulas written
here from the model's dimensions (not read from the study's code); LoRA and
adapters start exactly at the base model; merged LoRA's logits differ from the base's
and equal the unmerged model's; unmerged LoRA adds no collective to the sharded
forward. No timing is asserted (a shared CPU).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_extras = pytest.mark.skipif(
    not importlib.util.find_spec("matplotlib"),
    reason="the study's figures need matplotlib ([examples] extra)",
)

V, SEQ, D, LAYERS, FF = 256, 128, 128, 2, 512  # examples.common.pretrained.CONFIG
PREFIX_HIDDEN = 256


def lora_count(
    r,
):  # q, k, v, out (d x d) and fc1 (d x ff), fc2 (ff x d): r * (fan_in + fan_out) each
    return LAYERS * r * (4 * 2 * D + 2 * (D + FF))


def adapter_count(m):  # two adapters per block: down d x m + m, up m x d + d
    return LAYERS * 2 * (2 * D * m + m + D)


def prefix_count(p):  # E (p x d), MLP d -> hidden -> 2 * layers * d
    return (
        p * D + D * PREFIX_HIDDEN + PREFIX_HIDDEN + PREFIX_HIDDEN * 2 * LAYERS * D + 2 * LAYERS * D
    )


def full_count():
    block = 4 * (D * D + D) + D * FF + FF + FF * D + D + 2 * 2 * D
    return V * D + SEQ * D + LAYERS * block + 2 * D + D * V + V


EXPECTED = {
    "full fine-tuning": full_count(),
    "Houlsby adapters m=36": adapter_count(36),
    "Houlsby adapters m=144": adapter_count(144),
    "prefix tuning P=4": prefix_count(4),
    "prefix tuning P=16": prefix_count(16),
    "prefix tuning P=64": prefix_count(64),
    "LoRA r=64 alpha=64": lora_count(64),
    "LoRA r=8 alpha=64": lora_count(8),
    "LoRA r=4 alpha=64": lora_count(4),
    "LoRA r=8 alpha=64, swapped init": lora_count(8),
    "LoRA r=64 alpha=64, rsLoRA": lora_count(64),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_vs_adapters")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "studies.lora_vs_adapters.study",
            "--quick",
            "--out",
            str(out),
            "--cache",
            str(out),
        ],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"the study's --quick run failed:\n{proc.stdout}\n{proc.stderr}"
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@needs_extras
def test_every_row_with_its_parameter_count(quick_run):
    out, report, stdout = quick_run
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == list(EXPECTED)
    for name, count in EXPECTED.items():
        assert rows[name]["trainable"] == count, name
        assert rows[name]["adam_bytes"] == 2 * 4 * count + 4, name  # mu, nu in f32 + a step count
        assert rows[name]["context"] == SEQ - rows[name]["info"].get("prefix", 0)
        for key in ("step_x_full", "step_mib", "target", "base_domain"):
            assert math.isfinite(rows[name][key]) and rows[name][key] > 0, (name, key)
    table = (out / "table.md").read_text()
    assert all(f"| {name} |" in table for name in EXPECTED) and table in stdout
    for png in ("curves.png", "rank.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_extras
def test_lora_and_adapters_start_at_the_base_model(quick_run):
    for row in quick_run[1]["rows"]:
        if row["kind"] in ("lora", "adapter"):
            assert row["loss0"] == pytest.approx(row["base_loss0"], abs=1e-5), row["method"]


@needs_extras
def test_merged_decoding_is_the_base_program_and_collectives(quick_run):
    report = quick_run[1]
    # the same jitted function on same-shaped params: true by construction, kept as the
    # README's statement; the checks that can fail are below
    assert report["merged_decode_program_is_base"] is True
    tp = report["tp_counts"]
    assert tp["base"]["total"] > 0 and tp["lora_merged"] == tp["base"]
    # unmerged LoRA adds no collective: its partial sums ride in the base's all-reduces
    assert tp["lora_unmerged"]["total"] == tp["base"]["total"], tp
    assert tp["adapters_sharded"]["total"] > tp["base"]["total"]


@needs_extras
def test_merged_lora_moves_the_logits_and_equals_the_unmerged_model(quick_run):
    check = quick_run[1]["merged_logits"]
    assert check["vs_unmerged"] < 1e-3, check  # the same model, float32
    assert check["vs_base"] > 100 * 1e-3, check  # the trained adapter moved it
