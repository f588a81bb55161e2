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

**Experts.** A kernel of layout ``s..eio`` (a mixture of experts' ``(E, in,
out)`` stack) is PEFT's ``target_parameters`` parameter, one ``ParamWrapper``
per layer: ``lora_A.weight (r*E, in)``, ``lora_B.weight (out, r*E)``
(:mod:`lora_jax._files.peft.experts`); the name map gives the parameter's full
name (``model.layers.{}.mlp.experts.gate_up_proj``).

**Modules.** This module reads and writes PEFT directories; the PyTorch
tensor layouts are :mod:`lora_jax._files.peft.tensors` (experts:
:mod:`lora_jax._files.peft.experts`), the names
:mod:`lora_jax._files.peft.names`, and fitting imported modules to Flax kernels
:mod:`lora_jax._files.peft.fit`.
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax._delta import LeafDelta, LoraFactors, delta_entries, lora_scale
from lora_jax._errors import LoraArgumentError, LoraFileError, LoraStructureError
from lora_jax._files.atomic import StagedFiles
from lora_jax._files.peft.config_keys import check_config_keys
from lora_jax._files.peft.experts import (
    EXPERTS,
    expert_tensors,
    experts_without_params,
    fit_experts,
    is_expert_layout,
    merge_nested,
    split_wrapper_parts,
    target_parameters,
)
from lora_jax._files.peft.fit import fit_to_params, fit_without_params
from lora_jax._files.peft.names import NameMap, fill_layers, pattern_key, pattern_value
from lora_jax._files.peft.saved_modules import export_saved, import_saved, split_saved_key
from lora_jax._files.peft.tensors import (
    PEFT_PREFIX,
    PeftModule,
    peft_module,
    split_key,
    torch_tensors,
)
from lora_jax._files.peft.value_entries import (
    export_value_entries,
    import_value_entries,
    is_value_key,
)
from lora_jax._files.safetensors_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_finite_array,
    dtype_name,
    json_writer,
    open_safetensors,
    output_directory,
    read_json,
    read_tensor,
    tensor_info,
    write_safetensors,
)

ModuleInfo = tuple[int, float, str]
"""What the PEFT config records of one exported module: ``(rank, alpha, Flax leaf path)``."""


# --------------------------------------------------------------------------- export


def _exportable(delta: Any) -> tuple[list[tuple[str, LoraFactors]], list[tuple[str, LeafDelta]]]:
    """The delta's ``(path, LoraFactors)`` and ``(path, LeafDelta)``, checked to be one PEFT
    adapter's worth.

    ``use_rslora`` / ``use_dora`` are one flag for the whole adapter in PEFT:
    mixing them is a :class:`LoraStructureError`; so is a delta with no factors.
    """
    entries = [(p, f) for p, f in delta_entries(delta) if f is not None]
    targets = [(p, f) for p, f in entries if isinstance(f, LoraFactors)]
    leaf_deltas = [(p, f) for p, f in entries if isinstance(f, LeafDelta)]
    if not targets:
        raise LoraStructureError("export_peft: the delta has no LoraFactors (nothing to export)")
    fused = [p for p, f in targets if getattr(f, "segments", None)]
    if fused:  # PEFT's scale alpha / r would read the joint rank n * r
        raise LoraStructureError(
            f"export_peft: {fused[:3]} hold one adapter per fused projection (segments); "
            "export lora_jax.advanced.split_segments(delta), which puts each at <path>/<j>, "
            "with a name map from those to the PyTorch modules (advanced.segment_rules)"
        )
    for flag, has in (
        ("use_rslora", lambda f: f.rslora),
        ("use_dora", lambda f: f.magnitude is not None),
    ):
        if len({has(f) for _, f in targets}) > 1:
            mixed = [p for p, f in targets if has(f)]
            raise LoraStructureError(
                f"export_peft: PEFT's {flag} is one flag for the whole adapter, but only some "
                f"targets have it (e.g. {mixed[:3]})"
            )
    return targets, leaf_deltas


