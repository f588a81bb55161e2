"""Sharding the delta like its base: factor specs derived from the kernels' specs.

On a device mesh each LoRA factor is sharded along the kernel axes it shares
with its kernel, and never along the rank axis. For a kernel laid out as
``(*stack, *fan_in, *fan_out)`` with partition spec
``(*S, *I, *O)`` (one entry per axis, in the kernel's own axis order):

=============  ============================  =======================
factor         shape                         spec
=============  ============================  =======================
``A``          ``(*stack, *fan_in, r)``      ``(*S, *I, None)``
``B``          ``(*stack, r, *fan_out)``     ``(*S, None, *O)``
``magnitude``  ``(*stack, *fan_out)``        ``(*S, *O)``  (DoRA)
=============  ============================  =======================

So an FSDP-sharded fan-in axis shards ``A``'s rows, a tensor-parallel fan-out
axis shards ``B``'s columns, and every low-rank product is local up to an
all-reduce of an ``(M, r)`` activation: the dense kernel and its gradient are
never formed, and neither is ever gathered.

The base's shardings may be given as a pytree of ``NamedSharding``; of
``PartitionSpec`` plus a ``mesh``; as Flax linen variables boxed with
``nn.Partitioned`` / ``nn.with_logical_partitioning`` (e.g. the output of
``jax.eval_shape(model.init, ...)``) plus logical-axis ``rules``; as an NNX
state whose variables carry sharding annotations (``nnx.with_partitioning``);
or as the already placed params themselves (their ``.sharding``). Every check
that can fail -- a mesh axis that does not exist, a mesh axis used twice, a
spec longer than its kernel, a sharded axis its mesh axes do not divide, a
logical axis with no rule -- raises :class:`LoraShardingError` naming the
leaf path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.factors import LoraFactors, is_factors
from lora_jax.init import init_lora
from lora_jax.layout import KernelLayout
from lora_jax.paths import leaves_with_paths

Rules = Sequence[tuple[str, Any]]


class LoraShardingError(LoraError):
    """Shardings that do not fit: an unknown or repeated mesh axis, a sharded axis its
    mesh axes do not divide, a logical axis without a rule, or a targeted kernel
    with no sharding entry. The message names the leaf path."""


# -----------------------------------------------------------------------------
# Factor specs from a kernel spec
# -----------------------------------------------------------------------------


def factor_specs(kernel_spec: P | Sequence[Any], layout: KernelLayout | str) -> tuple[P, P, P]:
    """Partition specs of ``A``, ``B`` and the DoRA magnitude, from the kernel's spec.

    Args:
      kernel_spec: the kernel's ``PartitionSpec`` (one entry per kernel axis, in
        the kernel's axis order; missing trailing entries mean unsharded).
      layout: the kernel's :class:`KernelLayout` (or its axes string).

    Returns:
      ``(a_spec, b_spec, magnitude_spec)`` for ``A: (*stack, *fan_in, r)``,
      ``B: (*stack, r, *fan_out)`` and ``magnitude: (*stack, *fan_out)``;
      the rank axis is never sharded.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> a, b, m = factor_specs(P("fsdp", "tensor"), "io")
      >>> tuple(a), tuple(b), tuple(m)
      (('fsdp', None), (None, 'tensor'), ('tensor',))
      >>> a, b, _ = factor_specs(P(None, "fsdp", "tensor", None), "sioo")  # stacked q-proj
      >>> tuple(a), tuple(b)
      ((None, 'fsdp', None), (None, None, 'tensor', None))
    """
    layout = KernelLayout(layout) if isinstance(layout, str) else layout
    entries = _entries(kernel_spec, layout.ndim)
    stack = [entries[d] for d in layout.stack_axes]
    fan_in = [entries[d] for d in layout.in_axes]
    fan_out = [entries[d] for d in layout.out_axes]
    return P(*stack, *fan_in, None), P(*stack, None, *fan_out), P(*stack, *fan_out)


def _entries(spec: Any, ndim: int) -> list[Any]:
    entries = list(tuple(spec))
    if len(entries) > ndim:
        raise LoraShardingError(f"spec {spec} has {len(entries)} entries for a {ndim}-D kernel")
    return entries + [None] * (ndim - len(entries))


# -----------------------------------------------------------------------------
# Normalising the base's shardings
# -----------------------------------------------------------------------------


def _flax_types() -> tuple[tuple[type, ...], tuple[type, ...], Any]:
    """(linen box types, NNX variable types, LogicallyPartitioned), imported lazily."""
    from flax.core import meta
    from flax.linen import spmd
    from flax.nnx import variablelib

    variables = tuple(getattr(variablelib, n) for n in ("Variable", "VariableState")
                      if isinstance(getattr(variablelib, n, None), type))
    return (meta.AxisMetadata,), variables, spmd.LogicallyPartitioned


def _is_entry(x: Any) -> bool:
    """A node of a base-shardings tree that stands for one leaf."""
    if isinstance(x, (NamedSharding, P)):
        return True
    boxes, variables, _ = _flax_types()
    return isinstance(x, boxes + variables)


def _entries_by_path(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    return leaves_with_paths(tree, is_leaf=_is_entry)


def _var_value(var: Any) -> Any:
    get = getattr(var, "get_value", None)
    return get() if callable(get) else var.value


def _shape_of(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _named(path: str, entry: Any, mesh: Any, rules: Rules | None) -> tuple[NamedSharding,
                                                                          tuple[int, ...] | None]:
    """One base entry as ``(NamedSharding, shape or None)``, validated against the mesh."""
    boxes, variables, logical_box = _flax_types()
    shape = None
    if isinstance(entry, NamedSharding):
        sharding = entry
        _check_axes(path, sharding.spec, sharding.mesh)
        return sharding, None
    if isinstance(entry, P):
        spec = _translate(path, entry, rules) if rules is not None else entry
    elif isinstance(entry, logical_box):
        shape = _shape_of(entry.value)
        box_rules = rules if rules is not None else (entry.rules or _context_rules())
        if not box_rules:
            raise LoraShardingError(
                f"leaf {path!r} is logically partitioned as {tuple(entry.names)} but no "
                "logical axis rules were given: pass rules=((logical, mesh_axes), ...) or "
                "call inside flax.linen.logical_axis_rules(...)"
            )
        spec = _translate(path, P(*entry.names), box_rules)
        mesh = mesh if mesh is not None else entry.mesh
    elif isinstance(entry, boxes):  # nn.Partitioned: names are mesh axes
        shape = _shape_of(entry.value)
        spec = P(*entry.names) if hasattr(entry, "names") else P()
        mesh = mesh if mesh is not None else getattr(entry, "mesh", None)
    elif isinstance(entry, variables):  # NNX: its own helper reads the annotation
        from flax import nnx

        if mesh is None and hasattr(entry, "get_metadata"):
            mesh = entry.get_metadata().get("mesh")
        value = _var_value(entry)
        if isinstance(value, (NamedSharding, P)):  # nnx.get_named_sharding / get_partition_spec
            return _named(path, value, mesh, rules)
        shape = _shape_of(value)
        spec = _var_value(nnx.get_partition_spec(entry))
        spec = P() if spec is None else spec
        if rules is not None:
            spec = _translate(path, spec, rules)
    else:  # an array, a ShapeDtypeStruct, or anything without an annotation
        shape = _shape_of(entry)
        sharding = getattr(entry, "sharding", None)
        if isinstance(sharding, NamedSharding):
            _check_axes(path, sharding.spec, sharding.mesh)
            return sharding, shape
        spec = P()  # not annotated: replicated, as flax's get_partition_spec
    if mesh is None:
        raise LoraShardingError(
            f"leaf {path!r}: the partition spec {spec} needs a mesh; pass mesh=... (or give "
            "NamedShardings)"
        )
    _check_axes(path, spec, mesh)
    return NamedSharding(mesh, spec), shape


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
    return nn.logical_to_mesh_axes(names, rules)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _check_axes(path: str, spec: P, mesh: Any) -> None:
    names = tuple(mesh.axis_names)
    used: list[str] = []
    for entry in tuple(spec):
        if entry is P.UNCONSTRAINED:
            raise LoraShardingError(f"leaf {path!r}: spec {spec} is UNCONSTRAINED; give a "
                                    "concrete spec")
        for axis in _mesh_axes(entry):
            if axis not in names:
                raise LoraShardingError(
                    f"leaf {path!r}: spec {spec} names mesh axis {axis!r}, which is not an "
                    f"axis of the mesh (axes: {names})"
                )
            if axis in used:
                raise LoraShardingError(
                    f"leaf {path!r}: spec {spec} uses mesh axis {axis!r} twice"
                )
            used.append(axis)


def _check_shape(path: str, sharding: NamedSharding, shape: Sequence[int],
                 what: str = "the kernel") -> None:
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
      >>> import flax.linen as nn
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
      >>> init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      >>> variables = jax.eval_shape(nn.Dense(16, kernel_init=init).init, jax.random.key(0),
      ...                            jnp.ones((1, 8)))
      >>> sh = param_shardings(variables, mesh, rules=(("embed", "fsdp"), ("mlp", "tensor")))
      >>> sh["params"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      True
    """
    _, variables, _ = _flax_types()
    rows, treedef = _entries_by_path(tree)
    out = []
    for path, entry in rows:
        sharding, shape = _named(path, entry, mesh, rules)
        if shape is not None:
            _check_shape(path, sharding, shape)
        out.append(entry.replace(sharding) if isinstance(entry, variables) else sharding)
    return jax.tree_util.tree_unflatten(treedef, out)


