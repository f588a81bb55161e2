"""Fixtures shared by the adapter-file tests."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def peft_env():
    """``(torch, peft, make_peft_fixtures)``: the PEFT twins of the Flax test modules."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location(
        "make_peft_fixtures",
        Path(__file__).resolve().parents[1] / "fixtures" / "make_peft_fixtures.py",
    )
    twins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twins)
    return torch, peft, twins
