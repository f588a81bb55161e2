"""The Flax Qwen3-MoE (``examples/qwen3_moe``) against transformers and PEFT, and LoRA on it.

transformers' tiny random ``Qwen3MoeForCausalLM`` (seeded), saved with
``save_pretrained`` (per-expert 2-D tensors on disk), is loaded by name into
the Flax model; then, in float32:

* the logits agree to 1e-4 of the logit scale and every MoE layer routes every
  token to the same experts (``output_router_logits``' top-k);
* an adapter PEFT writes on the model (``target_modules`` on attention,
  ``target_parameters`` on both expert parameters, so two nested
  ``ParamWrapper``s per layer; per-parameter rank, rsLoRA) imports with ``import_peft`` and the merged Flax
  model reproduces PEFT's logits; each expert's delta equals PEFT's
  ``get_delta_weight``;
* an adapter of ours (random factors on attention and experts, rank and alpha
  per target) exported with ``export_peft`` loads with
  ``PeftModel.from_pretrained`` and reproduces our logits.

These need torch (marked ``torch``). Without torch (newest environment):
``tests/files/test_peft_experts.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from examples.qwen3_moe import ATTENTION, EXPERT_LAYOUT, EXPERTS, HF_NAMES, Qwen3Moe, load

pytestmark = pytest.mark.torch

E, K, HIDDEN, MOE_INTER = 6, 2, 48, 40


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``(torch, peft, transformers model, checkpoint dir, tokens)``."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=MOE_INTER,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
        mlp_only_layers=[1],  # one dense-MLP layer between two MoE layers
        max_position_embeddings=64,
        initializer_range=0.2,  # large enough that routing is not a near-tie
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("qwen3_moe")
    model.save_pretrained(directory)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
    return torch, peft, model, directory, tokens


@pytest.fixture(scope="module")
def flax_model(hf):
    _, _, _, directory, _ = hf
    cfg, params = load(directory)
    model = Qwen3Moe(cfg)
    return model, params, jax.jit(lambda p, t: model.apply(p, t, mutable=["intermediates"]))


def torch_logits(torch, model, tokens, **kw):
    with torch.no_grad():
        return model(torch.tensor(tokens), **kw)


def scale_of(logits) -> float:
    return float(np.abs(logits).max())


def test_checkpoint_has_per_expert_tensors(hf):
    from safetensors.numpy import load_file

    _, _, _, directory, _ = hf
    names = set(load_file(str(directory / "model.safetensors")))
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in names
    assert not any(n.endswith("gate_up_proj") for n in names)


def test_logits_and_routing_match_transformers(hf, flax_model):
    torch, _, model, _, tokens = hf
    _, params, apply = flax_model
    out = torch_logits(torch, model, tokens, output_router_logits=True)
    ref = out.logits.numpy()
    ours, state = apply(params, jnp.asarray(tokens))
    ours = np.asarray(ours)
    assert np.abs(ours - ref).max() <= 1e-4 * scale_of(ref)
    moe_layers = [i for i in range(3) if i != 1]
    assert len(out.router_logits) == len(moe_layers)
    for layer, router_logits in zip(moe_layers, out.router_logits):
        probs = torch.softmax(router_logits.float(), dim=-1)
        want = torch.topk(probs, K, dim=-1).indices.numpy()
        got = np.asarray(state["intermediates"][f"layers_{layer}"]["mlp"]["top_k_index"][0])
        np.testing.assert_array_equal(got, want)
        counts = state["intermediates"][f"layers_{layer}"]["mlp"]["tokens_per_expert"][0]
        assert int(counts.sum()) == tokens.size * K


@pytest.fixture(scope="module")
def peft_adapter(hf, tmp_path_factory):
    """An adapter PEFT trains nothing into but draws at random (init_lora_weights=False)."""
    torch, peft, model, _, tokens = hf
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
        use_rslora=True,  # scale alpha / sqrt(r), for the ParamWrappers too
        init_lora_weights=False,
    )
    import copy

    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    directory = tmp_path_factory.mktemp("peft_moe")
    peft_model.save_pretrained(directory)
    logits = torch_logits(torch, peft_model, tokens).logits.numpy()
    return peft_model, directory, logits


def test_peft_written_adapter_reproduces_peft(hf, flax_model, peft_adapter):
    _, _, _, _, tokens = hf
    _, params, apply = flax_model
    peft_model, directory, ref = peft_adapter
    base_ref = torch_logits(hf[0], hf[2], tokens).logits.numpy()
    assert np.abs(ref - base_ref).max() > 1e-2 * scale_of(ref)  # the adapter does something
    delta = lj.import_peft(directory, params, name_map=HF_NAMES)
    gate_up = delta["params"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]
    down = delta["params"]["layers_2"]["mlp"]["experts"]["down_proj"]
    assert gate_up.layout == lj.KernelLayout(EXPERT_LAYOUT)
    assert (gate_up.a.shape, gate_up.b.shape) == ((E, HIDDEN, 4), (E, 4, 2 * MOE_INTER))
    assert (down.a.shape, down.b.shape, down.rank) == ((E, MOE_INTER, 2), (E, 2, HIDDEN), 2)
    assert down.rslora and down.scale == pytest.approx(8 / 2**0.5)
    assert delta["params"]["layers_1"]["mlp"]["gate_proj"]["kernel"] is None
    ours = np.asarray(apply(lj.merge(params, delta), jnp.asarray(tokens))[0])
    assert np.abs(ours - ref).max() <= 1e-4 * scale_of(ref)


def test_expert_delta_is_peft_get_delta_weight(hf, flax_model, peft_adapter):
    """Per expert, s * a[e] @ b[e] is PEFT's delta (PyTorch's (E, out, in), transposed)."""
    _, params, _ = flax_model
    peft_model, directory, _ = peft_adapter
    delta = lj.import_peft(directory, params, name_map=HF_NAMES)
    experts = peft_model.base_model.model.model.layers[2].mlp.experts  # down_proj's wrapper
    for wrapper, name in ((experts, "down_proj"), (experts.base_layer, "gate_up_proj")):
        assert wrapper.parameter_name == name
        want = wrapper.get_delta_weight("default").detach().numpy().transpose(0, 2, 1)
        f = delta["params"]["layers_2"]["mlp"]["experts"][name]
        got = f.scale * np.einsum("eir,ero->eio", np.asarray(f.a), np.asarray(f.b))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_our_adapter_loads_in_peft(hf, flax_model, tmp_path, randomize):
    torch, peft, model, _, tokens = hf
    _, params, apply = flax_model
    cfg = lj.LoraConfig(
        targets=[ATTENTION, EXPERTS],
        rank=4,
        alpha=8,
        layouts={EXPERTS: EXPERT_LAYOUT},
        rank_pattern={r".*/down_proj": 3},
        alpha_pattern={r".*/k_proj/kernel": 5},
    )
    # random factors of init_lora's shapes (numpy: jax.random would compile per shape)
    shapes = jax.eval_shape(lambda p: lj.init_lora(jax.random.key(0), p, cfg)[1], params)
    delta = randomize(shapes, seed=1, scale=0.3)
    written = lj.export_peft(tmp_path, delta, name_map=HF_NAMES)
    assert written["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert "experts" not in " ".join(written["target_modules"])
    import copy

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    ref = torch_logits(torch, loaded, tokens).logits.numpy()
    ours = np.asarray(apply(lj.merge(params, delta), jnp.asarray(tokens))[0])
    assert np.abs(ours - ref).max() <= 1e-4 * scale_of(ref)
    back = lj.import_peft(tmp_path, params, name_map=HF_NAMES)
    for (p, f), (_, g) in zip(
        lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0],
        lj.advanced.leaves_with_paths(back, is_leaf=lj.advanced.is_factors)[0],
    ):
        if f is None:
            assert g is None, p
            continue
        np.testing.assert_array_equal(np.asarray(f.a), np.asarray(g.a), err_msg=p)
        np.testing.assert_array_equal(np.asarray(f.b), np.asarray(g.b), err_msg=p)
        assert (f.alpha, f.rank, f.layout) == (g.alpha, g.rank, g.layout), p
