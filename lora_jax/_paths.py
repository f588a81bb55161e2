"""Leaf paths: how lora_jax names the leaves of any params pytree.

A leaf's path is its key path joined with ``'/'``. Dict keys, attribute names
and sequence indices all render as plain text, so a Flax linen tree gives
``params/Dense_0/kernel`` and a Flax NNX ``nnx.State`` gives ``linear/kernel``
(the ``.value`` attribute of an NNX variable is dropped, since it names no
module). Target patterns are regular expressions matched in full against these
strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

KeyPath = Sequence[Any]


class BaseLeaf:
    """Marker base class: a pytree node type that stands for one leaf of the params.

    A quantized kernel is a pytree of codes and scales to JAX but one kernel to
    LoRA. A type declares this by subclassing ``BaseLeaf`` (no registry, no
    import-order dependence): every lora_jax tree walk then treats each of its
    instances as one leaf with the kernel's ``shape`` and ``dtype``.

    Example:
      >>> class Box(BaseLeaf):
      ...     shape, dtype = (2, 3), "float32"
      >>> is_base_leaf(Box()), is_base_leaf(1.0)
      (True, False)
    """

    __slots__ = ()


def is_base_leaf(x: Any) -> bool:
    """True for an instance of a :class:`BaseLeaf` subclass (a quantized kernel).

    Example:
      >>> is_base_leaf(1.0)
      False
    """
    return isinstance(x, BaseLeaf)


def key_name(key: Any) -> str:
    """Returns the text of one key-path entry.

    Example:
      >>> key_name(jax.tree_util.DictKey("kernel"))
      'kernel'
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: KeyPath) -> str:
    """Joins a JAX key path into a ``'/'``-separated leaf path.

    A trailing ``GetAttrKey('value')`` (the payload of an NNX variable) is
    dropped.

    Example:
      >>> path_str((jax.tree_util.DictKey("params"), jax.tree_util.DictKey("w")))
      'params/w'
    """
    keys = list(key_path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(key_name(k) for k in keys)


def leaves_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Flattens ``tree`` into ``[(path, leaf), ...]`` and its treedef.

    Nodes of a :class:`BaseLeaf` type (a quantized kernel) are leaves.

    Example:
      >>> leaves_with_paths({"a": {"b": 1}})[0]
      [('a/b', 1)]
    """

    def leaf(x: Any) -> bool:
        return is_base_leaf(x) or (is_leaf is not None and bool(is_leaf(x)))

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def unshared(tree: Any) -> Any:
    """``tree`` rebuilt around the same leaves: every container new, no array copied.

    A Flax NNX ``State`` from ``nnx.split(model)`` holds the module's own
    ``Variable`` objects, so ``nnx.update(model, ...)`` would also change any
    tree that still holds them. Every lora_jax function that returns a base
    passes it through here: what it returns shares no ``Variable`` (nor dict)
    with its input, or with a live module.

    Example:
      >>> params = {"w": jax.numpy.ones(2)}
      >>> out = unshared(params)
      >>> out is params, out["w"] is params["w"]
      (False, True)
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_base_leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)
