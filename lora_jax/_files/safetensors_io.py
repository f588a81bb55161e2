"""The two files of an adapter directory, read and written with errors that name the file and key.

Both adapter formats (lora_jax's and HuggingFace PEFT's) are a directory with
:data:`CONFIG_NAME` (a JSON object) and :data:`WEIGHTS_NAME` (a safetensors
file). This module reads and writes those files and checks what it reads:
a missing, truncated or corrupt file, a missing key or one of the wrong type
is a :class:`~lora_jax.LoraFileError` whose message starts with the file's
path. Writing atomically is :mod:`lora_jax._files.atomic`'s job; the writers here
(:func:`write_safetensors`, :func:`json_writer`) write to the path they are
given, which is the temporary sibling that :mod:`lora_jax._files.atomic` renames.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax._errors import LoraFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# --------------------------------------------------------------------------- directories


def output_directory(path: str | os.PathLike) -> Path:
    """The directory to write an adapter into, created if missing.

    Raises :class:`LoraFileError` if ``path`` exists and is not a directory.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise LoraFileError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def input_directory(path: str | os.PathLike) -> Path:
    """An existing adapter directory; :class:`LoraFileError` if there is none."""
    directory = Path(path)
    if not directory.is_dir():
        raise LoraFileError(f"{directory}: adapter directory not found")
    return directory


# --------------------------------------------------------------------------- safetensors


def to_numpy(x: Any) -> np.ndarray:
    """A C-contiguous host copy of an array (safetensors reads raw buffers).

    Example:
      >>> to_numpy(np.ones((3, 2)).T).flags["C_CONTIGUOUS"]
      True
    """
    return np.ascontiguousarray(np.asarray(x))


def write_safetensors(
    path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``{key: array}`` to ``path`` with the ``safetensors`` package (not atomic)."""
    from safetensors.numpy import save_file

    arrays = {k: to_numpy(v) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata=dict(metadata or {}))


_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for :func:`json.loads`: a repeated key is an error, not last-wins."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _header_entry(path: Path, key: str, entry: Any, data_size: int) -> None:
    """One tensor of a safetensors header: its dtype, shape and offsets fit inside the file."""
    where = f"{path}: not a readable safetensors file: tensor {key!r}"
    if not isinstance(entry, dict) or entry.get("dtype") not in _ITEMSIZE:
        raise LoraFileError(f"{where}: header entry has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise LoraFileError(f"{where}: header shape {str(shape)[:60]} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise LoraFileError(f"{where}: header data_offsets {str(offsets)[:60]} are invalid")
    nbytes = _ITEMSIZE[entry["dtype"]]
    for d in shape:  # Python ints: no overflow, and stops growing once it is past the file
        nbytes = min(nbytes * d, data_size + 1)
    if offsets[1] > data_size or offsets[1] - offsets[0] != nbytes:
        raise LoraFileError(
            f"{where}: the header claims shape {shape} ({entry['dtype']}) at bytes {offsets}, "
            f"which the file's {data_size} data bytes do not hold (truncated or lying header)"
        )


def check_safetensors_header(path: Path) -> dict:
    """Reads and checks a safetensors file's header before any tensor is read.

    The header length, every tensor's claimed size and its offsets are checked
    against the file's size (so no read can need more memory than the file
    holds), a repeated key is refused, and every dtype must be one lora_jax
    knows. Returns the header (``{key: {"dtype", "shape", "data_offsets"}}``).

    Example:
      >>> import tempfile
      >>> p = Path(tempfile.mkdtemp()) / WEIGHTS_NAME
      >>> write_safetensors(p, {"w": np.ones((4, 2), np.float32)})
      >>> check_safetensors_header(p)["w"]["shape"]
      [4, 2]
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_HEADER):
            raise LoraFileError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): "
                f"header length {n} does not fit the file's {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LoraFileError(
            f"{path}: not a readable safetensors file: its header is not valid JSON: {e}"
        ) from None
    if not isinstance(header, dict):
        raise LoraFileError(
            f"{path}: not a readable safetensors file: its header is not a JSON object"
        )
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoraFileError(f"{path}: safetensors __metadata__ is not an object of strings")
    for key, entry in header.items():
        _header_entry(path, key, entry, size - 8 - n)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if end != size - 8 - n:
        raise LoraFileError(
            f"{path}: not a readable safetensors file: its tensors end at data byte "
            f"{end} but the file has {size - 8 - n} (truncated or appended to?)"
        )
    return header


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safetensors.safe_open`` (NumPy) with every failure turned into :class:`LoraFileError`.

    The header is checked first (:func:`check_safetensors_header`).

    Example:
      >>> import tempfile
      >>> p = Path(tempfile.mkdtemp()) / WEIGHTS_NAME
      >>> write_safetensors(p, {"w.lora_A": np.ones((4, 2), np.float32)})
      >>> with open_safetensors(p) as f:
      ...     tensor_info(f)
      {'w.lora_A': ((4, 2), 'F32')}
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: file not found")
    check_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="np")
    except Exception as e:  # SafetensorError, OSError, ...
        raise LoraFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    with handle as f:
        yield f


