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
_on_subscribe: list[Callable[[], None]] = []


def on_subscribe(fn: Callable[[], None]) -> None:
    """Have ``fn()`` called after every ``subscribe``: an emitter prepares its tracing there (e.g. starts a
    sampling thread) instead of in the first traced step."""
    if fn not in _on_subscribe:
        _on_subscribe.append(fn)


def subscribe(fn: Listener) -> Listener:
    """Register ``fn(kind, event)``; returns fn so it can be used as a decorator."""
    global _listeners, listening, generation
    if fn not in _listeners:
        _listeners = _listeners + (fn,)
    listening = True
    generation += 1
    for prepare in tuple(_on_subscribe):
        prepare()
    return fn


def unsubscribe(fn: Listener) -> None:
    global _listeners, listening
    if fn in _listeners:
        _listeners = tuple(f for f in _listeners if f != fn)
    listening = bool(_listeners)


def emit(kind: str, event: dict) -> None:
    for fn in _listeners:
        fn(kind, event)