# -----------------------------------------------------------------------------
# The delta's shardings, and a delta initialised directly sharded
# -----------------------------------------------------------------------------


def _kernel_shape(f: LoraFactors) -> tuple[int, ...]:
    """The base kernel's shape, read off the factors (and ``num_layers`` when only some
    stacked layers are adapted)."""
    layout = f.layout
    ns = len(layout.stack_axes)
    a_shape, b_shape = tuple(f.a.shape), tuple(f.b.shape)
    stack = list(a_shape[:ns])
    if getattr(f, "layers", None) is not None and stack:
        stack[0] = f.num_layers
    by_role = {"s": stack, "i": list(a_shape[ns:-1]), "o": list(b_shape[ns + 1:])}
    return tuple(by_role[c].pop(0) for c in layout.axes)


def delta_shardings(base_shardings: Any, delta: Any, mesh: Any = None, *,
                    rules: Rules | None = None) -> Any:
    """Shardings of the delta, derived from the base kernels' shardings.

    Each targeted kernel's spec ``(*S, *I, *O)`` (stacked, fan-in, fan-out
    entries) gives ``A: (*S, *I, None)``, ``B: (*S, None, *O)`` and, with
    DoRA, ``magnitude: (*S, *O)`` (see :func:`factor_specs`); the rank axis is
    never sharded.

    Args:
      base_shardings: the base params' shardings in any form
        :func:`param_shardings` takes (``NamedSharding`` / ``PartitionSpec``
        pytrees, Flax boxed variables, NNX annotated state, placed arrays), or
        one ``NamedSharding`` / ``PartitionSpec`` for every kernel. Matched
        to the delta by leaf path, so only targeted kernels need an entry.
      delta: the delta, or its abstract version (``jax.eval_shape``); only
        factor shapes and layouts are read.
      mesh: the mesh, for specs and boxes that carry none.
      rules: logical-axis rules, as in :func:`param_shardings`.

    Returns:
      A pytree with the delta's structure: ``LoraFactors`` of ``NamedSharding``
      (``a``, ``b`` and ``magnitude`` when present) at targeted leaves, ``None``
      elsewhere -- usable as ``jax.jit``'s ``in_shardings`` / ``out_shardings``.

    Raises:
      LoraShardingError: a targeted kernel has no entry, or its sharding does
        not fit it (unknown or repeated mesh axis, axis not divisible, logical
        axis without a rule); the message names the leaf path.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
      >>> params = {"up": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
      >>> delta = jax.eval_shape(lambda k: init_lora(k, params, LoraConfig(targets="up", rank=8))[1],
      ...                        jax.random.key(0))
      >>> sh = delta_shardings({"up": P("fsdp", "tensor")}, delta, mesh)["up"]
      >>> tuple(sh.a.spec), tuple(sh.b.spec), sh.a.shard_shape((64, 8)), sh.b.shard_shape((8, 256))
      (('fsdp', None), (None, 'tensor'), (32, 8), (8, 64))
    """
    rows, treedef = leaves_with_paths(delta, is_leaf=lambda x: x is None or is_factors(x))
    entries, _ = _entries_by_path(base_shardings)
    table = dict(entries)
    single = entries[0][1] if len(entries) == 1 and entries[0][0] == "" else None
    out = []
    for path, f in rows:
        if f is None:
            out.append(None)
            continue
        if not is_factors(f):
            raise LoraShardingError(
                f"leaf {path!r}: the delta holds {type(f).__name__}, expected LoraFactors or None"
            )
        entry = single if single is not None else table.get(path)
        if entry is None:
            sample = ", ".join(repr(p) for p, _ in entries[:6])
            raise LoraShardingError(
                f"leaf {path!r} has LoRA factors but base_shardings has no entry for it "
                f"(entries: {sample}{', ...' if len(entries) > 6 else ''})"
            )
        sharding, _ = _named(path, entry, mesh, rules)
        shape = _kernel_shape(f)
        _check_shape(path, sharding, shape)
        a_spec, b_spec, m_spec = factor_specs(sharding.spec, f.layout)
        m = sharding.mesh
        new = dataclasses.replace(
            f, a=NamedSharding(m, a_spec), b=NamedSharding(m, b_spec),
            magnitude=None if f.magnitude is None else NamedSharding(m, m_spec))
        for name in ("a", "b", "magnitude"):  # e.g. a stacked axis holding only some layers
            if getattr(f, name) is not None:
                _check_shape(path, getattr(new, name), getattr(f, name).shape,
                             f"its factor {name!r}")
        out.append(new)
    return jax.tree_util.tree_unflatten(treedef, out)


