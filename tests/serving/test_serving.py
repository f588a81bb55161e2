"""Serving many adapters over one base: stacks, mixed-adapter batches, hot-swap, combinations.

Every mixed-batch result is checked against each example run alone through
``merge(base, its adapter)`` (or the base for id -1), in float32 at highest
matmul precision; combinations against the dense weighted sum of merged
updates; truncation against NumPy's SVD of the dense sum.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.advanced import unstack
from lora_jax.debug import CompileCounter
from tests._eight_devices import run_on_eight_devices

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


class Net(nn.Module):
    """Dense, DenseGeneral (both directions), an embedding and a conv: every rule."""

    @nn.compact
    def __call__(self, tokens):  # (B, T)
        h = nn.Embed(11, 8, name="emb")(tokens)  # (B, T, 8)
        q = nn.DenseGeneral((2, 3), name="q")(h)  # kernel (8, 2, 3)
        h = h + nn.DenseGeneral(8, axis=(-2, -1), name="o")(jnp.tanh(q))  # (2, 3, 8)
        h = h + nn.Conv(8, (3,), name="conv")(h)  # kernel (3, 8, 8)
        return nn.Dense(5, name="out")(jax.nn.gelu(nn.Dense(16, name="fc")(h)))


TARGETS = r"params/(emb/embedding|q/kernel|o/kernel|conv/kernel|fc/kernel|out/kernel)"
LAYOUTS = {
    "params/q/kernel": "ioo",
    "params/o/kernel": "iio",
    "params/conv/kernel": lj.KernelLayout("iio", "conv"),
    "params/emb/embedding": lj.KernelLayout("io", "embed"),
}


def _config(targets: str, **kw) -> lj.LoraConfig:
    layouts = {k: v for k, v in LAYOUTS.items() if re.fullmatch(targets, k)}
    return lj.LoraConfig(targets=targets, layouts=layouts, **kw)


def _trained(delta, seed):
    """Random factors everywhere (init leaves B or an embedding's A at zero); drawn with
    NumPy, since jax.random compiles one program per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), delta)


@pytest.fixture(scope="module")
def net():
    model = Net()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (5, 4)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    deltas = []
    # Different ranks, alphas, rsLoRA and target subsets: slot 2 adapts only fc and out.
    for i, (rank, alpha, targets) in enumerate(
        [(2, 4.0, TARGETS), (4, 3.0, TARGETS), (1, 2.0, r"params/(fc|out)/kernel")]
    ):
        cfg = _config(targets, rank=rank, alpha=alpha, use_rslora=i == 1)
        base, d = lj.init_lora(jax.random.key(i), params, cfg)
        deltas.append(_trained(d, 10 + i))
    stack = lj.stack_adapters(deltas, slots=4)
    serve = jax.jit(lj.implicit(model.apply, strict=True))
    return model, base, deltas, stack, tokens, serve


_MERGE = jax.jit(lj.merge)


def _reference(model, base, deltas, tokens, ids):
    """Each example alone through its adapter merged (the base for id -1); one jit per model."""
    apply = jax.jit(model.apply)
    rows = []
    for e, i in enumerate(ids):
        params = base if i < 0 else _MERGE(base, deltas[i])
        rows.append(apply(params, tokens[e : e + 1])[0])
    return jnp.stack(rows)


def test_mixed_batch_equals_each_example_merged_alone(net):
    model, base, deltas, stack, tokens, serve = net
    ids = [1, -1, 0, 2, 1]
    out = serve(base, stack, tokens, adapter_ids=jnp.asarray(ids))
    np.testing.assert_allclose(out, _reference(model, base, deltas, tokens, ids), **TOL)
    # every adapted row differs from the base model run on the same row, and rows 0 and 4
    # (one adapter, other tokens) from each other: the check above could fail
    plain = model.apply(base, tokens)
    for e, i in enumerate(ids):
        moved = float(jnp.abs(out[e] - plain[e]).max())
        assert (moved > 1e-2) if i >= 0 else (moved < 1e-5), (e, i, moved)


