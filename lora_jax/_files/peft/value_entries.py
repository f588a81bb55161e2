"""PEFT's ``lora_bias`` and ``trainable_token_indices`` <-> :class:`~lora_jax.LoraBias` and
:class:`~lora_jax.TokenRows`, both ways.

**lora_bias.** With ``lora_bias: true`` every LoRA module's ``lora_B`` is an
``nn.Linear(r, out, bias=True)``, saved as ``<module>.lora_B.bias`` ``(out,)``;
the layer computes ``x W + c + s (x A B + b)``. lora_jax holds ``b`` as a
:class:`~lora_jax.LoraBias` at the Flax ``bias`` leaf beside the kernel (same
parent), whose own ``scale`` is ``s``. A scan-stacked kernel's modules
(``layers.N.<name>``) stack into a bias of shape ``(*stack, *fan_out)``; an
N-D kernel's ``(out,)`` reshapes to its fan-out axes. PEFT gives every
targeted module a ``lora_B`` bias (and refuses a layer without a base bias),
so export writes zeros for a targeted kernel whose bias has no
``LoraBias``, and refuses a targeted kernel without a bias leaf.

**trainable_token_indices.** PEFT wraps the embedding in a
``TrainableTokensWrapper`` and saves the trained rows whole, as
``<module>.token_adapter.trainable_tokens_delta`` ``(k, dim)`` (despite the
name, the rows' new values, which PEFT *sets* into the table); the config
holds ``{module: [indices]}`` (or a bare list, meaning the input embedding).
A tied output head shares the embedding's adapter and saves nothing of its
own. lora_jax stores ``diff = rows - W[indices]`` (:class:`~lora_jax.TokenRows`),
so import and export need the concrete base params, as ``modules_to_save``
does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LoraBias, LoraFactors, TokenRows, delta_entries
from lora_jax._errors import LoraFileError, LoraStructureError
from lora_jax._files.peft.names import NameMap, fill_layers
from lora_jax._files.safetensors_io import open_safetensors, read_tensor, tensor_info, to_numpy
from lora_jax._paths import leaves_with_paths

BIAS_SUFFIX = ".lora_B.bias"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def is_value_key(name: str) -> bool:
    """Whether a PEFT tensor name (prefix dropped) is a ``lora_B`` bias or trainable tokens.

    Example:
      >>> is_value_key("fc.lora_B.bias"), is_value_key("emb" + TOKENS_SUFFIX)
      (True, True)
      >>> is_value_key("fc.lora_B.weight")
      False
    """
    return name.endswith((BIAS_SUFFIX, TOKENS_SUFFIX))


def _layer_indices(f: LoraFactors) -> list[tuple[int, ...]]:
    """The stacked-layer indices of a kernel's modules (``[()]`` when not stacked)."""
    stack = [f.kernel_shape[ax] for ax in f.layout.stack_axes]
    if f.layers is not None:
        return [(i,) + rest for i in f.layers.indices for rest in np.ndindex(*stack[1:])]
    return list(np.ndindex(*stack))


def _bias_path(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0] + "/bias" if "/" in kernel_path else "bias"


# --------------------------------------------------------------------------- import


def read_value_tensors(weights: Path, prefix: str) -> tuple[dict, dict]:
    """``({module: lora_B bias}, {module: token rows})`` of a PEFT file."""
    biases, tokens = {}, {}
    with open_safetensors(weights) as f:
        for key in tensor_info(f):
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if name.endswith(BIAS_SUFFIX):
                biases[name[: -len(BIAS_SUFFIX)]] = read_tensor(f, weights, key)
            elif name.endswith(TOKENS_SUFFIX):
                tokens[name[: -len(TOKENS_SUFFIX)]] = read_tensor(f, weights, key)
    return biases, tokens


