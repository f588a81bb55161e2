"""LoRA inside a Flax NNX module: factors as ``nnx.LoRAParam``, forward through ``implicit``.

:func:`lora` turns an NNX module into a :class:`LoraModel`: a module that
holds a copy of the given one (sharing its kernel arrays, never its
Variables) in which every targeted kernel ``<name>`` gains the Variables
``<name>_lora_a`` and ``<name>_lora_b`` (``nnx.LoRAParam``, the names qwix
gives them), and whose call runs the inner module through
:func:`lora_jax.implicit`: ``x @ W + s * (x @ A) @ B`` at every use of an
adapted kernel, never ``W + s * A @ B``. The NNX idioms then work unchanged::

    model = lora_nnx.lora(model, lj.LoraConfig(targets=".*kernel", rank=8), key, x)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    adapter = nnx.state(model, nnx.LoRAParam)

and so do trainers built on them (tunix's ``PeftTrainer``). The functional API
is one call away: :func:`split` gives ``(graphdef, base, delta)`` with the
delta aligned to ``base`` (``lj.save``, ``lj.export_peft``, ``lj.merge``,
``lj.stack_adapters``, QLoRA's ``lj.quantize`` all take it), :func:`from_delta`
goes back, and :func:`merge` returns a plain module of the original class with
dense kernels ``W + s A B``. :func:`from_qwix` and :func:`to_qwix` convert the
LoRA state of a qwix-adapted model (as tunix and MaxText checkpoint it).

=====================  ====================================================
name                   what it is
=====================  ====================================================
``LoraModel``          the NNX module: an inner module with LoRA factors
``lora``               a ``LoraModel`` with fresh factors from a config
``from_delta``         a ``LoraModel`` from a module and a lora_jax delta
``split``              ``(graphdef, base, delta)``: the functional view
``merge``              a plain module (the original class), dense kernels
``from_qwix``          a lora_jax delta from qwix's ``<name>_lora_a/b``
``to_qwix``            qwix's LoRA state from a delta (fills a qwix model's)
=====================  ====================================================

Only a call of the ``LoraModel`` itself (``model(...)`` or
:meth:`LoraModel.apply`) applies the adapter; calling a submodule of
``model.model`` directly runs the base weights alone. Import it as
``from lora_jax import nnx as lora_nnx`` (it is not imported by ``lora_jax``).

Example:
  >>> import jax, jax.numpy as jnp, lora_jax as lj
  >>> from flax import nnx
  >>> from lora_jax import nnx as lora_nnx
  >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> lora_model = lora_nnx.lora(model, lj.LoraConfig(targets="kernel", rank=2), jax.random.key(1))
  >>> [p for p, _ in lj.advanced.leaves_with_paths(nnx.state(lora_model, nnx.LoRAParam))[0]]
  ['model/kernel_lora_a', 'model/kernel_lora_b']
  >>> bool(jnp.allclose(lora_model(jnp.ones((1, 4))), model(jnp.ones((1, 4)))))  # B starts at 0
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import jax
from flax import nnx

from lora_jax import (
    KernelLayout,
    LeafDelta,
    LoraArgumentError,
    LoraConfig,
    LoraFactors,
    LoraStructureError,
    implicit,
    infer_layouts,
    init_lora,
)
from lora_jax import merge as merge_delta
from lora_jax._files.qwix import from_qwix, to_qwix
from lora_jax.advanced import LayerSelection, align, is_quantized, is_stacked, path_str

__all__ = ["LoraModel", "from_delta", "from_qwix", "lora", "merge", "split", "to_qwix"]

Keys = tuple[Any, ...]

# The suffixes of the Variables an adapted kernel ``<name>`` gains; ``_lora_a``
# and ``_lora_b`` are qwix's.
SUFFIX_A, SUFFIX_B, SUFFIX_MAGNITUDE, SUFFIX_FULL = (
    "_lora_a",
    "_lora_b",
    "_lora_magnitude",
    "_lora_diff",
)


@dataclasses.dataclass(frozen=True)
class Adapted:
    """The static record of one adapted leaf of a :class:`LoraModel`.

    Attributes:
      keys: the leaf's key path in the inner module's state (kernel name last).
      alpha, layout, rslora, layers: the :class:`~lora_jax.LoraFactors` fields;
        ``layout`` is ``None`` for a leaf trained in full (``<name>_lora_diff``).
      magnitude: whether DoRA's ``<name>_lora_magnitude`` is present.
      segments: a fused kernel's per-projection sizes (``LoraFactors.segments``).
    """

    keys: Keys
    alpha: float = 0.0
    layout: KernelLayout | None = None
    rslora: bool = False
    layers: LayerSelection | None = None
    magnitude: bool = False
    segments: tuple[int, ...] | None = None

    @property
    def path(self) -> str:
        return "/".join(str(k) for k in self.keys)

    def names(self) -> tuple[str, ...]:
        """The attribute names of this leaf's LoRA Variables on its owner module."""
        name = self.keys[-1]
        if self.layout is None:
            return (f"{name}{SUFFIX_FULL}",)
        return (f"{name}{SUFFIX_A}", f"{name}{SUFFIX_B}") + (
            (f"{name}{SUFFIX_MAGNITUDE}",) if self.magnitude else ()
        )

    def entry(self, values: Sequence[Any]) -> LoraFactors | LeafDelta:
        """The delta entry holding ``values`` (in the order of :meth:`names`)."""
        if self.layout is None:
            return LeafDelta(values[0])
        return LoraFactors(
            values[0],
            values[1],
            alpha=self.alpha,
            layout=self.layout,
            rslora=self.rslora,
            magnitude=values[2] if self.magnitude else None,
            layers=self.layers,
            segments=self.segments,
        )

    @staticmethod
    def of(keys: Keys, entry: LoraFactors | LeafDelta) -> tuple[Adapted, tuple[Any, ...]]:
        """The record of ``entry`` at ``keys`` and its arrays (in the order of :meth:`names`)."""
        if isinstance(entry, LeafDelta):
            return Adapted(keys), (entry.diff,)
        if not isinstance(entry, LoraFactors):  # LoraBias, TokenRows: the functional core only
            raise LoraStructureError(
                f"leaf {'/'.join(str(k) for k in keys)!r}: lora_jax.nnx holds LoRA factors and "
                f"leaves trained in full, not a {type(entry).__name__} (lora_bias / "
                "trainable_tokens): use the functional API (init_lora, implicit, merge)"
            )
        record = Adapted(
            keys,
            float(entry.alpha),
            entry.layout,
            bool(entry.rslora),
            entry.layers,
            entry.magnitude is not None,
            entry.segments,
        )
        return record, (entry.a, entry.b) + ((entry.magnitude,) if record.magnitude else ())