def test_empty_slot_and_id_minus_one_are_the_base(net):
    model, base, _, stack, tokens, serve = net
    out = serve(base, stack, tokens, adapter_ids=jnp.asarray([3, -1, 3, -1, 3]))
    np.testing.assert_allclose(out, model.apply(base, tokens), **TOL)


def test_padded_rank_stack_is_exact(net):
    model, base, deltas, _, tokens, _ = net
    wide = lj.stack_adapters(deltas, rank=9)
    assert wide["params"]["fc"]["kernel"].rank == 9
    for i, d in enumerate(deltas):
        want, got = lj.merge(base, d), lj.merge(base, unstack(wide, i))
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # a kernel slot 2 does not adapt holds zeros and scale 0
    q = wide["params"]["q"]["kernel"]
    assert float(q.scale[2]) == 0.0 and not np.any(q.a[2]) and not np.any(q.b[2])


def test_hot_swap_does_not_recompile_and_serves_the_new_adapter(net):
    model, base, deltas, stack, tokens, serve = net
    ids = jnp.asarray([0, 1, 2, 3, -1])
    jax.block_until_ready(serve(base, stack, tokens, adapter_ids=ids))  # warm
    # a rank-1 adapter with another alpha into a rank-4 slot, then another adapter into slot 0
    cfg = _config(r"params/(fc|q)/kernel", rank=1, alpha=7.0)
    new = _trained(lj.init_lora(jax.random.key(9), base, cfg)[1], 99)
    # set_adapter's own .at[].set ops compile small programs; only `serve` is counted
    swapped = jax.block_until_ready(lj.set_adapter(stack, 3, new))
    twice = jax.block_until_ready(lj.set_adapter(swapped, 0, deltas[2]))
    counts = []
    for s in (swapped, twice):
        with CompileCounter() as counter:
            out = jax.block_until_ready(serve(base, s, tokens, adapter_ids=ids))
        counts.append(counter.count)
    assert counts == [0, 0], f"serve compiled {counts} times on the two swaps"
    want = _reference(model, base, [deltas[2], deltas[1], deltas[2], new], tokens, [0, 1, 2, 3, -1])
    np.testing.assert_allclose(out, want, **TOL)
    # negative control: the same `serve` does recompile for a stack of another rank
    wider = lj.stack_adapters(deltas, slots=4, rank=5)
    with CompileCounter() as counter:
        jax.block_until_ready(serve(base, wider, tokens, adapter_ids=ids))
    assert counter.count >= 1


class Body(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(6, name="dense")(h)), None


class Scanned(nn.Module):
    """Three layers under ``nn.scan``: kernels stacked as ``(layers, in, out)``."""

    @nn.compact
    def __call__(self, x):
        h, _ = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers"
        )(x, None)
        return h


def test_scan_stacked_layers():
    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (4, 2, 6))
    params = jax.jit(model.init)(jax.random.key(1), x)
    cfg = lambda r: lj.LoraConfig(
        targets=r".*kernel",
        rank=r,
        alpha=2.0,  # noqa: E731
        layouts={".*": "sio"},
    )
    deltas = [
        _trained(lj.init_lora(jax.random.key(i), params, cfg(r))[1], i)
        for i, r in enumerate([2, 3])
    ]
    ids = [1, 0, -1, 1]
    out = jax.jit(lj.implicit(model.apply, strict=True))(
        params, lj.stack_adapters(deltas), x, adapter_ids=jnp.asarray(ids)
    )
    np.testing.assert_allclose(out, _reference(model, params, deltas, x, ids), **TOL)


def test_gradients_through_a_mixed_batch_are_right(net):
    model, base, deltas, stack, tokens, _ = net
    ids = [0, 1, -1, 2, 0]

    def loss_mixed(s):
        return jnp.sum(lj.implicit(model.apply)(base, s, tokens, adapter_ids=jnp.asarray(ids)) ** 2)

    g = jax.jit(jax.grad(loss_mixed))(stack)["params"]["fc"]["kernel"]

    # the same gradient from the per-example merged forwards (autodiff through merge)
    def loss_ref(ds):
        return sum(
            jnp.sum(model.apply(lj.merge(base, ds[i]), tokens[e : e + 1]) ** 2)
            for e, i in enumerate(ids)
            if i >= 0
        )

    ref = jax.jit(jax.grad(loss_ref))(deltas)
    # slot 1's B gradient: the stack's is padded to rank 4, slot 1 has rank 4 (rsLoRA)
    np.testing.assert_allclose(g.b[1], ref[1]["params"]["fc"]["kernel"].b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        g.a[0, :, :2], ref[0]["params"]["fc"]["kernel"].a, rtol=1e-4, atol=1e-5
    )


