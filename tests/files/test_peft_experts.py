"""Expert kernels in PEFT's ``target_parameters`` layout, without torch.

The PyTorch side is checked against PEFT itself in
``tests/end_to_end/test_qwen3_moe.py`` (marked ``torch``); here:

* :func:`expert_layer` against PEFT's ``ParamWrapper.get_delta_weight``
  formula written out independently (``lora_A`` reshaped ``(E, r, in)``,
  ``lora_B`` ``(out, r, E)``), and the round trip through the reader
  (hypothesis: any ``E``, ``r``, ``in``, ``out``);
* ``export_peft`` on a Qwen3-MoE delta writes PEFT's keys (``gate_up_proj``
  nested under ``base_layer``), shapes and ``target_parameters``, and
  ``import_peft`` gives the factors back exactly, with params and without;
* a module's parameters are re-paired by shape when the nesting order does
  not fit them;
* errors name the parameter: a target_parameters entry whose Flax leaf is not
  an expert stack (not 3-D), an entry without a module, a rank that does not
  divide ``lora_A``'s rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from examples.qwen3_moe import ATTENTION, EXPERT_LAYOUT, EXPERTS, HF_NAMES, Qwen3MoeConfig
from examples.qwen3_moe import init_params as qwen_params
from lora_jax import LoraBaseMismatchError, LoraFileError
from lora_jax._files.peft.experts import expert_layer, split_wrapper_parts

PREFIX = "base_model.model."


def peft_delta(A: np.ndarray, B: np.ndarray, num_experts: int, scaling: float) -> np.ndarray:
    """PEFT's ParamWrapper.get_delta_weight for an (E, in, out) parameter (is_transposed),
    written from its definition: A (r*E, in) -> (E, r, in); B (out, r*E) -> (out, r, E)."""
    a = A.reshape(num_experts, -1, A.shape[-1])
    b = B.reshape(B.shape[0], -1, num_experts)
    return np.einsum("ore,eri->eio", b, a) * scaling


@settings(max_examples=25, deadline=None)
@given(
    e=st.integers(1, 5), r=st.integers(1, 4), i=st.integers(1, 6), o=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_expert_layer_is_peft_layout(e, r, i, o, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((e, i, r)), rng.standard_normal((e, r, o))
    A, B = expert_layer(a, b)
    assert A.shape == (r * e, i) and B.shape == (o, r * e)
    np.testing.assert_allclose(
        peft_delta(A, B, e, 0.5), 0.5 * np.einsum("eir,ero->eio", a, b), rtol=1e-12, atol=1e-12
    )
    cfg = {"r": r, "lora_alpha": 1, "target_parameters": ["m.w"]}
    parts = {"m": {"A": ("m.lora_A.weight", A, False), "B": ("m.lora_B.weight", B, False)}}
    rest, wrappers = split_wrapper_parts(Path("f"), cfg, parts)
    assert rest == {} and list(wrappers) == ["m.w"]
    np.testing.assert_array_equal(wrappers["m.w"].a, a)
    np.testing.assert_array_equal(wrappers["m.w"].b, b)


TINY = Qwen3MoeConfig(
    vocab_size=32, hidden_size=16, head_dim=4, moe_intermediate_size=8, num_experts=4,
    num_hidden_layers=2, intermediate_size=24, mlp_only_layers=(1,),
)  # fmt: skip


@pytest.fixture(scope="module")
def moe(randomize):
    """``(params, delta)``: the tiny Qwen3-MoE's params and random factors (rank 2, down 3)."""
    params = jax.eval_shape(lambda: qwen_params(TINY))
    params = randomize(params, seed=0)
    cfg = lj.LoraConfig(
        targets=[ATTENTION, EXPERTS], rank=2, alpha=4, layouts={EXPERTS: EXPERT_LAYOUT},
        rank_pattern={r".*/down_proj": 3},
    )  # fmt: skip
    shapes = jax.eval_shape(lambda p: lj.init_lora(jax.random.key(0), p, cfg)[1], params)
    return params, randomize(shapes, seed=1)


