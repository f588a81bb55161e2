"""How the benchmarks report: fixed-width text tables, ratios, skipped configurations, JSON."""

from __future__ import annotations

from typing import Any

import lora_jax


def fmt_table(header, rows, left=(0,)) -> str:
    """A fixed-width text table; columns in ``left`` are left-aligned, others right-aligned."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
        for i, h in enumerate(header)
    ]
    line = lambda r: "  ".join(  # noqa: E731
        (c.ljust(w) if i in left else c.rjust(w)) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    return "\n".join(
        [line([str(h) for h in header]), line(["-" * w for w in widths]), *map(line, rows)]
    )


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def print_skipped(skipped: dict) -> None:
    """One line per configuration that could not run, with the reason."""
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


def write_json(path: str, results: dict, skipped: dict, run_meta: dict) -> None:
    """``{"configs": ..., "skipped": ..., "meta": ...}`` as the benchmarks' JSON output."""
    dump_json(path, {"configs": results, "skipped": skipped, "meta": run_meta})


def dump_json(path: str, doc: Any) -> None:
    """``doc`` as JSON at ``path``, written atomically (never half a file)."""
    import json
    from pathlib import Path

    text = json.dumps(doc, indent=2)
    lora_jax.advanced.atomic_write(Path(path), lambda tmp: tmp.write_text(text))
    print(f"wrote {path}")
