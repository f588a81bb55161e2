"""Debugging aids for code that uses lora_jax: nothing here changes what a program computes.

==================  ===============================================================
``CompileCounter``  counts XLA compilations inside a ``with`` block (hot-swap checks)
==================  ===============================================================

Kept apart from :mod:`lora_jax.advanced` (lower-level pieces of the library
itself): these observe a running program.
"""

from __future__ import annotations

import threading
from typing import Any

import jax

__all__ = ["CompileCounter"]

_EVENT = "/jax/core/compile/backend_compile_duration"
_ACTIVE: list[CompileCounter] = []
_LOCK = threading.Lock()
# Older JAX cannot unregister a listener: there one is registered once, for good.
_UNREGISTER = getattr(jax.monitoring, "unregister_event_duration_listener", None)
_REGISTERED = False


def _dispatch(event: str, duration_secs: float, **kwargs: str | int) -> None:
    """The one ``jax.monitoring`` listener: forwards compile events to the open counters."""
    if event == _EVENT:
        with _LOCK:
            for counter in _ACTIVE:
                counter.count += 1


class CompileCounter:
    """Counts XLA compilations while its ``with`` block runs.

    For example, to check that loading a new adapter into a stack does not
    recompile the serving function. One ``jax.monitoring`` listener serves all
    open counters: it is registered when the first counter opens and removed
    when the last one closes, so a library that clears JAX's listeners between
    two blocks (tunix's ``MetricsLogger.close`` does) cannot silence the next
    one. On older JAX, which cannot remove a listener, it is registered once.
    A closed counter stops counting; counters may nest.

    Attributes:
      count: compilations seen so far (backend compiles, not cache hits).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax.debug import CompileCounter
      >>> f, x, y = jax.jit(lambda x: x * 3), jnp.ones(2), jnp.zeros(2)
      >>> with CompileCounter() as c:
      ...     _ = f(x); _ = f(y)
      >>> c.count
      1
    """

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> CompileCounter:
        global _REGISTERED
        with _LOCK:
            if not _ACTIVE and (_UNREGISTER is not None or not _REGISTERED):
                jax.monitoring.register_event_duration_secs_listener(_dispatch)
                _REGISTERED = True
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if not _ACTIVE and _UNREGISTER is not None:
                try:
                    _UNREGISTER(_dispatch)
                except (AssertionError, ValueError):
                    pass  # already cleared by someone else
