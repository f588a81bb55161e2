"""Implicit LoRA: run any JAX function of the params without merging.

``implicit(fn)(base, delta, *args)`` computes ``fn(merge(base, delta), *args)``
without ever forming ``W + s * A @ B``: it traces ``fn`` to a jaxpr, then
evaluates the jaxpr with every targeted kernel carried as a
:class:`~lora_jax._implicit.view.LoraView`. Where a view meets its input
(``dot_general``, ``conv_general_dilated``, ``gather``) a rule from
:mod:`lora_jax._implicit.rules` computes ``op(x, stop_gradient(W)) + s * (x @ A) @ B``;
transposes, dtype casts, copies, sharding constraints, reshapes within one role (``(d, heads, head_dim)``
<-> ``(d, heads * head_dim)``) and slices of stacked axes (``w[i]`` of a
``(layers, in, out)`` stack) of a kernel are tracked on the view. Higher-order
primitives are re-expressed through their public functions, so views flow
into their bodies:

==========================  ================================================
primitive                   handled as
==========================  ================================================
``jit`` and other calls     inlined into the enclosing trace
``remat2`` (checkpoint)     ``jax.checkpoint`` with the same policy; an
                            input returned as it is stays a view
``scan``                    ``lax.scan``; stacked kernels are scanned inputs
                            and their factors are sliced per layer
``cond``                    ``lax.switch``
``while``                   ``lax.while_loop`` (views as loop constants;
                            a carried kernel is materialised)
==========================  ================================================

Any other use of a targeted kernel (a custom_jvp/custom_vjp function that
takes the kernel, a slice that cuts a fan-in or fan-out axis, a reshape that
mixes fan-in and fan-out axes, ...) materialises ``W + s * A @ B`` at that
point -- always correct -- and warns once per primitive with
:class:`LoraFallbackWarning`; ``strict=True`` raises
:class:`LoraImplicitError` instead. The frozen kernel is always under
``stop_gradient``: it never receives a gradient.

A quantized base kernel (:class:`~lora_jax.QuantizedArray`) is traced as its
dense shape and carried as a :class:`~lora_jax._quant.lazy_kernel.LazyKernel` inside its
view (rank 0 when it has no factors): transposes, reshapes, stacked slices
and scans act on its codes, and it is dequantized where it meets its input
(:func:`lora_jax._quant.lazy_kernel.use`: the backward dequantizes again from the codes,
so autodiff saves codes, not a dense kernel).

The rules are the dict :data:`RULES` (primitive name to rule); which
primitive is which comes from :mod:`lora_jax._implicit.primitives`, the table
:func:`~lora_jax.infer_layouts` and :mod:`lora_jax._implicit.rebuild` read too. One
evaluation's settings and state travel in an immutable :class:`Context`
passed to every rule: the frame of the jaxpr being evaluated and the dropout
key of the current scope (each layer of a scan gets its own) are fields of
it, replaced in a copy for a body, never reassigned; only its :class:`Log`
(fallbacks warned about, dropout sites drawn) is shared and counts up.

Only public JAX API is used: ``jax.make_jaxpr``, ``jax.extend.core`` types,
``Primitive.bind`` and ``Primitive.get_bind_params`` (whose return shape
changed in JAX 0.7; both are handled).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from lora_jax._delta import LeafDelta, ValueDelta
from lora_jax._errors import LoraArgumentError, LoraFallbackWarning, LoraImplicitError
from lora_jax._implicit import primitives as P
from lora_jax._implicit import rules
from lora_jax._implicit.rebuild import Graph, input_chain
from lora_jax._implicit.tracing import trace
from lora_jax._implicit.view import LoraView
from lora_jax._merge import align
from lora_jax._quant.array import is_quantized
from lora_jax._quant.lazy_kernel import LazyKernel
from lora_jax._serving import example_rules
from lora_jax._serving.example_view import ExampleView, batch_ids
from lora_jax._serving.stack import is_stacked


def implicit(
    fn: Callable[..., Any],
    *,
    strict: bool = False,
    dropout: float = 0.0,
    rebuild_inputs: bool = True,
) -> Callable[..., Any]:
    """Wraps ``fn(params, *args, **kwargs)`` to take ``(base, delta, *args, **kwargs)``.

    The wrapped function returns ``fn(merge(base, delta), *args, **kwargs)``
    (to float tolerance) computed implicitly: ``x @ W + s * (x @ A) @ B`` at
    every use of a targeted kernel, with ``W`` under ``stop_gradient``.
    Array arguments are traced; every other argument (bools, strings,
    ``rngs`` dicts of keys are arrays, ``method=`` callables are not) is
    passed through as a Python constant.

    Args:
      fn: any function whose first argument is the params pytree, e.g. a Flax
        linen ``model.apply``, or ``lambda state, x: nnx.merge(g, state)(x)``.
      strict: raise :class:`LoraImplicitError` instead of materialising a
        kernel whose use has no low-rank rule.
      dropout: LoRA dropout rate ``p``: the low-rank branch sees
        ``dropout(x)``, i.e. ``x @ W + s * (mask * x / (1 - p)) @ A @ B``
        (dense and conv kernels; embeddings take no dropout, as in PEFT). It is
        active only when the wrapped function gets ``lora_dropout_key=key``:
        no key means evaluation (no dropout). Each use of a kernel draws its
        own mask from the key, and so does each layer of a scan; iterations of
        a ``while_loop`` share one.
      rebuild_inputs: where a low-rank input ``x`` is a cheap elementwise
        function of a value the backward keeps anyway (a GELU of its
        pre-activation, a LayerNorm of its centred input; see
        :mod:`lora_jax._implicit.rebuild`), save that value instead of ``x`` and
        rebuild ``x`` for ``dA = x^T du`` in the backward: the memory of the
        frozen model's own backward, for a little elementwise work. False
        saves every ``x``.

    Returns:
      ``wrapped(base, delta, *args, lora_dropout_key=None, adapter_ids=None,
      **kwargs)``; jit-, grad- and vmap-able.

    Mixed adapters in one batch: ``delta`` may hold
    :class:`~lora_jax.StackedFactors` (from :func:`~lora_jax.stack_adapters`)
    with ``N`` slots; ``adapter_ids`` ``(batch,)`` int then picks each
    example's slot (``-1``: the base alone), and every use of a stacked kernel
    computes ``x_e @ W + s_{id_e} (x_e @ A_{id_e}) @ B_{id_e}`` for each
    example ``e``, in one program: each example's factors are gathered once
    (``(batch, ..., R)``, see :func:`~lora_jax._serving.example_view.gather_slots` for their
    sharding) and the branch is a batched matmul. The example axis of an
    input ``x`` is its leading free axis (the first axis that is neither
    contracted with the kernel nor a stacked-layer batch axis; a conv's batch
    axis; the first batch axis of an embedding lookup's indices): its size
    must be ``len(adapter_ids)``, else :class:`LoraArgumentError` names the
    kernel. A stacked kernel cannot be materialised (there is no single
    dense kernel), so a use without a rule raises :class:`LoraImplicitError`.
    Concrete ids outside ``[-1, N)`` raise; under ``jit`` they make their row NaN.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> apply = lj.implicit(lambda p, x: x @ p["w"])          # x: (2, 4), w: (4, 3)
      >>> base, delta = lj.init_lora(jax.random.key(0), {"w": jnp.ones((4, 3))},
      ...                            lj.LoraConfig(targets="w", rank=2))
      >>> apply(base, delta, jnp.ones((2, 4))).shape
      (2, 3)
    """

    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoraArgumentError(f"dropout must be a rate in [0, 1), got {dropout!r}")

    @functools.wraps(fn)
    def wrapped(
        base: Any,
        delta: Any,
        *args: Any,
        lora_dropout_key: Any = None,
        adapter_ids: Any = None,
        **kwargs: Any,
    ) -> Any:
        rows, treedef = align(base, delta, stacked_ok=True)
        closed, out_shape, dynamic = trace(
            fn, treedef, [_traced(leaf) for _, leaf, _ in rows], args, kwargs
        )
        invals = _inputs(rows, adapter_ids)
        ctx = Context(
            strict,
            dropout if lora_dropout_key is not None else 0.0,
            lora_dropout_key,
            rebuild_inputs,
        )
        outs = evaluate(ctx, closed.jaxpr, closed.consts, invals + list(dynamic))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _inputs(rows: list, adapter_ids: Any) -> list[Any]:
    """What the interpreter carries for each params leaf; with adapter stacks, each stacked
    kernel as an :class:`ExampleView` (every example's factors gathered here, once)."""
    stacks = {path: f for path, _, f in rows if is_stacked(f)}
    if not stacks and adapter_ids is None:
        return [_input(path, leaf, f) for path, leaf, f in rows]
    index, valid = batch_ids(adapter_ids, stacks)
    return [
        ExampleView.of(path, _kernel(leaf), f, index, valid, adapter_ids)
        if is_stacked(f)
        else _input(path, leaf, f)
        for path, leaf, f in rows
    ]


def _kernel(leaf: Any) -> Any:
    """A stacked kernel's frozen base: a quantized one carried as its codes."""
    return LazyKernel(leaf) if is_quantized(leaf) else leaf


def _traced(leaf: Any) -> Any:
    """What ``fn`` is traced with for one params leaf: a quantized kernel as its dense shape."""
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_quantized(leaf) else leaf


def _input(path: str, leaf: Any, f: Any) -> Any:
    """What the interpreter carries for one params leaf."""
    if is_quantized(leaf):
        return LoraView.of_quantized(path, leaf, f)
    if f is None:
        return leaf
    if isinstance(f, LeafDelta):  # trained in full: a plain (small) value
        return (leaf.astype(jnp.float32) + f.diff).astype(leaf.dtype)
    if isinstance(f, ValueDelta):  # a LoRA bias, token rows: the updated value (one leaf's size)
        return f.apply(leaf).astype(leaf.dtype)
    return LoraView.of(path, leaf, f)


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Binds ``eqn``'s primitive on ``invals``, as ``jax.core.eval_jaxpr`` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # JAX < 0.7 returns (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def is_view(value: Any) -> bool:
    """True for a kernel the interpreter carries as a view (one adapter's, or per example)."""
    return isinstance(value, (LoraView, ExampleView))


# ---- one evaluation's settings and state ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
    """The jaxpr being evaluated and its environment, for :func:`input_chain`."""

    jaxpr: Any
    env: dict[Any, Any]

    @functools.cached_property
    def graph(self) -> Graph:
        return Graph(self.jaxpr)

    def source(self, var: Any) -> tuple[tuple, Callable[[tuple], Any]] | None:
        """``(leaves, rebuild)`` recomputing ``var`` from values the backward keeps, or None."""
        chain = input_chain(self.graph, var)
        if chain is None:
            return None
        leaves = tuple(self.env[v] for v in chain.leaves)
        if any(is_view(v) for v in leaves):
            return None
        return leaves, functools.partial(chain.rebuild, bind)


@dataclasses.dataclass
class Log:
    """What one evaluation has done so far: fallbacks warned about, dropout sites drawn."""

    warned: set[str] = dataclasses.field(default_factory=set)
    sites: int = 0


@dataclasses.dataclass(frozen=True)
class Context:
    """What every rule is given besides its eqn and operands.

    Attributes:
      strict: raise instead of materialising a kernel.
      rate: the dropout rate of the low-rank branch (0: no dropout).
      key: the dropout key of the current scope (one per scan layer).
      rebuild: rebuild low-rank inputs in the backward (see :mod:`lora_jax._implicit.rebuild`).
      log: shared by the whole evaluation, including scan and cond bodies.
      frame: the jaxpr the eqn being evaluated belongs to.
    """

    strict: bool
    rate: float = 0.0
    key: Any = None
    rebuild: bool = True
    log: Log = dataclasses.field(default_factory=Log)
    frame: Frame | None = None

    def next_key(self) -> Any:
        """A key of its own for each use of a kernel (trace order is deterministic)."""
        self.log.sites += 1
        return jax.random.fold_in(self.key, self.log.sites)

    def dropout(self) -> Callable[[Any], Any] | None:
        """Inverted dropout for the next low-rank branch, or None when inactive."""
        if not self.rate:
            return None
        key, keep = self.next_key(), 1.0 - self.rate

        def apply(x):
            mask = jax.random.bernoulli(key, keep, x.shape)
            return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

        return apply

    def dense(self, value: Any, where: str) -> Any:
        """``value``, or the materialised kernel if it is a view (after a warning)."""
        if not is_view(value):
            return value
        if isinstance(value, ExampleView):
            raise LoraImplicitError(
                f"kernel {value.path!r} has per-example adapters (adapter_ids) and reaches "
                f"{where!r}, which has no low-rank rule: there is no single dense kernel to "
                "materialise for a batch of mixed adapters (serve this model merged per adapter, "
                "or keep this kernel out of the stack)"
            )
        if self.strict:
            raise LoraImplicitError(
                f"kernel {value.path!r} reaches {where!r}, which has no low-rank rule; "
                "strict=True forbids materialising it (use strict=False to fall back to "
                "W + s*A@B there)"
            )
        if where not in self.log.warned:
            self.log.warned.add(where)
            warnings.warn(
                f"lora_jax.implicit: kernel {value.path!r} reaches {where!r}, which has no "
                "low-rank rule; materialising W + s*A@B there (correct, but slower)",
                LoraFallbackWarning,
                stacklevel=4,
            )
        return value.materialize()


# ---- the interpreter -------------------------------------------------------------------------


def evaluate(
    ctx: Context, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], keep_views: bool = False
) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` (views among them); outputs are dense unless ``keep_views``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda x: x * 2)(jnp.ones(3))
      >>> evaluate(Context(strict=True), closed.jaxpr, closed.consts, [jnp.ones(3)])
      [Array([2., 2., 2.], dtype=float32)]
    """
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]  # noqa: E731
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    ctx = dataclasses.replace(ctx, frame=Frame(jaxpr, env))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(is_view(v) for v in invals):
            outs = apply_rule(ctx, eqn, invals)
        else:
            outs = bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    outs = [read(v) for v in jaxpr.outvars]
    return outs if keep_views else [ctx.dense(v, "the function's output") for v in outs]


def _evaluate_closed(ctx: Context, closed: Any, *args: Any) -> list[Any]:
    body, consts = P.as_open(closed)
    return evaluate(ctx, body, consts, args)


#: A rule: ``(ctx, eqn, operands) -> outputs``, or None where the use has no low-rank form.
Rule = Callable[[Context, Any, list], "list[Any] | None"]


def apply_rule(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
    """``eqn`` on operands that include a view: its rule, else the dense kernel (a fallback)."""
    name = eqn.primitive.name
    rule = RULES.get(name)
    out = rule(ctx, eqn, invals) if rule is not None else None
    if out is None:
        out = bind(eqn, [ctx.dense(v, name) for v in invals])
    return out


# ---- rules: layout ops on a kernel -----------------------------------------------------------


def _convert(ctx: Context, eqn: Any, invals: list) -> list | None:
    return [invals[0].replace(dtype=np.dtype(eqn.params["new_dtype"]))]


def _copy(ctx: Context, eqn: Any, invals: list) -> list | None:
    return [invals[0]]


def _transpose(ctx: Context, eqn: Any, invals: list) -> list | None:
    return [invals[0].transpose(tuple(eqn.params["permutation"]))]


def _squeeze(ctx: Context, eqn: Any, invals: list) -> list | None:
    """Splitting or merging axes of one role reshapes that factor (see LoraView.reshape)."""
    out = invals[0].reshape(tuple(eqn.outvars[0].aval.shape))
    return None if out is None else [out]


def _reshape(ctx: Context, eqn: Any, invals: list) -> list | None:
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        return None  # a dynamic shape, or a reshape with a transpose folded in
    return _squeeze(ctx, eqn, invals)


def _cut_static(x: Any, starts: list[int], sizes: list[int]) -> Any:
    return lax.slice(x, starts, [s + n for s, n in zip(starts, sizes)])


def _cut_dynamic(x: Any, starts: list[Any], sizes: list[int]) -> Any:
    return lax.dynamic_slice(x, [jnp.asarray(s, jnp.int32) for s in starts], sizes)


def _slice(ctx: Context, eqn: Any, invals: list) -> list | None:
    """A static slice of stacked axes cuts the factors the same way."""
    p = eqn.params
    if p["strides"] is not None and set(p["strides"]) != {1}:
        return None
    sizes = [hi - lo for lo, hi in zip(p["start_indices"], p["limit_indices"])]
    out = invals[0].slice_stack(list(p["start_indices"]), sizes, _cut_static)
    return None if out is None else [out]


def _dynamic_slice(ctx: Context, eqn: Any, invals: list) -> list | None:
    """``w[i]`` of a stack (e.g. in a ``fori_loop`` over layers) cuts the factors too."""
    if any(is_view(v) for v in invals[1:]):
        return None
    out = invals[0].slice_stack(list(invals[1:]), list(eqn.params["slice_sizes"]), _cut_dynamic)
    return None if out is None else [out]


def _sharding_constraint(ctx: Context, eqn: Any, invals: list) -> list | None:
    """A constraint on a kernel constrains the frozen ``W``; the factors keep theirs."""
    view = invals[0]
    if len(invals) != 1 or not is_view(view):
        return None
    return [view.replace(w=bind(eqn, [view.w])[0])]


# ---- rules: where a kernel meets its input ---------------------------------------------------


def _dot_general(ctx: Context, eqn: Any, invals: list) -> list | None:
    lhs, rhs = invals
    if is_view(rhs):
        x, view, kernel_is_rhs = ctx.dense(lhs, P.DOT_GENERAL), rhs, True
    else:
        x, view, kernel_is_rhs = rhs, lhs, False
    if isinstance(view, ExampleView):
        out = example_rules.dot_general_rule(x, view, kernel_is_rhs, eqn.params, ctx.dropout())
    else:
        operand = eqn.invars[0 if kernel_is_rhs else 1]
        source = ctx.frame.source(operand) if ctx.rebuild and ctx.frame is not None else None
        out = rules.dot_general_rule(x, view, kernel_is_rhs, eqn.params, ctx.dropout(), source)
    return None if out is None else [out]


def _ragged_dot(ctx: Context, eqn: Any, invals: list) -> list | None:
    """``ragged_dot(x, W, group_sizes)``: the kernel on the right (experts)."""
    x, view, group_sizes = invals
    if is_view(x) or is_view(group_sizes) or not isinstance(view, LoraView):
        return None  # a per-example (ExampleView) kernel raises in ctx.dense
    out = rules.ragged_dot_rule(x, view, group_sizes, eqn.primitive, eqn.params, ctx.dropout())
    return None if out is None else [out]


def _conv(ctx: Context, eqn: Any, invals: list) -> list | None:
    x, view = invals
    if is_view(x) or not is_view(view):
        return None
    rule = example_rules.conv_rule if isinstance(view, ExampleView) else rules.conv_rule
    out = rule(x, view, eqn.params, ctx.dropout())
    return None if out is None else [out]


def _gather(ctx: Context, eqn: Any, invals: list) -> list | None:
    """An embedding lookup (a rule), or ``w[idx]`` of whole kernels along a batch axis
    (each token's expert: a layout op, the factors gathered alike)."""
    view, indices = invals
    if not is_view(view) or is_view(indices):
        return None
    rule = example_rules.gather_rule if isinstance(view, ExampleView) else rules.gather_rule
    out: Any = rule(view, indices, eqn.params)
    if out is None and isinstance(view, LoraView):
        out = view.gather_stack(indices, eqn.params, eqn.primitive.bind)
    return None if out is None else [out]


# ---- rules: calls and control flow -----------------------------------------------------------


def _call(ctx: Context, eqn: Any, invals: list) -> list | None:
    """A plain call is inlined; views flow in and out of it."""
    body = P.sub_jaxpr(eqn.params)
    if body is None:
        return None
    return evaluate(ctx, body[0], body[1], invals, keep_views=True)


def _remat(ctx: Context, eqn: Any, invals: list) -> list | None:
    """``jax.checkpoint`` with the same policy; outputs that are the body's own inputs
    (a block returning its module's state) are the caller's operands, views kept."""
    p = eqn.params
    jaxpr, consts = P.body_of(p)
    forwarded = P.forwarded_inputs(jaxpr)

    def body(*xs):
        outs = evaluate(ctx, jaxpr, consts, xs, keep_views=True)
        return [
            ctx.dense(out, "the output of a checkpointed function")
            for out, source in zip(outs, forwarded)
            if source is None
        ]

    computed = iter(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))
    return [next(computed) if source is None else invals[source] for source in forwarded]


def _cond(ctx: Context, eqn: Any, invals: list) -> list | None:
    index, ops = invals[0], invals[1:]
    branches = [functools.partial(_evaluate_closed, ctx, br) for br in eqn.params["branches"]]
    return list(lax.switch(index, branches, *ops))


def _while(ctx: Context, eqn: Any, invals: list) -> list | None:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc : nc + nb]
    carry = [ctx.dense(v, "while carry") for v in invals[nc + nb :]]
    cond = lambda c: _evaluate_closed(ctx, p["cond_jaxpr"], *cond_consts, *c)[0]  # noqa: E731
    body = lambda c: _evaluate_closed(ctx, p["body_jaxpr"], *body_consts, *c)  # noqa: E731
    return list(lax.while_loop(cond, body, carry))


def _scan(ctx: Context, eqn: Any, invals: list) -> list | None:
    """``lax.scan``; a view scanned over its stacked axis is a per-layer view in the body.

    Under dropout each layer gets a key of its own, passed to the body with
    the scanned inputs and given to the body's rules as ``ctx.key``.
    """
    p = eqn.params
    nc, ncarry = P.scan_operands(p)
    consts = invals[:nc]
    carry = [ctx.dense(v, "scan carry") for v in invals[nc : nc + ncarry]]
    xs = [scanned(ctx, v) for v in invals[nc + ncarry :]]
    if ctx.rate:  # one dropout key per layer
        xs.append(jax.random.split(ctx.next_key(), p["length"]))

    def body(c, x):
        inner = ctx
        if ctx.rate:
            *x, key = x
            inner = dataclasses.replace(ctx, key=key)
        outs = _evaluate_closed(inner, p["jaxpr"], *consts, *c, *x)
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(
        body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return list(carry) + list(ys)


def scanned(ctx: Context, value: Any) -> Any:
    """A scanned input; a view scanned over a stacked axis keeps its factors per layer.

    ``lax.scan`` then slices the returned view's leading axes (``w``'s first
    axis, the scanned stacked axis of ``a``, ``b`` and the magnitude, moved first).
    """
    if not is_view(value):
        return value
    axis_role = value.roles[0]
    if axis_role[0] != "s":
        return ctx.dense(value, "scan over a non-stacked kernel axis")
    return value.sliced(axis_role)


#: ``{primitive name: rule}``. A rule takes ``(ctx, eqn, operands)``, some of
#: them views, and returns the eqn's outputs, or None when this use has no
#: low-rank form (the kernel is then materialised: :func:`apply_rule`).
#: Custom-derivative calls have no rule: a kernel passed into one is dense.
RULES: dict[str, Rule] = P.by_name(
    {
        P.CONVERT: _convert,
        P.COPY: _copy,
        P.TRANSPOSE: _transpose,
        P.RESHAPE: _reshape,
        P.SQUEEZE: _squeeze,
        P.SLICE: _slice,
        P.DYNAMIC_SLICE: _dynamic_slice,
        P.SHARDING_CONSTRAINT: _sharding_constraint,
        P.DOT_GENERAL: _dot_general,
        P.RAGGED_DOT: _ragged_dot,
        P.CONV: _conv,
        P.GATHER: _gather,
        P.COND: _cond,
        P.WHILE: _while,
        P.SCAN: _scan,
        P.CALLS: _call,
        P.REMAT: _remat,
    }
)
