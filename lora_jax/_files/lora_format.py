"""lora_jax adapter files: a directory of ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save` writes a delta (and optionally its :class:`~lora_jax.LoraConfig`)
as two files in one directory, the same shape of artefact as a HuggingFace
PEFT adapter, but keyed by lora_jax leaf paths:

``adapter_model.safetensors``
  The factors, written with the ``safetensors`` package. For the leaf at path
  ``P`` the keys are ``P.lora_A`` (``(*stack, *fan_in, r)``), ``P.lora_B``
  (``(*stack, r, *fan_out)``) and, for DoRA, ``P.magnitude``
  (``(*stack, *fan_out)``); a leaf trained in full (a
  :class:`~lora_jax.LeafDelta`) is ``P.diff``, a LoRA bias
  (:class:`~lora_jax.LoraBias`, at a bias leaf) ``P.lora_bias`` (type
  ``"lora_bias"``, with its ``scale``) and trainable token rows
  (:class:`~lora_jax.TokenRows`) ``P.diff`` of shape ``(k, dim)`` (type
  ``"tokens"``, with the row ``indices``). Each keeps its dtype (float32
  and bfloat16 round-trip exactly).

``adapter_config.json``
  ``format`` / ``format_version``, the ``library_version`` that wrote it, a
  ``save_id`` (also in the tensor file's metadata), the tensor file's
  ``sha256``, the :class:`~lora_jax.LoraConfig` (or null), ``tree`` (every
  leaf path of the delta, so a delta can be rebuilt without its base), and
  per target: ``rank``, ``alpha``, ``rslora``, ``scaling``,
  ``layout`` (axes and kind), ``kernel_shape``, ``dtype`` and each tensor's
  key, shape and dtype.

Writes are atomic per file (:mod:`lora_jax._files.atomic`: temporary file in the
same directory, flush, ``fsync``, ``os.replace``, then ``fsync`` of the
directory); the tensor file is replaced first and the config last, and both
carry the save's ``save_id``. Before the renames the previous tensor file is
hard-linked to ``.adapter_model.safetensors.<previous save_id>`` (removed once
the config is in place), so a kill at any point leaves a loadable adapter:
the previous one until the config's rename, the new one after it. A tensor
file that matches no config is refused by :func:`load` rather than half-read.
Other files in the directory are left alone.

:func:`load` validates everything it reads and raises :class:`LoraFileError`
naming the file and the key: unknown format version, missing or extra
tensors, shapes or dtypes that contradict the config, truncated or corrupt
files, and (when a base is given) targets missing from the base or of the
wrong shape (:class:`LoraBaseMismatchError`). It runs in four steps, one
function each: check the config (:func:`read_config`, :func:`check_target`),
read the tensors it lists (:func:`read_tensors`), build each target's
factors (:func:`build_target`), and place them in a tree (:func:`place`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._config import LoraConfig
from lora_jax._delta import (
    LayerSelection,
    LeafDelta,
    LoraBias,
    LoraFactors,
    TokenRows,
    delta_entries,
    lora_scale,
)
from lora_jax._errors import LoraBaseMismatchError, LoraError, LoraFileError, LoraStructureError
from lora_jax._files.atomic import StagedFiles, fsync_dir, sha256_file
from lora_jax._files.config_json import config_from_json, config_to_json
from lora_jax._files.safetensors_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_finite_array,
    dtype_name,
    input_directory,
    json_writer,
    nested_from_paths,
    open_safetensors,
    output_directory,
    read_json,
    read_tensor,
    require,
    tensor_info,
    to_numpy,
    write_safetensors,
)
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths
from lora_jax._segments import check_fits as check_segment_fit

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
SUFFIXES = {
    "a": "lora_A",
    "b": "lora_B",
    "magnitude": "magnitude",
    "diff": "diff",
    "bias": "lora_bias",
}

TensorEntry = tuple[str, tuple[int, ...], str]
"""A tensor as the config lists it: ``(key, shape, dtype name)``."""


# --------------------------------------------------------------------------- save


def _target_tensors(
    leaf_path: str, f: LoraFactors | LeafDelta
) -> dict[str, tuple[str, np.ndarray]]:
    """``{field: (safetensors key, host array)}`` of one target (``P.lora_A``, ``P.lora_B``...)."""
    if isinstance(f, (LeafDelta, TokenRows)):
        arrays = {"diff": f.diff}
    elif isinstance(f, LoraBias):
        arrays = {"bias": f.b}
    else:
        arrays = {"a": f.a, "b": f.b, "magnitude": f.magnitude}
    return {
        field: (f"{leaf_path}.{SUFFIXES[field]}", to_numpy(arr))
        for field, arr in arrays.items()
        if arr is not None
    }


def _target_entry(
    f: LoraFactors | LeafDelta, tensors: Mapping[str, tuple[str, np.ndarray]]
) -> dict:
    """The config's entry for one target, given its tensors from :func:`_target_tensors`."""
    listed = {
        field: {"key": key, "shape": list(x.shape), "dtype": x.dtype.name}
        for field, (key, x) in tensors.items()
    }
    value_entry = _value_entry(f, listed)
    if value_entry is not None:
        return value_entry
    if isinstance(f, LeafDelta):
        return {
            "type": "full",
            "kernel_shape": list(f.kernel_shape),
            "dtype": listed["diff"]["dtype"],
            "tensors": listed,
        }
    return {
        "type": "lora",
        "rank": f.rank,
        "alpha": float(f.alpha),
        "rslora": bool(f.rslora),
        "scaling": float(f.scale),
        "layout": {"axes": f.layout.axes, "kind": f.layout.kind},
        "kernel_shape": list(f.kernel_shape),
        "dtype": listed["a"]["dtype"],
        "dora": f.magnitude is not None,
        "layers": None if f.layers is None else list(f.layers.indices),
        "num_layers": None if f.layers is None else f.layers.total,
        "segments": None if f.segments is None else list(f.segments),
        "tensors": listed,
    }


