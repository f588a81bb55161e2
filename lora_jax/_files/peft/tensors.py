"""PyTorch's tensor layouts for PEFT LoRA factors, both ways, one module at a time.

==========  =====================================  ==================================
kind        lora_jax factors (one layer)           PEFT tensors
==========  =====================================  ==================================
``dense``   ``a (*fan_in, r)``, ``b (r, *fan_out)``  ``lora_A.weight (r, in)``,
                                                    ``lora_B.weight (out, r)``; N-D
                                                    fan-in / fan-out flattened
``embed``   ``a (vocab, r)``, ``b (r, dim)``         ``lora_embedding_A (r, vocab)``,
                                                    ``lora_embedding_B (dim, r)``
``conv``    ``a (*window, in, r)``, ``b (r, out)``   ``lora_A.weight (r, in, *window)``,
                                                    ``lora_B.weight (out, r, 1, ..)``
DoRA        ``magnitude (*fan_out)``                ``lora_magnitude_vector``: ``(out,)``
                                                    (conv ``(1, out, 1, ..)``)
==========  =====================================  ==================================

:func:`torch_tensors` goes from a kernel's :class:`~lora_jax.LoraFactors` to
one dict of PEFT tensors per stacked layer; :func:`peft_module` goes from one
module's PEFT tensors to a :class:`PeftModule` whose factors are in
lora_jax's orientation (fan-in axes kept apart only for convs: a Linear's
``in`` is one axis until the Flax kernel's shape splits it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lora_jax._delta import LoraFactors
from lora_jax._errors import LoraFileError, LoraStructureError
from lora_jax._files.safetensors_io import to_numpy
from lora_jax._layout import KernelLayout

PEFT_PREFIX = "base_model.model."
# (key suffix, role, embedding?) -- the keys current PEFT writes (adapter name removed).
KEY_SUFFIXES = (
    (".lora_A.weight", "A", False),
    (".lora_B.weight", "B", False),
    (".lora_embedding_A", "A", True),
    (".lora_embedding_B", "B", True),
    (".lora_magnitude_vector.weight", "M", False),
    (".lora_magnitude_vector", "M", False),
)

Part = tuple[str, np.ndarray, bool]
"""One PEFT tensor of a module: ``(safetensors key, array, is an embedding factor)``."""


# --------------------------------------------------------------------------- lora_jax -> PyTorch


def check_exportable(path: str, layout: KernelLayout) -> None:
    """Raises :class:`LoraStructureError` if PyTorch has no module for a kernel of this layout."""
    unstacked = layout.axes.replace("s", "")
    if layout.kind == "embed" and unstacked != "io":
        raise LoraStructureError(
            f"leaf {path!r}: an embedding exports as torch nn.Embedding, which needs one fan-in "
            f"(vocab) and one fan-out (dim) axis; layout is {layout.axes!r}"
        )
    if layout.kind == "conv" and not re.fullmatch(r"i{2,}o", unstacked):
        raise LoraStructureError(
            f"leaf {path!r}: a conv kernel exports as torch (out, in, *window) only from Flax's "
            f"(*window, in, out) layout ('i...io' after stacked axes); layout is {layout.axes!r}"
        )


def torch_layer(
    kind: str, a: np.ndarray, b: np.ndarray, m: np.ndarray | None
) -> dict[str, np.ndarray]:
    """One layer's factors as PEFT tensors ``{suffix: array}`` (see the module's table).

    Example:
      >>> t = torch_layer("dense", np.ones((4, 3, 2)), np.ones((2, 5)), None)  # (d, h, r), (r, o)
      >>> {k: v.shape for k, v in t.items()}
      {'lora_A.weight': (2, 12), 'lora_B.weight': (5, 2)}
    """
    r = a.shape[-1]
    if kind == "embed":
        t = {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
        if m is not None:
            t["lora_magnitude_vector"] = m.reshape(-1)
    elif kind == "conv":
        nw = a.ndim - 2  # window axes before (in, r)
        t = {
            "lora_A.weight": a.transpose((nw + 1, nw) + tuple(range(nw))),  # (r, in, *win)
            "lora_B.weight": b.T.reshape((b.shape[1], r) + (1,) * nw),  # (out, r, 1..)
        }
        if m is not None:
            t["lora_magnitude_vector"] = m.reshape((1, -1) + (1,) * nw)
    else:  # dense, any number of fan-in / fan-out axes: flattened to nn.Linear
        t = {"lora_A.weight": a.reshape(-1, r).T, "lora_B.weight": b.reshape(r, -1).T}
        if m is not None:
            t["lora_magnitude_vector"] = m.reshape(-1)
    return {k: to_numpy(v) for k, v in t.items()}


def torch_tensors(path: str, f: LoraFactors) -> list[tuple[tuple[int, ...], dict[str, np.ndarray]]]:
    """Per stacked layer: ``(layer index, {PEFT tensor suffix: array})`` in PyTorch's layouts.

    A layer selection's layers keep their index in the full stack.
    """
    check_exportable(path, f.layout)
    n = len(f.layout.stack_axes)
    a, b = to_numpy(f.a), to_numpy(f.b)
    m = None if f.magnitude is None else to_numpy(f.magnitude)
    out = []
    for idx in np.ndindex(*a.shape[:n]):
        tensors = torch_layer(f.layout.kind, a[idx], b[idx], None if m is None else m[idx])
        index = tuple(int(i) for i in idx)
        if f.layers is not None:  # only these layers of the first stacked axis are stored
            index = (f.layers.indices[index[0]],) + index[1:]
        out.append((index, tensors))
    return out


# --------------------------------------------------------------------------- PyTorch -> lora_jax


@dataclasses.dataclass
class PeftModule:
    """One adapted PyTorch module of a PEFT file, with factors in lora_jax's orientation.

    ``a: (*fan_in, r)`` with fan_in ``(in,)`` (Linear), ``(vocab,)`` (Embedding)
    or ``(*window, in)`` (conv); ``b: (r, out)``; ``magnitude: (out,)`` or None.
    """

    name: str
    kind: str
    a: np.ndarray
    b: np.ndarray
    magnitude: np.ndarray | None
    rank: int
    alpha: float
    keys: tuple[str, ...]
    torch_shape: tuple[int, ...]

    @property
    def fan_in(self) -> tuple[int, ...]:
        """The fan-in axes of the module's weight, as ``a`` holds them."""
        return tuple(self.a.shape[:-1])

    @property
    def fan_out(self) -> int:
        """The module's output features."""
        return int(self.b.shape[1])