def test_mixed_batch_over_a_quantized_base():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    q = lj.quantize(params, "w", scheme="int8")
    deltas = [
        _trained(
            lj.init_lora(jax.random.key(i), params, lj.LoraConfig(targets="w", rank=2 + i))[1], i
        )
        for i in range(2)
    ]
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x = jax.random.normal(jax.random.key(3), (3, 64))
    ids = [1, -1, 0]
    out = lj.implicit(fn)(q, lj.stack_adapters(deltas), x, adapter_ids=jnp.asarray(ids))
    dense = lj.dequantize(q)
    want = jnp.stack(
        [fn(dense if i < 0 else lj.merge(dense, deltas[i]), x[e]) for e, i in enumerate(ids)]
    )
    np.testing.assert_allclose(out, want, **TOL)


# ---- combinations --------------------------------------------------------------------------


def _dense_update(base, delta):
    merged = lj.merge(base, delta)
    return jax.tree.map(lambda m, b: m - b, merged, base)


def test_combine_equals_the_dense_weighted_sum(net):
    _, base, deltas, _, _, _ = net
    weights = [0.5, -1.5, 2.0]
    got = _dense_update(base, lj.combine(deltas, weights))
    updates = [_dense_update(base, d) for d in deltas]
    want = jax.tree.map(lambda *u: sum(w * x for w, x in zip(weights, u)), *updates)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    c = lj.combine(deltas, weights)["params"]["fc"]["kernel"]
    assert c.rank == 2 + 4 + 1 and c.scale == 1.0
    assert lj.combine(deltas, weights)["params"]["q"]["kernel"].rank == 2 + 4  # slot 2 lacks q


def test_combine_weighs_leaves_trained_in_full():
    """LeafDelta leaves (trained in full) combine as sum_i w_i diff_i, like factors do."""
    rng = np.random.default_rng(5)
    diffs = [jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for _ in range(3)]
    weights = [0.5, -1.5, 2.0]
    got = lj.combine([{"w": lj.LeafDelta(d)} for d in diffs], weights)["w"]
    assert isinstance(got, lj.LeafDelta)
    want = sum(w * np.asarray(d, np.float64) for w, d in zip(weights, diffs))
    np.testing.assert_allclose(got.diff, want, rtol=1e-6, atol=1e-6)
    # a leaf only some deltas hold: the others count as zero
    part = lj.combine([{"w": lj.LeafDelta(diffs[0])}, {"w": None}], [3.0, 1.0])["w"]
    np.testing.assert_allclose(part.diff, 3.0 * np.asarray(diffs[0]), rtol=1e-6)


def test_peft_linear_mode_is_not_the_sum(net):
    """PEFT's ``linear`` combination sums sqrt(w)-scaled A's and B's: cross terms."""
    _, base, deltas, _, _, _ = net
    f0, f1 = (d["params"]["fc"]["kernel"] for d in deltas[:2])
    f1 = f1.replace(a=f1.a[:, :2], b=f1.b[:2], rslora=False, alpha=f0.alpha)  # same rank
    w = [0.5, 0.5]
    linear = (
        (np.sqrt(w[0]) * f0.a + np.sqrt(w[1]) * f1.a)
        @ (np.sqrt(w[0]) * f0.b + np.sqrt(w[1]) * f1.b)
        * f0.scale
    )
    exact = sum(wi * f.scale * f.a @ f.b for wi, f in zip(w, (f0, f1)))
    ours = lj.advanced.dense_delta(lj.combine([{"k": f0}, {"k": f1}], w)["k"])
    np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(linear - exact).max()) > 1e-2


