"""PEFT's ``modules_to_save`` <-> lora_jax's :class:`~lora_jax.LeafDelta`, both ways.

A PEFT adapter can train whole modules besides the LoRA factors (a
classifier head, a norm): the config lists them in ``modules_to_save`` and
``save_pretrained`` writes their full parameters as
``base_model.model.<module>.<param>`` (older PEFT:
``<module>.modules_to_save.<param>``), in PyTorch's layouts. With
``bias="all"`` / ``"lora_only"`` PEFT also saves the biases it trained
(``<module>.bias``; ``<module>.base_layer.bias`` for a LoRA-targeted
module). lora_jax trains such leaves as a ``LeafDelta`` whose ``diff`` is
added to the base, so export writes ``W + diff`` and import needs the
(concrete) base params to recover ``diff``.

A Flax leaf is the parameter ``param`` of a PyTorch module (:func:`leaf_module`):

==========================  ====================  =====================================
Flax leaf                   PyTorch parameter     layout
==========================  ====================  =====================================
``.../kernel`` (2-D)        ``<module>.weight``   transposed (``nn.Linear``)
``.../embedding``           ``<module>.weight``   as is (``nn.Embedding``)
``.../scale``               ``<module>.weight``   as is (norms)
``.../bias``, other names   ``<module>.<name>``   as is
==========================  ====================  =====================================

where ``<module>`` is the name map's module for ``.../kernel`` (so a custom
``to_peft`` rule for the kernel also names the module's bias and scale).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LeafDelta
from lora_jax._errors import LoraBaseMismatchError, LoraFileError, LoraStructureError
from lora_jax._files.peft.names import NameMap
from lora_jax._files.safetensors_io import to_numpy
from lora_jax._paths import leaves_with_paths

_PARAM_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def leaf_module(nm: NameMap, path: str) -> tuple[str | None, str]:
    """``(PyTorch module name or None, parameter name)`` of a Flax leaf path.

    Example:
      >>> leaf_module(NameMap(), "params/head/kernel"), leaf_module(NameMap(), "params/ln/scale")
      (('head', 'weight'), ('ln', 'weight'))
      >>> leaf_module(NameMap(), "params/head/bias")
      ('head', 'bias')
    """
    parent, _, last = path.rpartition("/")
    module = nm.module_for(path if last in ("kernel", "embedding") else f"{parent}/kernel")
    return module, _PARAM_NAMES.get(last, last)


def _check_plain(
    where: str,
    path: str,
    module: str | None,
    shape: Sequence[int],
    error: type = LoraStructureError,
) -> str:
    """A leaf PEFT can hold as one module parameter: a module name without ``{}``, and no
    N-D kernel (a conv and a DenseGeneral cannot be told apart from the leaf alone)."""
    if not module:
        raise error(f"{where}: the name map gives leaf {path!r} no PyTorch module")
    if "{}" in module:
        raise error(
            f"{where}: leaf {path!r} is scan-stacked (module {module!r}); a LeafDelta on a "
            "stacked leaf has no PEFT modules_to_save form"
        )
    if path.endswith("/kernel") and len(shape) > 2:
        raise error(
            f"{where}: leaf {path!r} is a {len(shape)}-D kernel; modules_to_save is written and "
            "read only for 2-D kernels, embeddings, scales and biases"
        )
    return module


def to_torch(path: str, value: np.ndarray) -> np.ndarray:
    """A Flax leaf's value in PyTorch's layout (a 2-D kernel transposed)."""
    return np.ascontiguousarray(value.T) if path.endswith("/kernel") else value


def export_saved(
    leaf_deltas: Sequence[tuple[str, LeafDelta]],
    params: Any,
    nm: NameMap,
    lora_modules: Mapping[str, Any],
) -> tuple[dict[str, np.ndarray], list[str], bool]:
    """``({tensor name: W + diff in PyTorch's layout}, sorted modules_to_save, any LoRA
    biases?)`` of the LeafDeltas.

    The bias of a LoRA-targeted module is PEFT's ``bias="lora_only"``
    (``<module>.base_layer.bias``); other leaves are ``modules_to_save``
    (``<module>.<param>``). Raises :class:`LoraStructureError` without
    concrete ``params``, for a leaf with no plain PyTorch twin, or a LoRA
    target's weight (PEFT's ``modules_to_save`` replaces a whole module).
    """
    where = "export_peft"
    if params is None:
        raise LoraStructureError(
            f"{where}: leaf {leaf_deltas[0][0]!r} is a LeafDelta (trained in full); PEFT stores "
            "it in modules_to_save as the full value W + diff, so pass params= (the base "
            "params) to export it"
        )
    base = dict(leaves_with_paths(params)[0])
    tensors: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    lora_biases = False
    for path, d in leaf_deltas:
        w = base.get(path)
        shape = None if w is None or isinstance(w, jax.ShapeDtypeStruct) else np.shape(w)
        if shape is None or tuple(shape) != d.kernel_shape:
            have = "no concrete array" if shape is None else f"shape {shape}"
            raise LoraStructureError(
                f"{where}: leaf {path!r} is a LeafDelta of shape {d.kernel_shape}, but params= "
                f"has {have} there"
            )
        module, param = leaf_module(nm, path)
        module = _check_plain(where, path, module, d.kernel_shape)
        value = to_numpy(jnp.asarray(w) + jnp.asarray(d.diff, jnp.asarray(w).dtype))
        if module in lora_modules:
            if param != "bias":
                raise LoraStructureError(
                    f"{where}: leaf {path!r} is a LeafDelta but its module {module!r} is also a "
                    "LoRA target; PEFT's modules_to_save replaces a whole module, so a module's "
                    "weight is one or the other (only its bias can be both)"
                )
            tensors[f"{module}.base_layer.bias"] = value
            lora_biases = True
            continue
        tensors[f"{module}.{param}"] = to_torch(path, value)
        modules.add(module)
    return tensors, sorted(modules), lora_biases


def split_saved_key(name: str, saved: Sequence[str]) -> tuple[str, str] | None:
    """``(module, param)`` of a tensor name (PEFT prefix removed) of a ``modules_to_save``
    module, else None. PEFT matches an entry ``m`` against a module named ``m`` or ending
    in ``.m``.

    Example:
      >>> split_saved_key("cls.head.weight", ["head"]), split_saved_key("fc1.weight", ["head"])
      (('cls.head', 'weight'), None)
      >>> split_saved_key("head.modules_to_save.bias", ["head"])
      ('head', 'bias')
    """
    module, _, param = name.rpartition(".")
    module = (
        re.sub(r"\.modules_to_save(\.[^.]+)?$", "", module)
        if ".modules_to_save" in module
        else module
    )
    if any(module == m or module.endswith("." + m) for m in saved):
        return module, param
    return None


def import_saved(
    weights: Path, full: Mapping[str, tuple[str, np.ndarray]], params: Any, nm: NameMap, dtype: Any
) -> dict[str, LeafDelta]:
    """``{Flax leaf path: LeafDelta(value - base)}`` of a file's ``modules_to_save`` tensors.

    ``full``: ``{"module.param": (safetensors key, array)}``. Each must find a
    concrete Flax leaf of the same shape (after PyTorch's layout), else a
    :class:`LoraFileError` / :class:`LoraBaseMismatchError` naming the tensor.
    """
    if not full:
        return {}
    first = next(iter(full.values()))[0]
    if params is None:
        raise LoraFileError(
            f"{weights}: tensor {first!r} is trained in full (modules_to_save or bias); "
            "importing it as a LeafDelta needs the base params (params=)"
        )
    by_name: dict[str, tuple[str, str, Any]] = {}
    for path, leaf in leaves_with_paths(params)[0]:
        module, param = leaf_module(nm, path)
        if module and "{}" not in module:
            by_name.setdefault(f"{module}.{param}", (path, module, leaf))
    out: dict[str, LeafDelta] = {}
    for name, (key, array) in full.items():
        if name not in by_name:
            raise LoraFileError(
                f"{weights}: tensor {key!r} (trained in full) matches no leaf of the params under "
                "the name map; give name_map= rules for the module's kernel"
            )
        path, module, leaf = by_name[name]
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise LoraFileError(
                f"{weights}: tensor {key!r} (trained in full) holds the full value of leaf "
                f"{path!r}; its LeafDelta (value - base) needs concrete base params, not shapes"
            )
        _check_plain(str(weights), path, module, np.shape(leaf), LoraFileError)
        value = to_torch(path, array)  # the transpose is its own inverse
        if value.shape != tuple(np.shape(leaf)):
            raise LoraBaseMismatchError(
                f"{weights}: tensor {key!r} has shape {array.shape}; Flax leaf {path!r} has "
                f"shape {tuple(np.shape(leaf))}"
            )
        base = jnp.asarray(leaf)
        diff = jnp.asarray(value, base.dtype) - base
        out[path] = LeafDelta(diff if dtype is None else diff.astype(dtype))
    return out


__all__ = ["export_saved", "import_saved", "leaf_module", "split_saved_key", "to_torch"]
