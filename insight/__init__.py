"""Insight: a profiler and dashboard for the Insight training runtime. See docs/architecture.md.

``Profiler``, ``schedule`` and ``ProfilerError`` (``insight.profiler``) are imported lazily, so that
importing ``insight.trace`` (as the dashboard does) never imports the runtime.
"""
from __future__ import annotations

__all__ = ["Profiler", "ProfilerError", "schedule"]


def __getattr__(name):
    if name in __all__:
        from insight import profiler
        return getattr(profiler, name)
    raise AttributeError(f"module 'insight' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