def test_export_writes_peft_keys_and_imports_back(moe, tmp_path):
    params, delta = moe
    config = lj.export_peft(tmp_path, delta, name_map=HF_NAMES)
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {3}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    experts = PREFIX + "model.layers.0.mlp.experts."
    e, h, m = TINY.num_experts, TINY.hidden_size, TINY.moe_intermediate_size
    assert tensors[experts + "base_layer.lora_A.weight"].shape == (2 * e, h)  # gate_up_proj
    assert tensors[experts + "base_layer.lora_B.weight"].shape == (2 * m, 2 * e)
    assert tensors[experts + "lora_A.weight"].shape == (3 * e, m)  # down_proj, rank 3
    assert tensors[experts + "lora_B.weight"].shape == (h, 3 * e)
    assert not any("layers.1.mlp" in k for k in tensors)  # the dense-MLP layer
    f = delta["params"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]
    np.testing.assert_allclose(
        peft_delta(
            tensors[experts + "base_layer.lora_A.weight"],
            tensors[experts + "base_layer.lora_B.weight"],
            e,
            f.scale,
        ),
        f.scale * np.einsum("eir,ero->eio", np.asarray(f.a), np.asarray(f.b)),
        rtol=1e-5,
        atol=1e-6,
    )

    back = lj.import_peft(tmp_path, params, name_map=HF_NAMES)
    want = lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
    got = dict(lj.advanced.leaves_with_paths(back, is_leaf=lj.advanced.is_factors)[0])
    for path, f in want:
        g = got[path]
        if f is None:
            assert g is None, path
            continue
        np.testing.assert_array_equal(np.asarray(g.a), np.asarray(f.a), err_msg=path)
        np.testing.assert_array_equal(np.asarray(g.b), np.asarray(f.b), err_msg=path)
        assert (g.alpha, g.layout) == (f.alpha, f.layout), path

    # without params: the expert factors land at the parameter's name as a path
    loose = lj.import_peft(tmp_path)
    g = loose["params"]["model"]["layers"]["0"]["mlp"]["experts"]["down_proj"]
    assert g.layout == lj.KernelLayout("eio") and g.a.shape == (e, m, 3)


