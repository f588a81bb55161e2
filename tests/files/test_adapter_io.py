"""lora_jax adapter files: exact round trips, validation errors, atomic writes, orbax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax import (
    KernelLayout,
    LeafDelta,
    LoraBaseMismatchError,
    LoraConfig,
    LoraFactors,
    LoraFileError,
    LoraStructureError,
)
from lora_jax.advanced import LayerSelection

REPO = Path(__file__).resolve().parents[2]
CFG = "adapter_config.json"
WTS = "adapter_model.safetensors"


def make_factors(rng, shape, layout, rank, alpha=4.0, rslora=False, dora=False, dtype=jnp.float32):
    layout = KernelLayout(layout) if isinstance(layout, str) else layout
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    n = len(layout.stack_axes)
    m = 1.0 + rng.random(b_shape[:n] + b_shape[n + 1 :]) if dora else None
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    return LoraFactors(
        cast(rng.standard_normal(a_shape)),
        cast(rng.standard_normal(b_shape)),
        alpha=alpha,
        rslora=rslora,
        layout=layout,
        magnitude=cast(m),
    )


def example(dtype=jnp.float32):
    """A base with one kernel of each kind, and a delta touching all of them."""
    rng = np.random.default_rng(0)
    base = {
        "params": {
            "embed": {"embedding": jnp.asarray(rng.standard_normal((10, 4)), dtype)},
            "attn": {
                "q": {"kernel": jnp.asarray(rng.standard_normal((4, 2, 3)), dtype)},
                "o": {"kernel": jnp.asarray(rng.standard_normal((2, 3, 4)), dtype)},
            },
            "conv": {
                "kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), dtype),
                "bias": jnp.asarray(rng.standard_normal(5), dtype),
            },
            "layers": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 4)), dtype)},
            "head": {
                "kernel": jnp.asarray(rng.standard_normal((4, 6)), dtype),
                "bias": jnp.zeros(6, dtype),
            },
            "norm": {"scale": jnp.ones(4, dtype)},
        }
    }
    delta = jax.tree.map(lambda _: None, base)
    d = delta["params"]
    d["embed"]["embedding"] = make_factors(
        rng, (10, 4), KernelLayout("io", "embed"), 2, dtype=dtype
    )
    d["attn"]["q"]["kernel"] = make_factors(
        rng, (4, 2, 3), "ioo", 2, alpha=8.0, rslora=True, dtype=dtype
    )
    d["attn"]["o"]["kernel"] = make_factors(rng, (2, 3, 4), "iio", 3, dora=True, dtype=dtype)
    d["conv"]["kernel"] = make_factors(
        rng, (3, 3, 4, 5), KernelLayout("iiio", "conv"), 2, dtype=dtype
    )
    d["layers"]["kernel"] = make_factors(
        rng, (3, 4, 4), "sio", 2, alpha=1.5, dora=True, dtype=dtype
    )
    d["head"]["kernel"] = make_factors(rng, (4, 6), "io", 4, dtype=dtype)
    d["head"]["bias"] = LeafDelta(jnp.asarray(rng.standard_normal(6), dtype))
    return base, delta


def assert_same_delta(x, y):
    fx, tx = jax.tree_util.tree_flatten(x, is_leaf=lambda v: v is None)
    fy, ty = jax.tree_util.tree_flatten(y, is_leaf=lambda v: v is None)
    assert tx == ty  # same structure and the same static metadata (alpha, rslora, layout)
    for a, b in zip(fx, fy):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_exact(tmp_path, dtype):
    base, delta = example(dtype)
    cfg = LoraConfig(
        targets=[".*kernel", ".*embedding"],
        rank=2,
        rank_pattern={".*head.*": 4},
        alpha_pattern={".*layers.*": 1.5},
        layouts={".*/q/kernel": "ioo"},
        dtype=dtype,
        exclude=("x",),
    )
    lj.save(tmp_path / "a", delta, cfg)
    loaded, cfg2 = lj.load(tmp_path / "a")
    assert_same_delta(loaded, delta)  # rebuilt from the recorded tree, None leaves included
    assert cfg2 == cfg
    with_base, _ = lj.load(tmp_path / "a", base=base)
    assert_same_delta(with_base, delta)
    if dtype == jnp.float32:  # a DoRA leaf merges the same (one leaf: merges compile per shape)
        w, o = base["params"]["attn"]["o"], with_base["params"]["attn"]["o"]
        np.testing.assert_array_equal(
            lj.merge(w, o)["kernel"], lj.merge(w, delta["params"]["attn"]["o"])["kernel"]
        )


def test_layer_selection_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    f = make_factors(rng, (2, 4, 4), "sio", 2)  # layers 1 and 3 of a 4-layer stack
    f = LoraFactors(
        f.a, f.b, alpha=f.alpha, rslora=f.rslora, layout=f.layout, layers=LayerSelection((1, 3), 4)
    )
    base = {"k": jnp.zeros((4, 4, 4))}
    lj.save(tmp_path, {"k": f})
    assert json.loads((tmp_path / CFG).read_text())["targets"]["k"]["kernel_shape"] == [4, 4, 4]
    g = lj.load(tmp_path, base=base)[0]["k"]
    assert (g.layers.indices, g.layers.total) == ((1, 3), 4)
    assert_same_delta({"k": g}, {"k": f})
    with pytest.raises(LoraBaseMismatchError, match=r"kernel of shape \(4, 4, 4\)"):
        lj.load(tmp_path, base={"k": jnp.zeros((3, 4, 4))})
    edit_config(tmp_path, lambda c: c["targets"]["k"].update(layers=[3, 1]))
    with pytest.raises(LoraFileError, match="target 'k': key 'layers' is \\[3, 1\\]"):
        lj.load(tmp_path)


def test_config_file_contents(tmp_path):
    base, delta = example()
    lj.save(tmp_path, delta)
    doc = json.loads((tmp_path / CFG).read_text())
    assert doc["format"] == "lora_jax.adapter" and doc["format_version"] == 1
    assert doc["library_version"] == lj.__version__ and doc["config"] is None
    q = doc["targets"]["params/attn/q/kernel"]
    assert (q["rank"], q["alpha"], q["rslora"], q["dtype"]) == (2, 8.0, True, "float32")
    assert q["scaling"] == pytest.approx(8 / np.sqrt(2))
    assert q["layout"] == {"axes": "ioo", "kind": "dense"} and q["kernel_shape"] == [4, 2, 3]
    assert doc["targets"]["params/layers/kernel"]["tensors"]["magnitude"]["shape"] == [3, 4]
    assert doc["targets"]["params/head/bias"]["type"] == "full"
    assert "params/norm/scale" in doc["tree"]
    with safe_open(str(tmp_path / WTS), framework="np") as f:
        assert "params/attn/q/kernel.lora_A" in f.keys()
        assert f.metadata()["format"] == "lora_jax.adapter"


def test_callable_targets_config_is_not_restored(tmp_path):
    cfg = LoraConfig(targets=lambda p, x: p == "w", rank=2)
    lj.save(tmp_path, {"w": make_factors(np.random.default_rng(0), (4, 4), "io", 2)}, cfg)
    assert json.loads((tmp_path / CFG).read_text())["config"]["unserializable"] == ["targets"]
    assert lj.load(tmp_path)[1] is None


def test_nnx_state_base(tmp_path):
    from flax import nnx

    model = nnx.Linear(4, 3, kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
    base = state = nnx.state(model, nnx.Param)
    leaves, treedef = lj.advanced.leaves_with_paths(state)
    rng = np.random.default_rng(1)
    delta = jax.tree_util.tree_unflatten(  # what init_lora builds: the state's own structure
        treedef, [make_factors(rng, (4, 3), "io", 2) if p == "kernel" else None for p, _ in leaves]
    )
    lj.save(tmp_path, delta)
    loaded, _ = lj.load(tmp_path, base=state)
    assert jax.tree_util.tree_structure(
        loaded, is_leaf=lj.advanced.is_factors
    ) == jax.tree_util.tree_structure(delta, is_leaf=lj.advanced.is_factors)
    merged = lj.merge(base, loaded)
    nnx.update(model, merged)
    assert model(jnp.ones((1, 4))).shape == (1, 3)


def test_save_keeps_other_files_and_overwrites(tmp_path):
    base, delta = example()
    (tmp_path / "README.md").write_text("notes")
    lj.save(tmp_path, delta)
    small = {"w": make_factors(np.random.default_rng(1), (3, 3), "io", 1)}
    lj.save(tmp_path, small)
    assert (tmp_path / "README.md").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CFG, WTS]
    assert list(lj.load(tmp_path)[0]) == ["w"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraFileError, match="not a directory"):
        lj.save(tmp_path / "file", small)
    with pytest.raises(LoraStructureError, match="pass the delta, not the params"):
        lj.save(tmp_path / "p", base)


# --------------------------------------------------------------------------- validation


@pytest.fixture
def saved(tmp_path):
    base, delta = example()
    d = tmp_path / "adapter"
    lj.save(d, delta)
    return base, d


def edit_config(d, fn):
    doc = json.loads((d / CFG).read_text())
    fn(doc)
    (d / CFG).write_text(json.dumps(doc))


def edit_tensors(d, fn):
    with safe_open(str(d / WTS), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    fn(t)
    save_file(t, str(d / WTS))


def test_unknown_format_version(saved):
    _, d = saved
    edit_config(d, lambda c: c.update(format_version=7))
    with pytest.raises(LoraFileError, match=r"adapter_config.json: key 'format_version' is 7"):
        lj.load(d)
    edit_config(d, lambda c: c.update(format="other"))
    with pytest.raises(LoraFileError, match=r"adapter_config.json: key 'format' is 'other'"):
        lj.load(d)
    edit_config(d, lambda c: c.update(peft_type="LORA"))
    with pytest.raises(LoraFileError, match="use lora_jax.import_peft"):
        lj.load(d)


def test_missing_and_extra_tensors(saved, tmp_path):
    _, d = saved
    edit_tensors(d, lambda t: t.pop("params/head/kernel.lora_B"))
    with pytest.raises(
        LoraFileError,
        match=r"adapter_model.safetensors: tensor 'params/head/kernel.lora_B' "
        r"listed in adapter_config.json is missing",
    ):
        lj.load(d)
    edit_tensors(
        d,
        lambda t: t.update(
            {
                "params/head/kernel.lora_B": np.zeros((4, 6), np.float32),
                "params/extra.lora_A": np.zeros(2, np.float32),
            }
        ),
    )
    with pytest.raises(LoraFileError, match=r"tensor 'params/extra.lora_A' is not listed"):
        lj.load(d)


def test_shapes_that_contradict_the_config(saved):
    _, d = saved
    edit_tensors(d, lambda t: t.update({"params/head/kernel.lora_A": np.zeros((4, 3), np.float32)}))
    with pytest.raises(
        LoraFileError,
        match=r"tensor 'params/head/kernel.lora_A' has shape \(4, 3\) but "
        r"adapter_config.json says \(4, 4\)",
    ):
        lj.load(d)


def test_config_that_contradicts_itself(tmp_path):
    base, delta = example()
    for name, edit, msg in [
        (
            "rank",
            lambda c: c["targets"]["params/head/kernel"].update(rank=3, scaling=4 / 3),
            r"params/head/kernel.lora_A has shape \(4, 4\), but rank 3",
        ),
        (
            "kernel_shape",
            lambda c: c["targets"]["params/head/kernel"].update(kernel_shape=[5, 6]),
            r"rank 4 and kernel_shape \[5, 6\]",
        ),
        (
            "ndim",
            lambda c: c["targets"]["params/head/kernel"].update(kernel_shape=[4, 6, 1]),
            r"target 'params/head/kernel': key 'kernel_shape' \[4, 6, 1\] has 3 axes",
        ),
        (
            "scaling",
            lambda c: c["targets"]["params/head/kernel"].update(scaling=2.0),
            r"target 'params/head/kernel': key 'scaling' is 2.0",
        ),
        (
            "dtype",
            lambda c: c["targets"]["params/head/kernel"]["tensors"]["a"].update(dtype="bfloat16"),
            r"tensor 'params/head/kernel.lora_A' has dtype float32 but adapter_config.json says bfloat16",
        ),
        (
            "magnitude",
            lambda c: c["targets"]["params/head/kernel"].update(dora=True),
            r"target 'params/head/kernel' tensors: missing key 'magnitude'",
        ),
        (
            "layout",
            lambda c: c["targets"]["params/head/kernel"]["layout"].update(axes="xx"),
            r"target 'params/head/kernel': key 'layout' is invalid",
        ),
        (
            "type",
            lambda c: c["targets"]["params/head/kernel"].update(type="ia3"),
            r"key 'type' is 'ia3'",
        ),
        ("tree", lambda c: c.update(tree=[]), r"target '.*' is not listed in key 'tree'"),
    ]:
        d = tmp_path / name
        lj.save(d, delta)
        edit_config(d, edit)
        with pytest.raises(LoraFileError, match=msg):
            lj.load(d)


def test_truncated_and_corrupt_files(saved):
    _, d = saved
    good = (d / WTS).read_bytes()
    (d / WTS).write_bytes(good[: len(good) // 2])
    with pytest.raises(
        LoraFileError, match="adapter_model.safetensors: not a readable safetensors file"
    ):
        lj.load(d)
    (d / WTS).write_bytes(b"")
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        lj.load(d)
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # inside the tensor data: the header still parses
    (d / WTS).write_bytes(bytes(flipped))
    with pytest.raises(LoraFileError, match="adapter_model.safetensors: its sha256 does not match"):
        lj.load(d)
    lj.load(d, verify=False)  # opt out: the bytes are still well-formed
    (d / WTS).write_bytes(good)
    text = (d / CFG).read_text()
    (d / CFG).write_text(text[: len(text) // 2])
    with pytest.raises(LoraFileError, match="adapter_config.json: not valid JSON"):
        lj.load(d)
    (d / CFG).unlink()
    with pytest.raises(LoraFileError, match="adapter_config.json: file not found"):
        lj.load(d)
    with pytest.raises(LoraFileError, match="adapter directory not found"):
        lj.load(d / "nope")


def test_base_mismatch(saved):
    base, d = saved
    wrong = jax.tree.map(lambda x: x, base)
    wrong["params"]["head"]["kernel"] = jnp.zeros((4, 7))
    with pytest.raises(
        LoraBaseMismatchError,
        match=r"adapter_config.json: target 'params/head/kernel' is "
        r"for a kernel of shape \(4, 6\), but the base leaf "
        r"has shape \(4, 7\)",
    ):
        lj.load(d, base=wrong)
    del wrong["params"]["conv"]
    with pytest.raises(
        LoraBaseMismatchError, match=r"target 'params/conv/kernel' is not a leaf of the base"
    ):
        lj.load(d, base=wrong)
    with pytest.raises(LoraStructureError):  # also a LoraStructureError
        lj.load(d, base=wrong)


# --------------------------------------------------------------------------- atomic writes


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_failed_save_leaves_previous_adapter(saved, monkeypatch):
    base, d = saved
    before = snapshot(d)
    import lora_jax._files.lora_format as aio

    def half_then_fail(path, tensors, metadata=None):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("no space left on device")

    monkeypatch.setattr(aio, "write_safetensors", half_then_fail)
    small = {"w": make_factors(np.random.default_rng(2), (3, 3), "io", 1)}
    with pytest.raises(OSError, match="no space left"):
        lj.save(d, small)
    assert snapshot(d) == before  # untouched, no temporary files left behind
    assert_same_delta(lj.load(d, base=base)[0], example()[1])


def test_crash_between_renames_leaves_the_previous_adapter(saved, monkeypatch):
    base, d = saved
    import lora_jax._files.atomic as atomic

    real, calls = atomic.commit_file, []

    def crash_on_config(tmp, target):
        calls.append(target)
        if Path(target).name == CFG:
            raise KeyboardInterrupt  # the process dies after the tensors were renamed
        real(tmp, target)

    monkeypatch.setattr(atomic, "commit_file", crash_on_config)
    new = {"w": make_factors(np.random.default_rng(3), (3, 3), "io", 1)}
    with pytest.raises(KeyboardInterrupt):
        lj.save(d, new)
    assert [Path(c).name for c in calls] == [WTS, CFG]
    kept = [p for p in d.iterdir() if p.name.startswith(".")]
    assert [p.name for p in kept] == [f".{WTS}.{json.loads((d / CFG).read_text())['save_id']}"]
    assert_same_delta(lj.load(d, base=base)[0], example()[1])  # new tensors + old config
    kept[0].unlink()
    with pytest.raises(LoraFileError, match="key .save_id. differs.*interrupted"):
        lj.load(d)  # a tensor file no config describes is refused, never half-read
    monkeypatch.setattr(atomic, "commit_file", real)
    lj.save(d, new)
    assert_same_delta(lj.load(d)[0], new)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_killed_save_leaves_previous_adapter(saved):
    """A save killed mid-write (no cleanup runs): the old adapter still loads."""
    base, d = saved
    before = {CFG: (d / CFG).read_bytes(), WTS: (d / WTS).read_bytes()}
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np, jax.numpy as jnp
        import lora_jax as lj, lora_jax._files.lora_format as aio
        def killed(path, tensors, metadata=None):
            with open(path, "wb") as f:
                f.write(b"partial")
                f.flush()
            os._exit(9)  # like SIGKILL: no finally, no cleanup
        aio.write_safetensors = killed
        f = lj.LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 3)), alpha=1.0, layout=lj.KernelLayout("io"))
        lj.save({str(d)!r}, {{"w": f}})
    """)
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 9, r.stderr.decode()
    assert {CFG: (d / CFG).read_bytes(), WTS: (d / WTS).read_bytes()} == before
    assert [p.name for p in d.iterdir() if p.name.startswith(".")]  # the orphaned temp file
    assert_same_delta(lj.load(d, base=base)[0], example()[1])


# --------------------------------------------------------------------------- orbax


def test_orbax_saves_delta_and_combined_tree(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    base, delta = example()
    delta["params"]["head"]["bias"] = None  # plain LoRA factors (and DoRA magnitudes)
    ckpt = ocp.StandardCheckpointer()
    for name, tree in (("delta", delta), ("both", {"base": base, "delta": delta})):
        ckpt.save(tmp_path / name, tree)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = ckpt.restore(tmp_path / name, abstract)
        assert_same_delta(restored, tree)
    assert isinstance(restored["delta"]["params"]["layers"]["kernel"], LoraFactors)
