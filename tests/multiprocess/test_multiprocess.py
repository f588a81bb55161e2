"""Real multi-process training with ``jax.distributed``: 2 processes x 2 CPU devices on loopback.

Four jobs, each process started here and bounded in time (a process still running at its
deadline is stopped by pid and the test fails naming it):

1. ``job``: 2 processes x 2 devices run ``examples/sharded_finetune.py`` on a (data, fsdp,
   tensor) = (1, 2, 2) mesh (FSDP across the processes, tensor parallel within each) with
   LoRA dropout, orbax checkpoints and the adapter saved; then QLoRA, a served stack of
   adapters and the checks of ``mp_worker.py``'s ``job`` mode.
2. ``reference``: the same on 1 process x 4 devices, plus single-device references and the
   job's checkpoints restored into 1 x 4 and 1 x 1.
3. ``killed``: the example as 2 processes started with explicit cluster flags; process 1
   SIGKILLs itself just before step 2. Process 0 must exit on its own (JAX's coordination
   service declares process 1 dead after ``--heartbeat-timeout 5`` s without heartbeats);
   it gets ``KILL_DEADLINE`` seconds.
4. ``resumed``: the README's command (``--processes 2 --devices-per-process 2``) restarts
   from the killed job's last checkpoint.

Everything the 2-process runs compute is bit-identical to the 1 x 4 run: the same SPMD
program on the same 4-device mesh, and gloo's cross-process all-reduce adds the same
operands in the same order as the in-process one. (The per-example serving output is
compared with a single *device* too: a different partitioning, so float32 tolerance.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402

from examples.common import distributed  # noqa: E402

# orbax-checkpoint (0.12.8 in every environment) saves arrays that span processes with
# ``with jax.sharding.set_mesh(...)``, which is no context manager yet in JAX 0.6.2
# (the oldest supported), where its save fails. Cross-process collectives work there too
# (test_collectives.py), but these tests checkpoint with orbax throughout.
ORBAX_ACROSS_PROCESSES = hasattr(jax.sharding.set_mesh, "__enter__")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ORBAX_ACROSS_PROCESSES,
        reason=f"orbax-checkpoint cannot save arrays spanning processes on JAX {jax.__version__} "
        "(jax.sharding.set_mesh is no context manager there)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "multiprocess" / "mp_worker.py"
STEPS = 4
KILL_AT = 2
HEARTBEAT = 5  # seconds without heartbeats after which a process counts as dead
KILL_DEADLINE = 60  # seconds process 0 may take to exit once process 1 is dead
JOB_DEADLINE = 600  # seconds a whole job may take (2 contended cores, compiles included)
FLAGS = ["--mesh", "1,2,2", "--layers", "1", "--steps", str(STEPS), "--dropout", "0.1"]
TIMES: dict[str, float] = {}
CACHE: dict[str, str] = {}  # the jobs share a persistent compilation cache (same programs)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    CACHE["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    CACHE["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    CACHE.clear()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **CACHE}


def _outputs(out: Path, i: int):
    return open(out / f"process{i}.out", "w"), open(out / f"process{i}.err", "w")  # noqa: SIM115


def _tail(out: Path, i: int, n: int = 2500) -> str:
    err = (out / f"process{i}.err").read_text()
    err = "\n".join(line for line in err.splitlines() if not line.startswith("[Gloo]"))
    return f"--- process {i} stderr (tail) ---\n{err[-n:]}"


def run_job(out: Path, commands, devices_per_process: int, deadline: float, env=None) -> dict:
    """Starts one process per command, waits until every one exits or ``deadline`` seconds
    pass; then stops (by pid) the ones still running and fails naming them. Returns each
    process's exit status and exit time (seconds since the start)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [_outputs(out, i) for i in range(len(commands))]
    start = time.monotonic()
    procs = [
        distributed.start_local([c], devices_per_process, env=env or _env(), stdout=o, stderr=e)[0]
        for c, (o, e) in zip(commands, files)
    ]
    status: list[int | None] = [None] * len(procs)
    exited: list[float | None] = [None] * len(procs)
    try:
        while any(s is None for s in status) and time.monotonic() - start < deadline:
            for i, p in enumerate(procs):
                if status[i] is None and p.poll() is not None:
                    status[i], exited[i] = p.returncode, time.monotonic() - start
            time.sleep(0.05)
    finally:
        hung = [i for i, s in enumerate(status) if s is None]
        distributed.stop([procs[i] for i in hung])
        for o, e in files:
            o.close()
            e.close()
    if hung:
        pytest.fail(
            f"process(es) {hung} of {out.name} still running after {deadline:.0f} s (hung; "
            f"stopped by pid; exits so far: {status})\n"
            + "\n".join(_tail(out, i) for i in range(len(procs)))
        )
    return {"status": status, "exited": exited, "seconds": time.monotonic() - start}


