"""Fitting PEFT modules to Flax kernels: the import half of the PEFT format.

A PEFT file holds one module per PyTorch layer, its factors already in
lora_jax's orientation (:class:`~lora_jax._files.peft.tensors.PeftModule`). This
module finds each one's Flax leaf (through a :class:`~lora_jax.NameMap`),
works out the kernel's layout (:func:`infer_layout`: which axes of a Flax
kernel are PyTorch's ``in`` and ``out``), and stacks the modules that are
layers of one scan-stacked kernel into one :class:`~lora_jax.LoraFactors`
(:func:`stack_layers`). :func:`fit_to_params` does it for the leaves of given
params, :func:`fit_without_params` from the module names alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LayerSelection, LoraFactors, column_norm
from lora_jax._errors import LoraArgumentError, LoraBaseMismatchError, LoraFileError
from lora_jax._files.peft.names import NameMap, fill_layers
from lora_jax._files.peft.tensors import PeftModule
from lora_jax._files.safetensors_io import nested_from_paths
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

Layers = list[tuple[tuple[int, ...], PeftModule | None]]
"""A stacked kernel's layers: ``(layer index, its module or None if PEFT left it out)``."""


# --------------------------------------------------------------------------- layouts


def explicit_layout(layouts: Mapping[str, Any] | None, path: str) -> KernelLayout | None:
    """The layout ``layouts`` gives ``path`` (by exact path, else the first full-matching regex).

    Example:
      >>> explicit_layout({r".*/q/kernel": "ioo"}, "params/q/kernel")
      KernelLayout(axes='ioo', kind='dense')
    """
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


def _guess_axes(where: str, shape: tuple[int, ...], n_stack: int, mod: PeftModule) -> str:
    """The layout axes of a kernel of ``shape`` for ``mod``: the one fan-in / fan-out split."""
    rest = shape[n_stack:]
    s = "s" * n_stack
    if mod.kind == "conv":
        return s + "i" * (len(rest) - 1) + "o"
    if mod.kind == "embed":
        return s + "io"
    splits = [
        k
        for k in range(1, len(rest))
        if math.prod(rest[:k]) == math.prod(mod.fan_in) and math.prod(rest[k:]) == mod.fan_out
    ]
    if len(splits) != 1:
        why = "no" if not splits else "more than one"
        raise LoraBaseMismatchError(
            f"{where}: {why} split of the kernel's axes into fan-in {mod.fan_in[0]} and "
            f"fan-out {mod.fan_out} (PyTorch Linear {mod.torch_shape}); give its layout "
            "with layouts={path: KernelLayout(...)}"
        )
    return s + "i" * splits[0] + "o" * (len(rest) - splits[0])


def _fits(layout: KernelLayout, shape: tuple[int, ...], mod: PeftModule) -> bool:
    """Whether a kernel of ``shape`` and ``layout`` has ``mod``'s fan-in and fan-out."""
    fan_in = tuple(shape[a] for a in layout.in_axes)
    fan_out = tuple(shape[a] for a in layout.out_axes)
    if mod.kind == "dense":
        return math.prod(fan_in) == math.prod(mod.fan_in) and math.prod(fan_out) == mod.fan_out
    ok = fan_in == mod.fan_in and fan_out == (mod.fan_out,)
    if mod.kind == "conv":
        ok = ok and re.fullmatch(r"i+o", layout.axes.replace("s", "")) is not None
    return ok


