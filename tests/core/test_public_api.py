"""The public API: exactly ``lora_jax.__all__``, each name documented with an example
that runs in a fresh interpreter, every other module private, the API page's summary table
(docs/api/lora_jax.md) in step."""

from __future__ import annotations

import doctest
import pkgutil
import re
from pathlib import Path

import pytest

import lora_jax

API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api" / "lora_jax.md"


def _examples(obj) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(obj, getattr(obj, "__name__", "obj"), globs={}) if t.examples]


@pytest.mark.parametrize("name", lora_jax.__all__)
def test_public_name_has_an_example_that_runs_fresh(name):
    """Pasted into a fresh interpreter (no names but what the example imports), it runs."""
    obj = getattr(lora_jax, name)
    tests = _examples(obj)
    assert tests, f"lora_jax.{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        t.globs = {}  # nothing injected: the example imports what it uses
        runner.run(t)
    assert runner.failures == 0, f"lora_jax.{name}: {runner.failures} example(s) failed"


def test_all_is_sorted_unique_and_importable():
    assert lora_jax.__all__ == sorted(set(lora_jax.__all__))
    for name in lora_jax.__all__ + lora_jax.advanced.__all__:
        assert hasattr(lora_jax, name) or hasattr(lora_jax.advanced, name), name
    # What a user's program names lives at the top (a tenant's optimizer and its settings, the
    # cache, the entry types a delta holds); the rest is in lora_jax.advanced. The bound makes
    # growth a reviewed decision: 60 after the MoE, PEFT-key and multi-tenant issues.
    assert 25 <= len(lora_jax.__all__) <= 60


def test_every_module_but_advanced_is_private():
    names = {m.name for m in pkgutil.iter_modules(lora_jax.__path__)}
    public = {n for n in names if not n.startswith("_")}
    assert public == {"advanced", "debug", "nnx"}, public


def test_advanced_names_are_documented():
    for name in lora_jax.advanced.__all__:
        assert getattr(lora_jax.advanced, name).__doc__, name
        assert f"``{name}``" in lora_jax.advanced.__doc__, name


def _summary_rows() -> list[str]:
    """The first cells of the API page's summary table (header and rule skipped)."""
    text = API_PAGE.read_text()
    section = text.split("## Summary", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\|(.*?)\|", section, re.MULTILINE)[2:]


def test_api_page_summary_lists_exactly_all():
    names = [n for row in _summary_rows() for n in re.findall(r"`([A-Za-z_]\w*)", row)]
    assert len(names) == len(set(names)), "a name appears twice in the API summary table"
    assert sorted(names) == sorted(lora_jax.__all__)


def test_api_page_summary_links_each_name_to_its_reference():
    """Each name links to its own generated entry (``mkdocs build --strict`` resolves them)."""
    for row in _summary_rows():
        spans = re.findall(r"`([A-Za-z_]\w*)[^`]*`", row)
        links = re.findall(r"\[`([A-Za-z_]\w*)[^`]*`\]\[([\w.]+)\]", row)
        assert [name for name, _ in links] == spans, row
        for name, target in links:
            assert target == f"lora_jax.{name}", row