def test_truncate_rank_is_the_best_approximation_and_reports_dropped_energy(net):
    _, base, deltas, _, _, _ = net
    combined = lj.combine(deltas, [1.0, 0.7, -0.4])
    cut, dropped = lj.truncate_rank(combined, 3)
    for path in ("params/fc/kernel", "params/conv/kernel"):
        key = path.split("/")[1:]
        full = np.asarray(lj.advanced.dense_delta(combined["params"][key[0]][key[1]]), np.float64)
        mat = full.reshape(-1, full.shape[-1])
        s = np.linalg.svd(mat, compute_uv=False)
        np.testing.assert_allclose(
            float(dropped[path]), (s[3:] ** 2).sum() / (s**2).sum(), rtol=1e-4, atol=1e-7
        )
        u, sv, vt = np.linalg.svd(mat)
        best = (u[:, :3] * sv[:3]) @ vt[:3]
        got = np.asarray(lj.advanced.dense_delta(cut["params"][key[0]][key[1]]))
        np.testing.assert_allclose(got.reshape(mat.shape), best, rtol=1e-4, atol=1e-5)
        assert cut["params"][key[0]][key[1]].rank == 3
        assert 0 < float(dropped[path]) < 1
    # rank at or above the combined rank drops nothing and keeps the factors
    same, none = lj.truncate_rank(combined, 7)
    assert not none and same["params"]["fc"]["kernel"] is combined["params"]["fc"]["kernel"]


# ---- errors --------------------------------------------------------------------------------


def test_bad_ids_are_clear_errors(net):
    model, base, _, stack, tokens, serve = net
    with pytest.raises(lj.LoraArgumentError, match=r"outside \[-1, 4\)"):
        lj.implicit(model.apply)(base, stack, tokens, adapter_ids=jnp.asarray([0, 1, 4, 0, 0]))
    with pytest.raises(lj.LoraArgumentError, match="1-D integer"):
        lj.implicit(model.apply)(base, stack, tokens, adapter_ids=jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(lj.LoraArgumentError, match="adapter_ids has 3 entries"):
        lj.implicit(model.apply)(base, stack, tokens, adapter_ids=jnp.asarray([0, 1, 2]))
    with pytest.raises(lj.LoraArgumentError, match="pass adapter_ids"):
        lj.implicit(model.apply)(base, stack, tokens)
    with pytest.raises(lj.LoraStructureError, match="only\\s+implicit"):
        lj.merge(base, stack)
    # traced ids out of range cannot raise: their rows are NaN, never another adapter's
    # (4, the slot count, is the first id past the last slot)
    out = serve(base, stack, tokens, adapter_ids=jnp.asarray([0, 7, -1, -2, 4]))
    bad = np.isnan(np.asarray(out)).any(axis=(1, 2))
    assert bad.tolist() == [False, True, False, True, True]


def test_bad_stacks_are_clear_errors(net):
    _, base, deltas, stack, _, _ = net
    other = {
        "w": lj.LoraFactors(
            jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0, layout=lj.KernelLayout("io")
        )
    }
    wide = {
        "w": lj.LoraFactors(
            jnp.ones((5, 2)), jnp.ones((2, 4)), alpha=1.0, layout=lj.KernelLayout("io")
        )
    }
    with pytest.raises(lj.LoraStructureError, match=r"leaf 'w'.*shape \(5, 4\)"):
        lj.stack_adapters([other, wide])
    dora = {"w": other["w"].replace(magnitude=jnp.ones(4))}
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*DoRA"):
        lj.stack_adapters([other, dora])
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*LeafDelta"):
        lj.stack_adapters([other, {"w": lj.LeafDelta(jnp.zeros((3, 4)))}])
    half = {"w": other["w"].replace(a=other["w"].a.astype(jnp.bfloat16))}
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*bfloat16"):
        lj.stack_adapters([other, half])
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*bfloat16"):
        lj.set_adapter(lj.stack_adapters([other]), 0, half)
    with pytest.raises(lj.LoraStructureError, match="rank 4, more than the stack's rank 2"):
        big = {"w": other["w"].replace(a=jnp.ones((3, 4)), b=jnp.ones((4, 4)))}
        lj.set_adapter(lj.stack_adapters([other]), 0, big)
    with pytest.raises(lj.LoraArgumentError, match="slot 5 is outside"):
        lj.set_adapter(stack, 5, deltas[0])
    with pytest.raises(lj.LoraArgumentError, match="slots must be"):
        lj.stack_adapters([other, other], slots=1)
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*DoRA"):
        lj.combine([other, dora])


def test_bad_combinations_are_clear_errors():
    f = lj.LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), alpha=1.0, layout=lj.KernelLayout("io"))
    wide = f.replace(a=jnp.ones((5, 2)))
    with pytest.raises(lj.LoraArgumentError, match="at least one delta"):
        lj.combine([])
    with pytest.raises(lj.LoraArgumentError, match="1 weights for 2 deltas"):
        lj.combine([{"w": f}, {"w": f}], [1.0])
    with pytest.raises(lj.LoraStructureError, match=r"leaf 'w'.*shape \(5, 4\)"):
        lj.combine([{"w": f}, {"w": wide}])
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*trained-in-full"):
        lj.combine([{"w": f}, {"w": lj.LeafDelta(jnp.zeros((3, 4)))}])
    with pytest.raises(lj.LoraStructureError, match="leaf 'w'.*StackedFactors.*unstack"):
        lj.combine([lj.stack_adapters([{"w": f}])])
    with pytest.raises(lj.LoraStructureError, match="different tree structure"):
        lj.combine([{"w": f}, {"w": f, "v": None}])
    with pytest.raises(lj.LoraArgumentError, match="rank must be a positive int"):
        lj.truncate_rank({"w": f}, 0)


