"""In-memory buffers for the hot path, and their conversion to Arrow tables.

Frequent events (a few per step, or one per op in PYNATIVE mode) go into an ``EventBuffer``: the hook
callback is one ``list.append`` of the event dict as delivered -- no lock, no conversion on the training
thread -- and the writer thread turns the events taken at each flush into columns (``Field`` specs).
Rare rows (graphs, pipeline structure) go into a ``ColumnBuffer``: numbers into preallocated numpy arrays
that double when full, strings into Python lists. The writer thread ``drain()``s a buffer and turns the
columns into an Arrow table with the table's explicit schema.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from collectors.base import as_str, take_all
from collectors.schema import SCHEMAS, TIME_COLUMNS


class Field(NamedTuple):
    """One column of an ``EventBuffer``, from the event's key of the same name: ``kind`` ``"i"`` int
    (``missing``, default -1, when absent or None), ``"s"`` str ("" when absent, a shape tuple as "2x3";
    ``missing`` if given and the value is empty), ``"f"`` float (NaN when absent or None)."""
    column: str
    kind: str
    missing: object = None


def int_column(vals: list, missing: int = -1) -> np.ndarray:
    """Python values (None: ``missing``) -> int64 array."""
    return np.fromiter((missing if v is None else int(v) for v in vals), np.int64, len(vals))


def _strs(vals: list, missing) -> list:
    out = [v if type(v) is str else as_str(v) for v in vals]
    if missing:
        out = [v or missing for v in out]
    return out


def event_columns(events: list[dict], fields: list[Field]) -> dict:
    """The columns of ``events`` (dicts) as described by ``fields``: ndarray for numbers, list for strings."""
    cols = {}
    for f in fields:
        vals = [e.get(f.column) for e in events]
        if f.kind == "i":
            cols[f.column] = int_column(vals, -1 if f.missing is None else f.missing)
        elif f.kind == "s":
            cols[f.column] = _strs(vals, f.missing)
        elif f.kind == "f":
            cols[f.column] = np.fromiter((math.nan if v is None else float(v) for v in vals), np.float64, len(vals))
        else:
            raise ValueError(f"event_columns: unknown kind {f.kind!r} of column {f.column!r}")
    return cols


class EventBuffer:
    """Events appended from any thread as the hook delivered them (``append`` is the bound ``list.append``:
    the runtime builds a fresh dict per event and never touches it again); ``drain()`` takes them all
    (items appended meanwhile stay for the next drain) and converts them with ``fields``."""

    def __init__(self, fields: list[Field]):
        self.fields = list(fields)
        self._events: list[dict] = []
        self.append = self._events.append

    def __len__(self) -> int:
        return len(self._events)

    def take(self) -> list[dict]:
        return take_all(self._events)

    def drain(self) -> dict | None:
        """Every event appended so far as {column: ndarray | list}, or None when there is none."""
        events = self.take()
        return event_columns(events, self.fields) if events else None


def _np_dtype(typ: pa.DataType):
    if pa.types.is_string(typ):
        return None
    return np.dtype(typ.to_pandas_dtype())


class ColumnBuffer:
    """Rows of a fixed set of columns (a subset of a table's schema), appended from any thread."""

    def __init__(self, table: str, columns: list[str] | None = None, capacity: int = 256):
        schema = SCHEMAS[table]
        self.table = table
        self.names = list(columns) if columns is not None else list(schema.names)
        self._dtypes = [_np_dtype(schema.field(n).type) for n in self.names]
        self._lock = threading.Lock()
        self._cap0 = max(1, int(capacity))
        self._reset(self._cap0)

    def _reset(self, cap: int) -> None:
        self._cap = cap
        self._n = 0
        self._cols = [[] if dt is None else np.empty(cap, dt) for dt in self._dtypes]
        self._num = [(i, c) for i, c in enumerate(self._cols) if isinstance(c, np.ndarray)]
        self._str = [(i, c) for i, c in enumerate(self._cols) if isinstance(c, list)]

    def _grow(self) -> None:
        cap = self._cap * 2
        for k, c in enumerate(self._cols):
            if isinstance(c, np.ndarray):
                a = np.empty(cap, c.dtype)
                a[:self._n] = c
                self._cols[k] = a
        self._cap = cap
        self._num = [(i, c) for i, c in enumerate(self._cols) if isinstance(c, np.ndarray)]

    def __len__(self) -> int:
        return self._n

    def append(self, row) -> None:
        """``row``: one value per column, in ``names`` order (numbers already ints/floats, never None)."""
        with self._lock:
            n = self._n
            if n == self._cap:
                self._grow()
            for i, a in self._num:
                a[n] = row[i]
            for i, lst in self._str:
                lst.append(row[i])
            self._n = n + 1

    def drain(self) -> dict | None:
        """Take every row appended so far: {column: ndarray | list}, or None when empty."""
        with self._lock:
            n = self._n
            if n == 0:
                return None
            cols = self._cols
            self._reset(max(self._cap0, min(self._cap, 1 << 20)))
        return {name: (c[:n] if isinstance(c, np.ndarray) else c) for name, c in zip(self.names, cols)}


def shift_times(a: np.ndarray, t0: int) -> np.ndarray:
    """Absolute perf_counter_ns -> relative to the run start; -1 (missing) stays -1."""
    a = np.asarray(a, np.int64)
    out = a - np.int64(t0)
    if len(a) and a.min() < 0:
        out[a == -1] = -1
    return out


def dictionary_schema(schema: pa.Schema) -> pa.Schema:
    """The schema tables are built and written with: every string column dictionary-encoded
    (``dictionary<int32, string>``). Files are written without the Arrow schema in their metadata, so the
    Parquet logical type -- plain UTF-8 string -- is what pandas, pyarrow, DuckDB and Spark read."""
    return pa.schema([pa.field(f.name, DICT) if pa.types.is_string(f.type) else f for f in schema])


DICT = pa.dictionary(pa.int32(), pa.string())


def dict_column(values, dictionary: pa.Array | None = None, n: int | None = None) -> pa.Array:
    """Strings as a ``dictionary<int32, string>`` array: from indices into ``dictionary`` (zero-copy), a
    constant (``n`` copies), a list, or a string array (hashed once here)."""
    if dictionary is not None:
        return pa.DictionaryArray.from_arrays(pa.array(np.asarray(values, np.int32)), dictionary)
    if isinstance(values, str):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([values], pa.string()))
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_dictionary(values.type):
            return values if values.type == DICT else values.cast(DICT)
        return values.dictionary_encode()
    return pa.array(values, pa.string()).dictionary_encode()


