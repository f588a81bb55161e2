"""Reading kernel layouts off one traced call of the model.

An N-D kernel's fan-in / fan-out split cannot be read off its shape: a
``(512, 8, 64)`` array may be a query projection (``"ioo"``), an output
projection of a different model, a conv kernel or a scan-stacked Dense kernel.
The contraction that consumes it says which: :func:`infer_layouts` traces
``fn(params, *args)`` to a jaxpr and follows every float leaf with at least two
axes to where it is used, through exactly the primitives
:func:`~lora_jax.implicit` follows a kernel through (one rule each, keyed by
the names in :mod:`lora_jax._implicit.primitives`):

* casts, copies, transposes and sharding constraints;
* reshapes and squeezes that split or merge axes: each current axis is
  tracked as the group of original axes it came from, and the letter a use
  gives a current axis applies to every original axis of its group (a group
  whose members would get different letters is not recordable); an original
  axis of size 1 that a squeeze drops is read as stacked ``s``;
* slices and dynamic slices: an axis they cut is stacked ``s`` (``w[i]`` of a
  ``(layers, in, out)`` stack in a ``fori_loop`` is a ``dynamic_slice`` and a
  squeeze);
* ``jit`` and other plain calls, ``remat`` (an input it returns as it is
  stays tracked), ``cond``, ``while`` (a kernel as a loop constant) and
  ``scan`` (the scanned axis of a kernel is ``s``).

At a use, the letters are:

* ``dot_general``: contracted axes are fan-in ``i``, batch axes stacked ``s``,
  the rest fan-out ``o`` (kind ``dense``);
* ``conv_general_dilated``: the output-feature axis is ``o``, the window and
  input-feature axes ``i`` (kind ``conv``);
* ``gather`` (embedding lookup): the indexed axes are ``i``, the sliced axes
  ``o`` (kind ``embed``);
* ``ragged_dot`` (a mixture of experts with tokens sorted by expert): the
  kernel's group axis is experts ``e``, its contracted axes ``i``, the rest
  ``o`` (kind ``dense``).

An einsum over all experts (``td,edf->tef``, or ``ted,edf->tf`` after a one-hot
combine) is, in the jaxpr, exactly a multi-head projection (Gemma's
``(heads, d, head_dim)`` query kernel, its ``(heads, head_dim, d)`` output
kernel): nothing in the contraction says that the leading axis holds experts.
``infer_layouts(..., lora_experts=pattern)`` says it: for the leaves whose path
matches, the first axis that is not scanned over is the experts axis ``e``
whatever its use makes it (free, contracted, batch or sliced), so the einsum
form gives ``"eio"`` (``"seio"`` under a scan over layers).

A use is recorded only where ``implicit`` runs it low-rank with that layout:
the path from the leaf and the use are replayed, abstractly
(``jax.eval_shape``), through ``implicit``'s own rules. So a kernel used only
where ``implicit`` would materialise it (passed into a custom-derivative
function, reshaped across fan-in and fan-out, a grouped conv, a loop carry)
gets no layout from that use. Leaves used in ways that disagree (other than
the two directions of one contraction, as a tied embedding used for lookup and
``attend``) raise :class:`~lora_jax._errors.LoraLayoutError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from lora_jax._errors import LoraImplicitError, LoraLayoutError
from lora_jax._implicit import primitives as P
from lora_jax._implicit.interpreter import RULES, Context, scanned
from lora_jax._implicit.tracing import trace
from lora_jax._implicit.view import LoraView, reshape_blocks, roles_of
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths

#: A path step that is not an eqn: the kernel was scanned over its first axis.
_SCANNED = "scanned"


@dataclasses.dataclass(frozen=True)
class Uses:
    """What one walk has found: ``{path: [(layout, kind), ...]}``, and which leaves the
    caller said hold experts (``lora_experts``)."""

    found: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    experts: tuple[re.Pattern, ...] = ()

    def has_experts(self, path: str) -> bool:
        return any(p.fullmatch(path) for p in self.experts)


@dataclasses.dataclass(frozen=True)
class _Tracked:
    """A value derived from kernel leaf ``path`` by layout ops ``implicit`` follows.

    Attributes:
      path, shape, dtype: the leaf's.
      groups: for each current axis, the original axes it came from (a merge
        gives one axis several; a split gives several axes the same group).
      fixed: original axes that must be stacked ``s``: scanned over, cut by a
        slice, or dropped by a squeeze.
      scanned: the original axes scanned over (layers; never the experts axis).
      picked: original axes a gather picks whole kernels along (``w[idx]``, each
        token's expert): experts ``e``.
      steps: the eqns (kernel as operand 0) and :data:`_SCANNED` marks from
        the leaf to here, replayed through ``implicit``'s rules at a use.
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    groups: tuple[tuple[int, ...], ...]
    fixed: frozenset[int] = frozenset()
    steps: tuple[Any, ...] = ()
    scanned: frozenset[int] = frozenset()
    picked: frozenset[int] = frozenset()

    def then(self, step: Any, **changes: Any) -> _Tracked:
        return dataclasses.replace(self, steps=self.steps + (step,), **changes)


def infer_layouts(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    lora_experts: str | Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, KernelLayout]:
    """Traces ``fn(params, *args, **kwargs)`` and returns the layout of each used kernel.

    Args:
      fn: a function of the params, e.g. a Flax linen ``model.apply``.
      params: the params pytree (arrays or ``jax.ShapeDtypeStruct``).
      *args, **kwargs: example inputs; only shapes and dtypes matter.
      lora_experts: regex(es) matched in full against leaf paths: kernels whose
        first axis that is not scanned over holds experts (``(E, in, out)``,
        ``(layers, E, in, out)``). Needed only for an einsum over experts, which
        looks like a multi-head projection; ``ragged_dot``'s group axis is
        read as experts without it.

    Returns:
      ``{path: KernelLayout}`` for every floating leaf with >= 2 axes that
      reaches a ``dot_general``, ``ragged_dot``, ``conv_general_dilated`` or ``gather`` that
      :func:`~lora_jax.implicit` runs low-rank; pass it as
      ``init_lora(..., layouts=...)``.

    Raises:
      LoraLayoutError: a leaf's uses imply different layouts.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax as lj
      >>> m = nn.DenseGeneral((4, 8))                       # kernel (16, 4, 8)
      >>> x = jnp.ones((2, 16))
      >>> lj.infer_layouts(m.apply, m.init(jax.random.key(0), x), x)["params/kernel"]
      KernelLayout(axes='ioo', kind='dense')
      >>> stack = {"w": jnp.ones((3, 16, 16))}              # (layers, in, out), w[i] in a loop
      >>> loop = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)
      >>> lj.infer_layouts(loop, stack, x)["w"]
      KernelLayout(axes='sio', kind='dense')
      >>> experts = {"w": jnp.ones((4, 16, 8))}               # (E, in, out), tokens sorted
      >>> moe = lambda p, x: jax.lax.ragged_dot(x, p["w"], jnp.array([1, 0, 1, 0]))
      >>> lj.infer_layouts(moe, experts, x)["w"]
      KernelLayout(axes='eio', kind='dense')
      >>> dense = lambda p, x: jnp.einsum("td,edf->tef", x, p["w"])  # every token, every expert
      >>> lj.infer_layouts(dense, experts, x)["w"], lj.infer_layouts(dense, experts, x,
      ...     lora_experts="w")["w"]
      (KernelLayout(axes='oio', kind='dense'), KernelLayout(axes='eio', kind='dense'))
    """
    leaves, treedef = leaves_with_paths(params)
    abstract = [jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) for _, x in leaves]
    closed, _, dynamic = trace(fn, treedef, abstract, args, kwargs)
    tracked = [
        _Tracked(path, tuple(leaf.shape), leaf.dtype, tuple((d,) for d in range(leaf.ndim)))
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2
        else None
        for path, leaf in zip((p for p, _ in leaves), abstract)
    ]
    patterns = (lora_experts,) if isinstance(lora_experts, str) else tuple(lora_experts)
    uses = Uses(experts=tuple(re.compile(p) for p in patterns))
    _walk(closed.jaxpr, tracked + [None] * len(dynamic), uses)
    return {path: _resolve(path, found) for path, found in uses.found.items()}