def _value_entry(f: Any, listed: dict) -> dict | None:
    """The config entry of a :class:`LoraBias` or :class:`TokenRows` (None for other entries)."""
    if isinstance(f, LoraBias):
        return {
            "type": "lora_bias",
            "scale": float(f.scale),
            "kernel_shape": list(f.kernel_shape),
            "dtype": listed["bias"]["dtype"],
            "tensors": listed,
        }
    if isinstance(f, TokenRows):
        return {
            "type": "tokens",
            "indices": list(f.indices),
            "kernel_shape": list(np.shape(f.diff)),
            "dtype": listed["diff"]["dtype"],
            "tensors": listed,
        }
    return None


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
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> cfg = lj.LoraConfig(targets=".*kernel", rank=2)
      >>> base, delta = lj.init_lora(jax.random.key(0), params, cfg)
      >>> d = lj.save(tempfile.mkdtemp() + "/adapter", delta, cfg)
      >>> sorted(p.name for p in d.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> loaded, cfg2 = lj.load(d, base=params)
      >>> loaded["dense"]["kernel"].a.shape, loaded["dense"]["bias"], cfg2 == cfg
      ((4, 2), None, True)
    """
    from lora_jax import __version__

    entries = delta_entries(delta)
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, dict] = {}
    for leaf_path, f in entries:
        if f is not None:
            leaf_tensors = _target_tensors(leaf_path, f)
            tensors.update(leaf_tensors.values())
            targets[leaf_path] = _target_entry(f, leaf_tensors)
    directory = output_directory(path)
    previous_id = _current_save_id(directory)
    save_id = uuid.uuid4().hex
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id}
    with StagedFiles(directory) as files:
        staged = files.stage(WEIGHTS_NAME, lambda tmp: write_safetensors(tmp, tensors, metadata))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "save_id": save_id,
            "sha256": sha256_file(staged),
            "config": config_to_json(config),
            "tree": [p for p, _ in entries],
            "targets": targets,
        }
        files.stage(CONFIG_NAME, json_writer(doc))
        _keep_previous_tensors(directory, previous_id)
        files.commit()  # tensors first, config last: the config (with the tensors' sha256) commits
    _drop_kept_tensors(directory)
    return directory


def _kept_name(save_id: str) -> str:
    """The hidden name under which a save keeps the previous save's tensors until it commits."""
    return f".{WEIGHTS_NAME}.{save_id}"


def _current_save_id(directory: Path) -> str | None:
    """The ``save_id`` of the adapter now in ``directory`` (None if there is none or it is bad)."""
    try:
        save_id = read_json(directory / CONFIG_NAME).get("save_id")
    except LoraFileError:
        return None
    ok = isinstance(save_id, str) and save_id.isalnum() and len(save_id) <= 64
    return save_id if ok and (directory / WEIGHTS_NAME).is_file() else None


def _keep_previous_tensors(directory: Path, previous_id: str | None) -> None:
    """Hard-links (or copies) the previous save's tensor file to a hidden name before the new
    one replaces it: a kill between the two renames (new tensors, previous config) then still
    leaves the previous adapter loadable (:func:`load` reads the kept file)."""
    if previous_id is None:
        return
    kept = directory / _kept_name(previous_id)
    if kept.is_file():  # an earlier save was killed after its tensors' rename: this is the one
        return
    try:
        os.link(directory / WEIGHTS_NAME, kept)
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(directory / WEIGHTS_NAME, kept)
    fsync_dir(directory)


def _drop_kept_tensors(directory: Path) -> None:
    """Removes every kept tensor file (the save they protected has committed)."""
    for kept in directory.glob(f".{WEIGHTS_NAME}.*"):
        if "tmp-" not in kept.name:
            kept.unlink(missing_ok=True)


def _tensor_file(directory: Path, doc: dict) -> Path:
    """The tensor file of the config's save: ``adapter_model.safetensors``, or the previous
    save's tensors kept by a save that was killed between its two renames."""
    weights = directory / WEIGHTS_NAME
    save_id = doc.get("save_id")
    if not isinstance(save_id, str) or not save_id.isalnum() or len(save_id) > 64:
        return weights
    kept = directory / _kept_name(save_id)
    return kept if kept.is_file() else weights


# --------------------------------------------------------------------------- load: the config


def read_config(directory: Path) -> dict:
    """Reads and checks the header fields of a lora_jax ``adapter_config.json``."""
    cfg_path = Path(directory) / CONFIG_NAME
    doc = read_json(cfg_path)
    if doc.get("format") != FORMAT:
        hint = (
            " It is a HuggingFace PEFT adapter: use lora_jax.import_peft."
            if "peft_type" in doc
            else ""
        )
        raise LoraFileError(
            f"{cfg_path}: key 'format' is {doc.get('format')!r}, expected {FORMAT!r}.{hint}"
        )
    version = doc.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise LoraFileError(
            f"{cfg_path}: key 'format_version' is {version!r}; this lora_jax reads format "
            f"version(s) {list(SUPPORTED_VERSIONS)} (written by a newer lora_jax? upgrade it)"
        )
    require(doc, "targets", dict, str(cfg_path))
    require(doc, "tree", list, str(cfg_path))
    return doc


@dataclasses.dataclass(frozen=True)
class TargetEntry:
    """One target of ``adapter_config.json``, checked: what its tensors must be.

    Attributes:
      leaf: the leaf path.
      kernel_shape: the shape of the kernel (or, for a full leaf, the leaf).
      tensors: ``{field: (key, shape, dtype)}`` with fields ``"a"``, ``"b"``
        (and ``"magnitude"`` for DoRA), or ``"diff"`` for a full leaf.
      layout: the kernel's layout; None for a leaf trained in full.
      rank, alpha, rslora: the LoRA hyperparameters (unused for a full leaf).
      layers: the stacked layers the factors hold, if not all.
      kind: the entry's ``type``: ``"lora"``, ``"full"``, ``"lora_bias"`` or ``"tokens"``.
      scale: a LoRA bias's scale ``s``.
      indices: trainable token rows' indices (``kernel_shape`` is then ``(k, dim)``).
      segments: a fused kernel's per-projection sizes (``rank`` is then the joint rank).
    """

    leaf: str
    kernel_shape: tuple[int, ...]
    tensors: dict[str, TensorEntry]
    layout: KernelLayout | None = None
    rank: int = 0
    alpha: float = 0.0
    rslora: bool = False
    layers: LayerSelection | None = None
    kind: str = "lora"
    scale: float = 0.0
    indices: tuple[int, ...] = ()
    segments: tuple[int, ...] | None = None


def check_target(cfg_path: Path, leaf: str, meta: Any) -> TargetEntry:
    """Checks one entry of the config's ``targets``; errors name ``cfg_path`` and the key."""
    where = f"{cfg_path}: target {leaf!r}"
    if not isinstance(meta, dict):
        raise LoraFileError(f"{where}: expected an object")
    kind = meta.get("type", "lora")
    if kind not in ("lora", "full", "lora_bias", "tokens"):
        raise LoraFileError(
            f"{where}: key 'type' is {str(kind)[:40]!r}, expected 'lora', 'full', 'lora_bias' "
            "or 'tokens'"
        )
    if kind in ("lora_bias", "tokens"):
        return _check_value_target(where, leaf, meta, kind)
    if kind == "full":
        shape = _sizes(where, "kernel_shape", require(meta, "kernel_shape", list, where))
        return TargetEntry(leaf, shape, _listed_tensors(where, leaf, meta, ("diff",)))
    rank = require(meta, "rank", int, where)
    alpha = require(meta, "alpha", (int, float), where)
    rslora = require(meta, "rslora", bool, where)
    if isinstance(rank, bool) or rank < 1:
        raise LoraFileError(f"{where}: key 'rank' is {rank!r}; expected an integer >= 1")
    if isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraFileError(f"{where}: key 'alpha' is {alpha!r}; expected a finite number > 0")
    layout, shape = _checked_layout(where, meta)
    segments = _checked_segments(where, meta, layout, shape, rank)
    scaling = meta.get("scaling")
    want = lora_scale(alpha, rank // len(segments or (1,)), rslora)
    if scaling is not None and (
        not isinstance(scaling, (int, float))
        or isinstance(scaling, bool)
        or not math.isclose(scaling, want, rel_tol=1e-6)
    ):
        raise LoraFileError(
            f"{where}: key 'scaling' is {str(scaling)[:40]} but alpha={alpha}, rank={rank}, "
            f"rslora={rslora} give {want}"
        )
    fields = ("a", "b", "magnitude") if meta.get("dora") else ("a", "b")
    return TargetEntry(
        leaf,
        shape,
        _listed_tensors(where, leaf, meta, fields),
        layout,
        rank,
        float(alpha),
        rslora,
        _checked_layers(where, meta, layout, shape),
        segments=segments,
    )


def _check_value_target(where: str, leaf: str, meta: dict, kind: str) -> TargetEntry:
    """A ``"lora_bias"`` (finite ``scale``) or ``"tokens"`` (distinct ``indices`` >= 0, one per
    row of ``kernel_shape`` ``(k, dim)``) entry."""
    shape = _sizes(where, "kernel_shape", require(meta, "kernel_shape", list, where))
    if kind == "lora_bias":
        scale = require(meta, "scale", (int, float), where)
        if isinstance(scale, bool) or not math.isfinite(scale):
            raise LoraFileError(f"{where}: key 'scale' is {scale!r}; expected a finite number")
        tensors = _listed_tensors(where, leaf, meta, ("bias",))
        return TargetEntry(leaf, shape, tensors, kind=kind, scale=float(scale))
    indices = require(meta, "indices", list, where)
    if (
        len(shape) != 2
        or len(indices) != shape[0]
        or not all(type(i) is int and i >= 0 for i in indices)
        or len(set(indices)) != len(indices)
    ):
        raise LoraFileError(
            f"{where}: key 'indices' is {str(indices)[:60]}; expected {shape[0] if shape else 0} "
            f"distinct row indices >= 0 for kernel_shape {list(shape)}"
        )
    tensors = _listed_tensors(where, leaf, meta, ("diff",))
    return TargetEntry(leaf, shape, tensors, kind=kind, indices=tuple(indices))


def _checked_segments(
    where: str, meta: dict, layout: KernelLayout, shape: tuple[int, ...], rank: int
) -> tuple[int, ...] | None:
    """A target's ``segments`` (a fused kernel's per-projection sizes), or None."""
    value = meta.get("segments")
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in value
    ):
        raise LoraFileError(f"{where}: key 'segments' is {str(value)[:40]}; expected sizes >= 1")
    try:
        check_segment_fit(value, rank, layout.fan_out(shape), where)
    except LoraError as e:
        raise LoraFileError(f"{where}: key 'segments': {e}") from None
    return tuple(value)


def _checked_layout(where: str, meta: dict) -> tuple[KernelLayout, tuple[int, ...]]:
    """A target's ``layout`` and ``kernel_shape``, checked against each other."""
    layout_obj = require(meta, "layout", dict, where)
    try:
        layout = KernelLayout(layout_obj["axes"], layout_obj.get("kind", "dense"))
    except (KeyError, TypeError, LoraError) as e:
        raise LoraFileError(f"{where}: key 'layout' is invalid: {e}") from None
    shape = _sizes(where, "kernel_shape", require(meta, "kernel_shape", list, where))
    if len(shape) != layout.ndim:
        raise LoraFileError(
            f"{where}: key 'kernel_shape' {list(shape)} has {len(shape)} axes but layout "
            f"{layout.axes!r} has {layout.ndim}"
        )
    return layout, shape


def _checked_layers(
    where: str, meta: dict, layout: KernelLayout, shape: tuple[int, ...]
) -> LayerSelection | None:
    """A target's ``layers`` / ``num_layers`` as a :class:`LayerSelection` (None: every layer)."""
    layers = meta.get("layers")
    if layers is None:
        return None
    if not layout.stack_axes:
        raise LoraFileError(
            f"{where}: key 'layers' is set but layout {layout.axes!r} has no stacked axis"
        )
    n = shape[layout.stack_axes[0]]
    if (
        not isinstance(layers, list)
        or not layers
        or any(type(i) is not int or not 0 <= i < n for i in layers)
        or layers != sorted(set(layers))
    ):
        raise LoraFileError(
            f"{where}: key 'layers' is {str(layers)[:60]}; expected distinct sorted indices "
            f"below {n}"
        )
    if meta.get("num_layers") not in (None, n):
        raise LoraFileError(
            f"{where}: key 'num_layers' is {meta['num_layers']}, but kernel_shape "
            f"{list(shape)} has {n} layers"
        )
    return LayerSelection(tuple(layers), n)


def _sizes(where: str, key: str, value: list) -> tuple[int, ...]:
    """A shape from the config: a list of integers >= 1."""
    if not all(type(d) is int and d >= 1 for d in value):
        raise LoraFileError(f"{where}: key {key!r} is {str(value)[:60]}; expected integers >= 1")
    return tuple(value)


def _listed_tensors(
    where: str, leaf: str, meta: dict, fields: tuple[str, ...]
) -> dict[str, TensorEntry]:
    """``{field: (key, shape, dtype)}`` of the tensors a target's entry lists; each dtype
    must be a floating one."""
    tensors = require(meta, "tensors", dict, where)
    out = {}
    for field in fields:
        t = require(tensors, field, dict, f"{where} tensors")
        key = t.get("key", f"{leaf}.{SUFFIXES[field]}")
        shape, dtype = t.get("shape", []), t.get("dtype")
        if (
            not isinstance(key, str)
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise LoraFileError(
                f"{where}: tensors.{field}: key 'key' or 'shape' has the wrong type"
            )
        if dtype not in FLOAT_DTYPES:
            raise LoraFileError(
                f"{where}: tensors.{field}: key 'dtype' is {str(dtype)[:40]!r}; "
                f"expected one of {list(FLOAT_DTYPES)}"
            )
        out[field] = (key, tuple(shape), dtype)
    return out


# --------------------------------------------------------------------------- load: the tensors


def read_tensors(
    weights: Path, doc: dict, entries: list[TargetEntry]
) -> dict[str, dict[str, np.ndarray]]:
    """Reads the tensors the config lists: ``{leaf: {field: array}}``.

    Refuses a tensor file from another save (``save_id``), missing or extra
    tensors, and a shape or dtype other than the config lists.
    """
    expected = {
        key: (e.leaf, field, shape, dtype)
        for e in entries
        for field, (key, shape, dtype) in e.tensors.items()
    }
    arrays: dict[str, dict[str, np.ndarray]] = {e.leaf: {} for e in entries}
    with open_safetensors(weights) as f:
        written_by = (f.metadata() or {}).get("save_id")
        if written_by and doc.get("save_id") and written_by != doc["save_id"]:
            raise LoraFileError(
                f"{weights}: written by another save than {CONFIG_NAME} (key 'save_id' differs): "
                "a save was interrupted between its two renames, or the files were mixed"
            )
        info = tensor_info(f)
        _check_keys(weights, list(info), list(expected))
        for key, (leaf, field, shape, dtype) in expected.items():
            got_shape, code = info[key]
            if got_shape != shape:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} has shape {got_shape} but "
                    f"{CONFIG_NAME} says {shape}"
                )
            if dtype_name(code) != dtype:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} has dtype {dtype_name(code)} but "
                    f"{CONFIG_NAME} says {dtype}"
                )
            arrays[leaf][field] = read_tensor(f, weights, key)
    return arrays


