"""One summary format for every benchmark, read by ``benchmarks/run_all.py``.

Each benchmark script accepts ``--summary PATH`` and, when given, writes::

    {"benchmark": "bench_x", "load_1min": 0.4, "rows": [
        {"metric": "...", "ours": 1.23, "reference": 2.0, "ratio": 0.62, "unit": "ms/step",
         "goal": "<= 1.0", "met": true}, ...]}

``ratio`` is the figure the goal is stated on (ours / reference unless the row says otherwise in its
metric name); ``goal`` is a comparison like ``"<= 1.0"`` or ``">= 0.6"`` (or ``""`` for figures that are
only reported); ``met`` is computed from ``ratio`` (or ``ours`` when there is no ratio) and the goal.
"""
from __future__ import annotations

import json
import operator
import os
from pathlib import Path

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def load_1min() -> float:
    return os.getloadavg()[0]


def check(value, goal: str):
    """True / False when ``goal`` ("<= 1.5") holds for ``value``; None when there is no goal or value."""
    if not goal or value is None:
        return None
    op, _, bound = goal.strip().partition(" ")
    if op not in _OPS:
        raise ValueError(f"goal {goal!r}: expected '<= X', '>= X', '< X' or '> X'")
    return bool(_OPS[op](float(value), float(bound)))


def row(metric: str, ours, reference=None, *, ratio=None, unit: str = "", goal: str = "") -> dict:
    """One summary row; ``ratio`` defaults to ours / reference when both are given."""
    if ratio is None and reference not in (None, 0) and ours is not None:
        ratio = float(ours) / float(reference)
    judged = ratio if ratio is not None else ours
    return {"metric": metric, "ours": None if ours is None else float(ours),
            "reference": None if reference is None else float(reference),
            "ratio": None if ratio is None else float(ratio), "unit": unit, "goal": goal,
            "met": check(judged, goal)}


def write(path, benchmark: str, rows: list[dict]) -> None:
    """Write the summary of one benchmark run to ``path`` (no-op when ``path`` is empty)."""
    if not path:
        return
    doc = {"benchmark": benchmark, "load_1min": round(load_1min(), 2), "rows": rows}
    Path(path).write_text(json.dumps(doc, indent=1))
