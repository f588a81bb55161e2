"""PEFT adapter directories both ways.

Group 1 (no torch): every committed fixture under tests/fixtures/peft/ (written
by PEFT itself, see make_peft_fixtures.py) is imported into the equivalent
Flax layers and must reproduce PEFT's recorded outputs; export(import(f))
reproduces PEFT's tensors bit for bit; errors name the file and key.

Group 2 (marked torch: needs torch and peft): lora_jax deltas are exported, loaded with
``peft.PeftModel.from_pretrained`` into the PyTorch twin, and PEFT's outputs
must match the Flax model on the merged params.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
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
    LoraArgumentError,
    LoraBaseMismatchError,
    LoraError,
    LoraFactors,
    LoraFileError,
    LoraStructureError,
    NameMap,
    export_peft,
    import_peft,
)
from lora_jax.advanced import LayerSelection

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "adapter_config.json").is_file())
STACK_MAP = NameMap(
    to_peft=[(r"params/layers/(\w+)/kernel", r"layers.{}.\1")],
    to_flax=[(r"layers\.(?P<layer>\d+)\.(\w+)", r"params/layers/\2/kernel")],
)


# --------------------------------------------------------------------------- Flax twins


class FMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))


class FEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(12, 6, name="emb")(ids)


class FConv(nn.Module):
    features: int
    window: tuple

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, self.window, padding="VALID", name="conv")(x)


class FBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(5, name="lin")(x)), None


class FStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(FBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


class FTinyLM(nn.Module):
    """Embedding -> Dense -> the head tied to the embedding (``attend``)."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(12, 6, name="emb")
        return emb.attend(jnp.tanh(nn.Dense(6, name="fc")(emb(ids))))


def model_of(case: str) -> str:
    return case.split("_")[0]


def flax_module(model: str) -> nn.Module:
    return {
        "mlp": FMLP(),
        "embed": FEmbed(),
        "conv1d": FConv(5, (3,)),
        "conv2d": FConv(4, (3, 2)),
        "stack": FStack(),
        "lm": FTinyLM(),
    }[model]


def torch_to_flax(model: str, sd: dict) -> dict:
    """Base weights of the PyTorch twin (numpy, torch names) -> Flax params."""
    if model == "mlp":
        p = {n: {"kernel": sd[f"{n}.weight"].T, "bias": sd[f"{n}.bias"]} for n in ("fc1", "fc2")}
    elif model == "embed":
        p = {"emb": {"embedding": sd["emb.weight"]}}
    elif model == "lm":
        p = {
            "emb": {"embedding": sd["emb.weight"]},
            "fc": {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]},
        }
    elif model in ("conv1d", "conv2d"):
        w = sd["conv.weight"]
        p = {
            "conv": {
                "kernel": w.transpose(tuple(range(2, w.ndim)) + (1, 0)),
                "bias": sd["conv.bias"],
            }
        }
    else:
        p = {
            "layers": {
                "lin": {
                    "kernel": np.stack([sd[f"layers.{i}.lin.weight"].T for i in range(3)]),
                    "bias": np.stack([sd[f"layers.{i}.lin.bias"] for i in range(3)]),
                }
            }
        }
    return {"params": jax.tree.map(jnp.asarray, p)}


def flax_to_torch(model: str, params: dict) -> dict:
    """Inverse of :func:`torch_to_flax` (numpy arrays, torch names)."""
    p = jax.tree.map(np.asarray, params["params"])
    if model == "mlp":
        return {
            f"{n}.{k}": (p[n]["kernel"].T if k == "weight" else p[n]["bias"])
            for n in ("fc1", "fc2")
            for k in ("weight", "bias")
        }
    if model == "embed":
        return {"emb.weight": p["emb"]["embedding"]}
    if model == "lm":
        return {
            "emb.weight": p["emb"]["embedding"],
            "head.weight": p["emb"]["embedding"],
            "fc.weight": p["fc"]["kernel"].T,
            "fc.bias": p["fc"]["bias"],
        }
    if model in ("conv1d", "conv2d"):
        k = p["conv"]["kernel"]
        nw = k.ndim - 2
        return {
            "conv.weight": k.transpose((nw + 1, nw) + tuple(range(nw))),
            "conv.bias": p["conv"]["bias"],
        }
    out = {}
    for i in range(3):
        out[f"layers.{i}.lin.weight"] = p["layers"]["lin"]["kernel"][i].T
        out[f"layers.{i}.lin.bias"] = p["layers"]["lin"]["bias"][i]
    return out


def to_flax_input(model: str, x: np.ndarray) -> jnp.ndarray:
    if model == "conv1d":
        return jnp.asarray(x.transpose(0, 2, 1))
    if model == "conv2d":
        return jnp.asarray(x.transpose(0, 2, 3, 1))
    return jnp.asarray(x)


