"""Expert-parallel LoRA on 8 simulated CPU devices (``experts_sharding_worker.py``, one
subprocess, since ``XLA_FLAGS`` must request the devices before JAX starts): the factors
follow the experts axis, training matches one device, and the compiled step neither
all-gathers an experts kernel nor computes an experts-kernel-sized tensor (the
merge-on-the-fly step, the negative control, does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._eight_devices import run_on_eight_devices

ROOT = Path(__file__).resolve().parents[2]
MESHES = ["8,1", "4,2"]


@pytest.fixture(scope="module")
def worker():
    return run_on_eight_devices(ROOT / "tests" / "core" / "experts_sharding_worker.py")


@pytest.mark.slow
def test_layouts_and_devices(worker):
    assert worker["device_count"] == 8
    assert worker["layouts"] == {"router": "io", "up": "eio", "down": "eio"}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_factors_follow_the_experts_axis(worker, mesh):
    specs = worker[mesh]["specs"]
    assert specs["up"] == [["expert", None, None], ["expert", None, "tensor"]]
    assert specs["down"] == [["expert", "tensor", None], ["expert", None, None]]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_matches_one_device(worker, mesh):
    assert worker[mesh]["loss_diff"] < 1e-6
    assert worker[mesh]["delta_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_no_experts_kernel_gather_and_no_kernel_sized_gradient(worker, mesh):
    assert worker[mesh]["step"] == {"full_gathers": [], "kernel_sized": []}
    assert worker[mesh]["control"]["kernel_sized"]  # the check finds a dense dW when there is one


@pytest.mark.slow
def test_ragged_dot_with_experts_sharded_eight_ways(worker):
    r = worker["ragged"]
    assert r["loss_diff"] < 1e-6 and r["delta_diff"] < 1e-5
    assert r["step"] == {"full_gathers": [], "kernel_sized": []}
