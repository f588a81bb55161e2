"""README.md's and every docs page's Python code blocks run as written.

Each page's ```` ```python ```` blocks run in order in one namespace (a later
block may use an earlier one's names), in a fresh working directory, in this
process (so pages share JAX's compile caches with each other and the suite).
A block that cannot run as it stands, because it needs a whole program's model
or several devices, is marked by the line ``<!-- illustrative: WHY -->`` right
above its fence; ``ILLUSTRATIVE`` says how many each page has, so marking
another block is a deliberate change here as well.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md"))

# Pages written for a newer Flax than the oldest supported (nnx.Optimizer.update(model, grads)
# from 0.11 on): the oldest environment skips them and lists it; the newest runs them.
NEEDS_FLAX = {"docs/nnx.md": (0, 11)}

# Illustrative (not run) python blocks per page; every other block runs.
ILLUSTRATIVE = {"docs/gemma3.md": 1, "docs/scale.md": 1}

_FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_MARKER = re.compile(r"<!-- illustrative: (.+?) -->\n$")
# Optional packages a page may import; a missing one skips the page (a failure in
# the newest environment, tests/conftest.py), any other error fails it.
_OPTIONAL = {"torch", "peft", "transformers"}


def _blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``[(line of the fence, code, why it is illustrative or None)]`` of a page."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()]
        marker = _MARKER.search(before[-300:])
        out.append((before.count("\n") + 1, m.group(1), marker.group(1) if marker else None))
    return out


def _run_page(path: Path) -> dict:
    """Runs the page's blocks in one namespace; returns it."""
    namespace: dict = {"__name__": f"page:{path.name}"}
    for line, code, illustrative in _blocks(path):
        if illustrative:
            continue
        # Padding keeps tracebacks' line numbers those of the Markdown file.
        compiled = compile("\n" * line + code, str(path), "exec")
        try:
            exec(compiled, namespace)  # noqa: S102
        except ModuleNotFoundError as e:
            if e.name in _OPTIONAL:
                pytest.skip(f"{path.name} needs {e.name}")
            raise
    return namespace


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run_page(README)
    import jax
    import numpy as np

    params, merged, restored = namespace["params"], namespace["merged"], namespace["restored"]
    fc1 = np.asarray(params["params"]["fc1"]["kernel"])
    assert not np.allclose(
        merged["params"]["fc1"]["kernel"], fc1
    )  # training moved the adapted weights
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isfinite(float(namespace["loss"]))
    assert (tmp_path / "adapters/mlp/adapter_config.json").is_file()
    assert (tmp_path / "adapters/mlp_peft/adapter_model.safetensors").is_file()


def test_readme_leads_with_the_two_commands():
    text = README.read_text()
    quick = text.index("## Quick start")
    assert (
        text.index("make demo", quick) < text.index("make test", quick) < text.index("## The idea")
    )


def test_readme_is_a_front_door():
    """Short, and it points at every docs page (the API pages included)."""
    text = README.read_text()
    assert len(text.splitlines()) < 300
    for page in PAGES:
        assert f"({page})" in text or page == "docs/index.md", f"README does not link {page}"


_TORCH_IMPORT = re.compile(r"^\s*(?:import|from) (?:torch|peft|transformers)\b", re.MULTILINE)


def _page_param(page: str):
    """A page whose code imports torch, peft or transformers is marked ``torch`` (make test
    runs it in its torch environment)."""
    codes = [code for _, code, why in _blocks(ROOT / page) if why is None]
    return (
        pytest.param(page, marks=pytest.mark.torch)
        if any(_TORCH_IMPORT.search(code) for code in codes)
        else page
    )


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_docs_page_code_runs(page, tmp_path, monkeypatch):
    path = ROOT / page
    blocks = _blocks(path)
    marked = sum(why is not None for _, _, why in blocks)
    assert marked == ILLUSTRATIVE.get(page, 0), f"{page}: {marked} illustrative block(s)"
    monkeypatch.chdir(tmp_path)
    if page in NEEDS_FLAX:
        import flax

        need = NEEDS_FLAX[page]
        if tuple(int(x) for x in flax.__version__.split(".")[:2]) < need:
            pytest.skip(
                f"{page} uses the Flax >= {need[0]}.{need[1]} API (flax {flax.__version__})"
            )
    _run_page(path)


def test_illustrative_markers_sit_on_python_blocks():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for m in re.finditer(r"<!-- illustrative: .+? -->\n(.*)", text):
            assert m.group(1) == "```python", f"{page}: a marker not right above a python block"