def _module_template(nm: NameMap, leaf: str, f: LoraFactors) -> str:
    """The PyTorch module name of a target, with one ``{}`` per stacked axis."""
    template = nm.module_for(leaf)
    if not template:
        raise LoraArgumentError(
            f"export_peft: the name map gives no PyTorch module for target {leaf!r}"
        )
    n_stack = len(f.layout.stack_axes)
    if template.count("{}") != n_stack:
        raise LoraArgumentError(
            f"export_peft: target {leaf!r} has {n_stack} stacked axes (layout "
            f"{f.layout.axes!r}) but its module name {template!r} has "
            f"{template.count('{}')} '{{}}' placeholders; map it to e.g. "
            "'model.layers.{}.q_proj' so each layer gets its own module"
        )
    return template


def _to_modules(
    targets: Sequence[tuple[str, LoraFactors]], nm: NameMap
) -> tuple[dict[str, np.ndarray], dict[str, ModuleInfo]]:
    """``({PEFT tensor key: array}, {module: (rank, alpha, leaf)})`` of the targets."""
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, ModuleInfo] = {}
    for leaf, f in targets:
        template = _module_template(nm, leaf, f)
        for idx, arrays in torch_tensors(leaf, f):
            module = fill_layers(template, idx)
            if module in modules:
                raise LoraArgumentError(
                    f"export_peft: targets {modules[module][2]!r} and {leaf!r} both map to "
                    f"PyTorch module {module!r}"
                )
            modules[module] = (f.rank, float(f.alpha), leaf)
            for suffix, arr in arrays.items():
                tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = arr
    return tensors, modules


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -float(v)))


def _target_modules(modules: Sequence[str], others: Sequence[str]) -> list[str]:
    """PEFT's ``target_modules`` as a PEFT user writes it: each module's last name
    (``q_proj``) where that selects exactly the adapted modules, else the full name (also
    for a bare index such as ``layers.0``, which would select any ``Sequential``'s child 0).

    PEFT selects a module ``n`` by a list entry ``k`` when ``n == k`` or
    ``n.endswith("." + k)``; ``others`` are the module names of the model's
    other leaves, which a short name must not select.

    Example:
      >>> _target_modules(["layers.0.q", "layers.1.q", "head"], ["layers.0.k"])
      ['head', 'q']
      >>> _target_modules(["layers.0.q"], ["layers.1.q"]), _target_modules(["seq.0"], [])
      (['layers.0.q'], ['seq.0'])
    """
    adapted = set(modules)

    def selects(key: str, name: str) -> bool:
        return name == key or name.endswith("." + key)

    out = set()
    for name in modules:
        short = name.rsplit(".", 1)[-1]
        if not short.isdigit() and not any(selects(short, o) for o in others if o not in adapted):
            out.add(short)
        else:
            out.add(name)
    return sorted(out)


def _other_modules(delta: Any, nm: NameMap, modules: Mapping[str, ModuleInfo]) -> list[str]:
    """The module names of the model's parts the delta does not adapt: its ``None`` leaves
    (``{}`` kept literally, so a stacked kernel's name still ends in its short name) and the
    layers a layer selection leaves out."""
    names = []
    for path, f in delta_entries(delta):
        template = nm.module_for(path)
        if not template:
            continue
        if f is None:
            names.append(template)
        elif isinstance(f, LoraFactors) and f.layers is not None:
            n = len(f.layout.stack_axes)
            rest = np.shape(f.a)[1:n]
            for i in set(range(f.layers.total)) - set(f.layers.indices):
                names.extend(fill_layers(template, (i,) + idx) for idx in np.ndindex(*rest))
    return [n for n in names if n not in modules]


def _peft_config(
    modules: Mapping[str, ModuleInfo],
    rslora: bool,
    dora: bool,
    base_model_name_or_path: str | None,
    target_modules: list[str],
    modules_to_save: list[str] | None,
    bias: str,
) -> dict:
    """PEFT's ``adapter_config.json``: the most common rank / alpha, the others as patterns."""
    names = sorted(modules)
    r0 = _most_common([r for r, _, _ in modules.values()])
    a0 = _most_common([a for _, a, _ in modules.values()])
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": int(r0),
        "lora_alpha": _json_number(a0),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "rank_pattern": {
            pattern_key(m, names): int(modules[m][0]) for m in names if modules[m][0] != r0
        },
        "alpha_pattern": {
            pattern_key(m, names): _json_number(modules[m][1]) for m in names if modules[m][1] != a0
        },
        "use_rslora": rslora,
        "use_dora": dora,
        "fan_in_fan_out": False,
        "bias": bias,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
    }


