"""Expert kernels in PEFT's ``target_parameters`` layout (``ParamWrapper``), both ways.

Mixture-of-experts models in transformers v5 keep each layer's experts in 3-D
``nn.Parameter``s (Qwen3-MoE's ``mlp.experts.gate_up_proj: (E, 2I, H)`` and
``mlp.experts.down_proj: (E, H, I)``, PyTorch's ``(E, out, in)`` order;
gpt-oss stores ``(E, in, out)`` and marks its module ``is_transposed``). PEFT
adapts such a parameter with ``target_parameters`` and a ``ParamWrapper``
(``peft/tuners/lora/layer.py``) holding two ``nn.Linear``:

=========================  ===========================  ====================================
PEFT tensor                shape                        lora_jax factor (layout ``"eio"``)
=========================  ===========================  ====================================
``lora_A.weight``          ``(r * E, in)``,             ``a (E, in, r)``:
                           expert-major rows            ``a[e, i, k] = A[e * r + k, i]``
``lora_B.weight``          ``(out, r * E)``,            ``b (E, r, out)``:
                           rank-major columns           ``b[e, k, o] = B[o, k * E + e]``
=========================  ===========================  ====================================

(``get_delta_weight`` reshapes ``A`` to ``(E, r, in)`` but ``B`` to
``(out, r, E)``; the delta of expert ``e`` is ``scaling * a[e] @ b[e]`` with
``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``.) ``in`` and
``out`` are the expert's true fan-in and fan-out whether the PyTorch parameter
is ``(E, out, in)`` or transposed, so the tensors map to the ``(E, in, out)``
Flax kernel the same way in both cases.

**Names.** The name map sends an expert kernel's Flax path to the PyTorch
*parameter* (``model.layers.{}.mlp.experts.gate_up_proj``; ``{}`` per stacked
axis, as for modules). File keys carry no parameter name: when several
parameters of one module are targeted, PEFT nests the wrappers, the
parameter registered first innermost, so its tensors sit under the most
``base_layer.`` segments (``...experts.base_layer.lora_A.weight`` is
``gate_up_proj``, ``...experts.lora_A.weight`` is ``down_proj``). lora_jax
orders a module's parameters as transformers registers them in its MoE
models (:data:`PARAMETER_ORDER`: gate / up before down, then the rest in the
config's ``target_parameters`` order); on import with params, the shapes
decide when that order does not fit them. ``rank_pattern`` /
``alpha_pattern`` keys match the parameter's full name, as in PEFT.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LoraFactors
from lora_jax._errors import LoraBaseMismatchError, LoraFileError, LoraStructureError
from lora_jax._files.peft.names import NameMap, fill_layers, pattern_value
from lora_jax._files.peft.tensors import PEFT_PREFIX, Part, PeftModule
from lora_jax._files.safetensors_io import nested_from_paths, to_numpy
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

EXPERTS = "experts"
"""The :class:`PeftModule` kind of a ``ParamWrapper`` (one targeted expert parameter)."""

PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2")
"""Expert parameter names in the order transformers' MoE modules register them (the
order PEFT nests their wrappers in, first innermost); other names follow, in the
config's ``target_parameters`` order."""

_WRAPPED = ".base_layer"


def is_expert_layout(layout: KernelLayout) -> bool:
    """Whether a layout has an experts axis (``'e'``).

    Example:
      >>> is_expert_layout(KernelLayout("io"))
      False
    """
    return "e" in layout.axes


def _split_name(name: str) -> tuple[str, str]:
    """``(module, parameter)`` of a parameter's full name."""
    module, _, param = name.rpartition(".")
    return module, param


def nesting(params: Sequence[str]) -> list[str]:
    """A module's targeted parameters (short names) in PEFT's nesting order, innermost first.

    Example:
      >>> nesting(["down_proj", "router_bias", "gate_up_proj"])
      ['gate_up_proj', 'down_proj', 'router_bias']
    """
    known = {p: n for n, p in enumerate(PARAMETER_ORDER)}
    return sorted(params, key=lambda p: (known.get(p, len(known)), params.index(p)))