def _token_indices(cfg_path: Path, value: Any, modules: list[str]) -> dict[str, tuple[int, ...]]:
    """``{module: indices}`` from ``trainable_token_indices`` (a list: the one embedding's;
    a dict: PEFT's key matching, ``module == key`` or ``module.endswith("." + key)``)."""

    def checked(indices: Any, what: str) -> tuple[int, ...]:
        if not (
            isinstance(indices, list)
            and indices
            and all(type(i) is int and i >= 0 for i in indices)
            and len(set(indices)) == len(indices)
        ):
            raise LoraFileError(
                f"{cfg_path}: key 'trainable_token_indices' {what} is {str(indices)[:60]}; "
                "expected a non-empty list of distinct row indices >= 0"
            )
        return tuple(indices)

    if isinstance(value, list):
        if len(modules) != 1:
            raise LoraFileError(
                f"{cfg_path}: key 'trainable_token_indices' is a list (the input embedding's "
                f"rows) but the file holds trainable tokens of {len(modules)} modules {modules}"
            )
        return {modules[0]: checked(value, "")}
    if not isinstance(value, dict):
        raise LoraFileError(
            f"{cfg_path}: key 'trainable_token_indices' is {str(value)[:60]}; expected a list or "
            "an object {module: [indices]}"
        )
    out = {}
    for module in modules:
        keys = [k for k in value if module == k or module.endswith("." + k)]
        if not keys:
            raise LoraFileError(
                f"{cfg_path}: the file holds trainable tokens of module {module!r}, which key "
                f"'trainable_token_indices' ({sorted(value)}) does not name"
            )
        out[module] = checked(value[keys[0]], f"entry {keys[0]!r}")
    return out


def import_value_entries(
    weights: Path,
    cfg: dict,
    delta: Any,
    params: Any,
    nm: NameMap,
    dtype: Any,
    check_finite: bool,
) -> Any:
    """``delta`` (from the LoRA modules) with a :class:`LoraBias` at the bias beside each
    kernel whose modules have ``lora_B`` biases and :class:`TokenRows` at each embedding
    with trainable tokens. Every error is a :class:`LoraFileError` naming the file."""
    from lora_jax._files.peft.tensors import PEFT_PREFIX

    cfg_path = weights.parent / "adapter_config.json"
    biases, tokens = read_value_tensors(weights, PEFT_PREFIX)
    if biases and not cfg.get("lora_bias", False):
        raise LoraFileError(
            f"{weights}: tensor {PEFT_PREFIX}{sorted(biases)[0]}{BIAS_SUFFIX} is a lora_B bias but "
            f"{cfg_path.name} has lora_bias={cfg.get('lora_bias', False)}"
        )
    if cfg.get("lora_bias", False) and not biases:
        raise LoraFileError(
            f"{weights}: has no lora_B.bias tensors but {cfg_path.name} has lora_bias=true"
        )
    if bool(tokens) != bool(cfg.get("trainable_token_indices")):
        raise LoraFileError(
            f"{weights}: {'has' if tokens else 'has no'} trainable_tokens_delta tensors but "
            f"{cfg_path.name} has trainable_token_indices="
            f"{str(cfg.get('trainable_token_indices'))[:40]}"
        )
    if not biases and not tokens:
        return delta
    if check_finite:
        for module, array in list(biases.items()) + list(tokens.items()):
            if not np.isfinite(np.asarray(array, np.float32)).all():
                raise LoraFileError(f"{weights}: the tensors of module {module!r} hold NaN or Inf")
    leaves, treedef = leaves_with_paths(params)
    entries = dict(zip([p for p, _ in leaves], treedef.flatten_up_to(delta)))
    base = dict(leaves)
    if biases:
        _import_biases(weights, biases, delta, base, entries, nm, dtype)
    if tokens:
        indices = _token_indices(cfg_path, cfg.get("trainable_token_indices"), sorted(tokens))
        _import_tokens(weights, tokens, indices, base, entries, nm, dtype)
    return jax.tree_util.tree_unflatten(treedef, [entries[p] for p, _ in leaves])


