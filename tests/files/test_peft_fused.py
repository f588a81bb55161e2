"""PEFT adapters on separate ``k_proj`` / ``v_proj`` Linear layers <-> one fused kv kernel.

A tiny PyTorch model with ``k_proj`` and ``v_proj`` gets a PEFT LoRA adapter
(random ``lora_B`` so the update is not zero); its Flax twin has one fused kv
kernel whose columns are ``[W_k^T | W_v^T]`` (flat ``(d, 2*h*k)`` or
``(d, 2, h, k)``). The PEFT adapter imports onto the fused kernel's segments
and reproduces PEFT's output; exported back, PEFT loads it as ``k_proj`` /
``v_proj`` and gives the same output again.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.advanced import join_segments, segment_params, segment_rules, split_segments

pytestmark = pytest.mark.torch

D, HEADS, HEAD_DIM = 6, 2, 3


@pytest.mark.parametrize("fused_shape", ["flat", "heads"])
def test_peft_k_v_adapters_round_trip_through_a_fused_kv_kernel(peft_env, tmp_path, fused_shape):
    torch, peft, _ = peft_env
    torch.manual_seed(0)

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = torch.nn.Linear(D, HEADS * HEAD_DIM, bias=False)
            self.v_proj = torch.nn.Linear(D, HEADS * HEAD_DIM, bias=False)

        def forward(self, x):
            return torch.cat([self.k_proj(x), self.v_proj(x)], dim=-1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x):
            return self.attn(x)

    base = Model()
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(str(tmp_path / "peft"))
    x = torch.randn(4, D)
    want = model(x).detach().numpy()

    wk = base.attn.k_proj.weight.detach().numpy().T
    wv = base.attn.v_proj.weight.detach().numpy().T
    kernel = np.concatenate([wk, wv], axis=1)  # (d, 2*h*k): k's columns, then v's
    layouts = {}
    if fused_shape == "heads":
        kernel = kernel.reshape(D, 2, HEADS, HEAD_DIM)
        layouts = {".*/kv/kernel": "iooo"}
    params = {"params": {"attn": {"kv": {"kernel": jnp.asarray(kernel)}}}}
    cfg = lj.LoraConfig(
        targets=".*/kv/kernel", rank=2, alpha=3.0, layouts=layouts, segments={".*/kv/kernel": 2}
    )
    _, like = lj.init_lora(jax.random.key(0), params, cfg)
    names = lj.NameMap(
        to_peft=segment_rules(r"params/attn/kv/kernel", ["attn.k_proj", "attn.v_proj"])
    )
    imported = lj.import_peft(tmp_path / "peft", segment_params(params, like), name_map=names)
    delta = join_segments(imported, like)
    f = delta["params"]["attn"]["kv"]["kernel"]
    assert f.segments == (6, 6) and f.scale == 1.5 and lj.count_params(delta) == 2 * (2 * D + 2 * 6)

    def fn(p, x):
        k = p["params"]["attn"]["kv"]["kernel"]
        return x @ k.reshape(D, -1)

    xj = jnp.asarray(x.numpy())
    np.testing.assert_allclose(
        lj.implicit(fn, strict=True)(params, delta, xj), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(fn(lj.merge(params, delta), xj), want, rtol=1e-5, atol=1e-5)

    written = lj.export_peft(tmp_path / "back", split_segments(delta), name_map=names)
    assert sorted(written["target_modules"]) == ["k_proj", "v_proj"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back"))
    np.testing.assert_allclose(again(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)