# --------------------------------------------------------------------------- lora_jax -> PEFT


def expert_layer(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's ``a (E, in, r)``, ``b (E, r, out)`` as PEFT's ``lora_A.weight (r*E, in)``
    (expert-major) and ``lora_B.weight (out, r*E)`` (rank-major).

    Example:
      >>> A, B = expert_layer(np.zeros((3, 5, 2)), np.zeros((3, 2, 7)))
      >>> A.shape, B.shape
      ((6, 5), (7, 6))
    """
    e, i, r = a.shape
    o = b.shape[-1]
    A = np.transpose(a, (0, 2, 1)).reshape(e * r, i)
    B = np.transpose(b, (2, 1, 0)).reshape(o, r * e)
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def _check_expert_layout(path: str, layout: KernelLayout) -> None:
    """An expert kernel exports as one PEFT ``ParamWrapper`` per layer: ``s..eio``."""
    if not re.fullmatch(r"s*eio", layout.axes):
        raise LoraStructureError(
            f"leaf {path!r}: an expert kernel exports to PEFT's target_parameters as "
            f"(experts, in, out) after its stacked axes (layout 's..eio'); layout is "
            f"{layout.axes!r}"
        )
    if layout.kind != "dense":
        raise LoraStructureError(f"leaf {path!r}: an expert kernel of kind {layout.kind!r}")


def expert_tensors(
    targets: Sequence[tuple[str, LoraFactors, str]],
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, float, str]]]:
    """``({PEFT key: array}, {parameter name: (rank, alpha, leaf)})`` of expert targets.

    ``targets``: ``(Flax path, factors, parameter-name template)``; the
    template holds one ``{}`` per stacked axis. The wrappers of one module are
    nested in :func:`nesting` order (keys of the innermost carry the most
    ``base_layer.``).
    """
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    info: dict[str, tuple[int, float, str]] = {}
    for path, f, template in targets:
        _check_expert_layout(path, f.layout)
        if f.magnitude is not None:
            raise LoraStructureError(
                f"leaf {path!r}: DoRA on an expert kernel has no PEFT form (ParamWrapper "
                "refuses use_dora)"
            )
        n = len(f.layout.stack_axes)
        a, b = to_numpy(f.a), to_numpy(f.b)
        for idx in np.ndindex(*a.shape[:n]):
            index = tuple(int(i) for i in idx)
            if f.layers is not None:
                index = (f.layers.indices[index[0]],) + index[1:]
            name = fill_layers(template, index)
            if name in info:
                raise LoraStructureError(
                    f"export_peft: targets {info[name][2]!r} and {path!r} both map to "
                    f"PyTorch parameter {name!r}"
                )
            info[name] = (f.rank, float(f.alpha), path)
            arrays[name] = expert_layer(a[idx], b[idx])
    by_module: dict[str, list[str]] = {}
    for name in info:
        module, param = _split_name(name)
        by_module.setdefault(module, []).append(param)
    tensors: dict[str, np.ndarray] = {}
    for module, params in by_module.items():
        order = nesting(params)
        for depth, param in enumerate(order):
            wrapped = module + _WRAPPED * (len(order) - 1 - depth)
            A, B = arrays[f"{module}.{param}"]
            tensors[f"{PEFT_PREFIX}{wrapped}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{wrapped}.lora_B.weight"] = B
    return tensors, info


def target_parameters(names: Sequence[str], others: Sequence[str]) -> list[str]:
    """PEFT's ``target_parameters`` for the adapted parameters ``names``: each one's last three
    names (``mlp.experts.gate_up_proj``) where that selects none of ``others`` (the model's other
    known names), else its full name, in nesting order.

    PEFT selects a parameter ``n`` by an entry ``k`` when ``n == k`` or
    ``n.endswith("." + k)``.

    Example:
      >>> target_parameters(["m.layers.0.mlp.experts.down_proj",
      ...                    "m.layers.0.mlp.experts.gate_up_proj"], [])
      ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']
    """
    adapted = set(names)
    rest = [o for o in others if o not in adapted]
    out: list[str] = []
    for name in names:
        parts = name.split(".")
        short = ".".join(parts[-3:]) if len(parts) >= 3 else name
        if any(o == short or o.endswith("." + short) for o in rest):
            short = name
        if short not in out:
            out.append(short)
    params = [s.rpartition(".")[2] for s in out]
    order = nesting(list(dict.fromkeys(params)))
    return sorted(out, key=lambda s: (order.index(s.rpartition(".")[2]), s))


# --------------------------------------------------------------------------- PEFT -> lora_jax


def _entries(cfg: Mapping[str, Any]) -> list[str]:
    """``target_parameters`` as a list (``read_peft_config`` has checked it: names, or one)."""
    entries = cfg.get("target_parameters") or []
    return [entries] if isinstance(entries, str) else list(entries)


def _wrapped_params(module: str, entries: Sequence[str]) -> list[str]:
    """The parameter short names ``target_parameters`` selects on ``module``, config order."""
    out: list[str] = []
    for entry in entries:
        target_module, _, param = entry.rpartition(".")
        if (module == target_module or module.endswith("." + target_module)) and param not in out:
            out.append(param)
    return out


def split_wrapper_parts(
    weights: Path, cfg: Mapping[str, Any], parts: Mapping[str, Mapping[str, Part]]
) -> tuple[dict[str, dict[str, Part]], dict[str, PeftModule]]:
    """Separates the ``ParamWrapper`` tensors of a PEFT file from its modules'.

    ``parts``: ``{module: {role: part}}`` as read from the file, where a
    nested wrapper's module name ends in ``.base_layer`` (once per level).
    Returns the other modules' parts and ``{parameter name: PeftModule}`` of
    kind ``"experts"`` with ``a (E, in, r)``, ``b (E, r, out)``, rank from
    ``r`` / ``rank_pattern`` (matched against the parameter's full name) and
    ``torch_shape`` ``(E, out, in)``.
    """
    entries = _entries(cfg)
    if not entries:
        return {k: dict(v) for k, v in parts.items()}, {}
    for entry in entries:
        if "." not in entry:
            raise LoraFileError(
                f"{weights.parent / 'adapter_config.json'}: target_parameters entry {entry!r} "
                "names no module; lora_jax reads entries of the form 'module.parameter' "
                "(e.g. 'mlp.experts.gate_up_proj'), which tell the wrapped module's tensors apart"
            )
    groups: dict[str, dict[int, Mapping[str, Part]]] = {}
    rest: dict[str, dict[str, Part]] = {}
    for name, roles in parts.items():
        module, depth = name, 0
        while module.endswith(_WRAPPED):
            module, depth = module[: -len(_WRAPPED)], depth + 1
        if _wrapped_params(module, entries):
            groups.setdefault(module, {})[depth] = roles
        else:
            rest[name] = dict(roles)
    wrappers: dict[str, PeftModule] = {}
    for module, by_depth in groups.items():
        params = nesting(_wrapped_params(module, entries))
        if sorted(by_depth) != list(range(len(params))):
            raise LoraFileError(
                f"{weights}: module {module!r} has ParamWrapper tensors at nesting depths "
                f"{sorted(by_depth)} ('.base_layer' levels), but target_parameters selects "
                f"{len(params)} of its parameters ({params})"
            )
        for depth, roles in by_depth.items():
            name = f"{module}.{params[len(params) - 1 - depth]}"
            wrappers[name] = _wrapper_module(weights, cfg, name, roles)
    return rest, wrappers


def _wrapper_module(
    weights: Path, cfg: Mapping[str, Any], name: str, roles: Mapping[str, Part]
) -> PeftModule:
    """One ``ParamWrapper``'s ``lora_A`` / ``lora_B`` as a :class:`PeftModule` of kind experts."""
    for role in ("A", "B"):
        if role not in roles:
            raise LoraFileError(f"{weights}: parameter {name!r} has no lora_{role} tensor")
    if "M" in roles:
        raise LoraFileError(
            f"{weights}: parameter {name!r} has a DoRA magnitude; PEFT's ParamWrapper has no DoRA"
        )
    (ka, A, emb), (kb, B, _) = roles["A"], roles["B"]
    if emb or A.ndim != 2 or B.ndim != 2:
        raise LoraFileError(
            f"{weights}: {ka!r} {A.shape} and {kb!r} {B.shape} are not a ParamWrapper's "
            "lora_A (r*E, in) and lora_B (out, r*E)"
        )
    r = int(pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
    if A.shape[0] % r or B.shape[1] != A.shape[0]:
        raise LoraFileError(
            f"{weights}: parameter {name!r}: {ka!r} {A.shape} and {kb!r} {B.shape} do not "
            f"hold rank {r} (r / rank_pattern) per expert: expected (r*E, in) and (out, r*E)"
        )
    e = A.shape[0] // r
    a = A.reshape(e, r, A.shape[1]).transpose(0, 2, 1)  # (E, in, r)
    b = B.reshape(B.shape[0], r, e).transpose(2, 1, 0)  # (E, r, out)
    alpha = float(pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    return PeftModule(
        name,
        EXPERTS,
        np.ascontiguousarray(a),
        np.ascontiguousarray(b),
        None,
        r,
        alpha,
        (ka, kb),
        (e, B.shape[0], A.shape[1]),
    )


def _fits(shape: tuple[int, ...], mod: PeftModule) -> bool:
    """Whether an ``(E, in, out)`` kernel shape fits an experts module."""
    return len(shape) == 3 and shape == (mod.a.shape[0], mod.a.shape[1], mod.b.shape[2])


def _leaf_wrappers(
    weights: Path,
    leaf_path: str,
    shape: tuple[int, ...],
    template: str,
    wrappers: Mapping[str, PeftModule],
) -> list[tuple[tuple[int, ...], PeftModule | None]]:
    """The wrappers of every layer of one expert leaf (``None`` where PEFT left a layer out)."""
    n = template.count("{}")
    index = list(np.ndindex(*shape[:n])) if n else [()]
    layers = [(idx, wrappers.get(fill_layers(template, idx))) for idx in index]
    present = [m for _, m in layers if m is not None]
    if present and len(shape) - n != 3:
        raise LoraFileError(
            f"{weights}: target_parameters adapts PyTorch parameter {present[0].name!r} as "
            f"experts, but its Flax leaf {leaf_path!r} has shape {shape}: "
            f"{len(shape) - n}-D after {n} stacked axes, where an expert stack is 3-D "
            "(experts, in, out)"
        )
    return layers


def reassign_by_shape(
    weights: Path, wrappers: dict[str, PeftModule], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, PeftModule]:
    """The wrappers of each module re-paired with its parameters when the nesting order
    does not fit the Flax kernels' shapes but exactly one other pairing does.

    ``shapes``: ``{parameter name: (E, in, out)}`` of the Flax kernels the name map sends
    there (one layer's). Modules whose every parameter's shape is unknown keep their order.
    """
    by_module: dict[str, list[str]] = {}
    for name in wrappers:
        by_module.setdefault(_split_name(name)[0], []).append(name)
    out = dict(wrappers)
    for names in by_module.values():
        if not all(n in shapes for n in names):
            continue
        if all(_fits(shapes[n], wrappers[n]) for n in names):
            continue
        fitting = [
            perm
            for perm in itertools.permutations(names)
            if all(_fits(shapes[n], wrappers[p]) for n, p in zip(names, perm))
        ]
        if len(fitting) != 1:
            first = next(n for n in names if not _fits(shapes[n], wrappers[n]))
            m = wrappers[first]
            raise LoraBaseMismatchError(
                f"{weights}: PyTorch parameter {first!r} (tensor {m.keys[0]!r}: "
                f"{m.a.shape[0]} experts, in {m.a.shape[1]}, out {m.b.shape[2]}) does not fit "
                f"its Flax kernel {shapes[first]}"
                + ("" if not fitting else ", and its module's parameters pair up in more ways")
            )
        for n, p in zip(names, fitting[0]):
            out[n] = PeftModule(
                n, EXPERTS, wrappers[p].a, wrappers[p].b, None, wrappers[p].rank,
                wrappers[p].alpha, wrappers[p].keys, wrappers[p].torch_shape,
            )  # fmt: skip
    return out


def fit_expert_leaf(
    weights: Path,
    leaf_path: str,
    leaf: Any,
    template: str,
    wrappers: Mapping[str, PeftModule],
    rslora: bool,
    dtype: Any,
) -> tuple[LoraFactors | None, list[str]]:
    """``(factors, parameter names used)`` of one Flax expert leaf ``(*stack, E, in, out)``,
    layout ``s..eio``; layers PEFT left out get zero factors (an exactly zero update)."""
    shape = tuple(leaf.shape)
    layers = _leaf_wrappers(weights, leaf_path, shape, template, wrappers)
    present = [m for _, m in layers if m is not None]
    if not present:
        return None, []
    n = template.count("{}")
    first = present[0]
    for m in present:
        if not _fits(shape[n:], m):
            raise LoraBaseMismatchError(
                f"{weights}: PyTorch parameter {m.name!r} (tensor {m.keys[0]!r}: "
                f"{m.a.shape[0]} experts, in {m.a.shape[1]}, out {m.b.shape[2]}) does not fit "
                f"Flax leaf {leaf_path!r} of shape {shape} (layout {'s' * n + 'eio'!r})"
            )
        if (m.rank, m.alpha) != (first.rank, first.alpha):
            raise LoraFileError(
                f"{weights}: parameters {first.name!r} (rank {first.rank}, alpha "
                f"{first.alpha:g}) and {m.name!r} (rank {m.rank}, alpha {m.alpha:g}) are layers "
                f"of the one stacked Flax leaf {leaf_path!r}, which needs one rank and alpha"
            )
    e, i, o = shape[n:]
    a_parts, b_parts = [], []
    for _, layer in layers:
        if layer is None:
            a_parts.append(np.zeros((e, i, first.rank), first.a.dtype))
            b_parts.append(np.zeros((e, first.rank, o), first.b.dtype))
        else:
            a_parts.append(layer.a)
            b_parts.append(layer.b)
    stack = shape[:n]
    a = np.stack(a_parts).reshape(stack + a_parts[0].shape)
    b = np.stack(b_parts).reshape(stack + b_parts[0].shape)
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    layout = KernelLayout("s" * n + "eio")
    factors = LoraFactors(cast(a), cast(b), alpha=first.alpha, layout=layout, rslora=rslora)
    return factors, [m.name for m in present]


def expert_shapes(
    params_leaves: Sequence[tuple[str, Any]], nm: NameMap, wrappers: Mapping[str, PeftModule]
) -> dict[str, tuple[int, ...]]:
    """``{parameter name: one layer's (E, in, out)}`` for the wrappers the leaves map to."""
    out: dict[str, tuple[int, ...]] = {}
    for path, leaf in params_leaves:
        template = nm.module_for(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not template or len(shape) < 3:
            continue
        n = template.count("{}")
        for idx in np.ndindex(*shape[:n]) if n else [()]:
            name = fill_layers(template, idx)
            if name in wrappers:
                out[name] = shape[n:]
    return out


def experts_without_params(
    weights: Path, wrappers: Mapping[str, PeftModule], nm: NameMap, rslora: bool, dtype: Any
) -> dict:
    """A nested dict of the expert targets only, each ``(*stack, E, in, out)`` factors at the
    path ``nm.path_for(parameter, "experts")`` gives (default: the parameter's name with
    ``/`` for ``.`` under ``params/``)."""
    groups: dict[str, list[tuple[tuple[int, ...], PeftModule]]] = {}
    for name, mod in wrappers.items():
        if nm.to_flax is None:
            mapped: tuple[str, tuple[int, ...]] | None = ("params/" + name.replace(".", "/"), ())
        else:
            mapped = nm.path_for(name, EXPERTS)
        if mapped is None:
            raise LoraFileError(
                f"{weights}: the name map gives no Flax path for parameter {name!r}"
            )
        groups.setdefault(mapped[0], []).append((mapped[1], mod))
    factors = {}
    for path, items in groups.items():
        n = {len(idx) for idx, _ in items}
        if len(n) != 1 or (n == {0} and len(items) > 1):
            raise LoraFileError(
                f"{weights}: parameters {[m.name for _, m in items]} map to Flax leaf {path!r} "
                "without one layer index each"
            )
        k = n.pop()
        stack = tuple(max(idx[j] for idx, _ in items) + 1 for j in range(k))
        mod = items[0][1]
        shape = stack + (mod.a.shape[0], mod.a.shape[1], mod.b.shape[2])
        by_index = {idx: m for idx, m in items}
        template = "{}." * k + "x"
        named = {fill_layers(template, idx): m for idx, m in by_index.items()}
        leaf = jax.ShapeDtypeStruct(shape, mod.a.dtype)
        f, _ = fit_expert_leaf(weights, path, leaf, template, named, rslora, dtype)
        factors[path] = f
    return nested_from_paths(factors, where=str(weights))


def fit_experts(
    weights: Path,
    wrappers: Mapping[str, PeftModule],
    params: Any,
    nm: NameMap,
    rslora: bool,
    dtype: Any,
) -> dict[str, LoraFactors]:
    """``{Flax leaf path: LoraFactors}`` of the expert leaves of ``params`` the wrappers adapt.

    Every wrapper must find a leaf (:class:`LoraFileError` naming the parameter
    otherwise); a leaf that is not an expert stack ``(*stack, E, in, out)`` is a
    :class:`LoraFileError` naming it.
    """
    if not wrappers:
        return {}
    leaves = leaves_with_paths(params)[0]
    wrappers = reassign_by_shape(weights, dict(wrappers), expert_shapes(leaves, nm, wrappers))
    out: dict[str, LoraFactors] = {}
    used: set[str] = set()
    for path, leaf in leaves:
        template = nm.module_for(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not template or not shape:
            continue
        if len(shape) < template.count("{}"):
            continue
        factors, names = fit_expert_leaf(weights, path, leaf, template, wrappers, rslora, dtype)
        if factors is not None:
            out[path] = factors
            used.update(names)
    unused = [n for n in wrappers if n not in used]
    if unused:
        raise LoraFileError(
            f"{weights}: PyTorch parameter {unused[0]!r} ({len(unused)} in all, from "
            "target_parameters) matches no leaf of the params under the name map; map the "
            "expert kernel's Flax path to the parameter's full name (e.g. "
            "'model.layers.{}.mlp.experts.gate_up_proj')"
        )
    return out


def merge_nested(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves, as one.

    Example:
      >>> merge_nested({"p": {"x": 1}}, {"p": {"y": 2}})
      {'p': {'x': 1, 'y': 2}}
    """
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_nested(out[k], v) if isinstance(v, dict) and k in out else v
    return out


__all__ = [
    "EXPERTS",
    "PARAMETER_ORDER",
    "expert_layer",
    "expert_shapes",
    "expert_tensors",
    "experts_without_params",
    "fit_expert_leaf",
    "fit_experts",
    "merge_nested",
    "is_expert_layout",
    "nesting",
    "reassign_by_shape",
    "split_wrapper_parts",
    "target_parameters",
]
