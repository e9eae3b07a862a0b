"""Pass 1 of an import: trace events -> compact columns (numpy arrays and interned strings).

``EventColumns.feed(batch)`` is called with each batch of parsed events (thousands at a time). It works a
column at a time over the batch -- one list comprehension per field, numpy for the numbers, dictionary
look-ups through ``map`` for the strings -- and keeps, per complete slice (``X``, or a matched ``B``/``E``
pair), a handful of integers and string codes, never the event objects: a trace of millions of events
costs tens of bytes per event. Metadata (``M``) names processes and threads, flow ends (``s``/``t``/``f``)
and ``[memory]`` instant events get their own small columns, and everything else is counted by kind
(``skipped``) and reported, never an error. An event that breaks the format (not an object, no ``ph``, a
timed event without a numeric ``ts``) raises ``BadEvent`` with its index in the batch.

``EventColumns.scan`` is the fast path of the same: the Cython ``Scanner`` writes the columns of ``X`` slices,
flow ends and ``[memory]`` events straight from the JSON bytes (a ``Scanned`` batch; ``feed`` takes both kinds
of batch) and leaves the few other events to the code above as raw JSON. ``C`` counters become rows of
``counters`` (one per numeric series value).
"""
from __future__ import annotations

from collections import Counter
from itertools import repeat
from operator import itemgetter

import numpy as np
import orjson

from insight.importer._scan import Scanner

TIMED = {"X", "B", "E", "i", "I", "s", "f", "t", "C", "b", "e", "n"}
P_X, P_FLOW, P_INSTANT, P_META, P_OTHER = range(5)
ST_SLOW = 2  # a Scanner status: the next element is not for the scanner
MAX_US = 9e15  # times beyond +-MAX_US microseconds are refused (their nanoseconds would leave int64)
PH_CODES = {"X": P_X, "s": P_FLOW, "f": P_FLOW, "t": P_FLOW, "i": P_INSTANT, "I": P_INSTANT, "M": P_META}
EMPTY: dict = {}


class Interner:
    """Strings <-> codes (code 0 is the empty string)."""

    def __init__(self):
        self.codes: dict = {"": 0}
        self.values: list = [""]

    def __call__(self, s) -> int:
        c = self.codes.get(s)
        if c is None:
            if not isinstance(s, str):
                return self(_text(s))
            c = self.codes[s] = len(self.values)
            self.values.append(s)
        return c

    def many(self, values: list) -> np.ndarray:
        """Codes of a list of values (strings normally; anything else as its text)."""
        try:
            codes = list(map(self.codes.get, values))
        except TypeError:  # an unhashable value (a list as a name)
            codes = [None] * len(values)
        if None in codes:
            codes = [c if c is not None else self(v) for c, v in zip(codes, values)]
        return np.array(codes, np.int64)

    def array(self) -> np.ndarray:
        return np.array(self.values, dtype=object)


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return str(v)


def _dims(v) -> str:
    """Kineto's ``Input Dims`` ([[32, 64], [64], []]) as ``32x64,64,`` (our shape notation, one per input)."""
    if isinstance(v, list):
        return ",".join("x".join(map(str, d)) if isinstance(d, list) else _text(d) for d in v)
    return _text(v)


def _types(v) -> str:
    if isinstance(v, list):
        return ",".join(_text(t) for t in v)
    return _text(v)


class Columns:
    """Append-only integer columns kept as numpy chunks; a chunk that is all one value is kept as that value
    (Kineto traces never fill the columns of our own exporter's args)."""

    def __init__(self, names: tuple, small: tuple = ()):
        self.names = names
        self.dtypes = {n: np.int32 if n in small else np.int64 for n in names}
        self.chunks = {n: [] for n in names}

    def add(self, cols: dict) -> None:
        for n in self.names:
            v = cols[n]
            if isinstance(v, tuple):  # (value, count)
                self.chunks[n].append(v)
            else:
                self.chunks[n].append(np.asarray(v, self.dtypes[n]))

    def __len__(self) -> int:
        ch = self.chunks[self.names[0]]
        return sum(c[1] if isinstance(c, tuple) else len(c) for c in ch)

    def get(self, name: str) -> np.ndarray:
        ch = [np.full(c[1], c[0], self.dtypes[name]) if isinstance(c, tuple) else c for c in self.chunks[name]]
        return np.concatenate(ch) if ch else np.zeros(0, self.dtypes[name])

    def constant(self, name: str):
        """The column's single value when every row holds it, else None."""
        vals = {c[0] if isinstance(c, tuple) else None for c in self.chunks[name]}
        return vals.pop() if len(vals) == 1 and None not in vals else None

    def all(self) -> dict:
        return {n: self.get(n) for n in self.names}

    def lazy(self) -> dict:
        return LazyColumns(self)


