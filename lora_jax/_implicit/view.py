"""A frozen kernel seen together with its LoRA factors, as it flows through a jaxpr.

While :func:`lora_jax.implicit` interprets a function, every targeted kernel is
carried as a :class:`LoraView` instead of a dense array: the frozen kernel
``w`` (in its current axis order and original dtype), the factors ``a`` and
``b``, and for each current axis its *role*:

* ``("s", j)`` -- stacked axis ``j`` of ``a`` and ``b``;
* ``("i", j)`` -- fan-in axis ``j`` of ``a`` (``a`` is ``(*stack, *fan_in, r)``);
* ``("o", j)`` -- fan-out axis ``j`` of ``b`` (``b`` is ``(*stack, r, *fan_out)``).

Transposes permute the roles and casts change ``dtype``; neither touches the
arrays. The view stands for the dense kernel
``(w + scale * A @ B).astype(dtype)`` in the current axis order, which
:meth:`LoraView.materialize` builds when no low-rank rule applies.

The factors may carry *leading* axes that no kernel axis has (``n_lead`` of
them): layout operations keep them in front and leave them alone. A mixed
adapter batch uses one, the example axis of each example's own factors
(:class:`lora_jax._serving.example_view.ExampleView`); the view itself knows
nothing of examples or adapters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._delta import LoraFactors, factor_order_norm, factor_product
from lora_jax._errors import LoraStructureError
from lora_jax._layout import BATCH_LETTERS, batch_axes_of
from lora_jax._quant.lazy_kernel import LazyKernel, use

Array = jax.Array
Role = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class LoraView:
    """A kernel plus factors; see the module docstring.

    Attributes:
      w: the frozen kernel, current axis order, original dtype.
      a: ``(*stack, *fan_in, r)``.
      b: ``(*stack, r, *fan_out)``.
      roles: one :data:`Role` per axis of ``w``.
      scale: ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).
      dtype: the dtype the program sees the kernel in.
      path: the kernel's leaf path, for messages.
      magnitude: DoRA's ``(*stack, *fan_out)`` magnitude, or None.

    ``a`` and ``b`` may also carry ``n_lead`` leading axes before ``*stack``
    (see the module docstring).
    """

    w: Any
    a: Any
    b: Any
    roles: tuple[Role, ...]
    scale: float
    dtype: Any
    path: str
    magnitude: Any = None

    @staticmethod
    def of(path: str, w: Array | LazyKernel, f: LoraFactors) -> LoraView:
        """The view of kernel ``w`` (layout order as stored) with factors ``f``."""
        f = f.all_layers().masked()  # a fused kernel's block-diagonal B (lora_jax._segments)
        return LoraView(
            w, f.a, f.b, roles_of(f.layout.axes), f.scale, jnp.dtype(w.dtype), path, f.magnitude
        )

    @staticmethod
    def of_quantized(path: str, q: Any, f: Any) -> LoraView:
        """The view of a quantized kernel ``q`` (a :class:`~lora_jax.QuantizedArray`), carried
        as a :class:`~lora_jax._quant.lazy_kernel.LazyKernel`; without factors (``f`` None) the view has
        rank 0, so the kernel is still dequantized only where it is used."""
        if f is not None and not isinstance(f, LoraFactors):
            raise LoraStructureError(
                f"leaf {path!r} is quantized and cannot be trained in full (a LeafDelta); "
                "keep it dense, or adapt it with LoRA factors"
            )
        if f is not None:
            stacked = lambda axes: [d for d, c in enumerate(axes) if c in BATCH_LETTERS]  # noqa: E731
            if stacked(f.layout.axes) != stacked(q.axes):
                raise LoraStructureError(
                    f"leaf {path!r}: quantized with axes {q.axes!r} but the delta's layout is "
                    f"{f.layout.axes!r}; their stacked and experts axes must agree"
                )
            return LoraView.of(path, LazyKernel(q), f)
        pick = lambda c: tuple(n for n, k in zip(q.shape, q.axes) if k == c)  # noqa: E731
        batch = tuple(q.shape[d] for d in batch_axes_of(q.axes))
        a = jnp.zeros(batch + pick("i") + (0,), q.dtype)
        b = jnp.zeros(batch + (0,) + pick("o"), q.dtype)
        return LoraView(LazyKernel(q), a, b, roles_of(q.axes), 0.0, jnp.dtype(q.dtype), path)

    @property
    def n_stack(self) -> int:
        """The number of stacked axes (of ``w``, and of the factors after their lead)."""
        return sum(1 for k, _ in self.roles if k == "s")

    @property
    def n_lead(self) -> int:
        """The factors' leading axes that no kernel axis has (0 for one adapter's factors)."""
        return np.ndim(self.a) - self.n_stack - sum(1 for k, _ in self.roles if k == "i") - 1

    @property
    def rank(self) -> int:
        """The rank ``r`` (0 for a quantized kernel without factors)."""
        return np.shape(self.a)[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.w))

    def replace(self, **changes: Any) -> LoraView:
        return dataclasses.replace(self, **changes)

    def frozen(self) -> Array:
        """``stop_gradient(w)`` cast to the program's dtype."""
        return self.frozen_in(self.dtype)

    def frozen_in(self, dtype: Any) -> Array:
        """``stop_gradient(w)`` as a dense array in ``dtype`` (a quantized kernel dequantized)."""
        if isinstance(self.w, LazyKernel):
            return self.w.dense(dtype)
        return jax.lax.stop_gradient(self.w).astype(dtype)

    def with_frozen(self, fn: Any, x: Array, *aux: Array) -> Array:
        """``fn(x, frozen(), *aux)``: the base product where the kernel meets its input. A
        quantized kernel is dequantized here, and again from its codes in the backward (see
        ``use``); ``aux`` (``ragged_dot``'s group sizes) gets no gradient."""
        return use(fn, x, self.w, self.dtype, *aux)

    def update(self) -> Array:
        """``scale * A @ B`` in float32, in the view's current axis order."""
        full = factor_product(self.a, self.b, self.scale, self.n_stack)
        return jnp.transpose(full, self._factor_axes())

    def _factor_axes(self) -> list[int]:
        """For each current axis, its position in factor order ``(*stack, *fan_in, *fan_out)``."""
        ns = self.n_stack
        offset = {"s": 0, "i": ns, "o": ns + sum(k == "i" for k, _ in self.roles)}
        return [offset[k] + j for k, j in self.roles]

    def dora_ratio(self) -> Array:
        """DoRA's ``m / ||W + s A B||_c`` as ``(*stack, *fan_out)``; the norm is detached
        and never formed densely (:func:`~lora_jax._delta.factor_order_norm`)."""
        order = sorted(range(len(self.roles)), key=lambda d: self._factor_axes()[d])
        w = jnp.transpose(self.frozen_in(jnp.float32), order)  # factor order
        a, b = jax.lax.stop_gradient(self.a), jax.lax.stop_gradient(self.b)
        norm = factor_order_norm(w, a, b, self.scale, self.n_stack)
        return jnp.asarray(self.magnitude, jnp.float32) / norm

    def materialize(self) -> Array:
        """The dense kernel ``(w + scale * A @ B).astype(dtype)`` (DoRA-scaled if it
        has a magnitude); ``w`` gets no gradient."""
        dense = self.frozen_in(jnp.float32) + self.update()
        if self.magnitude is not None:
            dense = dense * self.per_output(self.dora_ratio(), {"s", "o"})
        return dense.astype(self.dtype)

    def per_output(self, x: Array, keep: set[str]) -> Array:
        """Arranges a ``(*stack, *fan_out)`` array to broadcast against the current axes."""
        ns = self.n_stack
        present = [d for d, (k, _) in enumerate(self.roles) if k in keep]
        src = [
            self.roles[d][1] if self.roles[d][0] == "s" else ns + self.roles[d][1] for d in present
        ]
        x = jnp.transpose(x, src)
        shape = [1] * len(self.roles)
        for d in present:
            shape[d] = self.w.shape[d]
        return x.reshape(shape)

    def transpose(self, permutation: tuple[int, ...]) -> LoraView:
        w = (
            self.w.transpose(permutation)
            if isinstance(self.w, LazyKernel)
            else jnp.transpose(self.w, permutation)
        )
        return self.replace(w=w, roles=tuple(self.roles[p] for p in permutation))

    def reshape(self, new_sizes: tuple[int, ...]) -> LoraView | None:
        """The view of ``reshape(w, new_sizes)``, or None when the reshape mixes roles.

        A reshape that only splits or merges axes of one role, in their factor
        order (``(d, heads, head_dim) <-> (d, heads * head_dim)``), reshapes
        that factor (``b`` for fan-out axes, ``a`` for fan-in axes, and DoRA's
        magnitude with ``b``); size-1 axes of a role may be dropped, including
        a stacked one (``w[i]`` of a stack is a slice, then this). Anything
        else (merging fan-in with fan-out, reshaping stacked axes, inserting
        axes) returns None.

        Example:
          >>> from lora_jax import KernelLayout, LoraFactors
          >>> f = LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3, 5)), alpha=1.0,
          ...                 layout=KernelLayout("ioo"))
          >>> LoraView.of("w", jnp.ones((4, 3, 5)), f).reshape((4, 15)).b.shape
          (2, 15)
        """
        plan = _reshaped_roles(self.roles, self.shape, tuple(new_sizes))
        if plan is None:
            return None
        roles, sizes, dropped = plan
        ns, ex = self.n_stack, self.n_lead
        pre = tuple(np.shape(self.a)[:ex])
        stack = tuple(n for j, n in enumerate(np.shape(self.a)[ex : ex + ns]) if j not in dropped)
        r = np.shape(self.a)[-1]
        mag = self.magnitude
        return self.replace(
            w=(
                self.w.reshape(tuple(new_sizes))
                if isinstance(self.w, LazyKernel)
                else jnp.reshape(self.w, new_sizes)
            ),
            roles=roles,
            a=jnp.reshape(self.a, pre + stack + sizes["i"] + (r,)),
            b=jnp.reshape(self.b, pre + stack + (r,) + sizes["o"]),
            magnitude=None if mag is None else jnp.reshape(mag, stack + sizes["o"]),
        )

    def slice_stack(self, starts: list[Any], sizes: list[int], slicer: Any) -> LoraView | None:
        """The view of a slice that cuts only stacked axes (fan-in and fan-out whole).

        ``slicer(x, starts, sizes)`` slices an array (``lax.slice`` or
        ``lax.dynamic_slice``); ``starts`` and ``sizes`` are per current axis.
        The factors (and DoRA's magnitude) are cut along the same stacked
        axes. Returns None when a fan-in or fan-out axis is cut.
        """
        ns, ex = self.n_stack, self.n_lead
        f_starts: list[Any] = [0] * ns
        f_sizes = list(np.shape(self.a)[ex : ex + ns])
        for d, (kind, j) in enumerate(self.roles):
            if kind != "s":
                if sizes[d] != self.shape[d]:
                    return None
                continue
            f_starts[j], f_sizes[j] = starts[d], sizes[d]

        def cut(x: Any) -> Any:
            if x is None:
                return None
            pre, rest = list(np.shape(x)[:ex]), list(np.shape(x)[ex + ns :])
            return slicer(x, [0] * ex + f_starts + [0] * len(rest), pre + f_sizes + rest)

        w = self.w
        if isinstance(w, LazyKernel):  # cut the stored codes; else dequantize, then cut
            w = w.slice_stack(list(starts), list(sizes), slicer) or w.dense()
        if not isinstance(w, LazyKernel):
            w = slicer(w, list(starts), list(sizes))
        return self.replace(w=w, a=cut(self.a), b=cut(self.b), magnitude=cut(self.magnitude))

    def gather_stack(self, indices: Array, params: dict, gather: Any) -> LoraView | None:
        """The view of ``w[idx]``: a gather that picks whole kernels along one batch axis
        (each token's expert), or None for any other gather.

        ``gather(operand, indices, **params)`` binds the gather primitive. The
        factors (and their batch axes) are gathered with the same indices, so
        the result carries the indices' batch axes as new leading batch axes
        (``A[idx]``: ``(tokens, in, r)``), then the kernel's other batch axes.

        Example:
          >>> from lora_jax import KernelLayout, LoraFactors
          >>> f = LoraFactors(jnp.ones((4, 6, 2)), jnp.ones((4, 2, 5)), alpha=1.0,
          ...                 layout=KernelLayout("eio"))
          >>> view = LoraView.of("w", jnp.ones((4, 6, 5)), f)
          >>> idx = jnp.array([[0], [3], [3]])                    # (tokens, 1)
          >>> eqn = jax.make_jaxpr(lambda w: w[idx[:, 0]])(view.w).eqns[-1]   # the gather
          >>> g = view.gather_stack(idx, eqn.params, eqn.primitive.bind)
          >>> g.a.shape, g.roles
          ((3, 6, 2), (('s', 0), ('i', 0), ('o', 0)))
        """
        dn, sizes = params["dimension_numbers"], params["slice_sizes"]
        if (
            self.n_lead
            or self.magnitude is not None
            or tuple(getattr(dn, "operand_batching_dims", None) or ())
            or len(dn.collapsed_slice_dims) != 1
            or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)
            or np.shape(indices)[-1:] != (1,)
        ):
            return None
        (d,) = dn.collapsed_slice_dims
        kind, k = self.roles[d]
        if kind != "s" or any(
            sizes[n] != (1 if n == d else self.shape[n]) for n in range(len(self.roles))
        ):
            return None
        batch = np.ndim(indices) - 1
        w = self.w.dense() if isinstance(self.w, LazyKernel) else self.w  # codes: whole stack
        w = gather(w, indices, **params)

        def cut(x: Array) -> Array:
            x_sizes = tuple(1 if n == k else m for n, m in enumerate(np.shape(x)))
            x_dn = jax.lax.GatherDimensionNumbers(
                offset_dims=tuple(range(batch, batch + np.ndim(x) - 1)),
                collapsed_slice_dims=(k,),
                start_index_map=(k,),
            )
            return gather(x, indices, **dict(params, dimension_numbers=x_dn, slice_sizes=x_sizes))

        kept = [role for n, role in enumerate(self.roles) if n != d]
        kept_iter = iter(kept)
        renumber = lambda r: ("s", batch + r[1] - (r[1] > k)) if r[0] == "s" else r  # noqa: E731
        roles, new = [], 0
        for n in range(np.ndim(w)):
            if n in dn.offset_dims:
                roles.append(renumber(next(kept_iter)))
            else:
                roles.append(("s", new))
                new += 1
        return self.replace(w=w, a=cut(self.a), b=cut(self.b), roles=tuple(roles))

    def factor_pair(self, contracted: str) -> tuple[Array, Array]:
        """Factors ordered so that the first one meets the contracted side.

        Returns ``(fa, fb)`` with ``fa: (*lead, *stack, *contracted_axes, r)`` and
        ``fb: (*lead, *stack, r, *free_axes)``. Contracting the fan-out side
        (``x @ W.T``, as in Flax's ``Embed.attend``) uses ``B^T`` first and
        ``A^T`` second.
        """
        if contracted == "i":
            return self.a, self.b
        ns = self.n_stack + self.n_lead
        return jnp.moveaxis(self.b, ns, -1), jnp.moveaxis(self.a, -1, ns)

    def sliced(self, axis_role: Role) -> LoraView:
        """The view with stacked axis ``axis_role`` moved to the front of ``a``, ``b``
        (and the magnitude), and the roles of one slice: scanned by ``lax.scan``,
        it yields the per-layer views."""
        _, j = axis_role
        ex = self.n_lead
        move = lambda x: None if x is None else jnp.moveaxis(x, ex + j, 0)  # noqa: E731
        w = self.w
        if isinstance(w, LazyKernel):  # one layer's codes per scan step, else dense
            w = w.scanned() or w.dense()
        return self.replace(
            w=w,
            a=move(self.a),
            b=move(self.b),
            magnitude=move(self.magnitude),
            roles=drop_stack_role(self.roles, axis_role),
        )


