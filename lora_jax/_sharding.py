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

The base's shardings may be given in any form
:func:`~lora_jax._base_shardings.param_shardings` reads (``NamedSharding`` or
``PartitionSpec`` pytrees, Flax boxed variables, NNX annotated state, placed
arrays); every check that can fail raises :class:`LoraShardingError` naming
the leaf path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax._base_shardings import (
    Rules,
    check_shape,
    entries_by_path,
    param_shardings,
    read_entry,
    unboxed,
)
from lora_jax._config import LoraConfig
from lora_jax._delta import LeafDelta, LoraBias, TokenRows, is_delta_leaf
from lora_jax._errors import LoraShardingError
from lora_jax._init_lora import init_lora
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths, unshared

# -----------------------------------------------------------------------------
# Factor specs from a kernel spec
# -----------------------------------------------------------------------------


def _same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure (one treedef comparison).

    Example:
      >>> _same_structure({"a": 1}, {"a": 2}), _same_structure({"a": 1}, [1])
      (True, False)
    """
    structure: Any = jax.tree_util.tree_structure(a)
    return bool(structure == jax.tree_util.tree_structure(b))


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
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> a, b, m = lj.advanced.factor_specs(P("fsdp", "tensor"), "io")
      >>> tuple(a), tuple(b), tuple(m)
      (('fsdp', None), (None, 'tensor'), ('tensor',))
      >>> a, b, _ = lj.advanced.factor_specs(P(None, "fsdp", "tensor", None), "sioo")  # stacked q-proj
      >>> tuple(a), tuple(b)
      ((None, 'fsdp', None), (None, None, 'tensor', None))
    """
    layout = KernelLayout(layout) if isinstance(layout, str) else layout
    entries = _entries(kernel_spec, layout.ndim)
    stack = [entries[d] for d in layout.batch_axes]
    fan_in = [entries[d] for d in layout.in_axes]
    fan_out = [entries[d] for d in layout.out_axes]
    return P(*stack, *fan_in, None), P(*stack, None, *fan_out), P(*stack, *fan_out)


def _entries(spec: Any, ndim: int) -> list[Any]:
    entries = list(tuple(spec))
    if len(entries) > ndim:
        raise LoraShardingError(f"spec {spec} has {len(entries)} entries for a {ndim}-D kernel")
    return entries + [None] * (ndim - len(entries))


# -----------------------------------------------------------------------------
# The delta's shardings, and a delta initialised directly sharded
# -----------------------------------------------------------------------------