def read_tensor(f: Any, path: Path, key: str) -> np.ndarray:
    """One tensor from an open safetensors file; errors name the file and key."""
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise LoraFileError(f"{path}: cannot read tensor {key!r}: {e}") from None


def check_finite_array(path: Path, key: str, array: np.ndarray) -> None:
    """Raises :class:`LoraFileError` naming ``path`` and ``key`` if ``array`` has a NaN or Inf.

    Example:
      >>> check_finite_array(Path("a.safetensors"), "w.lora_A", np.array([1.0, np.inf]))
      ... # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraFileError: a.safetensors: tensor 'w.lora_A' has 1 NaN or Inf value(s) ...
    """
    if array.dtype.kind in "iub":  # integers and booleans are always finite
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise LoraFileError(
            f"{path}: tensor {key!r} has {bad} NaN or Inf value(s) (pass check_finite=False "
            "to load it anyway)"
        )


def tensor_info(f: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, safetensors dtype code)}`` from the header only (no data read)."""
    info = {}
    for key in f.keys():
        sl = f.get_slice(key)
        info[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
    return info


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def dtype_name(code_or_dtype: Any) -> str:
    """Canonical dtype name (``'float32'``, ``'bfloat16'``) of a NumPy dtype or safetensors code.

    Example:
      >>> dtype_name("BF16"), dtype_name(np.float32)
      ('bfloat16', 'float32')
    """
    if isinstance(code_or_dtype, str) and code_or_dtype in _ST_DTYPES:
        return _ST_DTYPES[code_or_dtype]
    return np.dtype(code_or_dtype).name


# --------------------------------------------------------------------------- JSON


def read_json(path: Path) -> dict:
    """Reads a JSON object; a missing or malformed file is a :class:`LoraFileError`."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSONDecodeError,
        # a repeated key, an integer too long to convert
        raise LoraFileError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def json_writer(obj: Any) -> Callable[[Path], None]:
    """A writer for :mod:`lora_jax._files.atomic` that dumps ``obj`` as indented JSON.

    Example:
      >>> import tempfile
      >>> p = Path(tempfile.mkdtemp()) / CONFIG_NAME
      >>> json_writer({"r": 8})(p)
      >>> read_json(p)
      {'r': 8}
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return write


def require(obj: Mapping, key: str, types: Any, where: str) -> Any:
    """``obj[key]``, checked to be an instance of ``types``; errors start with ``where``.

    Example:
      >>> require({"rank": "8"}, "rank", int, "adapter_config.json: target 'w'")
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraFileError: adapter_config.json: target 'w': key 'rank' has type str
    """
    if key not in obj:
        raise LoraFileError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, types):
        raise LoraFileError(f"{where}: key {key!r} has type {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- trees


def nested_from_paths(
    items: Mapping[str, Any] | Sequence[tuple[str, Any]], where: str | None = None
) -> dict:
    """A nested dict from ``'/'``-joined paths (``{"a/b": 1}`` -> ``{"a": {"b": 1}}``).

    Paths that contradict each other (one runs through another's leaf) are a
    :class:`LoraFileError`, prefixed with ``where`` (the file they came from).

    Example:
      >>> nested_from_paths({"p/d/kernel": 1, "p/d/bias": None})
      {'p': {'d': {'kernel': 1, 'bias': None}}}
    """
    prefix = f"{where}: " if where else ""
    root: dict = {}
    pairs = items.items() if isinstance(items, Mapping) else items
    for path, value in pairs:
        node = root
        keys = path.split("/")
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise LoraFileError(f"{prefix}path {path!r} runs through the leaf {k!r}")
            node = child
        if keys[-1] in node and isinstance(node[keys[-1]], dict):
            raise LoraFileError(f"{prefix}path {path!r} is both a leaf and a subtree")
        node[keys[-1]] = value
    return root


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_finite_array",
    "check_safetensors_header",
    "dtype_name",
    "input_directory",
    "json_writer",
    "nested_from_paths",
    "open_safetensors",
    "output_directory",
    "read_json",
    "read_tensor",
    "require",
    "tensor_info",
    "to_numpy",
    "write_safetensors",
]