def _check_keys(weights: Path, present: list[str], expected: list[str]) -> None:
    """The tensor file holds exactly the keys the config lists."""
    have, want = set(present), set(expected)
    missing = [k for k in expected if k not in have]
    if missing:
        raise LoraFileError(
            f"{weights}: tensor {missing[0]!r} listed in {CONFIG_NAME} is missing "
            f"({len(missing)} missing in all)"
        )
    extra = [k for k in present if k not in want]
    if extra:
        raise LoraFileError(
            f"{weights}: tensor {extra[0]!r} is not listed in {CONFIG_NAME}'s key 'targets' "
            f"({len(extra)} extra in all)"
        )


def verify_sha256(weights: Path, doc: dict) -> None:
    """The tensor file's bytes hash to the config's ``sha256`` (when it records one)."""
    if "sha256" in doc and sha256_file(weights) != doc["sha256"]:
        raise LoraFileError(
            f"{weights}: its sha256 does not match key 'sha256' of {CONFIG_NAME}: the file is "
            "corrupt or was modified after it was saved"
        )


# --------------------------------------------------------------------------- load: the delta


def build_target(
    weights: Path, entry: TargetEntry, arrays: Mapping[str, np.ndarray]
) -> LoraFactors | LeafDelta | LoraBias | TokenRows:
    """One target's :class:`LoraFactors` (or :class:`LeafDelta`, :class:`LoraBias`,
    :class:`TokenRows`) from its arrays.

    The arrays must have the shapes the entry's rank, layout and kernel shape
    give: ``a (*stack, *fan_in, r)``, ``b (*stack, r, *fan_out)``,
    ``magnitude (*stack, *fan_out)``, where a layer selection shortens the
    first stacked axis to its number of layers.
    """
    shape, leaf = entry.kernel_shape, entry.leaf
    if entry.kind in ("lora_bias", "tokens"):
        field = "bias" if entry.kind == "lora_bias" else "diff"
        value = arrays[field]
        if value.shape != shape:
            raise LoraFileError(
                f"{weights}: tensor {leaf}.{SUFFIXES[field]} has shape {value.shape}, but "
                f"kernel_shape in {CONFIG_NAME} is {list(shape)}"
            )
        if entry.kind == "lora_bias":
            return LoraBias(jnp.asarray(value), scale=entry.scale)
        return TokenRows(jnp.asarray(value), indices=entry.indices)
    if entry.layout is None:
        diff = arrays["diff"]
        if diff.shape != shape:
            raise LoraFileError(
                f"{weights}: tensor {leaf}.diff has shape {diff.shape}, but "
                f"kernel_shape in {CONFIG_NAME} is {list(shape)}"
            )
        return LeafDelta(jnp.asarray(diff))
    layout, rank = entry.layout, entry.rank
    want_a, want_b = layout.factor_shapes(shape, rank)
    if entry.layers is not None:  # a, b, magnitude hold only those layers of the first stacked axis
        n = len(entry.layers.indices)
        want_a, want_b = (n,) + want_a[1:], (n,) + want_b[1:]
    for field, want in (("a", want_a), ("b", want_b)):
        if arrays[field].shape != want:
            raise LoraFileError(
                f"{weights}: tensor {leaf}.{SUFFIXES[field]} has shape {arrays[field].shape}, "
                f"but rank {rank} and kernel_shape {list(shape)} (layout {layout.axes!r}) "
                f"in {CONFIG_NAME} need {want}"
            )
    magnitude = arrays.get("magnitude")
    ns = len(layout.batch_axes)
    if magnitude is not None and magnitude.shape != want_b[:ns] + want_b[ns + 1 :]:
        raise LoraFileError(
            f"{weights}: tensor {leaf}.magnitude has shape {magnitude.shape}, "
            f"expected {want_b[:ns] + want_b[ns + 1 :]} (*stack, *fan_out)"
        )
    return LoraFactors(
        jnp.asarray(arrays["a"]),
        jnp.asarray(arrays["b"]),
        alpha=entry.alpha,
        layout=layout,
        rslora=entry.rslora,
        magnitude=None if magnitude is None else jnp.asarray(magnitude),
        layers=entry.layers,
        segments=entry.segments,
    )


