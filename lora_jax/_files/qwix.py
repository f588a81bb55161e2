"""qwix's LoRA state <-> a lora_jax delta, exactly (the values are only reshaped).

qwix (which tunix and MaxText use to add LoRA) stores a kernel ``<name>``'s factors
beside it as ``<name>_lora_a`` and ``<name>_lora_b`` (``nnx.LoRAParam`` in NNX,
``params`` entries in linen) and scales their product by ``alpha / rank``. Its
shapes, read from qwix 0.1.8's ``qwix/_src/providers/lora.py``:

==============  ======================================  ==========================
kernel used by  ``<name>_lora_a``                       ``<name>_lora_b``
==============  ======================================  ==========================
``dot_general``  ``(*batch, prod(contracted), r)``      ``(*batch, r, prod(rest))``
``einsum``      ``(*axes shared with the input, r)``    ``(r, *other axes)``
conv            ``(*window, in, r)``                    ``(r, out)``
==============  ======================================  ==========================

with the kernel's axes in its own order. lora_jax holds ``A (*stack, *fan_in, r)``
and ``B (*stack, r, *fan_out)`` (also in the kernel's order), so each qwix factor is
lora_jax's reshaped: the same values in the same order. Two qwix forms have no
lora_jax equivalent and are refused with the leaf named: an ``einsum`` batch axis
(qwix puts it in ``A`` only; lora_jax's stacked axis is in both factors), and a
layer axis that ``nn.scan`` inserts in the middle of the factors (MaxText's
``param_scan_axis=1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import KernelLayout, LoraFactors, LoraStructureError
from lora_jax.advanced import is_delta_leaf, is_quantized, leaves_with_paths, path_str

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def from_qwix(
    lora_state: Any, base: Any, *, alpha: float, layouts: Mapping[str, KernelLayout] | None = None
) -> Any:
    """A lora_jax delta aligned with ``base`` from a qwix LoRA state, exactly.

    Args:
      lora_state: the qwix LoRA state: ``nnx.state(model, nnx.LoRAParam)`` of a
        qwix-adapted NNX model (what tunix's ``save_only_lora_params`` writes), a
        linen ``params`` tree, or a flat ``{path: array}`` dict; its leaf paths
        end in ``<name>_lora_a`` / ``<name>_lora_b``.
      base: the plain model's params (e.g. ``nnx.split(model)[1]`` of the model
        without qwix): the delta is aligned with it, and ``<path>_lora_a`` adapts
        its leaf ``<path>``.
      alpha: qwix's ``LoraRule.alpha`` (the scale is ``alpha / rank``).
      layouts: ``{path: KernelLayout}`` for kernels of more than two axes (from
        :func:`~lora_jax.infer_layouts`); a 2-D kernel defaults to ``"io"``.

    Returns:
      the delta: :class:`~lora_jax.LoraFactors` at each adapted kernel, ``None``
      elsewhere; ``lj.implicit(f)(base, delta, x)`` equals the qwix model's output.

    Raises:
      LoraStructureError: a factor pair names no leaf of ``base``, lacks its
        partner, or does not fit the kernel's layout (message names the leaf).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax import nnx as lora_nnx
      >>> base = {"q": {"w": jnp.ones((8, 2, 4))}}                   # einsum 'btd,dnh->btnh'
      >>> qwix = {"q/w_lora_a": jnp.ones((8, 3)), "q/w_lora_b": jnp.ones((3, 2, 4))}
      >>> d = lora_nnx.from_qwix(qwix, base, alpha=6.0, layouts={"q/w": lj.KernelLayout("ioo")})
      >>> d["q"]["w"].a.shape, d["q"]["w"].b.shape, d["q"]["w"].scale
      ((8, 3), (3, 2, 4), 2.0)
    """
    pairs = _pairs(lora_state)
    leaves, treedef = leaves_with_paths(base)
    shapes = {path: tuple(np.shape(leaf)) for path, leaf in leaves}
    entries = {}
    for kernel, (a, b) in pairs.items():
        if kernel not in shapes:
            raise LoraStructureError(
                f"qwix factors {kernel}{SUFFIX_A} / {SUFFIX_B} adapt no leaf {kernel!r} of the "
                f"base (its leaves include {sorted(shapes)[:6]})"
            )
        shape = shapes[kernel]
        layout = _layout(kernel, shape, layouts)
        a_shape, b_shape = layout.factor_shapes(shape, int(np.shape(a)[-1]))
        if np.size(a) != np.prod(a_shape) or np.size(b) != np.prod(b_shape):
            raise LoraStructureError(
                f"leaf {kernel!r}: qwix factors {np.shape(a)}, {np.shape(b)} do not fit kernel "
                f"{shape} with layout {layout.axes!r} (lora_jax's A {a_shape}, B {b_shape}); an "
                "einsum batch axis or a scan axis inside the factors has no lora_jax equivalent"
            )
        entries[kernel] = LoraFactors(
            jnp.reshape(a, a_shape), jnp.reshape(b, b_shape), alpha=float(alpha), layout=layout
        )
    return jax.tree_util.tree_unflatten(treedef, [entries.get(path) for path, _ in leaves])


def to_qwix(delta: Any, like: Any = None) -> Any:
    """qwix's LoRA state from a delta, exactly: the inverse of :func:`from_qwix`.

    Args:
      delta: a lora_jax delta of plain LoRA factors (scale ``alpha / r``).
      like: optional qwix LoRA state to fill (``nnx.state(qwix_model,
        nnx.LoRAParam)`` or a linen params tree): the result has its structure,
        shapes and dtypes (``nnx.update(qwix_model, result)`` loads it). Without
        it, a flat ``{"<path>_lora_a": A, "<path>_lora_b": B}`` dict in lora_jax's
        shapes (which are qwix's for ``einsum``, conv and 2-D kernels).

    Raises:
      LoraStructureError: an entry is not plain LoRA (rsLoRA, DoRA, a layer
        selection, a leaf trained in full), ``like`` names a kernel the delta does
        not adapt (or misses one it does), or a factor does not fit ``like``'s shape.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax import nnx as lora_nnx
      >>> _, delta = lj.init_lora(jax.random.key(0), {"fc": {"kernel": jnp.ones((4, 3))}},
      ...                         lj.LoraConfig(targets=".*kernel", rank=2))
      >>> sorted((k, v.shape) for k, v in lora_nnx.to_qwix(delta).items())
      [('fc/kernel_lora_a', (4, 2)), ('fc/kernel_lora_b', (2, 3))]
    """
    flat = {}
    for path, entry in leaves_with_paths(delta, is_leaf=is_delta_leaf)[0]:
        if entry is None:
            continue
        if (
            not isinstance(entry, LoraFactors)
            or entry.rslora
            or entry.magnitude is not None
            or entry.layers is not None
            or entry.segments
        ):
            raise LoraStructureError(
                f"leaf {path!r}: qwix holds plain LoRA factors at scale alpha / rank only, not "
                f"{type(entry).__name__} with rsLoRA, DoRA, a layer selection or per-projection "
                "segments"
            )
        flat[path + SUFFIX_A], flat[path + SUFFIX_B] = entry.a, entry.b
    if like is None:
        return flat
    used = set()

    def fill(key_path, leaf):
        path = path_str(key_path)
        if path not in flat:
            raise LoraStructureError(f"qwix leaf {path!r} has no factor in the delta")
        value = flat[path]
        if np.size(value) != np.size(leaf):
            raise LoraStructureError(
                f"qwix leaf {path!r}: shape {np.shape(leaf)} does not fit the factor "
                f"{np.shape(value)}"
            )
        used.add(path)
        return jnp.reshape(value, np.shape(leaf)).astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fill, like, is_leaf=is_quantized)
    if used != set(flat):
        raise LoraStructureError(
            f"the delta adapts kernels the qwix state does not hold: {sorted(set(flat) - used)[:6]}"
        )
    return out


def _pairs(lora_state: Any) -> dict[str, tuple[Any, Any]]:
    """``{kernel path: (A, B)}`` from a tree whose leaf paths end in ``_lora_a`` / ``_lora_b``."""
    found: dict[str, dict[str, Any]] = {}
    for path, leaf in leaves_with_paths(lora_state)[0]:
        suffix = next((s for s in (SUFFIX_A, SUFFIX_B) if path.endswith(s)), None)
        if suffix is None:
            raise LoraStructureError(
                f"leaf {path!r} of the qwix LoRA state is neither <name>{SUFFIX_A} nor "
                f"<name>{SUFFIX_B}"
            )
        found.setdefault(path[: -len(suffix)], {})[suffix] = leaf
    for kernel, pair in found.items():
        if len(pair) != 2:
            have = next(iter(pair))
            lacks = SUFFIX_B if have == SUFFIX_A else SUFFIX_A
            raise LoraStructureError(
                f"the qwix LoRA state has {kernel}{have} but no {kernel}{lacks}"
            )
    return {kernel: (pair[SUFFIX_A], pair[SUFFIX_B]) for kernel, pair in found.items()}


def _layout(
    path: str, shape: tuple[int, ...], layouts: Mapping[str, KernelLayout] | None
) -> KernelLayout:
    if layouts is not None and path in layouts:
        return layouts[path]
    if len(shape) == 2:
        return KernelLayout("io")
    raise LoraStructureError(
        f"leaf {path!r}: kernel {shape} has more than two axes; give its layout "
        "(layouts={path: KernelLayout(...)}, e.g. from lj.infer_layouts)"
    )
