"""Sharded LoRA: delta shardings derived from the base's, training on a mesh, scan + remat.

Single-device checks run here: factor specs for every layout, every form of
base shardings (NamedSharding, PartitionSpec + mesh, linen boxes with logical
rules, NNX annotations, placed arrays), optimizer-state shardings, clear
errors for bad shardings (on an ``AbstractMesh``, so no devices are needed),
and scan-stacked vs unrolled training and remat on/off gradients.

The multi-device checks need 8 devices, which ``XLA_FLAGS`` must request
before JAX starts: ``tests/core/sharding_worker.py`` runs them in one subprocess
(meshes (8,1,1), (2,2,2), (1,1,8); equality with one device; shardings; the
compiled HLO) and prints JSON that the tests below assert on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from tests._eight_devices import run_on_eight_devices

ROOT = Path(__file__).resolve().parents[2]
AXES = ("data", "fsdp", "tensor")
MESH8 = AbstractMesh((2, 2, 2), AXES)  # specs and errors need no devices


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "sharded_finetune", ROOT / "examples" / "sharded_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


ex = _load_example()


def _abstract_delta(params, config, layouts=None):
    return jax.eval_shape(
        lambda k: lj.init_lora(k, params, config, layouts=layouts)[1], jax.random.key(0)
    )


def _sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _specs(sh):
    """(A spec, B spec) of one LoraFactors of shardings, as tuples."""
    return tuple(sh.a.spec), tuple(sh.b.spec)


# -----------------------------------------------------------------------------
# Factor specs
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, spec, want_a, want_b, want_m",
    [
        ("io", P("fsdp", "tensor"), ("fsdp", None), (None, "tensor"), ("tensor",)),
        ("io", P(("data", "fsdp")), (("data", "fsdp"), None), (None, None), (None,)),
        ("io", P(), (None, None), (None, None), (None,)),
        (
            "ioo",
            P("fsdp", "tensor", None),
            ("fsdp", None),
            (None, "tensor", None),
            ("tensor", None),
        ),
        ("iio", P("tensor", None, "fsdp"), ("tensor", None, None), (None, "fsdp"), ("fsdp",)),
        ("oi", P("tensor", "fsdp"), ("fsdp", None), (None, "tensor"), ("tensor",)),  # (out, in)
        (
            "sio",
            P(None, "fsdp", "tensor"),
            (None, "fsdp", None),
            (None, None, "tensor"),
            (None, "tensor"),
        ),
        (
            "iiio",
            P(None, None, "fsdp", "tensor"),
            (None, None, "fsdp", None),
            (None, "tensor"),
            ("tensor",),
        ),  # conv
    ],
)
def test_factor_specs(layout, spec, want_a, want_b, want_m):
    a, b, m = lj.advanced.factor_specs(spec, lj.KernelLayout(layout))
    assert (tuple(a), tuple(b), tuple(m)) == (want_a, want_b, want_m)


# -----------------------------------------------------------------------------
# delta_shardings from every form of base shardings
# -----------------------------------------------------------------------------

PARAMS = {
    "up": {"kernel": _sds(64, 192), "bias": _sds(192)},
    "qkv": {"kernel": _sds(64, 8, 16)},
    "stack": {"kernel": _sds(4, 64, 32)},
}
CONFIG = lj.LoraConfig(
    targets=r".*kernel", rank=4, layouts={"qkv/kernel": "ioo", "stack/kernel": "sio"}
)
SPECS = {
    "up": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
    "qkv": {"kernel": P("fsdp", "tensor", None)},
    "stack": {"kernel": P(None, "fsdp", "tensor")},
}
WANT = {
    "up/kernel": (("fsdp", None), (None, "tensor")),
    "qkv/kernel": (("fsdp", None), (None, "tensor", None)),
    "stack/kernel": ((None, "fsdp", None), (None, None, "tensor")),
}


def _check_want(sh, want=WANT):
    rows = lj.advanced.leaves_with_paths(sh, is_leaf=lj.advanced.is_factors)[0]
    got = {p: _specs(f) for p, f in rows if lj.advanced.is_factors(f)}
    assert got == want


def test_delta_shardings_from_partition_specs_and_mesh():
    delta = _abstract_delta(PARAMS, CONFIG)
    sh = lj.delta_shardings(SPECS, delta, MESH8)
    _check_want(sh)
    assert sh["up"]["bias"] is None
    # The result is a valid sharding tree for the delta (same structure, NamedSharding leaves).
    assert jax.tree.structure(sh) == jax.tree.structure(delta)
    f = sh["up"]["kernel"]
    assert f.a.shard_shape((64, 4)) == (32, 4) and f.b.shard_shape((4, 192)) == (4, 96)


def test_delta_shardings_from_named_shardings_and_single_spec():
    delta = _abstract_delta(PARAMS, CONFIG)
    named = jax.tree.map(
        lambda s: NamedSharding(MESH8, s), SPECS, is_leaf=lambda x: isinstance(x, P)
    )
    _check_want(lj.delta_shardings(named, delta))
    # One spec for every kernel (here: replicate everything).
    sh = lj.delta_shardings(NamedSharding(MESH8, P()), delta)
    assert _specs(sh["qkv"]["kernel"]) == ((None, None), (None, None, None))


def test_dora_magnitude_follows_the_fan_out_spec():
    delta = _abstract_delta(PARAMS, CONFIG)
    stack = delta["stack"]["kernel"]
    delta["stack"]["kernel"] = dataclasses.replace(stack, magnitude=_sds(4, 32))
    sh = lj.delta_shardings(SPECS, delta, MESH8)
    assert tuple(sh["stack"]["kernel"].magnitude.spec) == (None, "tensor")
    assert sh["up"]["kernel"].magnitude is None


class _Logical(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(64, kernel_init=init, name="up")(x)
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("tensor", "fsdp"))
        return nn.Dense(32, kernel_init=init, name="down")(x)  # mesh axes, no rules needed


RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))


def _logical_variables():
    return jax.eval_shape(_Logical().init, jax.random.key(0), jnp.ones((1, 16)))


def test_linen_logical_and_mesh_partitioning():
    variables = _logical_variables()
    base_sh = lj.param_shardings(variables, MESH8, rules=RULES)
    # Boxes are unboxed: the shardings tree matches nn.unbox(variables).
    assert jax.tree.structure(base_sh) == jax.tree.structure(nn.unbox(variables))
    assert base_sh["params"]["up"]["kernel"].spec == P("fsdp", "tensor")
    assert base_sh["params"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert base_sh["params"]["up"]["bias"].spec == P()  # not annotated: replicated
    delta = _abstract_delta(nn.unbox(variables), lj.LoraConfig(targets=".*kernel", rank=4))
    want = {
        "params/up/kernel": (("fsdp", None), (None, "tensor")),
        "params/down/kernel": (("tensor", None), (None, "fsdp")),
    }
    # From the boxes directly, from the derived NamedShardings, and with flax's rules context.
    _check_want(lj.delta_shardings(variables, delta, MESH8, rules=RULES), want)
    _check_want(lj.delta_shardings(base_sh, delta), want)
    with nn.logical_axis_rules(RULES):
        _check_want(lj.delta_shardings(variables, delta, MESH8), want)


def _nnx_state():
    class Model(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
            self.up = nnx.Linear(16, 64, kernel_init=init, rngs=rngs)

    eager = getattr(nnx, "use_eager_sharding", None)  # flax >= 0.12 shards eagerly
    with eager(False) if eager else contextlib.nullcontext():
        return nnx.split(Model(nnx.Rngs(0)))[1]


def test_nnx_sharding_annotations():
    state = _nnx_state()
    _, delta = lj.init_lora(jax.random.key(0), state, lj.LoraConfig(targets=".*kernel", rank=4))
    want = {"up/kernel": (("fsdp", None), (None, "tensor"))}
    for source in (state, nnx.get_partition_spec(state)):
        sh = lj.delta_shardings(source, delta, MESH8)
        _check_want(sh, want)
        # NNX variable wrappers are kept, so the tree is a sharding tree for the delta.
        assert jax.tree.structure(sh) == jax.tree.structure(delta)
    base_sh = lj.param_shardings(state, MESH8)
    assert jax.tree.leaves(base_sh)[1].spec == P("fsdp", "tensor")


def test_init_lora_sharded_equals_init_lora_and_reads_placed_params():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), AXES)
    params = {
        "up": {"kernel": jnp.ones((64, 192)), "bias": jnp.zeros(192)},
        "qkv": {"kernel": jnp.ones((64, 8, 16))},
        "stack": {"kernel": jnp.ones((4, 64, 32))},
    }
    placed = jax.device_put(
        params,
        jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda x: isinstance(x, P)),
    )
    _, ref = lj.init_lora(jax.random.key(3), params, CONFIG)
    base, delta = lj.init_lora_sharded(jax.random.key(3), placed, CONFIG, SPECS, mesh=mesh)
    assert_same_arrays(base, placed)
    for r, d in zip(jax.tree.leaves(ref), jax.tree.leaves(delta)):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(d))
    got = {
        p: (tuple(f.a.sharding.spec), tuple(f.b.sharding.spec))
        for p, f in lj.advanced.leaves_with_paths(delta, is_leaf=lj.advanced.is_factors)[0]
        if f is not None
    }
    assert got == WANT
    # Without base_shardings they are read off the placed arrays.
    _check_want(lj.delta_shardings(placed, delta))


def test_value_reading_inits_sharded():
    """PiSSA (rewrites the base) and DoRA (magnitudes) read the kernels where they lie."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), AXES)
    rng = np.random.default_rng(0)
    params = {
        "up": {
            "kernel": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
            "bias": jnp.zeros(24),
        }
    }
    sh = {
        "up": {
            "kernel": NamedSharding(mesh, P("fsdp", "tensor")),
            "bias": NamedSharding(mesh, P("tensor")),
        }
    }
    cfg = lj.LoraConfig(targets=".*kernel", rank=2, init="pissa", use_dora=True)
    ref_base, ref_delta = lj.init_lora(jax.random.key(0), params, cfg)
    base, delta = lj.init_lora_sharded(jax.random.key(0), jax.device_put(params, sh), cfg, sh)
    _close(base, ref_base, tol=1e-5)
    _close(delta, ref_delta, tol=1e-5)
    assert base["up"]["kernel"].sharding.spec == P("fsdp", "tensor")  # the residual
    f = delta["up"]["kernel"]
    assert (f.a.sharding.spec, f.b.sharding.spec, f.magnitude.sharding.spec) == (
        P("fsdp", None),
        P(None, "tensor"),
        P("tensor"),
    )
    # DoRA alone traces: one jit reads the sharded kernel, the magnitude follows fan-out.
    dora = lj.LoraConfig(targets=".*kernel", rank=2, use_dora=True)
    placed = jax.device_put(params, sh)
    base, delta = lj.init_lora_sharded(jax.random.key(0), placed, dora, sh)
    assert_same_arrays(base, placed)
    _close(delta, lj.init_lora(jax.random.key(0), params, dora)[1], tol=1e-6)
    assert delta["up"]["kernel"].magnitude.sharding.spec == P("tensor")
    with pytest.raises(lj.LoraShardingError, match="reads the kernels' values"):
        lj.init_lora_sharded(
            jax.random.key(0), jax.tree.map(lambda x: _sds(*x.shape), params), dora, sh
        )


