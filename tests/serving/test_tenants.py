"""Training many tenants' adapters in one mixed batch: isolation, per-tenant means, per-slot
optimizer settings, empty slots, NaN tenants, padded ranks, no recompilation.

References are independent of the mixed batch: each tenant's gradient from its own
delta merged into the base (``lj.merge``, autodiff through the dense sum) on its own
rows; each slot's update from ``optax.adamw`` run on that slot alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.advanced import tenant_weights
from lora_jax.debug import CompileCounter

N = 4  # slots
RANKS = [4, 2, 4, 3]  # slot 1 and 3 are padded to the stack's rank 4
LR = [1e-2, 3e-2, 1e-3, 2e-2]
WD = [0.0, 0.1, 0.0, 0.01]
# 16 rows: tenant 0 has 7, tenant 1 has 2, tenant 2 has 5, tenant 3 has 2
IDS = np.array([0, 1, 2, 3, 0, 0, 2, 1, 0, 2, 2, 2, 0, 3, 0, 0], np.int32)
STEPS = 3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, T, 8) -> (B, T, 4)
        return nn.Dense(4, name="fc2")(jax.nn.gelu(nn.Dense(16, name="fc1")(x)))


MODEL = MLP()


def _random(delta, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), delta)


@pytest.fixture(scope="module")
def setup():
    params = MODEL.init(jax.random.key(0), jnp.ones((1, 3, 8)))
    cfg = lambda r: lj.LoraConfig(targets=".*kernel", rank=r, alpha=4.0)  # noqa: E731
    base = lj.init_lora(jax.random.key(0), params, cfg(4))[0]
    deltas = [
        _random(lj.init_lora(jax.random.key(i), params, cfg(r))[1], i) for i, r in enumerate(RANKS)
    ]
    stack = lj.stack_adapters(deltas, rank=4)
    opt = lj.tenant_optimizer()
    fwd = lj.implicit(MODEL.apply)

    def loss_fn(stack, x, y, ids):
        out = fwd(base, stack, x, adapter_ids=ids)
        return lj.tenant_loss(((out - y) ** 2).mean((1, 2)), ids, N)[0]

    @jax.jit
    def step(stack, state, x, y, ids, tenant_settings):
        grads = jax.grad(loss_fn)(stack, x, y, ids)
        updates, state = opt.update(grads, state, stack, settings=tenant_settings, adapter_ids=ids)
        return optax.apply_updates(stack, updates), state

    rng = np.random.default_rng(1)
    xs = rng.standard_normal((STEPS, len(IDS), 3, 8)).astype(np.float32)
    ys = rng.standard_normal((STEPS, len(IDS), 3, 4)).astype(np.float32)
    tenant_settings = lj.tenant_settings(N, learning_rate=LR, weight_decay=WD, rank=RANKS)

    def run(ids, xs=xs, ys=ys, s=tenant_settings, stack=stack):
        state = opt.init(stack)
        for t in range(len(xs)):
            stack, state = step(stack, state, xs[t], ys[t], jnp.asarray(ids, jnp.int32), s)
        return stack, state

    return dict(
        base=base,
        deltas=deltas,
        stack=stack,
        opt=opt,
        step=step,
        loss_fn=loss_fn,
        run=run,
        xs=xs,
        ys=ys,
        settings=tenant_settings,
        mixed=run(IDS),
    )


def _slot(tree, n):
    return [np.asarray(x[n]) for x in jax.tree.leaves(tree)]


def _bits_equal(a, b):
    return all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a, b))


def test_each_tenant_after_mixed_steps_is_bit_identical_to_training_it_alone(setup):
    mixed, mixed_state = setup["mixed"]
    for n in range(N):
        alone, alone_state = setup["run"](np.where(IDS == n, n, -1))
        assert _bits_equal(_slot(mixed, n), _slot(alone, n)), n
        assert _bits_equal(_slot(mixed_state, n), _slot(alone_state, n)), n
        assert int(alone_state.inner.count[n]) == STEPS
        # the others had no rows: their slots are the initial ones
        for m in set(range(N)) - {n}:
            assert _bits_equal(_slot(alone, m), _slot(setup["stack"], m))


@pytest.mark.slow
def test_a_tenant_in_a_batch_of_its_own_rows_only_agrees_to_rounding(setup):
    """Another batch shape is another program: XLA may block its products differently."""
    mixed, _ = setup["mixed"]
    n = 1
    rows = IDS == n
    alone, _ = setup["run"](IDS[rows], setup["xs"][:, rows], setup["ys"][:, rows])
    for x, y in zip(_slot(mixed, n), _slot(alone, n)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_each_tenants_gradient_is_the_gradient_of_its_own_mean(setup):
    """Tenant 0 has 7 rows, tenant 1 two: each slot's gradient is its own mean's, computed
    from its delta merged into the base on its rows alone."""
    base, deltas, x, y = setup["base"], setup["deltas"], setup["xs"][0], setup["ys"][0]

    def own_means(deltas):
        def own_mean(d, rows):
            out = MODEL.apply(lj.merge(base, d), x[rows])
            return ((out - y[rows]) ** 2).mean()

        return {n: jax.grad(own_mean)(deltas[n], IDS == n) for n in (0, 1)}

    with jax.default_matmul_precision("highest"):
        g = jax.jit(jax.grad(setup["loss_fn"]))(setup["stack"], x, y, jnp.asarray(IDS))
        refs = jax.jit(own_means)(deltas)
    for n in (0, 1):  # 7 rows and 2 rows
        for name in ("fc1", "fc2"):
            got, want = g["params"][name]["kernel"], refs[n]["params"][name]["kernel"]
            r = RANKS[n]
            np.testing.assert_allclose(got.a[n, :, :r], want.a, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(got.b[n, :r], want.b, rtol=2e-4, atol=1e-6)


def test_each_slot_steps_like_optax_adamw_on_that_slot_alone(setup):
    """Per-slot learning rate and weight decay, against optax.adamw with that slot's values."""
    stack = setup["stack"]
    grads = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), x.dtype), stack
    )
    full_rank = lj.tenant_settings(N, learning_rate=LR, weight_decay=WD)
    rows = jnp.ones((N,), jnp.int32)
    opt = setup["opt"]
    updates, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p, settings=full_rank, rows=rows))(
        grads, stack
    )
    slot = lambda tree, n: [  # noqa: E731
        (s.a[n], s.b[n]) for s in jax.tree.leaves(tree, is_leaf=lj.advanced.is_stacked)
    ]

    @jax.jit
    def reference(grads, stack):
        out = []
        for n in range(N):
            ref_opt = optax.adamw(LR[n], weight_decay=WD[n])
            p = slot(stack, n)
            out.append(ref_opt.update(slot(grads, n), ref_opt.init(p), p)[0])
        return out

    want = reference(grads, stack)
    for n in range(N):
        for u, v in zip(jax.tree.leaves(slot(updates, n)), jax.tree.leaves(want[n])):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-9)
    assert all(
        float(jnp.abs(s.scale).max()) == 0.0
        for s in jax.tree.leaves(updates, is_leaf=lj.advanced.is_stacked)
    )


