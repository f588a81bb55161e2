"""The ``lora-jax`` command line: inspect, merge and convert adapter files.

::

    lora-jax inspect ADAPTER [--json]
    lora-jax merge --base BASE --adapter ADAPTER --out OUT [--dtype bfloat16]
                   [--check-finite] [--name-map FILE] [--force] [--no-progress]
    lora-jax convert --to peft|lora_jax SRC DST [--name-map FILE] [--base BASE]

``ADAPTER`` is a lora_jax adapter directory (:func:`lora_jax.save`) or a
HuggingFace PEFT LoRA directory; the format is read from its
``adapter_config.json``. ``BASE`` is either a safetensors file whose keys are
'/'-joined leaf paths (``params/dense/kernel``) or an orbax checkpoint
directory; ``merge`` writes ``OUT`` in the same format. ``--name-map FILE`` is
a JSON name map for PEFT adapters (see :class:`lora_jax.NameMap`): a list of
``[flax_regex, torch_template]`` rules, or ``{"to_peft": [...], "to_flax":
[...]}``.

Exit status: 0 on success, 1 on an error (a message on stderr naming the file
and key), 2 on a usage error, 141 (quietly) when the reader of stdout goes away
(``lora-jax inspect ... | head``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "lora-jax"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class CliError(Exception):
    """A failure reported as ``lora-jax: error: ...`` with exit status 1."""


# --------------------------------------------------------------------------- helpers


def _adapter_format(path: Path) -> str:
    """``"peft"`` or ``"lora_jax"``: the format of an adapter directory, from its config."""
    from lora_jax._errors import LoraFileError
    from lora_jax._files.lora_format import FORMAT
    from lora_jax._files.safetensors_io import CONFIG_NAME, input_directory, read_json

    doc = read_json(input_directory(path) / CONFIG_NAME)
    if "peft_type" in doc:
        return "peft"
    if doc.get("format") == FORMAT:
        return "lora_jax"
    raise LoraFileError(f"{path / CONFIG_NAME}: neither a lora_jax nor a PEFT adapter config")


def _name_map(args: argparse.Namespace) -> Any:
    """The ``--name-map FILE`` as a :class:`~lora_jax.NameMap`, or None."""
    from lora_jax._files.peft.names import NameMap

    return NameMap.from_json(args.name_map) if args.name_map else None


def _human(n: float) -> str:
    """A byte count for people (``'1.5 MB'``).

    Example:
      >>> _human(512), _human(1_500_000)
      ('512 B', '1.5 MB')
    """
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def read_base(path: Path) -> tuple[Any, str, dict]:
    """Base params from a safetensors file ('/'-joined keys) or an orbax checkpoint directory.

    Returns ``(tree, "safetensors" | "orbax", safetensors metadata)``.
    """
    from lora_jax._errors import LoraFileError
    from lora_jax._files.base_files import META_KEY, load_base
    from lora_jax._files.safetensors_io import nested_from_paths, open_safetensors, read_tensor

    if path.is_dir():
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            raise CliError(
                f"{path}: an orbax checkpoint, but orbax-checkpoint is not installed"
            ) from None
        try:
            tree = ocp.StandardCheckpointer().restore(path.resolve())
        except Exception as e:  # orbax raises many types for a bad directory
            raise LoraFileError(f"{path}: cannot restore as an orbax checkpoint: {e}") from None
        return tree, "orbax", {}
    if not path.is_file():
        raise LoraFileError(f"{path}: base params not found")
    with open_safetensors(path) as f:
        metadata = dict(f.metadata() or {})
    if META_KEY in metadata:  # written by lora_jax.save_base: quantized leaves
        metadata.pop(META_KEY)  # the merged output is dense: its record would be stale
        return load_base(path), "safetensors", metadata
    with open_safetensors(path) as f:
        flat = {k: read_tensor(f, path, k) for k in f.keys()}
    try:
        return nested_from_paths(flat), "safetensors", metadata
    except LoraFileError as e:
        raise LoraFileError(f"{path}: keys are not '/'-joined leaf paths: {e}") from None


def _load_adapter(path: Path, base: Any, args: argparse.Namespace) -> Any:
    """The delta of a lora_jax or PEFT adapter directory, checked against and shaped by ``base``."""
    from lora_jax import import_peft, load

    if _adapter_format(path) == "peft":
        return import_peft(path, base, name_map=_name_map(args))
    return load(path, base=base)[0]


# --------------------------------------------------------------------------- inspect


def _inspect_header(path: Path, fmt: str, doc: dict) -> str:
    """The first line of ``lora-jax inspect``: the format and who wrote it."""
    if fmt == "peft":
        head = (
            f"PEFT LoRA adapter (peft {doc.get('peft_version', '?')}), use_rslora="
            f"{bool(doc.get('use_rslora'))}, use_dora={bool(doc.get('use_dora'))}"
        )
    else:
        head = (
            f"lora_jax adapter (format v{doc.get('format_version')}, written by lora_jax "
            f"{doc.get('library_version', '?')})"
        )
    return f"{path}: {head}"


def _table(rows: list[dict]) -> list[str]:
    """The per-target table of ``lora-jax inspect``, as aligned lines (header, rule, rows)."""
    cols = ("target", "kind", "shape", "r", "alpha", "scaling", "dtype", "dora", "params")
    table = [
        (
            r["target"],
            r["kind"],
            "x".join(map(str, r["shape"])),
            str(r["rank"]),
            f"{r['alpha']:g}",
            f"{r['scaling']:.4g}",
            r["dtype"],
            "yes" if r["dora"] else "-",
            f"{r['params']:,}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [cols, *table]) for i in range(len(cols))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
        for line in [cols, tuple("-" * w for w in widths), *table]
    ]


def cmd_inspect(args: argparse.Namespace) -> int:
    """``lora-jax inspect``: one row per target (or PEFT module), as a table or JSON."""
    from lora_jax._files.lora_format import describe
    from lora_jax._files.peft.format import describe_peft
    from lora_jax._files.safetensors_io import CONFIG_NAME, read_json

    path = Path(args.adapter)
    fmt = _adapter_format(path)
    rows = describe_peft(path) if fmt == "peft" else describe(path)
    doc = read_json(path / CONFIG_NAME)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    total = sum(r["params"] for r in rows)
    if args.json:
        json.dump(
            {
                "format": fmt,
                "path": str(path),
                "files": files,
                "params": total,
                "targets": [{**r, "shape": list(r["shape"])} for r in rows],
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(_inspect_header(path, fmt, doc))
    print("files: " + ", ".join(f"{name} ({_human(size)})" for name, size in files.items()))
    for line in _table(rows):
        print(line)
    print(f"{len(rows)} targets, {total:,} parameters, {_human(sum(files.values()))} on disk")
    return 0


# --------------------------------------------------------------------------- merge


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    # disable=None: shown only when stderr is a terminal
    return tqdm(items, desc=desc, unit="leaf", disable=None, file=sys.stderr)


def _merged_leaves(base: Any, delta: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``{path: W'}`` for every base leaf the delta adapts, merged one leaf at a time."""
    import jax.numpy as jnp

    from lora_jax import merge
    from lora_jax._delta import delta_entries
    from lora_jax._paths import leaves_with_paths
    from lora_jax._quant.array import is_quantized

    entries = dict(delta_entries(delta))
    todo = [(p, leaf) for p, leaf in leaves_with_paths(base)[0] if entries.get(p) is not None]
    merged = {}
    for path, leaf in _progress(todo, not args.no_progress, "merging"):
        leaf = leaf if is_quantized(leaf) else jnp.asarray(leaf)
        w = merge({"w": leaf}, {"w": entries[path]})["w"]
        if args.check_finite and not bool(jnp.isfinite(w).all()):
            raise CliError(
                f"merging {args.adapter} into {args.base}: leaf {path!r} has NaN or Inf after the "
                "merge; nothing was written (--check-finite)"
            )
        merged[path] = w
    return merged


