"""One process of a multi-process job, for tests/multiprocess/test_multiprocess.py.

``python tests/multiprocess/mp_worker.py MODE OUTDIR -- EXAMPLE_FLAGS...``, started
by the test (each process with its own ``--process-id``; CPU device count from
``XLA_FLAGS``). Every mode first runs ``examples/sharded_finetune.py``'s ``main``
with the example flags (``jax.distributed`` joined there), so the example's own
code is what is checked; then:

* ``job`` (2 processes x 2 devices): draws the delta again with
  ``init_lora_sharded``; restores the example's orbax checkpoint back into the
  same topology; trains QLoRA over a base quantized and sharded across the
  processes and checkpoints it with orbax (state and quantized base); serves a
  stack of adapters per example (``adapter_ids``); reads the compiled train
  step's HLO. Arrays are gathered and written by process 0 as ``.npz``.
* ``reference`` (1 process x 4 devices): the same training, ``init_lora`` on
  one device, the job's checkpoints restored into 1 x 4 and 1 x 1, the job's
  adapter loaded on 1 x 4 and one device, QLoRA on 1 x 4 and restored from the
  job's QLoRA checkpoint, the adapter stack served on one device.
* ``example``: only the example (``KILL_AT_STEP=k`` in the environment of one
  process makes it SIGKILL itself just before step ``k``'s batch is built).

The test compares the files; the JSON ``OUTDIR/<mode>.json`` holds scalars.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import examples.sharded_finetune as ex  # noqa: E402
import lora_jax as lj  # noqa: E402

QLORA_STEPS = 2
IDS = np.array([0, 1, 2, -1, 2, 1, 0, -1], np.int32)  # the adapter of each example


def _hlo_checks():
    """``kernel_shapes`` and ``hlo_findings``: the HLO check of tests/core/test_sharding.py."""
    spec = importlib.util.spec_from_file_location(
        "sharding_worker", ROOT / "tests" / "core" / "sharding_worker.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel_shapes, module.hlo_findings


def host(tree):
    """Every leaf as a NumPy array on every process (gathered across processes)."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def write(out: Path, name: str, tree) -> None:
    arrays = flat(host(tree))
    if jax.process_index() == 0:
        np.savez(out / f"{name}.npz", **arrays)


def abstract_state(cfg, mesh, optimizer, quantized=False):
    """The train state's ShapeDtypeStructs with their shardings on ``mesh`` (for restoring),
    and the base's shardings."""
    base_sh = lj.param_shardings(ex.abstract_variables(cfg), mesh, rules=ex.RULES)
    base = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.eval_shape(lambda: ex.init_base(cfg, jax.random.key(0))),
    )
    if quantized:
        base = jax.eval_shape(quantize, base)
    delta = jax.eval_shape(
        lambda k: lj.init_lora(k, base, ex.lora_config(cfg))[1], jax.random.key(0)
    )
    delta_sh = lj.delta_shardings(base_sh, delta)
    opt = jax.eval_shape(optimizer.init, delta)
    opt_sh = lj.opt_state_shardings(opt, delta_sh)
    state = {
        "delta": delta,
        "opt_state": opt,
        "step": jax.ShapeDtypeStruct((), np.int32),
        "rng": jax.ShapeDtypeStruct((2,), np.uint32),
    }
    sh = ex.state_shardings(delta_sh, opt_sh, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sh
    )
    return abstract, base_sh


def restore(directory: Path, abstract):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory.resolve(), abstract)


def latest(directory: Path) -> Path:
    return (
        directory
        / str(max(int(p.name) for p in directory.iterdir() if p.name.isdigit()))
        / "default"
    )


def quantize(base):
    # 32-weight blocks: each shard of a kernel's last axis (32 or 96 wide) holds whole blocks.
    return lj.quantize(base, ex.TARGETS, block_size=32)