def roles_of(axes: str) -> tuple[Role, ...]:
    """The roles of a kernel stored in layout order: each letter numbered among its kind.

    The view carries every batch axis of the layout (stacked ``s`` and experts
    ``e``, :attr:`~lora_jax.KernelLayout.batch_axes`) as a stacked role,
    numbered in factor order (``s`` axes first): each index is an independent
    kernel with its own factors either way, so every layout operation and rule
    treats them alike.

    Example:
      >>> roles_of("sioo")
      (('s', 0), ('i', 0), ('o', 0), ('o', 1))
      >>> roles_of("seio")
      (('s', 0), ('s', 1), ('i', 0), ('o', 0))
    """
    batch = batch_axes_of(axes)
    return tuple(
        ("s", batch.index(n)) if letter in BATCH_LETTERS else (letter, axes[:n].count(letter))
        for n, letter in enumerate(axes)
    )


def reshape_blocks(
    old: tuple[int, ...], new: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pairs of (old axes, new axes) groups with equal sizes, or None.

    Size-1 old axes may form a group with no new axes; a group with no old
    axes (an inserted axis) or a zero-size axis gives None. ``implicit``
    (:meth:`LoraView.reshape`) and ``infer_layouts`` follow a reshape of a
    kernel through these groups alike.

    Example:
      >>> reshape_blocks((4, 3, 5), (4, 15))
      [([0], [0]), ([1, 2], [1])]
      >>> reshape_blocks((4, 3), (4, 3, 1)) is None
      True
    """
    if math.prod(old) != math.prod(new) or 0 in old:
        return None
    blocks, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i == len(old):
            return None
        bi, bj, po, pn = [i], [], old[i], 1
        i += 1
        if j < len(new) and not (po == 1 and new[j] != 1):
            bj.append(j)
            pn = new[j]
            j += 1
        while po != pn:
            if po < pn:
                if i == len(old):
                    return None
                bi.append(i)
                po *= old[i]
                i += 1
            else:
                if j == len(new):
                    return None
                bj.append(j)
                pn *= new[j]
                j += 1
        blocks.append((bi, bj))
    return blocks


#: ``(start role index, new sizes, new axes)`` of one fan-in or fan-out block of a reshape.
Span = tuple[int, tuple[int, ...], list[int]]


def _reshaped_roles(
    roles: tuple[Role, ...], old: tuple[int, ...], new_sizes: tuple[int, ...]
) -> tuple[tuple[Role, ...], dict[str, tuple[int, ...]], list[int]] | None:
    """``(new roles, {"i": fan-in sizes, "o": fan-out sizes}, dropped stacked axes)`` of a
    kernel with ``roles`` reshaped from ``old`` to ``new_sizes``; None when it mixes roles.

    Example:
      >>> _reshaped_roles(roles_of("ioo"), (4, 3, 5), (4, 15))
      ((('i', 0), ('o', 0)), {'i': (4,), 'o': (15,)}, [])
    """
    blocks = reshape_blocks(old, new_sizes)
    if blocks is None:
        return None
    found = _role_spans(roles, blocks, new_sizes)
    if found is None:
        return None
    spans, dropped = found
    out: list[Any] = [None] * len(new_sizes)
    for old_axes, new in blocks:
        kind, j = roles[old_axes[0]]
        if kind == "s" and new:
            out[new[0]] = ("s", j - sum(d < j for d in dropped))
    sizes: dict[Any, Any] = {}
    for kind, kind_spans in spans.items():
        start, shape = 0, list[Any]()
        for _, block_sizes, new in sorted(kind_spans, key=lambda t: t[0]):
            for t, d in enumerate(new):
                out[d] = (kind, start + t)
            start += len(new)
            shape.extend(block_sizes)
        sizes[kind] = tuple(shape)
    return tuple(out), sizes, dropped


def _role_spans(
    roles: tuple[Role, ...], blocks: list[tuple[list[int], list[int]]], new_sizes: tuple[int, ...]
) -> tuple[dict[str, list[Span]], list[int]] | None:
    """The fan-in and fan-out blocks of a reshape, and the size-1 stacked axes it drops;
    None when a block mixes roles, reorders a role's axes or reshapes a stacked axis."""
    spans: dict[str, list[Span]] = {"i": [], "o": []}
    dropped = []
    for old, new in blocks:
        kinds = {roles[d][0] for d in old}
        if len(kinds) != 1:
            return None
        (kind,) = kinds
        idx = [roles[d][1] for d in old]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            return None
        if kind == "s":
            if len(old) != 1 or len(new) > 1:
                return None
            if not new:
                dropped.append(idx[0])
            continue
        spans[kind].append((idx[0], tuple(new_sizes[d] for d in new), new))
    return spans, dropped


def drop_stack_role(roles: tuple[Role, ...], removed: Role) -> tuple[Role, ...]:
    """Roles after stacked axis ``removed`` has been sliced away."""
    _, j = removed
    return tuple((k, i - 1 if k == "s" and i > j else i) for k, i in roles if (k, i) != removed)


jax.tree_util.register_dataclass(
    LoraView,
    data_fields=["w", "a", "b", "magnitude"],
    meta_fields=["roles", "scale", "dtype", "path"],
)