def export_peft(
    path: str | os.PathLike,
    delta: Any,
    *,
    name_map: Any = None,
    base_model_name_or_path: str | None = None,
    params: Any = None,
) -> dict:
    """Writes a lora_jax delta as a HuggingFace PEFT LoRA adapter directory.

    Each targeted kernel becomes one PyTorch module's tensors (a scan-stacked
    kernel one per layer) in PyTorch's layouts: ``lora_A.weight (r, in)`` and
    ``lora_B.weight (out, r)`` for Dense (N-D kernels flattened, see the module
    doc), ``lora_embedding_A (r, vocab)`` / ``lora_embedding_B (dim, r)`` for
    embeddings, ``(r, in, *window)`` / ``(out, r, 1, ..)`` for convs, and
    ``lora_magnitude_vector`` for DoRA; an expert kernel (layout ``s..eio``)
    as PEFT's ``target_parameters`` (``lora_A.weight (r*E, in)``,
    ``lora_B.weight (out, r*E)``, the name map giving the parameter's full
    name, a module's parameters nested as transformers registers them). ``r`` / ``lora_alpha`` are the most
    common rank and alpha; modules that differ get ``rank_pattern`` /
    ``alpha_pattern`` entries. ``target_modules`` lists each module's last
    name (``q_proj``) where that selects exactly the adapted modules among the
    delta's leaves, else its full name, as a PEFT user would write it. Leaves
    trained in full (:class:`~lora_jax.LeafDelta`) are written as PEFT's
    ``modules_to_save`` (``<module>.weight`` / ``.bias`` holding ``W + diff``,
    so ``params`` is needed); the bias of a LoRA-targeted module as PEFT's
    ``bias="lora_only"`` (``<module>.base_layer.bias``). A
    :class:`~lora_jax.LoraBias` is written as PEFT's ``lora_bias``
    (``<module>.lora_B.bias``) and :class:`~lora_jax.TokenRows` as
    ``trainable_token_indices`` (``<module>.token_adapter.trainable_tokens_delta``,
    the rows ``W[indices] + diff``, so ``params`` is needed). Only config keys
    PEFT's ``LoraConfig`` knows are written. Files are written atomically
    (config last).

    Args:
      path: output directory (created if missing).
      delta: a lora_jax delta.
      name_map: a :class:`NameMap`, a function ``path -> module``, or
        ``to_peft`` rules; default: drop ``params/`` and ``/kernel``, ``/`` -> ``.``.
      base_model_name_or_path: recorded in the config (PEFT uses it to fetch
        the base model when none is passed).
      params: the base params; needed only when the delta has ``LeafDelta``
        leaves (their full values ``W + diff`` are what PEFT stores).

    Returns:
      The ``adapter_config.json`` contents written.

    Raises:
      LoraStructureError: a delta PEFT cannot hold: mixed rsLoRA or DoRA
        across targets (one flag in PEFT), no factors at all, a conv/embedding
        layout PyTorch cannot express, or a :class:`~lora_jax.LeafDelta`
        without ``params``, on a stacked or N-D kernel leaf, or on a module that
        is also a LoRA target.
      LoraArgumentError: a name map that gives a target no module, a stacked
        target's name without a ``{}`` per stacked axis, or two targets one
        module.
      LoraFileError: ``path`` exists and is not a directory.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"params": {"fc": {"kernel": jnp.ones((6, 4))}}}
      >>> cfg = lj.LoraConfig(targets=".*kernel", rank=2, alpha=4)
      >>> _, delta = lj.init_lora(jax.random.key(0), params, cfg)
      >>> cfg = lj.export_peft(tempfile.mkdtemp(), delta)
      >>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      ('LORA', 2, 4, ['fc'])
    """
    nm = NameMap.coerce(name_map)
    targets, leaf_deltas = _exportable(delta)
    experts = [(p, f, _module_template(nm, p, f)) for p, f in targets if is_expert_layout(f.layout)]
    targets = [(p, f) for p, f in targets if not is_expert_layout(f.layout)]
    tensors, modules = _to_modules(targets, nm)
    expert_arrays, wrapped = expert_tensors(experts)
    tensors.update(expert_arrays)
    saved, bias = None, "none"
    if leaf_deltas:
        full, saved, lora_biases = export_saved(leaf_deltas, params, nm, modules)
        tensors.update({f"{PEFT_PREFIX}{k}": v for k, v in full.items()})
        bias = "lora_only" if lora_biases else "none"
    value_tensors, value_config = export_value_entries(delta, params, nm)
    tensors.update({f"{PEFT_PREFIX}{k}": v for k, v in value_tensors.items()})
    first = (targets or experts)[0][1]
    others = _other_modules(delta, nm, {**modules, **wrapped})
    target_modules = _target_modules(sorted(modules), others) if modules else []
    config = _peft_config(
        {**modules, **wrapped},
        bool(first.rslora),
        first.magnitude is not None,
        base_model_name_or_path,
        target_modules,
        saved or None,
        bias,
    )
    if wrapped:
        config["target_parameters"] = target_parameters(list(wrapped), others)
    config.update(value_config)
    directory = output_directory(path)
    with StagedFiles(directory) as files:
        files.stage(WEIGHTS_NAME, lambda tmp: write_safetensors(tmp, tensors, {"format": "pt"}))
        files.stage(CONFIG_NAME, json_writer(config))
        files.commit()
    return config