class LazyColumns(dict):
    """``{name: array}`` materialising each column on first use."""

    def __init__(self, cols: Columns):
        super().__init__()
        self._cols = cols

    def __missing__(self, name):
        v = self[name] = self._cols.get(name)
        return v


SLICE_COLS = ("ts", "dur", "name", "cat", "lane", "corr", "ext", "bytes", "flops", "shape", "dtype",
              # the args our own exporter writes (insight/export.py): op, step, task_id, graph, scope, phase
              # for tasks; epoch and the step-trace phases (ns) for its step slices
              "a_op", "a_step", "a_task", "a_graph", "a_scope", "a_phase", "a_epoch", "a_ii", "a_fpbp")
FLOW_COLS = ("ph", "cat", "id", "id_str", "lane", "ts", "bp")  # id: an integer id, else -1 and id_str
MEM_COLS = ("ts", "lane", "addr", "bytes", "allocated", "reserved", "dev_type", "dev_id")
A_DEFAULTS = (0, -1, -1, 0, 0, 0, -1, -1, -1)  # a_op .. a_fpbp when absent


class Scanned:
    """A batch of ``n`` events read by the scanner: the columns of its slices, flow ends and memory events
    (rows as in ``Scanner``), and ``rest``: the raw JSON and batch index of every other event (or None)."""
    __slots__ = ("n", "x", "fl", "mem", "rest")

    def __init__(self, n, x, fl, mem, rest):
        self.n, self.x, self.fl, self.mem, self.rest = n, x, fl, mem, rest

    def __len__(self) -> int:
        return self.n


def _rows(block: np.ndarray, n: int) -> list | None:
    """The first ``n`` columns of a scanner block as one array per row (copies: the block is reused)."""
    return [r.copy() for r in block[:, :n]] if n else None


def _take(events: list, idx: np.ndarray) -> list:
    if len(idx) == 1:
        return [events[int(idx[0])]]
    return list(itemgetter(*idx.tolist())(events)) if len(idx) else []