def to_torch_output(model: str, y) -> np.ndarray:
    y = np.asarray(jnp.asarray(y, jnp.float32))
    if model == "conv1d":
        return y.transpose(0, 2, 1)
    if model == "conv2d":
        return y.transpose(0, 3, 1, 2)
    return y


def read_reference(case: str) -> dict:
    with safe_open(str(FIXTURES / case / "reference.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def fixture(case: str):
    ref = read_reference(case)
    model = model_of(case)
    # PiSSA / OLoRA adapters belong to the residual base PEFT's initialiser left
    prefix = "residual." if any(k.startswith("residual.") for k in ref) else "base."
    sd = {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}
    return model, torch_to_flax(model, sd), ref


def name_map_for(model: str):
    return STACK_MAP if model == "stack" else None


def residual(case: str) -> dict:
    """PiSSA / OLoRA adapters are imported onto the residual base their initialiser left."""
    return {"residual_base": True} if case.endswith(("_pissa", "_olora")) else {}


def tensors_of(directory: Path) -> dict:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def tol(case: str) -> dict:
    # bf16: PEFT computes the unmerged branch in bf16, we merge then run in bf16; outputs are
    # |y| < 1, so 2**-7 is two bf16 ulps. The merged kernel is checked exactly below.
    return dict(rtol=0, atol=2**-7) if "bf16" in case else dict(rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------- group 1: fixtures


@pytest.mark.parametrize("case", CASES)
def test_fixture_matches_peft_outputs(case):
    model, params, ref = fixture(case)
    module, x = flax_module(model), to_flax_input(model, ref["input"])
    base_out = to_torch_output(model, module.apply(params, x))
    np.testing.assert_allclose(base_out, np.float32(ref["base_output"]), **tol(case))
    delta = import_peft(FIXTURES / case, params, name_map=name_map_for(model), **residual(case))
    out = to_torch_output(model, module.apply(lj.merge(params, delta), x))
    np.testing.assert_allclose(out, np.float32(ref["output"]), **tol(case))
    assert not np.allclose(out, base_out, atol=1e-2)  # the adapter does something


@pytest.mark.parametrize("case", CASES)
def test_export_of_import_is_peft_bit_for_bit(case, tmp_path):
    model, params, _ = fixture(case)
    nm = name_map_for(model)
    delta = import_peft(FIXTURES / case, params, name_map=nm, **residual(case))
    cfg = export_peft(tmp_path, delta, name_map=nm, params=params)
    ours, theirs = tensors_of(tmp_path), tensors_of(FIXTURES / case)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        if "lora_" in k:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
        else:  # modules_to_save: W + (V - W) in f32 is V up to rounding
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6, err_msg=k)
    peft_cfg = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    assert set(cfg) <= set(peft_cfg), set(cfg) - set(peft_cfg)  # only keys PEFT knows
    for key in ("use_rslora", "use_dora", "peft_type"):
        assert cfg[key] == peft_cfg[key]
    # and reading our export gives the same delta again
    again = import_peft(tmp_path, params, name_map=nm, **residual(case))
    for (p, f), (_, g) in zip(
        *(
            lj.advanced.leaves_with_paths(d, is_leaf=lj.advanced.is_factors)[0]
            for d in (delta, again)
        )
    ):
        if lj.advanced.is_factors(f):
            assert (f.alpha, f.rslora, f.layout) == (g.alpha, g.rslora, g.layout), p
            np.testing.assert_array_equal(f.a, g.a)
        else:  # a LeafDelta's diff
            np.testing.assert_allclose(f, g, rtol=1e-6, atol=1e-6, err_msg=p)


def test_import_reads_ranks_alphas_and_flags():
    _, params, _ = fixture("mlp_lora")
    d = import_peft(FIXTURES / "mlp_lora", params)["params"]
    assert (d["fc1"]["kernel"].rank, d["fc1"]["kernel"].alpha) == (4, 8.0)
    assert (d["fc2"]["kernel"].rank, d["fc2"]["kernel"].alpha) == (2, 3.0)  # rank/alpha_pattern
    assert d["fc1"]["bias"] is None and d["fc1"]["kernel"].layout == KernelLayout("io")
    _, params, _ = fixture("mlp_rslora")
    f = import_peft(FIXTURES / "mlp_rslora", params)["params"]["fc1"]["kernel"]
    assert f.rslora and f.scale == pytest.approx(6 / 2.0)
    _, params, _ = fixture("conv2d_dora")
    f = import_peft(FIXTURES / "conv2d_dora", params)["params"]["conv"]["kernel"]
    assert f.layout == KernelLayout("iiio", "conv")
    assert (f.a.shape, f.b.shape, f.magnitude.shape) == ((3, 2, 3, 2), (2, 4), (4,))
    _, params, _ = fixture("embed_dora")
    f = import_peft(FIXTURES / "embed_dora", params)["params"]["emb"]["embedding"]
    assert f.layout.kind == "embed" and f.magnitude.shape == (6,)


def test_bf16_merge_rounds_once_to_nearest_even():
    """merge(bf16 W, bf16 factors) is bf16(W + s A B) with the sum exact and ONE round to
    nearest even: bit-exact against a float64 reference. Wrong roundings (truncating, or
    rounding the update to bf16 before the add) fail it."""
    import ml_dtypes

    _, params, _ = fixture("mlp_bf16")
    f = import_peft(FIXTURES / "mlp_bf16", params)["params"]["fc1"]["kernel"]
    w = params["params"]["fc1"]["kernel"]
    merged = np.asarray(
        lj.merge(params, import_peft(FIXTURES / "mlp_bf16", params))["params"]["fc1"]["kernel"]
    )
    w64, a64, b64 = (np.asarray(v, np.float64) for v in (w, f.a, f.b))
    exact = w64 + f.scale * (a64 @ b64)
    bits = lambda v: np.asarray(v).view(np.uint16)  # noqa: E731
    want = exact.astype(np.float32).astype(ml_dtypes.bfloat16)
    assert merged.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(merged), bits(want))
    wrong = {
        "truncated": (exact.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16),
        "update rounded first": bits(
            (w64 + (f.scale * (a64 @ b64)).astype(ml_dtypes.bfloat16).astype(np.float64)).astype(
                ml_dtypes.bfloat16
            )
        ),
    }
    for name, other in wrong.items():  # the check has teeth: each wrong rounding differs
        assert (other != bits(want)).any(), name


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_match_peft_initialisers(init):
    """init_lora(init=...) on the original weights gives PEFT's own initial factors (each
    rank-1 component up to a sign, as SVD / QR fix none) and PEFT's residual base."""
    case = f"mlp_{init}"
    ref = read_reference(case)
    original = torch_to_flax("mlp", {k[5:]: v for k, v in ref.items() if k.startswith("base.")})
    cfg = lj.LoraConfig(targets=r"params/fc[12]/kernel", rank=3, alpha=6, init=init)
    base, delta = lj.init_lora(jax.random.key(0), original, cfg)
    _, residual, _ = fixture(case)
    peft = import_peft(FIXTURES / case, residual, residual_base=True)
    for name in ("fc1", "fc2"):
        ours, theirs = delta["params"][name]["kernel"], peft["params"][name]["kernel"]
        np.testing.assert_allclose(
            base["params"][name]["kernel"], residual["params"][name]["kernel"], rtol=1e-5, atol=1e-5
        )
        assert ours.scale == theirs.scale
        a, b, ta, tb = (np.asarray(v) for v in (ours.a, ours.b, theirs.a, theirs.b))
        signs = np.sign(np.sum(a * ta, axis=0))  # per component
        assert (signs != 0).all()
        np.testing.assert_allclose(a * signs, ta, rtol=1e-4, atol=1e-5, err_msg=f"{case} {name} A")
        np.testing.assert_allclose(
            b * signs[:, None], tb, rtol=1e-4, atol=1e-5, err_msg=f"{case} {name} B"
        )


def test_import_keeps_bf16_and_casts_on_request():
    _, params, _ = fixture("mlp_bf16")
    f = import_peft(FIXTURES / "mlp_bf16", params)["params"]["fc1"]["kernel"]
    assert f.a.dtype == jnp.bfloat16 and f.b.dtype == jnp.bfloat16
    g = import_peft(FIXTURES / "mlp_bf16", params, dtype=jnp.float32)["params"]["fc1"]["kernel"]
    assert g.a.dtype == jnp.float32
    np.testing.assert_array_equal(np.float32(f.a), g.a)


def test_import_accepts_shapes_only():
    _, params, _ = fixture("mlp_lora")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    d = import_peft(FIXTURES / "mlp_lora", shapes)
    assert d["params"]["fc2"]["kernel"].a.shape == (8, 2)


def test_import_without_params_uses_reverse_map():
    _, params, _ = fixture("stack_lora")
    with_params = import_peft(FIXTURES / "stack_lora", params, name_map=STACK_MAP)
    without = import_peft(FIXTURES / "stack_lora", name_map=STACK_MAP)
    f, g = (
        with_params["params"]["layers"]["lin"]["kernel"],
        without["params"]["layers"]["lin"]["kernel"],
    )
    assert g.layout == f.layout == KernelLayout("sio")
    np.testing.assert_array_equal(f.a, g.a)
    np.testing.assert_array_equal(f.b, g.b)
    d = import_peft(FIXTURES / "conv1d_lora")  # default reverse map: params/conv/kernel
    assert d["params"]["conv"]["kernel"].layout == KernelLayout("iio", "conv")
    assert set(import_peft(FIXTURES / "embed_lora")["params"]["emb"]) == {"embedding"}
    with pytest.raises(LoraFileError, match=r"layer \(1,\) of stacked Flax leaf"):
        import_peft(FIXTURES / "stack_partial", name_map=STACK_MAP)


def test_partial_stack_keeps_only_adapted_layers(tmp_path):
    _, params, _ = fixture("stack_partial")  # PEFT adapted layers.0.lin and layers.2.lin only
    f = import_peft(FIXTURES / "stack_partial", params, name_map=STACK_MAP)["params"]["layers"][
        "lin"
    ]["kernel"]
    assert (f.layers.indices, f.layers.total, f.a.shape) == ((0, 2), 3, (2, 5, 2))
    lj.save(tmp_path, {"k": f})  # and our format keeps the selection
    g = lj.load(tmp_path, base={"k": params["params"]["layers"]["lin"]["kernel"]})[0]["k"]
    assert (g.layers.indices, g.layers.total) == ((0, 2), 3)
    np.testing.assert_array_equal(g.b, f.b)


def test_partial_dora_stack_fills_norms(tmp_path):
    rng = np.random.default_rng(5)
    kernel = jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32)
    f = factors(rng, (3, 4, 4), "sio", 2, dora=True)
    delta = {
        "params": {
            "layers": {
                "lin": {
                    "kernel": LoraFactors(  # layers 0, 1 of 3 adapted
                        f.a[:2],
                        f.b[:2],
                        alpha=f.alpha,
                        rslora=f.rslora,
                        layout=f.layout,
                        magnitude=f.magnitude[:2],
                        layers=LayerSelection((0, 1), 3),
                    )
                }
            }
        }
    }
    d = tmp_path
    export_peft(d, delta, name_map=STACK_MAP)
    assert "base_model.model.layers.2.lin.lora_A.weight" not in tensors_of(d)
    params = {"params": {"layers": {"lin": {"kernel": kernel}}}}
    g = import_peft(d, params, name_map=STACK_MAP)["params"]["layers"]["lin"]["kernel"]
    assert g.layers is None and g.a.shape == (3, 4, 2) and not np.any(g.a[2])
    np.testing.assert_allclose(
        g.magnitude[2], np.linalg.norm(np.asarray(kernel[2]), axis=0), rtol=1e-6
    )
    merged = lj.merge(params, {"params": {"layers": {"lin": {"kernel": g}}}})["params"]["layers"][
        "lin"
    ]["kernel"]
    np.testing.assert_allclose(merged[2], kernel[2], rtol=1e-5, atol=1e-6)  # untouched layer
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(LoraFileError, match="needs concrete base params"):
        import_peft(d, shapes, name_map=STACK_MAP)