# --------------------------------------------------------------------------- reading PEFT files


def read_peft_config(directory: Path) -> dict:
    """Reads a PEFT ``adapter_config.json`` and checks it is a LoRA adapter lora_jax can use.

    ``r`` (and each ``rank_pattern`` value) must be an integer >= 1,
    ``lora_alpha`` (and each ``alpha_pattern`` value) a finite number > 0,
    ``target_modules`` a list of module names or one regex string (PEFT's two
    forms), ``target_parameters`` a list of parameter names (or one name), ``use_rslora`` / ``use_dora`` booleans; every failure is a
    :class:`LoraFileError` naming the file and the key.
    """
    cfg_path = Path(directory) / CONFIG_NAME
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        hint = " (a lora_jax adapter: use lora_jax.load)" if "format" in cfg else ""
        raise LoraFileError(
            f"{cfg_path}: key 'peft_type' is {cfg.get('peft_type')!r}; only PEFT LoRA adapters "
            f"('LORA') can be imported{hint}"
        )
    _check_rank(cfg_path, "key 'r'", cfg.get("r"))
    _check_alpha(cfg_path, "key 'lora_alpha'", cfg.get("lora_alpha"))
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        for pattern, value in _checked_patterns(cfg_path, key, cfg.get(key)).items():
            check(cfg_path, f"key '{key}' entry {_short(pattern)}", value)
    for key, single in (("target_modules", "one regex string"), ("target_parameters", "one name")):
        targets = cfg.get(key)
        if not (
            targets is None
            or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
        ):
            raise LoraFileError(
                f"{cfg_path}: key {key!r} is {_short(targets)}; expected a list of names or {single}"
            )
    for key in ("use_rslora", "use_dora"):
        if not isinstance(cfg.get(key, False), bool):
            raise LoraFileError(
                f"{cfg_path}: key {key!r} is {_short(cfg[key])}; expected a boolean"
            )
    return cfg


def _short(value: Any) -> str:
    """A value for an error message, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(cfg_path: Path, label: str, value: Any) -> None:
    """A rank: an integer >= 1 (PEFT writes ``8``; ``8.0`` is accepted)."""
    if not _is_number(value) or not math.isfinite(value) or value != int(value) or value < 1:
        raise LoraFileError(f"{cfg_path}: {label} is {_short(value)}; expected an integer >= 1")


def _check_alpha(cfg_path: Path, label: str, value: Any) -> None:
    """An alpha: a finite number > 0 (NaN or Inf would make every output NaN or Inf)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise LoraFileError(f"{cfg_path}: {label} is {_short(value)}; expected a finite number > 0")


