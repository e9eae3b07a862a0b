"""The runtime's one narrow event hook.

The runtime emits events (``"op"``, ``"step"``, ``"memory"``, ...) as plain dicts to
whoever subscribed. Emitters check ``hooks.listening`` (a module-level bool) before
building an event, so with nothing subscribed the cost is one attribute read.
The profiler's collectors subscribe here; the runtime never imports them.
"""
from __future__ import annotations

from typing import Callable

Listener = Callable[[str, dict], None]

_listeners: tuple[Listener, ...] = ()  # replaced (never mutated) on (un)subscribe: emit iterates a snapshot
listening: bool = False
generation: int = 0  # bumped on every subscribe, so emitters re-send static tables to new listeners


def subscribe(fn: Listener) -> Listener:
    """Register ``fn(kind, event)``; returns fn so it can be used as a decorator."""
    global _listeners, listening, generation
    if fn not in _listeners:
        _listeners = _listeners + (fn,)
    listening = True
    generation += 1
    return fn


def unsubscribe(fn: Listener) -> None:
    global _listeners, listening
    if fn in _listeners:
        _listeners = tuple(f for f in _listeners if f != fn)
    listening = bool(_listeners)


def emit(kind: str, event: dict) -> None:
    for fn in _listeners:
        fn(kind, event)