def test_callable_name_maps():
    _, params, _ = fixture("stack_lora")
    nm = NameMap(
        to_peft=lambda p: "layers.{}.lin" if p == "params/layers/lin/kernel" else None,
        to_flax=lambda m, kind: ("params/layers/lin/kernel", int(m.split(".")[1])),
    )
    a = import_peft(FIXTURES / "stack_lora", params, name_map=nm)
    b = import_peft(FIXTURES / "stack_lora", name_map=nm)
    np.testing.assert_array_equal(
        a["params"]["layers"]["lin"]["kernel"].b, b["params"]["layers"]["lin"]["kernel"].b
    )
    assert a["params"]["layers"]["lin"]["bias"] is None


def test_name_map_from_json(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(
        json.dumps(
            {
                "to_peft": [[r"params/layers/(\w+)/kernel", r"layers.{}.\1"]],
                "to_flax": {r"layers\.(?P<layer>\d+)\.(\w+)": r"params/layers/\2/kernel"},
            }
        )
    )
    nm = NameMap.from_json(f)
    assert nm.module_for("params/layers/lin/kernel") == "layers.{}.lin"
    assert nm.path_for("layers.2.lin", "dense") == ("params/layers/lin/kernel", (2,))
    f.write_text(json.dumps([[r"params/(\w+)/kernel", r"model.\1"]]))  # a plain list: to_peft
    assert NameMap.from_json(f).module_for("params/fc1/kernel") == "model.fc1"
    f.write_text("[[1, 2]]")
    with pytest.raises(LoraFileError, match="map.json"):
        NameMap.from_json(f)
    with pytest.raises(LoraFileError, match="not found"):
        NameMap.from_json(tmp_path / "nope.json")


def test_malformed_name_map_rules_are_argument_errors():
    with pytest.raises(
        LoraArgumentError, match=r"NameMap.to_peft: each rule is a \[regex, template\] pair"
    ):
        NameMap(to_peft=[("only a regex",)])
    with pytest.raises(LoraArgumentError, match=r"NameMap.to_flax: '\(' is not a valid regex"):
        NameMap(to_flax={"(": "x"})
    with pytest.raises(LoraError):  # the specific classes are still LoraErrors
        NameMap(to_peft=[(1, 2)])


def test_name_maps_that_do_not_fit_are_argument_errors(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(LoraArgumentError, match="gives no PyTorch module for target 'a'"):
        export_peft(tmp_path, {"a": factors(rng, (4, 4), "io", 2)}, name_map=lambda p: None)
    _, params, _ = fixture("stack_lora")
    with pytest.raises(LoraArgumentError, match=r"has 1 '\{\}' but its layout 'io' has 0 stacked"):
        import_peft(
            FIXTURES / "stack_lora", params, name_map=STACK_MAP, layouts={r".*/lin/kernel": "io"}
        )


# --------------------------------------------------------------------------- errors


def copy_case(case: str, tmp_path: Path) -> Path:
    d = tmp_path / case
    shutil.copytree(FIXTURES / case, d)
    (d / "reference.safetensors").unlink()
    return d


def rewrite(d: Path, edit) -> None:
    t = tensors_of(d)
    edit(t)
    save_file(t, str(d / "adapter_model.safetensors"))


def test_import_errors_name_file_and_key(tmp_path):
    _, params, _ = fixture("mlp_lora")
    d = copy_case("mlp_lora", tmp_path)
    rewrite(d, lambda t: t.update({"base_model.model.fc1.lora_B.bias": np.zeros(8, np.float32)}))
    with pytest.raises(
        LoraFileError, match=r"adapter_model.safetensors.*fc1.lora_B.bias.*lora_bias"
    ):
        import_peft(d, params)

    d = copy_case("mlp_lora", tmp_path / "b")
    rewrite(d, lambda t: t.pop("base_model.model.fc2.lora_B.weight"))
    with pytest.raises(LoraFileError, match=r"module 'fc2' has .* but no lora_B"):
        import_peft(d, params)

    d = copy_case("mlp_lora", tmp_path / "c")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraFileError, match=r"fc2.lora_A.weight' has rank 2 .* rank 4"):
        import_peft(d, params)

    cfg["rank_pattern"], cfg["use_dora"] = {"fc2": 2}, True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraFileError, match="lacks lora_magnitude_vector but .* use_dora=True"):
        import_peft(d, params)

    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraFileError, match=r"adapter_config.json: key 'peft_type' is 'IA3'"):
        import_peft(d, params)

    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraFileError, match="adapter_config.json: not valid JSON"):
        import_peft(d, params)

    d = copy_case("mlp_lora", tmp_path / "d")
    (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]
    )
    with pytest.raises(
        LoraFileError, match="adapter_model.safetensors: not a readable safetensors"
    ):
        import_peft(d, params)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoraFileError, match="adapter_model.bin: a pickled PyTorch adapter"):
        import_peft(d, params)


