"""Preemption: training processes killed with SIGKILL at chosen and random moments resume
bit-identically, and a kill during ``lj.save`` or ``lora-jax merge`` leaves a loadable file.

The training is ``examples/resumable_training.py`` run as a user runs it (a subprocess,
restarted after each kill with the same command). Chosen moments are reached by a small
wrapper that imports the example and kills the process from inside at that moment (while a
step's computation is in flight, right after an async save was started, after an async
save wrote its arrays but before orbax wrote the commit metadata, before orbax's final
rename, after it, while the final adapter is being saved); random moments by a SIGKILL from
outside after a random delay. After every kill the latest checkpoint must be the step that
moment leaves (the new one after orbax's final rename, the previous one before it) and
restore to the exact state (dtype, shape and bytes of every leaf) an uninterrupted run had
at that step; at the end every logged loss and the final delta must be bit-identical to the
uninterrupted run's. ``LORA_JAX_RANDOM_KILLS`` (default 1) sets the number of random kills
that must land.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax as lj

ocp = pytest.importorskip("orbax.checkpoint")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "resumable_training.py"
WTS = "adapter_model.safetensors"
STEPS = 8
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}  # + a cache dir per module below
REPORT: dict[str, list] = {"kills": [], "lj.save": [], "merge": []}

KILLER = """
import asyncio, importlib.util, os, signal, sys
moment, at = os.environ["KILL_AT"].split(":")
at = int(at)
spec = importlib.util.spec_from_file_location("resumable_training", sys.argv[1])
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
from orbax.checkpoint._src.path import atomicity

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def step_of(path):  # the step whose directory (N, or N.orbax-checkpoint-tmp-*) holds path
    for part in reversed(os.fspath(path).split(os.sep)):
        head = part.split(".")[0]
        if head.isdigit():
            return int(head)
    return None

if moment == "in_step":  # the step's computation dispatched, not finished
    real_step = ex.train_step
    def train_step(base, state):
        out = real_step(base, state)
        if int(state["step"]) + 1 == at:
            die()
        return out
    ex.train_step = train_step
if moment == "save_started":  # save() returned: the async write is in flight
    real_save = ex.ocp.CheckpointManager.save
    def save(self, step, *a, **k):
        r = real_save(self, step, *a, **k)
        if step == at:
            die()
        return r
    ex.ocp.CheckpointManager.save = save
if moment in ("arrays_written", "before_rename", "after_rename"):
    cls = atomicity.AtomicRenameTemporaryPath
    real_finalize = cls.finalize
    real_rename = atomicity.async_path.rename
    async def finalize(self):
        if moment == "arrays_written" and step_of(self._final_path) == at:
            die()  # every array file written; commit metadata and rename not yet
        return await real_finalize(self)
    async def rename(src, dst, *a, **k):
        final = os.path.basename(os.fspath(dst)) == str(at)  # the step directory's own rename
        if moment == "before_rename" and final:
            die()  # metadata and commit_success written, the directory still tmp
        r = await real_rename(src, dst, *a, **k)
        if moment == "after_rename" and final:
            die()  # committed; older steps not yet garbage-collected
        return r
    cls.finalize = finalize
    atomicity.async_path.rename = rename
if moment == "final_save":  # training done, the final adapter half written
    import lora_jax._files.lora_format as lf
    def write(path, tensors, metadata=None):
        open(path, "wb").write(b"half")
        die()
    lf.write_safetensors = write
sys.exit(ex.main(sys.argv[2:]))
"""


def load_example():
    spec = importlib.util.spec_from_file_location("resumable_training_ref", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    return ex


def bits(tree) -> list[tuple[str, tuple[int, ...], bytes]]:
    """Every leaf as (dtype, shape, raw bytes): equal means bit-identical, not just the bytes."""
    return [
        (np.asarray(x).dtype.str, np.shape(x), np.asarray(x).tobytes())
        for x in jax.tree.leaves(tree)
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (a subprocess, as a user runs it) and the state after every step.
    The runs share a persistent compilation cache (the same programs, compiled once)."""
    tmp = tmp_path_factory.mktemp("reference")
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    train_seconds = run_example(tmp, "ref")[1]
    ex = load_example()
    base = ex.base_params()
    states = [ex.initial_state(base)]
    for _ in range(STEPS):
        states.append(ex.train_step(base, states[-1])[0])
    losses = read_log(tmp / "ref.log")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {
        "ex": ex,
        "base": base,
        "states": [bits(s) for s in states],
        "losses": losses,
        "delta": lj.load(tmp / "ref.out")[0],
        "seconds": train_seconds,
    }