def test_a_slot_without_rows_keeps_its_factors_and_its_optimizer_state(setup):
    ids = np.where(IDS == 2, 0, IDS)  # slot 2 gets no rows, with lr 1e-3 and Adam moments set
    _, state = setup["mixed"]
    stack, _ = setup["mixed"]
    x, y = setup["xs"][0], setup["ys"][0]
    new, new_state = setup["step"](stack, state, x, y, jnp.asarray(ids), setup["settings"])
    assert _bits_equal(_slot(new, 2), _slot(stack, 2))
    assert _bits_equal(_slot(new_state, 2), _slot(state, 2))  # moments and count
    assert new_state.inner.count.tolist() == [STEPS + 1, STEPS + 1, STEPS, STEPS + 1]
    assert not _bits_equal(_slot(new, 0), _slot(stack, 0))


def test_a_nan_tenant_changes_no_other_tenant(setup):
    xs = setup["xs"].copy()
    xs[:, IDS == 3] = np.nan
    with_nan, nan_state = setup["run"](IDS, xs)
    without, without_state = setup["run"](np.where(IDS == 3, -1, IDS))
    for n in range(3):
        assert _bits_equal(_slot(with_nan, n), _slot(without, n)), n
        assert _bits_equal(_slot(nan_state, n), _slot(without_state, n)), n
        assert all(np.isfinite(v).all() for v in _slot(with_nan, n))
    assert not all(np.isfinite(v).all() for v in _slot(with_nan, 3))  # the NaN stays its own