def test_import_base_mismatch(tmp_path):
    _, params, _ = fixture("mlp_lora")
    wrong = jax.tree.map(lambda x: x, params)
    wrong["params"]["fc1"]["kernel"] = jnp.zeros((7, 8))
    with pytest.raises(
        LoraBaseMismatchError, match=r"module 'fc1' -> Flax leaf 'params/fc1/kernel'"
    ):
        import_peft(FIXTURES / "mlp_lora", wrong)
    renamed = {"params": {"dense1": params["params"]["fc1"], "fc2": params["params"]["fc2"]}}
    with pytest.raises(LoraFileError, match=r"module 'fc1' .* matches no leaf .*name_map"):
        import_peft(FIXTURES / "mlp_lora", renamed)
    ok = import_peft(FIXTURES / "mlp_lora", renamed, name_map={r"params/dense1/kernel": "fc1"})
    assert ok["params"]["dense1"]["kernel"].rank == 4
    with pytest.raises(LoraArgumentError, match="module 'fc1' maps to two Flax leaves"):
        import_peft(FIXTURES / "mlp_lora", params, name_map={r".*/fc\d/kernel": "fc1"})
    _, cparams, _ = fixture("conv2d_lora")
    bad = {"params": {"conv": {"kernel": jnp.zeros((2, 3, 3, 4)), "bias": jnp.zeros(4)}}}
    with pytest.raises(LoraBaseMismatchError, match="does not match PyTorch conv weight"):
        import_peft(FIXTURES / "conv2d_lora", bad)