class EventColumns:
    def __init__(self):
        self.strings = Interner()
        self.slices = Columns(SLICE_COLS, small=("name", "cat", "lane", "shape", "dtype"))
        self.flows = Columns(FLOW_COLS)
        self.memory = Columns(MEM_COLS)
        self.counters: dict = {c: [] for c in ("ts", "name", "series", "pid", "value")}  # one row per series
        self.lanes: dict = {}            # (pid, tid) -> lane code
        self.lane_keys: list = []
        self.process_names: dict = {}    # pid -> name
        self.process_labels: dict = {}   # pid -> labels ("GPU 0", "CPU")
        self.thread_names: dict = {}     # (pid, tid) -> name
        self.skipped: Counter = Counter()  # what was not imported, by kind
        self.open: dict = {}             # lane -> stack of B events
        self.n_events = 0
        self.n_scanned = 0               # of which read by the scanner (the rest by orjson)
        self._shapes: dict = {}          # orjson text of Input Dims -> code of our notation
        self._scanner = None
        self._raw_codes: dict = {}       # raw JSON string bytes -> code (the scanner's strings)
        self._raw_shapes: dict = {}      # raw (Input Dims, Input type) JSON -> codes

    def lane(self, pid, tid) -> int:
        key = (pid, tid)
        try:
            c = self.lanes.get(key)
        except TypeError:  # a list or object as pid/tid: keep it as text
            return self.lane(_text(pid), _text(tid))
        if c is None:
            c = self.lanes[key] = len(self.lane_keys)
            self.lane_keys.append(key)
        return c

    def _lanes(self, evs: list) -> np.ndarray:
        return self._lane_codes([(e.get("pid"), e.get("tid")) for e in evs])

    def _lane_codes(self, keys) -> np.ndarray:
        try:
            codes = list(map(self.lanes.get, keys))
        except TypeError:
            codes = [None] * len(keys)
        if None in codes:
            codes = [c if c is not None else self.lane(*k) for c, k in zip(codes, keys)]
        return np.array(codes, np.int64)

    # -- a batch --------------------------------------------------------------------------------------
    def feed(self, events, base: int = 0) -> None:
        from insight.importer.reader import BadEvent

        if type(events) is Scanned:
            return self._feed_scanned(events)

        try:
            phs = [e.get("ph") for e in events]
        except AttributeError:
            k = next(i for i, e in enumerate(events) if type(e) is not dict)
            e = events[k]
            raise BadEvent(k, f"is {type(e).__name__ if e is not None else 'null'}, not a JSON object") from None
        try:
            ph = np.array(list(map(PH_CODES.get, phs, repeat(P_OTHER, len(phs)))), np.int8)
        except TypeError:  # an unhashable "ph"
            ph = np.array([PH_CODES.get(p, P_OTHER) if isinstance(p, str) else P_OTHER for p in phs], np.int8)
        if (ph == P_X).all():
            self._slices(events, np.arange(len(events)))
        else:
            none = [k for k in np.flatnonzero(ph == P_OTHER) if phs[k] is None]
            if none:
                raise BadEvent(int(none[0]), "has no \"ph\" (event type)")
            self._slices(events, np.flatnonzero(ph == P_X))
            fl = np.flatnonzero(ph == P_FLOW)
            if len(fl):
                self._flows(events, fl)
            inst = np.flatnonzero(ph == P_INSTANT)
            if len(inst):
                self._instants(events, inst)
            for k in np.flatnonzero(ph == P_META):
                self._meta(events[k])
            for k in np.flatnonzero(ph == P_OTHER):
                self._other(events, k, phs[k])
        self.n_events += len(events)

    def _other(self, events: list, k: int, p) -> None:
        e = events[k]
        if p in TIMED and type(e.get("ts")) not in (int, float):
            _ns([e.get("ts")], np.array([k]), "ts", events)
        if p == "B" or p == "E":
            self._begin_end(e, p)
        elif p == "C":
            self._counter(e)
        else:
            self.skipped[f"ph {_text(p)!r} events"] += 1

    def _counter(self, e: dict) -> None:
        """A ``C`` event: one row per numeric arg (a series of the counter ``name``, or ``name id`` when the event
        has an ``id``); its process is resolved to a name when the trace is mapped."""
        args = e.get("args")
        if not isinstance(args, dict) or not args:
            self.skipped["counter events without values"] += 1
            return
        name = _text(e.get("name", ""))
        if e.get("id") is not None:
            name = f"{name} {_text(e['id'])}"
        t = e["ts"]
        t = t * 1000 if type(t) is int else round(t * 1000)
        c = self.counters
        for series, v in args.items():
            if type(v) in (int, float) and v == v:
                c["ts"].append(t)
                c["name"].append(self.strings(name))
                c["series"].append(self.strings(series))
                c["pid"].append(e.get("pid"))
                c["value"].append(v)
            else:
                self.skipped["counter values that are not numbers"] += 1

    # -- a batch read by the Cython scanner (insight/importer/_scan.pyx) -------------------------------
    def scan(self, buf: bytes, pos: int):
        """``(status, end, batch)``: the next whole elements of ``buf[pos:]``, ending at ``buf[end - 1]``: a
        ``Scanned`` batch, or a list of events parsed by orjson (a run of elements the scanner leaves to it);
        ``batch`` None when the next element is malformed (the reader's orjson path reports it) or, ``status``
        ST_MORE, the buffer ends inside it."""
        if self._scanner is None:
            self._scanner = Scanner(self._intern_raw, self.lane, self._described_raw)
        sc = self._scanner
        status, end, fast, nx, nf, nm, no, n = sc.scan(buf, pos)
        if not n:
            return status, pos, None
        if not fast:  # a run of elements for the orjson path
            try:
                return status, end, orjson.loads(b"[" + buf[pos:end] + b"]")
            except orjson.JSONDecodeError:  # (the reader's orjson path finds the error and its offset)
                return ST_SLOW, pos, None
        rest = None
        if no:
            o = sc.other[:, :no]
            rest = ([buf[a:b] for a, b in zip(o[0].tolist(), o[1].tolist())], o[2].copy())
        return status, end, Scanned(n, _rows(sc.x, nx), _rows(sc.fl, nf), _rows(sc.mem, nm), rest)

    def _intern_raw(self, raw: bytes, escaped: bool) -> int:
        """The code of a JSON string given by its raw bytes between the quotes (-1 when it does not decode)."""
        c = self._raw_codes.get(raw)
        if c is None:
            try:
                s = orjson.loads(b'"' + raw + b'"') if escaped else raw.decode()
            except (orjson.JSONDecodeError, UnicodeDecodeError):
                return -1
            c = self._raw_codes[raw] = self.strings(s)
        return c

    def _described_raw(self, dims: bytes, types: bytes | None) -> tuple[int, int]:
        """Shape and dtype codes of Kineto's ``Input Dims`` / ``Input type`` given as raw JSON (as _described)."""
        c = self._raw_shapes.get((dims, types))
        if c is None:
            try:
                d, t = orjson.loads(dims), orjson.loads(types) if types is not None else None
            except orjson.JSONDecodeError:
                return -1, -1
            key = orjson.dumps((d, t))
            c = self._shapes.get(key)
            if c is None:
                c = self._shapes[key] = (self.strings(_dims(d)), self.strings(_types(t) if t is not None else ""))
            self._raw_shapes[(dims, types)] = c
        return c

    def _feed_scanned(self, b: "Scanned") -> None:
        from insight.importer.reader import BadEvent

        if b.x is not None:
            x = b.x
            n = len(x[0])
            cols = dict(zip(SLICE_COLS[:11], x))
            for c, d in zip(SLICE_COLS[11:], A_DEFAULTS):
                cols[c] = (d, n)
            self.slices.add(cols)
        if b.fl is not None:
            f = b.fl
            self.flows.add({"ph": f[0], "cat": f[1], "id": f[2], "id_str": (0, len(f[0])), "lane": f[3],
                            "ts": f[4], "bp": f[5]})
        if b.mem is not None:
            self.memory.add(dict(zip(MEM_COLS, b.mem)))
        if b.rest is not None:
            raws, index = b.rest
            events = orjson.loads(b"[" + b",".join(raws) + b"]")
            try:  # what feed does with these kinds, in its order
                phs = [e.get("ph") for e in events]
                inst = np.array([k for k, p in enumerate(phs) if p in ("i", "I")], np.int64)
                if len(inst):
                    self._instants(events, inst)
                for e, p in zip(events, phs):
                    if p == "M":
                        self._meta(e)
                for k, p in enumerate(phs):
                    if p not in ("i", "I", "M"):
                        self._other(events, k, p)
            except BadEvent as e:  # the index in the batch, not among these events
                raise BadEvent(int(index[e.index]), e.message) from None
        self.n_events += b.n
        self.n_scanned += b.n

    def _slices(self, events: list, idx: np.ndarray) -> None:
        if not len(idx):
            return
        xs = _take(events, idx)
        n = len(xs)
        # one pass over the events, then columns (zip(*rows) transposes in C)
        rows = [(e.get("ts"), e.get("dur"), e.get("name", ""), e.get("cat", ""), (e.get("pid"), e.get("tid")),
                 _args(e)) for e in xs]
        ts, durs, names, cats, keys, argss = zip(*rows)
        del rows
        ts = _ns(ts, idx, "ts", events)
        if None in durs:
            self.skipped["X events without dur (imported with dur 0)"] += sum(d is None for d in durs)
            durs = [0 if d is None else d for d in durs]
        S = self.strings
        cols = {"ts": ts, "dur": _ns(durs, idx, "dur", events), "name": S.many(names), "cat": S.many(cats),
                "lane": self._lane_codes(keys)}
        nums = [(a.get("correlation", -1), a.get("External id", -1), a.get("bytes", -1), a.get("flops", -1))
                for a in argss]
        for c, vals in zip(("corr", "ext", "bytes", "flops"), zip(*nums)):
            cols[c] = _ints(vals)
        # shapes and dtypes come together (ours: shape + dtype; Kineto's record_shapes: Input Dims + Input type)
        got = [i for i, a in enumerate(argss) if "Input Dims" in a or "shape" in a]
        cols["shape"], cols["dtype"] = self._described(argss, got)
        ours = [i for i, a in enumerate(argss) if "op" in a or "iteration_interval_ms" in a]
        for c, d in zip(SLICE_COLS[11:], A_DEFAULTS):
            cols[c] = np.full(n, d, np.int64) if ours else (d, n)
        for i in ours:
            self._our_args(argss[i], cols, i)
        self.slices.add(cols)

    def _described(self, argss, got: list) -> tuple[np.ndarray, np.ndarray]:
        """Shape and dtype codes of the events ``got``: our exporter's ``shape`` / ``dtype`` strings, else
        Kineto's ``Input Dims`` / ``Input type`` lists (formatted once per distinct pair of lists)."""
        shape, dtype = np.zeros(len(argss), np.int64), np.zeros(len(argss), np.int64)
        if not got:
            return shape, dtype
        S, cache = self.strings, self._shapes
        out = []
        for i in got:
            a = argss[i]
            if "shape" in a:
                out.append((S(a["shape"]), S(a.get("dtype", ""))))
                continue
            dims, types = a.get("Input Dims"), a.get("Input type")
            key = orjson.dumps((dims, types))
            c = cache.get(key)
            if c is None:
                c = cache[key] = (S(_dims(dims)), S(_types(types) if types is not None else ""))
            out.append(c)
        shape[got], dtype[got] = zip(*out)
        return shape, dtype

    def _our_args(self, a: dict, cols: dict, i: int) -> None:
        """The args of a task or step slice written by insight.export."""
        S = self.strings
        g = a.get
        if "op" in a:
            cols["a_op"][i] = S(g("op"))
            cols["a_step"][i] = _int(g("step"))
            cols["a_task"][i] = _int(g("task_id"))
            cols["a_graph"][i] = S(g("graph", ""))
            cols["a_scope"][i] = S(g("scope", ""))
            cols["a_phase"][i] = S(g("phase", ""))
        else:
            cols["a_op"][i] = S(g("fp_start_op", ""))
            cols["a_step"][i] = _int(g("step"))
            cols["a_scope"][i] = S(g("bp_end_op", ""))
            cols["a_epoch"][i] = _int(g("epoch"))
            cols["a_ii"][i] = _ns_of_ms(g("iteration_interval_ms"))
            cols["a_fpbp"][i] = _ns_of_ms(g("fp_bp_ms"))

    def _flows(self, events: list, idx: np.ndarray) -> None:
        fs = _take(events, idx)
        rows = [(e["ph"] == "s", e.get("cat", ""), e.get("id"), (e.get("pid"), e.get("tid")), e.get("ts"),
                 e.get("bp") == "e") for e in fs]
        starts, cats, ids, keys, ts, bps = zip(*rows)
        del rows
        if None in ids:
            ids = [i if i is not None else (e.get("id2") or e.get("bind_id")) for i, e in zip(ids, fs)]
        num = np.array(ids)
        if num.dtype.kind == "i":  # Kineto: the correlation id
            id_num, id_str = num.astype(np.int64, copy=False), np.zeros(len(ids), np.int64)
        else:
            id_num = np.array([i if type(i) is int else -1 for i in ids], np.int64)
            id_str = self.strings.many([_text(i) if type(i) is not int else "" for i in ids])
        # ph: ord("s") for a start, ord("f") for a finish ("t", a step, ends the flow like "f")
        self.flows.add({"ph": np.where(np.array(starts, bool), ord("s"), ord("f")), "cat": self.strings.many(cats),
                        "id": id_num, "id_str": id_str, "lane": self._lane_codes(keys),
                        "ts": _ns(ts, idx, "ts", events), "bp": np.array(bps, np.int64)})

    def _instants(self, events: list, idx: np.ndarray) -> None:
        ins = _take(events, idx)
        ts = _ns([e.get("ts") for e in ins], idx, "ts", events)
        names = [e.get("name") for e in ins]
        mem = np.array([nm == "[memory]" for nm in names], bool)
        for nm in (names[i] for i in np.flatnonzero(~mem)):
            self.skipped[f"instant events ({_text(nm)[:40] or 'unnamed'})"] += 1
        if not mem.any():
            return
        ms = [ins[i] for i in np.flatnonzero(mem)]
        args = [_args(e) for e in ms]
        self.memory.add({"ts": ts[mem], "lane": self._lanes(ms),
                         **{c: _ints([a.get(key, -1) for a in args])
                            for c, key in (("addr", "Addr"), ("bytes", "Bytes"), ("allocated", "Total Allocated"),
                                           ("reserved", "Total Reserved"), ("dev_type", "Device Type"),
                                           ("dev_id", "Device Id"))}})

    def _meta(self, e: dict) -> None:
        name, args = e.get("name"), _args(e)
        pid, tid = e.get("pid"), e.get("tid")
        if name == "process_name":
            self.process_names[pid] = _text(args.get("name", ""))
        elif name == "process_labels":
            self.process_labels[pid] = _text(args.get("labels", ""))
        elif name == "thread_name":
            self.thread_names[(pid, tid)] = _text(args.get("name", ""))
        elif name not in ("process_sort_index", "thread_sort_index"):
            self.skipped[f"metadata events ({_text(name)[:40]})"] += 1

    def _begin_end(self, e: dict, ph: str) -> None:
        ln = self.lane(e.get("pid"), e.get("tid"))
        stack = self.open.setdefault(ln, [])
        ts = e["ts"]
        if ph == "B":
            stack.append((ts, e))
            return
        if not stack:
            self.skipped["E events without a matching B"] += 1
            return
        t0, b = stack.pop()
        x = dict(b)
        x.update({"ph": "X", "ts": t0, "dur": max(ts - t0, 0)})
        if _args(e):
            x["args"] = {**_args(b), **_args(e)}
        self._slices([x], np.array([0]))

    def finish(self) -> None:
        for stack in self.open.values():
            if stack:
                self.skipped["B events without a matching E"] += len(stack)
        self.open.clear()