def infer_layout(
    source: Path,
    path: str,
    shape: tuple[int, ...],
    n_stack: int,
    mod: PeftModule,
    layouts: Mapping[str, Any] | None,
) -> KernelLayout:
    """The layout of the Flax kernel at ``path`` that ``mod`` adapts, checked to fit it.

    ``layouts`` (see :func:`explicit_layout`) wins; else conv and embedding
    kernels are ``s..i..io`` / ``s..io`` and a Linear's kernel the one split of
    its axes whose products are PyTorch's ``in`` and ``out``. The kind always
    follows the module. A misfit is a :class:`LoraBaseMismatchError`.
    """
    explicit = explicit_layout(layouts, path)
    where = f"{source}: module {mod.name!r} -> Flax leaf {path!r} (shape {shape})"
    if explicit is not None:
        layout = KernelLayout(explicit.axes, mod.kind)
    else:
        axes = _guess_axes(where, shape, n_stack, mod)
        if len(axes) != len(shape):
            raise LoraBaseMismatchError(
                f"{where}: a PyTorch {mod.kind} module with {len(mod.fan_in)} fan-in axes does not "
                f"fit a {len(shape)}-D kernel"
            )
        layout = KernelLayout(axes, mod.kind)
    if layout.ndim != len(shape):
        raise LoraBaseMismatchError(f"{where}: layout {layout.axes!r} has {layout.ndim} axes")
    if not _fits(layout, shape, mod):
        fan_in = tuple(shape[a] for a in layout.in_axes)
        fan_out = tuple(shape[a] for a in layout.out_axes)
        raise LoraBaseMismatchError(
            f"{where}: the kernel (layout {layout.axes!r}: fan-in {fan_in}, fan-out {fan_out}) "
            f"does not match PyTorch {mod.kind} weight {mod.torch_shape} (tensor {mod.keys[0]!r})"
        )
    return layout


# --------------------------------------------------------------------------- stacking layers


def _check_alike(source: Path, path: str, present: Sequence[PeftModule]) -> None:
    """The layers of one stacked leaf share one kind, rank and alpha."""
    first = present[0]
    for m in present[1:]:
        if (m.kind, m.rank, m.alpha) != (first.kind, first.rank, first.alpha):
            raise LoraFileError(
                f"{source}: modules {first.name!r} (rank {first.rank}, alpha {first.alpha:g}) and "
                f"{m.name!r} (rank {m.rank}, alpha {m.alpha:g}) are layers of the one stacked "
                f"Flax leaf {path!r}, which needs one rank and alpha for all layers"
            )