def _import_biases(
    weights: Path,
    biases: dict,
    delta: Any,
    base: Mapping[str, Any],
    entries: dict,
    nm: NameMap,
    dtype: Any,
) -> None:
    used = set()
    for path, f in delta_entries(delta):
        if not isinstance(f, LoraFactors):
            continue
        template = nm.module_for(path) or ""
        layers = [(idx, fill_layers(template, idx)) for idx in _layer_indices(f)]
        present = [(idx, m) for idx, m in layers if m in biases]
        if not present:
            continue
        bias_path = _bias_path(path)
        if bias_path not in base:
            raise LoraFileError(
                f"{weights}: module {present[0][1]!r} has a lora_B bias, but its Flax kernel "
                f"{path!r} has no bias leaf {bias_path!r} beside it to add s * b to"
            )
        if entries[bias_path] is not None:
            raise LoraFileError(
                f"{weights}: module {present[0][1]!r} has a lora_B bias and its base bias "
                f"{bias_path!r} is also trained in full; lora_jax holds one of the two"
            )
        shape = tuple(np.shape(base[bias_path]))
        ns = len(f.layout.stack_axes)
        b = np.zeros(shape, np.float32)
        for idx, module in present:
            vector = np.asarray(biases[module], np.float32)
            if vector.size != math.prod(shape[ns:]):
                raise LoraFileError(
                    f"{weights}: tensor {module}{BIAS_SUFFIX} has shape {vector.shape}; the Flax "
                    f"bias {bias_path!r} {shape} needs {math.prod(shape[ns:])} values per layer"
                )
            b[idx] = vector.reshape(shape[ns:])
            used.add(module)
        file_dtype = np.asarray(biases[present[0][1]]).dtype
        entries[bias_path] = LoraBias(jnp.asarray(b, dtype or file_dtype), scale=f.scale)
    unused = sorted(set(biases) - used)
    if unused:
        raise LoraFileError(
            f"{weights}: tensor {unused[0]}{BIAS_SUFFIX} is the lora_B bias of a module with no "
            "LoRA factors lora_jax imported"
        )


def _import_tokens(
    weights: Path,
    tokens: dict,
    indices: Mapping[str, tuple[int, ...]],
    base: Mapping[str, Any],
    entries: dict,
    nm: NameMap,
    dtype: Any,
) -> None:
    tables = {nm.module_for(p): p for p, leaf in base.items() if len(np.shape(leaf)) == 2}
    for module, rows in tokens.items():
        path = tables.get(module)
        if path is None:
            raise LoraFileError(
                f"{weights}: trainable tokens of module {module!r}, which no 2-D Flax leaf of the "
                "params maps to (check the name map)"
            )
        if entries[path] is not None:
            raise LoraFileError(
                f"{weights}: module {module!r} has trainable tokens and LoRA factors (or is "
                "trained in full); lora_jax holds one entry per leaf"
            )
        table = base[path]
        if isinstance(table, jax.ShapeDtypeStruct):
            raise LoraFileError(
                f"{weights}: trainable tokens of {module!r} hold the rows' values; recovering "
                "the update needs the concrete base params, not shapes"
            )
        idx = indices[module]
        rows = np.asarray(rows)
        if rows.shape != (len(idx), np.shape(table)[1]) or max(idx) >= np.shape(table)[0]:
            raise LoraFileError(
                f"{weights}: tensor {module}{TOKENS_SUFFIX} has shape {rows.shape} for indices "
                f"{idx}; the Flax table {path!r} is {tuple(np.shape(table))}"
            )
        w = np.asarray(to_numpy(table), np.float32)[np.asarray(idx)]
        diff = np.asarray(rows, np.float32) - w
        entries[path] = TokenRows(jnp.asarray(diff, dtype or rows.dtype), indices=idx)


# --------------------------------------------------------------------------- export