def worker_commands(mode: str, out: Path, flags, processes: int):
    port = distributed.free_port()
    cluster = lambda i: (  # noqa: E731
        ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
        + ["--process-id", str(i)]
        if processes > 1
        else []
    )
    return [
        [sys.executable, str(WORKER), mode, str(out), "--", *flags, *cluster(i)]
        for i in range(processes)
    ]


def example_flags(out: Path) -> list[str]:
    return (
        FLAGS
        + ["--ckpt", str(out / "ckpt"), "--out", str(out / "adapter")]
        + [
            "--log",
            str(out / "log.txt"),
        ]
    )


def check_ok(run: dict, out: Path, name: str) -> None:
    bad = [i for i, s in enumerate(run["status"]) if s != 0]
    assert not bad, f"{name}: process(es) {bad} failed: {run['status']}\n" + "\n".join(
        _tail(out, i) for i in bad
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("job")
    flags = example_flags(out) + ["--hlo", str(out / "step.hlo")]
    run = run_job(out, worker_commands("job", out, flags, 2), 2, JOB_DEADLINE)
    check_ok(run, out, "job")
    TIMES["job: 2 processes x 2 devices"] = run["seconds"]
    return out


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run = run_job(
        out,
        worker_commands("reference", out, example_flags(out), 1),
        4,
        JOB_DEADLINE,
        env={**_env(), "MP_JOB_DIR": str(job)},
    )
    check_ok(run, out, "reference")
    TIMES["reference: 1 process x 4 devices"] = run["seconds"]
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """The example as 2 processes; process 1 SIGKILLs itself before step KILL_AT; then the
    README command resumes the run from the last checkpoint."""
    out = tmp_path_factory.mktemp("killed")
    flags = example_flags(out) + ["--heartbeat-timeout", str(HEARTBEAT)]
    commands = worker_commands("example", out, flags, 2)
    env = _env()
    envs = [env, {**env, "KILL_AT_STEP": str(KILL_AT)}]
    files = [_outputs(out, i) for i in range(2)]
    start = time.monotonic()
    procs = [
        distributed.start_local([c], 2, env=e, stdout=o, stderr=err)[0]
        for c, e, (o, err) in zip(commands, envs, files)
    ]
    exited: list[float | None] = [None, None]
    try:
        while procs[1].poll() is None and time.monotonic() - start < JOB_DEADLINE:
            time.sleep(0.05)
        exited[1] = time.monotonic() if procs[1].poll() is not None else None
        if exited[1] is not None:
            try:
                procs[0].wait(KILL_DEADLINE)
                exited[0] = time.monotonic()
            except subprocess.TimeoutExpired:
                pass
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        distributed.stop([procs[i] for i in hung])
        for o, e in files:
            o.close()
            e.close()
    if hung:
        pytest.fail(
            f"process(es) {hung} still running (process 1 exited: {exited[1] is not None}; "
            f"process 0 gets {KILL_DEADLINE} s after process 1 dies, heartbeat timeout "
            f"{HEARTBEAT} s): stopped by pid\n" + "\n".join(_tail(out, i) for i in range(2))
        )
    killed = {
        "status": [p.returncode for p in procs],
        "survivor_seconds": exited[0] - exited[1],
        "killed_run_seconds": exited[1] - start,
        "latest_step": max(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit()),
        "logged": (out / "log.txt").read_text(),
    }
    TIMES["killed: until process 1 died"] = killed["killed_run_seconds"]
    TIMES["killed: process 0 exit after process 1 died"] = killed["survivor_seconds"]
    # The README's command, unchanged but for the paths: resumes from the checkpoint.
    cmd = [sys.executable, "-m", "examples.sharded_finetune", "--processes", "2"]
    cmd += ["--devices-per-process", "2", *example_flags(out)]
    t = time.monotonic()
    try:
        resumed = subprocess.run(
            cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=JOB_DEADLINE
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the launcher; it stops its children
        pytest.fail(f"the resumed job (the README command) ran past {JOB_DEADLINE} s")
    TIMES["resumed: README command, 2 processes"] = time.monotonic() - t
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    killed["resumed_stdout"] = resumed.stdout
    killed["dir"] = out
    return killed


# -----------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------


def load(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k[len(prefix) :]: f[k] for k in f.files if k.startswith(prefix)}


def bit_identical(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys(), (sorted(a)[:4], sorted(b)[:4])
    assert a, "nothing compared"
    return all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def adapter_arrays(directory: Path) -> dict[str, np.ndarray]:
    import jax

    import lora_jax as lj

    delta, _ = lj.load(directory)
    leaves = jax.tree_util.tree_flatten_with_path(delta)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def info(out: Path, mode: str) -> dict:
    return json.loads((out / f"{mode}.json").read_text())


def read_log(path: Path) -> dict[int, str]:
    """``{step: loss hex}``; a resumed run rewrites the steps after its checkpoint."""
    return {int(s): h for s, h in (line.split() for line in path.read_text().splitlines())}


# -----------------------------------------------------------------------------
# Tests
# -----------------------------------------------------------------------------


def test_the_job_spans_two_processes(job, reference):
    j, r = info(job, "job"), info(reference, "reference")
    assert (j["processes"], j["devices"], j["local_devices"]) == (2, 4, 2)
    assert (r["processes"], r["devices"], r["local_devices"]) == (1, 4, 4)


def test_two_processes_train_bit_identically_to_one_process(job, reference):
    j, r = info(job, "job"), info(reference, "reference")
    assert len(j["losses"]) == STEPS and j["losses"][-1] < j["losses"][0]
    assert j["losses"] == r["losses"]  # floats from JSON: exact
    assert read_log(job / "log.txt") == read_log(reference / "log.txt")
    job_state, ref_state = load(job / "job_state.npz"), load(reference / "ref_state.npz")
    assert bit_identical(job_state, ref_state)  # delta, Adam state, step, rng
    init = load(job / "job_init.npz")
    moved = max(
        float(np.abs(job_state["['delta']" + k] - init[k]).max()) for k in init if k.endswith(".b")
    )
    assert moved > 1e-3  # training changed the delta
    assert bit_identical(load(job / "job_merged.npz"), load(reference / "ref_merged.npz"))
    assert j["merged_diff"] < 1e-4 and j["restored_adapter_ok"]


def test_init_lora_sharded_across_processes_equals_init_lora(job, reference):
    init = load(job / "job_init.npz")
    assert bit_identical(init, load(reference / "ref_init.npz"))
    assert any(np.abs(v).max() > 0 for v in init.values())


def test_orbax_checkpoint_restores_on_every_topology(job, reference):
    """Written by both processes; restored into 2 x 2 (the job), 1 x 4 and 1 x 1."""
    final = load(job / "job_state.npz")
    assert set(k.split("]")[0] + "]" for k in final) == {
        "['delta']",
        "['opt_state']",
        "['step']",
        "['rng']",
    }
    assert int(final["['step']"]) == STEPS
    for name in ("job/job_restored_2x2", "ref/ref_restored_1x4", "ref/ref_restored_1x1"):
        where, file = name.split("/")
        assert bit_identical(final, load((job if where == "job" else reference) / f"{file}.npz"))
    r = info(reference, "reference")
    assert r["restored_1x4_devices"] == [0, 1, 2, 3] and len(r["restored_1x1_devices"]) == 1
    parts = {p.name for p in (job / "ckpt" / str(STEPS) / "default").rglob("*") if p.is_dir()}
    assert any("process_1" in p for p in parts) and any("process_0" in p for p in parts), parts


def test_adapter_written_by_process_0_loads_on_any_topology(job, reference):
    delta = load(job / "job_state.npz", "['delta']")
    assert bit_identical(load(reference / "ref_adapter_1x4.npz"), delta)
    assert bit_identical(load(reference / "ref_adapter_1.npz"), delta)
    assert info(job, "job")["restored_adapter_ok"]  # reloaded onto the 2 x 2 mesh


def test_qlora_across_processes(job, reference):
    j, r = info(job, "job"), info(reference, "reference")
    # The quantized base is sharded on both kernel axes (fsdp across the processes, tensor
    # within): each device holds a quarter of every kernel's codes, each process half.
    assert all(
        s[0] * s[1] * 4 == n[0] * n[1]
        for s, n in zip(j["qlora_codes_shard_shapes"], j["qlora_codes_shapes"])
    )
    assert j["qlora_losses"] == r["qlora_losses"] and j["qlora_losses"][1] < j["qlora_losses"][0]
    state = load(job / "job_qlora_state.npz")
    assert bit_identical(state, load(reference / "ref_qlora_state.npz"))
    for topology in ("1x4", "1x1"):  # its orbax checkpoint, written by both processes
        assert bit_identical(state, load(reference / f"ref_qlora_restored_{topology}.npz"))
        qbase = load(reference / f"ref_qbase_restored_{topology}.npz")
        assert bit_identical(qbase, load(reference / "ref_qbase.npz"))


def test_stack_of_adapters_served_across_processes(job, reference):
    out = load(job / "job_served.npz")
    assert bit_identical(out, load(reference / "ref_served_1x4.npz"))
    # One device, no mesh: other partial sums, so float32 rounding (logits up to ~4).
    (got,), (want,) = out.values(), load(reference / "ref_served_1.npz").values()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    rows = [np.abs(got[i] - got[j]).max() for i, j in ((0, 1), (1, 2), (0, 3))]
    assert min(rows) > 1e-3  # the rows' adapters differ, and so do their outputs


def test_compiled_step_gathers_no_kernel_across_processes(job):
    hlo = info(job, "job")["hlo"]
    assert hlo["collectives"], "no collective at all: the check would be vacuous"
    assert hlo["full_gathers"] == []
    assert hlo["kernel_sized"] == []


def test_killed_process_fails_the_job_fast_and_the_restart_is_bit_identical(killed, job):
    assert killed["status"][1] == -9  # SIGKILL
    assert killed["status"][0] != 0  # the survivor aborted on its own, nobody stopped it
    assert 1 <= killed["latest_step"] <= KILL_AT
    resumed_from = int(
        killed["resumed_stdout"].split("resumed from the checkpoint of step ")[1].split()[0]
    )
    assert 1 <= resumed_from <= KILL_AT
    assert read_log(killed["dir"] / "log.txt") == read_log(job / "log.txt")
    # The final adapter (gathered, written by process 0) equals the uninterrupted run's.
    assert bit_identical(adapter_arrays(killed["dir"] / "adapter"), adapter_arrays(job / "adapter"))


def test_zz_report(capsys):
    """Prints the time of each multi-process job (seconds on this machine)."""
    assert TIMES, "run with the other tests of this module"
    with capsys.disabled():
        print(
            "\nmulti-process job times (s): "
            + json.dumps({k: round(v, 1) for k, v in TIMES.items()})
        )
