"""Compiled graphs: the ``graphs`` table, and the registry of task tables the timeline and memory
collectors expand each step's ``step_tasks`` arrays against.

``graph`` events (compile time, text IR) come from the Model when it compiles a step graph;
``task_table`` events (static per-task columns) from the executor the first time a graph runs for a
listener. A graph's row is written when its task table arrives, merged with the pending ``graph``
event of the same name (compiled just before); graphs compiled before profiling started only have
their task table (nodes and compile times -1, dump empty).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from collectors.base import Collector, as_int
from collectors.buffers import ColumnBuffer, to_arrow


class GraphTable:
    """One compiled graph's task table, prepared (lazily, in the writer thread) for vectorised expansion:
    ``pos[task_id]`` is the row of a task; string columns are Arrow arrays to ``take`` from, numeric
    columns numpy arrays to index."""

    _INT = {"task_id": np.int32, "stream_id": np.int8, "flops": np.int64, "bytes": np.int64,
            "out_size": np.int64, "out_offset": np.int64, "free_task_id": np.int64}

    def __init__(self, graph_id: int, ev: dict):
        self.graph_id = graph_id
        self.name = str(ev.get("graph", ""))
        self.planned_peak = as_int(ev.get("planned_peak"))
        self.parameter_bytes = as_int(ev.get("parameter_bytes"), 0)
        self.capacity = as_int(ev.get("capacity"))
        self._raw = ev.get("columns") or {}
        self.n = len(self._raw.get("task_id", ()))
        self._cache: dict = {}
        self.template_ids: np.ndarray | None = None  # the task order of the first step seen (set by the writer)

    def s(self, col: str) -> pa.Array:
        """A string column as an Arrow array (missing column: empty strings)."""
        key = ("s", col)
        a = self._cache.get(key)
        if a is None:
            raw = self._raw.get(col)
            a = pa.array([("" if v is None else str(v)) for v in raw] if raw is not None else [""] * self.n,
                         pa.string())
            self._cache[key] = a
        return a

    def codes(self, col: str) -> tuple[np.ndarray, pa.Array]:
        """A string column dictionary-encoded: (per-row int32 code, the distinct values). Parquet writes a
        dictionary array directly only if its dictionary has no duplicates."""
        key = ("d", col)
        d = self._cache.get(key)
        if d is None:
            enc = self.s(col).dictionary_encode()
            d = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int32), enc.dictionary)
            self._cache[key] = d
        return d

    def column(self, col: str, rows: np.ndarray) -> pa.DictionaryArray:
        """The string column ``col`` at the task-table rows ``rows``, as a dictionary array (no string copied)."""
        codes, values = self.codes(col)
        return pa.DictionaryArray.from_arrays(pa.array(codes[rows]), values)

    def i(self, col: str) -> np.ndarray:
        key = ("i", col)
        a = self._cache.get(key)
        if a is None:
            raw = self._raw.get(col)
            dt = self._INT.get(col, np.int64)
            a = np.asarray(raw, dt) if raw is not None else np.full(self.n, -1, dt)
            self._cache[key] = a
        return a

    @property
    def pos(self) -> np.ndarray:
        """task_id -> row index (-1: no such task)."""
        a = self._cache.get("pos")
        if a is None:
            ids = self.i("task_id").astype(np.int64)
            a = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, np.int64)
            a[ids] = np.arange(len(ids))
            self._cache["pos"] = a
        return a

    @property
    def free_pos(self) -> np.ndarray:
        """Per row: the row of the task after which its output buffer is freed (-1: at the end of the step)."""
        a = self._cache.get("free_pos")
        if a is None:
            f = self.i("free_task_id")
            pos = self.pos
            ok = (f >= 0) & (f < len(pos))
            a = np.full(self.n, -1, np.int64)
            a[ok] = pos[f[ok]]
            self._cache["free_pos"] = a
        return a

    def streams(self) -> dict[int, str]:
        ids, names = self.i("stream_id"), self._raw.get("stream") or []
        return {int(i): str(s) for i, s in zip(ids.tolist(), names)}


class GraphRegistry:
    """graph_id -> GraphTable; written from the hook (once per graph), read by the writer."""

    def __init__(self):
        self._tables: dict[int, GraphTable] = {}

    def register(self, ev: dict) -> GraphTable | None:
        """Returns the new GraphTable, or None if this graph's table was already known."""
        gid = ev.get("graph_id")
        old = self._tables.get(gid)
        n = len((ev.get("columns") or {}).get("task_id", ()))
        if old is not None and old.name == ev.get("graph") and old.n == n:
            return None
        gt = GraphTable(gid, ev)
        self._tables[gid] = gt
        return gt

    def get(self, graph_id) -> GraphTable | None:
        return self._tables.get(graph_id)

    def all(self) -> list[GraphTable]:
        return list(self._tables.values())


class GraphsCollector(Collector):
    tables = ("graphs",)

    def __init__(self, registry: GraphRegistry):
        self.registry = registry
        self._rows = ColumnBuffer("graphs", capacity=8)
        self._pending: list[dict] = []  # graph events whose task table has not arrived yet
        self.capacity: int | None = None

    def static_handlers(self):
        return {"graph": self.on_graph, "task_table": self.on_task_table}

    def on_graph(self, ev: dict) -> None:
        self._pending.append(ev)

    def on_task_table(self, ev: dict) -> None:
        gt = self.registry.register(ev)
        if gt is None:
            return
        if gt.capacity > 0:
            self.capacity = gt.capacity
        g = next((p for p in self._pending if p.get("name") == gt.name), None)
        if g is not None:
            self._pending.remove(g)
        self._rows.append(self._row(gt.name, g, gt.planned_peak, gt.parameter_bytes))

    @staticmethod
    def _row(name, g, peak, params):
        if g is None:
            return (name, -1, -1, -1, "", peak, params)
        return (name, as_int(g.get("nodes")), as_int(g.get("start_ns")), as_int(g.get("end_ns")),
                str(g.get("dump") or ""), peak, params)

    def drain(self, t0, final=False):
        if final:  # graphs compiled but never run while recording
            while self._pending:
                g = self._pending.pop(0)
                self._rows.append(self._row(str(g.get("name", "")), g, -1, -1))
        cols = self._rows.drain()
        return {"graphs": to_arrow("graphs", cols, t0)} if cols else {}