def test_nan_rows_without_a_tenant_reach_no_slot(setup):
    """Rows with id -1 gather slot 0's factors (clipped index) but take zeros through a
    select: a NaN there gives slot 0 no NaN gradient."""
    xs = setup["xs"].copy()
    xs[:, IDS == 3] = np.nan
    ids = np.where(IDS == 3, -1, IDS)
    stack, _ = setup["run"](ids, xs)
    clean, _ = setup["run"](ids)
    for n in range(N):
        assert _bits_equal(_slot(stack, n), _slot(clean, n)), n


def test_padded_rank_columns_stay_exactly_zero_and_unused_ones_unchanged(setup):
    mixed, _ = setup["mixed"]
    for s in jax.tree.leaves(mixed, is_leaf=lj.advanced.is_stacked):
        for n, r in enumerate(RANKS):
            assert not np.asarray(s.a[n, :, r:]).any() and not np.asarray(s.b[n, r:]).any()
    # slot 0 holds a rank-4 adapter; told to use rank 2, its columns 2..3 are never updated
    narrow = setup["settings"].replace(rank=[2, 2, 4, 3])
    stack, _ = setup["run"](IDS, s=narrow)
    for got, init in zip(
        jax.tree.leaves(stack, is_leaf=lj.advanced.is_stacked),
        jax.tree.leaves(setup["stack"], is_leaf=lj.advanced.is_stacked),
    ):
        assert np.array_equal(got.a[0, :, 2:], init.a[0, :, 2:])
        assert np.array_equal(got.b[0, 2:], init.b[0, 2:])
        assert not np.array_equal(got.a[0, :, :2], init.a[0, :, :2])


def test_changing_settings_ids_and_rows_compiles_nothing(setup):
    stack, state = setup["mixed"]
    x, y = setup["xs"][0], setup["ys"][0]
    other = lj.tenant_settings(N, learning_rate=[0.1, 0.0, 1e-4, 5e-3], weight_decay=0.3, rank=1)
    reversed_ids, one_tenant = jnp.asarray(IDS[::-1].copy()), jnp.full((16,), 2, jnp.int32)
    with CompileCounter() as compiles:
        stack, state = setup["step"](stack, state, x, y, reversed_ids, other)
        stack, state = setup["step"](stack, state, x, y, one_tenant, other)
    assert compiles.count == 0


def test_copy_slot_moves_one_slot_exactly(setup):
    mixed, _ = setup["mixed"]
    sampler = setup["stack"]
    synced = jax.jit(lj.advanced.copy_slot)(sampler, mixed, jnp.int32(1))
    assert _bits_equal(_slot(synced, 1), _slot(mixed, 1))
    for n in (0, 2, 3):
        assert _bits_equal(_slot(synced, n), _slot(sampler, n))
    # fc1: a (8, 4) + b (4, 16), fc2: a (16, 4) + b (4, 4), two scales; float32
    assert lj.advanced.slot_nbytes(mixed) == 4 * (8 * 4 + 4 * 16 + 16 * 4 + 4 * 4 + 2)