def export_value_entries(delta: Any, params: Any, nm: NameMap) -> tuple[dict, dict]:
    """``({PEFT tensor name (no prefix): array}, {config key: value})`` of the delta's
    :class:`LoraBias` and :class:`TokenRows` entries (``({}, {})`` if it has none).

    Raises:
      LoraStructureError: a LoRA bias with no LoRA kernel beside it, a targeted kernel with
        no bias leaf (PEFT's ``lora_bias`` is one flag for every targeted module), or
        trainable tokens without ``params``.
    """
    entries = [(p, f) for p, f in delta_entries(delta) if f is not None]
    biases = {p: f for p, f in entries if isinstance(f, LoraBias)}
    tokens = [(p, f) for p, f in entries if isinstance(f, TokenRows)]
    tensors: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {}
    if biases:
        kernels = {_bias_path(p): (p, f) for p, f in entries if isinstance(f, LoraFactors)}
        lonely = [p for p in biases if p not in kernels]
        if lonely:
            raise LoraStructureError(
                f"export_peft: leaf {lonely[0]!r} holds a LoraBias, but no LoRA kernel beside it "
                "(PEFT's lora_bias is the bias of lora_B)"
            )
        paths = {p for p, _ in entries} | {p for p, _ in delta_entries(delta)}
        for bias_path, (path, f) in kernels.items():
            if bias_path not in paths:
                raise LoraStructureError(
                    f"export_peft: PEFT's lora_bias gives every targeted module a lora_B bias, "
                    f"but kernel {path!r} has no bias leaf {bias_path!r}"
                )
            tensors.update(_bias_tensors(nm, path, f, biases.get(bias_path)))
        config["lora_bias"] = True
    if tokens:
        if params is None:
            raise LoraStructureError(
                "export_peft: PEFT stores trainable tokens as the rows' values W[indices] + "
                "diff: pass params="
            )
        base = dict(leaves_with_paths(params)[0])
        table_indices = {}
        for path, rows_entry in tokens:
            module = nm.module_for(path)
            if not module:
                raise LoraStructureError(
                    f"export_peft: the name map gives no PyTorch module for {path!r}"
                )
            w = np.asarray(to_numpy(base[path]), np.float32)[np.asarray(rows_entry.indices)]
            diff = to_numpy(rows_entry.diff)
            rows = (w + np.asarray(diff, np.float32)).astype(diff.dtype)
            tensors[module + TOKENS_SUFFIX] = rows
            table_indices[module] = list(rows_entry.indices)
        config["trainable_token_indices"] = table_indices
    return tensors, config


def _bias_tensors(nm: NameMap, path: str, f: LoraFactors, bias: LoraBias | None) -> dict:
    """``{<module>.lora_B.bias: (out,)}`` of one kernel's modules: ``b * (its scale / s)``,
    zeros without a :class:`LoraBias`."""
    template = nm.module_for(path) or ""
    ns = len(f.layout.stack_axes)
    dtype = to_numpy(f.b).dtype
    if bias is not None and f.layers is not None:
        left_out = sorted(set(range(f.layers.total)) - set(f.layers.indices))
        if np.any(to_numpy(bias.b)[left_out]):
            raise LoraStructureError(
                f"export_peft: the LoRA bias beside {path!r} is non-zero at layers {left_out}, "
                f"which its factors leave out (layers {f.layers.indices}); PEFT has no module "
                "there to hold it"
            )
    out = {}
    for idx in _layer_indices(f):
        module = fill_layers(template, idx)
        if bias is None:
            n = math.prod(f.kernel_shape[ax] for ax in f.layout.out_axes)
            out[module + BIAS_SUFFIX] = np.zeros((n,), dtype)
            continue
        b = to_numpy(bias.b)
        vector = b[idx].reshape(-1) if ns else b.reshape(-1)
        ratio = bias.scale / f.scale
        out[module + BIAS_SUFFIX] = (
            vector if ratio == 1.0 else (np.asarray(vector, np.float32) * ratio).astype(b.dtype)
        )
    return out


__all__ = [
    "BIAS_SUFFIX",
    "TOKENS_SUFFIX",
    "export_value_entries",
    "import_value_entries",
    "is_value_key",
]