def test_leaves_trained_in_full_are_sharded_like_their_leaf():
    cfg = lj.LoraConfig(
        targets=".*kernel", rank=4, bias="all", layouts={"qkv/kernel": "ioo", "stack/kernel": "sio"}
    )
    sh = lj.delta_shardings(SPECS, _abstract_delta(PARAMS, cfg), MESH8)
    assert isinstance(sh["up"]["bias"], lj.LeafDelta)
    assert sh["up"]["bias"].diff.spec == P("tensor")
    _check_want(sh)


def test_opt_state_shardings_follow_the_delta():
    delta = _abstract_delta(PARAMS, CONFIG)
    dsh = lj.delta_shardings(SPECS, delta, MESH8)
    copies = {"adam": 2, "sgd+momentum": 1, "clip+adamw": 2}  # mu & nu; trace; mu & nu
    for name, opt in [
        ("adam", optax.adam(1e-3)),
        ("sgd+momentum", optax.sgd(0.1, momentum=0.9)),
        ("clip+adamw", optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
    ]:
        state = jax.eval_shape(opt.init, delta)
        sh = lj.opt_state_shardings(state, dsh)
        # A valid sharding tree for the state: its structure down to the array leaves.
        assert jax.tree.structure(sh) == jax.tree.structure(state)
        is_copy = lambda x: isinstance(x, dict) and x == dsh  # noqa: E731
        parts = jax.tree.leaves(sh, is_leaf=is_copy)
        assert sum(map(is_copy, parts)) == copies[name], name
        assert all(p.spec == P() for p in parts if not is_copy(p))  # counts: replicated


# -----------------------------------------------------------------------------
# Bad input: clear LoraShardingErrors naming the leaf
# -----------------------------------------------------------------------------


def test_error_when_the_mesh_axes_do_not_divide_the_kernel():
    params = {"w": {"kernel": _sds(6, 16)}}
    delta = _abstract_delta(params, lj.LoraConfig(targets=".*kernel", rank=2))
    with pytest.raises(lj.LoraShardingError, match=r"'w/kernel'.*size 6.*\('data', 'fsdp'\)"):
        lj.delta_shardings({"w": {"kernel": P(("data", "fsdp"), "tensor")}}, delta, MESH8)
    # init_lora_sharded checks before any program is built or run.
    with pytest.raises(lj.LoraShardingError, match="'w/kernel'.*do not divide"):
        lj.init_lora_sharded(
            jax.random.key(0),
            params,
            lj.LoraConfig(targets=".*kernel", rank=2),
            {"w": {"kernel": P(("data", "fsdp"))}},
            mesh=MESH8,
        )
    # param_shardings checks shapes where it knows them (linen boxes).
    with pytest.raises(lj.LoraShardingError, match="'params/up/kernel'.*do not divide"):
        lj.param_shardings(
            _logical_variables(),
            AbstractMesh((3, 1, 1), AXES),
            rules=(("embed", "data"), ("mlp", None)),
        )


def test_error_for_a_mesh_axis_that_does_not_exist():
    delta = _abstract_delta(PARAMS, CONFIG)
    specs = dict(SPECS, qkv={"kernel": P("model", None, None)})
    with pytest.raises(lj.LoraShardingError, match=r"'qkv/kernel'.*'model'.*not an axis.*data"):
        lj.delta_shardings(specs, delta, MESH8)


def test_error_for_a_logical_axis_without_a_rule():
    variables = _logical_variables()
    delta = _abstract_delta(nn.unbox(variables), lj.LoraConfig(targets=".*kernel", rank=4))
    with pytest.raises(lj.LoraShardingError, match=r"'params/up/kernel'.*'mlp'.*no rule"):
        lj.delta_shardings(variables, delta, MESH8, rules=(("embed", "fsdp"),))
    with pytest.raises(lj.LoraShardingError, match=r"'params/up/kernel'.*'mlp'.*no rule"):
        lj.param_shardings(variables, MESH8, rules=(("embed", "fsdp"),))
    with pytest.raises(lj.LoraShardingError, match=r"'params/up/kernel'.*no logical axis rules"):
        lj.delta_shardings(variables, delta, MESH8)


def test_some_layers_of_a_stack():
    """Factors of only some stacked layers: shardings still fit, or the error names the factor."""
    cfg = dataclasses.replace(CONFIG, layers=(1, 3))
    delta = _abstract_delta(PARAMS, cfg)
    assert delta["stack"]["kernel"].a.shape == (2, 64, 4)
    sh = lj.delta_shardings(
        dict(SPECS, stack={"kernel": P("data", "fsdp", "tensor")}), delta, MESH8
    )
    assert _specs(sh["stack"]["kernel"]) == (("data", "fsdp", None), ("data", None, "tensor"))
    delta = _abstract_delta(PARAMS, dataclasses.replace(CONFIG, layers=(1,)))
    with pytest.raises(lj.LoraShardingError, match="'stack/kernel'.*factor 'a'.*size 1"):
        lj.delta_shardings(dict(SPECS, stack={"kernel": P("data", "fsdp", "tensor")}), delta, MESH8)


def test_other_errors_name_the_leaf():
    delta = _abstract_delta(PARAMS, CONFIG)
    cases = [
        (dict(SPECS, up={"kernel": P("fsdp", "fsdp")}), MESH8, "'up/kernel'.*'fsdp' twice"),
        (dict(SPECS, up={"kernel": P("fsdp", "tensor", None)}), MESH8, "'up/kernel'.*3 entries"),
        ({"up": SPECS["up"], "stack": SPECS["stack"]}, MESH8, "'qkv/kernel'.*no entry"),
        (SPECS, None, "'qkv/kernel'.*needs a mesh"),
    ]
    for specs, mesh, message in cases:
        with pytest.raises(lj.LoraShardingError, match=message):
            lj.delta_shardings(specs, delta, mesh)
    assert issubclass(lj.LoraShardingError, lj.LoraError)
    assert issubclass(lj.LoraShardingError, ValueError)


# -----------------------------------------------------------------------------
# Scan-stacked + remat vs unrolled, on one device
# -----------------------------------------------------------------------------

LAYERS = 2


def _fill(abstract, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
        std = 1.0 if name == "embedding" else leaf.shape[-2] ** -0.5
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def _unstack(tree, i, is_leaf=None):
    """Layer ``i`` of a scanned tree's ``layers`` subtree, as ``layers_i`` of an unrolled one."""

    def one(x):
        if lj.advanced.is_factors(x):
            return dataclasses.replace(
                x, a=x.a[i], b=x.b[i], layout=lj.KernelLayout("io", x.layout.kind)
            )
        return None if x is None else x[i]

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None or lj.advanced.is_factors(x))


def _unrolled_twin(scanned):
    p = dict(scanned["params"])
    layers = p.pop("layers")
    return {"params": {**p, **{f"layers_{i}": _unstack(layers, i) for i in range(LAYERS)}}}


@functools.cache
def _setup(remat=True):
    cfg = ex.Config(num_layers=LAYERS, scan=True, remat=remat)
    base = _fill(ex.abstract_variables(cfg))
    # Both factors non-zero, as after some training, so every gradient is non-trivial (and
    # drawn from NumPy: compiling init programs would dominate this test's time).
    leaves, treedef = jax.tree.flatten(_abstract_delta(base, ex.lora_config(cfg)))
    rng = np.random.default_rng(2)
    delta = jax.tree.unflatten(
        treedef, [jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    )
    return cfg, base, delta


def _train(cfg, base, delta, steps=3):
    opt = optax.sgd(0.5, momentum=0.9)
    step = ex.make_train_step(ex.Transformer(cfg), opt)
    delta = jax.tree.map(jnp.copy, delta)  # the step donates its state; keep the caller's
    state, losses = (delta, opt.init(delta)), []
    for i in range(steps):
        state, loss = step(state, base, ex.local_batch(cfg, i, 8))
        losses.append(float(loss))
    return losses, state[0]


def assert_same_arrays(base, params):
    """The base holds the params' own leaves (no copy), in new containers (see init_lora)."""
    assert base is not params
    assert jax.tree.structure(base) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)))


