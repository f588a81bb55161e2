"""Every error and warning lora_jax raises, in one place.

Each error is a :class:`ValueError` subclass (so ``except ValueError`` keeps
working), and every message names the offending leaf path, pattern, file or
tensor key, and what was expected.

==========================  =====================================================
class                       raised when
==========================  =====================================================
``LoraConfigError``         a :class:`~lora_jax.LoraConfig` field is invalid
``LoraArgumentError``       a function argument is invalid (a dropout rate, a ratio)
``LoraTargetError``         a target pattern matches nothing, or a leaf LoRA cannot serve
``LoraLayoutError``         a kernel's fan-in / fan-out split is invalid or unknown
``LoraStructureError``      a delta does not fit its base (structure, shape, dtype)
``LoraFileError``           an adapter file is missing, corrupt or contradicts itself
``LoraBaseMismatchError``   an adapter file's targets do not fit the given base
``LoraShardingError``       shardings that do not fit the mesh or the params
``LoraImplicitError``       ``implicit(strict=True)`` met a kernel use with no rule
==========================  =====================================================

:class:`LoraFallbackWarning` is the warning ``implicit`` gives where it
materialises a kernel instead.
"""


class LoraError(ValueError):
    """Base class of every error lora_jax raises on bad input."""


class LoraConfigError(LoraError):
    """A config field is invalid (rank < 1, alpha <= 0, bad regex, unknown init)."""


class LoraArgumentError(LoraError):
    """A function argument is invalid (a dropout rate outside [0, 1), a LoRA+ ratio <= 0)."""


class LoraTargetError(LoraError):
    """A target pattern matched nothing, or matched a leaf LoRA cannot serve."""


class LoraLayoutError(LoraError):
    """A kernel's fan-in / fan-out split is invalid or cannot be inferred."""


class LoraStructureError(LoraError):
    """A delta does not match its base (structure, shape or dtype)."""


class LoraFileError(LoraError):
    """An adapter file (ours or PEFT's) is missing, corrupt, or contradicts its config or base.

    The message names the file and, where there is one, the tensor key or leaf path.
    """


class LoraBaseMismatchError(LoraFileError, LoraStructureError):
    """An adapter's targets are not leaves of the given base, or have other shapes."""


class LoraShardingError(LoraError):
    """Shardings that do not fit: an unknown or repeated mesh axis, a sharded axis its
    mesh axes do not divide, a logical axis without a rule, or a targeted kernel
    with no sharding entry. The message names the leaf path."""


class LoraImplicitError(LoraError):
    """``implicit(strict=True)`` and a targeted kernel reached a primitive with no low-rank rule."""


class LoraFallbackWarning(UserWarning):
    """A targeted kernel was materialised because no low-rank rule fits its use."""
