"""The one table of primitives that every jaxpr walker of lora_jax reads.

Three walkers read a traced function: :func:`lora_jax.implicit` evaluates it
with kernels carried as low-rank views, :func:`lora_jax.infer_layouts` follows
each kernel to where it is used, and :mod:`lora_jax._implicit.rebuild` walks back from
a low-rank input to values the backward keeps. They must agree on what each
primitive is, so none of them names a primitive itself: each reads the groups
below.

Higher-order primitives (their body is a jaxpr in the eqn's params, read with
:func:`sub_jaxpr`):

* :data:`CALLS` -- plain calls, inlined (``jax.jit`` inside the function);
* :data:`REMAT` -- ``jax.checkpoint``;
* :data:`CUSTOM_JVP`, :data:`CUSTOM_VJP` -- functions with a custom derivative;
* :data:`COND`, :data:`WHILE`, :data:`SCAN` -- control flow.

Parameters whose form differs between JAX versions are read here, and only
here: :func:`scan_operands` (how a scan's operands split into constants,
carries and scanned inputs). :func:`forwarded_inputs` says which outputs of a
body are its own inputs, passed straight through (a checkpointed block that
returns its module's state).

What may happen to a kernel on its way to a use (:data:`KERNEL_LAYOUT`), and
its uses (:data:`KERNEL_USES`); see :mod:`lora_jax._implicit.interpreter` for how each is
run low-rank. For the input rebuild, the elementwise groups (by what their
derivative keeps) are :data:`OUTPUT_KEPT`, :data:`UNARY`, :data:`BINARY`,
:data:`SELECT` and :data:`LINEAR`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> closed = jax.make_jaxpr(jax.jit(lambda w: w.T))(jnp.ones((2, 3)))
  >>> eqn = closed.jaxpr.eqns[0]
  >>> eqn.primitive.name in CALLS, [e.primitive.name for e in sub_jaxpr(eqn.params)[0].eqns]
  (True, ['transpose'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jex

# ---- higher-order primitives ------------------------------------------------------------
#: Plain calls: ``jax.jit`` inside a traced function (``pjit`` before JAX 0.7, then
#: ``jit``), ``core.closed_call`` and ``core.call`` (whose primitive is named ``call``).
CALLS = frozenset({"pjit", "jit", "closed_call", "call"})
#: ``jax.checkpoint`` / ``nn.remat``.
REMAT = frozenset({"remat2", "checkpoint"})
#: A ``jax.custom_jvp`` function.
CUSTOM_JVP = frozenset({"custom_jvp_call"})
#: A ``jax.custom_vjp`` function (``custom_vjp_call_jaxpr`` before JAX 0.7).
CUSTOM_VJP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
CUSTOM_DERIVATIVE = CUSTOM_JVP | CUSTOM_VJP
COND = "cond"
WHILE = "while"
SCAN = "scan"

# ---- what a kernel goes through on its way to a use ----------------------------------------
CONVERT = "convert_element_type"
COPY = "copy"
TRANSPOSE = "transpose"
RESHAPE = "reshape"
SQUEEZE = "squeeze"
SLICE = "slice"
DYNAMIC_SLICE = "dynamic_slice"
SHARDING_CONSTRAINT = "sharding_constraint"
#: Operations that move, cut or recast a kernel without mixing its entries:
#: a low-rank view follows them (``reduce_precision`` is not one: it rounds
#: ``W + s * A @ B``, which no factor of it can do).
KERNEL_LAYOUT = frozenset(
    {CONVERT, COPY, TRANSPOSE, RESHAPE, SQUEEZE, SLICE, DYNAMIC_SLICE, SHARDING_CONSTRAINT}
)

# ---- where a kernel meets its input ----------------------------------------------------
DOT_GENERAL = "dot_general"
CONV = "conv_general_dilated"
GATHER = "gather"
#: ``lax.ragged_dot`` / ``ragged_dot_general`` (one primitive, ``ragged_dot_general``, from
#: JAX 0.6.2 through 0.12; its params gained ``out_sharding`` on the way, which a rule that
#: re-binds the eqn's own params never needs to name).
RAGGED_DOT = frozenset({"ragged_dot_general"})
KERNEL_USES = frozenset({DOT_GENERAL, CONV, GATHER}) | RAGGED_DOT

# ---- elementwise groups for the input rebuild (lora_jax._implicit.rebuild) -----------------------
#: Outputs of these are kept by their own derivative (``d tanh = 1 - tanh^2``).
OUTPUT_KEPT = frozenset({"tanh", "exp"})
#: Unary, non-linear.
UNARY = frozenset(
    {
        "tanh",
        "exp",
        "exp2",
        "log",
        "log1p",
        "logistic",
        "erf",
        "erfc",
        "erf_inv",
        "sin",
        "cos",
        "rsqrt",
        "sqrt",
        "cbrt",
        "integer_pow",
        "square",
        "abs",
        "sign",
        "expm1",
    }
)
#: Binary ops whose derivative needs both operands (so autodiff keeps them).
BINARY = frozenset({"mul", "div", "max", "min", "pow", "atan2"})
#: Elementwise ops that keep only a mask, or nothing, of their value operands.
SELECT = frozenset({"select_n", "clamp"})
#: Linear or layout only (their derivative keeps nothing).
LINEAR = frozenset(
    {
        "add",
        "sub",
        "neg",
        "add_any",
        "broadcast_in_dim",
        RESHAPE,
        SQUEEZE,
        TRANSPOSE,
        CONVERT,
        COPY,
        "reduce_precision",
    }
)

_BODY_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def by_name(handlers: dict[Any, Any]) -> dict[str, Any]:
    """A dispatch table keyed by primitive name from one keyed by names or groups.

    Example:
      >>> sorted(by_name({TRANSPOSE: "t", REMAT: "r"}).items())
      [('checkpoint', 'r'), ('remat2', 'r'), ('transpose', 't')]
    """
    table: dict[str, Any] = {}
    for key, handler in handlers.items():
        for name in (key,) if isinstance(key, str) else key:
            table[name] = handler
    return table


def as_open(jaxpr: Any) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a closed jaxpr, or ``(jaxpr, ())`` of an open one.

    From JAX 0.12 on there is one type for both (its ``jaxpr`` is itself, its
    ``consts`` a list, empty when open); the consts come back as a tuple in
    every version.

    Example:
      >>> import jax
      >>> closed = jax.make_jaxpr(lambda x: x + 1)(1.0)
      >>> as_open(closed)[0] is closed.jaxpr, as_open(closed.jaxpr)[1]
      (True, ())
    """
    if hasattr(jaxpr, "consts"):
        return jaxpr.jaxpr, tuple(jaxpr.consts)
    return jaxpr, ()


