"""HuggingFace PEFT adapter directories, both ways: :func:`export_peft` and :func:`import_peft`.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``peft_type:
"LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ...) and
``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.<tensor>``, in PyTorch's layouts:

=====================  ==============================  ==============================
PyTorch module         PEFT tensors                     Flax kernel (lora_jax layout)
=====================  ==============================  ==============================
``nn.Linear(in, out)`` ``lora_A.weight (r, in)``,       ``nn.Dense``: ``(in, out)``,
weight ``(out, in)``   ``lora_B.weight (out, r)``       ``"io"``
``nn.Embedding(V, D)`` ``lora_embedding_A (r, V)``,     ``nn.Embed``: ``(V, D)``,
weight ``(V, D)``      ``lora_embedding_B (D, r)``      ``"io"`` kind ``embed``
``nn.ConvNd``          ``lora_A.weight (r, in, *win)``, ``nn.Conv``: ``(*win, in, out)``,
weight                 ``lora_B.weight (out, r, 1..)``  ``"i..io"`` kind ``conv``
``(out, in, *win)``
DoRA (any of them)     ``lora_magnitude_vector``:       ``magnitude (*fan_out)``
                       ``(out,)``, ``(D,)``, conv
                       ``(1, out, 1..)``
=====================  ==============================  ==============================

The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per
module through ``rank_pattern`` / ``alpha_pattern``, exactly as lora_jax's.

**N-D (DenseGeneral) kernels** have no PEFT module of their own; they export
as the ``nn.Linear`` whose weight is the kernel with its fan-in axes flattened
into ``in`` and its fan-out axes into ``out`` (row-major, in the kernel's axis
order): ``weight = W.transpose(layout.permutation).reshape(fan_in,
fan_out).T``. The PyTorch twin of a ``(d, heads, head_dim)`` projection is
``nn.Linear(d, heads * head_dim)``; importing back restores the N-D factors
from the Flax kernel's shape.

**Names.** A :class:`NameMap` turns Flax leaf paths into PyTorch module names
(``to_peft``) and back (``to_flax``). By default ``params/`` and a trailing
``/kernel`` or ``/embedding`` are dropped and ``/`` becomes ``.``
(``params/encoder/fc1/kernel`` <-> ``encoder.fc1``). **Scan-stacked** kernels
(layout ``"s..."``, e.g. ``(layers, in, out)``) map to one PyTorch module per
layer: a ``to_peft`` name holds one ``{}`` per stacked axis, filled with the
layer index (``params/layers/q/kernel`` -> ``model.layers.{}.q_proj`` ->
``model.layers.0.q_proj``, ``model.layers.1.q_proj``, ...); a ``to_flax`` rule
names the index with a ``(?P<layer>\\d+)`` group and the layers are stacked on
the leading axis. :func:`import_peft` with ``params`` only needs ``to_peft``:
it maps every leaf of the params and inverts the result.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._atomic import commit_file, fsync_dir, stage_file
from lora_jax._file_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    dtype_name,
    json_writer,
    nested_from_paths,
    open_safetensors,
    read_json,
    read_tensor,
    tensor_info,
    to_numpy,
    write_safetensors,
)
from lora_jax._delta import (
    LayerSelection,
    LeafDelta,
    LoraFactors,
    column_norm,
    delta_entries,
    lora_scale,
)
from lora_jax._errors import LoraBaseMismatchError, LoraError, LoraFileError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

PEFT_PREFIX = "base_model.model."
# (key suffix, role, embedding?) -- the keys current PEFT writes (adapter name removed).
_KEY_SUFFIXES = (
    (".lora_A.weight", "A", False),
    (".lora_B.weight", "B", False),
    (".lora_embedding_A", "A", True),
    (".lora_embedding_B", "B", True),
    (".lora_magnitude_vector.weight", "M", False),
    (".lora_magnitude_vector", "M", False),
)

Rules = Union[Sequence[Sequence[str]], Mapping[str, str]]
NameFn = Callable[..., Any]


# --------------------------------------------------------------------------- names


def default_to_peft(path: str) -> str:
    """Flax path -> PyTorch module: drop ``params/``, ``/kernel`` or ``/embedding``; ``/`` -> ``.``.

    Example:
      >>> default_to_peft("params/encoder/fc1/kernel")
      'encoder.fc1'
    """
    name = re.sub(r"^params/", "", path)
    name = re.sub(r"/(kernel|embedding)$", "", name)
    return name.replace("/", ".")


def default_to_flax(module: str, kind: str) -> str:
    """PyTorch module name -> Flax leaf path (linen ``params`` tree; ``embedding`` for embeddings).

    Example:
      >>> default_to_flax("encoder.fc1", "dense"), default_to_flax("wte", "embed")
      ('params/encoder/fc1/kernel', 'params/wte/embedding')
    """
    leaf = "embedding" if kind == "embed" else "kernel"
    return "params/" + module.replace(".", "/") + "/" + leaf


def _compile_rules(rules: Rules, field: str) -> tuple[tuple[re.Pattern, str], ...]:
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise LoraError(f"NameMap.{field}: each rule is a [regex, template] pair, got {pair!r}")
        try:
            out.append((re.compile(pair[0]), pair[1]))
        except re.error as e:
            raise LoraError(f"NameMap.{field}: {pair[0]!r} is not a valid regex: {e}") from None
    return tuple(out)


def fill_layers(template: str, index: Sequence[int]) -> str:
    """Fills each ``{}`` of a module-name template with one layer index, in order.

    Example:
      >>> fill_layers("model.layers.{}.q_proj", (3,))
      'model.layers.3.q_proj'
    """
    for i in index:
        template = template.replace("{}", str(int(i)), 1)
    return template


@dataclasses.dataclass(frozen=True)
class NameMap:
    """How Flax leaf paths and PyTorch module names correspond, both ways.

    Attributes:
      to_peft: Flax path -> PyTorch module name. A function ``path -> name |
        None`` (None: no PyTorch twin), or regex rules ``[(regex, template),
        ...]`` (or a dict): the first regex that matches the path in full
        rewrites it with ``re.Match.expand(template)`` (``\\1``, ``\\g<name>``);
        paths no rule matches get :func:`default_to_peft`. A scan-stacked leaf's
        name holds one ``{}`` per stacked axis, filled with the layer index.
      to_flax: PyTorch module name -> Flax path, for :func:`import_peft`
        without ``params``. A function ``(module, kind) -> path | (path,
        layer_index) | None``, or rules as above; a rule's named group
        ``layer`` (or ``layer0``, ``layer1``, ... for several stacked axes)
        is the layer index, and modules that map to the same path are stacked
        on the leading axis. Unmatched names get :func:`default_to_flax`.

    Example:
      >>> nm = NameMap(
      ...     to_peft=[(r"params/layers/(\\w+)/kernel", r"model.layers.{}.\\1")],
      ...     to_flax=[(r"model\\.layers\\.(?P<layer>\\d+)\\.(\\w+)", r"params/layers/\\2/kernel")])
      >>> nm.module_for("params/layers/q_proj/kernel"), nm.module_for("params/head/kernel")
      ('model.layers.{}.q_proj', 'head')
      >>> nm.path_for("model.layers.3.q_proj", "dense")
      ('params/layers/q_proj/kernel', (3,))
    """

    to_peft: Any = None
    to_flax: Any = None

    def __post_init__(self):
        for field in ("to_peft", "to_flax"):
            value = getattr(self, field)
            if value is None or callable(value):
                continue
            object.__setattr__(self, field, _compile_rules(value, field))

    @classmethod
    def coerce(cls, name_map: Any) -> "NameMap":
        """A :class:`NameMap` from None, a NameMap, or a function or rules (``to_peft``)."""
        if name_map is None:
            return cls()
        if isinstance(name_map, NameMap):
            return name_map
        if isinstance(name_map, Mapping) and set(name_map) <= {"to_peft", "to_flax"} and name_map:
            return cls(**name_map)
        return cls(to_peft=name_map)

    @classmethod
    def from_json(cls, file: str | os.PathLike) -> "NameMap":
        """Reads a name map file: ``[[regex, template], ...]`` (``to_peft`` rules) or
        ``{"to_peft": [...], "to_flax": [...]}``."""
        file = Path(file)
        if not file.is_file():
            raise LoraFileError(f"{file}: name map file not found")
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraFileError(f"{file}: not valid JSON: {e}") from None
        try:
            return cls.coerce(obj)
        except (LoraError, TypeError) as e:
            raise LoraFileError(f"{file}: not a valid name map: {e}") from None

    def module_for(self, path: str) -> str | None:
        """The PyTorch module name (template, with ``{}`` per stacked axis) of a Flax path."""
        if callable(self.to_peft):
            return self.to_peft(path)
        for pattern, template in self.to_peft or ():
            m = pattern.fullmatch(path)
            if m:
                return m.expand(template)
        return default_to_peft(path)

    def path_for(self, module: str, kind: str) -> tuple[str, tuple[int, ...]] | None:
        """The Flax path and layer index (``()`` if not stacked) of a PyTorch module."""
        if callable(self.to_flax):
            out = self.to_flax(module, kind)
            if out is None or isinstance(out, str):
                return None if out is None else (out, ())
            path, index = out
            return path, (int(index),) if isinstance(index, (int, np.integer)) else tuple(index)
        for pattern, template in self.to_flax or ():
            m = pattern.fullmatch(module)
            if m:
                groups = m.groupdict()
                names = sorted((k for k in groups if re.fullmatch(r"layer\d*", k)),
                               key=lambda k: (len(k), k))
                return m.expand(template), tuple(int(groups[k]) for k in names)
        return default_to_flax(module, kind), ()


# --------------------------------------------------------------------------- export


def _torch_tensors(
    path: str, f: LoraFactors
) -> list[tuple[tuple[int, ...], dict[str, np.ndarray]]]:
    """Per stacked index: ``{peft tensor suffix: array}`` in PyTorch's layouts."""
    layout = f.layout
    n = len(layout.stack_axes)
    r = f.rank
    a, b = to_numpy(f.a), to_numpy(f.b)
    m = None if f.magnitude is None else to_numpy(f.magnitude)
    unstacked = layout.axes.replace("s", "")
    if layout.kind == "embed" and unstacked not in ("io",):
        raise LoraError(
            f"leaf {path!r}: an embedding exports as torch nn.Embedding, which needs one fan-in "
            f"(vocab) and one fan-out (dim) axis; layout is {layout.axes!r}"
        )
    if layout.kind == "conv" and not re.fullmatch(r"i{2,}o", unstacked):
        raise LoraError(
            f"leaf {path!r}: a conv kernel exports as torch (out, in, *window) only from Flax's "
            f"(*window, in, out) layout ('i...io' after stacked axes); layout is {layout.axes!r}"
        )
    out = []
    for idx in np.ndindex(*a.shape[:n]):
        al, bl = a[idx], b[idx]
        ml = None if m is None else m[idx]
        if layout.kind == "embed":
            t = {"lora_embedding_A": al.T, "lora_embedding_B": bl.T}
            if ml is not None:
                t["lora_magnitude_vector"] = ml.reshape(-1)
        elif layout.kind == "conv":
            nw = al.ndim - 2  # window axes before (in, r)
            t = {
                "lora_A.weight": al.transpose((nw + 1, nw) + tuple(range(nw))),  # (r, in, *win)
                "lora_B.weight": bl.T.reshape((bl.shape[1], r) + (1,) * nw),  # (out, r, 1..)
            }
            if ml is not None:
                t["lora_magnitude_vector"] = ml.reshape((1, -1) + (1,) * nw)
        else:  # dense, any number of fan-in / fan-out axes: flattened to nn.Linear
            t = {"lora_A.weight": al.reshape(-1, r).T, "lora_B.weight": bl.reshape(r, -1).T}
            if ml is not None:
                t["lora_magnitude_vector"] = ml.reshape(-1)
        index = tuple(int(i) for i in idx)
        if f.layers is not None:  # only these layers of the first stacked axis are stored
            index = (f.layers.indices[index[0]],) + index[1:]
        out.append((index, {k: to_numpy(v) for k, v in t.items()}))
    return out


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -float(v)))


