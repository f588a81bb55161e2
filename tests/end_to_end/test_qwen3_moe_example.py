"""``python -m examples.qwen3_moe.finetune`` end to end, with tiny step counts (slow)."""

from __future__ import annotations

import json
import re

import pytest

from tests.end_to_end.test_examples import check_lora_outcomes, numbers, run_example


@pytest.mark.slow
def test_qwen3_moe_finetune(tmp_path):
    out_dir = tmp_path / "out"
    out = run_example(
        "qwen3_moe.finetune",
        "--pretrain-steps", "30", "--lora-steps", "20", "--out", str(out_dir),
        cwd=tmp_path,
    )  # fmt: skip
    check_lora_outcomes(out, merge_tol=1e-3)
    assert "base params never modified: True" in out
    for label in (
        "params/layers_0/mlp/experts/gate_up_proj",
        "params/layers_1/self_attn/q_proj/kernel",
        "tokens per expert",
    ):
        assert label in out
    (reload_diff,) = numbers(r"re-imported and re-merged: max diff ([-+0-9.eE]+)", out)
    assert reload_diff < 1e-6
    cfg = json.loads((out_dir / "peft_adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    # per-expert counts: 2 layers x (before, after), each summing to tokens x top-2
    rows = re.findall(r"^\s+(\d)\s+(before|after)\s+([\d\s]+)$", out, re.MULTILINE)
    assert len(rows) == 4
    sums = {sum(int(c) for c in counts.split()) for _, _, counts in rows}
    assert sums == {64 * 64 * 2}  # NUM_EVAL_WINDOWS x SEQ_LEN x top-2