def _unboxed_abstract(params: Any) -> Any:
    """``params`` with linen boxes removed and every array as a ShapeDtypeStruct."""
    boxes, _, _ = _flax_types()
    params = jax.tree_util.tree_map(lambda x: x.value if isinstance(x, boxes) else x, params,
                                    is_leaf=lambda x: isinstance(x, boxes))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, params)


def sharded_init_fn(params: Any, config: LoraConfig, base_shardings: Any = None, *,
                    mesh: Any = None, rules: Rules | None = None,
                    layouts: Mapping[str, KernelLayout] | None = None) -> tuple[Any, Any]:
    """The jitted delta initialiser behind :func:`init_lora_sharded`, and its shardings.

    Returns ``(init, shardings)``: ``init(key)`` is ``jax.jit`` of
    ``init_lora(key, params, config)[1]`` with ``out_shardings=shardings``, so
    every device draws only its own shard (with JAX's default partitionable
    threefry) and no factor is ever whole on one device. Useful to inspect the
    compiled program (``init.lower(key).compile().as_text()``).
    """
    abstract = _unboxed_abstract(params)
    if base_shardings is None:
        base_shardings = params
    abstract_delta = jax.eval_shape(
        lambda k: init_lora(k, abstract, config, layouts=layouts)[1], jax.random.key(0))
    shardings = delta_shardings(base_shardings, abstract_delta, mesh, rules=rules)
    init = jax.jit(lambda k: init_lora(k, abstract, config, layouts=layouts)[1],
                   out_shardings=shardings)
    return init, shardings


