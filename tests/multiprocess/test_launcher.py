"""The launcher's command lines and device settings (no process started; fast)."""

from __future__ import annotations

import socket
import sys

from examples.common import distributed


def test_child_commands_replace_the_local_flags_by_explicit_cluster_flags():
    argv = ["--mesh", "1,2,2", "--processes", "2", "--devices-per-process=3", "--steps", "4"]
    cmds = distributed.child_commands("examples.sharded_finetune", argv, 2, 3, 4567)
    assert cmds == [
        [sys.executable, "-m", "examples.sharded_finetune", "--mesh", "1,2,2", "--steps", "4"]
        + ["--coordinator", "127.0.0.1:4567", "--num-processes", "2", "--process-id", str(i)]
        + ["--devices-per-process", "3"]
        for i in range(2)
    ]


def test_configure_devices_reads_the_flag_and_keeps_an_existing_setting(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    distributed.configure_devices(["--devices-per-process", "3"])
    assert distributed.os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    )
    distributed.configure_devices(["--devices-per-process", "5"])  # already set: kept
    assert distributed.os.environ["XLA_FLAGS"].endswith("device_count=3")
    monkeypatch.setenv("XLA_FLAGS", "")
    distributed.configure_devices([], default=8)
    assert distributed.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_free_port_can_be_bound_on_loopback():
    port = distributed.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)