def test_bad_input_is_refused_clearly(setup):
    stack, opt = setup["stack"], setup["opt"]
    with pytest.raises(
        lj.LoraArgumentError, match=r"learning_rate must be a scalar or have shape \(4,\)"
    ):
        lj.tenant_settings(4, learning_rate=[1.0, 2.0])
    with pytest.raises(lj.LoraArgumentError, match="one loss per row"):
        lj.tenant_loss(jnp.ones(3), jnp.zeros(4, jnp.int32), 2)
    with pytest.raises(lj.LoraArgumentError, match="1-D integer"):
        lj.advanced.rows_per_slot(jnp.zeros(4), 2)
    with pytest.raises(lj.LoraStructureError, match="expected StackedFactors"):
        opt.init(setup["deltas"][0])
    with pytest.raises(lj.LoraArgumentError, match="needs params"):
        opt.update(stack, opt.init(stack), settings=setup["settings"], rows=jnp.ones(N))
    with pytest.raises(lj.LoraArgumentError, match=r"rows must have shape \(4,\)"):
        opt.update(stack, opt.init(stack), stack, settings=setup["settings"], rows=jnp.ones(3))


_tenant_loss = jax.jit(lambda losses, ids: lj.tenant_loss(losses, ids, 4))
_tenant_weights = jax.jit(lambda ids: tenant_weights(ids, 4))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=8, max_size=8), st.integers(0, 2**31 - 1))
def test_tenant_loss_is_the_sum_of_each_tenants_mean(ids, seed):
    losses = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    total, each = _tenant_loss(losses, np.asarray(ids, np.int32))
    ids = np.asarray(ids)
    want = [losses[ids == n].mean() if (ids == n).any() else 0.0 for n in range(4)]
    np.testing.assert_allclose(each, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, sum(want), rtol=1e-5, atol=1e-5)
    w = np.asarray(_tenant_weights(ids.astype(np.int32)))
    np.testing.assert_allclose(w.sum(), len(set(ids.tolist()) - {-1}), rtol=1e-6)


def _run_module(module: str, *args: str, cwd) -> None:
    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_rl_example_runs_two_tenants_without_recompiling(tmp_path):
    out = tmp_path / "rl.json"
    _run_module(
        "examples.rl_grpo",
        *("--pretrain-steps", "10", "--no-cache", "--steps", "3", "--tenants", "2"),
        *("--prompts", "2", "--group", "4", "--out", str(tmp_path), "--json", str(out)),
        cwd=tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["compilations_after_warmup"] == 0
    rewards = np.asarray(result["rewards"])
    assert rewards.shape == (3, 2) and ((rewards >= 0) & (rewards <= 1)).all()
    # the default reward is exact (no partial credit): it is the exact accuracy
    np.testing.assert_array_equal(np.asarray(result["accuracy"]), rewards)
    assert result["rules"] == ["repeat the last digit", "repeat the first digit"]
    for greedy in (result["greedy_accuracy_start"], result["greedy_accuracy_end"]):
        assert len(greedy) == 2 and all(0 <= a <= 1 for a in greedy)
    assert all(np.isfinite(result["kl"])) and result["kl"][0] == pytest.approx(0.0, abs=1e-6)
    # the demo LM's q, k, v, out (128 x 128), fc1 (128 x 512), fc2 (512 x 128) in 2 blocks at
    # rank 8: a + b of each, plus 12 scales, float32
    kernels = 4 * (128 + 128) + 2 * (128 + 512)
    assert result["sync_bytes_per_tenant"] == 4 * (2 * 8 * kernels + 12)


@pytest.mark.slow
def test_multitenant_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "mt.json"
    _run_module(
        "benchmarks.multitenant",
        *("--small", "--rounds", "1", "--steps", "1", "--json", str(out)),
        cwd=tmp_path,
    )
    doc = json.loads(out.read_text())
    for model in ("demo", "reference"):
        t = doc["training"][model]
        assert t["mixed16"]["tokens_per_s"] > 0 and t["separate16"]["tokens_per_s"] > 0
        assert t["tenant3_grad_rel_diff_mixed_vs_separate"] < 1e-4
    assert set(doc["sync"]) == {"demo", "reference", "gemma3_270m"}
    assert all(0 < v["percent"] < 100 for v in doc["sync"].values())
    mem = doc["reference_memory"]
    assert mem["batch_over_policy_weights"] == 1.0  # the reference holds no weights
    assert mem["copy_over_policy_weights"] > 1.0
