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
    """Base class of every error lora_jax raises on bad input.

    Example:
      >>> import lora_jax as lj
      >>> issubclass(lj.LoraFileError, lj.LoraError), issubclass(lj.LoraError, ValueError)
      (True, True)
    """


class LoraConfigError(LoraError):
    """A config field is invalid (rank < 1, alpha <= 0, bad regex, unknown init).

    Example:
      >>> import lora_jax as lj
      >>> lj.LoraConfig(targets="w", rank=0)
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraConfigError: rank must be an integer >= 1, got 0
    """


class LoraArgumentError(LoraError):
    """A function argument is invalid (a dropout rate outside [0, 1), a LoRA+ ratio <= 0).

    Example:
      >>> import optax, lora_jax as lj
      >>> lj.lora_plus(optax.sgd(0.1), ratio=0)
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraArgumentError: LoRA+ ratio must be a finite number > 0, got 0
    """


class LoraTargetError(LoraError):
    """A target pattern matched nothing, or matched a leaf LoRA cannot serve.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> lj.init_lora(jax.random.key(0), {"w": jnp.ones((2, 2))}, lj.LoraConfig(targets="v"))
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraTargetError: target pattern 'v' matches no leaf; patterns are matched in full against '/'-joined paths such as 'w'
    """


class LoraLayoutError(LoraError):
    """A kernel's fan-in / fan-out split is invalid or cannot be inferred.

    Example:
      >>> import lora_jax as lj
      >>> lj.KernelLayout("ix")
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraLayoutError: KernelLayout axes must be a string of 's', 'e', 'i', 'o' letters, got 'ix'
    """


class LoraStructureError(LoraError):
    """A delta does not match its base (structure, shape or dtype).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.merge({"w": jnp.ones((2, 2))}, {"v": None})
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraStructureError: the delta's tree structure does not match the base's: it has no entry (LoraFactors or None) for the base leaves ['w']
    """


class LoraFileError(LoraError):
    """An adapter file (ours or PEFT's) is missing, corrupt, or contradicts its config or base.

    The message names the file and, where there is one, the tensor key or leaf path.

    Example:
      >>> import lora_jax as lj
      >>> lj.load("/nonexistent/adapter")
      Traceback (most recent call last):
      ...
      lora_jax._errors.LoraFileError: /nonexistent/adapter: adapter directory not found
    """


class LoraBaseMismatchError(LoraFileError, LoraStructureError):
    """An adapter's targets are not leaves of the given base, or have other shapes.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                            lj.LoraConfig(targets="w", rank=2))
      >>> path = lj.save(tempfile.mkdtemp(), delta)
      >>> try:
      ...     lj.load(path, base={"w": jnp.ones((4, 5))})
      ... except lj.LoraBaseMismatchError as e:
      ...     print("base mismatch:", "shape (4, 5)" in str(e))
      base mismatch: True
    """


class LoraShardingError(LoraError):
    """Shardings that do not fit: an unknown or repeated mesh axis, a sharded axis its
    mesh axes do not divide, a logical axis without a rule, or a targeted kernel
    with no sharding entry. The message names the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2,), ("data",))
      >>> _, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 4))},
      ...                         lj.LoraConfig(targets="w", rank=2))
      >>> try:
      ...     lj.delta_shardings({"v": P()}, delta, mesh)
      ... except lj.LoraShardingError as e:
      ...     print("no entry for 'w':", "'w'" in str(e))
      no entry for 'w': True
    """


class LoraImplicitError(LoraError):
    """``implicit(strict=True)`` and a targeted kernel reached a primitive with no low-rank rule.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((3, 3))},
      ...                            lj.LoraConfig(targets="w", rank=1))
      >>> fn = lambda p, x: jnp.linalg.det(p["w"]) * x   # no low-rank rule for a determinant
      >>> try:
      ...     lj.implicit(fn, strict=True)(base, delta, 1.0)
      ... except lj.LoraImplicitError as e:
      ...     print("strict:", "strict=True" in str(e))
      strict: True
    """


class LoraFallbackWarning(UserWarning):
    """A targeted kernel was materialised because no low-rank rule fits its use.

    Example:
      >>> import warnings, jax, jax.numpy as jnp, lora_jax as lj
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((3, 3))},
      ...                            lj.LoraConfig(targets="w", rank=1))
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     y = lj.implicit(lambda p, x: jnp.linalg.det(p["w"]) * x)(base, delta, 1.0)
      >>> [w.category.__name__ for w in caught][:1]
      ['LoraFallbackWarning']
    """