def _write_params(
    out: Path, base: Any, merged: dict[str, Any], fmt: str, metadata: dict, args: argparse.Namespace
) -> None:
    """Writes ``base`` with ``merged`` leaves replaced (cast to ``--dtype``) in format ``fmt``."""
    import jax
    import jax.numpy as jnp

    from lora_jax._files.atomic import atomic_write
    from lora_jax._files.safetensors_io import write_safetensors
    from lora_jax._paths import leaves_with_paths
    from lora_jax._quant.array import dequantize_leaf, is_quantized

    leaves, treedef = leaves_with_paths(base)
    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    flat = {}
    for path, leaf in leaves:
        value = merged.get(path, leaf)
        if is_quantized(value):  # a quantized leaf the adapter does not touch: written dense
            value = dequantize_leaf(value)
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = jnp.asarray(value).astype(dtype)
        flat[path] = value
    if fmt == "safetensors":
        atomic_write(out, lambda tmp: write_safetensors(tmp, flat, metadata))
        return
    import shutil
    import uuid

    import orbax.checkpoint as ocp

    from lora_jax._files.atomic import replace_directory

    tree = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[p]) for p, _ in leaves])
    # Written beside OUT, then swapped in: a kill at any moment leaves the previous OUT whole.
    tmp = out.resolve().with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp, tree)
        ckpt.wait_until_finished()
        replace_directory(tmp, out.resolve())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_merge(args: argparse.Namespace) -> int:
    """``lora-jax merge``: dense params ``W + s A B`` written in the base's own format."""
    from lora_jax._paths import leaves_with_paths

    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"{out}: already exists (pass --force to replace it)")
    base, fmt, metadata = read_base(Path(args.base))
    delta = _load_adapter(Path(args.adapter), base, args)  # refuses a mismatched base
    merged = _merged_leaves(base, delta, args)
    _write_params(out, base, merged, fmt, metadata, args)
    n = len(leaves_with_paths(base)[0])
    print(f"merged {len(merged)} of {n} leaves into {out} ({fmt})", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from lora_jax import export_peft, import_peft, load, save
    from lora_jax._delta import delta_entries

    src, dst = Path(args.src), Path(args.dst)
    fmt = _adapter_format(src)
    base = read_base(Path(args.base))[0] if args.base else None
    if args.to == "peft":
        if fmt == "peft":
            raise CliError(f"{src}: already a PEFT adapter")
        delta = load(src, base=base)[0]
        export_peft(
            dst,
            delta,
            name_map=_name_map(args),
            base_model_name_or_path=args.base_model_name_or_path,
        )
    else:
        if fmt == "lora_jax":
            raise CliError(f"{src}: already a lora_jax adapter")
        delta = import_peft(src, base, name_map=_name_map(args))
        save(dst, delta)
    n = sum(1 for _, f in delta_entries(delta) if f is not None)
    print(f"wrote {args.to} adapter {dst} ({n} adapted leaves)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- entry point


def _stdout_closed() -> int:
    """Points stdout at /dev/null (so exiting flushes nowhere) and returns 141 (128 + SIGPIPE,
    what a command killed by the closed pipe would return)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured)
        pass
    return 141


class _Parser(argparse.ArgumentParser):
    """argparse with ``exit`` turned into an exception, so :func:`main` returns codes."""

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-jax`` argument parser (subcommands inspect, merge, convert)."""
    p = _Parser(
        prog=PROG,
        description="Inspect, merge and convert LoRA adapter files "
        "(lora_jax and HuggingFace PEFT).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    i = sub.add_parser(
        "inspect",
        help="targets, shapes, ranks, alpha, scaling, dtype, sizes",
        description="Describe a lora_jax or PEFT adapter directory.",
    )
    i.add_argument("adapter", help="adapter directory (lora_jax or PEFT)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser(
        "merge",
        help="merge an adapter into base params",
        description="Merge an adapter into base params (W + s*A@B, DoRA too) and "
        "write dense params in the base's format.",
    )
    m.add_argument(
        "--base",
        required=True,
        help="safetensors file with '/'-joined keys (or one lora_jax.save_base wrote, "
        "quantized leaves included), or an orbax checkpoint directory",
    )
    m.add_argument("--adapter", required=True, help="adapter directory (lora_jax or PEFT)")
    m.add_argument("--out", required=True, help="output file (safetensors) or directory (orbax)")
    m.add_argument("--dtype", choices=DTYPES, help="cast every floating leaf of the output")
    m.add_argument(
        "--check-finite",
        action="store_true",
        help="refuse a merge that produces NaN or Inf (PEFT's safe_merge)",
    )
    m.add_argument("--name-map", metavar="FILE", help="JSON name map for a PEFT adapter")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser(
        "convert",
        help="convert between lora_jax and PEFT adapter formats",
        description="Convert an adapter directory to the other format.",
    )
    c.add_argument("--to", required=True, choices=("peft", "lora_jax"), help="output format")
    c.add_argument("src", help="input adapter directory")
    c.add_argument("dst", help="output adapter directory")
    c.add_argument(
        "--name-map",
        metavar="FILE",
        help="JSON name map: [[flax_regex, torch_template], ...] or "
        '{"to_peft": [...], "to_flax": [...]}',
    )
    c.add_argument(
        "--base",
        help="base params (safetensors or orbax) to check the adapter "
        "against and, for --to lora_jax, to shape the delta (N-D and stacked kernels)",
    )
    c.add_argument("--base-model-name-or-path", help="recorded in the PEFT config")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``lora-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
      >>> main(["--help"])  # doctest: +ELLIPSIS
      usage: lora-jax [-h] {inspect,merge,convert} ...
      ...
      0
    """
    from lora_jax._errors import LoraError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _Exit as e:
        return e.status
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # `lora-jax inspect ... | head`: the reader left; exit quietly
        return _stdout_closed()
    except (CliError, LoraError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