def _close(a, b, tol=2e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= tol * (np.max(np.abs(y)) + 1e-12)


def test_scan_stacked_remat_trains_like_its_unrolled_twin():
    cfg, base, delta = _setup(remat=True)
    assert base["params"]["layers"]["q"]["kernel"].shape == (LAYERS, 64, 64)
    assert delta["params"]["layers"]["q"]["kernel"].a.shape == (LAYERS, 64, 4)
    flat_cfg = dataclasses.replace(cfg, scan=False, remat=False)
    flat_base, flat_delta = _unrolled_twin(base), _unrolled_twin(delta)
    # The twin has exactly the unrolled model's params tree and the delta init_lora gives it.
    want = ex.abstract_variables(flat_cfg)
    assert jax.tree.structure(flat_base) == jax.tree.structure(nn.unbox(want))
    fresh = _abstract_delta(flat_base, ex.lora_config(flat_cfg))
    assert jax.tree.structure(flat_delta) == jax.tree.structure(fresh)

    losses, trained = _train(cfg, base, delta)
    flat_losses, flat_trained = _train(flat_cfg, flat_base, flat_delta)
    np.testing.assert_allclose(losses, flat_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    _close(
        _unrolled_twin({"params": {"layers": trained["params"]["layers"]}}),
        {"params": {k: v for k, v in flat_trained["params"].items() if k.startswith("layers_")}},
    )


def test_remat_on_and_off_give_the_same_gradients():
    cfg, base, delta = _setup(remat=True)
    inputs, targets = ex.local_batch(cfg, 0, 8)
    grads = {}
    for scan, remat in [(True, True), (True, False), (False, True)]:
        c = dataclasses.replace(cfg, scan=scan, remat=remat)
        b, d = (base, delta) if scan else (_unrolled_twin(base), _unrolled_twin(delta))
        loss = lambda d_, b_=b, c_=c: ex.loss_fn(d_, b_, ex.Transformer(c_), inputs, targets)  # noqa: E731
        if remat:  # the remat survives the implicit interpreter (a remat in the grad's jaxpr)
            assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(d))
        g = jax.jit(jax.grad(loss))(d)["params"]
        # Unrolled per-layer gradients, restacked along the layer axis.
        grads[scan, remat] = jax.tree.leaves(
            g["layers"]
            if scan
            else jax.tree.map(lambda *xs: jnp.stack(xs), *[g[f"layers_{i}"] for i in range(LAYERS)])
        )
    ref = grads[True, False]
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in ref)
    _close(grads[True, True], ref)  # scanned: remat on vs off
    _close(grads[False, True], ref)  # unrolled with remat vs scanned without


