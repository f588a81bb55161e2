"""The adapter cache: LRU order in both tiers, pinning, exact padding, files, bad input.

Outputs are checked against the model on each adapter merged alone in float64
NumPy (``W + s A @ B``; float32 model, highest matmul precision), and the padded
slot against ``implicit(fn)(base, adapter, x)`` with the adapter at its own rank; the bookkeeping against the LRU
rules written out by hand; every refused call against a snapshot of the cache
(its state and its stack's arrays) taken before it.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.debug import CompileCounter

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = r"params/(up|down)/kernel"


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, T, 6)
        return nn.Dense(5, name="down")(jnp.tanh(nn.Dense(8, name="up")(x)))


def _adapter(base, seed, rank, alpha=4.0, targets=TARGETS):
    """A trained-looking adapter (random A and B), drawn with NumPy (no compile per shape)."""
    cfg = lj.LoraConfig(targets=targets, rank=rank, alpha=alpha)
    d = jax.eval_shape(lambda: lj.init_lora(jax.random.key(0), base, cfg)[1])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), d)


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 6)), jnp.float32)
    base = jax.jit(model.init)(jax.random.key(0), x)
    adapters = {f"t{i}": _adapter(base, i, rank=1 + i % 4) for i in range(8)}
    serve = jax.jit(lj.implicit(model.apply, strict=True))
    apply = jax.jit(model.apply)

    def alone(base, delta, x):
        """The model on ``W + s A @ B`` merged in float64 NumPy (``delta=None``: the base)."""
        params = jax.tree.map(np.asarray, base)
        for k in ("up", "down") if delta is not None else ():
            f = delta["params"][k]["kernel"]
            w = params["params"][k]["kernel"].astype(np.float64)
            w = w + f.scale * (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64))
            params["params"][k]["kernel"] = w.astype(np.float32)
        return apply(params, x)

    return model, base, x, adapters, serve, alone


def _cache(net, slots=3, host=5, names=("t0", "t1", "t2", "t3", "t4"), rank=8):
    _, base, _, adapters, _, _ = net
    cache = lj.AdapterCache(
        base, lj.LoraConfig(targets=TARGETS, rank=1), max_slots=slots, host_capacity=host, rank=rank
    )
    for n in names:
        cache.add(n, adapters[n])
    return cache


def _snapshot(cache):
    return cache.state(), [np.array(a) for a in jax.tree.leaves(cache.stack)]


def _assert_unchanged(cache, snap):
    state, arrays = snap
    assert cache.state() == state
    for got, want in zip(jax.tree.leaves(cache.stack), arrays):
        np.testing.assert_array_equal(np.asarray(got), want)


def _check_rows(net, cache, names, out=None, deltas=None):
    """``serve`` on the cache's stack equals each row's adapter alone (the base for None)."""
    model, base, x, adapters, serve, alone = net
    adapters = adapters if deltas is None else deltas
    if out is None:
        ids = cache.resolve(names)
        out = serve(base, cache.stack, x, adapter_ids=ids)
    got = out
    for e, n in enumerate(names):
        want = alone(base, None if n is None else adapters[n], x[e : e + 1])
        np.testing.assert_allclose(got[e], want[0], **TOL)
    return got


def test_lru_order_eviction_and_counters(net):
    cache = _cache(net)
    assert cache.state().host == ("t0", "t1", "t2", "t3", "t4")
    assert cache.state().slots == (None, None, None)
    assert cache.resolve(["t0", None, "t1", "t0"]).tolist() == [0, -1, 1, 0]
    assert cache.resolve(["t2"]).tolist() == [2]
    # t0, t1, t2 resident, t0 least recently used: t3 takes its slot
    assert cache.resolve(["t1", "t3"]).tolist() == [1, 0]
    s = cache.state()
    assert s.slots == ("t3", "t1", "t2")
    assert s.host == ("t4", "t0", "t2", "t1", "t3")  # least recently used first
    assert cache.stats == {"hits": 1, "misses": 4, "host_loads": 0, "evictions": 1}
    # a batch's own adapters are never evicted for each other: t4 takes t2's slot, not t1's
    assert cache.resolve(["t1", "t4", "t3"]).tolist() == [1, 2, 0]
    _check_rows(net, cache, ["t4", "t1", None, "t3"])


def test_padding_a_small_rank_into_a_wide_slot_is_exact(net):
    model, base, x, adapters, serve, alone = net
    cache = _cache(net, names=())
    two = _adapter(base, 50, rank=2, alpha=3.0)
    cache.add("r2", two)
    a, b, scale = cache.host_arrays("r2")["params/up/kernel"]
    assert a.shape == (6, 8) and b.shape == (8, 8) and scale == np.float32(1.5)
    assert not a[:, 2:].any() and not b[2:].any()
    np.testing.assert_array_equal(a[:, :2], np.asarray(two["params"]["up"]["kernel"].a))
    ids = cache.resolve(["r2"] * 4)
    got = serve(base, cache.stack, x, adapter_ids=ids)
    # == implicit with that adapter alone (its own rank), and == the merged reference
    np.testing.assert_allclose(got, jax.jit(lj.implicit(model.apply))(base, two, x), **TOL)
    np.testing.assert_allclose(got, alone(base, two, x), **TOL)
    # and it moved the output: the check could fail
    assert float(jnp.abs(got - model.apply(base, x)).max()) > 1e-2


def test_pinning(net):
    cache = _cache(net)
    cache.pin("t4")
    cache.resolve(["t0", "t1"])
    cache.resolve(["t2", "t3"])  # evicts t0 and t1, never the pinned t4
    assert set(cache.state().slots) == {"t2", "t3", "t4"}
    cache.pin("t2")
    snap = _snapshot(cache)
    with pytest.raises(lj.LoraArgumentError, match="2 distinct adapters.*2 pinned"):
        cache.resolve(["t0", "t1"])  # one unpinned slot for two adapters
    _assert_unchanged(cache, snap)
    cache.pin("t3")
    snap = _snapshot(cache)
    with pytest.raises(lj.LoraArgumentError, match="all 3 slots are pinned"):
        cache.pin("t0")
    _assert_unchanged(cache, snap)
    cache.unpin("t2")
    assert cache.resolve(["t0"]).tolist() == [cache.state().slots.index("t0")]
    assert "t2" not in cache.state().slots
    _check_rows(net, cache, ["t0", "t3", "t4", None])


def test_unknown_name_is_refused_before_anything_changes(net):
    cache = _cache(net)
    before = _check_rows(net, cache, ["t0", "t1", None, "t2"])
    snap = _snapshot(cache)
    with pytest.raises(
        lj.LoraArgumentError, match=r"unknown adapter\(s\) \['nope'\] at rows 'nope': \[1\]"
    ):
        cache.resolve(["t3", "nope", "t4", "t0"])  # t3 and t4 would have evicted
    _assert_unchanged(cache, snap)
    # the other rows of the batch keep their answer
    _model, base, x, _, serve, _ = net
    ids = cache.resolve(["t0", "t1", None, "t2"])
    again = serve(base, cache.stack, x, adapter_ids=ids)
    np.testing.assert_array_equal(again, before)
    snap = _snapshot(cache)
    for bad in (lambda: cache.pin("nope"), lambda: cache.unpin(3), lambda: cache.remove("x")):
        with pytest.raises(lj.LoraArgumentError, match="unknown adapter"):
            bad()
        _assert_unchanged(cache, snap)


def test_bad_adapters_are_refused_and_lose_nothing(net):
    _, base, x, adapters, serve, _ = net
    cache = _cache(net, rank=4)
    cache.resolve(["t0", "t1", "t2"])
    cache.pin("t1")
    wide = _adapter(base, 60, rank=5)
    leaf = jax.tree.map(lambda x: x, adapters["t0"])
    leaf["params"]["up"]["kernel"] = lj.LeafDelta(jnp.zeros((6, 8)))
    alien = {"params": {"w": adapters["t0"]["params"]["up"]["kernel"]}}
    cases = [
        (
            lambda: cache.add("t0", wide),
            lj.LoraStructureError,
            "rank 5, more than the cache's slot rank 4",
        ),
        (lambda: cache.add("t2", leaf), lj.LoraStructureError, "plain LoRA factors"),
        (lambda: cache.add("new", alien), lj.LoraStructureError, "tree structure differs"),
        (lambda: cache.add("", adapters["t1"]), lj.LoraArgumentError, "non-empty str"),
        (lambda: cache.resolve(["t0", "t1", "t2", "t3"]), lj.LoraArgumentError, "4 distinct"),
        # ids out of range for the stack, straight into the server (concrete ids are checked)
        (
            lambda: lj.implicit(Net().apply)(
                base, cache.stack, x, adapter_ids=np.array([0, 1, 3, -1])
            ),
            lj.LoraArgumentError,
            "outside",
        ),
    ]
    for call, error, message in cases:
        snap = _snapshot(cache)
        with pytest.raises(error, match=message):
            call()
        _assert_unchanged(cache, snap)
    # a cache with slots for `up` only refuses an adapter of `up` and `down`
    up_only = lj.AdapterCache(
        base, lj.LoraConfig(targets=r"params/up/kernel", rank=4), max_slots=1, host_capacity=1
    )
    snap = _snapshot(up_only)
    with pytest.raises(lj.LoraStructureError, match="'params/down/kernel'.*no slots there"):
        up_only.add("x", adapters["t1"])
    _assert_unchanged(up_only, snap)
    # a kernel of another shape: a cache built over another base refuses this one's adapters
    small = {"params": {"up": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}}
    other = lj.AdapterCache(
        small, lj.LoraConfig(targets=r"params/up/kernel", rank=4), max_slots=1, host_capacity=1
    )
    snap = _snapshot(other)
    bad = {"params": {"up": {"kernel": adapters["t0"]["params"]["up"]["kernel"], "bias": None}}}
    with pytest.raises(lj.LoraStructureError, match=r"shape \(6, 8\).*shape \(6, 4\)"):
        other.add("x", bad)
    _assert_unchanged(other, snap)
    _check_rows(net, cache, ["t0", "t1", "t2", None])


def test_host_tier_capacity(net, tmp_path):
    _, base, _, adapters, _, _ = net
    cache = _cache(net, slots=2, host=3, names=())
    lj.save(tmp_path / "f0", adapters["t0"])
    cache.add_file("f0", tmp_path / "f0")
    cache.add("d1", adapters["t1"])
    cache.add("d2", adapters["t2"])
    cache.add("d3", adapters["t3"])  # host full: evicts f0 (LRU); it has a file, so stays known
    assert cache.state().host == ("d1", "d2", "d3") and "f0" in cache
    cache.resolve(["d2", "d3"])
    cache.add("d4", adapters["t4"])  # evicts d1, given as a delta: forgotten
    assert cache.state().host == ("d2", "d3", "d4") and "d1" not in cache
    cache.resolve(["f0"])  # reread from its file into the host tier (evicting d4, not resident)
    assert cache.state().host == ("d2", "d3", "f0") and cache.stats["host_loads"] == 1
    deltas = {"f0": adapters["t0"], "d3": adapters["t3"], "d2": adapters["t2"]}
    _check_rows(net, cache, ["f0", "d3", None, "f0"], deltas=deltas)
    # host == slots, both resident: nothing can be evicted for a new adapter
    full = _cache(net, slots=2, host=2, names=("t0", "t1"))
    full.resolve(["t0", "t1"])
    snap = _snapshot(full)
    with pytest.raises(lj.LoraArgumentError, match="host tier is full"):
        full.add("t2", adapters["t2"])
    _assert_unchanged(full, snap)
    with pytest.raises(lj.LoraArgumentError, match="host_capacity .* >= max_slots"):
        lj.AdapterCache(base, lj.LoraConfig(targets=TARGETS), max_slots=3, host_capacity=2)


def test_lora_jax_and_peft_directories(net, tmp_path):
    _, base, _, adapters, _, _ = net
    cache = _cache(net, names=())
    lj.save(tmp_path / "ours", adapters["t1"])
    lj.export_peft(tmp_path / "peft", adapters["t2"])
    cache.add_file("ours", tmp_path / "ours")
    cache.add_peft("theirs", tmp_path / "peft")
    for name, delta in (("ours", adapters["t1"]), ("theirs", adapters["t2"])):
        a, b, s = cache.host_arrays(name)["params/up/kernel"]
        f = delta["params"]["up"]["kernel"]
        np.testing.assert_allclose(a[:, : f.rank], f.a, rtol=1e-6)
        np.testing.assert_allclose(b[: f.rank], f.b, rtol=1e-6)
        assert s == np.float32(f.scale)
    model, base, x, _, serve, alone = net
    ids = cache.resolve(["ours", "theirs", None, "ours"])
    got = serve(base, cache.stack, x, adapter_ids=ids)
    for e, d in ((0, adapters["t1"]), (1, adapters["t2"]), (3, adapters["t1"])):
        np.testing.assert_allclose(got[e], alone(base, d, x[e : e + 1])[0], **TOL)
    # a corrupt file is refused at add, the cache unchanged
    (tmp_path / "bad").mkdir()
    snap = _snapshot(cache)
    with pytest.raises(lj.LoraFileError):
        cache.add_file("bad", tmp_path / "bad")
    _assert_unchanged(cache, snap)


def test_an_adapter_peft_saved_serves_peft_outputs():
    """``tests/fixtures/peft/mlp_lora``: PEFT's own ``save_pretrained`` output (ranks 4 and
    2, alphas 8 and 3) and the PEFT model's outputs, recorded by torch. Padded into rank-8
    slots next to another adapter, its rows give PEFT's outputs and the base rows PEFT's
    outputs with the adapter disabled."""
    from safetensors import safe_open  # noqa: PLC0415

    case = Path(__file__).resolve().parents[1] / "fixtures" / "peft" / "mlp_lora"
    with safe_open(str(case / "reference.safetensors"), framework="np") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    params = {
        "params": {
            n: {"kernel": jnp.asarray(ref[f"base.{n}.weight"].T), "bias": ref[f"base.{n}.bias"]}
            for n in ("fc1", "fc2")
        }
    }

    def mlp(p, x):
        p = p["params"]
        h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    cfg = lj.LoraConfig(targets=r"params/fc\d/kernel", rank=2)
    cache = lj.AdapterCache(params, cfg, max_slots=2, host_capacity=2, rank=8)
    other = jax.eval_shape(lambda: lj.init_lora(jax.random.key(0), params, cfg)[1])
    cache.add("other", jax.tree.map(lambda x: np.ones(x.shape, x.dtype), other))
    cache.add_peft("peft", case)
    ids = cache.resolve(["peft", None, "other", "peft"])
    got = jax.jit(lj.implicit(mlp))(params, cache.stack, jnp.asarray(ref["input"]), adapter_ids=ids)
    for e, want in ((0, ref["output"]), (1, ref["base_output"]), (3, ref["output"])):
        np.testing.assert_allclose(got[e], want[e], rtol=1e-5, atol=2e-5)
    assert np.abs(got[2] - ref["base_output"][2]).max() > 1e-2  # "other" moved its row


def test_loads_and_evictions_never_compile(net):
    """After one slot write and one serve call, a sequence of adds (other ranks and
    alphas), resolves with evictions in both tiers and serve calls compiles nothing."""
    _, base, x, adapters, serve, _ = net
    cache = _cache(net, slots=2, host=4, names=("t0",))
    ids = cache.resolve(["t0"] * 4)
    jax.block_until_ready(serve(base, cache.stack, x, adapter_ids=ids))
    trace = [["t1", "t2", None, "t1"], ["t3", "t3", "t4", "t4"], ["t5", None, "t6", "t5"]]
    with CompileCounter() as counter:
        outs = []
        for names in trace:
            for n in dict.fromkeys(n for n in names if n is not None):
                cache.add(n, adapters[n])
            ids = cache.resolve(names)
            outs.append(serve(base, cache.stack, x, adapter_ids=ids))
        jax.block_until_ready(outs)
    assert counter.count == 0, f"{counter.count} compilations while adapters came and went"
    assert cache.stats["evictions"] >= 3
    _check_rows(net, cache, trace[-1], outs[-1])


def test_resolve_returns_while_the_device_is_still_busy(net):
    """The slot write is dispatched, not waited for: with a long computation reading the
    stack in flight, ``resolve`` returns ids (from the bookkeeping, no device read) and
    the new stack while that computation is still running; the write then lands after it."""
    _, base, x, adapters, serve, _ = net
    cache = _cache(net, slots=2, host=4, names=("t0", "t1", "t2"))
    cache.resolve(["t0", "t1"])

    @jax.jit
    def busy(stack, m):
        m = jax.lax.fori_loop(0, 300, lambda i, m: jnp.tanh(m @ m), m)
        return m.sum() + sum(jnp.sum(s) for s in jax.tree.leaves(stack))

    m = jnp.full((256, 256), 1e-3)
    jax.block_until_ready(busy(cache.stack, m))
    held = busy(cache.stack, m)  # dispatched: reads the current stack
    with jax.transfer_guard_device_to_host("disallow"):  # no device value read back
        ids = cache.resolve(["t2", "t1"])
    still_running = not held.is_ready()
    jax.block_until_ready(held)
    assert still_running, "resolve waited for the device"
    assert ids.tolist() == [0, 1] and isinstance(ids, np.ndarray)
    _check_rows(net, cache, ["t2", "t1", None, "t2"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small base and six adapters: t0..t3 saved as lora_jax directories, t4 and t5 deltas."""
    model = Net()
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, 6)))
    adapters = {f"t{i}": _adapter(base, i, rank=1 + i % 4) for i in range(6)}
    root = tmp_path_factory.mktemp("adapters")
    paths = {n: lj.save(root / n, adapters[n]) for n in ("t0", "t1", "t2", "t3")}
    return base, adapters, paths