class LoraModel(nnx.Module):
    """An NNX module whose call runs ``model`` with its LoRA factors, implicitly.

    Build it with :func:`lora` or :func:`from_delta`. Its ``model`` is a copy
    of the given module (same kernel arrays, its own Variables) in which each
    adapted kernel ``<name>`` has sibling ``nnx.LoRAParam`` Variables
    ``<name>_lora_a`` ``(*stack, *fan_in, r)`` and ``<name>_lora_b``
    ``(*stack, r, *fan_out)`` (plus ``<name>_lora_magnitude`` with DoRA, and
    ``<name>_lora_diff`` for a leaf trained in full). Calling it returns
    ``model(*args, **kwargs)`` computed by :func:`lora_jax.implicit`; state
    the inner call updates (RNG counters, batch statistics, caches) is written
    back to ``model``.

    Attributes:
      model: the inner module (its class is the original one).
      adapted: one :class:`Adapted` record per adapted leaf (static).
      strict: raise :class:`~lora_jax.LoraImplicitError` rather than form
        ``W + s A B`` for a kernel use with no low-rank rule (static).
      dropout: LoRA dropout rate ``p`` (the low-rank branch sees ``dropout(x)``,
        as :func:`~lora_jax.implicit`'s ``dropout``), active unless
        ``deterministic`` (``lora_model.eval()`` sets it, ``.train()`` clears it).
      rngs: the ``nnx.Rngs`` whose ``dropout`` stream draws each call's mask key
        (needed when ``dropout > 0``).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> from lora_jax import nnx as lora_nnx
      >>> m = lora_nnx.lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                   lj.LoraConfig(targets="kernel", rank=2), jax.random.key(0))
      >>> m(jnp.ones((2, 4))).shape, m.apply(lambda inner, x: inner(x) * 2, jnp.ones((2, 4))).shape
      ((2, 3), (2, 3))
    """

    def __init__(
        self,
        model: nnx.Module,
        adapted: tuple[Adapted, ...],
        strict: bool = True,
        dropout: float = 0.0,
        rngs: nnx.Rngs | None = None,
    ):
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            raise LoraArgumentError(f"dropout must be a rate in [0, 1), got {dropout!r}")
        if dropout and rngs is None:
            raise LoraArgumentError(
                "LoRA dropout needs rngs=nnx.Rngs(dropout=...) to draw its masks"
            )
        self.model = model
        self.adapted = tuple(adapted)
        self.strict = bool(strict)
        self.dropout = float(dropout)
        self.deterministic = False
        self.rngs = rngs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the adapter, computed implicitly."""
        return self.apply(_call_module, *args, **kwargs)

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` with the adapter, computed implicitly.

        Use it to run any method of the inner module with LoRA, e.g.
        ``lora_model.apply(lambda m, x: m.decode(x), x)``.
        """
        graphdef, lora_state, state = nnx.split(self.model, nnx.LoRAParam, ...)  # type: ignore[misc]
        delta = _delta_of(state, lora_state, self.adapted)

        def run(state, lora_state, *args, **kwargs):
            module = nnx.merge(graphdef, lora_state, state)
            out = fn(module, *args, **kwargs)
            return out, nnx.state(module, nnx.Not(nnx.Param))

        key = (
            self.rngs.dropout()
            if self.dropout and not self.deterministic and self.rngs is not None
            else None
        )
        out, updates = implicit(run, strict=self.strict, dropout=self.dropout)(
            state, delta, lora_state, *args, lora_dropout_key=key, **kwargs
        )
        nnx.update(self.model, updates)
        return out


