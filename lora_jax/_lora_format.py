"""lora_jax adapter files: a directory of ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save` writes a delta (and optionally its :class:`~lora_jax.LoraConfig`)
as two files in one directory, the same shape of artefact as a HuggingFace
PEFT adapter, but keyed by lora_jax leaf paths:

``adapter_model.safetensors``
  The factors, written with the ``safetensors`` package. For the leaf at path
  ``P`` the keys are ``P.lora_A`` (``(*stack, *fan_in, r)``), ``P.lora_B``
  (``(*stack, r, *fan_out)``) and, for DoRA, ``P.magnitude``
  (``(*stack, *fan_out)``); a leaf trained in full (a
  :class:`~lora_jax.LeafDelta`) is ``P.diff``. Each keeps its dtype (float32
  and bfloat16 round-trip exactly).

``adapter_config.json``
  ``format`` / ``format_version``, the ``library_version`` that wrote it, a
  ``save_id`` (also in the tensor file's metadata), the tensor file's
  ``sha256``, the :class:`~lora_jax.LoraConfig` (or null), ``tree`` (every
  leaf path of the delta, so a delta can be rebuilt without its base), and
  per target: ``rank``, ``alpha``, ``rslora``, ``scaling``,
  ``layout`` (axes and kind), ``kernel_shape``, ``dtype`` and each tensor's
  key, shape and dtype.

Writes are atomic per file (temporary file in the same directory, flush,
``fsync``, ``os.replace``, then ``fsync`` of the directory); the tensor file is
replaced first and the config last, and both carry the save's ``save_id``, so
an interrupted save leaves the previous adapter loadable, and the only state a
crash can leave that is not a complete adapter (new tensors, old config: a
crash between the two renames) is refused by :func:`load` rather than
half-read. Other files in the directory are left alone.

:func:`load` validates everything it reads and raises :class:`LoraFileError`
naming the file and the key: unknown format version, missing or extra
tensors, shapes or dtypes that contradict the config, truncated or corrupt
files, and (when a base is given) targets missing from the base or of the
wrong shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._config import LoraConfig
from lora_jax._errors import LoraBaseMismatchError, LoraError, LoraFileError, LoraStructureError
from lora_jax._delta import LayerSelection, LeafDelta, LoraFactors, delta_entries, lora_scale
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
SUFFIXES = {"a": "lora_A", "b": "lora_B", "magnitude": "magnitude", "diff": "diff"}


# --------------------------------------------------------------------------- atomic files


def fsync_dir(directory: Path) -> None:
    """``fsync`` a directory so renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_file(target: Path, write: Callable[[Path], None]) -> Path:
    """Writes a temporary sibling of ``target`` with ``write(tmp)``, flushed and fsynced.

    Returns the temporary path; :func:`commit_file` moves it into place. On any
    error the temporary file is removed and the error re-raised; ``target`` is
    never touched.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def commit_file(tmp: Path, target: Path) -> None:
    """Atomically renames a staged file over ``target`` (``os.replace``)."""
    os.replace(tmp, target)


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Writes ``target`` atomically: stage a temporary sibling, fsync, rename, fsync the directory.

    Example:
      >>> import tempfile, pathlib
      >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
      >>> atomic_write(p, lambda tmp: tmp.write_text("hi"))
      >>> p.read_text()
      'hi'
    """
    target = Path(target)
    tmp = stage_file(target, write)
    try:
        commit_file(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- safetensors


def to_numpy(x: Any) -> np.ndarray:
    """A C-contiguous host copy of an array (safetensors reads raw buffers)."""
    return np.ascontiguousarray(np.asarray(x))


def write_safetensors(
    path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``{key: array}`` to ``path`` with the ``safetensors`` package (not atomic)."""
    from safetensors.numpy import save_file

    arrays = {k: to_numpy(v) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata=dict(metadata or {}))


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safetensors.safe_open`` (NumPy) with every failure turned into :class:`LoraFileError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: file not found")
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


def tensor_info(f: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, safetensors dtype code)}`` from the header only (no data read)."""
    info = {}
    for key in f.keys():
        sl = f.get_slice(key)
        info[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
    return info


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(code_or_dtype: Any) -> str:
    """Canonical dtype name (``'float32'``, ``'bfloat16'``) of a NumPy dtype or safetensors code."""
    if isinstance(code_or_dtype, str) and code_or_dtype in _ST_DTYPES:
        return _ST_DTYPES[code_or_dtype]
    return np.dtype(code_or_dtype).name


def read_json(path: Path) -> dict:
    """Reads a JSON object; a missing or malformed file is a :class:`LoraFileError`."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraFileError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: Path, obj: Any) -> Callable[[Path], None]:
    """A writer for :func:`stage_file` that dumps ``obj`` as indented JSON."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return write


# --------------------------------------------------------------------------- tree helpers


def nested_from_paths(items: Mapping[str, Any] | list[tuple[str, Any]]) -> dict:
    """A nested dict from ``'/'``-joined paths (``{"a/b": 1}`` -> ``{"a": {"b": 1}}``).

    Example:
      >>> nested_from_paths({"p/d/kernel": 1, "p/d/bias": None})
      {'p': {'d': {'kernel': 1, 'bias': None}}}
    """
    root: dict = {}
    pairs = items.items() if isinstance(items, Mapping) else items
    for path, value in pairs:
        node = root
        keys = path.split("/")
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise LoraFileError(f"path {path!r} runs through the leaf {k!r}")
            node = child
        if keys[-1] in node and isinstance(node[keys[-1]], dict):
            raise LoraFileError(f"path {path!r} is both a leaf and a subtree")
        node[keys[-1]] = value
    return root


# --------------------------------------------------------------------------- config (JSON)


def _jsonable(value: Any) -> Any:
    if isinstance(value, KernelLayout):
        return {"axes": value.axes, "kind": value.kind}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def config_to_json(config: LoraConfig | None) -> dict | None:
    """A JSON-able dict of a :class:`LoraConfig`'s fields.

    ``dtype`` is stored by name; a callable ``targets`` (or any other field
    JSON cannot hold) is stored as null and listed under ``"unserializable"``.

    Example:
      >>> config_to_json(LoraConfig(targets="w", rank=4))["rank"]
      4
    """
    if config is None:
        return None
    out: dict[str, Any] = {}
    lost = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        try:
            out[field.name] = np.dtype(value).name if field.name == "dtype" else _jsonable(value)
        except TypeError:
            out[field.name] = None
            lost.append(field.name)
    if lost:
        out["unserializable"] = lost
    return out


def config_from_json(obj: dict | None, where: str) -> LoraConfig | None:
    """Rebuilds a :class:`LoraConfig`; None if absent or if a field could not be saved.

    Fields this lora_jax does not know (written by a newer one) are ignored.
    """
    if obj is None or obj.get("unserializable") or obj.get("targets") is None:
        return None
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs: dict[str, Any] = {}
    try:
        for name, value in obj.items():
            if name not in known:
                continue
            if name == "layouts":
                value = {k: KernelLayout(v["axes"], v.get("kind", "dense"))
                         for k, v in value.items()}
            elif name == "dtype":
                value = jnp.dtype(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return LoraConfig(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoraFileError(f"{where}: key 'config' does not describe a LoraConfig: {e}") from None


# --------------------------------------------------------------------------- save


def save(path: str | os.PathLike, delta: Any, config: LoraConfig | None = None) -> Path:
    """Saves a delta as a lora_jax adapter directory (atomically, file by file).

    Args:
      path: the adapter directory; created if missing. Existing
        ``adapter_config.json`` / ``adapter_model.safetensors`` are replaced
        atomically; other files in it are left alone.
      delta: a delta (``LoraFactors`` or ``None`` at each leaf), e.g. from
        :func:`lora_jax.init_lora` after training. ``a: (*stack, *fan_in, r)``,
        ``b: (*stack, r, *fan_out)``, optional ``magnitude: (*stack, *fan_out)``.
      config: the :class:`LoraConfig` it was made with (recorded for
        reference and returned by :func:`load`), or None.

    Returns:
      The directory path.

    Example:
      >>> import tempfile
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> cfg = LoraConfig(targets=".*kernel", rank=2)
      >>> base, delta = init_lora(jax.random.key(0), params, cfg)
      >>> d = save(tempfile.mkdtemp() + "/adapter", delta, cfg)
      >>> sorted(p.name for p in d.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> loaded, cfg2 = load(d, base=params)
      >>> loaded["dense"]["kernel"].a.shape, loaded["dense"]["bias"], cfg2 == cfg
      ((4, 2), None, True)
    """
    from lora_jax import __version__

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise LoraFileError(f"{directory}: exists and is not a directory")
    entries = delta_entries(delta)
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, dict] = {}
    for leaf_path, f in entries:
        if f is None:
            continue
        full = isinstance(f, LeafDelta)
        arrays = {"diff": f.diff} if full else {"a": f.a, "b": f.b, "magnitude": f.magnitude}
        meta_tensors = {}
        for field, arr in arrays.items():
            if arr is None:
                continue
            key = f"{leaf_path}.{SUFFIXES[field]}"
            host = to_numpy(arr)
            tensors[key] = host
            meta_tensors[field] = {"key": key, "shape": list(host.shape), "dtype": host.dtype.name}
        if full:
            targets[leaf_path] = {
                "type": "full",
                "kernel_shape": list(f.kernel_shape),
                "dtype": meta_tensors["diff"]["dtype"],
                "tensors": meta_tensors,
            }
            continue
        targets[leaf_path] = {
            "type": "lora",
            "rank": f.rank,
            "alpha": float(f.alpha),
            "rslora": bool(f.rslora),
            "scaling": float(f.scale),
            "layout": {"axes": f.layout.axes, "kind": f.layout.kind},
            "kernel_shape": list(f.kernel_shape),
            "dtype": meta_tensors["a"]["dtype"],
            "dora": f.magnitude is not None,
            "layers": None if f.layers is None else list(f.layers.indices),
            "num_layers": None if f.layers is None else f.layers.total,
            "tensors": meta_tensors,
        }
    directory.mkdir(parents=True, exist_ok=True)
    weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    save_id = uuid.uuid4().hex
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id}
    staged = [stage_file(weights, lambda tmp: write_safetensors(tmp, tensors, metadata))]
    try:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "save_id": save_id,
            "sha256": sha256_file(staged[0]),
            "config": config_to_json(config),
            "tree": [p for p, _ in entries],
            "targets": targets,
        }
        staged.append(stage_file(cfg_path, write_json(cfg_path, doc)))
        # Tensors first, config last: the config (with the tensors' sha256) is the commit.
        commit_file(staged[0], weights)
        commit_file(staged[1], cfg_path)
    except BaseException:
        for tmp in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    fsync_dir(directory)
    return directory


# --------------------------------------------------------------------------- load


def _require(obj: Mapping, key: str, types: Any, where: str) -> Any:
    if key not in obj:
        raise LoraFileError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, types):
        raise LoraFileError(f"{where}: key {key!r} has type {type(value).__name__}")
    return value


def read_config(directory: Path) -> dict:
    """Reads and checks the header fields of a lora_jax ``adapter_config.json``."""
    cfg_path = Path(directory) / CONFIG_NAME
    doc = read_json(cfg_path)
    if doc.get("format") != FORMAT:
        hint = (" It is a HuggingFace PEFT adapter: use lora_jax.import_peft."
                if "peft_type" in doc else "")
        raise LoraFileError(
            f"{cfg_path}: key 'format' is {doc.get('format')!r}, expected {FORMAT!r}.{hint}"
        )
    version = doc.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise LoraFileError(
            f"{cfg_path}: key 'format_version' is {version!r}; this lora_jax reads format "
            f"version(s) {list(SUPPORTED_VERSIONS)} (written by a newer lora_jax? upgrade it)"
        )
    _require(doc, "targets", dict, str(cfg_path))
    _require(doc, "tree", list, str(cfg_path))
    return doc


def _target_meta(
    cfg_path: Path, leaf: str, meta: Any
) -> tuple[KernelLayout, int, float, bool] | None:
    """Checks one target's entry: ``(layout, rank, alpha, rslora)``, or None for a full leaf."""
    where = f"{cfg_path}: target {leaf!r}"
    if not isinstance(meta, dict):
        raise LoraFileError(f"{where}: expected an object")
    kind = meta.get("type", "lora")
    if kind == "full":
        _require(meta, "kernel_shape", list, where)
        return None
    if kind != "lora":
        raise LoraFileError(f"{where}: key 'type' is {kind!r}, expected 'lora' or 'full'")
    rank = _require(meta, "rank", int, where)
    alpha = _require(meta, "alpha", (int, float), where)
    rslora = _require(meta, "rslora", bool, where)
    layout_obj = _require(meta, "layout", dict, where)
    try:
        layout = KernelLayout(layout_obj["axes"], layout_obj.get("kind", "dense"))
    except (KeyError, LoraError) as e:
        raise LoraFileError(f"{where}: key 'layout' is invalid: {e}") from None
    shape = tuple(_require(meta, "kernel_shape", list, where))
    if len(shape) != layout.ndim:
        raise LoraFileError(
            f"{where}: key 'kernel_shape' {list(shape)} has {len(shape)} axes but layout "
            f"{layout.axes!r} has {layout.ndim}"
        )
    scaling = meta.get("scaling")
    want = lora_scale(alpha, rank, rslora)
    if scaling is not None and not math.isclose(float(scaling), want, rel_tol=1e-6):
        raise LoraFileError(
            f"{where}: key 'scaling' is {scaling} but alpha={alpha}, rank={rank}, "
            f"rslora={rslora} give {want}"
        )
    return layout, rank, float(alpha), rslora


def _layers_meta(cfg_path: Path, leaf: str, meta: dict, layout: KernelLayout,
                 shape: tuple[int, ...]) -> LayerSelection | None:
    layers = meta.get("layers")
    if layers is None:
        return None
    where = f"{cfg_path}: target {leaf!r}: key 'layers'"
    if not layout.stack_axes:
        raise LoraFileError(f"{where} is set but layout {layout.axes!r} has no stacked axis")
    n = shape[layout.stack_axes[0]]
    if (not isinstance(layers, list) or not layers or layers != sorted(set(layers))
            or any(not isinstance(i, int) or not 0 <= i < n for i in layers)):
        raise LoraFileError(f"{where} is {layers!r}; expected distinct sorted indices below {n}")
    if meta.get("num_layers") not in (None, n):
        raise LoraFileError(
            f"{cfg_path}: target {leaf!r}: key 'num_layers' is {meta['num_layers']}, but "
            f"kernel_shape {list(shape)} has {n} layers"
        )
    return LayerSelection(tuple(layers), n)


def load(
    path: str | os.PathLike,
    base: Any = None,
    *,
    verify: bool = True,
) -> tuple[Any, LoraConfig | None]:
    """Loads and validates a lora_jax adapter directory written by :func:`save`.

    Args:
      path: the adapter directory.
      base: optional params pytree (arrays or ``jax.ShapeDtypeStruct``). When
        given, every target must be a leaf of it with the recorded kernel
        shape, and the delta gets the base's exact tree structure (``None`` at
        every other leaf; NNX states keep their type). Without it the delta is
        a nested dict rebuilt from the recorded leaf paths.
      verify: check the tensor file's sha256 against the config (catches
        corrupt tensor data the safetensors header cannot); on by default.

    Returns:
      ``(delta, config)``: factors as JAX arrays in their saved dtypes; the
      saved :class:`LoraConfig`, or None if none was saved (or its targets
      were a callable).

    Raises:
      LoraFileError: a file is missing, truncated or corrupt; unknown format
        version; a tensor is missing, extra, or has a shape or dtype the config
        contradicts. :class:`LoraBaseMismatchError` (also a
        :class:`~lora_jax.LoraStructureError`) when a target is not a leaf of
        ``base`` or has another shape. Messages name the file and the key.

    Example:
      >>> import tempfile
      >>> params = {"w": jnp.ones((4, 4))}
      >>> _, delta = init_lora(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
      >>> d = save(tempfile.mkdtemp(), delta)
      >>> load(d, base={"v": jnp.ones((4, 4))})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax._lora_format.LoraBaseMismatchError: ...: target 'w' is not a leaf of the base ...
    """
    directory = Path(path)
    if not directory.is_dir():
        raise LoraFileError(f"{directory}: adapter directory not found")
    doc = read_config(directory)
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    targets = doc["targets"]

    metas = {leaf: _target_meta(cfg_path, leaf, meta) for leaf, meta in targets.items()}
    expected: dict[str, tuple[str, str, tuple[int, ...], str]] = {}
    for leaf, meta in targets.items():
        tensors = _require(meta, "tensors", dict, f"{cfg_path}: target {leaf!r}")
        if metas[leaf] is None:
            fields: tuple[str, ...] = ("diff",)
        else:
            fields = ("a", "b", "magnitude") if meta.get("dora") else ("a", "b")
        for field in fields:
            t = _require(tensors, field, dict, f"{cfg_path}: target {leaf!r} tensors")
            expected[t.get("key", f"{leaf}.{SUFFIXES[field]}")] = (
                leaf, field, tuple(t.get("shape", ())), str(t.get("dtype")))

    arrays: dict[str, dict[str, np.ndarray]] = {leaf: {} for leaf in targets}
    with open_safetensors(weights) as f:
        written_by = (f.metadata() or {}).get("save_id")
        if written_by and doc.get("save_id") and written_by != doc["save_id"]:
            raise LoraFileError(
                f"{weights}: written by another save than {CONFIG_NAME} (key 'save_id' differs): "
                "a save was interrupted between its two renames, or the files were mixed"
            )
        info = tensor_info(f)
        missing = [k for k in expected if k not in info]
        if missing:
            raise LoraFileError(
                f"{weights}: tensor {missing[0]!r} listed in {CONFIG_NAME} is missing "
                f"({len(missing)} missing in all)"
            )
        extra = [k for k in info if k not in expected]
        if extra:
            raise LoraFileError(
                f"{weights}: tensor {extra[0]!r} is not listed in {CONFIG_NAME} "
                f"({len(extra)} extra in all)"
            )
        for key, (leaf, field, shape, dtype) in expected.items():
            got_shape, code = info[key]
            if got_shape != shape:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} has shape {got_shape} but {CONFIG_NAME} "
                    f"says {shape}"
                )
            if dtype_name(code) != dtype:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} has dtype {dtype_name(code)} but "
                    f"{CONFIG_NAME} says {dtype}"
                )
            arrays[leaf][field] = read_tensor(f, weights, key)
    if verify and "sha256" in doc and sha256_file(weights) != doc["sha256"]:
        raise LoraFileError(
            f"{weights}: its sha256 does not match key 'sha256' of {CONFIG_NAME}: the file is "
            "corrupt or was modified after it was saved"
        )

    factors: dict[str, Any] = {}
    for leaf, meta in metas.items():
        shape = tuple(targets[leaf]["kernel_shape"])
        if meta is None:
            diff = arrays[leaf]["diff"]
            if diff.shape != shape:
                raise LoraFileError(
                    f"{weights}: tensor {leaf}.diff has shape {diff.shape}, but kernel_shape "
                    f"in {CONFIG_NAME} is {list(shape)}"
                )
            factors[leaf] = LeafDelta(jnp.asarray(diff))
            continue
        layout, rank, alpha, rslora = meta
        want_a, want_b = layout.factor_shapes(shape, rank)
        layers = _layers_meta(cfg_path, leaf, targets[leaf], layout, shape)
        if layers is not None:  # a, b, magnitude hold only those layers of the first stacked axis
            n = len(layers.indices)
            want_a, want_b = (n,) + want_a[1:], (n,) + want_b[1:]
        got = arrays[leaf]
        for field, want in (("a", want_a), ("b", want_b)):
            if got[field].shape != want:
                raise LoraFileError(
                    f"{weights}: tensor {leaf}.{SUFFIXES[field]} has shape {got[field].shape}, "
                    f"but rank {rank} and kernel_shape {list(shape)} (layout {layout.axes!r}) "
                    f"in {CONFIG_NAME} need {want}"
                )
        magnitude = got.get("magnitude")
        if magnitude is not None:
            want_m = want_b[: len(layout.stack_axes)] + want_b[len(layout.stack_axes) + 1 :]
            if magnitude.shape != want_m:
                raise LoraFileError(
                    f"{weights}: tensor {leaf}.magnitude has shape {magnitude.shape}, expected "
                    f"{want_m} (*stack, *fan_out)"
                )
        factors[leaf] = LoraFactors(
            jnp.asarray(got["a"]), jnp.asarray(got["b"]), alpha=alpha, layout=layout,
            rslora=rslora, magnitude=None if magnitude is None else jnp.asarray(magnitude),
            layers=layers,
        )

    config = config_from_json(doc.get("config"), str(cfg_path))
    if base is None:
        tree = [p for p in doc["tree"] if isinstance(p, str)]
        unknown = [leaf for leaf in factors if leaf not in set(tree)]
        if unknown:
            raise LoraFileError(f"{cfg_path}: target {unknown[0]!r} is not listed in key 'tree'")
        return nested_from_paths([(p, factors.get(p)) for p in tree]), config
    return attach_to_base(factors, base, cfg_path), config