# A group followed by a quantifier ("(a+)+", "(x|y)*"): the shape of catastrophic backtracking.
_QUANTIFIED_GROUP = re.compile(r"\)[*+?{]")


def _checked_patterns(cfg_path: Path, key: str, value: Any) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: an object whose keys are regexes PEFT matches
    module names with; keys must compile and must not quantify a group (a file's regex
    must not be able to hang the reader)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LoraFileError(f"{cfg_path}: key {key!r} is {_short(value)}; expected an object")
    for pattern in value:
        if len(pattern) > 1000 or _QUANTIFIED_GROUP.search(pattern):
            raise LoraFileError(
                f"{cfg_path}: key {key!r} has pattern {_short(pattern)}: longer "
                "than 1000 characters or a quantified group, refused"
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise LoraFileError(
                f"{cfg_path}: key {key!r} has pattern {_short(pattern)}, not a regex: {e}"
            ) from None
    return value


Parts = dict[str, dict[str, tuple[str, np.ndarray, bool]]]
Full = dict[str, tuple[str, np.ndarray]]


def _saved_entries(cfg_path: Path, cfg: dict) -> list[str]:
    """``modules_to_save``: a list of module names (or null)."""
    saved = cfg.get("modules_to_save")
    if saved is None:
        return []
    if not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise LoraFileError(
            f"{cfg_path}: key 'modules_to_save' is {_short(saved)}; expected a list of module names"
        )
    return saved


def _trained_biases(cfg_path: Path, cfg: dict) -> bool:
    """``bias``: ``"none"`` (False), or ``"all"`` / ``"lora_only"`` (True: PEFT saved the
    trained biases)."""
    bias = cfg.get("bias", "none")
    if bias not in (None, "none", "all", "lora_only"):
        raise LoraFileError(
            f"{cfg_path}: key 'bias' is {_short(bias)}; expected 'none', 'all' or 'lora_only'"
        )
    return bias in ("all", "lora_only")


_BIAS_KEY = re.compile(r"(?P<module>.+?)(\.base_layer)?\.bias")


def _read_parts(weights: Path, saved: Sequence[str], biases: bool) -> tuple[Parts, Full]:
    """``({module: {role: (key, array, embedding?)}}, {module.param: (key, array)})``: the
    LoRA tensors of a PEFT file, and the full tensors of its ``modules_to_save`` and (with
    ``biases``, PEFT's ``bias="all"`` / ``"lora_only"``) its trained biases."""
    directory = weights.parent
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise LoraFileError(
            f"{directory / 'adapter_model.bin'}: a pickled PyTorch adapter; lora_jax reads only "
            "adapter_model.safetensors (re-save with PEFT's "
            "save_pretrained(safe_serialization=True))"
        )
    raw: Parts = {}
    full: Full = {}
    with open_safetensors(weights) as f:
        for key, (_, code) in tensor_info(f).items():
            if code not in ("F32", "BF16", "F16", "F64"):
                raise LoraFileError(
                    f"{weights}: tensor {key!r} has dtype {dtype_name(code)}; "
                    "LoRA factors are floating point"
                )
            split = split_key(key)
            name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            if split is None and is_value_key(name):
                continue  # lora_B biases and trainable tokens: read by value_entries
            if split is None and ".original_module." in name:
                continue  # PEFT's untouched copy of a modules_to_save module: the base itself
            kept = split_saved_key(name, saved) if split is None else None
            bias = _BIAS_KEY.fullmatch(name) if split is None and biases else None
            if kept is None and bias is not None:
                kept = (bias.group("module"), "bias")
            if kept is not None:
                full[".".join(kept)] = (key, read_tensor(f, weights, key))
                continue
            if split is None:
                raise LoraFileError(
                    f"{weights}: tensor {key!r} is not a LoRA factor lora_jax can import "
                    "(lora_A/lora_B/lora_embedding_A/B/lora_magnitude_vector) nor a module "
                    "listed in modules_to_save, a lora_B bias or trainable tokens; other PEFT "
                    "methods are not supported"
                )
            module, role, embed = split
            raw.setdefault(module, {})[role] = (key, read_tensor(f, weights, key), embed)
    return raw, full


def _check_against_config(
    weights: Path, cfg: dict, mod: PeftModule, a_shape: tuple[int, ...]
) -> None:
    """A module (its ``lora_A`` of shape ``a_shape``) agrees with the config's ``use_dora``
    and its ``r`` / ``rank_pattern``."""
    dora = bool(cfg.get("use_dora", False))
    if (mod.magnitude is not None) != dora:
        state = "has" if mod.magnitude is not None else "lacks"
        raise LoraFileError(
            f"{weights}: module {mod.name!r} {state} lora_magnitude_vector but {CONFIG_NAME} has "
            f"use_dora={dora}"
        )
    want_r = pattern_value(cfg.get("rank_pattern"), mod.name, cfg["r"])
    if int(want_r) != mod.rank:
        raise LoraFileError(
            f"{weights}: tensor {mod.keys[0]!r} has rank {mod.rank} (shape {a_shape}), but "
            f"{CONFIG_NAME} gives module {mod.name!r} rank {want_r} (r / rank_pattern)"
        )


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, PeftModule], Full]:
    """Reads and validates a PEFT LoRA adapter: ``(config, {module: PeftModule},
    {module.param: (key, array)} of its modules_to_save)``."""
    directory = Path(directory)
    cfg = read_peft_config(directory)
    weights = directory / WEIGHTS_NAME
    modules = {}
    parts_by_module, full = _read_parts(
        weights,
        _saved_entries(directory / CONFIG_NAME, cfg),
        _trained_biases(directory / CONFIG_NAME, cfg),
    )
    parts_by_module, wrappers = split_wrapper_parts(weights, cfg, parts_by_module)
    for name, parts in parts_by_module.items():
        alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
        modules[name] = peft_module(weights, name, parts, float(alpha))
        _check_against_config(weights, cfg, modules[name], parts["A"][1].shape)
    modules.update(wrappers)  # PEFT's target_parameters: kind "experts", by parameter name
    return cfg, modules, full