def _pattern_key(module: str, modules: Sequence[str]) -> str:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` key that selects exactly ``module``.

    PEFT matches a key ``k`` against module ``n`` as ``re.match(rf"(.*\\.)?({k})$", n)``,
    so a plain name also selects every module ending in ``.name``; ``^`` pins it
    when another module here does.
    """
    key = re.escape(module)
    if any(other != module and other.endswith("." + module) for other in modules):
        key = "^" + key
    return key


def export_peft(
    path: str | os.PathLike,
    delta: Any,
    *,
    name_map: Any = None,
    base_model_name_or_path: str | None = None,
) -> dict:
    """Writes a lora_jax delta as a HuggingFace PEFT LoRA adapter directory.

    Each targeted kernel becomes one PyTorch module's tensors (a scan-stacked
    kernel one per layer) in PyTorch's layouts: ``lora_A.weight (r, in)`` and
    ``lora_B.weight (out, r)`` for Dense (N-D kernels flattened, see the module
    doc), ``lora_embedding_A (r, vocab)`` / ``lora_embedding_B (dim, r)`` for
    embeddings, ``(r, in, *window)`` / ``(out, r, 1, ..)`` for convs, and
    ``lora_magnitude_vector`` for DoRA. ``r`` / ``lora_alpha`` are the most
    common rank and alpha; modules that differ get ``rank_pattern`` /
    ``alpha_pattern`` entries. Only config keys PEFT's ``LoraConfig`` knows
    are written. Files are written atomically (config last).

    Args:
      path: output directory (created if missing).
      delta: a lora_jax delta.
      name_map: a :class:`NameMap`, a function ``path -> module``, or
        ``to_peft`` rules; default :func:`default_to_peft`.
      base_model_name_or_path: recorded in the config (PEFT uses it to fetch
        the base model when none is passed).

    Returns:
      The ``adapter_config.json`` contents written.

    Raises:
      LoraError: mixed rsLoRA or DoRA across targets (global in PEFT), two
        leaves mapping to one module, a stacked leaf whose name lacks a
        ``{}`` per stacked axis, or a conv/embedding layout PyTorch cannot
        express.

    Example:
      >>> import tempfile
      >>> params = {"params": {"fc": {"kernel": jnp.ones((6, 4))}}}
      >>> cfg = LoraConfig(targets=".*kernel", rank=2, alpha=4)
      >>> _, delta = init_lora(jax.random.key(0), params, cfg)
      >>> cfg = export_peft(tempfile.mkdtemp(), delta)
      >>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      ('LORA', 2, 4, ['fc'])
    """
    nm = NameMap.coerce(name_map)
    targets = [(p, f) for p, f in delta_entries(delta) if f is not None]
    for leaf, f in targets:
        if isinstance(f, LeafDelta):
            raise LoraError(
                f"export_peft: leaf {leaf!r} is a LeafDelta (trained in full); PEFT stores such "
                "leaves as modules_to_save / bias holding the full value W + diff, which "
                "export_peft does not write: merge it into the base params instead"
            )
    if not targets:
        raise LoraError("export_peft: the delta has no LoraFactors (nothing to export)")
    for flag, values in (("use_rslora", {f.rslora for _, f in targets}),
                         ("use_dora", {f.magnitude is not None for _, f in targets})):
        if len(values) > 1:
            mixed = [p for p, f in targets
                     if (f.rslora if flag == "use_rslora" else f.magnitude is not None)]
            raise LoraError(
                f"export_peft: PEFT's {flag} is one flag for the whole adapter, but only some "
                f"targets have it (e.g. {mixed[:3]})"
            )
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple[int, float, str]] = {}
    for leaf, f in targets:
        template = nm.module_for(leaf)
        if not template:
            raise LoraError(
                f"export_peft: the name map gives no PyTorch module for target {leaf!r}"
            )
        n_stack = len(f.layout.stack_axes)
        if template.count("{}") != n_stack:
            raise LoraError(
                f"export_peft: target {leaf!r} has {n_stack} stacked axes (layout "
                f"{f.layout.axes!r}) but its module name {template!r} has "
                f"{template.count('{}')} '{{}}' placeholders; map it to e.g. "
                "'model.layers.{}.q_proj' so each layer gets its own module"
            )
        for idx, arrays in _torch_tensors(leaf, f):
            module = fill_layers(template, idx)
            if module in modules:
                raise LoraError(
                    f"export_peft: targets {modules[module][2]!r} and {leaf!r} both map to "
                    f"PyTorch module {module!r}"
                )
            modules[module] = (f.rank, float(f.alpha), leaf)
            for suffix, arr in arrays.items():
                tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = arr
    names = sorted(modules)
    r0 = _most_common([r for r, _, _ in modules.values()])
    a0 = _most_common([a for _, a, _ in modules.values()])
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": int(r0),
        "lora_alpha": _json_number(a0),
        "lora_dropout": 0.0,
        "target_modules": names,
        "rank_pattern": {_pattern_key(m, names): int(modules[m][0])
                         for m in names if modules[m][0] != r0},
        "alpha_pattern": {_pattern_key(m, names): _json_number(modules[m][1])
                          for m in names if modules[m][1] != a0},
        "use_rslora": bool(targets[0][1].rslora),
        "use_dora": targets[0][1].magnitude is not None,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise LoraFileError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    staged = []
    try:
        write = lambda t: write_safetensors(t, tensors, {"format": "pt"})  # noqa: E731
        staged.append(stage_file(weights, write))
        staged.append(stage_file(cfg_path, json_writer(config)))
        commit_file(staged[0], weights)
        commit_file(staged[1], cfg_path)
    except BaseException:
        for tmp in staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        raise
    fsync_dir(directory)
    return config


# --------------------------------------------------------------------------- reading PEFT files


@dataclasses.dataclass
class PeftModule:
    """One adapted PyTorch module of a PEFT file, with factors in lora_jax's orientation.

    ``a: (*fan_in, r)`` with fan_in ``(in,)`` (Linear), ``(vocab,)`` (Embedding)
    or ``(*window, in)`` (conv); ``b: (r, out)``; ``magnitude: (out,)`` or None.
    """

    name: str
    kind: str
    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None
    rank: int
    alpha: float
    keys: tuple[str, ...]
    torch_shape: tuple[int, ...]

    @property
    def fan_in(self) -> tuple[int, ...]:
        return tuple(self.a.shape[:-1])

    @property
    def fan_out(self) -> int:
        return int(self.b.shape[1])


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_config(directory: Path) -> dict:
    """Reads a PEFT ``adapter_config.json`` and checks it is a LoRA adapter."""
    cfg_path = Path(directory) / CONFIG_NAME
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        hint = " (a lora_jax adapter: use lora_jax.load)" if "format" in cfg else ""
        raise LoraFileError(
            f"{cfg_path}: key 'peft_type' is {cfg.get('peft_type')!r}; only PEFT LoRA adapters "
            f"('LORA') can be imported{hint}"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise LoraFileError(f"{cfg_path}: key {key!r} is missing or not a number")
    return cfg


def read_peft_modules(directory: str | os.PathLike) -> tuple[dict, dict[str, PeftModule]]:
    """Reads and validates a PEFT LoRA adapter: ``(config, {module: PeftModule})``."""
    directory = Path(directory)
    cfg = read_peft_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise LoraFileError(
            f"{directory / 'adapter_model.bin'}: a pickled PyTorch adapter; lora_jax reads only "
            "adapter_model.safetensors (re-save with PEFT's "
            "save_pretrained(safe_serialization=True))"
        )
    dora = bool(cfg.get("use_dora", False))
    raw: dict[str, dict[str, tuple[str, np.ndarray, bool]]] = {}
    with open_safetensors(weights) as f:
        for key in tensor_info(f):
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            for suffix, role, embed in _KEY_SUFFIXES:
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    raw.setdefault(module, {})[role] = (key, read_tensor(f, weights, key), embed)
                    break
            else:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} is not a LoRA factor lora_jax can import "
                    "(lora_A/lora_B/lora_embedding_A/B/lora_magnitude_vector); lora_bias, "
                    "modules_to_save and other PEFT methods are not supported"
                )
    modules = {}
    for name, parts in raw.items():
        modules[name] = _module(weights, cfg, name, parts, dora)
    return cfg, modules


def _module(weights: Path, cfg: dict, name: str, parts: dict, dora: bool) -> PeftModule:
    for role in ("A", "B"):
        if role not in parts:
            other = next(iter(parts.values()))[0]
            raise LoraFileError(
                f"{weights}: module {name!r} has {other!r} but no lora_{role} tensor"
            )
    (ka, A, emb_a), (kb, B, emb_b) = parts["A"], parts["B"]
    if emb_a != emb_b:
        raise LoraFileError(f"{weights}: {ka!r} and {kb!r} mix embedding and Linear/conv factors")
    if ("M" in parts) != dora:
        state = "has" if "M" in parts else "lacks"
        raise LoraFileError(
            f"{weights}: module {name!r} {state} lora_magnitude_vector but {CONFIG_NAME} has "
            f"use_dora={dora}"
        )
    if A.ndim < 2 or B.ndim != A.ndim:
        raise LoraFileError(
            f"{weights}: tensors {ka!r} {A.shape} and {kb!r} {B.shape} are not a LoRA pair"
        )
    r = int(A.shape[0])
    if B.shape[1] != r:
        raise LoraFileError(
            f"{weights}: tensor {kb!r} has shape {B.shape}; its rank axis (1) should be {r} "
            f"like {ka!r} {A.shape}"
        )
    if emb_a:
        kind = "embed"
        if A.ndim != 2:
            raise LoraFileError(f"{weights}: tensor {ka!r} should be 2-D (r, vocab), got {A.shape}")
        a, b, torch_shape = A.T, B.T, (A.shape[1], B.shape[0])
    elif A.ndim == 2:
        kind = "dense"
        a, b, torch_shape = A.T, B.T, (B.shape[0], A.shape[1])
    else:
        kind = "conv"
        nw = A.ndim - 2
        if any(d != 1 for d in B.shape[2:]):
            raise LoraFileError(
                f"{weights}: tensor {kb!r} has shape {B.shape}; PEFT's conv lora_B is a 1x1 conv "
                "(out, r, 1, ...)"
            )
        a = A.transpose(tuple(range(2, 2 + nw)) + (1, 0))  # (*win, in, r)
        b = B.reshape(B.shape[0], r).T
        torch_shape = (B.shape[0], A.shape[1]) + tuple(A.shape[2:])
    magnitude = None
    if "M" in parts:
        km, M, _ = parts["M"]
        if M.size != b.shape[1] or (M.ndim > 1 and M.shape[1 if kind == "conv" else 0] != M.size):
            raise LoraFileError(
                f"{weights}: tensor {km!r} has shape {M.shape}; expected {b.shape[1]} magnitudes "
                "(one per output feature)"
            )
        magnitude = M.reshape(-1)
    want_r = _pattern_value(cfg.get("rank_pattern"), name, cfg["r"])
    if int(want_r) != r:
        raise LoraFileError(
            f"{weights}: tensor {ka!r} has rank {r} (shape {A.shape}), but {CONFIG_NAME} gives "
            f"module {name!r} rank {want_r} (r / rank_pattern)"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    keys = tuple(parts[k][0] for k in ("A", "B", "M") if k in parts)
    return PeftModule(name, kind, np.ascontiguousarray(a), np.ascontiguousarray(b), magnitude,
                      r, alpha, keys, tuple(int(d) for d in torch_shape))


# --------------------------------------------------------------------------- import


def _explicit_layout(layouts: Mapping[str, Any] | None, path: str) -> KernelLayout | None:
    if not layouts:
        return None
    value = layouts.get(path)
    if value is None:
        for pattern, v in layouts.items():
            if re.fullmatch(pattern, path):
                value = v
                break
    if value is None:
        return None
    return KernelLayout(value) if isinstance(value, str) else value


def _layout_for(source: Path, path: str, shape: tuple[int, ...], n_stack: int, mod: PeftModule,
                layouts: Mapping[str, Any] | None) -> KernelLayout:
    explicit = _explicit_layout(layouts, path)
    where = f"{source}: module {mod.name!r} -> Flax leaf {path!r} (shape {shape})"
    if explicit is not None:
        layout = KernelLayout(explicit.axes, mod.kind)
    else:
        rest = shape[n_stack:]
        s = "s" * n_stack
        if mod.kind == "conv":
            axes = s + "i" * (len(rest) - 1) + "o"
        elif mod.kind == "embed":
            axes = s + "io"
        else:
            splits = [k for k in range(1, len(rest))
                      if math.prod(rest[:k]) == math.prod(mod.fan_in)
                      and math.prod(rest[k:]) == mod.fan_out]
            if len(splits) != 1:
                why = "no" if not splits else "more than one"
                raise LoraBaseMismatchError(
                    f"{where}: {why} split of the kernel's axes into fan-in {mod.fan_in[0]} and "
                    f"fan-out {mod.fan_out} (PyTorch Linear {mod.torch_shape}); give its layout "
                    "with layouts={path: KernelLayout(...)}"
                )
            axes = s + "i" * splits[0] + "o" * (len(rest) - splits[0])
        if len(axes) != len(shape):
            raise LoraBaseMismatchError(
                f"{where}: a PyTorch {mod.kind} module with {len(mod.fan_in)} fan-in axes does not "
                f"fit a {len(shape)}-D kernel"
            )
        layout = KernelLayout(axes, mod.kind)
    if layout.ndim != len(shape):
        raise LoraBaseMismatchError(f"{where}: layout {layout.axes!r} has {layout.ndim} axes")
    fan_in = tuple(shape[a] for a in layout.in_axes)
    fan_out = tuple(shape[a] for a in layout.out_axes)
    if mod.kind in ("conv", "embed"):
        ok = fan_in == mod.fan_in and fan_out == (mod.fan_out,)
        if mod.kind == "conv":
            ok = ok and re.fullmatch(r"i+o", layout.axes.replace("s", "")) is not None
    else:
        ok = math.prod(fan_in) == math.prod(mod.fan_in) and math.prod(fan_out) == mod.fan_out
    if not ok:
        raise LoraBaseMismatchError(
            f"{where}: the kernel (layout {layout.axes!r}: fan-in {fan_in}, fan-out {fan_out}) "
            f"does not match PyTorch {mod.kind} weight {mod.torch_shape} (tensor {mod.keys[0]!r})"
        )
    return layout


def _stack(source: Path, path: str, leaf: Any, layout: KernelLayout,
           layers: list[tuple[tuple[int, ...], PeftModule | None]], rslora: bool,
           dtype: Any) -> LoraFactors:
    shape = tuple(leaf.shape)
    stack = tuple(shape[a] for a in layout.stack_axes)
    fan_in = tuple(shape[a] for a in layout.in_axes)
    fan_out = tuple(shape[a] for a in layout.out_axes)
    present = [m for _, m in layers if m is not None]
    first = present[0]
    for m in present[1:]:
        if (m.kind, m.rank, m.alpha) != (first.kind, first.rank, first.alpha):
            raise LoraFileError(
                f"{source}: modules {first.name!r} (rank {first.rank}, alpha {first.alpha:g}) and "
                f"{m.name!r} (rank {m.rank}, alpha {m.alpha:g}) are layers of the one stacked "
                f"Flax leaf {path!r}, which needs one rank and alpha for all layers"
            )
    r = first.rank
    selection = None
    if len(stack) == 1 and len(present) < len(layers) and first.magnitude is None:
        # layers PEFT left out (layers_to_transform): keep only the adapted ones (layers=)
        selection = LayerSelection(tuple(idx[0] for idx, m in layers if m is not None), stack[0])
        layers = [(idx, m) for idx, m in layers if m is not None]
        stack = (len(layers),)
    a_parts, b_parts, m_parts = [], [], []
    for idx, m in layers:
        if m is None:  # a layer PEFT did not adapt: an exactly zero update
            a_parts.append(np.zeros(fan_in + (r,), first.a.dtype))
            b_parts.append(np.zeros((r,) + fan_out, first.b.dtype))
            if first.magnitude is not None:
                if isinstance(leaf, jax.ShapeDtypeStruct):
                    raise LoraFileError(
                        f"{source}: DoRA module for layer {idx} of stacked leaf {path!r} is "
                        "missing, and its magnitude (the base weight's norm) needs concrete "
                        "base params, not shapes"
                    )
                norm = column_norm(np.asarray(leaf), layout)[idx]
                m_parts.append(np.asarray(norm).astype(first.magnitude.dtype))
            continue
        a_parts.append(m.a.reshape(fan_in + (r,)))
        b_parts.append(m.b.reshape((r,) + fan_out))
        if m.magnitude is not None:
            m_parts.append(m.magnitude.reshape(fan_out))

    def join(parts):
        return np.stack(parts).reshape(stack + parts[0].shape) if stack else parts[0]

    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    return LoraFactors(cast(join(a_parts)), cast(join(b_parts)), alpha=first.alpha,
                       layout=layout, rslora=rslora,
                       magnitude=cast(join(m_parts)) if m_parts else None, layers=selection)


def import_peft(
    path: str | os.PathLike,
    params: Any = None,
    *,
    name_map: Any = None,
    layouts: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> Any:
    """Reads a HuggingFace PEFT LoRA adapter directory into a lora_jax delta.

    Args:
      path: the PEFT adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``, as ``save_pretrained`` writes).
      params: the Flax params (arrays or ``jax.ShapeDtypeStruct``) the
        adapter is for. Every leaf is mapped through ``name_map.to_peft``;
        leaves whose module (or, for scan-stacked leaves, any layer's module)
        is in the file get factors shaped for that kernel, the rest ``None``.
        Layers of a stacked leaf that PEFT left out (``layers_to_transform``)
        become ``LoraFactors(layers=...)`` holding only the adapted layers
        (for DoRA, or several stacked axes: zero factors, DoRA magnitudes from
        the base weights' norms, which then must be concrete). Without
        ``params``, modules are mapped with ``name_map.to_flax`` and the
        result is a nested dict of the targets only, each Linear a 2-D
        ``(in, out)`` kernel, each conv ``(*window, in, out)``.
      name_map: a :class:`NameMap`, a function ``path -> module``, or
        ``to_peft`` rules.
      layouts: ``{path or regex: KernelLayout | axes}`` for kernels whose
        layout cannot be read off the PEFT module (N-D kernels whose fan-in /
        fan-out split is ambiguous); the kind always follows the PEFT module.
      dtype: cast the factors to this dtype (default: keep the file's).

    Returns:
      The delta (``LoraFactors`` with ``alpha``, ``rslora`` and, for DoRA,
      ``magnitude`` taken from the file).

    Raises:
      LoraFileError: not a PEFT LoRA adapter; a corrupt file; an unsupported
        tensor; a rank that contradicts the config; a module with no Flax leaf.
        :class:`LoraBaseMismatchError` when a module's shapes do not fit its
        Flax kernel. Messages name the file and the key.

    Example:
      >>> import tempfile
      >>> params = {"params": {"fc": {"kernel": jnp.ones((6, 4))}}}
      >>> _, delta = init_lora(jax.random.key(0), params, LoraConfig(targets=".*kernel", rank=2))
      >>> d = tempfile.mkdtemp()
      >>> _ = export_peft(d, delta)
      >>> back = import_peft(d, params)
      >>> bool((back["params"]["fc"]["kernel"].a == delta["params"]["fc"]["kernel"].a).all())
      True
    """
    directory = Path(path)
    cfg, modules = read_peft_modules(directory)
    weights = directory / WEIGHTS_NAME
    rslora = bool(cfg.get("use_rslora", False))
    nm = NameMap.coerce(name_map)
    if params is None:
        return _import_without_params(weights, modules, nm, rslora, dtype)
    leaves, treedef = leaves_with_paths(params)
    used: dict[str, str] = {}
    out = []
    for leaf_path, leaf in leaves:
        template = nm.module_for(leaf_path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not template or len(shape) < 2:
            out.append(None)
            continue
        holes = template.count("{}")
        explicit = _explicit_layout(layouts, leaf_path)
        stack_axes = explicit.stack_axes if explicit is not None else tuple(range(holes))
        if len(stack_axes) != holes:
            raise LoraError(
                f"leaf {leaf_path!r}: its module name {template!r} has {holes} '{{}}' but its "
                f"layout {explicit.axes!r} has {len(stack_axes)} stacked axes"
            )
        index = list(np.ndindex(*(shape[a] for a in stack_axes))) if holes else [()]
        layers = [(idx, modules.get(fill_layers(template, idx))) for idx in index]
        present = [m for _, m in layers if m is not None]
        if not present:
            out.append(None)
            continue
        for m in present:
            if m.name in used:
                raise LoraError(
                    f"{weights}: module {m.name!r} maps to two Flax leaves, {used[m.name]!r} and "
                    f"{leaf_path!r}; make the name map tell them apart"
                )
            used[m.name] = leaf_path
        layout = _layout_for(weights, leaf_path, shape, holes, present[0], layouts)
        out.append(_stack(weights, leaf_path, leaf, layout, layers, rslora, dtype))
    unused = [m for m in modules if m not in used]
    if unused:
        sample = [(p, nm.module_for(p)) for p, leaf in leaves
                  if len(getattr(leaf, "shape", ())) >= 2]
        raise LoraFileError(
            f"{weights}: module {unused[0]!r} ({len(unused)} in all) matches no leaf of the "
            f"params under the name map; Flax leaves map to e.g. {sample[:4]} -- give "
            "name_map= rules (Flax path regex -> PyTorch module name)"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _import_without_params(weights: Path, modules: dict[str, PeftModule], nm: NameMap,
                           rslora: bool, dtype: Any) -> dict:
    groups: dict[str, list[tuple[tuple[int, ...], PeftModule]]] = {}
    for name, mod in modules.items():
        mapped = nm.path_for(name, mod.kind)
        if mapped is None:
            raise LoraFileError(f"{weights}: the name map gives no Flax path for module {name!r}")
        groups.setdefault(mapped[0], []).append((mapped[1], mod))
    factors = {}
    for path, items in groups.items():
        n = {len(idx) for idx, _ in items}
        if len(n) != 1:
            raise LoraFileError(f"{weights}: modules {[m.name for _, m in items]} map to Flax leaf "
                                f"{path!r} with and without layer indices")
        n_stack = n.pop()
        if n_stack == 0 and len(items) > 1:
            raise LoraFileError(f"{weights}: modules {[m.name for _, m in items]} all map to Flax "
                                f"leaf {path!r}; name a (?P<layer>\\d+) group to stack them")
        stack = tuple(max(idx[k] for idx, _ in items) + 1 for k in range(n_stack))
        by_index = {idx: m for idx, m in items}
        missing = [idx for idx in np.ndindex(*stack) if idx not in by_index] if n_stack else []
        if missing:
            raise LoraFileError(
                f"{weights}: layer {missing[0]} of stacked Flax leaf {path!r} has no module; "
                "pass params= so missing layers can be filled"
            )
        mod = items[0][1]
        if mod.kind == "dense":
            rest = (mod.fan_in[0], mod.fan_out)
            axes = "io"
        else:
            rest = mod.fan_in + (mod.fan_out,)
            axes = "i" * len(mod.fan_in) + "o"
        layout = KernelLayout("s" * n_stack + axes, mod.kind)
        leaf = jax.ShapeDtypeStruct(stack + rest, mod.a.dtype)
        layers = [(idx, by_index[idx]) for idx in (np.ndindex(*stack) if n_stack else [()])]
        factors[path] = _stack(weights, path, leaf, layout, layers, rslora, dtype)
    return nested_from_paths(factors)


def describe_peft(path: str | os.PathLike) -> list[dict]:
    """One row per module of a PEFT LoRA adapter (for ``lora-jax inspect``).

    Each row: ``target`` (module name), ``kind``, ``shape`` (the PyTorch
    weight's), ``rank``, ``alpha``, ``scaling``, ``dtype``, ``params``, ``dora``.
    """
    cfg, modules = read_peft_modules(path)
    rslora = bool(cfg.get("use_rslora", False))
    rows = []
    for name, m in modules.items():
        n = m.a.size + m.b.size + (0 if m.magnitude is None else m.magnitude.size)
        rows.append({
            "target": name,
            "kind": m.kind,
            "shape": m.torch_shape,
            "layout": "torch",
            "rank": m.rank,
            "alpha": m.alpha,
            "scaling": lora_scale(m.alpha, m.rank, rslora),
            "dtype": dtype_name(m.a.dtype),
            "params": int(n),
            "dora": m.magnitude is not None,
        })
    return rows


def is_peft_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds an ``adapter_config.json`` with a ``peft_type``."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return "peft_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


__all__ = ["NameMap", "export_peft", "import_peft", "describe_peft", "is_peft_dir"]
