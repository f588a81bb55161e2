"""Training many tenants' adapters at once: one batch, one step, one stack.

A batch whose rows belong to different slots of one adapter stack (``implicit(...,
adapter_ids=ids)``) trains every slot at once. Three pieces make each slot's
training the same as training it alone:

* **Each tenant's loss is its own mean.** :func:`tenant_loss` weights row ``e``
  of tenant ``n`` by ``1 / count(n)`` (counted inside ``jit`` with a segment
  sum), so the loss is ``sum_n mean_{e in n} loss_e``: a tenant with one row and
  one with fifteen each get the gradient they would get alone, and since slot
  ``n``'s factors only meet tenant ``n``'s rows, the gradient of the sum with
  respect to slot ``n`` is the gradient of tenant ``n``'s mean.
* **Per-slot optimizer settings.** :func:`tenant_optimizer` runs any optax
  direction (``optax.scale_by_adam()`` by default) independently in every slot
  (``vmap`` over the slot axis: each slot has its own moments and its own step
  count), then applies each slot's learning rate and weight decay,
  ``u_n = -lr_n (d_n + wd_n p_n)`` (AdamW for Adam), and zeroes the rank
  columns ``>= rank_n`` so a padded slot's unused columns stay exactly zero.
  The settings are a :class:`TenantSettings` of arrays: changing them never
  recompiles.
* **Empty slots are untouched.** A slot with no rows in the batch gets no update
  and no optimizer-state change (its moments and its count stay as they were).

Isolation is exact, under two preconditions: a model whose rows do not meet
(no batch statistics, no routing with a batch-wide capacity), and the same
compiled step (the same batch shape and stack shape) with the tenant's rows at
the same positions. Each row's forward and backward then depends only on that row; the only reductions
across rows are the per-slot sums of the gathered factors' gradients, which add
slot ``n``'s rows in row order whatever sits between them. So a tenant's adapter
after ``N`` mixed steps equals, bit for bit, training it alone in that batch with
the other rows given id ``-1`` (tested). A batch of another *shape* is another
program: XLA may block its matrix products differently, which changes float
rounding (float32 agreement to about ``1e-6`` relative, also tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax._errors import LoraArgumentError, LoraStructureError
from lora_jax._paths import leaves_with_paths
from lora_jax._serving.stack import is_stacked, stack_slots

Array = jax.Array


def rows_per_slot(adapter_ids: Any, slots: int) -> Array:
    """How many rows of the batch each slot has: ``(N,)`` int32 (id ``-1`` rows count nowhere).

    Works under ``jit`` (a segment sum; ids outside ``[-1, N)`` are dropped).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.advanced.rows_per_slot(jnp.array([2, 0, 2, -1, 2]), 4).tolist()
      [1, 0, 3, 0]
    """
    ids = _ids(adapter_ids)
    ok = (ids >= 0) & (ids < slots)
    return jax.ops.segment_sum(
        ok.astype(jnp.int32), jnp.where(ok, ids, slots), num_segments=slots + 1
    )[:slots]


def tenant_weights(adapter_ids: Any, slots: int) -> Array:
    """Each row's weight ``1 / count(its tenant)``: ``(batch,)`` float32, 0 for id ``-1``.

    ``sum(weights * row_losses)`` is the sum over tenants of each tenant's mean loss.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> lj.advanced.tenant_weights(jnp.array([1, 0, 1, -1]), 2).tolist()
      [0.5, 1.0, 0.5, 0.0]
    """
    ids = _ids(adapter_ids)
    counts = rows_per_slot(ids, slots)
    ok = (ids >= 0) & (ids < slots)
    count = counts[jnp.clip(ids, 0, max(slots - 1, 0))]
    return jnp.where(ok, 1.0 / jnp.maximum(count, 1).astype(jnp.float32), 0.0)


def tenant_loss(row_losses: Any, adapter_ids: Any, slots: int) -> tuple[Array, Array]:
    """``(total, per_tenant)``: the sum of the tenants' mean losses, and each mean.

    Args:
      row_losses: ``(batch,)`` one loss per row (e.g. the mean token loss of a sequence).
      adapter_ids: ``(batch,)`` int: each row's slot, ``-1`` for rows no tenant owns
        (they add nothing, not even a NaN).
      slots: the stack's slot count ``N``.

    Returns:
      ``total``: a scalar, ``sum_n mean_{e: id_e = n} row_losses[e]``: differentiate
      it; slot ``n``'s gradient is exactly the gradient of tenant ``n``'s own mean.
      ``per_tenant``: ``(N,)``, each tenant's mean (0 for a slot with no rows).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> total, each = lj.tenant_loss(jnp.array([1.0, 4.0, 3.0, 9.0]), jnp.array([0, 1, 0, -1]), 3)
      >>> float(total), each.tolist()
      (6.0, [2.0, 4.0, 0.0])
    """
    losses = jnp.asarray(row_losses)
    ids = _ids(adapter_ids)
    if losses.shape != ids.shape:
        raise LoraArgumentError(
            f"row_losses has shape {losses.shape}, adapter_ids {ids.shape}: one loss per row"
        )
    w = tenant_weights(ids, slots)
    weighted = jnp.where(w > 0, w * losses, 0.0)
    ok = (ids >= 0) & (ids < slots)
    per = jax.ops.segment_sum(weighted, jnp.where(ok, ids, slots), num_segments=slots + 1)
    return jnp.sum(weighted), per[:slots]


@dataclasses.dataclass(frozen=True)
class TenantSettings:
    """Each slot's optimizer settings, as arrays (changing them never recompiles).

    Attributes:
      learning_rate: ``(N,)`` float32.
      weight_decay: ``(N,)`` float32 (decoupled, AdamW-style: ``lr * wd * p``).
      rank: ``(N,)`` int32: the rank the slot actually uses; factor columns
        ``>= rank`` get no update (a padded slot's unused columns stay zero).

    Example:
      >>> import lora_jax as lj
      >>> s = lj.tenant_settings(3, learning_rate=[1e-3, 1e-2, 0.0], rank=4)
      >>> s.learning_rate.shape, s.rank.tolist()
      ((3,), [4, 4, 4])
    """

    learning_rate: Any
    weight_decay: Any
    rank: Any

    def replace(self, **changes: Any) -> TenantSettings:
        """A copy with ``changes`` (broadcast to ``(N,)`` and cast to the field's dtype)."""
        n = np.shape(self.learning_rate)[0]
        return dataclasses.replace(self, **_settings_arrays(n, **changes))


jax.tree_util.register_dataclass(
    TenantSettings, data_fields=["learning_rate", "weight_decay", "rank"], meta_fields=[]
)


def tenant_settings(
    slots: int, learning_rate: Any = 1e-3, weight_decay: Any = 0.0, rank: Any = 2**30
) -> TenantSettings:
    """:class:`TenantSettings` for ``slots`` slots; each value a scalar or ``(N,)``.

    ``rank`` defaults to "every column" (a value above any stack's rank).

    Example:
      >>> import lora_jax as lj
      >>> lj.tenant_settings(2, learning_rate=[1e-3, 3e-3]).learning_rate.tolist()
      [0.0010000000474974513, 0.003000000026077032]
    """
    return TenantSettings(
        **_settings_arrays(slots, learning_rate=learning_rate, weight_decay=weight_decay, rank=rank)
    )


def _settings_arrays(n: int, **values: Any) -> dict[str, Array]:
    out = {}
    for name, v in values.items():
        dtype = jnp.int32 if name == "rank" else jnp.float32
        arr = jnp.asarray(v, dtype)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
            raise LoraArgumentError(
                f"{name} must be a scalar or have shape ({n},), got {arr.shape}"
            )
        out[name] = jnp.broadcast_to(arr, (n,))
    return out


class TenantOptState(NamedTuple):
    """The state of :func:`tenant_optimizer`: the inner direction's state with a leading
    slot axis on every leaf (each slot's own moments and step count)."""

    inner: Any


def tenant_optimizer(
    direction: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation training every slot of an adapter stack as its own adapter.

    ``init(stack)`` and ``update(grads, state, stack, *, settings, adapter_ids)``:

    * ``stack``, ``grads``: trees of :class:`~lora_jax.StackedFactors` (``grads`` from
      ``jax.grad`` with respect to the stack); only ``a`` and ``b`` are trained (the
      returned updates of ``scale`` are 0);
    * ``settings``: a :class:`TenantSettings` (each slot's learning rate, weight decay
      and used rank);
    * ``adapter_ids``: ``(batch,)`` the batch's ids; a slot with no rows gets a zero
      update and keeps its state exactly. (Or ``rows=``: ``(N,)`` each slot's row
      count, :func:`rows_per_slot`, when the ids are not at hand.)

    ``direction`` runs under ``vmap`` over the slot axis, so its state (Adam's
    moments and *count*) is per slot and a per-slot transformation such as
    ``optax.clip_by_global_norm`` clips each tenant by its own norm. Slot ``n``'s
    update is ``-lr_n (d_n + wd_n p_n)`` with ``d_n`` the direction's output,
    with factor columns ``>= rank_n`` set to zero.

    Args:
      direction: an optax transformation without a learning rate (default
        ``optax.scale_by_adam()``: per-slot AdamW).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=2.0,
      ...                    layout=lj.KernelLayout("io"))
      >>> stack = lj.stack_adapters([{"w": f}] * 3)
      >>> opt = lj.tenant_optimizer()
      >>> state = opt.init(stack)
      >>> grads = jax.tree.map(jnp.ones_like, stack)  # from jax.grad of lj.tenant_loss
      >>> ids = jnp.array([0, 0, 2])  # slot 1 has no rows: untouched
      >>> updates, state = opt.update(grads, state, stack, settings=lj.tenant_settings(3),
      ...                             adapter_ids=ids)
      >>> stack = optax.apply_updates(stack, updates)
      >>> state.inner.count.tolist(), [round(u, 6) for u in updates["w"].a[:, 0, 0].tolist()]
      ([1, 0, 1], [-0.001, 0.0, -0.001])
    """
    inner = optax.scale_by_adam() if direction is None else direction

    def init(stack: Any) -> TenantOptState:
        return TenantOptState(jax.vmap(inner.init)(_factor_arrays(stack, "the stack")))

    def update(
        grads: Any,
        state: TenantOptState,
        params: Any = None,
        *,
        settings: TenantSettings,
        adapter_ids: Any = None,
        rows: Any = None,
        **extra: Any,
    ) -> tuple[Any, TenantOptState]:
        del extra
        if params is None:
            raise LoraArgumentError(
                "tenant_optimizer.update needs params (the stack): weight decay and the "
                "factor structure come from it"
            )
        g = _factor_arrays(grads, "the gradients")
        p = _factor_arrays(params, "the stack")
        n = stack_slots(params)
        if (adapter_ids is None) == (rows is None):
            raise LoraArgumentError(
                "tenant_optimizer.update needs adapter_ids=(batch,) (or rows=(N,) row counts) "
                "to know which slots the batch trains"
            )
        if rows is None:
            rows = rows_per_slot(adapter_ids, n)
        active = jnp.asarray(rows).reshape(-1) > 0
        if active.shape != (n,):
            raise LoraArgumentError(f"rows must have shape ({n},), got {jnp.shape(rows)}")
        direction_n, new_inner = jax.vmap(inner.update)(g, state.inner, p)
        lr = jnp.asarray(settings.learning_rate, jnp.float32)
        wd = jnp.asarray(settings.weight_decay, jnp.float32)

        def one(d: Array, x: Array, keep: Array) -> Array:
            ex = (slice(None),) + (None,) * (d.ndim - 1)
            u = -lr[ex] * (d + wd[ex] * x.astype(d.dtype))
            u = jnp.where(active[ex] & keep, u, jnp.zeros_like(u))
            return u.astype(x.dtype)

        keeps = _rank_keeps(params, jnp.asarray(settings.rank, jnp.int32))
        factor_updates = jax.tree.map(one, direction_n, p, keeps)
        kept = jax.tree.map(
            lambda new, old: jnp.where(active.reshape((n,) + (1,) * (new.ndim - 1)), new, old),
            new_inner,
            state.inner,
        )
        return _with_factor_updates(params, factor_updates), TenantOptState(kept)

    return optax.GradientTransformationExtraArgs(init, update)


def _stacks(tree: Any, what: str) -> tuple[list[tuple[str, Any]], Any]:
    leaf = lambda x: x is None or is_stacked(x)  # noqa: E731
    entries, treedef = leaves_with_paths(tree, is_leaf=leaf)
    for path, e in entries:
        if e is not None and not is_stacked(e):
            raise LoraStructureError(
                f"leaf {path!r} of {what}: expected StackedFactors or None, got "
                f"{type(e).__name__} (pass an adapter stack from lora_jax.stack_adapters)"
            )
    return entries, treedef


def _factor_arrays(tree: Any, what: str) -> list[tuple[Array, Array]]:
    """``[(a, b), ...]`` of every stacked kernel, in tree order."""
    entries, _ = _stacks(tree, what)
    return [(s.a, s.b) for _, s in entries if s is not None]


def _rank_keeps(stack: Any, rank: Array) -> list[tuple[Array, Array]]:
    """Per kernel, boolean masks broadcastable to ``a`` and ``b``: rank column ``< rank[n]``."""
    out = []
    for _, s in _stacks(stack, "the stack")[0]:
        if s is None:
            continue
        r = s.rank
        cols = jnp.arange(r) < rank[:, None]  # (N, R)
        ns = len(s.layout.stack_axes)
        a_shape = (s.slots,) + (1,) * (np.ndim(s.a) - 2) + (r,)
        b_shape = (s.slots,) + (1,) * ns + (r,) + (1,) * (np.ndim(s.b) - 2 - ns)
        out.append((cols.reshape(a_shape), cols.reshape(b_shape)))
    return out


def _with_factor_updates(stack: Any, updates: list[tuple[Array, Array]]) -> Any:
    """The stack's tree with each kernel's ``(a, b)`` replaced by ``updates`` (scale 0)."""
    entries, treedef = _stacks(stack, "the stack")
    it = iter(updates)
    out: list[Any] = []
    for _, s in entries:
        if s is None:
            out.append(None)
            continue
        ua, ub = next(it)
        out.append(s.replace(a=ua, b=ub, scale=jnp.zeros_like(s.scale)))
    return jax.tree_util.tree_unflatten(treedef, out)


def copy_slot(dst: Any, src: Any, slot: Any) -> Any:
    """``dst`` with slot ``slot`` of every kernel (``a``, ``b``, ``scale``) copied from ``src``.

    The trainer-to-sampler sync of an RL loop: only that slot's arrays move
    (:func:`slot_nbytes`), exactly (no rescaling), and ``slot`` may be an array,
    so a jitted sync compiles once for every slot.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> f = lambda v: lj.LoraFactors(jnp.full((4, 2), v), jnp.ones((2, 3)), alpha=2.0,
      ...                              layout=lj.KernelLayout("io"))
      >>> dst = lj.stack_adapters([{"w": f(0.0)}, {"w": f(0.0)}])
      >>> src = lj.stack_adapters([{"w": f(1.0)}, {"w": f(2.0)}])
      >>> lj.advanced.copy_slot(dst, src, 1)["w"].a[:, 0, 0].tolist()
      [0.0, 2.0]
    """
    d_entries, treedef = _stacks(dst, "the destination stack")
    s_entries, s_treedef = _stacks(src, "the source stack")
    if treedef != s_treedef:
        raise LoraStructureError("the two stacks have different tree structures")
    out: list[Any] = []
    for (path, d), (_, s) in zip(d_entries, s_entries):
        if d is None or s is None:
            if (d is None) != (s is None):
                raise LoraStructureError(f"leaf {path!r} is stacked in one stack only")
            out.append(None)
            continue
        if np.shape(d.a) != np.shape(s.a) or np.shape(d.b) != np.shape(s.b):
            raise LoraStructureError(
                f"leaf {path!r}: slot shapes differ ({np.shape(d.a)[1:]} vs {np.shape(s.a)[1:]})"
            )
        out.append(
            d.replace(
                a=d.a.at[slot].set(s.a[slot]),
                b=d.b.at[slot].set(s.b[slot]),
                scale=d.scale.at[slot].set(s.scale[slot]),
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def slot_nbytes(stack: Any) -> int:
    """Bytes of one slot of a stack (every kernel's ``a``, ``b`` and scale): what
    :func:`copy_slot` moves.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> f = lj.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=2.0,
      ...                    layout=lj.KernelLayout("io"))
      >>> lj.advanced.slot_nbytes(lj.stack_adapters([{"w": f}] * 3))  # (4*2 + 2*3 + 1) float32
      60
    """
    total = 0
    for _, s in _stacks(stack, "the stack")[0]:
        if s is not None:
            for x in (s.a, s.b, s.scale):
                total += int(np.prod(np.shape(x)[1:])) * jnp.dtype(jnp.result_type(x)).itemsize
    return total


def _ids(adapter_ids: Any) -> Array:
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise LoraArgumentError(
            f"adapter_ids must be a 1-D integer array (one id per row), got shape "
            f"{tuple(ids.shape)} dtype {ids.dtype}"
        )
    return ids
