"""Leaf paths: how lora_jax names the leaves of any params pytree.

A leaf's path is its key path joined with ``'/'``. Dict keys, attribute names
and sequence indices all render as plain text, so a Flax linen tree gives
``params/Dense_0/kernel`` and a Flax NNX ``nnx.State`` gives ``linear/kernel``
(the ``.value`` attribute of an NNX variable is dropped, since it names no
module). Target patterns are regular expressions matched in full against these
strings.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

KeyPath = Sequence[Any]

# Pytree node types that lora_jax's tree walks treat as one leaf of the params
# (a quantized kernel is a pytree of codes and scales, but one kernel to LoRA).
_BASE_LEAF_TYPES: list[type] = []


def register_base_leaf(cls: type) -> type:
    """Makes :func:`leaves_with_paths` treat every ``cls`` node as one leaf.

    Example:
      >>> class Box:
      ...     pass
      >>> register_base_leaf(Box) is Box
      True
    """
    if cls not in _BASE_LEAF_TYPES:
        _BASE_LEAF_TYPES.append(cls)
    return cls


def is_base_leaf(x: Any) -> bool:
    """True for a node of a type registered with :func:`register_base_leaf`.

    Example:
      >>> is_base_leaf(1.0)
      False
    """
    return isinstance(x, tuple(_BASE_LEAF_TYPES))


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

    Nodes of a registered base-leaf type (a quantized kernel) are leaves.

    Example:
      >>> leaves_with_paths({"a": {"b": 1}})[0]
      [('a/b', 1)]
    """
    def leaf(x: Any) -> bool:
        return is_base_leaf(x) or (is_leaf is not None and bool(is_leaf(x)))

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef
