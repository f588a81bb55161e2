"""The ``lora-jax`` command line: inspect, merge, convert; exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax import KernelLayout, LoraFactors
from lora_jax._cli import _progress, main

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def example():
    rng = np.random.default_rng(0)
    base = {
        "params": {
            "dense": {
                "kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
            },
            "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
            "step": jnp.asarray(3, jnp.int32),
        }
    }
    delta = jax.tree.map(lambda _: None, base)
    delta["params"]["dense"]["kernel"] = LoraFactors(
        jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 4)), jnp.float32),
        alpha=4.0,
        rslora=False,
        layout=KernelLayout("io"),
        magnitude=jnp.asarray(1 + rng.random(4), jnp.float32),
    )
    delta["params"]["conv"]["kernel"] = LoraFactors(
        jnp.asarray(rng.standard_normal((3, 3, 2, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 4)), jnp.float32),
        alpha=2.0,
        rslora=False,
        layout=KernelLayout("iiio", "conv"),
    )
    return base, delta


def write_base(path: Path, tree) -> Path:
    leaves, _ = lj.advanced.leaves_with_paths(tree)
    save_file({p: np.ascontiguousarray(x) for p, x in leaves}, str(path), metadata={"note": "base"})
    return path


def read_flat(path: Path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def setup(tmp_path):
    base, delta = example()
    lj.save(tmp_path / "adapter", delta)
    write_base(tmp_path / "base.safetensors", base)
    return base, delta, tmp_path


# --------------------------------------------------------------------------- inspect


def test_inspect_our_format(setup, capsys):
    base, delta, tmp = setup
    code, out, err = run(capsys, "inspect", tmp / "adapter")
    assert code == 0 and err == ""
    assert "lora_jax adapter (format v1" in out and "params/conv/kernel" in out
    assert "adapter_model.safetensors (" in out and "2 targets" in out
    code, out, _ = run(capsys, "inspect", tmp / "adapter", "--json")
    info = json.loads(out)
    rows = {r["target"]: r for r in info["targets"]}
    assert rows["params/dense/kernel"]["dora"] and rows["params/dense/kernel"]["rank"] == 2
    assert rows["params/conv/kernel"]["shape"] == [3, 3, 2, 4]
    assert rows["params/conv/kernel"]["scaling"] == 1.0
    assert info["params"] == sum(
        f.num_params for f in jax.tree.leaves(delta, is_leaf=lj.advanced.is_factors)
    )


def test_inspect_peft(capsys):
    code, out, _ = run(capsys, "inspect", FIXTURES / "mlp_lora", "--json")
    assert code == 0
    info = json.loads(out)
    rows = {r["target"]: r for r in info["targets"]}
    assert info["format"] == "peft"
    assert rows["fc2"]["rank"] == 2 and rows["fc2"]["alpha"] == 3 and rows["fc2"]["shape"] == [5, 8]
    code, out, _ = run(capsys, "inspect", FIXTURES / "conv2d_dora")
    assert code == 0 and "PEFT LoRA adapter" in out and "use_dora=True" in out


def test_exit_codes_and_messages(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", tmp_path / "missing")
    assert code == 1 and out == "" and err.startswith("lora-jax: error: ") and "missing" in err
    code, _, err = run(capsys)
    assert code == 2 and "usage: lora-jax" in err
    code, _, err = run(capsys, "merge", "--adapter", "x", "--out", "y")
    assert code == 2 and "--base" in err
    code, _, err = run(capsys, "convert", "--to", "onnx", "a", "b")
    assert code == 2 and "invalid choice" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out
    (tmp_path / "adapter_config.json").write_text("{}")
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 1 and "neither a lora_jax nor a PEFT adapter" in err


def test_console_script_declared_and_runs():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lora-jax": "lora_jax._cli:main"}
    r = subprocess.run(
        [sys.executable, "-m", "lora_jax._cli", "inspect", str(FIXTURES / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 1 and "lora-jax: error:" in r.stderr and r.stdout == ""


# --------------------------------------------------------------------------- merge


def test_merge_safetensors(setup, capsys):
    base, delta, tmp = setup
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        tmp / "base.safetensors",
        "--adapter",
        tmp / "adapter",
        "--out",
        tmp / "out.safetensors",
        "--check-finite",
    )
    assert code == 0, err
    out = read_flat(tmp / "out.safetensors")
    want = dict(lj.advanced.leaves_with_paths(lj.merge(base, delta))[0])
    assert sorted(out) == sorted(want)
    for k in want:
        assert out[k].dtype == np.asarray(want[k]).dtype
        np.testing.assert_array_equal(out[k], np.asarray(want[k]), err_msg=k)
    with safe_open(str(tmp / "out.safetensors"), framework="np") as f:
        assert f.metadata() == {"note": "base"}
    assert "merged 2 of 4 leaves" in err


def test_merge_dtype_and_force(setup, capsys):
    base, delta, tmp = setup
    args = [
        "merge",
        "--base",
        tmp / "base.safetensors",
        "--adapter",
        tmp / "adapter",
        "--out",
        tmp / "out.safetensors",
        "--dtype",
        "bfloat16",
        "--no-progress",
    ]
    assert run(capsys, *args)[0] == 0
    out = read_flat(tmp / "out.safetensors")
    merged = lj.merge(base, delta)["params"]["dense"]["kernel"]
    assert out["params/dense/kernel"].dtype == jnp.bfloat16
    assert out["params/step"].dtype == np.int32  # non-floating leaves keep their dtype
    np.testing.assert_array_equal(
        out["params/dense/kernel"], np.asarray(merged.astype(jnp.bfloat16))
    )
    code, _, err = run(capsys, *args)
    assert code == 1 and "already exists (pass --force" in err
    assert run(capsys, *args, "--force")[0] == 0


def test_merge_refuses_mismatched_base(setup, capsys):
    base, delta, tmp = setup
    wrong = jax.tree.map(lambda x: x, base)
    wrong["params"]["dense"]["kernel"] = jnp.zeros((5, 4))
    write_base(tmp / "wrong.safetensors", wrong)
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        tmp / "wrong.safetensors",
        "--adapter",
        tmp / "adapter",
        "--out",
        tmp / "out.safetensors",
    )
    assert code == 1
    assert "target 'params/dense/kernel' is for a kernel of shape (6, 4)" in err
    assert not (tmp / "out.safetensors").exists()
    (tmp / "bad.safetensors").write_bytes(b"garbage!")
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        tmp / "bad.safetensors",
        "--adapter",
        tmp / "adapter",
        "--out",
        tmp / "out.safetensors",
    )
    assert code == 1 and "bad.safetensors: not a readable safetensors file" in err


def test_check_finite(setup, capsys):
    base, delta, tmp = setup
    f = delta["params"]["conv"]["kernel"]
    # Finite factors whose update overflows float32: only the merged kernel is Inf.
    delta["params"]["conv"]["kernel"] = LoraFactors(
        f.a.at[0, 0, 0, 0].set(1e30),
        f.b.at[0, 0].set(1e30),
        alpha=f.alpha,
        rslora=f.rslora,
        layout=f.layout,
    )
    lj.save(tmp / "bad", delta)
    args = [
        "merge",
        "--base",
        tmp / "base.safetensors",
        "--adapter",
        tmp / "bad",
        "--out",
        tmp / "out.safetensors",
    ]
    code, _, err = run(capsys, *args, "--check-finite")
    assert code == 1 and "leaf 'params/conv/kernel' has NaN or Inf" in err
    assert not (tmp / "out.safetensors").exists()
    assert run(capsys, *args)[0] == 0  # without the flag it writes what it got


def test_non_finite_adapter_tensors_are_refused_on_load(setup, capsys):
    base, delta, tmp = setup
    f = delta["params"]["conv"]["kernel"]
    delta["params"]["conv"]["kernel"] = f.replace(b=f.b.at[0, 0].set(jnp.inf))
    lj.save(tmp / "inf", delta)
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        tmp / "base.safetensors",
        "--adapter",
        tmp / "inf",
        "--out",
        tmp / "out.safetensors",
    )
    assert code == 1 and "tensor 'params/conv/kernel.lora_B' has 1 NaN or Inf" in err
    assert not (tmp / "out.safetensors").exists()


def test_merge_orbax(setup, capsys):
    ocp = pytest.importorskip("orbax.checkpoint")
    base, delta, tmp = setup
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp / "base_ckpt").resolve(), base)
    ckpt.wait_until_finished()
    code, _, err = run(
        capsys,
        "merge",
        "--base",
        tmp / "base_ckpt",
        "--adapter",
        tmp / "adapter",
        "--out",
        tmp / "out_ckpt",
    )
    assert code == 0, err
    restored = ckpt.restore((tmp / "out_ckpt").resolve())
    want = lj.merge(base, delta)
    np.testing.assert_array_equal(
        restored["params"]["dense"]["kernel"], want["params"]["dense"]["kernel"]
    )
    np.testing.assert_array_equal(restored["params"]["step"], 3)


def test_merge_peft_adapter_with_name_map(tmp_path, capsys):
    with safe_open(str(FIXTURES / "stack_lora" / "reference.safetensors"), framework="np") as f:
        sd = {k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("base.")}
    base = {
        "params": {
            "layers": {
                "lin": {
                    "kernel": np.stack([sd[f"layers.{i}.lin.weight"].T for i in range(3)]),
                    "bias": np.stack([sd[f"layers.{i}.lin.bias"] for i in range(3)]),
                }
            }
        }
    }
    write_base(tmp_path / "base.safetensors", base)
    (tmp_path / "map.json").write_text(
        json.dumps(
            {
                "to_peft": [[r"params/layers/(\w+)/kernel", r"layers.{}.\1"]],
                "to_flax": [[r"layers\.(?P<layer>\d+)\.(\w+)", r"params/layers/\2/kernel"]],
            }
        )
    )
    args = [
        "merge",
        "--base",
        tmp_path / "base.safetensors",
        "--adapter",
        FIXTURES / "stack_lora",
        "--out",
        tmp_path / "out.safetensors",
    ]
    code, _, err = run(capsys, *args)
    assert code == 1 and "matches no leaf of the params under the name map" in err
    code, _, err = run(capsys, *args, "--name-map", tmp_path / "map.json")
    assert code == 0, err
    nm = lj.NameMap.from_json(tmp_path / "map.json")
    want = lj.merge(base, lj.import_peft(FIXTURES / "stack_lora", base, name_map=nm))
    np.testing.assert_array_equal(
        read_flat(tmp_path / "out.safetensors")["params/layers/lin/kernel"],
        want["params"]["layers"]["lin"]["kernel"],
    )


# --------------------------------------------------------------------------- convert


def test_convert_round_trip(setup, capsys):
    base, delta, tmp = setup
    f = delta["params"]["dense"]["kernel"]
    delta["params"]["dense"]["kernel"] = LoraFactors(
        f.a, f.b, alpha=f.alpha, rslora=f.rslora, layout=f.layout
    )  # no DoRA
    lj.save(tmp / "plain", delta)
    code, _, err = run(
        capsys,
        "convert",
        "--to",
        "peft",
        tmp / "plain",
        tmp / "peft",
        "--base-model-name-or-path",
        "org/model",
    )
    assert code == 0, err
    cfg = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and cfg["target_modules"] == ["conv", "dense"]
    assert cfg["base_model_name_or_path"] == "org/model"
    code, _, err = run(
        capsys,
        "convert",
        "--to",
        "lora_jax",
        tmp / "peft",
        tmp / "back",
        "--base",
        tmp / "base.safetensors",
    )
    assert code == 0, err
    back, _ = lj.load(tmp / "back", base=base)
    for path in ("dense", "conv"):
        f, g = delta["params"][path]["kernel"], back["params"][path]["kernel"]
        assert (f.layout, f.alpha, f.rslora) == (g.layout, g.alpha, g.rslora)
        np.testing.assert_array_equal(f.a, g.a)
        np.testing.assert_array_equal(f.b, g.b)
    code, _, err = run(capsys, "convert", "--to", "peft", tmp / "peft", tmp / "x")
    assert code == 1 and "already a PEFT adapter" in err
    code, _, err = run(capsys, "convert", "--to", "lora_jax", tmp / "adapter", tmp / "x")
    assert code == 1 and "already a lora_jax adapter" in err


def test_convert_mixed_dora_is_refused(setup, capsys):
    _, _, tmp = setup  # the example mixes a DoRA and a plain kernel: PEFT's use_dora is global
    code, _, err = run(capsys, "convert", "--to", "peft", tmp / "adapter", tmp / "peft2")
    assert code == 1 and "use_dora is one flag" in err


def test_convert_peft_without_base(tmp_path, capsys):
    code, _, err = run(
        capsys, "convert", "--to", "lora_jax", FIXTURES / "conv2d_dora", tmp_path / "a"
    )
    assert code == 0, err
    loaded, _ = lj.load(tmp_path / "a")
    want = lj.import_peft(FIXTURES / "conv2d_dora")
    f, g = loaded["params"]["conv"]["kernel"], want["params"]["conv"]["kernel"]
    assert f.layout == g.layout == KernelLayout("iiio", "conv")
    np.testing.assert_array_equal(f.magnitude, g.magnitude)


def test_progress_passes_items_through():
    assert list(_progress([1, 2, 3], True, "x")) == [1, 2, 3]
    assert _progress([1], False, "x") == [1]