# -----------------------------------------------------------------------------
# Multi-device checks (8 simulated CPU devices, one subprocess)
# -----------------------------------------------------------------------------

MESHES = ["8,1,1", "2,2,2", "1,1,8"]


@pytest.fixture(scope="module")
def worker():
    return run_on_eight_devices(ROOT / "tests" / "core" / "sharding_worker.py")


def test_worker_has_eight_devices(worker):
    assert worker["device_count"] == 8
    assert set(worker["meshes"]) == set(MESHES)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_matches_one_device(worker, mesh):
    r = worker["meshes"][mesh]
    assert r["init_max_abs"] == 0.0, "init_lora_sharded drew other values than init_lora"
    assert len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0]
    assert r["loss_max_rel"] < 1e-5, (r["losses"], r["ref_losses"])
    assert r["delta_moved"] > 1e-2  # training changed the delta much more than the tolerance
    assert r["delta_max_abs"] < 1e-5
    assert r["merged_max_abs"] < 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_delta_and_base_shardings(worker, mesh):
    r = worker["meshes"][mesh]
    assert r["spec_mismatches"] == []  # after init_lora_sharded
    assert r["spec_mismatches_after"] == []  # after the train steps
    assert r["trace_mismatches"] == []  # momentum sharded like the delta
    assert r["base_sharded_as_given"]
    assert r["merged_sharded_like_base"]


