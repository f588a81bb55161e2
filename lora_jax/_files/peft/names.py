"""Flax leaf paths <-> PyTorch module names, for the PEFT format (:class:`NameMap`).

A :class:`NameMap` turns Flax leaf paths into PyTorch module names
(``to_peft``) and back (``to_flax``). By default ``params/`` and a trailing
``/kernel`` or ``/embedding`` are dropped and ``/`` becomes ``.``
(``params/encoder/fc1/kernel`` <-> ``encoder.fc1``). A scan-stacked kernel's
module name holds one ``{}`` per stacked axis, filled with the layer index
(:func:`fill_layers`). This module also holds how PEFT itself matches module
names against the keys of ``rank_pattern`` / ``alpha_pattern``
(:func:`pattern_key`, :func:`pattern_value`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax._errors import LoraArgumentError, LoraError, LoraFileError

Rules = Sequence[Sequence[str]] | Mapping[str, str]
"""Name rules: ``[(regex, template), ...]`` or ``{regex: template}``."""


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


def compile_rules(rules: Rules, field: str) -> tuple[tuple[re.Pattern, str], ...]:
    """``(compiled regex, template)`` pairs; a malformed rule is a :class:`LoraArgumentError`.

    Example:
      >>> compile_rules({"params/fc/kernel": "fc"}, "to_peft")[0][1]
      'fc'
      >>> compile_rules([("a", "b", "c")], "to_peft")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraArgumentError: NameMap.to_peft: each rule is a [regex, template] pair...
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for pair in pairs:
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise LoraArgumentError(
                f"NameMap.{field}: each rule is a [regex, template] pair, got {pair!r}"
            )
        try:
            out.append((re.compile(pair[0]), pair[1]))
        except re.error as e:
            raise LoraArgumentError(
                f"NameMap.{field}: {pair[0]!r} is not a valid regex: {e}"
            ) from None
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
        paths no rule matches get the default (drop ``params/`` and a trailing
        ``/kernel`` or ``/embedding``, ``/`` -> ``.``). A scan-stacked leaf's
        name holds one ``{}`` per stacked axis, filled with the layer index.
      to_flax: PyTorch module name -> Flax path, for :func:`~lora_jax.import_peft`
        without ``params``. A function ``(module, kind) -> path | (path,
        layer_index) | None``, or rules as above; a rule's named group
        ``layer`` (or ``layer0``, ``layer1``, ... for several stacked axes)
        is the layer index, and modules that map to the same path are stacked
        on the leading axis. Unmatched names get the default
        (``encoder.fc1`` -> ``params/encoder/fc1/kernel``).

    Raises:
      LoraArgumentError: a rule that is not a ``(regex, template)`` pair of
        strings, or whose regex does not compile.

    Example:
      >>> import lora_jax as lj
      >>> nm = lj.NameMap(
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
            object.__setattr__(self, field, compile_rules(value, field))

    @classmethod
    def coerce(cls, name_map: Any) -> NameMap:
        """A :class:`NameMap` from None, a NameMap, or a function or rules (``to_peft``)."""
        if name_map is None:
            return cls()
        if isinstance(name_map, NameMap):
            return name_map
        if isinstance(name_map, Mapping) and set(name_map) <= {"to_peft", "to_flax"} and name_map:
            return cls(**name_map)
        return cls(to_peft=name_map)

    @classmethod
    def from_json(cls, file: str | os.PathLike) -> NameMap:
        """Reads a name map file: ``[[regex, template], ...]`` (``to_peft`` rules) or
        ``{"to_peft": [...], "to_flax": [...]}``; errors are :class:`~lora_jax.LoraFileError`."""
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
                names = sorted(
                    (k for k in groups if re.fullmatch(r"layer\d*", k)), key=lambda k: (len(k), k)
                )
                return m.expand(template), tuple(int(groups[k]) for k in names)
        return default_to_flax(module, kind), ()


def pattern_key(module: str, modules: Sequence[str]) -> str:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` key that selects exactly ``module``.

    PEFT matches a key ``k`` against module ``n`` as ``re.match(rf"(.*\\.)?({k})$", n)``,
    so a plain name also selects every module ending in ``.name``; ``^`` pins it
    when another module here does.

    Example:
      >>> pattern_key("fc1", ["fc1", "enc.fc1"]), pattern_key("enc.fc1", ["fc1", "enc.fc1"])
      ('^fc1', 'enc\\\\.fc1')
    """
    key = re.escape(module)
    if any(other != module and other.endswith("." + module) for other in modules):
        key = "^" + key
    return key


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)``, else ``default``.

    Example:
      >>> pattern_value({"fc2": 8}, "enc.fc2", 4), pattern_value({"fc2": 8}, "fc1", 4)
      (8, 4)
    """
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def segment_rules(kernel: str, modules: Sequence[str]) -> list[tuple[str, str]]:
    """``to_peft`` rules sending each segment of a fused kernel to its own PyTorch module.

    A fused kernel's per-projection adapters appear to :func:`~lora_jax.export_peft`
    and :func:`~lora_jax.import_peft` at ``<path>/<j>``
    (:func:`~lora_jax.advanced.split_segments`); these rules send segment
    ``j`` of every kernel that ``kernel`` matches to module ``modules[j]``.
    ``import_peft`` with ``params`` needs only ``to_peft`` rules (it inverts them).

    Args:
      kernel: a regex matched in full against the fused kernel's leaf path; its
        groups may be used in the templates (``\\1``).
      modules: one template per segment, in fan-out order; a scan-stacked
        kernel's templates hold one ``{}`` per stacked axis.

    Returns:
      ``[(regex, template), ...]``: pass it as ``NameMap(to_peft=...)``, or add
      it to your own rules.

    Example:
      >>> nm = NameMap(to_peft=segment_rules(r"params/(\\w+)/kv/kernel",
      ...                                    [r"\\1.k_proj", r"\\1.v_proj"]))
      >>> nm.module_for("params/attn/kv/kernel/1")
      'attn.v_proj'
    """
    if isinstance(modules, str) or len(modules) < 2:
        raise LoraArgumentError(
            f"segment_rules: give one PyTorch module template per segment, got {modules!r}"
        )
    compile_rules([(kernel, "")], "to_peft")  # a bad regex fails here, naming it
    return [(f"{kernel}/{j}", template) for j, template in enumerate(modules)]


__all__ = [
    "NameMap",
    "default_to_flax",
    "default_to_peft",
    "fill_layers",
    "pattern_key",
    "pattern_value",
    "segment_rules",
]
