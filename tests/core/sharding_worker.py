"""Multi-device checks for tests/core/test_sharding.py, run as a subprocess on 8 CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
starts, which the pytest process (one device) cannot do, so the test runs this
script and asserts on the JSON object it prints as its last line. Everything
uses ``examples/sharded_finetune.py``'s model, mesh, setup and train step, so
the example's code is what is checked:

* for meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,1,8): training
  sharded gives the single-device losses, delta and merged params; the base
  and delta shardings are the derived ones; the compiled train step, delta
  init and merge hold no all-gather of a whole kernel and no kernel-sized
  gradient (read off the compiled HLO), and the init has no collective at all;
* a negative control: the same HLO check on a merge-on-the-fly step, which
  does compute dense kernel gradients, must flag them;
* the example's ``main`` runs with ``--scan --remat`` on (2,2,2) (stacked
  kernels sharded, adapter saved).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax._sharding import sharded_init_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8)]
STEPS = 3
BATCH = 8


def load_example():
    spec = importlib.util.spec_from_file_location(
        "sharded_finetune", ROOT / "examples" / "sharded_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = load_example()


# -----------------------------------------------------------------------------
# HLO inspection
# -----------------------------------------------------------------------------

INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
SHAPE = re.compile(r"(?:f64|f32|bf16|f16)\[([\d,]*)\]")
GATHERS = (
    "all-gather",
    "all-gather-start",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
)
KERNEL_MAKERS = (
    "dot",
    "convolution",
    "reduce",
    "all-reduce",
    "all-reduce-start",
    "reduce-scatter",
    "custom-call",
)
COLLECTIVES = GATHERS + ("all-reduce", "all-reduce-start", "reduce-scatter")


def kernel_shapes(base, delta):
    """(full kernel shapes, every kernel-like shape: full, local shard and partial gathers),
    each shape as its sorted dims, so any transposed layout matches too. A stacked
    kernel also counts without its layer axis (one layer's kernel inside a scan)."""
    full, like = set(), set()
    for _, w, f in lj.advanced.align(base, delta)[0]:
        if f is None:
            continue
        stacked = f.layout.stack_axes
        per_layer = tuple(n for d, n in enumerate(w.shape) if d not in stacked)
        full.update({tuple(sorted(w.shape)), tuple(sorted(per_layer))})
        mesh_sizes = dict(w.sharding.mesh.shape)
        spec = list(w.sharding.spec) + [None] * (w.ndim - len(w.sharding.spec))
        options = []
        for d, (n, entry) in enumerate(zip(w.shape, spec)):
            axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
            ways = int(np.prod([mesh_sizes[a] for a in axes]))
            sizes = {n // k for k in range(1, ways + 1) if ways % k == 0}
            options.append(sizes | {None} if d in stacked else sizes)
        like.update(
            tuple(sorted(n for n in c if n is not None)) for c in itertools.product(*options)
        )
    return full, like


def hlo_findings(hlo: str, full: set, like: set) -> dict:
    """Instructions that gather a whole kernel, or produce a kernel-like tensor by a
    contraction, reduction or cross-device reduction (a weight gradient or a merge)."""
    gathers, makers, collectives = [], [], []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m:
            continue
        shapes, op = m.group(1), m.group(2)
        dims = {tuple(sorted(int(d) for d in s.split(",") if d)) for s in SHAPE.findall(shapes)}
        if op in COLLECTIVES:
            collectives.append(line.strip()[:160])
        if op in GATHERS and dims & full:
            gathers.append(line.strip()[:200])
        if op in KERNEL_MAKERS and dims & like:
            makers.append(line.strip()[:200])
    return {"full_gathers": gathers, "kernel_sized": makers, "collectives": collectives}


# -----------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def max_abs(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), (len(la), len(lb))
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(la, lb)
    )


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def expected_specs(path: str):
    """Hand-written expectations from RULES: (base spec, A spec, B spec)."""
    module = path.split("/")[-2]
    if module in ("q", "k", "v", "up"):  # ("embed", "heads"|"mlp") -> (fsdp, tensor)
        return P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor")
    return P("tensor", "fsdp"), P("tensor", None), P(None, "fsdp")  # o, down


def spec_mismatches(base, delta, shape) -> list[str]:
    bad = []
    for path, w, f in lj.advanced.align(base, delta)[0]:
        if f is None:
            continue
        want_w, want_a, want_b = expected_specs(path)
        for name, arr, want in (("base", w, want_w), ("A", f.a, want_a), ("B", f.b, want_b)):
            got = arr.sharding
            if not (got.spec == want and got.mesh.shape == dict(zip(ex.MESH_AXES, shape))):
                bad.append(f"{path} {name}: {got.spec} on {dict(got.mesh.shape)}, want {want}")
    return bad


def host_params(cfg, seed: int = 0):
    """Base params filled from NumPy (threefry init programs compile slowly on CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
        std = 1.0 if name == "embedding" else leaf.shape[-2] ** -0.5
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    abstract = jax.tree.map(
        lambda x: x.value if hasattr(x, "names") else x,
        ex.abstract_variables(cfg),
        is_leaf=lambda x: hasattr(x, "names"),
    )
    return jax.tree_util.tree_map_with_path(fill, abstract)


def optimizer():
    """SGD with momentum: linear in the gradients, so float32 rounding differences stay
    float32-sized (Adam's first steps are sign-like and amplify them on near-zero entries)."""
    return optax.sgd(0.5, momentum=0.9)


def reference(cfg, key, base_host, opt):
    """Single-device training: (initial delta, losses, final delta, merged), on host."""
    base = jax.tree.map(jax.numpy.asarray, base_host)
    _, delta = lj.init_lora(jax.random.fold_in(key, 1), base, ex.lora_config(cfg))
    init_delta = host(delta)
    step = ex.make_train_step(ex.Transformer(cfg), opt)
    state, losses = (delta, opt.init(delta)), []
    for i in range(STEPS):
        state, loss = step(state, base, ex.local_batch(cfg, i, BATCH))
        losses.append(float(loss))
    merged = jax.jit(lj.merge)(base, state[0])
    return init_delta, losses, host(state[0]), host(merged)


def merge_on_the_fly_step(model, optimizer, state_sh, base_sh, batch_sh):
    """The negative control: gradients through merge(base, delta) (dense dW)."""

    def loss_fn(delta, base, inputs, targets):
        logits = model.apply(lj.merge(base, delta), inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(state, base, batch):
        delta, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(delta, base, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, delta)
        return (optax.apply_updates(delta, updates), opt_state), loss

    return jax.jit(step, in_shardings=(state_sh, base_sh, (batch_sh, batch_sh)))


# -----------------------------------------------------------------------------
# The checks
# -----------------------------------------------------------------------------


def check_mesh(shape, cfg, key, base_host, ref) -> dict:
    ref_init, ref_losses, ref_delta, ref_merged = ref
    mesh = ex.make_mesh(shape)
    # ex.setup's steps, with every program compiled once ahead of time so its HLO is read.
    base_sh = lj.param_shardings(ex.abstract_variables(cfg), mesh, rules=ex.RULES)
    base = jax.device_put(base_host, base_sh)
    init, args = sharded_init_fn(jax.random.fold_in(key, 1), base, ex.lora_config(cfg), base_sh)
    assert len(args) == 1  # a random init reads no param values: only the key goes in
    init = init.lower(*args).compile()
    _, delta = init(*args)
    delta_sh = lj.delta_shardings(base_sh, delta)
    full, like = kernel_shapes(base, delta)
    out = {
        "init": hlo_findings(init.as_text(), full, like),
        "init_max_abs": max_abs(host(delta), ref_init),
        "spec_mismatches": spec_mismatches(base, delta, shape),
    }

    opt = optimizer()
    opt_sh = lj.opt_state_shardings(jax.eval_shape(opt.init, delta), delta_sh)
    opt_state = jax.jit(opt.init, out_shardings=opt_sh)(delta)
    batch_sh = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    model = ex.Transformer(cfg, batch_sh)
    state = (delta, opt_state)
    batches = [ex.global_batch(cfg, i, BATCH, batch_sh) for i in range(STEPS)]
    step = ex.make_train_step(model, opt, (delta_sh, opt_sh), base_sh, batch_sh)
    step = step.lower(state, base, batches[0]).compile()
    out["step"] = hlo_findings(step.as_text(), full, like)
    losses = []
    for batch in batches:
        state, loss = step(state, base, batch)
        losses.append(float(loss))
    delta = state[0]
    out.update(
        losses=losses,
        ref_losses=ref_losses,
        loss_max_rel=max_rel(losses, ref_losses),
        delta_max_abs=max_abs(host(delta), ref_delta),
        delta_moved=max_abs(ref_delta, ref_init),
        spec_mismatches_after=spec_mismatches(base, delta, shape),
        trace_mismatches=[
            m for m in spec_mismatches(base, state[1][0].trace, shape) if " base:" not in m
        ],
    )

    merge = jax.jit(lj.merge, out_shardings=base_sh).lower(base, delta).compile()
    out["merge"] = hlo_findings(merge.as_text(), full, like)
    merged = merge(base, delta)
    out["merged_max_abs"] = max_abs(host(merged), ref_merged)
    out["merged_sharded_like_base"] = all(
        jax.tree.leaves(jax.tree.map(lambda m, b: m.sharding == b, merged, base_sh))
    )
    out["base_sharded_as_given"] = all(
        jax.tree.leaves(jax.tree.map(lambda w, b: w.sharding == b, base, base_sh))
    )

    if shape == (2, 2, 2):  # negative control: a merge-on-the-fly step has dense gradients
        control = merge_on_the_fly_step(model, opt, (delta_sh, opt_sh), base_sh, batch_sh)
        hlo = control.lower(state, base, batches[0]).compile().as_text()
        out["control"] = hlo_findings(hlo, full, like)
    return out


def check_example_scan() -> dict:
    """The example's own main: Adam, params initialised sharded, scanned + remat blocks."""
    with tempfile.TemporaryDirectory() as tmp:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            result = ex.main(
                [
                    "--mesh",
                    "2,2,2",
                    "--steps",
                    str(STEPS),
                    "--scan",
                    "--remat",
                    "--batch-size",
                    str(BATCH),
                    "--out",
                    str(Path(tmp) / "adapter"),
                    "--hlo",
                    str(Path(tmp) / "step.txt"),
                ]
            )
        saved = sorted(p.name for p in (Path(tmp) / "adapter").iterdir())
        hlo = (Path(tmp) / "step.txt").read_text()
    full, like = kernel_shapes(result["base"], result["delta"])
    return {
        "losses": result["losses"],
        "merged_diff": result["merged_diff"],
        "shardings_kept": result["shardings_kept"],
        "merged_sharded": result["merged_sharded"],
        "saved": saved,
        "restored": result["restored"],
        "step": hlo_findings(hlo, full, like),
        "stacked_specs": {
            p: [str(f.a.sharding.spec), str(f.b.sharding.spec)]
            for p, _, f in lj.advanced.align(result["base"], result["delta"])[0]
            if f
        },
        "stdout": text.getvalue(),
    }


def main() -> None:
    t0 = time.perf_counter()
    result = {"device_count": jax.device_count(), "meshes": {}}
    key = jax.random.key(0)
    cfg = ex.Config(num_layers=1)
    base_host = host_params(cfg)
    ref = reference(cfg, key, base_host, optimizer())
    timings = {"reference": time.perf_counter() - t0}
    for shape in MESHES:
        t = time.perf_counter()
        result["meshes"][",".join(map(str, shape))] = check_mesh(shape, cfg, key, base_host, ref)
        timings[str(shape)] = time.perf_counter() - t
    t = time.perf_counter()
    result["example_scan"] = check_example_scan()
    timings["example_scan"] = time.perf_counter() - t
    result["timings"] = timings
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