def _call_module(module: Any, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def lora(
    model: nnx.Module,
    config: LoraConfig,
    key: jax.Array,
    *example_args: Any,
    layouts: Mapping[str, KernelLayout] | None = None,
    strict: bool = True,
    dropout: float = 0.0,
    rngs: nnx.Rngs | None = None,
    **example_kwargs: Any,
) -> LoraModel:
    """A :class:`LoraModel` of ``model`` with fresh factors at the kernels ``config`` targets.

    Paths are those of ``nnx.split(model)[1]``: attribute names joined by
    ``'/'`` (``layers/0/attn/q_einsum/w``). Kernels with more than two axes
    need their layout: give example inputs (``*example_args``,
    ``**example_kwargs``; only shapes matter) and it is traced from
    ``model(*example_args, **example_kwargs)`` with
    :func:`~lora_jax.infer_layouts`, or pass ``layouts`` (or
    ``LoraConfig(layouts=...)``). With ``init="pissa"`` or ``"olora"`` the
    returned module's kernels are the residuals. ``model`` itself is not changed.

    Args:
      model: any NNX module.
      config: the :class:`~lora_jax.LoraConfig`.
      key: a PRNG key (as :func:`~lora_jax.init_lora`).
      *example_args, **example_kwargs: optional example inputs of ``model``.
      layouts: optional ``{path: KernelLayout}``.
      strict, dropout, rngs: see :class:`LoraModel`.

    Returns:
      the :class:`LoraModel`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> from lora_jax import nnx as lora_nnx
      >>> m = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))           # kernel (4, 2, 3)
      >>> lm = lora_nnx.lora(m, lj.LoraConfig(targets="kernel", rank=2), jax.random.key(0),
      ...                    jnp.ones((1, 4)))
      >>> [x.shape for x in jax.tree.leaves(nnx.state(lm, nnx.LoRAParam))]  # A, B
      [(4, 2), (2, 2, 3)]
    """
    graphdef, state = nnx.split(model)
    if layouts is None and (example_args or example_kwargs):
        layouts = infer_layouts(
            lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k),
            _fresh(state),
            *example_args,
            **example_kwargs,
        )
    base, delta = init_lora(key, _fresh(state), config, layouts=layouts)
    return from_delta(nnx.merge(graphdef, base), delta, strict=strict, dropout=dropout, rngs=rngs)