def sub_jaxpr(params: dict[str, Any]) -> tuple[Any, Sequence[Any]] | None:
    """The body of a call-like eqn as ``(open_jaxpr, consts)``, or None.

    Reads ``jaxpr`` (``jit``, ``remat2``), ``call_jaxpr`` (``closed_call``,
    ``call``, ``custom_jvp_call``, ``custom_vjp_call``) or ``fun_jaxpr``
    (``custom_vjp_call_jaxpr``), closed or not.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0)
      >>> body, consts = sub_jaxpr(closed.jaxpr.eqns[0].params)
      >>> [e.primitive.name for e in body.eqns], consts
      (['sin'], ())
    """
    for name in _BODY_PARAMS:
        if params.get(name) is not None:
            return as_open(params[name])
    return None


def body_of(params: dict[str, Any]) -> tuple[Any, Sequence[Any]]:
    """:func:`sub_jaxpr` of an eqn that always has a body (``remat``); raises if it has none.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0)
      >>> len(body_of(closed.jaxpr.eqns[0].params)[0].eqns)
      1
    """
    body = sub_jaxpr(params)
    if body is None:
        raise ValueError(f"a call-like eqn without a body (params {sorted(params)})")
    return body


def scan_operands(params: dict[str, Any]) -> tuple[int, int]:
    """``(constants, carries)``: how many of a ``scan`` eqn's operands are each.

    The operands are the constants, then the carries, then the scanned inputs
    (and the body's outputs the carries, then the stacked outputs). Before
    JAX 0.12 the eqn says so in ``num_consts`` / ``num_carry``; from 0.12 on in
    its flat trees ``ft_in`` (constants, carries, scanned inputs) and
    ``ft_out`` (carries, outputs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> k = jnp.ones((4, 4))
      >>> step = lambda c, w: (c @ w @ k, c)             # k: a constant; c: a carry; w: scanned
      >>> closed = jax.make_jaxpr(lambda ws, x: jax.lax.scan(step, x, ws))(
      ...     jnp.ones((3, 4, 4)), jnp.ones((2, 4)))
      >>> scan_operands(closed.jaxpr.eqns[0].params)
      (1, 1)
    """
    if "num_consts" in params:  # JAX < 0.12
        return params["num_consts"], params["num_carry"]
    consts, carries, _ = params["ft_in"].unpack()
    return len(consts), len(carries)


def ragged_dims(
    params: dict[str, Any],
) -> tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]], Any, Any]:
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch), lhs_ragged, rhs_group)`` of a
    ``ragged_dot_general`` eqn, and ``group_offset`` is read with ``params.get``: the same
    fields in every supported JAX.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(jax.lax.ragged_dot)(
      ...     jnp.ones((6, 4)), jnp.ones((3, 4, 5)), jnp.array([1, 2, 3]))
      >>> ragged_dims(closed.jaxpr.eqns[0].params)
      (((1,), (1,)), ((), ()), (0,), (0,))
    """
    d = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = d.dot_dimension_numbers
    as_tuple = lambda s: tuple(int(i) for i in s)  # noqa: E731
    return (
        (as_tuple(lc), as_tuple(rc)),
        (as_tuple(lb), as_tuple(rb)),
        as_tuple(d.lhs_ragged_dimensions),
        as_tuple(d.rhs_group_dimensions),
    )


def forwarded_inputs(jaxpr: Any) -> list[int | None]:
    """For each output of ``jaxpr``, the position of the input it is (passed straight through), or None.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: (x @ w, w))(jnp.ones((4, 3)), jnp.ones((2, 4)))
      >>> forwarded_inputs(closed.jaxpr)
      [None, 0]
    """
    position = {var: i for i, var in enumerate(jaxpr.invars)}
    return [None if isinstance(var, jex.Literal) else position.get(var) for var in jaxpr.outvars]