def init_lora_sharded(key: jax.Array, params: Any, config: LoraConfig, base_shardings: Any = None,
                      *, mesh: Any = None, rules: Rules | None = None,
                      layouts: Mapping[str, KernelLayout] | None = None) -> tuple[Any, Any]:
    """:func:`lora_jax.init_lora` with the delta created directly in its shardings.

    The factors are drawn inside one ``jax.jit`` whose ``out_shardings`` are
    :func:`delta_shardings`, so each device computes only its own shards; the
    values equal ``init_lora``'s for the same key.

    Args:
      key: a PRNG key.
      params: the base params, placed or abstract (``jax.ShapeDtypeStruct``), or
        Flax boxed variables; only shapes are read.
      config: the :class:`LoraConfig`.
      base_shardings: the base's shardings in any form :func:`delta_shardings`
        takes; ``None`` reads them off ``params`` (placed arrays' ``.sharding``,
        or Flax partitioning boxes).
      mesh: the mesh, for specs and boxes that carry none.
      rules: logical-axis rules, as in :func:`param_shardings`.
      layouts: traced layouts ``{path: KernelLayout}``, as for ``init_lora``.

    Returns:
      ``(base, delta)``: ``base`` is ``params`` as given; ``delta`` has
      ``A: (*stack, *fan_in, r)`` and ``B: (*stack, r, *fan_out)`` sharded as
      :func:`delta_shardings` says.

    Example:
      >>> import numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
      >>> params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp", "tensor")))}
      >>> base, delta = init_lora_sharded(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
      >>> delta["w"].a.sharding.spec == P("fsdp", None), delta["w"].b.sharding.spec == P(None, "tensor")
      (True, True)
    """
    init, _ = sharded_init_fn(params, config, base_shardings, mesh=mesh, rules=rules,
                              layouts=layouts)
    return params, init(key)


