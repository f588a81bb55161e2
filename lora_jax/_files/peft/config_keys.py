"""Every key of PEFT's ``LoraConfig``, and what :func:`~lora_jax.import_peft` does with it.

PEFT keeps adding LoRA variants, each one a key of ``adapter_config.json``.
An importer that reads the keys it knows and ignores the rest turns any of
them into a plain LoRA that is silently wrong, so :data:`CONFIG_KEYS` names
every key of PEFT's ``LoraConfig`` (0.21.2) and sorts it into one of three:

* ``implemented``: imported and exported exactly (``r``, ``lora_alpha``,
  ``rank_pattern``, ``use_dora``, ``modules_to_save``, ...);
* ``irrelevant``: does not change what the adapted model computes from the
  saved tensors (``task_type``, ``lora_dropout``, which modules were selected
  at creation, initialiser settings once the weights exist, ...);
* ``refused``: changes what the adapter computes in a way lora_jax does not;
  a value other than the key's inert one is a :class:`~lora_jax.LoraFileError`
  naming the key and what it would change.

A key not in the table (a newer PEFT's) is refused as well, unless its value
is ``null``, ``false`` or empty (PEFT writes every field, so an option left
unset in a newer PEFT stays importable).

:func:`check_config_keys` applies the table; :func:`markdown_table` renders
it for docs/files.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_jax._errors import LoraFileError

IMPLEMENTED = "implemented"
IRRELEVANT = "irrelevant"
REFUSED = "refused"

# init_lora_weights values whose initialiser rewrites the base weights (PiSSA, OLoRA, CorDA:
# W - s B0 A0; LoftQ: a quantised W; LoRA-GA: W - s B0 A0). PEFT re-runs it when it loads the
# adapter, so the file's factors belong to that residual, not to the base they are loaded onto.
_BASE_REWRITING = re.compile(r"(pissa(_niter_\d+)?|olora|corda|loftq|lora_ga)", re.IGNORECASE)


def _unset(value: Any) -> bool:
    """``null``, ``false`` or an empty list / object: an option PEFT leaves off."""
    return value is None or value is False or value == [] or value == {}


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """How lora_jax handles one ``LoraConfig`` key.

    Attributes:
      handling: ``"implemented"``, ``"irrelevant"`` or ``"refused"``.
      what: for the docs, what lora_jax does with the key (implemented,
        irrelevant) or what the key would change (refused).
      inert: for a refused key, whether a value leaves the adapter a plain
        LoRA (default: ``null`` / ``false`` / empty).
    """

    handling: str
    what: str
    inert: Callable[[Any], bool] = _unset


def _rule(handling: str, what: str, inert: Callable[[Any], bool] = _unset) -> KeyRule:
    return KeyRule(handling, what, inert)


CONFIG_KEYS: dict[str, KeyRule] = {
    # ---- PeftConfig's own keys: what the adapter is, not what it computes
    "peft_type": _rule(IMPLEMENTED, 'must be `"LORA"`; anything else is refused'),
    "task_type": _rule(
        IRRELEVANT, "which `PeftModel` subclass wraps the model; the layers are the same"
    ),
    "auto_mapping": _rule(IRRELEVANT, "the base model's class, for PEFT's auto classes"),
    "peft_version": _rule(IRRELEVANT, "the PEFT that wrote the file"),
    "base_model_name_or_path": _rule(
        IMPLEMENTED,
        "written from `export_peft("
        "base_model_name_or_path=)`; ignored on import (you pass "
        "the params)",
    ),
    "revision": _rule(IRRELEVANT, "the base model's hub revision"),
    "inference_mode": _rule(IRRELEVANT, "whether PEFT freezes the adapter"),
    # ---- the low-rank update
    "r": _rule(IMPLEMENTED, "the rank (checked against each module's tensors)"),
    "lora_alpha": _rule(IMPLEMENTED, "the scale `lora_alpha / r`"),
    "use_rslora": _rule(IMPLEMENTED, "the scale `lora_alpha / sqrt(r)`"),
    "rank_pattern": _rule(
        IMPLEMENTED,
        "per-module ranks, matched as PEFT does: the first key "
        '`k` with `re.match(rf"(.*\\.)?({k})$", module)`',
    ),
    "alpha_pattern": _rule(IMPLEMENTED, "per-module alphas, matched like `rank_pattern`"),
    "use_dora": _rule(
        IMPLEMENTED,
        "DoRA magnitudes (`lora_magnitude_vector`) on Linear, Embedding and Conv modules",
    ),
    "target_modules": _rule(
        IMPLEMENTED,
        "the adapted modules are the ones with tensors in the "
        "file; `export_peft` writes short names when they are unambiguous",
    ),
    "target_parameters": _rule(
        IMPLEMENTED,
        "LoRA on 3-D expert parameters (`ParamWrapper`): `lora_A (r*E, in)` expert-major and "
        "`lora_B (out, r*E)` rank-major, to and from `(E, in, out)` kernels of layout `eio` "
        "(see the table of PEFT's expert tensors); entries name `module.parameter`",
    ),
    "exclude_modules": _rule(
        IRRELEVANT, "module selection at creation; the file's tensors say which modules are adapted"
    ),
    "layers_to_transform": _rule(
        IMPLEMENTED,
        "layers left out have no tensors; a stacked "
        "kernel imports as a layer selection (`layers=`)",
    ),
    "layers_pattern": _rule(
        IRRELEVANT,
        "where `layers_to_transform` looks for the layer "
        "index at creation; the file's tensors say which layers",
    ),
    "fan_in_fan_out": _rule(
        IRRELEVANT,
        "how the *base* weight is stored (GPT-2's Conv1D); "
        "PEFT's factors are `nn.Linear`s either way",
    ),
    "lora_dropout": _rule(IRRELEVANT, "training only (dropout is off at inference)"),
    "modules_to_save": _rule(
        IMPLEMENTED,
        "modules trained in full: imported as `LeafDelta` "
        "(needs concrete params), exported from `LeafDelta` leaves",
    ),
    "bias": _rule(
        IMPLEMENTED,
        '`"all"` / `"lora_only"`: the biases PEFT trained import as '
        "`LeafDelta` (needs concrete params); `export_peft` writes a LoRA-targeted "
        'module\'s `LeafDelta` bias as `"lora_only"`',
    ),
    "lora_bias": _rule(
        IMPLEMENTED,
        "`lora_B`'s bias `b` (`<module>.lora_B.bias`): a `LoraBias` at the Flax `bias` leaf "
        "beside the kernel, merged as `c + s * b`",
    ),
    "trainable_token_indices": _rule(
        IMPLEMENTED,
        "embedding rows trained in full (`<module>.token_adapter.trainable_tokens_delta`, "
        "the rows' values; a list or `{module: [indices]}`): a `TokenRows` at the table, "
        "`W.at[indices]` set to them (a head tied to the table sees them too); needs "
        "concrete params",
    ),
    "init_lora_weights": _rule(
        IRRELEVANT,
        "how PEFT drew the first factors, moot once the weights exist; except "
        "`pissa*`, `olora`, `corda`, `loftq`, `lora_ga`, whose initialiser rewrites the base "
        "weights: those import only with `residual_base=True` and params that are that residual "
        '(e.g. from `lj.init_lora(init="pissa")`)',
    ),
    "loftq_config": _rule(IRRELEVANT, "LoftQ initialiser settings (see `init_lora_weights`)"),
    "eva_config": _rule(IRRELEVANT, "EVA initialiser settings"),
    "corda_config": _rule(IRRELEVANT, "CorDA initialiser settings (see `init_lora_weights`)"),
    "lora_ga_config": _rule(IRRELEVANT, "LoRA-GA initialiser settings (see `init_lora_weights`)"),
    "runtime_config": _rule(IRRELEVANT, "runtime options PEFT does not save"),
    "megatron_core": _rule(
        IRRELEVANT, "the Megatron module path, read only with `megatron_config`"
    ),
    "qalora_group_size": _rule(IRRELEVANT, "read only with `use_qalora` (refused)"),
    # ---- refused: each changes what the adapter computes
    "megatron_config": _rule(
        REFUSED,
        "LoRA on Megatron's tensor-parallel "
        "Column/RowParallelLinear layers, whose factors are sharded per "
        "rank; lora_jax reads nn.Linear / Embedding / Conv modules",
    ),
    "alora_invocation_tokens": _rule(
        REFUSED,
        "activated LoRA: the adapter applies only from "
        "the invocation tokens on; a plain or merged LoRA applies "
        "it to every token",
    ),
    "layer_replication": _rule(
        REFUSED, "builds a deeper model by repeating base layers, each copy with its own adapter"
    ),
    "use_qalora": _rule(REFUSED, "QA-LoRA pools the input in groups before `lora_A`"),
    "velora_config": _rule(REFUSED, "VeLoRA, a LoRA variant lora_jax does not compute"),
    "kasa_config": _rule(
        REFUSED,
        "KaSA truncates the base weight's SVD and puts a trained "
        "diagonal between `lora_A` and `lora_B`",
    ),
    "monteclora_config": _rule(
        REFUSED,
        "MonteCLoRA samples the factors (variational Monte Carlo); lora_jax does not compute it",
    ),
    "use_bdlora": _rule(REFUSED, "BD-LoRA's block-diagonal factors, stored in its own layout"),
    "arrow_config": _rule(REFUSED, "Arrow routes each token among several adapters"),
    "ensure_weight_tying": _rule(
        REFUSED,
        "ties the adapters of tied layers (embedding and "
        "output head) so one trained module changes both",
    ),
}


def base_rewriting_init(value: Any) -> bool:
    """Whether an ``init_lora_weights`` value's initialiser rewrites the base weights.

    Example:
      >>> [base_rewriting_init(v) for v in ("pissa_niter_4", True, "eva")]
      [True, False, False]
    """
    return isinstance(value, str) and _BASE_REWRITING.fullmatch(value) is not None


def check_config_keys(cfg_path: Path, cfg: dict, *, residual_base: bool = False) -> None:
    """Refuses a PEFT config that sets a key lora_jax does not compute (see :data:`CONFIG_KEYS`).

    A refused key with a value other than its inert one, an unknown key with a
    value other than ``null`` / ``false`` / empty, and a base-rewriting
    ``init_lora_weights`` without ``residual_base`` are each a
    :class:`LoraFileError` naming the file, the key and what it would change.

    Example:
      >>> check_config_keys(Path("adapter_config.json"), {"r": 8, "lora_bias": False})
      >>> check_config_keys(Path("adapter_config.json"), {"layer_replication": [[0, 2]]})
      ... # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraFileError: adapter_config.json: key 'layer_replication' is [[0, 2]]: ...
    """
    for key, value in cfg.items():
        rule = CONFIG_KEYS.get(key)
        if rule is None:
            if not _unset(value):
                raise LoraFileError(
                    f"{cfg_path}: key {key!r} is {_short(value)}, a PEFT option lora_jax does not "
                    "know (a newer PEFT?); it may change what the adapter computes, so the "
                    "adapter is refused rather than imported as a plain LoRA"
                )
        elif rule.handling == REFUSED and not rule.inert(value):
            raise LoraFileError(
                f"{cfg_path}: key {key!r} is {_short(value)}: {rule.what}. lora_jax does not "
                "compute this, so the adapter is refused rather than imported as a plain LoRA "
                "that would be silently wrong"
            )
    init = cfg.get("init_lora_weights", True)
    if base_rewriting_init(init) and not residual_base:
        raise LoraFileError(
            f"{cfg_path}: key 'init_lora_weights' is {init!r}: that initialiser rewrites the base "
            "weights (W - s B0 A0), and PEFT re-runs it when it loads the adapter, so these "
            "factors belong to the residual base, not to the original weights. Either pass "
            "residual_base=True with params that are that residual (lj.init_lora with "
            f"init={init.split('_niter_')[0].lower()!r} on the original weights gives it, for "
            "PiSSA and OLoRA), or convert the adapter with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) into a plain LoRA"
        )


def _short(value: Any) -> str:
    """A value for an error message, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def markdown_table() -> str:
    """The table of :data:`CONFIG_KEYS` as Markdown (docs/files.md holds a copy).

    Example:
      >>> markdown_table().splitlines()[0]
      '| PEFT `LoraConfig` key | lora_jax |'
    """
    rows = ["| PEFT `LoraConfig` key | lora_jax |", "|---|---|"]
    order = {IMPLEMENTED: 0, IRRELEVANT: 1, REFUSED: 2}
    for key, rule in sorted(CONFIG_KEYS.items(), key=lambda kv: (order[kv[1].handling], kv[0])):
        rows.append(f"| `{key}` | **{rule.handling}**: {rule.what} |")
    return "\n".join(rows)


__all__ = [
    "CONFIG_KEYS",
    "IMPLEMENTED",
    "IRRELEVANT",
    "REFUSED",
    "KeyRule",
    "base_rewriting_init",
    "check_config_keys",
    "markdown_table",
]
