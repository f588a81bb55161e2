"""PEFT's lora_bias and trainable_token_indices: imported as LoraBias / TokenRows and exported.

The fixtures written by PEFT itself (mlp_lorabias, stack_lorabias, lm_tokens,
lm_tokenlist) are also run by test_peft_format's generic fixture tests
(PEFT's outputs reproduced, export bit for bit); here: what the import builds,
the errors, and (marked torch) PEFT loading our exports.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax import (
    LoraBias,
    LoraFileError,
    LoraStructureError,
    TokenRows,
    export_peft,
    import_peft,
)
from tests.files.test_peft_format import (
    FIXTURES,
    STACK_MAP,
    factors,
    fixture,
    flax_module,
    flax_to_torch,
    random_params,
    tensors_of,
    to_flax_input,
    to_torch_output,
)


def test_lora_bias_imports_at_the_bias_leaf_with_each_modules_scale():
    _, params, ref = fixture("mlp_lorabias")
    d = import_peft(FIXTURES / "mlp_lorabias", params)["params"]
    peft = tensors_of(FIXTURES / "mlp_lorabias")
    for name, scale in (("fc1", 4 / 2), ("fc2", 4 / 1)):  # rank_pattern {"fc2": 1}
        entry = d[name]["bias"]
        assert isinstance(entry, LoraBias) and entry.scale == scale == d[name]["kernel"].scale
        np.testing.assert_array_equal(entry.b, peft[f"base_model.model.{name}.lora_B.bias"])
        merged = lj.merge(params, import_peft(FIXTURES / "mlp_lorabias", params))
        want = params["params"][name]["bias"] + scale * peft[f"base_model.model.{name}.lora_B.bias"]
        np.testing.assert_allclose(merged["params"][name]["bias"], want, rtol=1e-6)


def test_stacked_lora_bias_has_the_stack_axis():
    _, params, _ = fixture("stack_lorabias")
    d = import_peft(FIXTURES / "stack_lorabias", params, name_map=STACK_MAP)
    b = d["params"]["layers"]["lin"]["bias"]
    peft = tensors_of(FIXTURES / "stack_lorabias")
    assert b.b.shape == (3, 5)
    for i in range(3):
        np.testing.assert_array_equal(b.b[i], peft[f"base_model.model.layers.{i}.lin.lora_B.bias"])


@pytest.mark.parametrize("case, indices", [("lm_tokens", (3, 5, 9)), ("lm_tokenlist", (0, 4, 11))])
def test_trainable_tokens_import_as_rows_minus_base(case, indices):
    model, params, ref = fixture(case)
    d = import_peft(FIXTURES / case, params)["params"]
    rows = d["emb"]["embedding"]
    assert isinstance(rows, TokenRows) and rows.indices == indices
    theirs = tensors_of(FIXTURES / case)[
        "base_model.model.emb.token_adapter.trainable_tokens_delta"
    ]
    table = np.asarray(params["params"]["emb"]["embedding"])
    np.testing.assert_allclose(np.asarray(rows.diff) + table[list(indices)], theirs, atol=1e-6)
    # implicit (unmerged) reproduces PEFT too: the gather and the tied head's dot
    x = to_flax_input(model, ref["input"])
    out = lj.implicit(flax_module(model).apply)(params, import_peft(FIXTURES / case, params), x)
    np.testing.assert_allclose(to_torch_output(model, out), ref["output"], rtol=1e-5, atol=2e-5)


def copy_with(tmp_path, case, config=None, tensors=None):
    d = tmp_path / case
    shutil.copytree(FIXTURES / case, d)
    if config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(tensors_of(d)), str(d / "adapter_model.safetensors"))
    return d


def test_import_errors_name_the_file(tmp_path):
    _, params, _ = fixture("lm_tokens")
    with pytest.raises(LoraFileError, match="does not name"):
        import_peft(
            copy_with(tmp_path / "a", "lm_tokens", {"trainable_token_indices": {"lm": [1]}}), params
        )
    with pytest.raises(LoraFileError, match="expected a non-empty list of distinct"):
        import_peft(
            copy_with(tmp_path / "b", "lm_tokens", {"trainable_token_indices": {"emb": [1, 1, 2]}}),
            params,
        )
    with pytest.raises(LoraFileError, match="for indices"):  # 3 rows, 2 indices
        import_peft(
            copy_with(tmp_path / "c", "lm_tokens", {"trainable_token_indices": {"emb": [1, 2]}}),
            params,
        )
    with pytest.raises(LoraFileError, match="concrete base params"):
        import_peft(
            FIXTURES / "lm_tokens",
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        )
    with pytest.raises(LoraFileError, match="pass params="):
        import_peft(FIXTURES / "lm_tokens")
    _, mlp, _ = fixture("mlp_lorabias")
    no_bias = {"params": {n: {"kernel": mlp["params"][n]["kernel"]} for n in ("fc1", "fc2")}}
    with pytest.raises(LoraFileError, match=r"kernel 'params/fc1/kernel' has no bias leaf"):
        import_peft(FIXTURES / "mlp_lorabias", no_bias)
    nan = copy_with(
        tmp_path / "d",
        "mlp_lorabias",
        tensors=lambda t: {
            k: (np.full_like(v, np.nan) if k.endswith("fc1.lora_B.bias") else v)
            for k, v in t.items()
        },
    )
    with pytest.raises(LoraFileError, match="NaN or Inf"):
        import_peft(nan, mlp)
    with pytest.raises(
        LoraFileError,
        match=r"fc1.lora_B.bias is a lora_B bias but adapter_config.json has lora_bias=False",
    ):
        import_peft(copy_with(tmp_path / "e", "mlp_lorabias", {"lora_bias": False}), mlp)


def test_export_errors():
    rng = np.random.default_rng(0)
    params = random_params("lm", rng)
    delta = jax.tree.map(lambda _: None, params)
    delta["params"]["emb"]["embedding"] = TokenRows(jnp.ones((1, 6)), indices=(2,))
    delta["params"]["fc"]["kernel"] = factors(rng, (6, 6), "io", 2)
    with pytest.raises(LoraStructureError, match="pass params="):
        export_peft("/nonexistent-never-written", delta)
    delta["params"]["fc"]["kernel"] = None
    delta["params"]["fc"]["bias"] = LoraBias(jnp.ones(6), scale=2.0)
    with pytest.raises(LoraStructureError, match="no LoraFactors|no LoRA kernel beside it"):
        export_peft("/nonexistent-never-written", delta, params=params)


# --------------------------------------------------------------------------- PEFT loads ours


def lm_delta(rng, params):
    delta = jax.tree.map(lambda _: None, params)
    delta["params"]["fc"]["kernel"] = factors(rng, (6, 6), "io", 2, alpha=3.0)
    delta["params"]["fc"]["bias"] = LoraBias(
        jnp.asarray(rng.standard_normal(6), jnp.float32), scale=1.5
    )
    delta["params"]["emb"]["embedding"] = TokenRows(
        jnp.asarray(rng.standard_normal((2, 6)), jnp.float32), indices=(7, 1)
    )
    return delta


def stack_delta(rng, params):
    delta = jax.tree.map(lambda _: None, params)
    delta["params"]["layers"]["lin"]["kernel"] = factors(rng, (3, 5, 5), "sio", 2, alpha=4.0)
    b = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    delta["params"]["layers"]["lin"]["bias"] = LoraBias(b, scale=2.0)
    return delta


def test_export_then_import_is_the_same_delta(tmp_path):
    rng = np.random.default_rng(3)
    params = random_params("lm", rng)
    delta = lm_delta(rng, params)
    cfg = export_peft(tmp_path, delta, params=params)
    assert cfg["lora_bias"] is True and cfg["trainable_token_indices"] == {"emb": [7, 1]}
    back = import_peft(tmp_path, params)["params"]
    # the bias is rescaled to the module's scale (PEFT has one s per module): s * b is kept
    np.testing.assert_allclose(
        back["fc"]["bias"].scale * back["fc"]["bias"].b,
        1.5 * delta["params"]["fc"]["bias"].b,
        rtol=1e-6,
    )
    assert back["emb"]["embedding"].indices == (7, 1)
    np.testing.assert_allclose(
        back["emb"]["embedding"].diff, delta["params"]["emb"]["embedding"].diff, atol=1e-6
    )


@pytest.mark.torch
@pytest.mark.parametrize("model", ["lm", "stack"])
def test_peft_loads_our_export(model, tmp_path, peft_env):
    torch, peft, twins = peft_env
    rng = np.random.default_rng(11)
    params = random_params(model, rng)
    delta = (lm_delta if model == "lm" else stack_delta)(rng, params)
    nm = STACK_MAP if model == "stack" else None
    export_peft(tmp_path, delta, params=params, name_map=nm)
    twin = twins.MODELS[model]()
    twin.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(model, params).items()}
    )
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    x = (
        np.array([[7, 0, 1, 3, 7]])
        if model == "lm"
        else rng.standard_normal((3, 5)).astype(np.float32)
    )
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    module = flax_module(model)
    fx = to_flax_input(model, x)
    ours = to_torch_output(model, module.apply(lj.merge(params, delta), fx))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    implicit = to_torch_output(model, lj.implicit(module.apply)(params, delta, fx))
    np.testing.assert_allclose(implicit, theirs, rtol=1e-5, atol=1e-5)
    base = to_torch_output(model, module.apply(params, fx))
    assert not np.allclose(base, theirs, atol=1e-2)
    if model == "lm":  # PEFT tied the head to the embedding's trainable tokens
        assert type(peft_model.base_model.model.head).__name__ == "TrainableTokensWrapper"


def test_export_refuses_a_bias_on_layers_the_factors_leave_out(tmp_path):
    rng = np.random.default_rng(5)
    params = random_params("stack", rng)
    delta = stack_delta(rng, params)
    f = delta["params"]["layers"]["lin"]["kernel"]
    delta["params"]["layers"]["lin"]["kernel"] = f.select_layers(
        lj.advanced.LayerSelection((0, 2), 3)
    )
    with pytest.raises(LoraStructureError, match=r"non-zero at layers \[1\]"):
        export_peft(tmp_path / "a", delta, name_map=STACK_MAP)
    b = delta["params"]["layers"]["lin"]["bias"]
    delta["params"]["layers"]["lin"]["bias"] = LoraBias(b.b.at[1].set(0.0), scale=b.scale)
    export_peft(tmp_path / "b", delta, name_map=STACK_MAP)
    back = import_peft(tmp_path / "b", params, name_map=STACK_MAP)["params"]["layers"]["lin"]
    np.testing.assert_allclose(
        back["bias"].b, delta["params"]["layers"]["lin"]["bias"].b, rtol=1e-6
    )