def args(tmp: Path, name: str) -> list[str]:
    return [
        "--ckpt",
        str(tmp / f"{name}.ckpt"),
        "--steps",
        str(STEPS),
        "--log",
        str(tmp / f"{name}.log"),
        "--out",
        str(tmp / f"{name}.out"),
    ]


def run_example(
    tmp: Path, name: str, kill_at: str | None = None, after: tuple[int, float] | None = None
):
    """Runs the example; with ``kill_at`` through the killer wrapper; with ``after=(k, t)``
    killed from outside ``t`` seconds after it logged its ``k``-th new step (``k = 0``: after
    it printed ``starting at step N``, i.e. restored its state). Returns the exit status and
    the seconds from that line to the exit."""
    if kill_at is None:
        cmd = [sys.executable, "-m", "examples.resumable_training", *args(tmp, name)]
    else:
        (tmp / "killer.py").write_text(KILLER)
        cmd = [sys.executable, str(tmp / "killer.py"), str(EXAMPLE), *args(tmp, name)]
    env = dict(ENV, KILL_AT=kill_at or "none:0")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # "starting at step N"
    started = time.perf_counter()
    if after is not None:
        log, (k, t) = tmp / f"{name}.log", after
        lines = count_lines(log)
        while proc.poll() is None and count_lines(log) < lines + k:
            time.sleep(0.005)
        try:
            proc.wait(timeout=t)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    out = first + out
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}:\n{out.decode()}\n{err.decode()}")
    return proc.returncode, time.perf_counter() - started


def count_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:  # not created yet
        return 0


def read_log(path: Path) -> dict[int, str]:
    """``{step: loss hex}``; a step logged by several runs must have logged the same loss."""
    losses: dict[int, str] = {}
    if not path.exists():
        return losses
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2:  # a line cut by the kill
            continue
        step, loss = int(parts[0]), parts[1]
        assert losses.setdefault(step, loss) == loss, (step, losses[step], loss)
    return losses


def check_latest_checkpoint(reference, tmp: Path, name: str) -> int:
    """The latest checkpoint restores to exactly the uninterrupted run's state at its step."""
    ex = reference["ex"]
    manager = ex.checkpoint_manager(str(tmp / f"{name}.ckpt"))
    try:
        step = manager.latest_step()
        if step is None:
            return 0
        state = ex.restore_or_init(manager, reference["base"])
    finally:
        manager.close()
    assert int(state["step"]) == step
    assert bits(state) == reference["states"][step], f"checkpoint {step} differs"
    return step


def check_final(reference, tmp: Path, name: str) -> None:
    assert read_log(tmp / f"{name}.log") == reference["losses"]
    assert bits(lj.load(tmp / f"{name}.out")[0]) == bits(reference["delta"])


@pytest.mark.slow  # ~40 s of kills and resumes (make test-slow; CI runs it); the random-moment test stays
def test_resume_after_kills_at_chosen_moments(reference, tmp_path):
    moments = [
        "in_step",
        "save_started",
        "arrays_written",
        "before_rename",
        "after_rename",
        "final_save",
    ]
    # the checkpoint each kill leaves (saves every step, each waiting for the one before):
    # killed while step `at` computes, save at-1 may still be in flight; right after save(at)
    # returned, at-1 is committed and `at` may be; before the final rename the previous step,
    # after it the new one; at the final save every step is committed
    leaves = {
        "in_step": (-2, -1),
        "save_started": (-1, 0),
        "arrays_written": (-1,),
        "before_rename": (-1,),
        "after_rename": (0,),
        "final_save": (0,),
    }
    for moment in moments:
        start = check_latest_checkpoint(reference, tmp_path, "chosen")
        at = STEPS if moment == "final_save" else min(start + 2, STEPS)
        code = run_example(tmp_path, "chosen", kill_at=f"{moment}:{at}")[0]
        assert code == -signal.SIGKILL, (moment, at)  # the moment was reached
        step = check_latest_checkpoint(reference, tmp_path, "chosen")
        assert step in [at + d for d in leaves[moment]], (moment, at, step)
        REPORT["kills"].append((moment, at, step))
    assert run_example(tmp_path, "chosen")[0] == 0
    check_final(reference, tmp_path, "chosen")


