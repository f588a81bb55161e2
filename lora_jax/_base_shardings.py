"""The base params' shardings, from whatever form they are given in, as ``NamedSharding``.

The base's shardings may be a pytree of ``NamedSharding``; of
``PartitionSpec`` plus a ``mesh``; Flax linen variables boxed with
``nn.Partitioned`` / ``nn.with_logical_partitioning`` (e.g. the output of
``jax.eval_shape(model.init, ...)``) plus logical-axis ``rules``; an NNX state
whose variables carry sharding annotations (``nnx.with_partitioning``); or the
already placed params themselves (their ``.sharding``). Each form has its own
small reader, chosen by :func:`read_entry`; every check that can fail -- a mesh axis that does
not exist, a mesh axis used twice, a spec longer than its kernel, a sharded
axis its mesh axes do not divide, a logical axis with no rule -- raises
:class:`LoraShardingError` naming the leaf path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax._errors import LoraShardingError
from lora_jax._paths import leaves_with_paths

Rules = Sequence[tuple[str, Any]]
#: ``(NamedSharding, the leaf's shape or None)``: what a reader makes of one base entry.
Read = tuple[NamedSharding, Any]


@functools.cache
def flax_types() -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
    """(linen box types, NNX variable types, LogicallyPartitioned), imported lazily."""
    from flax.core import meta
    from flax.linen import spmd
    from flax.nnx import variablelib

    variables = tuple(
        getattr(variablelib, n)
        for n in ("Variable", "VariableState")
        if isinstance(getattr(variablelib, n, None), type)
    )
    return (meta.AxisMetadata,), variables, spmd.LogicallyPartitioned


def _is_entry(x: Any) -> bool:
    """A node of a base-shardings tree that stands for one leaf."""
    if isinstance(x, (NamedSharding, P)):
        return True
    boxes, variables, _ = flax_types()
    return isinstance(x, boxes + variables)


def entries_by_path(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, entry), ...], treedef)`` of a base-shardings tree in any form.

    Example:
      >>> entries_by_path({"w": P("x"), "b": None})[0] == [("w", P("x"))]
      True
    """
    return leaves_with_paths(tree, is_leaf=_is_entry)


def unboxed(params: Any) -> Any:
    """``params`` with linen partitioning boxes removed."""
    boxes, _, _ = flax_types()
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, boxes) else x,
        params,
        is_leaf=lambda x: isinstance(x, boxes),
    )


def _var_value(var: Any) -> Any:
    get = getattr(var, "get_value", None)
    return get() if callable(get) else var.value


