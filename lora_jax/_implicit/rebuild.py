"""Recomputable inputs: rebuild a low-rank input from values the backward keeps anyway.

The low-rank branch's backward needs its input ``x`` for ``dA = x^T du``; the
frozen product ``x @ W`` does not (its weight gets no gradient). Saving ``x``
is what makes LoRA training hold more memory than the floor (the frozen model's
forward and activation backward): a LayerNorm output feeding ``q``/``k``/``v``,
or the GELU output feeding ``fc2``, is not otherwise kept.

But such an ``x`` is usually one or two cheap elementwise steps away from
values that autodiff keeps for the model's own backward: the two operands of
a product (``h`` and ``0.5 * (1 + tanh(..))`` in GELU, the centred input and
the scale in LayerNorm), or a ``tanh`` / ``exp`` output. :func:`input_chain`
walks back from ``x`` through elementwise and layout equations until every
large value it reaches is such a kept value; values at most
:data:`SMALL_FRACTION` of ``x``'s size (statistics, biases, scales) are leaves
as they are. The low-rank branch then saves those leaves instead of ``x`` and
rebuilds ``x`` in the backward with the (few, cheap) equations in between.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> closed = jax.make_jaxpr(lambda h: nn.gelu(h) * 2.0)(jnp.ones((4, 8)))
  >>> chain = input_chain(Graph(closed.jaxpr), closed.jaxpr.outvars[0])
  >>> [e.primitive.name for e in chain.eqns]   # x = (h * 0.5(1 + tanh(..))) * 2
  ['mul', 'mul']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jex

from lora_jax._implicit.primitives import (
    BINARY,
    CALLS,
    CUSTOM_JVP,
    LINEAR,
    OUTPUT_KEPT,
    SELECT,
    UNARY,
    sub_jaxpr,
)

# A chain may contain elementwise or layout equations (one output each; the
# groups in lora_jax._implicit.primitives say what each one's derivative keeps), and
# calls made only of them (a jitted GELU, a custom_jvp activation), which the
# chain rebinds as they are.
_ELEMENTWISE = UNARY | BINARY | SELECT | LINEAR
_TRANSPARENT = CALLS | CUSTOM_JVP

#: A value at most this fraction of ``x``'s size is "small": saved as it is.
SMALL_FRACTION = 1 / 16
#: The most equations a chain may hold.
MAX_EQNS = 48


@dataclasses.dataclass(frozen=True)
class Chain:
    """How ``out`` is rebuilt from ``leaves``.

    Attributes:
      leaves: the values the equations read: large ones (kept by autodiff
        anyway) first, then small ones.
      eqns: the equations, in program order.
      out: the rebuilt value (the low-rank input).
    """

    leaves: tuple[Any, ...]
    eqns: tuple[Any, ...]
    out: Any

    def rebuild(
        self, bind: Callable[[Any, Sequence[Any]], list[Any]], values: Sequence[Any]
    ) -> Any:
        """Evaluates the chain on ``values`` (one per leaf) with ``bind(eqn, invals)``."""
        env = dict(zip(self.leaves, values))
        read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]  # noqa: E731
        for eqn in self.eqns:
            env[eqn.outvars[0]] = bind(eqn, [read(v) for v in eqn.invars])[0]
        return env[self.out]


class Graph:
    """Producers and consumers of the variables of one jaxpr."""

    def __init__(self, jaxpr: Any):
        self.produced: dict[Any, tuple[int, Any]] = {}
        self.consumers: dict[Any, list[Any]] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.outvars:
                self.produced[v] = (i, eqn)
            for v in eqn.invars:
                if not isinstance(v, jex.Literal):
                    self.consumers.setdefault(v, []).append(eqn)

    def index(self, v: Any) -> int:
        return self.produced.get(v, (-1, None))[0]


def _size(v: Any) -> int:
    return math.prod(getattr(v.aval, "shape", ()))


def _allowed(eqn: Any) -> bool:
    """An elementwise or layout equation (or a call made only of them, e.g. a jitted GELU)."""
    name = eqn.primitive.name
    if len(eqn.outvars) != 1:
        return False
    if name in _TRANSPARENT:
        body = sub_jaxpr(eqn.params)
        return body is not None and all(_allowed(e) for e in body[0].eqns)
    return name in _ELEMENTWISE


def _kept(graph: Graph, v: Any) -> bool:
    """Whether autodiff of the program keeps ``v`` itself for the backward.

    True for the output of ``tanh`` / ``exp`` (their derivatives are written
    in terms of the output) and for an operand of a product, quotient, max or
    min whose other operand is not a literal (the derivative needs both).
    """
    _, eqn = graph.produced.get(v, (-1, None))
    if eqn is not None and eqn.primitive.name in OUTPUT_KEPT:
        return True
    return any(
        e.primitive.name in BINARY
        and any(not isinstance(u, jex.Literal) and u is not v for u in e.invars)
        for e in graph.consumers.get(v, ())
    )


def input_chain(graph: Graph, x: Any) -> Chain | None:
    """The chain that rebuilds ``x`` from values autodiff keeps anyway, or None.

    Walks back from ``x``, always expanding the latest-produced large value
    that is not kept (:func:`_kept`) or is a mere broadcast of small values,
    until every large value left is kept. Returns None when ``x`` is kept
    itself, when a value that must be expanded comes from anything but an
    elementwise or layout equation (a dot, a reduction, an input), or when the
    chain would exceed :data:`MAX_EQNS`.

    Args:
      graph: the :class:`Graph` of the jaxpr ``x`` lives in.
      x: a variable of that jaxpr (a low-rank input).

    Returns:
      A :class:`Chain` whose leaves are the kept large values, then the small ones.
    """
    if isinstance(x, jex.Literal) or _kept(graph, x):
        return None
    limit = _size(x) * SMALL_FRACTION
    frontier: dict[Any, None] = {x: None}
    region: list[tuple[int, Any]] = []
    small: dict[Any, None] = {}

    def must_expand(v: Any) -> bool:
        if v is x or not _kept(graph, v):
            return True
        _, eqn = graph.produced.get(v, (-1, None))  # a broadcast of small values: rebuild it
        return (
            eqn is not None
            and _allowed(eqn)
            and all(isinstance(u, jex.Literal) or _size(u) <= limit for u in eqn.invars)
        )

    while len(region) < MAX_EQNS:
        todo = [v for v in frontier if must_expand(v)]
        if not todo:
            region.sort(key=lambda ie: ie[0])
            return Chain(tuple(frontier) + tuple(small), tuple(e for _, e in region), x)
        v = max(todo, key=graph.index)
        if v not in graph.produced or not _allowed(graph.produced[v][1]):
            return None
        index, eqn = graph.produced[v]
        del frontier[v]
        region.append((index, eqn))
        for u in eqn.invars:
            if not isinstance(u, jex.Literal):
                (small if _size(u) <= limit else frontier)[u] = None
    return None