def test_resume_after_kills_at_random_moments(reference, tmp_path):
    """Kills at random moments: after a random number of new steps (leaving at least one
    step to run), a random fraction of a step's time later. A run that finished before its
    kill is checked and does not count: the test goes on until ``LORA_JAX_RANDOM_KILLS``
    kills have landed (at most three tries each), each leaving a checkpoint of the exact
    state at its step, never older than the run's start."""
    rng = random.Random(int(os.environ.get("LORA_JAX_KILL_SEED", "0")))
    kills, chain, done = int(os.environ.get("LORA_JAX_RANDOM_KILLS", "1")), 0, []
    per_step = reference["seconds"] / STEPS
    landed = tries = 0
    while landed < kills and tries < 3 * kills:
        tries += 1
        name = f"random{chain}"
        start = check_latest_checkpoint(reference, tmp_path, name)
        if start >= STEPS - 1:  # too little left to kill: finish this run, kill a fresh one
            assert run_example(tmp_path, name)[0] == 0
            done.append(name)
            chain += 1
            name, start = f"random{chain}", 0
        logged = len(read_log(tmp_path / f"{name}.log"))
        k, t = rng.randint(0, STEPS - start - 1), rng.uniform(0.0, per_step)
        code, _ = run_example(tmp_path, name, after=(k, t))
        partial = [p.name for p in (tmp_path / f"{name}.ckpt").glob("*tmp*")]
        step = check_latest_checkpoint(reference, tmp_path, name)
        now = len(read_log(tmp_path / f"{name}.log"))
        if code == 0:
            moment = "finished first (not counted)"
            done.append(name)
            chain += 1
        else:
            assert code == -signal.SIGKILL
            assert step >= start, (start, step)  # a kill never loses a committed step
            landed += 1
            moment = (
                f"steps logged {logged}->{now}, "
                f"{'a partial checkpoint left' if partial else 'no partial checkpoint'}"
            )
        REPORT["kills"].append((f"random (+{k} steps, {t:.2f}s): {moment}", None, step))
    assert landed == kills, f"{landed} of {kills} random kills landed in {tries} runs"
    if f"random{chain}" not in done and (tmp_path / f"random{chain}.log").exists():
        assert run_example(tmp_path, f"random{chain}")[0] == 0
        done.append(f"random{chain}")
    for name in done:
        check_final(reference, tmp_path, name)


# --------------------------------------------------------------------------- lj.save and merge

SAVE_KILLER = """
import os, signal, sys
import numpy as np
import lora_jax as lj, lora_jax._files.atomic as atomic, lora_jax._files.lora_format as lf
moment, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_write, real_commit, real_keep = lf.write_safetensors, atomic.commit_file, lf._keep_previous_tensors
commits = []
def write(path, tensors, metadata=None):
    if moment == "tensors_half_written":
        open(path, "wb").write(b"\\0" * 100)
        die()
    real_write(path, tensors, metadata)
def commit(tmp, target):
    if moment == "before_rename_%d" % len(commits):
        die()
    real_commit(tmp, target)
    commits.append(target)
    if moment == "after_rename_%d" % len(commits):
        die()
def keep(directory, previous):
    real_keep(directory, previous)
    if moment == "previous_kept":
        die()
lf.write_safetensors, atomic.commit_file, lf._keep_previous_tensors = write, commit, keep
import lora_jax._cli as cli
cli.write_safetensors = write
if kind == "save":
    f = lj.LoraFactors(np.full((4, 2), 2.0, np.float32), np.full((2, 3), 3.0, np.float32),
                       alpha=4.0, layout=lj.KernelLayout("io"))
    lj.save(out, {"w": f})
else:
    import lora_jax._files.safetensors_io as fio
    fio.write_safetensors = write
    sys.exit(cli.main(["merge", "--force", "--no-progress"] + sys.argv[4:]))
"""

SAVE_MOMENTS = [
    "tensors_half_written",
    "before_rename_0",
    "previous_kept",
    "after_rename_1",
    "after_rename_2",
    "none",
]


def test_killed_lj_save_leaves_a_loadable_adapter(tmp_path):
    old = {
        "w": lj.LoraFactors(
            np.ones((4, 2), np.float32),
            np.ones((2, 3), np.float32),
            alpha=4.0,
            layout=lj.KernelLayout("io"),
        )
    }
    (tmp_path / "k.py").write_text(SAVE_KILLER)
    for moment in SAVE_MOMENTS:
        d = tmp_path / moment
        lj.save(d, old)
        r = subprocess.run(
            [sys.executable, str(tmp_path / "k.py"), moment, "save", str(d)],
            env=ENV,
            capture_output=True,
            timeout=300,
        )
        assert r.returncode == (0 if moment == "none" else -signal.SIGKILL), r.stderr.decode()
        a = np.asarray(lj.load(d)[0]["w"].a)  # loadable, and either the old or the new save
        new = moment in ("after_rename_2", "none")
        assert (a == (2.0 if new else 1.0)).all(), moment
        REPORT["lj.save"].append((moment, "new" if new else "previous"))
        lj.save(d, old)  # the next save after a kill works and tidies up its kept tensors
        kept = [
            p.name for p in d.iterdir() if p.name.startswith(f".{WTS}.") and "tmp-" not in p.name
        ]
        assert kept == [], (moment, kept)  # orphaned .tmp- files of the killed write may stay


