"""Fuzzing run directories (issue 17): damaged and hostile manifests and Parquet tables, pushed through
``insight report``, ``insight runs``, both exports and the dashboard's data layer.

The property, for every generated run: each command exits 0 with a correct answer or exits 2 with exactly
one line on stderr; nothing raises out of ``main()`` (a traceback); the data layer returns or raises
``TraceError`` / ``RunNotFound``; nothing outside the current directory's output paths is written (the
whole temporary tree is listed before and after); nothing is read from outside the base directory (files
outside hold a marker that must never show up in any output); and a healthy run beside the broken one is
still listed and analysed.

Examples are bounded (``MAX_EXAMPLES`` per property, derandomized) so the file runs in CI in well under a
minute.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from insight.cli import main
from insight.trace import TraceError
from synthetic_runs import FWD, training_run

MAX_EXAMPLES = int(os.environ.get("INSIGHT_FUZZ_EXAMPLES", "50"))
SECRET = "SECRETOUTSIDE"  # in the data of every file outside the base dir: it must never be read
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
CSV_FILES = 11


# -- the template runs, written once -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-templates")
    good = training_run(d, "healthy", n_steps=3).path
    secret_fwd = tuple((f"{SECRET}_{n}", op, dur, f"{SECRET}/{scope}") for n, op, dur, scope in FWD)
    secret = training_run(d, "secret", n_steps=3, fwd=secret_fwd).path
    m = json.loads((secret / "manifest.json").read_text())
    m["name"] = SECRET
    (secret / "manifest.json").write_text(json.dumps(m))
    return good, secret


class World:
    """One example's temporary tree: ``base/`` (the fuzzed run ``victim`` and a healthy run), ``outside/``
    (a run with secret data that symbolic links may point to) and ``cwd/`` (where exports go)."""

    def __init__(self, templates):
        good, secret = templates
        self.root = Path(tempfile.mkdtemp(prefix="insight-fuzz-"))
        self.base = self.root / "base"
        self.run = self.base / "victim"
        self.outside = self.root / "outside"
        self.cwd = self.root / "cwd"
        shutil.copytree(good, self.run)
        shutil.copytree(good, self.base / "healthy")
        m = json.loads((self.run / "manifest.json").read_text())
        m["name"] = "victim"
        (self.run / "manifest.json").write_text(json.dumps(m))
        shutil.copytree(secret, self.outside)
        self.cwd.mkdir()

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


def tree(root: Path, skip: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for n in filenames + dirnames:
            p = Path(dirpath) / n
            if p == skip:
                continue
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns,
                                             os.readlink(p) if p.is_symlink() else None)
    return out


# -- strategies: manifests ---------------------------------------------------------------------------------
def nested(depth: int, leaf=0):
    v = leaf
    for _ in range(depth):
        v = {"a": v}
    return v


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, -7, 1, 2, 2**31, 2**63 - 1, 2**63, -2**63 - 1, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "1", "abc", "x", "-7", "1e3", "../../outside", "/etc/passwd", "rank_0/../../../outside",
                     "\x00", "ü😀\u2028", "x" * 5000, "Ascend", "complete", "running", "failed"]),
)
junk = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                  st.dictionaries(st.text(max_size=8), ch, max_size=4)),
                    max_leaves=12)
FIELDS = ["schema_version", "run_id", "name", "created", "start_perf_ns", "status", "device", "streams", "ranks",
          "step_count", "tables", "options", "runtime"]
field_values = {
    "device": st.one_of(junk, st.fixed_dictionaries({"target": junk, "capacity_bytes": junk})),
    "streams": st.one_of(junk, st.lists(st.fixed_dictionaries({"stream_id": junk, "name": junk}), max_size=3)),
    "ranks": st.one_of(junk, st.lists(st.one_of(st.integers(-3, 5), junk), max_size=4)),
    "tables": st.one_of(junk, st.dictionaries(st.sampled_from(["tasks", "steps", "x"]),
                                              st.sampled_from(["rank_0/tasks.parquet", "../../outside/manifest.json",
                                                               "/etc/passwd", ""]), max_size=3)),
}
RAW_MANIFESTS = [
    b"", b"{", b"null", b"[]", b"[1, 2]", b'"text"', b"5", b"NaN", b"\xff\xfe\x00garbage",
    b'{"schema_version": ' + b"9" * 5000 + b"}",
    b'{"schema_version": 1, "name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"schema_version": 1, "device": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"schema_version": 1, "schema_version": "1"}',
    b'\xef\xbb\xbf{"schema_version": 1}',
    b'{"schema_version": 1, "pad": "' + b"x" * (3 << 20) + b'"}',
    b'{"schema_version": 1e400}',
    b'{"schema_version": 1, "start_perf_ns": ' + b"1" * 400 + b"}",
]


@st.composite
def manifests(draw):
    kind = draw(st.sampled_from(["fields", "fields", "fields", "raw", "nested", "link"]))
    if kind == "raw":
        return ("raw", draw(st.sampled_from(RAW_MANIFESTS)))
    if kind == "nested":
        field = draw(st.sampled_from(FIELDS))
        return ("fields", {field: nested(draw(st.sampled_from([5, 40, 2000])))}, [])
    if kind == "link":
        return ("link", draw(st.sampled_from(["outside", "self", "dangling", "dir"])))
    keys = draw(st.lists(st.sampled_from(FIELDS + ["extra", "error"]), min_size=1, max_size=4, unique=True))
    changes = {k: draw(field_values.get(k, junk)) for k in keys}
    drop = draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True))
    return ("fields", changes, drop)


def apply_manifest(w: World, spec) -> None:
    p = w.run / "manifest.json"
    if spec[0] == "raw":
        p.write_bytes(spec[1])
    elif spec[0] == "link":
        p.unlink()
        target = {"outside": w.outside / "manifest.json", "self": p, "dangling": w.root / "nope.json",
                  "dir": w.outside}[spec[1]]
        p.symlink_to(target)
    else:
        _, changes, drop = spec
        m = json.loads(p.read_text())
        for k in drop:
            m.pop(k, None)
        m.update(changes)
        try:
            text = json.dumps(m)
        except (ValueError, RecursionError):  # e.g. an int beyond Python's str() digit limit
            text = '{"schema_version": 1, "name": "victim"}'
        p.write_text(text)


# -- strategies: tables ------------------------------------------------------------------------------------
TABLE_NAMES = ["tasks", "steps", "memory", "device_queue", "dataset_pipeline", "dataset_ops", "dataset_queues"]
I64 = np.iinfo(np.int64)


def _replacement(kind: str, n: int, orig: pa.ChunkedArray) -> pa.Array:
    if kind == "string":
        return pa.array([f"v{i}x" for i in range(n)], pa.string())
    if kind == "numeric_strings":
        return pa.array([str(i) for i in range(n)], pa.string())
    if kind == "float_nan":
        return pa.array([math.nan if i % 3 == 0 else (math.inf if i % 3 == 1 else 1.5) for i in range(n)], pa.float64())
    if kind == "all_null":
        return pa.nulls(n, orig.type)
    if kind == "some_null":
        return pa.array([None if i % 2 else v for i, v in enumerate(orig.to_pylist())], orig.type)
    if kind == "int_min":
        return pa.array([I64.min] * n, pa.int64())
    if kind == "int_max":
        return pa.array([I64.max - i for i in range(n)], pa.int64())
    if kind == "int_extremes":
        return pa.array([I64.min if i % 2 else I64.max for i in range(n)], pa.int64())
    if kind == "negative":
        return pa.array([-5 - i for i in range(n)], pa.int64())
    if kind == "bool":
        return pa.array([i % 2 == 0 for i in range(n)], pa.bool_())
    if kind == "list":
        return pa.array([[i, i] for i in range(n)], pa.list_(pa.int64()))
    if kind == "binary":
        return pa.array([b"\xff\x00" * (i % 3) for i in range(n)], pa.binary())
    if kind == "struct":
        return pa.array([{"a": i} for i in range(n)], pa.struct([("a", pa.int64())]))
    if kind == "timestamp":
        return pa.array(np.arange(n).astype("datetime64[ns]"), pa.timestamp("ns"))
    if kind == "uint64_huge":
        return pa.array([2**64 - 1 - i for i in range(n)], pa.uint64())
    if kind == "long_text":
        return pa.array(["\x00" + "é" * 3000 + str(i) for i in range(n)], pa.string())
    raise AssertionError(kind)


COLUMN_KINDS = ["string", "numeric_strings", "float_nan", "all_null", "some_null", "int_min", "int_max",
                "int_extremes", "negative", "bool", "list", "binary", "struct", "timestamp", "uint64_huge", "long_text"]


@st.composite
def table_damage(draw):
    table = draw(st.sampled_from(TABLE_NAMES))
    kind = draw(st.sampled_from(["columns", "columns", "columns", "drop", "empty", "bytes", "parts", "link",
                                 "rank_link", "unrelated"]))
    if kind == "columns":
        edits = draw(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(COLUMN_KINDS)), min_size=1, max_size=3))
        return (table, kind, edits)
    if kind == "drop":
        return (table, kind, draw(st.lists(st.integers(0, 30), min_size=1, max_size=4)))
    if kind == "bytes":
        return (table, kind, draw(st.sampled_from([b"", b"PAR1", b"PAR1" + b"\x00" * 64 + b"PAR1", b"\x00" * 512,
                                                   b"not parquet at all"])))
    if kind == "parts":  # a run still recording: the second part damaged
        return (table, kind, draw(st.tuples(st.integers(0, 30), st.sampled_from(COLUMN_KINDS))))
    if kind in ("link", "rank_link"):
        return (table, kind, draw(st.sampled_from(["outside", "dangling", "loop"])))
    return (table, kind, None)


def apply_table(w: World, spec) -> None:
    table, kind, arg = spec
    rank = w.run / "rank_0"
    p = rank / f"{table}.parquet"
    t = pq.read_table(p)
    n = t.num_rows
    if kind == "columns":
        for idx, ck in arg:
            i = idx % t.num_columns
            t = t.set_column(i, t.schema.field(i).name, _replacement(ck, n, t.column(i)))
        pq.write_table(t, p)
    elif kind == "drop":
        names = t.column_names
        t = t.drop_columns(sorted({names[i % len(names)] for i in arg}))
        pq.write_table(t, p)
    elif kind == "empty":
        pq.write_table(t.slice(0, 0), p)
    elif kind == "bytes":
        p.write_bytes(arg)
    elif kind == "parts":
        p.unlink()
        d = rank / table
        d.mkdir()
        half = max(n // 2, 1)
        pq.write_table(t.slice(0, half), d / "part-00000.parquet")
        rest = t.slice(half)
        i = arg[0] % rest.num_columns
        rest = rest.set_column(i, rest.schema.field(i).name, _replacement(arg[1], rest.num_rows, rest.column(i)))
        pq.write_table(rest, d / "part-00001.parquet")
    elif kind == "link":
        p.unlink()
        target = {"outside": w.outside / "rank_0" / f"{table}.parquet", "dangling": w.root / "nope.parquet",
                  "loop": p}[arg]
        p.symlink_to(target)
    elif kind == "rank_link":
        shutil.rmtree(rank)
        target = {"outside": w.outside / "rank_0", "dangling": w.root / "nope", "loop": rank}[arg]
        rank.symlink_to(target, target_is_directory=True)
    elif kind == "unrelated":
        pq.write_table(pa.table({"x": pa.array(range(5)), "y": pa.array(["a"] * 5)}), p)


# -- the property --------------------------------------------------------------------------------------------
def _texts(obj, depth=0) -> str:
    """Every string an analysis result holds (DataFrames, dataclasses, lists, dicts)."""
    if depth > 6:
        return ""
    if isinstance(obj, pd.DataFrame):
        return obj.to_csv()
    if is_dataclass(obj) and not isinstance(obj, type):
        return " ".join(_texts(getattr(obj, f.name), depth + 1) for f in fields(obj))
    if isinstance(obj, (list, tuple)):
        return " ".join(_texts(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return " ".join(_texts(v, depth + 1) for v in obj.values())
    return str(obj)


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])  # anything raised here is a traceback for the user: the test fails
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def check_one_line(rc, out, err, argv):
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("insight "), (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert SECRET not in out and SECRET not in err, (argv, "read outside the base dir", out[-500:], err)


def exercise(w: World, capsys, default_name: bool = True) -> None:
    from dashboard.data import RunNotFound, RunStore
    from insight import analysis as A

    before = tree(w.root, w.cwd)
    # report
    argv = ["report", w.run]
    rc, out, err = run_cli(capsys, argv)
    check_one_line(rc, out, err, argv)
    if rc == 0:
        assert out.startswith("Run ") and "Step trace" in out and err == ""
    # runs: the healthy run is always listed and analysed; the victim is a row either way
    argv = ["runs", w.base]
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0, (argv, err)
    assert "Traceback" not in err and SECRET not in out and SECRET not in err
    rows = out.strip().splitlines()[1:]
    healthy = [r for r in rows if r.startswith("healthy ")]
    assert len(healthy) == 1 and "3.300 ms" in healthy[0], out
    assert len(rows) == 2, out  # the victim is one row, readable or not
    # exports
    for fmt, dest in (("chrome", w.cwd / "t.json"), ("csv", w.cwd / "csv")):
        argv = ["export", w.run, "--format", fmt, "-o", dest]
        rc, out, err = run_cli(capsys, argv)
        check_one_line(rc, out, err, argv)
        if rc == 0:
            if fmt == "chrome":
                doc = json.loads(dest.read_text(encoding="utf-8"))
                assert isinstance(doc["traceEvents"], list) and all("ph" in e for e in doc["traceEvents"])
                assert SECRET not in dest.read_text(encoding="utf-8")
            else:
                files = sorted(dest.glob("*.csv"))
                assert len(files) == CSV_FILES and not any(SECRET in f.read_text() for f in files)
        else:
            assert not dest.exists(), (argv, "a failed export left output behind")
    # the default export name, from the (fuzzed) manifest: in the cwd, one entry
    old = os.getcwd()
    os.chdir(w.cwd)
    try:
        entries = set(w.cwd.iterdir())
        if default_name:
            rc, out, err = run_cli(capsys, ["export", w.run])
            check_one_line(rc, out, err, ["export", w.run])
            new = set(w.cwd.iterdir()) - entries
            assert len(new) == (1 if rc == 0 else 0), new
    finally:
        os.chdir(old)
    # the dashboard's data layer: answers or TraceError / RunNotFound, and the healthy run is unaffected
    store = RunStore(w.base, reload_interval=1e-3)
    ids = store.run_ids()
    assert "healthy" in ids
    assert len(store.get("healthy", "bd", A.step_breakdown)) == 3
    for rid in ("victim",):
        for what, fn in (("bd", A.step_breakdown), ("ops", lambda r: A.op_stats(r)), ("types", lambda r: A.op_type_stats(r)),
                         ("pipe", lambda r: A.data_pipeline(r)), ("peak", lambda r: A.memory_peak(r)),
                         ("mem", lambda r: A.memory_timeline(r)), ("tl", lambda r: A.load_timeline(r))):
            try:
                value = store.get(rid, what, fn)
            except (TraceError, RunNotFound) as e:
                assert SECRET not in str(e)
                continue
            assert SECRET not in _texts(value), (rid, what, "read outside the base dir")
    # nothing written or changed outside the cwd
    after = tree(w.root, w.cwd)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@contextmanager
def world(templates):
    w = World(templates)
    try:
        yield w
    finally:
        w.close()


# the cases issue 17 lists, and what this suite found, are always tried first
@FUZZ
@given(spec=manifests())
@example(spec=("fields", {"device": "x"}, []))
@example(spec=("fields", {"ranks": 5}, []))
@example(spec=("fields", {"ranks": "abc"}, []))
@example(spec=("fields", {"streams": "abc"}, []))
@example(spec=("fields", {"start_perf_ns": "abc"}, []))
@example(spec=("fields", {"schema_version": "1"}, []))
@example(spec=("fields", {"schema_version": True}, []))
@example(spec=("fields", {"schema_version": -7}, []))
@example(spec=("fields", {"name": "../../escape"}, []))
@example(spec=("fields", {"status": "failed", "error": "OSError: [Errno 28] No space left on device"}, []))
@example(spec=("raw", RAW_MANIFESTS[9]))
@example(spec=("raw", RAW_MANIFESTS[10]))
@example(spec=("link", "outside"))
def test_fuzzed_manifests(templates, capsys, spec):
    with world(templates) as w:
        apply_manifest(w, spec)
        exercise(w, capsys)


@FUZZ
@given(spec=table_damage())
@example(spec=("tasks", "columns", [(10, "string")]))  # start_ns as text
@example(spec=("tasks", "columns", [(12, "string")]))  # dur_ns as text
@example(spec=("tasks", "columns", [(10, "uint64_huge")]))
@example(spec=("steps", "columns", [(11, "int_extremes")]))  # sink: integers where booleans go
@example(spec=("dataset_pipeline", "columns", [(1, "all_null")]))  # op_id
@example(spec=("tasks", "columns", [(5, "some_null")]))  # kind: every other value null
@example(spec=("steps", "parts", (0, "string")))  # the second part file is the bad one
@example(spec=("steps", "link", "outside"))
@example(spec=("tasks", "rank_link", "outside"))
def test_fuzzed_tables(templates, capsys, spec):
    with world(templates) as w:
        apply_table(w, spec)
        exercise(w, capsys, default_name=False)


@settings(FUZZ, max_examples=max(MAX_EXAMPLES // 2, 1))
@given(m=manifests(), t=table_damage())
def test_fuzzed_manifest_and_table_together(templates, capsys, m, t):
    with world(templates) as w:
        apply_table(w, t)
        apply_manifest(w, m)
        exercise(w, capsys)
