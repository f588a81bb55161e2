"""Adapter files a new user meets: PEFT configs with NaN alpha or odd fields, NaN / Inf
factors (``check_finite``), and ``lora-jax inspect ... | head``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import LoraFileError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
CFG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_copy(tmp_path: Path, name: str = "mlp_lora") -> Path:
    """A writable copy of a committed PEFT fixture (adapter files only)."""
    d = tmp_path / name
    d.mkdir()
    for f in (CFG, WEIGHTS):
        shutil.copy(FIXTURES / name / f, d / f)
    return d


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))  # json.dumps writes NaN / Infinity as PEFT's json would


def edit_tensor(path: Path, key: str, value: float) -> None:
    tensors = load_file(str(path))
    arr = tensors[key].copy()
    arr.reshape(-1)[1] = value
    tensors[key] = arr
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "key,value",
    [
        ("lora_alpha", math.nan),
        ("lora_alpha", math.inf),
        ("lora_alpha", -math.inf),
        ("lora_alpha", 0),
        ("lora_alpha", -2.0),
        ("lora_alpha", "8"),
        ("lora_alpha", True),
        ("r", 0),
        ("r", 2.5),
        ("r", math.nan),
        ("r", -1),
        ("r", None),
        ("target_modules", 7),
        ("target_modules", {"fc1": 1}),
        ("target_modules", ["fc1", 3]),
        ("rank_pattern", ["fc2"]),
        ("rank_pattern", {"fc2": 0}),
        ("alpha_pattern", {"fc2": math.nan}),
        ("alpha_pattern", {"(": 2}),
        ("alpha_pattern", {"(a+)+$": 2}),
        ("use_dora", "yes"),
    ],
)
def test_import_peft_refuses_bad_config_values(tmp_path, key, value):
    d = peft_copy(tmp_path)
    edit_json(d / CFG, **{key: value})
    with pytest.raises(LoraFileError, match=rf"{CFG}: key '{key}"):
        lj.import_peft(d)


def test_import_peft_accepts_a_regex_string_target_modules(tmp_path):
    # PEFT itself writes target_modules as one regex string for some configs.
    d = peft_copy(tmp_path)
    edit_json(d / CFG, target_modules=r".*fc\d")
    assert set(lj.import_peft(d)["params"]) == {"fc1", "fc2"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_import_peft_refuses_non_finite_factors_unless_asked(tmp_path, value):
    d = peft_copy(tmp_path)
    key = "base_model.model.fc2.lora_B.weight"
    edit_tensor(d / WEIGHTS, key, value)
    with pytest.raises(LoraFileError, match=rf"{WEIGHTS}: tensor '{key}' has 1 NaN or Inf"):
        lj.import_peft(d)
    delta = lj.import_peft(d, check_finite=False)
    assert not np.isfinite(np.asarray(delta["params"]["fc2"]["kernel"].b)).all()


def test_import_peft_check_finite_reads_bfloat16(tmp_path):
    d = peft_copy(tmp_path, "mlp_bf16")
    assert lj.import_peft(d)["params"]["fc1"]["kernel"].a.dtype == jnp.bfloat16
    key = "base_model.model.fc1.lora_A.weight"
    edit_tensor(d / WEIGHTS, key, np.inf)
    with pytest.raises(LoraFileError, match=f"tensor '{key}'"):
        lj.import_peft(d)


def small_delta():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, init="swapped")
    return params, lj.init_lora(jax.random.key(0), params, cfg)[1], cfg


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_load_refuses_non_finite_factors_unless_asked(tmp_path, value):
    params, delta, cfg = small_delta()
    bad = delta["dense"]["kernel"].replace(b=delta["dense"]["kernel"].b.at[0, 1].set(value))
    lj.save(tmp_path, {"dense": {"kernel": bad, "bias": None}}, cfg)
    with pytest.raises(LoraFileError, match=rf"{WEIGHTS}: tensor 'dense/kernel.lora_B' has 1 NaN"):
        lj.load(tmp_path)
    loaded, _ = lj.load(tmp_path, base=params, check_finite=False)
    assert not np.isfinite(np.asarray(loaded["dense"]["kernel"].b)).all()


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    # `lora-jax inspect DIR | head -0`: the reader is gone before anything is written.
    params, delta, cfg = small_delta()
    lj.save(tmp_path / "a", delta, cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_jax._cli", "inspect", str(tmp_path / "a")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err  # no "[Errno 32] Broken pipe", no "Exception ignored"