def _resolve(path: str, found: list[tuple[str, str]]) -> KernelLayout:
    embeds = [f for f in found if f[1] == "embed"]
    axes, kind = (embeds or found)[0]
    flip = axes.translate(str.maketrans("io", "oi"))
    for other, other_kind in found:
        if other not in (axes, flip) or (other_kind != kind and kind != "embed"):
            raise LoraLayoutError(
                f"leaf {path!r} is used as a {kind} kernel with layout {axes!r} and as a "
                f"{other_kind} kernel with layout {other!r}; give its layout explicitly "
                "(LoraConfig(layouts={...})), or name an experts kernel with "
                "infer_layouts(..., lora_experts=pattern)"
            )
    return KernelLayout(axes, kind)


def _walk(jaxpr: Any, inputs: list[_Tracked | None], uses: Uses) -> list[_Tracked | None]:
    """Follows the tracked inputs of ``jaxpr`` through it; returns its tracked outputs."""
    env: dict[Any, _Tracked] = {}
    for var, t in zip(jaxpr.invars, inputs):
        if t is not None:
            env[var] = t
    get = lambda v: None if isinstance(v, jex.Literal) else env.get(v)  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        step = STEPS.get(eqn.primitive.name)
        outs = step(eqn, ins, uses) if step is not None else [None] * len(eqn.outvars)
        for var, t in zip(eqn.outvars, outs):
            if t is not None:
                env[var] = t
    return [get(v) for v in jaxpr.outvars]


