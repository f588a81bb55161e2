"""The test environment itself: the newest one has every optional package the suite uses,
and the peft the PEFT fixtures were written with (so no test can quietly not run)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
NEEDED = ("torch", "peft", "orbax.checkpoint", "hypothesis", "tqdm", "matplotlib")


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


def test_newest_environment_runs_the_pinned_peft(test_env):
    if test_env != "newest":
        pytest.skip(f"the {test_env} environment has no peft")
    import peft

    assert {peft.__version__} == fixture_peft_versions()


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
    for env in ("newest", "oldest"):
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
    assert runs["oldest"].returncode == 0, runs["oldest"].stdout
    assert "1 test(s) skipped" in runs["oldest"].stdout
    assert "skipped test_it.py::test_needs_torch" in runs["oldest"].stdout