def test_killed_merge_leaves_the_previous_output(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_file({"w": np.zeros((4, 3), np.float32)}, str(tmp_path / "base.safetensors"))
    f = lj.LoraFactors(
        np.ones((4, 1), np.float32),
        np.ones((1, 3), np.float32),
        alpha=1.0,
        layout=lj.KernelLayout("io"),
    )
    lj.save(tmp_path / "adapter", {"w": f})
    (tmp_path / "k.py").write_text(SAVE_KILLER)
    out = tmp_path / "merged.safetensors"
    for moment in ("tensors_half_written", "before_rename_0", "after_rename_1", "none"):
        save_file({"w": np.full((4, 3), 7.0, np.float32)}, str(out))  # the previous output
        r = subprocess.run(
            [
                sys.executable,
                str(tmp_path / "k.py"),
                moment,
                "merge",
                "-",
                "--base",
                str(tmp_path / "base.safetensors"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(out),
            ],
            env=ENV,
            capture_output=True,
            timeout=300,
        )
        assert r.returncode == (0 if moment == "none" else -signal.SIGKILL), r.stderr.decode()
        w = load_file(str(out))["w"]
        new = moment in ("after_rename_1", "none")
        assert (w == (1.0 if new else 7.0)).all(), moment
        REPORT["merge"].append((moment, "new" if new else "previous"))


ORBAX_KILLER = """
import os, signal, sys
import orbax.checkpoint as ocp
import lora_jax._files.atomic as atomic, lora_jax._cli as cli
moment = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save, real_exchange, real_replace = ocp.StandardCheckpointer.save, atomic._exchange, atomic.replace_directory
def save(self, *a, **k):
    real_save(self, *a, **k)
    if moment == "orbax_save_in_flight":
        die()
def replace(new, target):
    if moment == "written_not_swapped":
        die()
    real_replace(new, target)
def exchange(a, b):
    r = real_exchange(a, b)
    if moment == "swapped_old_not_removed":
        die()
    return r
ocp.StandardCheckpointer.save, atomic._exchange, atomic.replace_directory = save, exchange, replace
sys.exit(cli.main(["merge", "--force", "--no-progress"] + sys.argv[2:]))
"""


def test_killed_orbax_merge_leaves_the_previous_output(tmp_path):
    base = {"params": {"w": np.zeros((4, 3), np.float32)}}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp_path / "base").resolve(), base)
    ckpt.wait_until_finished()
    f = lj.LoraFactors(
        np.ones((4, 1), np.float32),
        np.ones((1, 3), np.float32),
        alpha=1.0,
        layout=lj.KernelLayout("io"),
    )
    lj.save(tmp_path / "adapter", {"params": {"w": f}})
    (tmp_path / "k.py").write_text(ORBAX_KILLER)
    out = (tmp_path / "merged").resolve()
    for moment in (
        "orbax_save_in_flight",
        "written_not_swapped",
        "swapped_old_not_removed",
        "none",
    ):
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        ckpt.save(out, {"params": {"w": np.full((4, 3), 7.0, np.float32)}})  # the previous output
        ckpt.wait_until_finished()
        r = subprocess.run(
            [
                sys.executable,
                str(tmp_path / "k.py"),
                moment,
                "--base",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(out),
            ],
            env=ENV,
            capture_output=True,
            timeout=300,
        )
        assert r.returncode == (0 if moment == "none" else -signal.SIGKILL), r.stderr.decode()
        w = np.asarray(ocp.StandardCheckpointer().restore(out)["params"]["w"])
        new = moment in ("swapped_old_not_removed", "none")
        assert (w == (1.0 if new else 7.0)).all(), moment
        REPORT["merge"].append((f"orbax {moment}", "new" if new else "previous"))


def test_zz_report(capsys):
    with capsys.disabled():
        print("\npreemption: " + json.dumps(REPORT))
