"""Kernel layouts: which axes of a kernel are stacked, experts, fan-in and fan-out.

A :class:`KernelLayout` labels every axis of a kernel with one letter:

* ``s`` -- a stacked axis (the layer axis of ``nn.scan`` / ``nnx.vmap``); each
  index along it is an independent kernel with its own factors;
* ``e`` -- an experts axis (a mixture-of-experts kernel ``(E, in, out)``); each
  index along it is also an independent kernel with its own factors;
* ``i`` -- a fan-in axis (contracted with the input);
* ``o`` -- a fan-out axis (produces the output).

``s`` and ``e`` axes together are the kernel's *batch* axes
(:attr:`KernelLayout.batch_axes`, stacked first, then experts): this module is
the one place that says so, and everything that shapes, multiplies, shards or
quantizes factors treats them alike. They differ only where layers are meant:
a layer selection (``LoraConfig(layers=...)``) and the PEFT ``layers.N.``
module names cut the first ``s`` axis, while an ``e`` axis stays inside one
tensor (PEFT's ``target_parameters``); ``scan`` and stacked slices (``w[i]``)
work on either. A model uses all experts of an ``e`` axis in one operation
(``ragged_dot``, an einsum over experts, a gather per token); it uses the
layers of an ``s`` axis one at a time.

For a kernel ``W`` of shape ``(*batch, *fan_in, *fan_out)`` (after moving the
axes into that order, ``batch`` = stacked then experts) the factors are

* ``A``: ``(*batch, *fan_in, r)``
* ``B``: ``(*batch, r, *fan_out)``

so ``A @ B`` contracted over ``r`` has the kernel's shape. Common layouts:

==================================  ===============  =====================
kernel                              shape            layout
==================================  ===============  =====================
``nn.Dense``                        ``(in, out)``    ``"io"``
``DenseGeneral`` q/k/v projection   ``(d, h, k)``    ``"ioo"``
``DenseGeneral`` output projection  ``(h, k, d)``    ``"iio"``
``nn.Conv`` 2-D                     ``(kh, kw, in, out)``  ``"iiio"`` (conv)
``nn.Embed``                        ``(vocab, dim)`` ``"io"`` (embed)
scanned ``nn.Dense``                ``(layers, in, out)``  ``"sio"``
mixture-of-experts kernel           ``(E, in, out)``  ``"eio"``
scanned experts                     ``(layers, E, in, out)``  ``"seio"``
==================================  ===============  =====================

The ``kind`` (``dense``, ``conv`` or ``embed``) does not change the factor
shapes; it chooses the init (an embedding's ``A`` is the zero factor, as in
PEFT) and how adapter files name the factors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from lora_jax._errors import LoraLayoutError

KINDS = ("dense", "conv", "embed")
#: The letters of batch axes: every index along one is an independent kernel with its own
#: factors (stacked layers ``s``, experts ``e``). Factor order puts ``s`` before ``e``.
BATCH_LETTERS = "se"


def batch_axes_of(axes: str) -> tuple[int, ...]:
    """The batch axes of an axes string in factor order: stacked ``s``, then experts ``e``.

    Example:
      >>> batch_axes_of("esio")
      (1, 0)
    """
    return tuple(n for letter in BATCH_LETTERS for n, c in enumerate(axes) if c == letter)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Axis roles of one kernel.

    Attributes:
      axes: one letter per kernel axis, each ``'s'``, ``'e'``, ``'i'`` or ``'o'``;
        at least one ``'i'`` and one ``'o'``.
      kind: ``'dense'``, ``'conv'`` or ``'embed'``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> lj.KernelLayout("iio").factor_shapes((8, 64, 512), rank=4)
      ((8, 64, 4), (4, 512))
      >>> lj.KernelLayout("seio").factor_shapes((2, 8, 16, 32), rank=4)   # layers, experts
      ((2, 8, 16, 4), (2, 8, 4, 32))
    """

    axes: str
    kind: str = "dense"

    def __post_init__(self):
        if not isinstance(self.axes, str) or set(self.axes) - set("seio"):
            raise LoraLayoutError(
                "KernelLayout axes must be a string of 's', 'e', 'i', 'o' letters, got "
                f"{self.axes!r}"
            )
        if "i" not in self.axes or "o" not in self.axes:
            raise LoraLayoutError(
                f"KernelLayout {self.axes!r} needs at least one fan-in axis 'i' and one "
                "fan-out axis 'o'"
            )
        if self.kind not in KINDS:
            raise LoraLayoutError(f"KernelLayout kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def ndim(self) -> int:
        return len(self.axes)

    def _axes_of(self, letter: str) -> tuple[int, ...]:
        return tuple(n for n, c in enumerate(self.axes) if c == letter)

    @property
    def stack_axes(self) -> tuple[int, ...]:
        """The stacked (layer) axes ``s``: what a layer selection cuts."""
        return self._axes_of("s")

    @property
    def expert_axes(self) -> tuple[int, ...]:
        """The experts axes ``e``."""
        return self._axes_of("e")

    @property
    def batch_axes(self) -> tuple[int, ...]:
        """The axes of independent kernels, in factor order: stacked ``s``, then experts
        ``e``. The factors carry exactly these leading axes."""
        return batch_axes_of(self.axes)

    @property
    def in_axes(self) -> tuple[int, ...]:
        return self._axes_of("i")

    @property
    def out_axes(self) -> tuple[int, ...]:
        return self._axes_of("o")

    @property
    def permutation(self) -> tuple[int, ...]:
        """Kernel axes in factor order: ``batch + fan_in + fan_out`` (batch: ``s``, then ``e``)."""
        return self.batch_axes + self.in_axes + self.out_axes

    def check_shape(self, shape: Sequence[int], path: str = "<kernel>") -> None:
        """Raises :class:`LoraLayoutError` unless ``shape`` has one axis per letter."""
        if len(shape) != self.ndim:
            raise LoraLayoutError(
                f"leaf {path!r}: layout {self.axes!r} describes a {self.ndim}-D kernel, "
                f"but the kernel has shape {tuple(shape)}"
            )

    def fan_in(self, shape: Sequence[int]) -> int:
        """Number of input features of one kernel of the batch (product of ``i`` axes)."""
        return math.prod(shape[a] for a in self.in_axes)

    def fan_out(self, shape: Sequence[int]) -> int:
        """Number of output features of one kernel of the batch (product of ``o`` axes)."""
        return math.prod(shape[a] for a in self.out_axes)

    def factor_shapes(
        self, shape: Sequence[int], rank: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``A`` ``(*batch, *fan_in, r)`` and ``B`` ``(*batch, r, *fan_out)``."""
        self.check_shape(shape)
        batch = tuple(shape[a] for a in self.batch_axes)
        fan_in = tuple(shape[a] for a in self.in_axes)
        fan_out = tuple(shape[a] for a in self.out_axes)
        return batch + fan_in + (rank,), batch + (rank,) + fan_out


def default_layout(path: str, shape: Sequence[int]) -> KernelLayout:
    """The layout lora_jax assumes when none is given or traced.

    Only 2-D kernels are unambiguous: ``(in, out)`` Dense kernels, and
    ``(vocab, dim)`` embedding tables when the leaf is named ``embedding``
    (Flax's name). Anything with more axes could be a DenseGeneral kernel, a
    conv kernel, a scan-stacked kernel or an experts kernel, so it raises
    :class:`LoraLayoutError` asking for an explicit layout (config
    ``layouts=``) or a traced one (:func:`lora_jax.infer_layouts`).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> lj.advanced.default_layout("params/Embed_0/embedding", (100, 16))
      KernelLayout(axes='io', kind='embed')
    """
    if len(shape) == 2:
        kind = "embed" if path.rsplit("/", 1)[-1] == "embedding" else "dense"
        return KernelLayout("io", kind)
    raise LoraLayoutError(
        f"leaf {path!r} has shape {tuple(shape)}: the fan-in / fan-out split of a "
        f"{len(shape)}-D kernel is ambiguous (DenseGeneral, conv, scan-stacked and experts "
        "kernels all look alike). Give it explicitly, e.g. LoraConfig(layouts={pattern: "
        "KernelLayout('iio')}) or 'eio' for (experts, in, out), or trace it with lora_jax.infer_layouts(fn, params, *args)."
    )
