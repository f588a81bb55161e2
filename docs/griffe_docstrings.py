"""A griffe extension that lets mkdocstrings render lora_jax's docstrings as written.

lora_jax's docstrings are Google style with Sphinx cross-reference roles and an
``Example:`` section of doctests (what ``pytest --doctest-modules`` runs). Two
things about them need translating for mkdocstrings, without editing the source:

* griffe reads ``Examples:`` (plural) as doctest code; ``Example:`` would be an
  admonition whose ``>>>`` lines render as Markdown block quotes. Each
  ``Example:`` section title is read as ``Examples:``.
* A reStructuredText simple table (rows between ``=====  =====`` rules, as in
  the module docstrings of ``lora_jax.advanced`` and ``lora_jax.debug``) becomes
  a Markdown table, its first column linked like a role.
* ``:class:`~lora_jax.LoraConfig``` and the other Sphinx roles become autorefs
  links (``[`LoraConfig`][lora_jax.LoraConfig]``) when they name a public object
  (``lora_jax.__all__``, ``lora_jax.advanced.__all__``, ``lora_jax.debug.__all__``),
  so ``mkdocs build --strict`` fails if one no longer resolves (as it does for a
  ``lora_jax.``-qualified name that is not public); a role naming a private
  object (``lora_jax._files.atomic``) or a local helper renders as plain code.

mkdocs.yml loads it with ``extensions: [docs/griffe_docstrings.py]``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

_PACKAGE = Path(__file__).resolve().parents[1] / "lora_jax"
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")
_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_LITERAL = re.compile(r"^``([\w.]+)``$")


def _all(module_file: Path) -> list[str]:
    """The literal ``__all__`` list of a module, read without importing it."""
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{module_file} has no literal __all__")


def _public_names() -> dict[str, str]:
    """``{name: the identifier its API page anchors}`` for every public name."""
    names: dict[str, str] = {}
    for module, file in (
        ("lora_jax.debug", "debug.py"),
        ("lora_jax.advanced", "advanced.py"),
        ("lora_jax", "__init__.py"),
    ):
        names.update({n: f"{module}.{n}" for n in _all(_PACKAGE / file)})
    names.update({m: m for m in ("lora_jax", "lora_jax.advanced", "lora_jax.debug")})
    return names


_PUBLIC = _public_names()


def _link(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    name = target.removeprefix("lora_jax.") if target.startswith("lora_jax.") else target
    if target in _PUBLIC:  # a module
        return f"[`{shown}`][{_PUBLIC[target]}]"
    head, _, rest = name.partition(".")
    if head in _PUBLIC and not head.startswith("lora_jax"):
        identifier = _PUBLIC[head] + (f".{rest}" if rest else "")
        return f"[`{shown}`][{identifier}]"
    if target.startswith("lora_jax.") and not any(p.startswith("_") for p in target.split(".")):
        return f"[`{shown}`][{target}]"  # meant to be public: a typo fails the strict build
    return f"`{shown}`"


def _cell_link(cell: str) -> str:
    """A table's first cell: a public name as a link, anything else as it is."""
    literal = _LITERAL.match(cell)
    if literal and literal.group(1) in _PUBLIC:
        return f"[`{literal.group(1)}`][{_PUBLIC[literal.group(1)]}]"
    return cell.replace("``", "`")


def _row(line: str) -> list[str]:
    """A two-column row: the first cell, then the rest after a run of 2+ spaces."""
    parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
    return parts + [""] * (2 - len(parts))


def _tables(text: str) -> str:
    """Every two-column reStructuredText simple table in ``text`` as a Markdown table."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if not _RULE.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if _RULE.match(lines[j])), None)
        if end is None:
            out.append(lines[i])
            i += 1
            continue
        rows = [_row(line) for line in lines[i + 1 : end] if line.strip()]
        header = ["name", "what it is"]
        closing = next((j for j in range(end + 1, len(lines)) if _RULE.match(lines[j])), None)
        if end == i + 2 and closing is not None:  # a header row between the first two rules
            header, rows = (
                rows[0],
                [_row(line) for line in lines[end + 1 : closing] if line.strip()],
            )
            end = closing
        out += ["", f"| {header[0]} | {header[1]} |", "|---|---|"]
        out += [f"| {_cell_link(a)} | {b.replace('``', '`')} |" for a, b in rows]
        out.append("")
        i = end + 1
    return "\n".join(out)


def convert(text: str) -> str:
    """The docstring as mkdocstrings should read it: ``Examples:``, Markdown tables, links."""
    return _ROLE.sub(_link, _tables(_EXAMPLE_TITLE.sub(r"\1Examples:", text)))


class LoraJaxDocstrings(griffe.Extension):
    """Applies :func:`convert` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