@pytest.mark.parametrize("mesh", MESHES)
def test_no_kernel_gather_and_no_kernel_sized_gradient(worker, mesh):
    r = worker["meshes"][mesh]
    assert r["step"]["full_gathers"] == []
    assert r["step"]["kernel_sized"] == []
    # The delta is drawn shard by shard: its init program has no collective at all.
    assert r["init"]["collectives"] == []
    # Merging adds each device's shard of s*A@B to its shard of W: nothing is gathered or
    # reduced. (JAX 0.6's XLA still reshards the broadcast scalar `s` with an all-to-all.)
    assert r["merge"]["full_gathers"] == []
    assert [c for c in r["merge"]["collectives"] if "all-to-all" not in c] == []


def test_hlo_check_flags_dense_kernel_gradients(worker):
    """Negative control: the same check on a merge-on-the-fly step finds the dense dW."""
    control = worker["meshes"]["2,2,2"]["control"]
    assert len(control["kernel_sized"]) >= 6  # one dW per targeted kernel at least
    assert any(" dot(" in line for line in control["kernel_sized"])


def test_sharded_example_runs_scanned_and_rematerialised(worker):
    r = worker["example_scan"]
    assert r["losses"][-1] < r["losses"][0]
    assert r["shardings_kept"] and r["merged_sharded"]
    assert r["merged_diff"] < 1e-4
    assert r["step"]["full_gathers"] == [] and r["step"]["kernel_sized"] == []
    # Stacked kernels: the layer axis keeps its (unsharded) spec on both factors.
    assert r["stacked_specs"]["params/layers/q/kernel"] == [
        str(P(None, "fsdp", None)),
        str(P(None, None, "tensor")),
    ]
    assert r["saved"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert r["restored"]  # loaded back onto the mesh: equal values, the delta's shardings
    assert "merged params keep the base's shardings: True" in r["stdout"]
