"""The test environments themselves: the newest one runs the JAX and Flax the Makefile pins
and has every optional package its tests use; the torch one has torch, transformers and the
peft the PEFT fixtures were written with (so no test can quietly not run)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
NEEDED = ("orbax.checkpoint", "hypothesis", "tqdm", "matplotlib")
TORCH_NEEDED = ("torch", "peft", "transformers")


def makefile_pins(variable: str) -> dict[str, str]:
    """``{package: version}`` of the ``name==version`` pins in a Makefile variable."""
    line = re.search(rf"^{variable} := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    return dict(re.findall(r"([\w-]+)==(\S+)", line))


def fixture_peft_versions() -> set[str]:
    return {
        json.loads(p.read_text())["peft_version"] for p in FIXTURES.glob("*/adapter_config.json")
    }


def test_fixtures_were_written_by_the_pinned_peft():
    pinned = re.search(r"^PEFT := peft==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert fixture_peft_versions() == {pinned}


@pytest.mark.parametrize("module", NEEDED)
def test_newest_environment_has_every_optional_package(module, test_env):
    if test_env != "newest":
        pytest.skip(f"the {test_env} environment need not have {module}")
    importlib.import_module(module)  # an ImportError here fails the newest environment


def test_newest_environment_runs_the_pinned_jax_and_flax(test_env):
    if test_env != "newest":
        pytest.skip(f"the {test_env} environment pins other versions")
    import flax
    import jax

    pins = makefile_pins("NEWEST")
    assert (jax.__version__, flax.__version__) == (pins["jax"], pins["flax"])


@pytest.mark.torch
@pytest.mark.parametrize("module", TORCH_NEEDED)
def test_torch_environment_has_torch_peft_and_transformers(module):
    importlib.import_module(module)  # conftest already fails a torch test without them


@pytest.mark.torch
def test_torch_environment_runs_the_pinned_peft_and_jax(test_env):
    import jax
    import peft

    assert {peft.__version__} == fixture_peft_versions()
    if test_env == "torch":
        assert jax.__version__ == makefile_pins("TORCH")["jax"]


def test_a_skip_fails_in_the_newest_environment_and_is_listed_in_the_oldest(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).resolve().parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_it.py").write_text(
        "import pytest\n\ndef test_needs_torch():\n    pytest.importorskip('no_such_torch')\n"
    )
    runs = {}
    for env in ("newest", "torch", "oldest"):
        runs[env] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_it.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "LORA_JAX_TEST_ENV": env},
        )
    assert runs["newest"].returncode == 1, runs["newest"].stdout
    assert "skipped in the newest test environment" in runs["newest"].stdout
    assert runs["torch"].returncode == 1, runs["torch"].stdout
    assert "skipped in the torch test environment" in runs["torch"].stdout
    assert runs["oldest"].returncode == 0, runs["oldest"].stdout
    assert "1 test(s) skipped" in runs["oldest"].stdout
    assert "skipped test_it.py::test_needs_torch" in runs["oldest"].stdout