@settings(max_examples=25, deadline=None)
@given(
    trace=st.lists(
        st.lists(
            st.sampled_from(["t0", "t1", "t2", "t3", "t4", "t5", None]), min_size=1, max_size=2
        ),
        min_size=1,
        max_size=8,
    )
)
@pytest.mark.slow
def test_every_id_points_at_its_adapter(saved, trace):
    """After any sequence of batches, each returned id's slot holds that adapter's arrays,
    the host tier holds every resident adapter and never exceeds its capacity, and a name
    is forgotten only when it was given as a delta and the host tier evicted it."""
    base, adapters, paths = saved
    cache = lj.AdapterCache(
        base, lj.LoraConfig(targets=TARGETS, rank=1), max_slots=2, host_capacity=4, rank=4
    )
    for n, p in paths.items():
        cache.add_file(n, p)
    cache.add("t4", adapters["t4"])
    cache.add("t5", adapters["t5"])
    for names in trace:
        known = [n if n is None or n in cache else None for n in names]
        assert all(n in cache for n in paths)  # files are never forgotten
        ids = cache.resolve(known)
        s = cache.state()
        assert set(s.slots) - {None} <= set(s.host) and len(s.host) <= cache.host_capacity
        leaves = jax.tree.leaves(cache.stack)
        for n, i in zip(known, ids.tolist()):
            if n is None:
                assert i == -1
                continue
            assert s.slots[i] == n
            host = [x for k in cache.host_arrays(n).values() for x in k]
            assert len(leaves) == len(host) == 6
            for got, want in zip(leaves, host):
                np.testing.assert_array_equal(np.asarray(got[i]), want)
            f = adapters[n]["params"]["up"]["kernel"]
            np.testing.assert_array_equal(host[3][:, : f.rank], np.asarray(f.a))


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """``python -m benchmarks.adapter_cache --small`` runs, swaps without compiling and
    decodes the same tokens as the all-resident stack (no timing is asserted)."""
    import json  # noqa: PLC0415

    from benchmarks import adapter_cache  # noqa: PLC0415

    adapter_cache.main(["--small", "--json", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["compilations"] == 0 and out["tokens_equal"] is True
    assert out["cache"]["misses"] > 0 and out["cache"]["evictions"] > 0
    assert out["cache"]["slot_bytes"] == 147504  # 12 kernels, rank 8, float32, plus 12 scales
    for config in out["configs"].values():
        assert all(v > 0 for v in config.values())