def qlora(r, out: Path, name: str) -> dict:
    """QLoRA over a base quantized inside ``jit`` straight into its shardings (each process
    quantizes only its shards); ``QLORA_STEPS`` steps of the example's state step."""
    s, mesh, cfg = r["setup"], r["mesh"], r["config"]
    abstract_q = jax.eval_shape(quantize, r["base"])
    q_sh = lj.advanced.quantized_shardings(abstract_q, s["base_sh"])
    qbase = jax.jit(quantize, out_shardings=q_sh)(r["base"])
    key = jax.random.fold_in(jax.random.key(0), 1)
    _, delta = lj.init_lora_sharded(key, qbase, ex.lora_config(cfg), s["base_sh"])
    opt = s["optimizer"]
    delta_sh = lj.delta_shardings(s["base_sh"], delta)
    opt_sh = lj.opt_state_shardings(jax.eval_shape(opt.init, delta), delta_sh)
    state = ex.initial_state(delta, jax.jit(opt.init, out_shardings=opt_sh)(delta), mesh)
    state_sh = ex.state_shardings(delta_sh, opt_sh, mesh)
    step = ex.make_state_step(
        s["model"], opt, state_sh, q_sh, s["batch_sh"], dropout=0.1, donate=False
    )
    losses = []
    for i in range(QLORA_STEPS):
        state, loss = step(state, qbase, ex.global_batch(cfg, i, 8, s["batch_sh"]))
        losses.append(float(loss))
    write(out, f"{name}_qlora_state", state)
    codes = [x for x in jax.tree.leaves(qbase) if x.dtype == np.uint8]
    return {
        "qlora_losses": losses,
        "qlora_codes_shard_shapes": [list(c.sharding.shard_shape(c.shape)) for c in codes],
        "qlora_codes_shapes": [list(c.shape) for c in codes],
        "state": state,
        "qbase": qbase,
    }


def stack_of_adapters(delta_host):
    """Three adapters (the trained one, half of it, its negative) in 4 slots."""
    deltas = [
        delta_host,
        jax.tree.map(lambda x: 0.5 * x, delta_host),
        jax.tree.map(lambda x: -x, delta_host),
    ]
    return jax.tree.map(np.asarray, lj.stack_adapters(deltas, slots=4))


def serve_on_mesh(r, stack_host):
    """The stack's factors sharded like one delta's (slot axis unsharded), the batch and
    ``adapter_ids`` split over the processes; the per-example forward."""
    s, mesh, cfg = r["setup"], r["mesh"], r["config"]

    def place(f, sh):
        return f.replace(
            a=jax.device_put(f.a, NamedSharding(mesh, P(None, *sh.a.spec))),
            b=jax.device_put(f.b, NamedSharding(mesh, P(None, *sh.b.spec))),
            scale=jax.device_put(f.scale, NamedSharding(mesh, P())),
        )

    stack = jax.tree.map(place, stack_host, s["delta_sh"], is_leaf=lj.advanced.is_stacked)
    inputs, _ = ex.global_batch(cfg, 0, 8, s["batch_sh"])
    rows = ex.process_rows(s["batch_sh"], 8)
    ids = jax.make_array_from_process_local_data(s["batch_sh"], IDS[rows.start : rows.stop], (8,))
    serve = jax.jit(lj.implicit(s["model"].apply, strict=True))
    return serve(r["base"], stack, inputs, adapter_ids=ids)


def job(r, out: Path) -> dict:
    cfg, s, mesh = r["config"], r["setup"], r["mesh"]
    res: dict = {}
    key = jax.random.fold_in(jax.random.key(0), 1)
    _, init = lj.init_lora_sharded(key, r["base"], ex.lora_config(cfg), s["base_sh"])
    write(out, "job_init", init)
    write(out, "job_state", r["state"])
    write(out, "job_merged", r["merged"])
    # The example's checkpoint, restored back into 2 x 2 in this job.
    abstract, _ = abstract_state(cfg, mesh, s["optimizer"])
    write(out, "job_restored_2x2", restore(latest(out / "ckpt"), abstract))
    t = time.perf_counter()
    q = qlora(r, out, "job")
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / "qlora_ckpt").resolve(), {"state": q.pop("state"), "base": q.pop("qbase")})
    res.update(q, qlora_seconds=time.perf_counter() - t)
    stack = stack_of_adapters(host(r["delta"]))
    write(out, "job_served", serve_on_mesh(r, stack))
    kernel_shapes, hlo_findings = _hlo_checks()
    full, like = kernel_shapes(r["base"], r["delta"])
    res["hlo"] = hlo_findings((out / "step.hlo").read_text(), full, like)
    res["hlo_kernel_shapes"] = sorted(full)
    return res


