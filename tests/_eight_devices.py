"""Running a check on 8 simulated CPU devices: a worker script in a fresh Python process.

JAX fixes its device count when it starts, so the multi-device checks run a worker (a
script file, or a ``-c`` program) with ``--xla_force_host_platform_device_count=8`` and read
the JSON object it prints on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_on_eight_devices(worker: Path | str, timeout: float = 900) -> dict:
    """Runs ``worker`` (a script path, or program text for ``python -c``) on 8 CPU devices
    with the repository on ``PYTHONPATH``; returns the JSON of its last stdout line, and
    fails the test with the worker's output tails if it exits non-zero."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    args = [str(worker)] if isinstance(worker, Path) else ["-c", worker]
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        name = worker.name if isinstance(worker, Path) else "the 8-device program"
        pytest.fail(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
