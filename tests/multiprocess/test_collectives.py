"""Cross-process CPU collectives (gloo) on every supported JAX, the oldest included.

Two processes x 2 CPU devices on loopback, joined by ``examples/common/distributed.py``:
a global array built from each process's rows, a jitted sum across all 4 devices, and
``process_allgather``. This is what the multi-process training tests
(``test_multiprocess.py``, slow) stand on; it runs where their orbax checkpoints cannot (JAX
0.6.2), and is fast enough (two small programs) for ``make test`` and ``make test-oldest``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from examples.common import distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import argparse, json, sys
import numpy as np
from examples.common import distributed
parser = argparse.ArgumentParser()
distributed.add_arguments(parser)
args = parser.parse_args(sys.argv[2:])
distributed.initialize(args)
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
rows = NamedSharding(mesh, P("data"))
i = jax.process_index()
local = np.arange(6, dtype=np.float32).reshape(3, 2) + 100 * i  # this process's rows
x = jax.make_array_from_process_local_data(rows, local, (6, 2))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
gathered = multihost_utils.process_allgather(x, tiled=True)
result = {"process": i, "processes": jax.process_count(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "sum": float(total),
          "gathered": np.asarray(gathered).tolist()}
open(sys.argv[1] + f"/{i}.json", "w").write(json.dumps(result))
"""


def test_collectives_across_two_processes(tmp_path):
    port = distributed.free_port()
    commands = [
        [sys.executable, "-c", SCRIPT, str(tmp_path), "--coordinator", f"127.0.0.1:{port}"]
        + ["--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [open(tmp_path / f"{i}.err", "w") for i in range(2)]  # noqa: SIM115
    procs = [
        distributed.start_local([c], 2, env=env, stderr=log)[0] for c, log in zip(commands, logs)
    ]
    status = distributed.wait_all(procs, timeout=300)  # stops the others if one fails
    for log in logs:
        log.close()
    errors = [(tmp_path / f"{i}.err").read_text()[-2000:] for i in range(2)]
    hung = [i for i, s in enumerate(status) if s is None]
    assert not hung, f"process(es) {hung} hung or were stopped after a peer failed: {status}"
    assert status == [0, 0], errors
    want = float(2 * sum(range(6)) + 100 * 6)
    expected = [[2 * r, 2 * r + 1] for r in range(3)] + [
        [100 + 2 * r, 101 + 2 * r] for r in range(3)
    ]
    for i in range(2):
        r = json.loads((tmp_path / f"{i}.json").read_text())
        assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
        assert r["sum"] == want
        assert r["gathered"] == expected