def split_key(key: str) -> tuple[str, str, bool] | None:
    """``(module, role, embedding?)`` of a PEFT tensor key (role ``A``, ``B`` or ``M``), or None.

    Example:
      >>> split_key("base_model.model.enc.fc1.lora_A.weight")
      ('enc.fc1', 'A', False)
    """
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    for suffix, role, embed in KEY_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role, embed
    return None


def _pair(weights: Path, name: str, parts: Mapping[str, Part]) -> tuple[Part, Part]:
    """The module's ``A`` and ``B`` tensors, checked to be one LoRA pair."""
    for role in ("A", "B"):
        if role not in parts:
            other = next(iter(parts.values()))[0]
            raise LoraFileError(
                f"{weights}: module {name!r} has {other!r} but no lora_{role} tensor"
            )
    (ka, A, emb_a), (kb, B, emb_b) = parts["A"], parts["B"]
    if emb_a != emb_b:
        raise LoraFileError(f"{weights}: {ka!r} and {kb!r} mix embedding and Linear/conv factors")
    if A.ndim < 2 or B.ndim != A.ndim:
        raise LoraFileError(
            f"{weights}: tensors {ka!r} {A.shape} and {kb!r} {B.shape} are not a LoRA pair"
        )
    if B.shape[1] != A.shape[0]:
        raise LoraFileError(
            f"{weights}: tensor {kb!r} has shape {B.shape}; its rank axis (1) should be "
            f"{A.shape[0]} like {ka!r} {A.shape}"
        )
    return parts["A"], parts["B"]


def from_torch(
    weights: Path, A_part: Part, B_part: Part
) -> tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(kind, a (*fan_in, r), b (r, out), torch weight shape)`` of a checked PEFT pair."""
    (ka, A, embed), (kb, B, _) = A_part, B_part
    r = A.shape[0]
    if embed:
        if A.ndim != 2:
            raise LoraFileError(f"{weights}: tensor {ka!r} should be 2-D (r, vocab), got {A.shape}")
        return "embed", A.T, B.T, (A.shape[1], B.shape[0])
    if A.ndim == 2:
        return "dense", A.T, B.T, (B.shape[0], A.shape[1])
    if any(d != 1 for d in B.shape[2:]):
        raise LoraFileError(
            f"{weights}: tensor {kb!r} has shape {B.shape}; PEFT's conv lora_B is a 1x1 conv "
            "(out, r, 1, ...)"
        )
    nw = A.ndim - 2
    a = A.transpose(tuple(range(2, 2 + nw)) + (1, 0))  # (*win, in, r)
    return "conv", a, B.reshape(B.shape[0], r).T, (B.shape[0], A.shape[1]) + tuple(A.shape[2:])


def _magnitude(weights: Path, part: Part, kind: str, fan_out: int) -> np.ndarray:
    """A DoRA magnitude vector as ``(out,)``."""
    km, M, _ = part
    if M.size != fan_out or (M.ndim > 1 and M.shape[1 if kind == "conv" else 0] != M.size):
        raise LoraFileError(
            f"{weights}: tensor {km!r} has shape {M.shape}; expected {fan_out} magnitudes "
            "(one per output feature)"
        )
    return M.reshape(-1)


def peft_module(weights: Path, name: str, parts: Mapping[str, Part], alpha: float) -> PeftModule:
    """One module's PEFT tensors (``{role: part}``, roles ``A``, ``B``, ``M``) as a PeftModule.

    Example:
      >>> parts = {"A": ("fc.lora_A.weight", np.ones((2, 6)), False),
      ...          "B": ("fc.lora_B.weight", np.ones((4, 2)), False)}
      >>> m = peft_module(Path("adapter_model.safetensors"), "fc", parts, alpha=8.0)
      >>> m.kind, m.a.shape, m.b.shape, m.rank, m.torch_shape
      ('dense', (6, 2), (2, 4), 2, (4, 6))
    """
    A_part, B_part = _pair(weights, name, parts)
    kind, a, b, torch_shape = from_torch(weights, A_part, B_part)
    magnitude = None if "M" not in parts else _magnitude(weights, parts["M"], kind, b.shape[1])
    keys = tuple(parts[k][0] for k in ("A", "B", "M") if k in parts)
    return PeftModule(
        name,
        kind,
        np.ascontiguousarray(a),
        np.ascontiguousarray(b),
        magnitude,
        int(a.shape[-1]),
        float(alpha),
        keys,
        tuple(int(d) for d in torch_shape),
    )


__all__ = [
    "PEFT_PREFIX",
    "PeftModule",
    "check_exportable",
    "from_torch",
    "peft_module",
    "split_key",
    "torch_layer",
    "torch_tensors",
]
