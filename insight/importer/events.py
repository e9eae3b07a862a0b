"""Pass 1 of an import: trace events -> compact columns (numpy arrays and interned strings).

``EventColumns.feed(batch)`` is called with each batch of parsed events. It keeps, per complete slice (``X``,
or a matched ``B``/``E`` pair), a handful of integers and string codes -- never the event objects -- so a
trace of millions of events costs tens of bytes per event. Metadata (``M``) names processes and threads,
flow ends (``s``/``t``/``f``) and ``[memory]`` instant events get their own small columns, and everything
else is counted by kind (``skipped``) and reported, never an error. An event that breaks the format (not
an object, no ``ph``, a timed event without a numeric ``ts``) raises ``BadEvent``.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

FLUSH = 1 << 16  # rows kept in Python lists before they move into numpy chunks
NUMERIC = (int, float)


class Interner:
    """Strings <-> int32 codes (code 0 is the empty string)."""

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
    """Append-only int64 columns, moved from Python lists into numpy chunks every FLUSH rows."""

    def __init__(self, names: tuple):
        self.names = names
        self.lists = {n: [] for n in names}
        self.chunks = {n: [] for n in names}
        self.n = 0

    def flush(self) -> None:
        for k, lst in self.lists.items():
            if lst:
                self.chunks[k].append(np.array(lst, np.int64))
                lst.clear()

    def get(self, name: str) -> np.ndarray:
        self.flush()
        ch = self.chunks[name]
        return np.concatenate(ch) if ch else np.zeros(0, np.int64)

    def all(self) -> dict:
        self.flush()
        return {n: self.get(n) for n in self.names}


SLICE_COLS = ("ts", "dur", "name", "cat", "lane", "corr", "ext", "bytes", "flops", "shape", "dtype",
              # the args our own exporter writes (insight/export.py): op, step, task_id, graph, scope, phase
              "a_op", "a_step", "a_task", "a_graph", "a_scope", "a_phase", "a_epoch", "a_ii", "a_fpbp")
FLOW_COLS = ("ph", "cat", "id", "lane", "ts", "bp")
MEM_COLS = ("ts", "lane", "addr", "bytes", "allocated", "reserved", "dev_type", "dev_id")
A_DEFAULTS = (0, -1, -1, 0, 0, 0, -1, -1, -1)  # a_op .. a_fpbp when absent


def _ns_of_ms(v) -> int:
    return round(v * 1e6) if type(v) in NUMERIC else -1


class EventColumns:
    def __init__(self):
        self.strings = Interner()
        self.slices = Columns(SLICE_COLS)
        self.flows = Columns(FLOW_COLS)
        self.memory = Columns(MEM_COLS)
        self.lanes: dict = {}            # (pid, tid) -> lane code
        self.lane_keys: list = []
        self.process_names: dict = {}    # pid -> name
        self.process_labels: dict = {}   # pid -> labels ("GPU 0", "CPU")
        self.thread_names: dict = {}     # (pid, tid) -> name
        self.skipped: Counter = Counter()  # what was not imported, by kind
        self.open: dict = {}             # lane -> stack of B events
        self.n_events = 0

    def lane(self, pid, tid) -> int:
        key = (pid, tid)
        c = self.lanes.get(key)
        if c is None:
            try:
                hash(key)
            except TypeError:  # a list or object as pid/tid: keep it as text
                return self.lane(_text(pid), _text(tid))
            c = self.lanes[key] = len(self.lane_keys)
            self.lane_keys.append(key)
        return c

    # -- the hot loop ---------------------------------------------------------------------------------
    def feed(self, events: list) -> None:
        from insight.importer.reader import BadEvent

        S = self.slices.lists
        ts_, dur_, name_, cat_, lane_, corr_, ext_ = (S[k].append for k in ("ts", "dur", "name", "cat", "lane",
                                                                             "corr", "ext"))
        bytes_, flops_, shape_, dtype_ = (S[k].append for k in ("bytes", "flops", "shape", "dtype"))
        a_cols = [S[k].append for k in ("a_op", "a_step", "a_task", "a_graph", "a_scope", "a_phase", "a_epoch",
                                        "a_ii", "a_fpbp")]
        intern = self.strings
        lanes = self.lanes
        lane_of = self.lane
        skipped = self.skipped
        for k, e in enumerate(events):
            if type(e) is not dict:
                raise BadEvent(k, f"is {type(e).__name__ if e is not None else 'null'}, not a JSON object")
            ph = e.get("ph")
            if ph == "X":
                ts = e.get("ts")
                if type(ts) not in NUMERIC:
                    ts = _number(ts, k, "ts", e)
                dur = e.get("dur", 0)
                if type(dur) not in NUMERIC:
                    if dur is None:
                        dur = 0
                        skipped["X events without dur (imported with dur 0)"] += 1
                    else:
                        dur = _number(dur, k, "dur", e)
                key = (e.get("pid"), e.get("tid"))
                ln = lanes.get(key)
                if ln is None:
                    ln = lane_of(*key)
                args = e.get("args")
                ts_(round(ts * 1000))
                dur_(round(dur * 1000))
                name_(intern(e.get("name", "")))
                cat_(intern(e.get("cat", "")))
                lane_(ln)
                if args:
                    self._args(args, corr_, ext_, bytes_, flops_, shape_, dtype_, a_cols)
                else:
                    corr_(-1), ext_(-1), bytes_(-1), flops_(-1), shape_(0), dtype_(0)
                    for a, d in zip(a_cols, A_DEFAULTS):
                        a(d)
                if len(S["ts"]) >= FLUSH:
                    self.slices.flush()
            elif ph == "M":
                self._meta(e)
            elif ph in ("s", "f", "t"):
                ts = e.get("ts")
                if type(ts) not in NUMERIC:
                    ts = _number(ts, k, "ts", e)
                fid = e.get("id")
                if fid is None:
                    fid = e.get("id2") or e.get("bind_id")
                F = self.flows.lists
                F["ph"].append(ord(ph))
                F["cat"].append(intern(e.get("cat", "")))
                F["id"].append(intern(_text(fid)))
                F["lane"].append(lane_of(e.get("pid"), e.get("tid")))
                F["ts"].append(round(ts * 1000))
                F["bp"].append(1 if e.get("bp") == "e" else 0)
                if len(F["ts"]) >= FLUSH:
                    self.flows.flush()
            elif ph in ("i", "I"):
                ts = e.get("ts")
                if type(ts) not in NUMERIC:
                    ts = _number(ts, k, "ts", e)
                if e.get("name") == "[memory]":
                    self._mem(e, ts)
                else:
                    skipped[f"instant events ({e.get('name', '')[:40] or 'unnamed'})"
                            if e.get("s") == "g" else "instant events"] += 1
            elif ph == "B" or ph == "E":
                ts = e.get("ts")
                if type(ts) not in NUMERIC:
                    ts = _number(ts, k, "ts", e)
                self._begin_end(e, ph, ts, skipped)
            elif ph is None:
                raise BadEvent(k, "has no \"ph\" (event type)")
            else:
                if "ts" not in e and ph not in ("M",):
                    raise BadEvent(k, f"{_text(ph)!r} event has no \"ts\"")
                skipped[f"ph {_text(ph)!r} events" + (" (counters)" if ph == "C" else "")] += 1
        self.n_events += len(events)

    def _args(self, args, corr_, ext_, bytes_, flops_, shape_, dtype_, a_cols) -> None:
        intern = self.strings
        g = args.get
        v = g("correlation", -1)
        corr_(v if type(v) is int else -1)
        v = g("External id", -1)
        ext_(v if type(v) is int else -1)
        v = g("bytes", -1)
        bytes_(v if type(v) is int else -1)
        v = g("flops", -1)
        flops_(v if type(v) is int else (int(v) if type(v) is float else -1))
        v = g("shape")  # ours, else Kineto's input shapes and types
        shape_(intern(v) if v is not None else intern(_dims(g("Input Dims"))))
        v = g("dtype")
        dtype_(intern(v) if v is not None else intern(_types(g("Input type"))))
        op = g("op")
        if op is not None:  # a task written by our exporter
            a_cols[0](intern(op))
            v = g("step", -1)
            a_cols[1](v if type(v) is int else -1)
            v = g("task_id", -1)
            a_cols[2](v if type(v) is int else -1)
            a_cols[3](intern(g("graph", "")))
            a_cols[4](intern(g("scope", "")))
            a_cols[5](intern(g("phase", "")))
            a_cols[6](-1), a_cols[7](-1), a_cols[8](-1)
        elif "iteration_interval_ms" in args:  # a step slice written by our exporter
            a_cols[0](intern(g("fp_start_op", "")))
            v = g("step", -1)
            a_cols[1](v if type(v) is int else -1)
            a_cols[2](-1), a_cols[3](0)
            a_cols[4](intern(g("bp_end_op", "")))
            a_cols[5](0)
            v = g("epoch", -1)
            a_cols[6](v if type(v) is int else -1)
            a_cols[7](_ns_of_ms(g("iteration_interval_ms")))
            a_cols[8](_ns_of_ms(g("fp_bp_ms")))
        else:
            for a, d in zip(a_cols, A_DEFAULTS):
                a(d)

    def _meta(self, e: dict) -> None:
        name, args = e.get("name"), e.get("args") or {}
        pid, tid = e.get("pid"), e.get("tid")
        if name == "process_name":
            self.process_names[pid] = _text(args.get("name", ""))
        elif name == "process_labels":
            self.process_labels[pid] = _text(args.get("labels", ""))
        elif name == "thread_name":
            self.thread_names[(pid, tid)] = _text(args.get("name", ""))
        elif name in ("process_sort_index", "thread_sort_index"):
            pass
        else:
            self.skipped[f"metadata events ({_text(name)[:40]})"] += 1

    def _mem(self, e: dict, ts) -> None:
        a = e.get("args") or {}
        M = self.memory.lists

        def num(key):
            v = a.get(key, -1)
            return v if type(v) is int else (int(v) if type(v) is float else -1)

        M["ts"].append(round(ts * 1000))
        M["lane"].append(self.lane(e.get("pid"), e.get("tid")))
        M["addr"].append(num("Addr"))
        M["bytes"].append(num("Bytes"))
        M["allocated"].append(num("Total Allocated"))
        M["reserved"].append(num("Total Reserved"))
        M["dev_type"].append(num("Device Type"))
        M["dev_id"].append(num("Device Id"))
        if len(M["ts"]) >= FLUSH:
            self.memory.flush()

    def _begin_end(self, e: dict, ph: str, ts, skipped) -> None:
        ln = self.lane(e.get("pid"), e.get("tid"))
        stack = self.open.setdefault(ln, [])
        if ph == "B":
            stack.append((ts, e))
            return
        if not stack:
            skipped["E events without a matching B"] += 1
            return
        t0, b = stack.pop()
        x = dict(b)
        x.update({"ph": "X", "ts": t0, "dur": max(ts - t0, 0)})
        if e.get("args"):
            x["args"] = {**(b.get("args") or {}), **e["args"]}
        self.feed([x])
        self.n_events -= 1

    def finish(self) -> None:
        for stack in self.open.values():
            if stack:
                self.skipped["B events without a matching E"] += len(stack)
        self.open.clear()
        self.slices.flush()
        self.flows.flush()
        self.memory.flush()


def _number(v, k: int, field: str, e: dict):
    from insight.importer.reader import BadEvent

    if v is None:
        raise BadEvent(k, f"{_text(e.get('ph'))!r} event {_text(e.get('name', ''))[:60]!r} has no \"{field}\"")
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise BadEvent(k, f"{_text(e.get('ph'))!r} event {_text(e.get('name', ''))[:60]!r}: \"{field}\" is "
                      f"{_text(v)[:30]!r}, not a number")