def test_our_format_is_refused_with_a_hint(tmp_path):
    delta = {
        "w": LoraFactors(
            jnp.ones((3, 1)), jnp.ones((1, 2)), alpha=1.0, rslora=False, layout=KernelLayout("io")
        )
    }
    lj.save(tmp_path, delta)
    with pytest.raises(LoraFileError, match="use lora_jax.load"):
        import_peft(tmp_path)


# --------------------------------------------------------------------------- export specifics


def factors(rng, shape, layout, rank, alpha=4.0, rslora=False, dora=False, dtype=np.float32):
    layout = KernelLayout(layout) if isinstance(layout, str) else layout
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    n = len(layout.stack_axes)
    m = 1.0 + rng.random(b_shape[:n] + b_shape[n + 1 :]) if dora else None
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    return LoraFactors(
        cast(rng.standard_normal(a_shape) * 0.5),
        cast(rng.standard_normal(b_shape) * 0.5),
        alpha=alpha,
        rslora=rslora,
        layout=layout,
        magnitude=cast(m),
    )


def test_export_rank_and_alpha_patterns(tmp_path):
    rng = np.random.default_rng(0)
    delta = {
        "params": {
            "lin": {"kernel": factors(rng, (6, 5), "io", 2, alpha=4.0)},
            "block": {
                "lin": {"kernel": factors(rng, (6, 5), "io", 3, alpha=4.0)},
                "fc": {"kernel": factors(rng, (6, 5), "io", 2, alpha=1.5)},
            },
            "head": {"kernel": factors(rng, (6, 5), "io", 2, alpha=4.0)},
        }
    }
    cfg = export_peft(tmp_path, delta)
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 4)
    # 'lin' also names the end of 'block.lin', so its pattern is anchored
    assert cfg["rank_pattern"] == {r"block\.lin": 3}
    assert cfg["alpha_pattern"] == {r"block\.fc": 1.5}
    assert cfg["target_modules"] == ["fc", "head", "lin"]  # short names, as a PEFT user writes
    back = import_peft(
        tmp_path,
        jax.tree.map(lambda f: jnp.zeros(f.kernel_shape), delta, is_leaf=lj.advanced.is_factors),
    )
    assert back["params"]["block"]["lin"]["kernel"].rank == 3
    assert back["params"]["lin"]["kernel"].rank == 2
    assert back["params"]["block"]["fc"]["kernel"].alpha == 1.5
    delta["params"]["lin"]["kernel"] = factors(rng, (6, 5), "io", 4)
    cfg = export_peft(tmp_path / "2", delta)
    assert cfg["rank_pattern"]["^lin"] == 4