# ---- sharded: 8 CPU devices in a subprocess ------------------------------------------------


def test_sharded_mixed_batch_matches_one_device():
    res = run_on_eight_devices(ROOT / "tests" / "serving" / "serving_worker.py", timeout=600)
    assert res["devices"] == 8
    for name, err in res["max_abs_err"].items():
        assert err < 1e-4, (name, err)
    assert res["gathered_spec"] == res["want_spec"], res


# ---- examples and benchmark ------------------------------------------------------------------


def _run(args: list[str], timeout: int = 600) -> str:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
    )
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow  # about 50 s on 2 busy cores (pretrains and trains tiny adapters)
def test_serve_many_adapters_example_generates_each_adapters_tokens(tmp_path):
    """Mixed-adapter generation (KV cache, one batch) equals each adapter merged alone."""
    out = _run(
        [
            "-m",
            "examples.serve_many_adapters",
            "--adapters",
            "3",
            "--steps",
            "2",
            "--pretrain-steps",
            "2",
            "--no-cache",
            "--max-new-tokens",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    agree, total = map(int, re.search(r"(\d+)/(\d+) identical generations", out).groups())
    assert total == 4 and agree == total, out
    diff = float(re.search(r"prefill logits max rel\. diff ([0-9.eE+-]+)", out).group(1))
    assert diff < 1e-4
    assert re.search(r"hot-swap into slot 0: 0 compilations", out), out
    assert re.search(r"one batch: \d+ decode tokens/s", out), out


@pytest.mark.slow  # about 45 s on 2 busy cores
def test_serving_benchmark_smoke(tmp_path):
    path = tmp_path / "serving.json"
    _run(
        [
            "-m",
            "benchmarks.serving",
            "--small",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
            str(path),
        ]
    )
    res = json.loads(path.read_text())
    assert set(res["configs"]) == {"merged", "unmerged", "mixed16", "loop16"}
    for v in res["configs"].values():
        assert np.isfinite(v["tokens_per_s"]) and v["tokens_per_s"] > 0
    assert res["compilations_on_swap"] == 0
    assert res["check"]["mixed16_rel_err_vs_merged"] < 1e-4
    assert set(res["formulations"]) == {"gather", "onehot", "ragged"}
    assert res["decode"]["mixed16_equals_loop16_tokens"] is True
    assert {"merged", "unmerged", "mixed16", "loop16"} <= set(res["decode"])