def _shape_of(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


# ---- one reader per form of entry ----------------------------------------------------------


def _from_named(path: str, entry: NamedSharding, mesh: Any, rules: Rules | None) -> Read:
    _check_axes(path, entry.spec, entry.mesh)
    return entry, None


def _from_spec(path: str, entry: P, mesh: Any, rules: Rules | None) -> Read:
    spec = _translate(path, entry, rules) if rules is not None else entry
    return _placed(path, spec, mesh), None


def _from_logical_box(path: str, entry: Any, mesh: Any, rules: Rules | None) -> Read:
    """``nn.LogicallyPartitioned``: logical names, by ``rules``, the box's own, or the context's."""
    box_rules = rules if rules is not None else (entry.rules or _context_rules())
    if not box_rules:
        raise LoraShardingError(
            f"leaf {path!r} is logically partitioned as {tuple(entry.names)} but no "
            "logical axis rules were given: pass rules=((logical, mesh_axes), ...) or "
            "call inside flax.linen.logical_axis_rules(...)"
        )
    spec = _translate(path, P(*entry.names), box_rules)
    return _placed(path, spec, mesh if mesh is not None else entry.mesh), _shape_of(entry.value)


def _from_box(path: str, entry: Any, mesh: Any, rules: Rules | None) -> Read:
    """``nn.Partitioned``: the names are mesh axes."""
    spec = P(*entry.names) if hasattr(entry, "names") else P()
    mesh = mesh if mesh is not None else getattr(entry, "mesh", None)
    return _placed(path, spec, mesh), _shape_of(entry.value)


def _from_variable(path: str, entry: Any, mesh: Any, rules: Rules | None) -> Read:
    """An NNX variable: its own helper reads the annotation."""
    from flax import nnx

    if mesh is None and hasattr(entry, "get_metadata"):
        mesh = entry.get_metadata().get("mesh")
    value = _var_value(entry)
    if isinstance(value, (NamedSharding, P)):  # nnx.get_named_sharding / get_partition_spec
        return read_entry(path, value, mesh, rules)
    spec = _var_value(nnx.get_partition_spec(entry))
    spec = P() if spec is None else spec
    if rules is not None:
        spec = _translate(path, spec, rules)
    return _placed(path, spec, mesh), _shape_of(value)


def _from_array(path: str, entry: Any, mesh: Any, rules: Rules | None) -> Read:
    """An array, a ShapeDtypeStruct, or anything without an annotation: its ``.sharding``,
    else replicated (as flax's ``get_partition_spec``) on the given mesh."""
    shape = _shape_of(entry)
    sharding = getattr(entry, "sharding", None)
    if isinstance(sharding, NamedSharding):
        _check_axes(path, sharding.spec, sharding.mesh)
        return sharding, shape
    if mesh is None:
        what = type(sharding).__name__ if sharding is not None else type(entry).__name__
        raise LoraShardingError(
            f"leaf {path!r} carries no NamedSharding ({what}); place the params with "
            "NamedShardings, or pass base_shardings / mesh=... (unannotated leaves are "
            "then replicated)"
        )
    return _placed(path, P(), mesh), shape


def _placed(path: str, spec: P, mesh: Any) -> NamedSharding:
    """``NamedSharding(mesh, spec)`` after checking ``spec``'s axes against ``mesh``."""
    if mesh is None:
        raise LoraShardingError(
            f"leaf {path!r}: the partition spec {spec} needs a mesh; pass mesh=... (or give "
            "NamedShardings)"
        )
    _check_axes(path, spec, mesh)
    return NamedSharding(mesh, spec)


def _readers() -> list[tuple[Any, Callable[..., Read]]]:
    """``[(entry types, reader), ...]``, most specific first (a logical box is a box)."""
    boxes, variables, logical_box = flax_types()
    return [
        (NamedSharding, _from_named),
        (P, _from_spec),
        (logical_box, _from_logical_box),
        (boxes, _from_box),
        (variables, _from_variable),
    ]


def read_entry(path: str, entry: Any, mesh: Any, rules: Rules | None) -> Read:
    """One base entry as ``(NamedSharding, shape or None)``, validated against the mesh.

    Example:
      >>> mesh = jax.sharding.AbstractMesh((2,), ("x",))
      >>> read_entry("w", P("x"), mesh, None)[0].spec == P("x")
      True
    """
    for types, read in _readers():
        if isinstance(entry, types):
            return read(path, entry, mesh, rules)
    return _from_array(path, entry, mesh, rules)


# ---- logical names and checks ------------------------------------------------------------


def _context_rules() -> Rules:
    import flax.linen as nn

    return tuple(nn.get_logical_axis_rules())


def _translate(path: str, spec: P, rules: Rules | Mapping[str, Any]) -> P:
    """Logical names -> mesh axes with flax's resolution, after checking every name has a rule."""
    import flax.linen as nn

    rules = tuple(rules.items()) if isinstance(rules, Mapping) else tuple(tuple(r) for r in rules)
    known = {r[0] for r in rules}
    names = []
    for entry in tuple(spec):
        if entry is not None and not isinstance(entry, str):
            raise LoraShardingError(
                f"leaf {path!r}: logical spec {spec} has entry {entry!r}; logical specs name "
                "one logical axis (or None) per kernel axis"
            )
        if entry is not None and entry not in known:
            raise LoraShardingError(
                f"leaf {path!r}: logical axis {entry!r} (of {spec}) has no rule in the logical "
                f"axis rules (rules cover {sorted(known)}); add ({entry!r}, mesh_axes or None)"
            )
        names.append(entry)
    mesh_spec = nn.logical_to_mesh_axes(names, rules)
    return P() if mesh_spec is None else mesh_spec


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _check_axes(path: str, spec: P, mesh: Any) -> None:
    names = tuple(mesh.axis_names)
    used: list[str] = []
    for entry in tuple(spec):
        if entry is P.UNCONSTRAINED:
            raise LoraShardingError(
                f"leaf {path!r}: spec {spec} is UNCONSTRAINED; give a concrete spec"
            )
        for axis in _mesh_axes(entry):
            if axis not in names:
                raise LoraShardingError(
                    f"leaf {path!r}: spec {spec} names mesh axis {axis!r}, which is not an "
                    f"axis of the mesh (axes: {names})"
                )
            if axis in used:
                raise LoraShardingError(f"leaf {path!r}: spec {spec} uses mesh axis {axis!r} twice")
            used.append(axis)


def check_shape(
    path: str, sharding: NamedSharding, shape: Sequence[int], what: str = "the kernel"
) -> None:
    """Raises :class:`LoraShardingError` unless ``sharding`` fits an array of ``shape``
    (no more spec entries than axes, every sharded axis divided by its mesh axes).

    Example:
      >>> mesh = jax.sharding.AbstractMesh((2,), ("x",))
      >>> try:
      ...     check_shape("w", NamedSharding(mesh, P("x")), (3, 4))
      ... except LoraShardingError as e:
      ...     print(str(e)[:62])
      leaf 'w': axis 0 of the kernel (shape (3, 4)) has size 3, whic
    """
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        raise LoraShardingError(
            f"leaf {path!r}: spec {sharding.spec} has {len(spec)} entries but {what} has "
            f"shape {tuple(shape)}"
        )
    sizes = dict(sharding.mesh.shape)
    for dim, (entry, n) in enumerate(zip(spec, shape)):
        axes = _mesh_axes(entry)
        ways = math.prod(sizes[a] for a in axes)
        if n % ways:
            raise LoraShardingError(
                f"leaf {path!r}: axis {dim} of {what} (shape {tuple(shape)}) has size {n}, "
                f"which mesh axes {axes} ({ways} devices, spec {sharding.spec}) do not divide"
            )


# ---- the public reader ---------------------------------------------------------------------


def param_shardings(tree: Any, mesh: Any = None, *, rules: Rules | None = None) -> Any:
    """The base params' shardings as a pytree of ``NamedSharding``.

    Args:
      tree: one of: a pytree of ``NamedSharding``; a pytree of
        ``PartitionSpec`` (needs ``mesh``); Flax linen variables with
        ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes (e.g.
        ``jax.eval_shape(model.init, ...)``); an NNX state whose variables
        carry sharding annotations; or placed arrays (their ``.sharding``).
        Leaves with no annotation are replicated.
      mesh: the ``Mesh`` (or ``AbstractMesh``) for specs and boxes that carry none.
      rules: logical-axis rules ``((logical, mesh_axes | None), ...)``. Linen
        ``LogicallyPartitioned`` names are always logical (``rules``, else the
        box's own, else flax's ``logical_axis_rules`` context); for specs and
        NNX annotations, giving ``rules`` means the names are logical.

    Returns:
      A pytree of ``NamedSharding``, with linen boxes unboxed (so it matches
      ``nn.unbox(variables)``) and NNX variables kept.

    Raises:
      LoraShardingError: an unknown or repeated mesh axis, a logical axis with
        no rule, a spec longer than its array, or an axis the mesh does not
        divide (when shapes are known); the message names the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> import flax.linen as nn
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
      >>> init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      >>> variables = jax.eval_shape(nn.Dense(16, kernel_init=init).init, jax.random.key(0),
      ...                            jnp.ones((1, 8)))
      >>> sh = lj.param_shardings(variables, mesh, rules=(("embed", "fsdp"), ("mlp", "tensor")))
      >>> sh["params"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      True
    """
    _, variables, _ = flax_types()
    rows, treedef = entries_by_path(tree)
    out = []
    for path, entry in rows:
        sharding, shape = read_entry(path, entry, mesh, rules)
        if shape is not None:
            check_shape(path, sharding, shape)
        out.append(entry.replace(sharding) if isinstance(entry, variables) else sharding)
    return jax.tree_util.tree_unflatten(treedef, out)