def test_export_dense_general_flattens_and_imports_back(tmp_path):
    rng = np.random.default_rng(1)
    delta = {
        "params": {
            "q": {"kernel": factors(rng, (4, 2, 3), "ioo", 2)},
            "o": {"kernel": factors(rng, (2, 3, 4), "iio", 2)},
        }
    }
    export_peft(tmp_path, delta)
    t = tensors_of(tmp_path)
    assert t["base_model.model.q.lora_A.weight"].shape == (2, 4)
    assert t["base_model.model.q.lora_B.weight"].shape == (6, 2)
    assert t["base_model.model.o.lora_A.weight"].shape == (2, 6)
    params = {
        "params": {"q": {"kernel": jnp.zeros((4, 2, 3))}, "o": {"kernel": jnp.zeros((2, 3, 4))}}
    }
    back = import_peft(tmp_path, params)
    for name in ("q", "o"):
        f, g = delta["params"][name]["kernel"], back["params"][name]["kernel"]
        assert f.layout == g.layout
        np.testing.assert_array_equal(f.a, g.a)
        np.testing.assert_array_equal(f.b, g.b)
        np.testing.assert_allclose(lj.advanced.dense_delta(f), lj.advanced.dense_delta(g))


def test_import_ambiguous_nd_layout_needs_layouts(tmp_path):
    rng = np.random.default_rng(2)
    delta = {"params": {"q": {"kernel": factors(rng, (4, 1, 4), "ioo", 2)}}}
    export_peft(tmp_path, delta)
    params = {"params": {"q": {"kernel": jnp.zeros((4, 1, 4))}}}
    with pytest.raises(LoraBaseMismatchError, match="more than one split .* layouts="):
        import_peft(tmp_path, params)
    g = import_peft(tmp_path, params, layouts={r".*/q/kernel": "ioo"})["params"]["q"]["kernel"]
    assert g.layout == KernelLayout("ioo")


def test_export_errors(tmp_path):
    rng = np.random.default_rng(3)
    stacked = {"params": {"layers": {"lin": {"kernel": factors(rng, (3, 5, 5), "sio", 2)}}}}
    with pytest.raises(LoraArgumentError, match=r"1 stacked axes .* 0 '\{\}' placeholders"):
        export_peft(tmp_path, stacked)
    export_peft(tmp_path / "ok", stacked, name_map=STACK_MAP)
    assert "base_model.model.layers.2.lin.lora_B.weight" in tensors_of(tmp_path / "ok")
    mixed = {"a": factors(rng, (4, 4), "io", 2, rslora=True), "b": factors(rng, (4, 4), "io", 2)}
    with pytest.raises(LoraStructureError, match="use_rslora is one flag"):
        export_peft(tmp_path, mixed)
    mixed = {"a": factors(rng, (4, 4), "io", 2, dora=True), "b": factors(rng, (4, 4), "io", 2)}
    with pytest.raises(LoraStructureError, match="use_dora is one flag"):
        export_peft(tmp_path, mixed)
    clash = {"a": factors(rng, (4, 4), "io", 2), "b": factors(rng, (4, 4), "io", 2)}
    with pytest.raises(LoraArgumentError, match="both map to PyTorch module 'x'"):
        export_peft(tmp_path, clash, name_map=lambda p: "x")
    with pytest.raises(LoraStructureError, match="nothing to export"):
        export_peft(tmp_path, {"a": None})
    with pytest.raises(LoraStructureError, match="'bias' is a LeafDelta"):
        export_peft(tmp_path, {"a": factors(rng, (4, 4), "io", 2), "bias": LeafDelta(jnp.ones(4))})
    conv = {"c": factors(rng, (3, 4, 5), KernelLayout("ioi", "conv"), 2)}
    with pytest.raises(LoraStructureError, match=r"\(\*window, in, out\)"):
        export_peft(tmp_path, conv)