# ---- steps: layout ops on a kernel (the kernel is operand 0) ---------------------------------

Step = Callable[[Any, list, Uses], list]


def _none(eqn: Any) -> list[None]:
    return [None] * len(eqn.outvars)


def _follow(eqn: Any, ins: list, uses: Uses) -> list:
    """Casts, copies, sharding constraints: the axes stay as they are."""
    t = ins[0]
    return _none(eqn) if t is None else [t.then(eqn)]


def _transpose(eqn: Any, ins: list, uses: Uses) -> list:
    t = ins[0]
    if t is None:
        return _none(eqn)
    return [t.then(eqn, groups=tuple(t.groups[d] for d in eqn.params["permutation"]))]


def _reshape(eqn: Any, ins: list, uses: Uses) -> list:
    """Splits and merges: each new axis gets the union of the groups of its old axes.

    An old axis that no new axis continues (a size-1 axis squeezed away) fixes
    its original axes as stacked, unless an axis still present shares them
    (a size-1 piece of a split axis).
    """
    t = ins[0]
    blocks = (
        None
        if t is None
        else reshape_blocks(tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape))
    )
    if blocks is None:
        return _none(eqn)
    groups: list[tuple[int, ...]] = [()] * len(eqn.outvars[0].aval.shape)
    dropped: set[int] = set()
    for old, new in blocks:
        union = tuple(dict.fromkeys(a for d in old for a in t.groups[d]))
        if not new:
            dropped.update(union)
        for d in new:
            groups[d] = union
    dropped -= {a for g in groups for a in g}
    return [t.then(eqn, groups=tuple(groups), fixed=t.fixed | dropped)]


def _slice(eqn: Any, ins: list, uses: Uses) -> list:
    """A cut axis (of a static or dynamic slice) is stacked: its original axes are ``s``."""
    t = ins[0]
    if t is None:
        return _none(eqn)
    old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    cut = {a for d, g in enumerate(t.groups) if old[d] != new[d] for a in g}
    return [t.then(eqn, fixed=t.fixed | cut)]


# ---- steps: calls and control flow -----------------------------------------------------------


def _call(eqn: Any, ins: list, uses: Uses) -> list:
    """A plain call: the kernel flows in and out of its body."""
    body = P.sub_jaxpr(eqn.params)
    return _none(eqn) if body is None else _walk(body[0], ins, uses)


def _remat(eqn: Any, ins: list, uses: Uses) -> list:
    """``jax.checkpoint``: uses inside count; an output that is one of the body's inputs
    is that input (``implicit`` returns the caller's operand); the others are dense."""
    _call(eqn, ins, uses)
    return [
        None if source is None else ins[source]
        for source in P.forwarded_inputs(P.body_of(eqn.params)[0])
    ]