def _args(e: dict) -> dict:
    """An event's args: an object, else (absent, null, or a value of another type) nothing."""
    a = e.get("args")
    return a if type(a) is dict else EMPTY


def _int(v) -> int:
    return v if type(v) is int else -1


def _ns_of_ms(v) -> int:
    return round(v * 1e6) if type(v) in (int, float) else -1


def _int_or_float(v) -> int:
    if type(v) is int and -2**63 <= v < 2**63:
        return v
    if type(v) is float and v == v and abs(v) < 2**63:
        return int(v)
    return -1


def _ints(values: list) -> np.ndarray:
    """Integer args (-1 where missing or not an integer)."""
    a = np.array(values)
    if a.dtype.kind == "i":
        return a.astype(np.int64, copy=False)
    return np.array([_int_or_float(v) for v in values], np.int64)


def _ns(values: list, idx: np.ndarray, field: str, events: list) -> np.ndarray:
    """Microsecond times (ints or floats) -> int64 nanoseconds; a missing, non-numeric or out-of-range one
    (beyond +-9e15 us, where nanoseconds leave int64) is a BadEvent."""
    a = np.array(values)
    if a.dtype.kind in "if" and ((a > -MAX_US) & (a < MAX_US)).all():  # (NaN fails the test)
        return a.astype(np.int64) * 1000 if a.dtype.kind == "i" else np.rint(a * 1000).astype(np.int64)
    out = np.empty(len(values), np.int64)
    for k, v in enumerate(values):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if type(v) in (int, float) and -MAX_US < v < MAX_US:
            out[k] = v * 1000 if type(v) is int else round(v * 1000)
            continue
        from insight.importer.reader import BadEvent

        e = events[int(idx[k])]
        what = f"{_text(e.get('ph'))!r} event {_text(e.get('name', ''))[:60]!r}"
        if v is None:
            raise BadEvent(int(idx[k]), f"{what} has no \"{field}\"")
        if type(v) in (int, float):
            raise BadEvent(int(idx[k]), f"{what}: \"{field}\" is {_text(v)[:30]!r}, out of range")
        raise BadEvent(int(idx[k]), f"{what}: \"{field}\" is {_text(values[k])[:30]!r}, not a number")
    return out