def delta_shardings(
    base_shardings: Any, delta: Any, mesh: Any = None, *, rules: Rules | None = None
) -> Any:
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
      (``a``, ``b`` and ``magnitude`` when present) at targeted leaves, a
      ``LeafDelta`` holding the leaf's own sharding at leaves trained in full,
      ``None`` elsewhere -- usable as ``jax.jit``'s ``in_shardings`` /
      ``out_shardings``.

    Raises:
      LoraShardingError: a targeted kernel has no entry, or its sharding does
        not fit it (unknown or repeated mesh axis, axis not divisible, logical
        axis without a rule); the message names the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
      >>> params = {"up": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
      >>> cfg = lj.LoraConfig(targets="up", rank=8)
      >>> delta = jax.eval_shape(lambda k: lj.init_lora(k, params, cfg)[1], jax.random.key(0))
      >>> sh = lj.delta_shardings({"up": P("fsdp", "tensor")}, delta, mesh)["up"]
      >>> tuple(sh.a.spec), tuple(sh.b.spec), sh.a.shard_shape((64, 8)), sh.b.shard_shape((8, 256))
      (('fsdp', None), (None, 'tensor'), (32, 8), (8, 64))
    """
    rows, treedef = leaves_with_paths(delta, is_leaf=lambda x: x is None or is_delta_leaf(x))
    entries, _ = entries_by_path(base_shardings)
    table = dict(entries)
    single = entries[0][1] if len(entries) == 1 and entries[0][0] == "" else None
    out: list[Any] = []
    for path, f in rows:
        if f is None:
            out.append(None)
            continue
        if not is_delta_leaf(f):
            raise LoraShardingError(
                f"leaf {path!r}: the delta holds {type(f).__name__}, expected LoraFactors, "
                "LeafDelta or None"
            )
        entry = single if single is not None else table.get(path)
        if entry is None:
            sample = ", ".join(repr(p) for p, _ in entries[:6])
            raise LoraShardingError(
                f"leaf {path!r} has LoRA factors but base_shardings has no entry for it "
                f"(entries: {sample}{', ...' if len(entries) > 6 else ''})"
            )
        out.append(_entry_shardings(path, f, read_entry(path, entry, mesh, rules)[0]))
    return jax.tree_util.tree_unflatten(treedef, out)


def _entry_shardings(path: str, f: Any, sharding: NamedSharding) -> Any:
    """The shardings of one delta entry from its base leaf's ``sharding``."""
    if isinstance(f, LeafDelta):  # trained in full: the diff is sharded like its leaf
        check_shape(path, sharding, f.diff.shape, "the leaf")
        return LeafDelta(sharding)
    if isinstance(f, LoraBias):  # lora_B's bias: sharded like the bias leaf it updates
        check_shape(path, sharding, f.b.shape, "the bias")
        return LoraBias(sharding, scale=f.scale)
    if isinstance(f, TokenRows):  # k rows of a table: the row axis whole, dim like the table's
        spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
        return TokenRows(NamedSharding(sharding.mesh, P(None, spec[1])), indices=f.indices)
    check_shape(path, sharding, f.kernel_shape)
    a_spec, b_spec, m_spec = factor_specs(sharding.spec, f.layout)
    m = sharding.mesh
    new = f.replace(
        a=NamedSharding(m, a_spec),
        b=NamedSharding(m, b_spec),
        magnitude=None if f.magnitude is None else NamedSharding(m, m_spec),
    )
    for name in ("a", "b", "magnitude"):  # e.g. a stacked axis holding only some layers
        if getattr(f, name) is not None:
            check_shape(path, getattr(new, name), getattr(f, name).shape, f"its factor {name!r}")
    return new


def _abstract(params: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, params
    )


def sharded_init_fn(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    base_shardings: Any = None,
    *,
    mesh: Any = None,
    rules: Rules | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[Any, tuple]:
    """The jitted program behind :func:`init_lora_sharded`, and its arguments.

    Returns ``(init, args)``: ``init`` is ``jax.jit`` of ``init_lora`` with
    ``out_shardings`` from :func:`delta_shardings` (and the base's shardings
    when the init rewrites the base); ``init(*args)`` returns ``(None, delta)``,
    or ``(base, delta)`` for inits that rewrite the base (PiSSA, OLoRA). When the
    init reads only shapes (the random inits) ``args`` is ``(key,)`` and the
    params never enter the program; when it reads values (PiSSA, OLoRA, DoRA)
    ``args`` is ``(key, params)``. ``init.lower(*args).compile().as_text()``
    shows the compiled program.
    """
    bare = unboxed(params)
    abstract = _abstract(bare)
    if base_shardings is None:
        base_shardings = params

    def full(k, p):
        return init_lora(k, p, config, layouts=layouts)

    # Which params does the init read, and does it return the base untouched? Read off
    # the jaxpr: params it never uses, and base outputs that are its own inputs.
    closed = jax.make_jaxpr(full)(key, abstract)
    n_key = len(jax.tree_util.tree_leaves(key))
    param_vars = closed.jaxpr.invars[n_key:]
    n_base = len(param_vars)
    base_out, delta_out = closed.jaxpr.outvars[:n_base], closed.jaxpr.outvars[n_base:]
    rewrites_base = any(o is not v for o, v in zip(base_out, param_vars))
    referenced = {id(v) for e in closed.jaxpr.eqns for v in e.invars}
    referenced |= {id(v) for v in delta_out}
    reads_params = rewrites_base or any(id(v) in referenced for v in param_vars)

    base_abstract, delta_abstract = jax.eval_shape(full, key, abstract)
    shardings = delta_shardings(base_shardings, delta_abstract, mesh, rules=rules)
    if rewrites_base:
        try:
            out_shardings = (param_shardings(base_shardings, mesh, rules=rules), shardings)
            if not _same_structure(out_shardings[0], base_abstract):
                raise ValueError
        except (ValueError, LoraShardingError):
            raise LoraShardingError(
                f"init {config.init!r} rewrites the base, so base_shardings must give a sharding "
                "for every leaf of the params (e.g. lora_jax.param_shardings(...))"
            ) from None
        fn = full
    else:
        out_shardings = (None, shardings)
        fn = lambda k, p: (None, full(k, p)[1])  # noqa: E731
    if not reads_params:
        return jax.jit(lambda k: fn(k, abstract), out_shardings=out_shardings), (key,)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(bare)):
        raise LoraShardingError(
            f"this config (init={config.init!r}, use_dora={getattr(config, 'use_dora', False)}) "
            "reads the kernels' values: pass the params themselves, not ShapeDtypeStructs"
        )
    return jax.jit(fn, out_shardings=out_shardings), (key, bare)


def init_lora_sharded(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    base_shardings: Any = None,
    *,
    mesh: Any = None,
    rules: Rules | None = None,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> tuple[Any, Any]:
    """:func:`lora_jax.init_lora` with the delta created directly in its shardings.

    Everything runs in one ``jax.jit`` whose ``out_shardings`` are
    :func:`delta_shardings`, so each device computes only its own shards (with
    JAX's default partitionable threefry); the values equal ``init_lora``'s for
    the same key. The random inits read only shapes, so the params need not
    exist yet (``jax.ShapeDtypeStruct`` works); PiSSA, OLoRA and DoRA read the
    kernels where they lie (PiSSA's and OLoRA's factorisations are not
    partitionable, so XLA gathers each kernel for them).

    Args:
      key: a PRNG key.
      params: the base params (placed, or abstract for the random inits), or Flax
        boxed variables.
      config: the :class:`LoraConfig`.
      base_shardings: the base's shardings in any form :func:`delta_shardings`
        takes; ``None`` reads them off ``params`` (placed arrays' ``.sharding``,
        or Flax partitioning boxes).
      mesh: the mesh, for specs and boxes that carry none.
      rules: logical-axis rules, as in :func:`param_shardings`.
      layouts: traced layouts ``{path: KernelLayout}``, as for ``init_lora``.

    Returns:
      ``(base, delta)``: ``base`` holds ``params`` as given, in new containers
      (see :func:`~lora_jax.init_lora`; PiSSA and OLoRA: the residual, sharded
      like the params); ``delta`` has
      ``A: (*stack, *fan_in, r)`` and ``B: (*stack, r, *fan_out)`` sharded as
      :func:`delta_shardings` says.

    Raises:
      LoraShardingError: the shardings do not fit (see :func:`delta_shardings`).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> import numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
      >>> params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp", "tensor")))}
      >>> cfg = lj.LoraConfig(targets="w", rank=2)
      >>> base, delta = lj.init_lora_sharded(jax.random.key(0), params, cfg)  # specs from params
      >>> tuple(delta["w"].a.sharding.spec), tuple(delta["w"].b.sharding.spec)
      (('fsdp', None), (None, 'tensor'))
    """
    try:
        init, args = sharded_init_fn(
            key, params, config, base_shardings, mesh=mesh, rules=rules, layouts=layouts
        )
    except _CONCRETE_VALUE_ERRORS:
        # An init that inspects values on the host (PiSSA's and OLoRA's rank checks) cannot
        # be traced: run it op by op on the placed params (each op SPMD over their
        # shardings), then put the delta (and a rewritten base) into their shardings.
        return _init_eagerly(key, params, config, base_shardings, mesh, rules, layouts)
    base, delta = init(*args)
    return (unshared(params) if base is None else base), delta


_CONCRETE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _init_eagerly(key, params, config, base_shardings, mesh, rules, layouts):
    bare = unboxed(params)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(bare)):
        raise LoraShardingError(
            f"init={config.init!r} reads the kernels' values: pass the params themselves, "
            "not ShapeDtypeStructs"
        )
    base_shardings = params if base_shardings is None else base_shardings
    base, delta = init_lora(key, bare, config, layouts=layouts)
    delta = jax.device_put(delta, delta_shardings(base_shardings, delta, mesh, rules=rules))
    if config.init not in ("pissa", "olora"):  # the base is the params, not rewritten
        return unshared(params), delta
    try:
        base = jax.device_put(base, param_shardings(base_shardings, mesh, rules=rules))
    except ValueError as e:  # LoraShardingError, or a structure mismatch
        raise LoraShardingError(
            f"init {config.init!r} rewrites the base, so base_shardings must give a sharding "
            f"for every leaf of the params (e.g. lora_jax.param_shardings(...)): {e}"
        ) from None
    return base, delta


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
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.AbstractMesh((2,), ("fsdp",))
      >>> delta = jax.eval_shape(lambda k: lj.init_lora(k, {"w": jnp.ones((8, 4))},
      ...                        lj.LoraConfig(targets="w", rank=2))[1], jax.random.key(0))
      >>> dsh = lj.delta_shardings({"w": P("fsdp")}, delta, mesh)
      >>> state = jax.eval_shape(optax.adam(1e-3).init, delta)
      >>> sh = lj.opt_state_shardings(state, dsh)
      >>> sh[0].mu["w"].a.spec == P("fsdp", None), sh[0].count.spec == P()
      (True, True)
    """
    named = [s for s in jax.tree_util.tree_leaves(delta_shardings) if isinstance(s, NamedSharding)]
    if not named:
        raise LoraShardingError("delta_shardings holds no NamedSharding (an empty delta?)")
    replicated = NamedSharding(named[0].mesh, P())

    def like_delta(x: Any) -> bool:
        try:
            return _same_structure(x, delta_shardings)
        except Exception:  # noqa: BLE001 -- exotic nodes simply do not match
            return False

    return jax.tree_util.tree_map(
        lambda x: delta_shardings if like_delta(x) else replicated, opt_state, is_leaf=like_delta
    )