def attach_to_base(factors: Mapping[str, Any], base: Any, source: Any) -> Any:
    """Places ``{path: LoraFactors | LeafDelta}`` into a delta with ``base``'s tree structure.

    Raises :class:`LoraBaseMismatchError` (naming ``source`` and the path) when a
    path is not a leaf of ``base`` or the factors do not fit its shape.
    """
    leaves, treedef = leaves_with_paths(base)
    shapes = {p: tuple(getattr(leaf, "shape", np.shape(leaf))) for p, leaf in leaves}
    for leaf, f in factors.items():
        if leaf not in shapes:
            near = [p for p in shapes if p.rsplit("/", 1)[-1] == leaf.rsplit("/", 1)[-1]]
            raise LoraBaseMismatchError(
                f"{source}: target {leaf!r} is not a leaf of the base (base leaves: "
                f"{(near or list(shapes))[:6]})"
            )
        want = f.kernel_shape
        if shapes[leaf] != want:
            raise LoraBaseMismatchError(
                f"{source}: target {leaf!r} is for a kernel of shape {want}, but the base leaf "
                f"has shape {shapes[leaf]}"
            )
    return jax.tree_util.tree_unflatten(treedef, [factors.get(p) for p, _ in leaves])


def describe(path: str | os.PathLike) -> list[dict]:
    """One row per target of a lora_jax adapter, from the config alone (for ``lora-jax inspect``).

    Each row: ``target``, ``kind``, ``shape`` (kernel), ``rank``, ``alpha``,
    ``scaling``, ``dtype``, ``params``, ``dora``.
    """
    directory = Path(path)
    doc = read_config(directory)
    rows = []
    for leaf, meta in doc["targets"].items():
        full = _target_meta(directory / CONFIG_NAME, leaf, meta) is None
        tensors = meta.get("tensors", {})
        params = sum(math.prod(t.get("shape", ())) for t in tensors.values())
        if full:
            rows.append({"target": leaf, "kind": "full", "shape": tuple(meta["kernel_shape"]),
                         "layout": "-", "rank": 0, "alpha": 0.0, "scaling": 0.0,
                         "dtype": meta.get("dtype", "?"), "params": int(params), "dora": False})
            continue
        rows.append({
            "target": leaf,
            "kind": meta["layout"].get("kind", "dense"),
            "shape": tuple(meta["kernel_shape"]),
            "layout": meta["layout"]["axes"],
            "rank": meta["rank"],
            "alpha": meta["alpha"],
            "scaling": meta.get("scaling", 0.0),
            "dtype": meta.get("dtype", "?"),
            "params": int(params),
            "dora": bool(meta.get("dora")),
        })
    return rows


__all__ = [
    "LoraBaseMismatchError",
    "LoraFileError",
    "describe",
    "load",
    "save",
]
