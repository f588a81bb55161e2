"""A :class:`~lora_jax.LoraConfig` as JSON and back (the ``config`` key of a lora_jax adapter file).

Example:
  >>> cfg = LoraConfig(targets=".*kernel", rank=4, layouts={".*q": "ioo"})
  >>> obj = config_to_json(cfg)
  >>> obj["rank"], obj["layouts"]
  (4, {'.*q': {'axes': 'ioo', 'kind': 'dense'}})
  >>> config_from_json(obj, "adapter_config.json") == cfg
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax._config import LoraConfig
from lora_jax._errors import LoraFileError
from lora_jax._layout import KernelLayout


def _jsonable(value: Any) -> Any:
    """``value`` as JSON types; :class:`TypeError` if JSON cannot hold it (a callable)."""
    if isinstance(value, KernelLayout):
        return {"axes": value.axes, "kind": value.kind}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def config_to_json(config: LoraConfig | None) -> dict | None:
    """A JSON-able dict of a :class:`LoraConfig`'s fields.

    ``dtype`` is stored by name; a callable ``targets`` (or any other field
    JSON cannot hold) is stored as null and listed under ``"unserializable"``.

    Example:
      >>> config_to_json(LoraConfig(targets="w", rank=4))["rank"]
      4
    """
    if config is None:
        return None
    out: dict[str, Any] = {}
    lost = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        try:
            out[field.name] = np.dtype(value).name if field.name == "dtype" else _jsonable(value)
        except TypeError:
            out[field.name] = None
            lost.append(field.name)
    if lost:
        out["unserializable"] = lost
    return out


def config_from_json(obj: dict | None, where: str) -> LoraConfig | None:
    """Rebuilds a :class:`LoraConfig`; None if absent or if a field could not be saved.

    Fields this lora_jax does not know (written by a newer one) are ignored.
    """
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{where}: key 'config' is a {type(obj).__name__}, expected an object")
    if obj.get("unserializable") or obj.get("targets") is None:
        return None
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs: dict[str, Any] = {}
    try:
        for name, value in obj.items():
            if name not in known:
                continue
            if name == "layouts":
                value = {
                    k: KernelLayout(v["axes"], v.get("kind", "dense")) for k, v in value.items()
                }
            elif name == "dtype":
                value = jnp.dtype(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return LoraConfig(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoraFileError(f"{where}: key 'config' does not describe a LoraConfig: {e}") from None


__all__ = ["config_from_json", "config_to_json"]