def write_adapter(directory: Path, tensors: dict, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: np.asarray(v, np.float32) for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"))  # fmt: skip
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [], **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def two_param_params(w_in_shape, w_out_shape):
    return {
        "params": {
            "blk": {"w_in": jnp.zeros(w_in_shape), "w_out": jnp.zeros(w_out_shape)},
        }
    }


def to_param(path: str) -> str | None:
    return {"params/blk/w_in": "blk.w_in", "params/blk/w_out": "blk.w_out"}.get(path)


def test_nesting_order_not_fitting_the_shapes_is_repaired(tmp_path):
    """Unknown parameter names nest in the config's order (w_out innermost here); the shapes
    say it is the other way round, and only that pairing fits."""
    rng = np.random.default_rng(0)
    e, r = 3, 2
    inner_A, inner_B = expert_layer(rng.standard_normal((e, 5, r)), rng.standard_normal((e, r, 7)))
    outer_A, outer_B = expert_layer(rng.standard_normal((e, 7, r)), rng.standard_normal((e, r, 5)))
    d = write_adapter(
        tmp_path,
        {
            "blk.base_layer.lora_A.weight": inner_A, "blk.base_layer.lora_B.weight": inner_B,
            "blk.lora_A.weight": outer_A, "blk.lora_B.weight": outer_B,
        },
        target_parameters=["blk.w_out", "blk.w_in"],
    )  # fmt: skip
    params = two_param_params((e, 5, 7), (e, 7, 5))
    delta = lj.import_peft(d, params, name_map=to_param)
    np.testing.assert_allclose(
        np.asarray(delta["params"]["blk"]["w_in"].a), inner_A.reshape(e, r, 5).transpose(0, 2, 1)
    )
    assert delta["params"]["blk"]["w_out"].a.shape == (e, 7, r)


def test_target_parameter_that_is_not_3d_is_named(tmp_path):
    A, B = np.ones((2, 5)), np.ones((7, 2))
    d = write_adapter(
        tmp_path,
        {"blk.lora_A.weight": A, "blk.lora_B.weight": B},
        target_parameters=["blk.w_in"],
    )
    params = {"params": {"blk": {"w_in": jnp.zeros((5, 7))}}}
    with pytest.raises(LoraFileError, match=r"'blk\.w_in'.*params/blk/w_in.*3-D"):
        lj.import_peft(d, params, name_map=to_param)


def test_wrapper_errors_name_the_parameter(tmp_path):
    A, B = np.ones((6, 5)), np.ones((7, 6))
    tensors = {"blk.lora_A.weight": A, "blk.lora_B.weight": B}
    params = two_param_params((3, 5, 7), (3, 7, 5))
    d = write_adapter(tmp_path / "rank", tensors, r=4, target_parameters=["blk.w_in"])
    with pytest.raises(LoraFileError, match=r"'blk\.w_in'.*rank 4"):
        lj.import_peft(d, params, name_map=to_param)
    d = write_adapter(tmp_path / "bare", tensors, target_parameters=["w_in"])
    with pytest.raises(LoraFileError, match=r"target_parameters entry 'w_in' names no module"):
        lj.import_peft(d, params, name_map=to_param)
    d = write_adapter(tmp_path / "shape", tensors, target_parameters=["blk.w_in"])
    with pytest.raises(LoraBaseMismatchError, match=r"'blk\.w_in'"):
        lj.import_peft(d, two_param_params((2, 5, 7), (3, 7, 5)), name_map=to_param)


def test_scanned_expert_stack_is_one_wrapper_per_layer(tmp_path, randomize):
    """(layers, E, in, out), layout seio: layer l's experts are PEFT parameter
    model.layers.l.mlp.experts.w; layers PEFT left out import as zero factors."""
    params = {"params": {"layers": {"experts": {"w": jnp.zeros((3, 2, 5, 7))}}}}
    cfg = lj.LoraConfig(targets=r".*/w", rank=2, layouts={".*": "seio"})
    shapes = jax.eval_shape(lambda p: lj.init_lora(jax.random.key(0), p, cfg)[1], params)
    delta = randomize(shapes, seed=2)

    def name_map(path):
        return "model.layers.{}.mlp.experts.w" if path.endswith("/w") else None

    written = lj.export_peft(tmp_path / "all", delta, name_map=name_map)
    assert written["target_parameters"] == ["mlp.experts.w"]
    keys = sorted(load_file(str(tmp_path / "all" / "adapter_model.safetensors")))
    assert keys[0] == PREFIX + "model.layers.0.mlp.experts.lora_A.weight" and len(keys) == 6
    f = delta["params"]["layers"]["experts"]["w"]
    back = lj.import_peft(tmp_path / "all", params, name_map=name_map)["params"]["layers"]
    g = back["experts"]["w"]
    assert g.layout == lj.KernelLayout("seio")
    np.testing.assert_array_equal(np.asarray(g.a), np.asarray(f.a))
    np.testing.assert_array_equal(np.asarray(g.b), np.asarray(f.b))

    directory = tmp_path / "some"
    directory.mkdir()
    tensors = load_file(str(tmp_path / "all" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k},
              str(directory / "adapter_model.safetensors"))  # fmt: skip
    (directory / "adapter_config.json").write_text(
        (tmp_path / "all" / "adapter_config.json").read_text()
    )
    g = lj.import_peft(directory, params, name_map=name_map)["params"]["layers"]["experts"]["w"]
    assert not np.asarray(g.a[1]).any() and not np.asarray(g.b[1]).any()
    np.testing.assert_array_equal(np.asarray(g.a[2]), np.asarray(f.a[2]))