def from_delta(
    model: nnx.Module,
    delta: Any,
    *,
    strict: bool = True,
    dropout: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> LoraModel:
    """A :class:`LoraModel` of ``model`` holding ``delta``'s factors as ``nnx.LoRAParam``.

    ``delta`` is aligned with ``nnx.split(model)[1]`` (as :func:`split`
    returns it, or as ``lj.init_lora`` / ``lj.load`` / ``lj.import_peft`` give it
    for that state). ``model`` itself is not changed, and the result shares no
    Variable with it (its kernel arrays are the same immutable arrays).

    Raises:
      LoraStructureError: ``delta`` does not fit the state (the message names
        the leaf), holds an adapter stack, or a LoRA Variable name is taken.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> from lora_jax import nnx as lora_nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> graphdef, state = nnx.split(model)
      >>> _, delta = lj.init_lora(jax.random.key(0), state, lj.LoraConfig(targets="kernel", rank=2))
      >>> lm = lora_nnx.from_delta(model, delta)
      >>> jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), lora_nnx.split(lm)[2], delta))
      True
    """
    held = [p for _, p, _ in _rows(nnx.state(model, nnx.LoRAParam))]
    if held:
        raise LoraStructureError(
            f"the module holds nnx.LoRAParam Variables already ({held[:4]}): it is adapted "
            "already (by qwix? convert its LoRA state with lora_nnx.from_qwix; a LoraModel's "
            "inner module? use lora_nnx.split)"
        )
    graphdef, state = nnx.split(model)
    inner = nnx.merge(graphdef, _fresh(state))
    adapted = []
    for keys, entry in _entries(state, delta):
        if is_stacked(entry):
            raise LoraStructureError(
                f"leaf {_path(keys)!r}: an adapter stack cannot live in a LoraModel; serve stacks "
                "with lj.implicit(...)(base, stack, x, adapter_ids=...) on lora_nnx.split's base"
            )
        record, arrays = Adapted.of(keys, entry)
        owner = _owner(inner, keys)
        for name, value in zip(record.names(), arrays):
            if _has(owner, name):
                raise LoraStructureError(
                    f"leaf {_path(keys)!r}: its owner already has an attribute {name!r} (is the "
                    "module adapted already, e.g. by qwix? convert it with lora_nnx.from_qwix)"
                )
            _set(owner, name, nnx.LoRAParam(value))
        adapted.append(record)
    return LoraModel(inner, tuple(adapted), strict=strict, dropout=dropout, rngs=rngs)


def split(lora_model: LoraModel) -> tuple[Any, Any, Any]:
    """The functional view: ``(graphdef, base, delta)`` of the plain module and the adapter.

    ``graphdef`` and ``base`` are ``nnx.split`` of the inner module without its
    LoRA Variables (the original class); ``delta`` is aligned with ``base``.
    So ``lj.implicit(lambda s, x: nnx.merge(graphdef, s)(x))(base, delta, x)``
    equals ``lora_model(x)``, and ``lj.save``, ``lj.export_peft``,
    ``lj.merge``, ``lj.stack_adapters``, ``lj.quantize`` (QLoRA) apply. ``base``
    shares no Variable with ``lora_model``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> from lora_jax import nnx as lora_nnx
      >>> lm = lora_nnx.lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                    lj.LoraConfig(targets="kernel", rank=2), jax.random.key(0))
      >>> graphdef, base, delta = lora_nnx.split(lm)
      >>> type(plain := nnx.merge(graphdef, base)).__name__, [x.shape for x in jax.tree.leaves(delta)]
      ('Linear', [(4, 2), (2, 3)])
    """
    graphdef, lora_state, state = nnx.split(lora_model.model, nnx.LoRAParam, ...)  # type: ignore[misc]
    plain = nnx.merge(graphdef, lora_state, _fresh(state))
    for record in lora_model.adapted:
        owner = _owner(plain, record.keys)
        for name in record.names():
            _delete(owner, name)
    graphdef, base = nnx.split(plain)
    return graphdef, base, _delta_of(base, lora_state, lora_model.adapted)


def merge(lora_model: LoraModel) -> nnx.Module:
    """A plain module of the inner module's class with dense kernels ``W + s A B``.

    Its output equals ``lora_model``'s (to float tolerance); it shares no
    Variable with ``lora_model``, whose kernels are unchanged.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from flax import nnx
      >>> from lora_jax import nnx as lora_nnx
      >>> lm = lora_nnx.lora(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                    lj.LoraConfig(targets="kernel", rank=2, init="swapped"), jax.random.key(0))
      >>> plain = lora_nnx.merge(lm)
      >>> type(plain).__name__, bool(jnp.allclose(plain(jnp.ones((1, 4))), lm(jnp.ones((1, 4))), atol=1e-6))
      ('Linear', True)
    """
    graphdef, base, delta = split(lora_model)
    return nnx.merge(graphdef, merge_delta(base, delta))


# --- trees ----------------------------------------------------------------------------------


def _fresh(state: Any) -> Any:
    """A copy of an ``nnx.State`` with new Variable objects holding the same arrays."""
    return jax.tree_util.tree_map(lambda x: x, state, is_leaf=is_quantized)


def _keys(key_path: Sequence[Any]) -> Keys:
    """The key path of a state leaf as attribute names / indices (``.value`` dropped)."""
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    out = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            raise LoraStructureError(f"unexpected key {k!r} in a state path")
    return tuple(out)


def _path(keys: Keys) -> str:
    return "/".join(str(k) for k in keys)


def _treedef(tree: Any) -> Any:
    return jax.tree_util.tree_structure(tree, is_leaf=is_quantized)


def _rows(tree: Any, delta: Any = None) -> list[tuple[Keys, str, Any]]:
    """``[(keys, path, leaf)]`` of ``tree`` (a quantized kernel is one leaf); with
    ``delta``, its entry at each leaf instead of the leaf."""
    flat, treedef_ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    treedef: Any = treedef_
    values = [leaf for _, leaf in flat]
    if delta is not None:
        try:
            values = treedef.flatten_up_to(delta)
        except (ValueError, TypeError) as e:
            raise LoraStructureError(
                f"the delta's structure differs from the state's: {e}"
            ) from None
    return [(_keys(kp), path_str(kp), v) for (kp, _), v in zip(flat, values)]


def _entries(state: Any, delta: Any) -> list[tuple[Keys, Any]]:
    """The non-``None`` entries of ``delta`` with their state keys, checked against the state."""
    align(state, delta, stacked_ok=True)
    return [(keys, entry) for keys, _, entry in _rows(state, delta) if entry is not None]


def _delta_of(state: Any, lora_state: Any, adapted: tuple[Adapted, ...]) -> Any:
    """The delta aligned with ``state`` holding the values of ``lora_state``'s LoRAParams."""
    values = {_keys(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(lora_state)[0]}
    entries = {}
    for record in adapted:
        owner = record.keys[:-1]
        try:
            arrays = [values[owner + (name,)] for name in record.names()]
        except KeyError as e:
            raise LoraStructureError(
                f"leaf {record.path!r}: its LoRA Variable {e.args[0][-1]!r} is missing from the "
                "module"
            ) from None
        entries[record.keys] = record.entry(arrays)
    rows = _rows(state)
    missing = set(entries) - {keys for keys, _, _ in rows}
    if missing:
        raise LoraStructureError(
            f"adapted leaves {sorted(map(_path, missing))} are not in the state"
        )
    return jax.tree_util.tree_unflatten(_treedef(state), [entries.get(k) for k, _, _ in rows])


def _owner(module: Any, keys: Keys) -> Any:
    node = module
    for k in keys[:-1]:
        node = (
            node[k]
            if isinstance(node, (Mapping, list, tuple)) or isinstance(k, int)
            else (getattr(node, k))
        )
    if isinstance(keys[-1], int) or isinstance(node, (list, tuple)):
        raise LoraArgumentError(
            f"leaf {_path(keys)!r} is an element of a sequence, which cannot hold its LoRA "
            "Variables beside it; adapt kernels that are attributes of a module"
        )
    return node


def _has(owner: Any, name: str) -> bool:
    return name in owner if isinstance(owner, Mapping) else hasattr(owner, name)


def _set(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, MutableMapping):
        owner[name] = value
    else:
        setattr(owner, name, value)


def _delete(owner: Any, name: str) -> None:
    if isinstance(owner, MutableMapping):
        del owner[name]
    else:
        delattr(owner, name)
