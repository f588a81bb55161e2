"""Every PEFT ``LoraConfig`` key is handled: implemented, irrelevant, or refused by name.

* the installed PEFT's ``LoraConfig`` fields are all in lora_jax's table, so a
  new PEFT option cannot slip past the importer unclassified;
* each refused key (and an unknown one) set to a live value is a
  ``LoraFileError`` naming the key;
* a hypothesis test builds adapters with PEFT itself from random combinations
  of config keys on tiny models: ``import_peft`` either reproduces PEFT's
  output (f32, 1e-5) or refuses with a ``LoraFileError``, never anything else;
* ``modules_to_save`` both ways: a PEFT-written adapter imports as
  ``LeafDelta`` and reproduces PEFT; ours loads in PEFT and reproduces ours.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import LeafDelta, LoraFileError, LoraStructureError, export_peft, import_peft
from lora_jax._files.peft.config_keys import (
    CONFIG_KEYS,
    IMPLEMENTED,
    IRRELEVANT,
    REFUSED,
    check_config_keys,
    markdown_table,
)
from tests.files.test_peft_format import (
    FIXTURES,
    STACK_MAP,
    factors,
    flax_module,
    flax_to_torch,
    random_params,
    tensors_of,
    to_flax_input,
    to_torch_output,
    torch_to_flax,
)

# --------------------------------------------------------------------------- the table


@pytest.mark.torch
def test_every_lora_config_field_is_classified(peft_env):
    _, peft, _ = peft_env
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    missing = sorted(fields - set(CONFIG_KEYS))
    assert not missing, (
        f"PEFT {peft.__version__} LoraConfig fields lora_jax does not classify: {missing}"
    )
    assert {r.handling for r in CONFIG_KEYS.values()} == {IMPLEMENTED, IRRELEVANT, REFUSED}


@pytest.mark.torch
def test_every_key_peft_writes_is_classified(peft_env):
    """What save_pretrained writes (not only the dataclass fields) is in the table."""
    for case in ("mlp_lora", "stack_partial", "mlp_pissa"):
        cfg = json.loads((FIXTURES / case / "adapter_config.json").read_text())
        assert set(cfg) <= set(CONFIG_KEYS), set(cfg) - set(CONFIG_KEYS)


def test_docs_table_is_the_code_table():
    page = (Path(__file__).resolve().parents[2] / "docs" / "files.md").read_text()
    assert markdown_table() in page, (
        "docs/files.md's PEFT key table is stale: paste markdown_table()"
    )


# a live (non-inert) value for each refused key
REFUSED_VALUES = {
    "megatron_config": {"tensor_model_parallel_size": 2},
    "alora_invocation_tokens": [5, 7],
    "layer_replication": [[0, 2], [1, 3]],
    "use_qalora": True,
    "velora_config": {"num_groups": 4},
    "kasa_config": {"beta": 0.1},
    "monteclora_config": {"n_samples": 4},
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "ensure_weight_tying": True,
}


def test_every_refused_key_has_a_test_value():
    assert set(REFUSED_VALUES) == {k for k, r in CONFIG_KEYS.items() if r.handling == REFUSED}


def with_config(tmp_path: Path, case: str = "mlp_lora", **changes) -> Path:
    d = tmp_path / case
    shutil.copytree(FIXTURES / case, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def mlp_params() -> dict:
    ref_base = {
        "fc1": {"kernel": jnp.zeros((6, 8)), "bias": jnp.zeros(8)},
        "fc2": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)},
    }
    return {"params": ref_base}


@pytest.mark.parametrize("key", sorted(REFUSED_VALUES))
def test_refused_key_is_named(key, tmp_path):
    d = with_config(tmp_path, **{key: REFUSED_VALUES[key]})
    with pytest.raises(LoraFileError, match=rf"adapter_config.json: key '{key}' is .*refused"):
        import_peft(d, mlp_params())
    # its inert value imports
    inert = False if isinstance(REFUSED_VALUES[key], bool) else None
    import_peft(with_config(tmp_path / "ok", **{key: inert}), mlp_params())


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"lora_bias": True},
            r"has no lora_B.bias tensors but adapter_config.json has lora_bias=true",
        ),
        (
            {"trainable_token_indices": [1, 2]},
            r"has no trainable_tokens_delta tensors but adapter_config.json",
        ),
    ],
)
def test_implemented_keys_checked_against_the_tensors(changes, match, tmp_path):
    """lora_bias / trainable_token_indices are implemented: a config that claims them without
    the tensors is refused, naming the file, not imported as something else."""
    with pytest.raises(LoraFileError, match=match):
        import_peft(with_config(tmp_path, **changes), mlp_params())


def test_unknown_keys(tmp_path):
    d = with_config(tmp_path, new_variant_config={"k": 2})
    with pytest.raises(LoraFileError, match=r"key 'new_variant_config' .* does not know"):
        import_peft(d, mlp_params())
    for unset in (None, False, [], {}):  # an option a newer PEFT leaves off
        import_peft(with_config(tmp_path / repr(unset), new_flag=unset), mlp_params())


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisers_that_leave_the_base_are_irrelevant(init, tmp_path):
    import_peft(with_config(tmp_path, init_lora_weights=init), mlp_params())


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_initialisers_that_rewrite_the_base_need_residual_base(init, tmp_path):
    d = with_config(tmp_path, init_lora_weights=init)
    with pytest.raises(LoraFileError, match=r"'init_lora_weights' is .* residual_base=True"):
        import_peft(d, mlp_params())
    import_peft(d, mlp_params(), residual_base=True)


def test_pissa_on_the_original_base_is_refused_not_wrong():
    """PEFT re-runs PiSSA on the weights it loads onto: on the original base, PEFT's output is
    the recorded one, so importing onto the original base without residual_base must refuse."""
    ref = FIXTURES / "mlp_pissa"
    with pytest.raises(LoraFileError, match="init_lora_weights"):
        import_peft(ref, mlp_params())


@pytest.mark.torch
def test_check_config_keys_is_silent_on_peft_defaults(peft_env):
    _, peft, _ = peft_env
    cfg = peft.LoraConfig(target_modules=["fc1"]).to_dict()
    check_config_keys(Path("adapter_config.json"), json.loads(json.dumps(cfg, default=str)))


@pytest.mark.torch
def test_rank_pattern_semantics_match_peft(peft_env):
    """lora_jax's pattern_value is PEFT's own get_pattern_key, on names that tell regexes,
    suffixes and first-match order apart."""
    from peft.utils.other import get_pattern_key

    from lora_jax._files.peft.names import pattern_key, pattern_value

    patterns = {r"^fc1": 2, r"block\.lin": 3, "lin": 4, r"layers\.[02]\.q": 5, "q": 6}
    names = [
        "fc1",
        "enc.fc1",
        "block.lin",
        "lin",
        "x.block.lin",
        "layers.0.q",
        "layers.1.q",
        "layers.2.q",
        "q",
        "xq",
        "fc10",
    ]
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert pattern_value(patterns, name, 1) == patterns.get(key, 1), name
    for name in names:  # the keys export writes select exactly their module, in PEFT's reading
        key = pattern_key(name, names)
        assert [n for n in names if get_pattern_key([key], n) == key] == [name], (name, key)


# --------------------------------------------------------------------------- modules_to_save


TRAINED_IN_FULL = {  # PEFT options that save full tensors, and the leaves they become
    "modules_to_save": (dict(modules_to_save=["fc2"]), {"fc2": ("kernel", "bias")}),
    "bias_all": (dict(bias="all"), {"fc1": ("bias",), "fc2": ("bias",)}),
    "bias_lora_only": (dict(bias="lora_only"), {"fc1": ("bias",)}),
    "both": (
        dict(bias="all", modules_to_save=["fc2"]),
        {"fc1": ("bias",), "fc2": ("kernel", "bias")},
    ),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(TRAINED_IN_FULL))
def test_peft_trained_in_full_imports_and_reproduces(case, peft_env, tmp_path):
    torch, peft, twins = peft_env
    extra, leaves = TRAINED_IN_FULL[case]
    torch.manual_seed(0)
    model = twins.MLP()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], **extra)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # the LoRA factors and whatever PEFT trains in full
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval()
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        want = pm(x).numpy()
    pm.save_pretrained(str(tmp_path))
    params = torch_to_flax("mlp", {k: v.numpy() for k, v in base_sd.items()})
    delta = import_peft(tmp_path, params)
    full = {
        (m, n)
        for m in ("fc1", "fc2")
        for n in ("kernel", "bias")
        if isinstance(delta["params"][m][n], LeafDelta)
    }
    assert full == {(m, n) for m, names in leaves.items() for n in names}
    got = flax_module("mlp").apply(lj.merge(params, delta), jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    base = flax_module("mlp").apply(params, jnp.asarray(x.numpy()))
    assert not np.allclose(np.asarray(base), want, atol=1e-2)
    with pytest.raises(LoraFileError, match="needs the base params"):
        import_peft(tmp_path)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(LoraFileError, match="needs concrete base params"):
        import_peft(tmp_path, shapes)


@pytest.mark.torch
def test_our_modules_to_save_loads_in_peft(peft_env, tmp_path):
    torch, peft, twins = peft_env
    rng = np.random.default_rng(11)
    params = random_params("mlp", rng)
    delta = jax.tree.map(lambda _: None, params)
    delta["params"]["fc1"]["kernel"] = factors(rng, (6, 8), "io", 2, alpha=3.0)
    delta["params"]["fc2"]["kernel"] = LeafDelta(
        jnp.asarray(rng.standard_normal((8, 5)) * 0.3, jnp.float32)
    )
    delta["params"]["fc2"]["bias"] = LeafDelta(
        jnp.asarray(rng.standard_normal(5) * 0.3, jnp.float32)
    )
    delta["params"]["fc1"]["bias"] = LeafDelta(
        jnp.asarray(rng.standard_normal(8) * 0.3, jnp.float32)
    )
    with pytest.raises(LoraStructureError, match="pass params="):
        export_peft(tmp_path / "x", delta)
    cfg = export_peft(tmp_path, delta, params=params)
    assert cfg["modules_to_save"] == ["fc2"] and cfg["target_modules"] == ["fc1"]
    assert cfg["bias"] == "lora_only"  # fc1's bias, trained beside its LoRA factors
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["bias"] == "lora_only" and "base_model.model.fc1.base_layer.bias" in tensors_of(
        tmp_path
    )
    twin = twins.MLP()
    twin.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch("mlp", params).items()}
    )
    pm = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    x = rng.standard_normal((4, 6)).astype(np.float32)
    with torch.no_grad():
        theirs = pm(torch.from_numpy(x)).numpy()
    ours = np.asarray(flax_module("mlp").apply(lj.merge(params, delta), jnp.asarray(x)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    back = import_peft(tmp_path, params)  # and back: the same LeafDeltas
    for module, name in (("fc2", "kernel"), ("fc2", "bias"), ("fc1", "bias")):
        np.testing.assert_allclose(
            back["params"][module][name].diff,
            delta["params"][module][name].diff,
            rtol=1e-6,
            atol=1e-6,
        )


def test_modules_to_save_export_errors(tmp_path):
    rng = np.random.default_rng(12)
    params = random_params("mlp", rng)
    delta = jax.tree.map(lambda _: None, params)
    params["params"]["fc1"]["scale"] = jnp.ones(8)  # a second weight of module fc1
    delta["params"]["fc1"]["kernel"] = factors(rng, (6, 8), "io", 2)
    delta["params"]["fc1"]["scale"] = LeafDelta(jnp.zeros(8))
    with pytest.raises(LoraStructureError, match="module 'fc1' is also a LoRA target"):
        export_peft(tmp_path, delta, params=params)
    stacked = random_params("stack", rng)
    d = jax.tree.map(lambda _: None, stacked)
    d["params"]["layers"]["lin"]["kernel"] = factors(rng, (3, 5, 5), "sio", 2)
    d["params"]["layers"]["lin"]["bias"] = LeafDelta(jnp.zeros((3, 5)))
    nm = lj.NameMap(to_peft=[(r"params/layers/(\w+)/(kernel|bias)", r"layers.{}.\1")])
    with pytest.raises(LoraStructureError, match="scan-stacked"):
        export_peft(tmp_path, d, params=stacked, name_map=nm)


# --------------------------------------------------------------------------- target_modules


@pytest.mark.torch
def test_target_modules_are_short_when_unambiguous(peft_env, tmp_path):
    torch, peft, twins = peft_env
    rng = np.random.default_rng(13)
    params = random_params("stack", rng)
    delta = jax.tree.map(lambda _: None, params)
    delta["params"]["layers"]["lin"]["kernel"] = factors(rng, (3, 5, 5), "sio", 2)
    cfg = export_peft(tmp_path / "all", delta, name_map=STACK_MAP)
    assert cfg["target_modules"] == ["lin"]  # what a PEFT user writes for every layer's lin
    f = delta["params"]["layers"]["lin"]["kernel"]
    delta["params"]["layers"]["lin"]["kernel"] = lj.LoraFactors(
        f.a[::2],
        f.b[::2],
        alpha=f.alpha,
        rslora=f.rslora,
        layout=f.layout,
        layers=lj.advanced.LayerSelection((0, 2), 3),
    )
    cfg = export_peft(tmp_path / "some", delta, name_map=STACK_MAP)
    assert cfg["target_modules"] == ["layers.0.lin", "layers.2.lin"]  # 'lin' would take layer 1 too
    # PEFT adapts exactly these modules when it loads the adapter
    pm = peft.PeftModel.from_pretrained(twins.Stack(), str(tmp_path / "some"))
    adapted = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == ["layers.0.lin", "layers.2.lin"]
    mlp = random_params("mlp", rng)
    d = jax.tree.map(lambda _: None, mlp)
    d["params"]["fc2"]["kernel"] = factors(rng, (8, 5), "io", 2)
    assert export_peft(tmp_path / "mlp", d)["target_modules"] == ["fc2"]


# --------------------------------------------------------------------------- random configs


HYP = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

MODEL_TARGETS = {
    "mlp": ["fc1", "fc2"],
    "embed": ["emb"],
    "conv1d": ["conv"],
    "conv2d": ["conv"],
    "stack": ["lin"],
    "lm": ["fc"],
}


@st.composite
def peft_configs(draw):
    model = draw(st.sampled_from(sorted(MODEL_TARGETS)))
    targets = MODEL_TARGETS[model]
    kw = dict(
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([1, 4, 7.5])),
        target_modules=draw(st.lists(st.sampled_from(targets), min_size=1, unique=True)),
    )
    optional = {
        "use_rslora": st.booleans(),
        "use_dora": st.booleans(),
        "lora_dropout": st.sampled_from([0.0, 0.1]),
        "rank_pattern": st.dictionaries(st.sampled_from(targets), st.integers(1, 3), max_size=1),
        "alpha_pattern": st.dictionaries(
            st.sampled_from(targets), st.sampled_from([2, 5]), max_size=1
        ),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
        "bias": st.sampled_from(["none", "all", "lora_only"]),
        "lora_bias": st.booleans(),
        "exclude_modules": st.sampled_from([None, ["nothing_here"]]),
    }
    if model == "stack":
        optional["layers_to_transform"] = st.sampled_from([[0, 2], [1]])
        optional["layers_pattern"] = st.just("layers")
    if model in ("embed", "lm"):
        optional["trainable_token_indices"] = st.sampled_from([[1, 4], {"emb": [0, 11, 5]}])
    if model == "mlp" and kw["target_modules"] == ["fc1"]:
        optional["modules_to_save"] = st.sampled_from([None, ["fc2"]])
    chosen = draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4))
    kw.update({k: draw(optional[k]) for k in chosen})
    if kw.get("layers_to_transform") is not None:
        kw["layers_pattern"] = "layers"
    return model, kw


def peft_adapter(torch, peft, twins, model_name, kw, directory, seed):
    """PEFT builds, randomises and saves the adapter; returns (input, output, base, residual)."""
    torch.manual_seed(seed)
    model = twins.MODELS[model_name]()
    base = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    try:
        pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return None  # a combination PEFT itself refuses
    g = torch.Generator().manual_seed(seed)
    init = kw.get("init_lora_weights", True)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif (
                ("lora_" in name and init not in ("pissa", "olora"))
                or "modules_to_save" in name
                or "trainable_tokens_delta" in name
            ):
                p.add_(0.4 * torch.randn(p.shape, generator=g))
            elif "bias" in name and p.requires_grad:  # bias="all" / "lora_only": trained biases
                p.add_(0.4 * torch.randn(p.shape, generator=g))
    pm.eval()
    x = twins._inputs(model_name, g)
    with torch.no_grad():
        out = pm(x).numpy()
    pm.save_pretrained(str(directory))
    residual = {
        k.replace(".base_layer", "")
        .replace(".original_module", "")
        .replace(".token_adapter", ""): v.detach().clone().numpy()
        for k, v in pm.base_model.model.state_dict().items()
        if "lora_" not in k and "modules_to_save" not in k and "trainable_tokens" not in k
    }
    return x.numpy(), out, base, residual


@pytest.mark.torch
@HYP
@given(peft_configs(), st.integers(0, 2**16))
def test_import_reproduces_peft_or_refuses(peft_env, tmp_path_factory, drawn, seed):
    torch, peft, twins = peft_env
    model_name, kw = drawn
    directory = tmp_path_factory.mktemp("hyp")
    made = peft_adapter(torch, peft, twins, model_name, kw, directory, seed)
    if made is None:
        event("PEFT refuses the combination")
        return
    x, want, base_sd, residual_sd = made
    nm = STACK_MAP if model_name == "stack" else None
    rewrites = kw.get("init_lora_weights") in ("pissa", "olora")
    params = torch_to_flax(model_name, residual_sd if rewrites else base_sd)
    if rewrites:  # onto the original base it must refuse
        with pytest.raises(LoraFileError, match="init_lora_weights"):
            import_peft(directory, torch_to_flax(model_name, base_sd), name_map=nm)
    try:
        delta = import_peft(directory, params, name_map=nm, residual_base=rewrites)
    except LoraFileError as e:
        # refusals must name a key or tensor of the file
        assert "adapter_config.json" in str(e) or "adapter_model.safetensors" in str(e), e
        event("lora_jax refuses")
        return
    module = flax_module(model_name)
    got = to_torch_output(
        model_name, module.apply(lj.merge(params, delta), to_flax_input(model_name, x))
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{model_name} {kw}")
    event("reproduced")