def reference(r, out: Path, job_dir: Path) -> dict:
    cfg, s, mesh = r["config"], r["setup"], r["mesh"]
    res: dict = {}
    base_host = host(r["base"])
    key = jax.random.fold_in(jax.random.key(0), 1)
    _, init = jax.jit(lambda k, b: lj.init_lora(k, b, ex.lora_config(cfg)))(key, base_host)
    write(out, "ref_init", init)  # init_lora on one device
    write(out, "ref_state", r["state"])
    write(out, "ref_merged", r["merged"])
    # The job's checkpoint (written by 2 processes) restored into 1 x 4 and 1 x 1.
    mesh1 = ex.make_mesh((1, 1, 1))
    for name, m in (("1x4", mesh), ("1x1", mesh1)):
        abstract, _ = abstract_state(cfg, m, s["optimizer"])
        restored = restore(latest(job_dir / "ckpt"), abstract)
        res[f"restored_{name}_devices"] = sorted(
            {d.id for x in jax.tree.leaves(restored) for d in x.sharding.device_set}
        )
        write(out, f"ref_restored_{name}", restored)
        qabstract, qbase_sh = abstract_state(cfg, m, s["optimizer"], quantized=True)
        qbase_abs = jax.eval_shape(quantize, jax.eval_shape(lambda: ex.init_base(cfg, key)))
        q_sh = lj.advanced.quantized_shardings(qbase_abs, qbase_sh)
        qbase_abs = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), qbase_abs, q_sh
        )
        qrestored = restore(job_dir / "qlora_ckpt", {"state": qabstract, "base": qbase_abs})
        write(out, f"ref_qlora_restored_{name}", qrestored["state"])
        write(out, f"ref_qbase_restored_{name}", qrestored["base"])
    # The job's adapter (gathered, written by process 0 with lj.save) on 1 x 4 and 1 device.
    loaded, _ = lj.load(job_dir / "adapter", base=base_host)
    write(out, "ref_adapter_1x4", jax.device_put(loaded, s["delta_sh"]))
    write(out, "ref_adapter_1", jax.device_put(loaded, jax.devices()[0]))
    q = qlora(r, out, "ref")
    write(out, "ref_qbase", q.pop("qbase"))
    q.pop("state")
    res.update(q)
    # The stack of adapters served on one device, no mesh: the single-process answer.
    job_delta = dict(np.load(job_dir / "job_state.npz"))
    delta_host = jax.tree_util.tree_unflatten(
        jax.tree.structure(r["delta"]),
        [job_delta[k] for k in flat(jax.tree.map(lambda x: 0, {"delta": r["delta"]}))],
    )
    stack = stack_of_adapters(delta_host)
    inputs, _ = ex.local_batch(cfg, 0, 8)
    one = jax.jit(lj.implicit(ex.Transformer(cfg).apply, strict=True))
    write(out, "ref_served_1", one(base_host, stack, inputs, adapter_ids=IDS))
    write(out, "ref_served_1x4", serve_on_mesh(r, stack))
    return res


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    flags = sys.argv[sys.argv.index("--") + 1 :]
    kill_at = os.environ.get("KILL_AT_STEP")
    if kill_at is not None:
        make_batch = ex.global_batch

        def global_batch(cfg, step, *a, **k):
            if step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return make_batch(cfg, step, *a, **k)

        ex.global_batch = global_batch
    t0 = time.perf_counter()
    r = ex.main(flags)
    res = {"example_seconds": time.perf_counter() - t0, "losses": r["losses"]}
    res["processes"] = jax.process_count()
    res["devices"] = jax.device_count()
    res["local_devices"] = jax.local_device_count()
    res["restored_adapter_ok"] = r["restored"]
    res["merged_diff"] = r["merged_diff"]
    res["start_step"] = r["start_step"]
    if mode == "job":
        res.update(job(r, out))
    elif mode == "reference":
        res.update(reference(r, out, Path(os.environ["MP_JOB_DIR"])))
    res["seconds"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        (out / f"{mode}.json").write_text(json.dumps(res))
    multihost_utils.sync_global_devices("done") if jax.process_count() > 1 else None


if __name__ == "__main__":
    main()