def opt_state_shardings(opt_state: Any, delta_shardings: Any) -> Any:
    """Shardings for an optimizer state (or any tree) holding copies of the delta.

    Every subtree with exactly the delta's structure (Adam's ``mu`` and ``nu``,
    momentum traces, ...) takes ``delta_shardings``; every other leaf (step
    counts, schedules' scalars) is replicated on the delta's mesh. States that
    reshape the params tree (``optax.masked``, ``multi_transform``) get
    replicated leaves there: pass them through ``optax.tree_map_params``
    instead if they are large.

    Args:
      opt_state: the state, or its abstract version
        ``jax.eval_shape(optimizer.init, delta)``.
      delta_shardings: from :func:`delta_shardings`.

    Returns:
      A pytree of ``NamedSharding`` matching ``opt_state``, for
      ``jax.jit(optimizer.init, out_shardings=...)`` and the train step.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2,), ("fsdp",))
      >>> delta = jax.eval_shape(lambda k: init_lora(k, {"w": jnp.ones((8, 4))},
      ...                        LoraConfig(targets="w", rank=2))[1], jax.random.key(0))
      >>> dsh = delta_shardings({"w": P("fsdp")}, delta, mesh)
      >>> state = jax.eval_shape(optax.adam(1e-3).init, delta)
      >>> sh = opt_state_shardings(state, dsh)
      >>> sh[0].mu["w"].a.spec == P("fsdp", None), sh[0].count.spec == P()
      (True, True)
    """
    delta_def = jax.tree_util.tree_structure(delta_shardings)
    named = [s for s in jax.tree_util.tree_leaves(delta_shardings) if isinstance(s, NamedSharding)]
    if not named:
        raise LoraShardingError("delta_shardings holds no NamedSharding (an empty delta?)")
    replicated = NamedSharding(named[0].mesh, P())

    def like_delta(x: Any) -> bool:
        try:
            return jax.tree_util.tree_structure(x) == delta_def
        except Exception:  # noqa: BLE001 -- exotic nodes simply do not match
            return False

    return jax.tree_util.tree_map(lambda x: delta_shardings if like_delta(x) else replicated,
                                  opt_state, is_leaf=like_delta)