def _cond(eqn: Any, ins: list, uses: Uses) -> list:
    for branch in eqn.params["branches"]:
        _walk(P.as_open(branch)[0], ins[1:], uses)
    return _none(eqn)


def _while(eqn: Any, ins: list, uses: Uses) -> list:
    """Kernels as loop constants (a carried kernel is dense in ``implicit``)."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = [None] * (len(ins) - nc - nb)
    _walk(P.as_open(p["cond_jaxpr"])[0], ins[:nc] + carry, uses)
    _walk(P.as_open(p["body_jaxpr"])[0], ins[nc : nc + nb] + carry, uses)
    return _none(eqn)


def _scan(eqn: Any, ins: list, uses: Uses) -> list:
    """Constants flow in as they are; a scanned kernel loses its first axis, which is ``s``."""
    p = eqn.params
    nc, ncarry = P.scan_operands(p)
    xs = [
        None
        if t is None
        else t.then(
            _SCANNED,
            groups=t.groups[1:],
            fixed=t.fixed | set(t.groups[0]),
            scanned=t.scanned | set(t.groups[0]),
        )
        for t in ins[nc + ncarry :]
    ]
    _walk(P.as_open(p["jaxpr"])[0], ins[:nc] + [None] * ncarry + xs, uses)
    return _none(eqn)


# ---- steps: uses -----------------------------------------------------------------------------


def _dot_general(eqn: Any, ins: list, uses: Uses) -> list:
    """Contracted axes ``i``, batch axes ``s``, the rest ``o``; a kernel on both sides is
    read on the right (``implicit`` materialises the left one)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    side = 1 if ins[1] is not None else 0
    t, contracted, batch = ins[side], (lc, rc)[side], (lb, rb)[side]
    letters = ["i" if d in contracted else "s" if d in batch else "o" for d in range(len(t.groups))]
    _record(uses, t, letters, "dense", eqn, side)
    return _none(eqn)


def _ragged_dot(eqn: Any, ins: list, uses: Uses) -> list:
    """The kernel on the right: its group axis ``e``, contracted axes ``i``, the rest ``o``."""
    t = ins[1]
    if t is not None and ins[0] is None and ins[2] is None:
        (_, rc), _, _, rg = P.ragged_dims(eqn.params)
        letters = ["e" if d in rg else "i" if d in rc else "o" for d in range(len(t.groups))]
        _record(uses, t, letters, "dense", eqn, 1)
    return _none(eqn)


def _conv(eqn: Any, ins: list, uses: Uses) -> list:
    """The output-feature axis ``o``, window and input-feature axes ``i``."""
    t = ins[1]
    if t is not None and ins[0] is None:
        o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        _record(uses, t, ["o" if d == o_dim else "i" for d in range(len(t.groups))], "conv", eqn, 1)
    return _none(eqn)


def _gather(eqn: Any, ins: list, uses: Uses) -> list:
    """Indexed (collapsed) axes ``i``, sliced axes ``o``; or, for ``w[idx]`` of whole
    kernels of a >= 3-D stack (each token's expert), the picked axis is experts ``e`` and
    the kernel flows on with the indices' batch axes in front."""
    t = ins[0]
    picked = None if t is None or ins[1] is not None else _picked_axis(eqn, t)
    if picked is not None:
        offset = eqn.params["dimension_numbers"].offset_dims
        kept = iter(g for d, g in enumerate(t.groups) if d != picked)
        groups = tuple(
            next(kept) if d in offset else () for d in range(len(eqn.outvars[0].aval.shape))
        )
        return [t.then(eqn, groups=groups, picked=t.picked | set(t.groups[picked]))]
    if t is not None and ins[1] is None:
        collapsed = set(eqn.params["dimension_numbers"].collapsed_slice_dims)
        _record(
            uses, t, ["i" if d in collapsed else "o" for d in range(len(t.groups))], "embed", eqn, 0
        )
    return _none(eqn)