def test_export_is_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    export_peft(tmp_path, {"w": factors(rng, (4, 4), "io", 2)})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import lora_jax._files.peft.format as pf

    def boom(path, tensors, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pf, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        export_peft(tmp_path, {"w": factors(rng, (4, 4), "io", 3)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left


# --------------------------------------------------------------------------- group 2: PEFT loads our exports


def random_params(model: str, rng) -> dict:
    shapes = {
        "mlp": {"fc1": {"kernel": (6, 8), "bias": (8,)}, "fc2": {"kernel": (8, 5), "bias": (5,)}},
        "embed": {"emb": {"embedding": (12, 6)}},
        "conv1d": {"conv": {"kernel": (3, 4, 5), "bias": (5,)}},
        "conv2d": {"conv": {"kernel": (3, 2, 3, 4), "bias": (4,)}},
        "stack": {"layers": {"lin": {"kernel": (3, 5, 5), "bias": (3, 5)}}},
        "lm": {"emb": {"embedding": (12, 6)}, "fc": {"kernel": (6, 6), "bias": (6,)}},
    }[model]
    return {
        "params": jax.tree.map(
            lambda s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32),
            shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
    }


def random_input(model: str, rng) -> np.ndarray:
    if model == "embed":
        return rng.integers(0, 12, (2, 5))
    shape = {"mlp": (4, 6), "conv1d": (2, 4, 7), "conv2d": (2, 3, 6, 5), "stack": (3, 5)}[model]
    return rng.standard_normal(shape).astype(np.float32)


EXPORT_CASES = {  # name -> (model, {leaf: (layout, rank, alpha)}, rslora, dora)
    "mlp_patterns": ("mlp", {"fc1": ("io", 4, 8.0), "fc2": ("io", 2, 3.0)}, False, False),
    "mlp_rslora_dora": ("mlp", {"fc1": ("io", 3, 5.0), "fc2": ("io", 3, 5.0)}, True, True),
    "embed": ("embed", {"emb": (KernelLayout("io", "embed"), 3, 6.0)}, False, False),
    "embed_dora": ("embed", {"emb": (KernelLayout("io", "embed"), 2, 3.0)}, False, True),
    "conv1d_dora": ("conv1d", {"conv": (KernelLayout("iio", "conv"), 2, 4.0)}, False, True),
    "conv2d": ("conv2d", {"conv": (KernelLayout("iiio", "conv"), 2, 5.0)}, True, False),
    "stack_dora": ("stack", {"lin": ("sio", 2, 4.0)}, False, True),
    "stack_layers": ("stack", {"lin": ("sio", 2, 4.0)}, False, False),  # layers=(0, 2) of 3
}


def random_delta(model, leaves, rslora, dora, params, rng):
    delta = jax.tree.map(lambda _: None, params)
    for name, (layout, rank, alpha) in leaves.items():
        scope = delta["params"]["layers" if model == "stack" else name]
        leaf = "embedding" if model == "embed" else "kernel"
        if model == "stack":
            scope = scope["lin"]
        kernel = (
            params["params"]["layers"]["lin"] if model == "stack" else params["params"][name]
        )[leaf]
        scope[leaf] = factors(rng, kernel.shape, layout, rank, alpha, rslora, dora)
    return delta


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_peft_loads_our_export(case, tmp_path, peft_env):
    torch, peft, twins = peft_env
    model, leaves, rslora, dora = EXPORT_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    params = random_params(model, rng)
    delta = random_delta(model, leaves, rslora, dora, params, rng)
    if case == "stack_layers":
        f = delta["params"]["layers"]["lin"]["kernel"]
        delta["params"]["layers"]["lin"]["kernel"] = LoraFactors(
            f.a[::2],
            f.b[::2],
            alpha=f.alpha,
            rslora=f.rslora,
            layout=f.layout,
            layers=LayerSelection((0, 2), 3),
        )
    cfg = export_peft(tmp_path, delta, name_map=name_map_for(model))
    known = {f.name for f in __import__("dataclasses").fields(peft.LoraConfig)}
    assert set(cfg) <= known, set(cfg) - known

    twin = twins.MODELS[model]()
    twin.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(model, params).items()}
    )
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    x = random_input(model, rng)
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    module = flax_module(model)
    ours = to_torch_output(model, module.apply(lj.merge(params, delta), to_flax_input(model, x)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    base = to_torch_output(model, module.apply(params, to_flax_input(model, x)))
    assert not np.allclose(base, theirs, atol=1e-2)
    if model == "mlp":
        layer = peft_model.base_model.model.fc2
        assert layer.r["default"] == leaves["fc2"][1]
        assert layer.scaling["default"] == pytest.approx(delta["params"]["fc2"]["kernel"].scale)


@pytest.mark.torch
def test_peft_loads_flattened_dense_general(tmp_path, peft_env):
    torch, peft, _ = peft_env
    rng = np.random.default_rng(7)
    kernel = jnp.asarray(
        rng.standard_normal((4, 2, 3)), jnp.float32
    )  # DenseGeneral (d, heads, head_dim)
    params = {"params": {"proj": {"kernel": kernel}}}
    delta = {"params": {"proj": {"kernel": factors(rng, (4, 2, 3), "ioo", 2, dora=True)}}}
    export_peft(tmp_path, delta)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 6, bias=False)

        def forward(self, x):
            return self.proj(x)

    twin = Twin()
    twin.proj.weight.data = torch.from_numpy(np.asarray(kernel).reshape(4, 6).T.copy())
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    merged = lj.merge(params, delta)["params"]["proj"]["kernel"]
    ours = np.asarray(jnp.einsum("nd,dhk->nhk", x, merged)).reshape(3, 6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_peft_respects_anchored_patterns(tmp_path, peft_env):
    torch, peft, _ = peft_env
    rng = np.random.default_rng(8)

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)
            self.block = torch.nn.Module()
            self.block.lin = torch.nn.Linear(6, 5)

    delta = {
        "params": {
            "lin": {"kernel": factors(rng, (6, 5), "io", 4, alpha=2.0)},
            "block": {"lin": {"kernel": factors(rng, (6, 5), "io", 2, alpha=4.0)}},
        }
    }
    export_peft(tmp_path, delta)
    peft_model = peft.PeftModel.from_pretrained(Twin(), str(tmp_path))
    m = peft_model.base_model.model
    assert (m.lin.r["default"], m.block.lin.r["default"]) == (4, 2)
    assert (m.lin.lora_alpha["default"], m.block.lin.lora_alpha["default"]) == (2, 4)


# --------------------------------------------------------------------------- the docs page


def _doc_blocks() -> list[str]:
    """The python blocks of docs/files.md that use the PEFT format."""
    import re

    page = Path(__file__).resolve().parents[2] / "docs" / "files.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    return [b for b in blocks if any(k in b for k in ("export_peft", "PeftModel", "NameMap("))]


def _run_jax_blocks(tmp_path, monkeypatch) -> tuple[dict, list[str]]:
    """Runs the page's JAX blocks in ``tmp_path``; returns their namespace and the PyTorch blocks."""
    blocks = _doc_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch_blocks = [b for b in blocks if "import torch" in b]
    assert torch_blocks
    for block in blocks:
        if block not in torch_blocks:
            exec(compile(block, "docs/files.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "adapters" / "mlp_peft" / "adapter_model.safetensors").is_file()
    lj.load(tmp_path / "adapters" / "mlp", base=namespace["params"])
    return namespace, torch_blocks


def test_docs_peft_section_runs(tmp_path, monkeypatch):
    """The worked example's JAX blocks run as written."""
    _run_jax_blocks(tmp_path, monkeypatch)


@pytest.mark.torch
def test_docs_peft_section_runs_in_pytorch(tmp_path, monkeypatch):
    """The worked example's PyTorch block loads the exported adapter and gives the JAX output."""
    namespace, torch_blocks = _run_jax_blocks(tmp_path, monkeypatch)
    for block in torch_blocks:
        exec(compile(block, "docs/files.md", "exec"), namespace)  # noqa: S102
    assert np.allclose(namespace["y_torch"], namespace["y_jax"], atol=1e-4)
