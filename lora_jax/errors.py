"""Errors raised by lora_jax.

Every error is a :class:`ValueError` subclass, so ``except ValueError`` keeps
working, and every message names the offending leaf path or pattern.
"""


class LoraError(ValueError):
    """Base class of every error lora_jax raises on bad input."""


class LoraConfigError(LoraError):
    """A config field is invalid (rank < 1, alpha <= 0, bad regex, unknown init)."""


class LoraTargetError(LoraError):
    """A target pattern matched nothing, or matched a leaf LoRA cannot serve."""


class LoraLayoutError(LoraError):
    """A kernel's fan-in / fan-out split is invalid or cannot be inferred."""


class LoraStructureError(LoraError):
    """A delta does not match its base (structure, shape or dtype)."""