def _picked_axis(eqn: Any, t: _Tracked) -> int | None:
    """The kernel axis ``w[idx]`` picks whole kernels along, or None for any other gather."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    if (
        len(shape) < 3
        or tuple(getattr(dn, "operand_batching_dims", None) or ())
        or len(dn.collapsed_slice_dims) != 1
        or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)
    ):
        return None
    (d,) = dn.collapsed_slice_dims
    if any(sizes[n] != (1 if n == d else shape[n]) for n in range(len(shape))):
        return None
    return d


def _record(
    uses: Uses, t: _Tracked, letters: list[str], kind: str, eqn: Any, position: int
) -> None:
    """Records the layout the letters of a use give ``t``'s leaf, if ``implicit`` runs that
    use low-rank with it.

    Example: a ``(d, h * k)`` kernel reshaped to ``(d, h, k)`` and contracted
    over ``d`` has groups ``((0,), (1,), (1,))`` and letters ``['i', 'o', 'o']``:
    layout ``"io"``. Contracted over ``h`` alone, axis 1 would be both ``i``
    and ``o``: nothing is recorded.
    """
    axes = dict.fromkeys(t.fixed, "s") | dict.fromkeys(t.picked, "e")
    for letter, group in zip(letters, t.groups):
        for a in group:
            if axes.setdefault(a, letter) != letter:
                return
    if sorted(axes) != list(range(len(t.shape))):
        return
    if uses.has_experts(t.path):
        experts = min(a for a in range(len(t.shape) + 1) if a not in t.scanned)
        if experts < len(t.shape):
            axes[experts] = "e"
    layout = "".join(axes[a] for a in range(len(t.shape)))
    if "i" in layout and "o" in layout and _runs_low_rank(t, layout, eqn, position):
        uses.found.setdefault(t.path, []).append((layout, kind))


def _runs_low_rank(t: _Tracked, layout: str, eqn: Any, position: int) -> bool:
    """Whether ``implicit`` runs use ``eqn`` of ``t`` low-rank when the leaf has ``layout``.

    Replays ``t``'s steps and the use through ``implicit``'s :data:`RULES` on
    an abstract view (``jax.eval_shape``: nothing is computed); a rule that
    declines, or a step ``implicit`` would materialise at, means no.
    """
    ctx = Context(strict=True, rebuild=False)

    def replay() -> Any:
        view = _abstract_view(t, layout)
        for step in t.steps:
            if step == _SCANNED:
                view = jax.tree.map(lambda x: x[0], scanned(ctx, view))
                continue
            outs = RULES[step.primitive.name](ctx, step, [view] + _operands(step)[1:])
            if outs is None:
                return None
            view = outs[0]
        operands = _operands(eqn)
        operands[position] = view
        return RULES[eqn.primitive.name](ctx, eqn, operands)

    try:
        return jax.eval_shape(replay) is not None
    except LoraImplicitError:
        return False


def _operands(eqn: Any) -> list[Any]:
    """Placeholders of ``eqn``'s operands' shapes and dtypes (within ``jax.eval_shape``)."""
    return [
        v.val if isinstance(v, jex.Literal) else jnp.zeros(v.aval.shape, v.aval.dtype)
        for v in eqn.invars
    ]


def _abstract_view(t: _Tracked, layout: str) -> LoraView:
    """A rank-1 view of ``t``'s leaf with ``layout``, as ``implicit`` would carry it."""
    a_shape, b_shape = KernelLayout(layout).factor_shapes(t.shape, rank=1)
    return LoraView(
        jnp.zeros(t.shape, t.dtype),
        jnp.zeros(a_shape),
        jnp.zeros(b_shape),
        roles_of(layout),
        1.0,
        jnp.dtype(t.dtype),
        t.path,
    )


#: ``{primitive name: step}``: how a tracked kernel passes through each primitive
#: ``implicit`` has a rule for (:data:`lora_jax._implicit.interpreter.RULES`); any other
#: primitive ends the kernel's path.
STEPS: dict[str, Step] = P.by_name(
    {
        (P.CONVERT, P.COPY, P.SHARDING_CONSTRAINT): _follow,
        P.TRANSPOSE: _transpose,
        (P.RESHAPE, P.SQUEEZE): _reshape,
        (P.SLICE, P.DYNAMIC_SLICE): _slice,
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