def place(factors: Mapping[str, Any], doc: dict, base: Any, cfg_path: Path) -> Any:
    """The delta tree: ``base``'s structure if given, else nested dicts of the config's ``tree``."""
    if base is not None:
        return attach_to_base(factors, base, cfg_path)
    tree = [p for p in doc["tree"] if isinstance(p, str)]
    unknown = [leaf for leaf in factors if leaf not in set(tree)]
    if unknown:
        raise LoraFileError(f"{cfg_path}: target {unknown[0]!r} is not listed in key 'tree'")
    return nested_from_paths([(p, factors.get(p)) for p in tree], where=f"{cfg_path}: key 'tree'")


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
        if isinstance(f, TokenRows):  # rows of a table: indices in range, diff (k, dim)
            try:
                f.check_fits(leaf, shapes[leaf])
            except LoraStructureError as e:
                raise LoraBaseMismatchError(f"{source}: {e}") from None
        elif shapes[leaf] != f.kernel_shape:
            raise LoraBaseMismatchError(
                f"{source}: target {leaf!r} is for a kernel of shape {f.kernel_shape}, but the "
                f"base leaf has shape {shapes[leaf]}"
            )
    return jax.tree_util.tree_unflatten(treedef, [factors.get(p) for p, _ in leaves])


def load(
    path: str | os.PathLike,
    base: Any = None,
    *,
    verify: bool = True,
    check_finite: bool = True,
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
      check_finite: refuse a tensor holding a NaN or Inf (:class:`LoraFileError`
        naming the file and the tensor); on by default.

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
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"w": jnp.ones((4, 4))}
      >>> _, delta = lj.init_lora(jax.random.key(0), params, lj.LoraConfig(targets="w", rank=2))
      >>> d = lj.save(tempfile.mkdtemp(), delta)
      >>> lj.load(d)[0]["w"].a.shape
      (4, 2)
      >>> lj.load(d, base={"v": jnp.ones((4, 4))})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraBaseMismatchError: ...: target 'w' is not a leaf of the base ...
    """
    directory = input_directory(path)
    doc = read_config(directory)
    cfg_path, weights = directory / CONFIG_NAME, _tensor_file(directory, doc)
    entries = [check_target(cfg_path, leaf, meta) for leaf, meta in doc["targets"].items()]
    arrays = read_tensors(weights, doc, entries)
    if verify:
        verify_sha256(weights, doc)
    if check_finite:
        for e in entries:
            for field, (key, _, _) in e.tensors.items():
                check_finite_array(weights, key, arrays[e.leaf][field])
    factors = {e.leaf: build_target(weights, e, arrays[e.leaf]) for e in entries}
    config = config_from_json(doc.get("config"), str(cfg_path))
    return place(factors, doc, base, cfg_path), config


# --------------------------------------------------------------------------- describe


def describe(path: str | os.PathLike) -> list[dict]:
    """One row per target of a lora_jax adapter, from the config alone (for ``lora-jax inspect``).

    Each row: ``target``, ``kind``, ``shape`` (kernel), ``layout``, ``rank``,
    ``alpha``, ``scaling``, ``dtype``, ``params``, ``dora``.
    """
    directory = Path(path)
    doc = read_config(directory)
    rows = []
    for leaf, meta in doc["targets"].items():
        e = check_target(directory / CONFIG_NAME, leaf, meta)
        row = {
            "target": leaf,
            "kind": {"lora_bias": "lora_bias", "tokens": "tokens"}.get(e.kind, "full"),
            "shape": e.kernel_shape,
            "layout": "-",
            "rank": 0,
            "alpha": 0.0,
            "scaling": 0.0,
            "dtype": next(iter(e.tensors.values()))[2],
            "params": int(sum(math.prod(shape) for _, shape, _ in e.tensors.values())),
            "dora": "magnitude" in e.tensors,
        }
        if e.layout is not None:
            row.update(
                kind=e.layout.kind,
                layout=e.layout.axes,
                rank=e.rank,
                alpha=meta["alpha"],
                scaling=lora_scale(e.alpha, e.rank // len(e.segments or (1,)), e.rslora),
            )
        rows.append(row)
    return rows


__all__ = [
    "describe",
    "load",
    "save",
]
