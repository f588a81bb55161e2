"""Reading kernel layouts off one traced call of the model.

An N-D kernel's fan-in / fan-out split cannot be read off its shape: a
``(512, 8, 64)`` array may be a query projection (``"ioo"``), an output
projection of a different model, a conv kernel or a scan-stacked Dense kernel.
The contraction that consumes it says which: :func:`infer_layouts` traces
``fn(params, *args)`` to a jaxpr and follows every float leaf with at least two
axes (through casts, transposes, ``jit``, ``remat``, ``scan``, ``cond``,
``while`` and custom-derivative calls) to where it is used:

* ``dot_general``: contracted axes are fan-in ``i``, batch axes stacked ``s``,
  the rest fan-out ``o`` (kind ``dense``);
* ``conv_general_dilated``: the output-feature axis is ``o``, the window and
  input-feature axes ``i`` (kind ``conv``);
* ``gather`` (embedding lookup): the indexed axes are ``i``, the sliced axes
  ``o`` (kind ``embed``);
* a kernel scanned over by ``lax.scan`` / ``nn.scan``: the scanned axis is ``s``.

Leaves used in ways that disagree (other than the two directions of one
contraction, as a tied embedding used for lookup and ``attend``) raise
:class:`~lora_jax._errors.LoraLayoutError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from lora_jax._errors import LoraLayoutError
from lora_jax._layout import KernelLayout
from lora_jax._paths import leaves_with_paths
from lora_jax._tracing import trace


@dataclasses.dataclass(frozen=True)
class _Tracked:
    """A value derived from leaf ``path``: its axes as original axis indices."""

    path: str
    axes: tuple[int, ...]
    stacked: tuple[int, ...] = ()   # original axes sliced away by a scan


def infer_layouts(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
                  ) -> dict[str, KernelLayout]:
    """Traces ``fn(params, *args, **kwargs)`` and returns the layout of each used kernel.

    Args:
      fn: a function of the params, e.g. a Flax linen ``model.apply``.
      params: the params pytree (arrays or ``jax.ShapeDtypeStruct``).
      *args, **kwargs: example inputs; only shapes and dtypes matter.

    Returns:
      ``{path: KernelLayout}`` for every floating leaf with >= 2 axes that
      reaches a ``dot_general``, ``conv_general_dilated`` or ``gather``; pass
      it as ``init_lora(..., layouts=...)``.

    Raises:
      LoraLayoutError: a leaf's uses imply different layouts.

    Example:
      >>> import flax.linen as nn
      >>> m = nn.DenseGeneral((4, 8))
      >>> x = jnp.ones((2, 16))
      >>> infer_layouts(m.apply, m.init(jax.random.key(0), x), x)["params/kernel"]
      KernelLayout(axes='ioo', kind='dense')
    """
    leaves, treedef = leaves_with_paths(params)
    abstract = [jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) for _, x in leaves]
    closed, _, dynamic = trace(fn, treedef, abstract, args, kwargs)
    tracked = [
        _Tracked(path, tuple(range(len(leaf.shape))))
        if jnp.issubdtype(leaf.dtype, jnp.floating) and len(leaf.shape) >= 2 else None
        for path, leaf in leaves
    ]
    uses: dict[str, list[tuple[str, str]]] = {}
    _walk(closed.jaxpr, tracked + [None] * len(dynamic), uses)
    return {path: _resolve(path, found) for path, found in uses.items()}


def _record(uses, t: _Tracked, letters: dict[int, str], kind: str, ndim: int) -> None:
    letters = {**{a: "s" for a in t.stacked}, **letters}
    if sorted(letters) == list(range(ndim)):
        uses.setdefault(t.path, []).append(("".join(letters[a] for a in range(ndim)), kind))


def _resolve(path: str, found: list[tuple[str, str]]) -> KernelLayout:
    embeds = [f for f in found if f[1] == "embed"]
    axes, kind = (embeds or found)[0]
    flip = axes.translate(str.maketrans("io", "oi"))
    for other, other_kind in found:
        if other not in (axes, flip) or (other_kind != kind and kind != "embed"):
            raise LoraLayoutError(
                f"leaf {path!r} is used as a {kind} kernel with layout {axes!r} and as a "
                f"{other_kind} kernel with layout {other!r}; give its layout explicitly "
                "(LoraConfig(layouts={...}))"
            )
    return KernelLayout(axes, kind)


def _walk(jaxpr: Any, inputs: list[_Tracked | None], uses) -> list[_Tracked | None]:
    env: dict[Any, _Tracked] = {}
    for var, t in zip(jaxpr.invars, inputs):
        if t is not None:
            env[var] = t
    get = lambda v: None if isinstance(v, jex.Literal) else env.get(v)  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        outs = _step(eqn, ins, uses)
        for var, t in zip(eqn.outvars, outs):
            if t is not None:
                env[var] = t
    return [get(v) for v in jaxpr.outvars]


def _sub(closed: Any) -> Any:
    return getattr(closed, "jaxpr", closed)


def _step(eqn: Any, ins: list, uses) -> list:
    name, p = eqn.primitive.name, eqn.params
    none = [None] * len(eqn.outvars)
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        return [ins[0]]
    if name == "transpose":
        t = ins[0]
        return [dataclasses.replace(t, axes=tuple(t.axes[i] for i in p["permutation"]))]
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
            if t is not None:
                letters = {t.axes[d]: "o" for d in range(len(t.axes))}
                letters.update({t.axes[d]: "i" for d in c})
                letters.update({t.axes[d]: "s" for d in b})
                _record(uses, t, letters, "dense", len(t.axes) + len(t.stacked))
        return none
    if name == "conv_general_dilated" and ins[1] is not None:
        t = ins[1]
        letters = {a: "i" for a in t.axes}
        letters[t.axes[p["dimension_numbers"].rhs_spec[0]]] = "o"
        _record(uses, t, letters, "conv", len(t.axes) + len(t.stacked))
        return none
    if name == "gather" and ins[0] is not None:
        t = ins[0]
        collapsed = set(p["dimension_numbers"].collapsed_slice_dims)
        letters = {a: ("i" if d in collapsed else "o") for d, a in enumerate(t.axes)}
        _record(uses, t, letters, "embed", len(t.axes) + len(t.stacked))
        return none
    if name in ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint",
                "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
        return _walk(_sub(sub), ins, uses) if sub is not None else none
    if name == "cond":
        for branch in p["branches"]:
            _walk(_sub(branch), ins[1:], uses)
        return none
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = ins[nc + nb:]
        _walk(_sub(p["cond_jaxpr"]), ins[:nc] + carry, uses)
        _walk(_sub(p["body_jaxpr"]), ins[nc:nc + nb] + carry, uses)
        return none
    if name == "scan":
        n = p["num_consts"] + p["num_carry"]
        xs = [None if t is None else dataclasses.replace(
            t, axes=t.axes[1:], stacked=t.stacked + (t.axes[0],)) for t in ins[n:]]
        _walk(_sub(p["jaxpr"]), ins[:n] + xs, uses)
        return none
    return none