def to_arrow(table: str, cols: dict, t0: int) -> pa.Table:
    """Columns (ndarray, list, pa.Array, or a scalar broadcast to the row count) -> a table of the table's
    schema with dictionary-encoded strings (``dictionary_schema``); time columns are shifted by ``t0``."""
    schema = SCHEMAS[table]
    n = None
    for v in cols.values():
        if v is not None and not np.isscalar(v):
            n = len(v)
            break
    if n is None:
        raise ValueError(f"{table}: no column with a length")
    times = TIME_COLUMNS.get(table, ())
    arrays = []
    for field in schema:
        v = cols.get(field.name)
        if pa.types.is_string(field.type):
            arr = dict_column("" if v is None else v, n=n)
        elif v is None or np.isscalar(v):
            arr = pa.array(np.full(n, -1 if v is None else v, field.type.to_pandas_dtype()), field.type)
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arr = v if v.type == field.type else v.cast(field.type)
        else:
            if field.name in times:
                v = shift_times(v, t0)
            arr = pa.array(np.asarray(v).astype(field.type.to_pandas_dtype(), copy=False), field.type)
        if len(arr) != n:
            raise ValueError(f"{table}.{field.name}: {len(arr)} values, expected {n}")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=dictionary_schema(schema))


def concat(tables: list[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