def _missing_layer(
    source: Path, path: str, leaf: Any, layout: KernelLayout, idx: tuple[int, ...], like: PeftModule
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Factors of a layer PEFT did not adapt: an exactly zero update (DoRA: the base's norm)."""
    shape = tuple(leaf.shape)
    fan_in = tuple(shape[a] for a in layout.in_axes)
    fan_out = tuple(shape[a] for a in layout.out_axes)
    a = np.zeros(fan_in + (like.rank,), like.a.dtype)
    b = np.zeros((like.rank,) + fan_out, like.b.dtype)
    if like.magnitude is None:
        return a, b, None
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise LoraFileError(
            f"{source}: DoRA module for layer {idx} of stacked leaf {path!r} is "
            "missing, and its magnitude (the base weight's norm) needs concrete "
            "base params, not shapes"
        )
    norm = column_norm(jnp.asarray(leaf), layout)[idx]
    return a, b, np.asarray(norm).astype(like.magnitude.dtype)


def stack_layers(
    source: Path,
    path: str,
    leaf: Any,
    layout: KernelLayout,
    layers: Layers,
    rslora: bool,
    dtype: Any,
) -> LoraFactors:
    """One :class:`LoraFactors` for the Flax ``leaf`` from its layers' PEFT modules.

    ``a: (*stack, *fan_in, r)``, ``b: (*stack, r, *fan_out)`` with the fan-in
    and fan-out axes of ``leaf``'s shape under ``layout``. Layers PEFT left
    out become a :class:`LayerSelection` of the adapted ones (one stacked
    axis, no DoRA), else zero factors (DoRA: the base weight's norm as
    magnitude, so ``leaf`` must be concrete).
    """
    shape = tuple(leaf.shape)
    stack = tuple(shape[a] for a in layout.stack_axes)
    fan_in = tuple(shape[a] for a in layout.in_axes)
    fan_out = tuple(shape[a] for a in layout.out_axes)
    present = [m for _, m in layers if m is not None]
    _check_alike(source, path, present)
    first = present[0]
    selection = None
    if len(stack) == 1 and len(present) < len(layers) and first.magnitude is None:
        # layers PEFT left out (layers_to_transform): keep only the adapted ones (layers=)
        selection = LayerSelection(tuple(idx[0] for idx, m in layers if m is not None), stack[0])
        layers = [(idx, m) for idx, m in layers if m is not None]
        stack = (len(layers),)
    a_parts, b_parts, m_parts = [], [], []
    for idx, m in layers:
        if m is None:
            a, b, mag = _missing_layer(source, path, leaf, layout, idx, first)
        else:
            a, b = m.a.reshape(fan_in + (m.rank,)), m.b.reshape((m.rank,) + fan_out)
            mag = None if m.magnitude is None else m.magnitude.reshape(fan_out)
        a_parts.append(a)
        b_parts.append(b)
        if mag is not None:
            m_parts.append(mag)

    def join(parts):
        return np.stack(parts).reshape(stack + parts[0].shape) if stack else parts[0]

    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    return LoraFactors(
        cast(join(a_parts)),
        cast(join(b_parts)),
        alpha=first.alpha,
        layout=layout,
        rslora=rslora,
        magnitude=cast(join(m_parts)) if m_parts else None,
        layers=selection,
    )


# --------------------------------------------------------------------------- with params


def _leaf_layers(
    path: str,
    shape: tuple[int, ...],
    template: str,
    modules: Mapping[str, PeftModule],
    layouts: Mapping[str, Any] | None,
) -> Layers:
    """The modules of every layer of one Flax leaf, by filling its module-name template."""
    holes = template.count("{}")
    explicit = explicit_layout(layouts, path)
    stack_axes = explicit.stack_axes if explicit is not None else tuple(range(holes))
    if len(stack_axes) != holes:
        raise LoraArgumentError(
            f"leaf {path!r}: its module name {template!r} has {holes} '{{}}' but its "
            f"layout {explicit.axes if explicit else None!r} has {len(stack_axes)} stacked axes"
        )
    index = list(np.ndindex(*(shape[a] for a in stack_axes))) if holes else [()]
    return [(idx, modules.get(fill_layers(template, idx))) for idx in index]


def fit_to_params(
    weights: Path,
    modules: Mapping[str, PeftModule],
    params: Any,
    nm: NameMap,
    layouts: Mapping[str, Any] | None,
    rslora: bool,
    dtype: Any,
    saved: Mapping[str, Any] | None = None,
) -> Any:
    """A delta with ``params``' structure: factors at each leaf some module maps to, the
    ``saved`` entry (a ``LeafDelta`` of a modules_to_save tensor) at its leaf, else None.

    Every module must map to exactly one leaf (:class:`LoraFileError` for a
    module that maps to none, :class:`LoraArgumentError` when the name map
    sends two leaves to one module).
    """
    leaves, treedef = leaves_with_paths(params)
    used: dict[str, str] = {}
    out = []
    for leaf_path, leaf in leaves:
        if saved and leaf_path in saved:
            out.append(saved[leaf_path])
            continue
        template = nm.module_for(leaf_path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not template or len(shape) < 2:  # no PyTorch twin, or not a kernel
            out.append(None)
            continue
        layers = _leaf_layers(leaf_path, shape, template, modules, layouts)
        present = [m for _, m in layers if m is not None]
        if not present:
            out.append(None)
            continue
        for m in present:
            if m.name in used:
                raise LoraArgumentError(
                    f"{weights}: module {m.name!r} maps to two Flax leaves, {used[m.name]!r} and "
                    f"{leaf_path!r}; make the name map tell them apart"
                )
            used[m.name] = leaf_path
        layout = infer_layout(weights, leaf_path, shape, template.count("{}"), present[0], layouts)
        out.append(stack_layers(weights, leaf_path, leaf, layout, layers, rslora, dtype))
    _check_all_used(weights, modules, used, leaves, nm)
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_all_used(
    weights: Path,
    modules: Mapping[str, PeftModule],
    used: Mapping[str, str],
    leaves: list[tuple[str, Any]],
    nm: NameMap,
) -> None:
    """Every module of the file found a Flax leaf."""
    unused = [m for m in modules if m not in used]
    if unused:
        sample = [
            (p, nm.module_for(p)) for p, leaf in leaves if len(getattr(leaf, "shape", ())) >= 2
        ]
        raise LoraFileError(
            f"{weights}: module {unused[0]!r} ({len(unused)} in all) matches no leaf of the "
            f"params under the name map; Flax leaves map to e.g. {sample[:4]} -- give "
            "name_map= rules (Flax path regex -> PyTorch module name)"
        )


# --------------------------------------------------------------------------- without params


def _group_by_path(
    weights: Path, modules: Mapping[str, PeftModule], nm: NameMap
) -> dict[str, list[tuple[tuple[int, ...], PeftModule]]]:
    """``{Flax path: [(layer index, module), ...]}`` through ``nm.path_for``."""
    groups: dict[str, list[tuple[tuple[int, ...], PeftModule]]] = {}
    for name, mod in modules.items():
        mapped = nm.path_for(name, mod.kind)
        if mapped is None:
            raise LoraFileError(f"{weights}: the name map gives no Flax path for module {name!r}")
        groups.setdefault(mapped[0], []).append((mapped[1], mod))
    return groups


def _stack_shape(
    weights: Path, path: str, items: list[tuple[tuple[int, ...], PeftModule]]
) -> tuple[int, ...]:
    """The stacked axes of one Flax path's modules, checked to leave no layer out."""
    names = [m.name for _, m in items]
    n = {len(idx) for idx, _ in items}
    if len(n) != 1:
        raise LoraFileError(
            f"{weights}: modules {names} map to Flax leaf {path!r} with and without layer indices"
        )
    n_stack = n.pop()
    if n_stack == 0 and len(items) > 1:
        raise LoraFileError(
            f"{weights}: modules {names} all map to Flax leaf {path!r}; name a "
            "(?P<layer>\\d+) group to stack them"
        )
    stack = tuple(max(idx[k] for idx, _ in items) + 1 for k in range(n_stack))
    have = {idx for idx, _ in items}
    missing = [idx for idx in np.ndindex(*stack) if idx not in have] if n_stack else []
    if missing:
        raise LoraFileError(
            f"{weights}: layer {missing[0]} of stacked Flax leaf {path!r} has no module; "
            "pass params= so missing layers can be filled"
        )
    return stack


def fit_without_params(
    weights: Path, modules: Mapping[str, PeftModule], nm: NameMap, rslora: bool, dtype: Any
) -> dict:
    """A nested dict of the targets only, each path from ``nm.path_for``.

    A Linear becomes a 2-D ``(in, out)`` kernel, a conv ``(*window, in, out)``,
    an embedding ``(vocab, dim)``; modules with layer indices are stacked on
    leading axes.
    """
    factors = {}
    for path, items in _group_by_path(weights, modules, nm).items():
        stack = _stack_shape(weights, path, items)
        mod = items[0][1]
        rest: tuple[int, ...]
        if mod.kind == "dense":
            rest, axes = (mod.fan_in[0], mod.fan_out), "io"
        else:
            rest, axes = mod.fan_in + (mod.fan_out,), "i" * len(mod.fan_in) + "o"
        layout = KernelLayout("s" * len(stack) + axes, mod.kind)
        leaf = jax.ShapeDtypeStruct(stack + rest, mod.a.dtype)
        by_index = dict(items)
        layers: list[tuple[tuple[int, ...], Any]] = [
            (idx, by_index[idx]) for idx in (np.ndindex(*stack) if stack else [()])
        ]
        factors[path] = stack_layers(weights, path, leaf, layout, layers, rslora, dtype)
    return nested_from_paths(factors, where=str(weights))


__all__ = ["explicit_layout", "fit_to_params", "fit_without_params", "infer_layout", "stack_layers"]