def read_peft_modules(directory: str | os.PathLike) -> tuple[dict, dict[str, PeftModule]]:
    """Reads and validates a PEFT LoRA adapter: ``(config, {module: PeftModule})``."""
    cfg, modules, _ = read_peft_adapter(directory)
    return cfg, modules


# --------------------------------------------------------------------------- import


def import_peft(
    path: str | os.PathLike,
    params: Any = None,
    *,
    name_map: Any = None,
    layouts: Mapping[str, Any] | None = None,
    dtype: Any = None,
    check_finite: bool = True,
    residual_base: bool = False,
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
      check_finite: refuse a file with a NaN or Inf in any factor or magnitude
        (:class:`LoraFileError` naming the file and the tensor); on by default.
      residual_base: ``params`` are the residual base that a base-rewriting
        ``init_lora_weights`` (``pissa``, ``olora``, ``corda``, ``loftq``,
        ``lora_ga``) left, ``W - s B0 A0``. PEFT re-runs that initialiser on the
        weights it loads the adapter onto, so without this such an adapter is
        refused (``lj.init_lora(init="pissa" | "olora")`` on the original
        weights gives the residual).

    Every key of ``adapter_config.json`` is checked against lora_jax's table
    of PEFT's ``LoraConfig`` keys (``lora_jax._files.peft.config_keys``): a
    key that changes what the adapter computes in a way lora_jax does not
    (``alora_invocation_tokens``, ``layer_replication``, other variants) or
    that lora_jax does not know is refused by name rather than imported as a
    plain LoRA. Modules PEFT trained in full (``modules_to_save``) import as
    :class:`~lora_jax.LeafDelta` (``value - base``; needs concrete params);
    ``lora_bias`` imports as a :class:`~lora_jax.LoraBias` at the bias leaf
    beside each kernel, ``trainable_token_indices`` as
    :class:`~lora_jax.TokenRows` (``rows - W[indices]``; needs concrete
    params) at the embedding table.
    Expert parameters PEFT adapted with ``target_parameters`` import as
    ``(*layers, E, in, r)`` / ``(*layers, E, r, out)`` factors of layout
    ``s..eio`` at the leaf the name map sends to the parameter's full name
    (:mod:`lora_jax._files.peft.experts`); a target whose leaf is not such an
    expert stack is a :class:`LoraFileError` naming it.

    Returns:
      The delta (``LoraFactors`` with ``alpha``, ``rslora`` and, for DoRA,
      ``magnitude`` taken from the file; ``LeafDelta`` for modules_to_save).

    Raises:
      LoraFileError: not a PEFT LoRA adapter; a corrupt file; an unsupported
        tensor; a rank that contradicts the config; a module with no Flax leaf;
        ``r`` not an integer >= 1, ``lora_alpha`` not a finite number > 0,
        ``target_modules`` neither a list nor a string; a NaN or Inf tensor.
        :class:`LoraBaseMismatchError` when a module's shapes do not fit its
        Flax kernel. :class:`LoraArgumentError` when the name map sends two
        leaves to one module, or a stacked leaf's module name and its
        ``layouts`` entry disagree. Messages name the file and the key.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> params = {"params": {"fc": {"kernel": jnp.ones((6, 4))}}}
      >>> cfg = lj.LoraConfig(targets=".*kernel", rank=2)
      >>> _, delta = lj.init_lora(jax.random.key(0), params, cfg)
      >>> d = tempfile.mkdtemp()
      >>> _ = lj.export_peft(d, delta)
      >>> back = lj.import_peft(d, params)
      >>> bool((back["params"]["fc"]["kernel"].a == delta["params"]["fc"]["kernel"].a).all())
      True
    """
    directory = Path(path)
    # the keys first: a refused option's error names the key, not the tensors it brings
    check_config_keys(
        directory / CONFIG_NAME, read_peft_config(directory), residual_base=residual_base
    )
    cfg, modules, full = read_peft_adapter(directory)
    weights = directory / WEIGHTS_NAME
    if check_finite:
        for mod in modules.values():
            arrays = (mod.a, mod.b) + (() if mod.magnitude is None else (mod.magnitude,))
            for key, array in zip(mod.keys, arrays):
                check_finite_array(weights, key, array)
        for key, array in full.values():
            check_finite_array(weights, key, array)
    rslora = bool(cfg.get("use_rslora", False))
    nm = NameMap.coerce(name_map)
    wrappers = {n: m for n, m in modules.items() if m.kind == EXPERTS}
    modules = {n: m for n, m in modules.items() if m.kind != EXPERTS}
    if params is None:
        import_saved(weights, full, None, nm, dtype)  # refuses modules_to_save without params
        if cfg.get("lora_bias") or cfg.get("trainable_token_indices"):
            raise LoraFileError(
                f"{directory / CONFIG_NAME}: lora_bias / trainable_token_indices are placed at "
                "the base's bias and embedding leaves: pass params="
            )
        plain = fit_without_params(weights, modules, nm, rslora, dtype)
        return merge_nested(plain, experts_without_params(weights, wrappers, nm, rslora, dtype))
    placed: dict[str, Any] = dict(import_saved(weights, full, params, nm, dtype))
    placed.update(fit_experts(weights, wrappers, params, nm, rslora, dtype))
    delta = fit_to_params(weights, modules, params, nm, layouts, rslora, dtype, placed)
    return import_value_entries(weights, cfg, delta, params, nm, dtype, check_finite)


# --------------------------------------------------------------------------- describe


def describe_peft(path: str | os.PathLike) -> list[dict]:
    """One row per module of a PEFT LoRA adapter (for ``lora-jax inspect``).

    Each row: ``target`` (module name), ``kind``, ``shape`` (the PyTorch
    weight's), ``layout`` (``"torch"``), ``rank``, ``alpha``, ``scaling``,
    ``dtype``, ``params``, ``dora``.
    """
    cfg, modules = read_peft_modules(path)
    rslora = bool(cfg.get("use_rslora", False))
    rows = []
    for name, m in modules.items():
        n = m.a.size + m.b.size + (0 if m.magnitude is None else m.magnitude.size)
        rows.append(
            {
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
            }
        )
    return rows


__all__ = [
    "NameMap",
    "describe_peft",
    "export_peft",
    "import_peft",
    "read_peft_adapter",
    "read_peft_modules",
]
