"""Running a recipe as several JAX processes: N on this machine, or one per host of a cluster.

JAX's multi-controller runtime runs one Python process per host; each sees
every device (``jax.devices()``) but computes on its own
(``jax.local_devices()``), and ``jax.distributed.initialize`` joins them
before any other JAX call. The same program runs in three ways:

* **N processes on one machine** (``--processes 2 --devices-per-process 2``):
  :func:`launch_local` starts N copies of the recipe as child processes on
  ``127.0.0.1`` and a free port, each simulating K CPU devices and talking to
  the others through gloo CPU collectives; if one fails, the others are
  stopped and the launcher exits with its status.
* **One process per host, detected** (``--distributed``): on TPU pods, SLURM
  and the other clusters JAX knows, ``jax.distributed.initialize()`` reads
  the coordinator, process count and index from the environment.
* **One process per host, explicit** (``--coordinator HOST:PORT
  --num-processes N --process-id I``) on any other cluster.

Call :func:`configure_devices` before JAX starts its backends (it reads
``--devices-per-process`` from the command line) and :func:`initialize`
with the parsed arguments before any other JAX call.

A process whose peer dies blocks in its next collective until JAX's
coordination service misses the peer's heartbeats for ``--heartbeat-timeout``
seconds (or at once when the coordinator, process 0, dies); it then aborts,
so a job never hangs past that timeout.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

DEFAULT_HEARTBEAT_TIMEOUT = 10  # seconds; JAX's own default is 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the launch flags (``--processes``, ``--devices-per-process``, cluster flags)."""
    g = parser.add_argument_group("processes (one machine or a cluster)")
    g.add_argument(
        "--processes",
        type=int,
        default=1,
        help="start this many processes on this machine (loopback, CPU devices)",
    )
    g.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="CPU devices each process simulates (default: 8 for one process)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="one process per host: jax.distributed.initialize() detects the cluster",
    )
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (explicit)")
    g.add_argument("--num-processes", type=int, default=None, help="(explicit) process count")
    g.add_argument("--process-id", type=int, default=None, help="(explicit) this process's index")
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        help="seconds after which a silent peer counts as dead and every process aborts",
    )
    g.add_argument(
        "--init-timeout", type=int, default=120, help="seconds to wait for every process to join"
    )


def configure_devices(argv: Sequence[str] | None = None, default: int = 8) -> None:
    """Sets the CPU device count before JAX starts: ``--devices-per-process K`` from ``argv``
    (``sys.argv`` by default), else ``default`` for a single process. An existing
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    count = default
    for i, a in enumerate(argv):
        if a == "--devices-per-process" and i + 1 < len(argv):
            count = int(argv[i + 1])
        elif a.startswith("--devices-per-process="):
            count = int(a.split("=", 1)[1])
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def initialize(args: argparse.Namespace) -> None:
    """Joins this process to its job (a no-op for a single process); call before any JAX work.

    ``--coordinator`` given: explicit arguments (local children get these from
    :func:`launch_local`); ``--distributed``: arguments detected by JAX.
    """
    import jax

    if args.coordinator is None and not args.distributed:
        return
    if args.coordinator is not None and "127.0.0.1" in args.coordinator:
        jax.config.update("jax_platforms", "cpu")  # a local job: simulated CPU devices
    kwargs: dict = {"initialization_timeout": args.init_timeout}
    if args.coordinator is not None:
        kwargs.update(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
        if args.coordinator.startswith("127.0.0.1:"):  # listen on loopback only
            kwargs["coordinator_bind_address"] = args.coordinator
    if jax.config.jax_platforms == "cpu":
        # gloo: JAX's CPU collectives across processes (the default on recent JAX).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    initialize_with_heartbeat(args.heartbeat_timeout, **kwargs)


def initialize_with_heartbeat(heartbeat_timeout: int, **kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` with a peer declared dead after
    ``heartbeat_timeout`` seconds without heartbeats.

    JAX >= 0.7 takes ``heartbeat_timeout_seconds``; older versions take the same
    setting only as an interval times a count of missed heartbeats, through the
    runtime's state object (what ``jax.distributed.initialize`` itself calls).
    """
    import jax

    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout, **kwargs)
        return
    from jax._src import distributed as runtime  # JAX < 0.7: the only way to set heartbeats

    count = max(2, heartbeat_timeout)
    runtime.global_state.initialize(
        service_heartbeat_interval_seconds=1,
        service_max_missing_heartbeats=count,
        client_heartbeat_interval_seconds=1,
        client_max_missing_heartbeats=count,
        **kwargs,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (bound to port 0 and read back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the flags ``names`` (and their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def child_commands(
    module: str, argv: Sequence[str], processes: int, devices_per_process: int, port: int
) -> list[list[str]]:
    """The command line of each local process: ``python -m module`` with ``argv`` and the
    explicit cluster flags for a job on ``127.0.0.1:port``."""
    argv = _strip(argv, ["--processes", "--devices-per-process"])
    return [
        [sys.executable, "-m", module, *argv]
        + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
        + ["--process-id", str(i), "--devices-per-process", str(devices_per_process)]
        for i in range(processes)
    ]


def start_local(
    commands: Sequence[Sequence[str]],
    devices_per_process: int,
    *,
    env: dict | None = None,
    **popen_kwargs,
) -> list[subprocess.Popen]:
    """Starts one child per command, each on CPU with ``devices_per_process`` devices."""
    env = dict(os.environ if env is None else env)
    flags = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
    )
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    return [subprocess.Popen(list(c), env=env, **popen_kwargs) for c in commands]


def wait_all(
    procs: Sequence[subprocess.Popen], timeout: float | None = None, poll: float = 0.05
) -> list[int | None]:
    """Waits for every process; when one fails (or ``timeout`` seconds pass) stops the others.

    Returns each process's exit status; ``None`` for a process that was still
    running when it was stopped (it hung, or a peer failed first). Stops only
    the processes given, by pid: SIGTERM, then SIGKILL after 5 s.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    status: list[int | None] = [None] * len(procs)
    while True:
        for i, p in enumerate(procs):
            if status[i] is None:
                status[i] = p.poll()
        if all(s is not None for s in status):
            return status
        failed = any(s not in (None, 0) for s in status)
        if failed or (deadline is not None and time.monotonic() > deadline):
            stop(procs)
            return [s if s is not None else None for s in status]
        time.sleep(poll)


def stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM to each still-running process, SIGKILL to those alive after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_local(module: str, argv: Sequence[str], processes: int, devices_per_process: int) -> int:
    """Runs ``python -m module argv`` as ``processes`` local processes joined into one job.

    Returns 0 if every process succeeded, else the first failure's status (a
    process killed by a signal counts as ``128 + signal``).
    """
    port = free_port()
    procs = start_local(
        child_commands(module, argv, processes, devices_per_process, port), devices_per_process
    )
    try:
        status = wait_all(procs)
    except KeyboardInterrupt:
        stop(procs)
        raise
    for i, s in enumerate(status):
        if s not in (0, None):
            print(f"process {i} exited with status {s}; the others were stopped", file=sys.stderr)
            return 128 - s if s < 0 else s
    return 0 if all(s == 0 for s in status) else 1
