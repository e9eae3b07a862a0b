"""insight.trace, the one reader: a run loaded once (each column read once, analyses memoised on the run),
and every read of an untrusted run directory ending in one TraceError line naming the run and the file."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import insight.analysis as A
from insight import trace
from insight.trace import TraceError, discover_runs, open_run
from synthetic_runs import set_manifest, training_run


@pytest.fixture
def run(tmp_path):
    return training_run(tmp_path, "r", allreduce_us=300, empty_steps=(3,))


# -- one loaded run ---------------------------------------------------------------------------------------
def test_overview_computes_the_breakdown_once_and_reads_each_column_once(run, monkeypatch):
    from insight.analysis import steps

    calls = []
    real = steps._breakdown
    monkeypatch.setattr(steps, "_breakdown", lambda *a: calls.append(1) or real(*a))
    reads = []
    real_read = trace.Run._read_columns
    monkeypatch.setattr(trace.Run, "_read_columns",
                        lambda self, e, names: reads.extend((str(e.files[0]), c) for c in names) or
                        real_read(self, e, names))
    r = open_run(run.path)
    ov = A.overview(r)
    assert len(calls) == 1
    assert ov.summary == A.summarize(ov.breakdown) and ov.pipeline is A.data_pipeline(r)
    assert ov.advice == A.recommendations(r) and len(calls) == 1
    A.op_stats(r), A.memory_peak(r), A.step_summary(r)
    assert len(calls) == 1
    assert len(reads) == len(set(reads)) > 0  # every column of every table read once
    # the public functions still take a path: a fresh load each time
    assert A.step_summary(run.path).steps == ov.summary.steps and len(calls) == 2


def test_a_table_read_from_parts_equals_the_compacted_one(tmp_path):
    parts = training_run(tmp_path, "parts", parts=4)
    one = training_run(tmp_path, "one")
    a = A.op_stats(parts.path).drop(columns=["graph"])
    b = A.op_stats(one.path).drop(columns=["graph"])
    pd.testing.assert_frame_equal(a, b)


# -- hostile manifests: one TraceError line naming the run and the file ----------------------------------------
def _raw_manifest(path: Path, text: str) -> None:
    (path / "manifest.json").write_text(text)


BAD_FIELDS = [
    ({"schema_version": "1"}, "schema_version must be an integer, got '1'"),
    ({"schema_version": True}, "schema_version must be an integer, got True"),
    ({"schema_version": -7}, "schema_version must be 1 or more, got -7"),
    ({"schema_version": 0}, "schema_version must be 1 or more"),
    ({"device": "x"}, "device"),
    ({"device": {"target": "Ascend", "capacity_bytes": "lots"}}, "device.capacity_bytes"),
    ({"ranks": 5}, "ranks"),
    ({"ranks": "abc"}, "ranks"),
    ({"ranks": [-1]}, "ranks"),
    ({"streams": "abc"}, "streams"),
    ({"streams": [{"stream_id": "zero", "name": "aicore0"}]}, "streams.0.stream_id"),
    ({"start_perf_ns": "abc"}, "start_perf_ns"),
    ({"step_count": 1.5}, "step_count"),
    ({"name": ["x"]}, "name"),
    ({"tables": {"tasks": 3}}, "tables.tasks"),
]


@pytest.mark.parametrize("fields,phrase", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_manifest_with_wrong_types_is_one_line(run, fields, phrase):
    set_manifest(run.path, **fields)
    for fn in (open_run, A.step_summary, A.overview):
        with pytest.raises(TraceError) as e:
            fn(run.path)
        msg = str(e.value)
        assert phrase in msg and "manifest.json" in msg and str(run.path) in msg and "\n" not in msg
        assert "newer than" not in msg


@pytest.mark.parametrize("text,phrase", [
    ('{"schema_version": 1' + "0" * 5000 + "}", "digits"),
    ('{"schema_version": 1, "options": ' + "[" * 5000 + "]" * 5000 + "}", "nested 5001 levels"),
    ('{"schema_version": 1, "options": {"a": ' + '{"a": ' * 100 + "1" + "}" * 101 + "}", "nested"),
    ('{"schema_version": 1, "x": "' + "a" * (2 << 20) + '"}', "larger than"),
    ("[1, 2]", "not a JSON object"),
    ('{"schema_version": 1,', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ('{"name": "x"}', "has no schema_version"),
    ('{"schema_version": 99}', "schema version 99 is newer"),
])
def test_hostile_manifest_text_is_one_line(run, text, phrase):
    _raw_manifest(run.path, text)
    with pytest.raises(TraceError) as e:
        open_run(run.path)
    msg = str(e.value)
    assert phrase in msg and "manifest.json" in msg and "\n" not in msg and len(msg) < 400


def test_manifest_nulls_and_unknown_fields_are_accepted(run):
    set_manifest(run.path, device=None, options=None, streams=None, future_field={"x": [1, 2]})
    r = open_run(run.path)
    assert r.manifest["device"]["capacity_bytes"] == 0 and r.manifest["future_field"] == {"x": [1, 2]}
    assert A.step_summary(r).steps == 5


def test_complete_run_without_rank_0_is_an_error(run):
    import shutil
    shutil.rmtree(run.path / "rank_0")
    with pytest.raises(TraceError, match="complete with 5 steps, but rank_0/ is missing"):
        A.step_summary(run.path)
    set_manifest(run.path, status="running", step_count=0)  # a run that has not flushed yet: no steps
    assert A.step_summary(run.path).steps == 0


# -- tables checked against docs/trace-format.md ---------------------------------------------------------------
def test_string_times_name_the_file_and_column(tmp_path):
    for col in ("dur_ns", "start_ns"):
        r = training_run(tmp_path, f"s_{col}")
        p = r.path / "rank_0" / "tasks.parquet"
        pd.read_parquet(p).assign(**{col: "soon"}).to_parquet(p)
        for fn in (A.op_stats, A.load_timeline, A.step_breakdown):
            with pytest.raises(TraceError) as e:
                fn(r.path)
            assert f"rank_0/tasks.parquet: column {col!r} holds strings, expected integers" in str(e.value)


def test_the_bad_part_file_is_named(tmp_path):
    r = training_run(tmp_path, "parts", parts=3)
    p = r.path / "rank_0" / "tasks" / "part-00001.parquet"
    pd.read_parquet(p).assign(end_ns=lambda d: d["end_ns"].astype(str)).to_parquet(p)
    with pytest.raises(TraceError) as e:
        A.op_stats(r.path)
    assert "part-00001.parquet: column 'end_ns'" in str(e.value) and "part-00000" not in str(e.value)
    r2 = training_run(tmp_path, "parts2", parts=3)
    p = r2.path / "rank_0" / "tasks" / "part-00002.parquet"
    pd.read_parquet(p).drop(columns=["start_ns"]).to_parquet(p)
    with pytest.raises(TraceError, match="part-00002.parquet has no column 'start_ns'"):
        A.op_stats(r2.path)


def test_other_tables_are_checked_too(run):
    p = run.path / "rank_0" / "memory.parquet"
    pd.read_parquet(p).assign(size="big").to_parquet(p)
    with pytest.raises(TraceError, match="memory.parquet: column 'size' holds strings"):
        A.memory_peak(run.path)
    assert A.step_summary(run.path).steps == 5  # the other tables still read


# -- symbolic links never lead out of the run directory --------------------------------------------------------
@pytest.mark.parametrize("what", ["manifest.json", "rank_0", "rank_0/steps.parquet", "rank_0/tasks.parquet"])
def test_symlinks_leaving_the_run_are_refused(tmp_path, what):
    outside = training_run(tmp_path / "elsewhere", "secret")
    r = training_run(tmp_path / "base", "victim")
    target = r.path / what
    if target.is_dir():
        import shutil
        shutil.rmtree(target)
    else:
        target.unlink()
    os.symlink(outside.path / what, target)
    with pytest.raises(TraceError) as e:
        A.overview(r.path)
        A.op_stats(r.path)
        A.load_timeline(r.path)
    assert "is a symbolic link leaving the run directory" in str(e.value)
    assert what.split("/")[-1] in str(e.value)


def test_symlinks_inside_the_run_are_fine(run):
    p = run.path / "rank_0" / "steps.parquet"
    (run.path / "data").mkdir()
    os.replace(p, run.path / "data" / "steps.parquet")
    os.symlink(run.path / "data" / "steps.parquet", p)
    assert A.step_summary(run.path).steps == 5


# -- compaction while reading ------------------------------------------------------------------------------
def test_a_run_compacted_while_it_is_read(tmp_path, monkeypatch):
    r = training_run(tmp_path, "live", parts=4)
    run = open_run(r.path)
    parts = run.table_files("tasks")
    assert len(parts) == 4 and run.schema_names("tasks")  # listed: the parts

    def compact():  # what Profiler.stop() does: the single file appears, then the parts go
        t = pd.concat([pd.read_parquet(f) for f in parts], ignore_index=True)
        t.to_parquet(r.path / "rank_0" / ".tasks.tmp")
        os.replace(r.path / "rank_0" / ".tasks.tmp", r.path / "rank_0" / "tasks.parquet")
        for f in parts:
            f.unlink()
        (r.path / "rank_0" / "tasks").rmdir()

    compact()
    assert A.op_stats(run)["total_ns"].sum() == r.task_total_ns
    assert run.table_files("tasks") == [r.path / "rank_0" / "tasks.parquet"]


def test_reads_race_a_compaction(tmp_path):
    """Many reads while the run's tables are compacted under them: every read is right or retried."""
    r = training_run(tmp_path, "race", parts=6)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                assert A.op_stats(r.path)["total_ns"].sum() == r.task_total_ns
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    base = r.path / "rank_0"
    parts = sorted((base / "tasks").glob("part-*.parquet"))
    t = pd.concat([pd.read_parquet(f) for f in parts], ignore_index=True)
    t.to_parquet(base / ".tmp")
    os.replace(base / ".tmp", base / "tasks.parquet")
    for f in parts:
        f.unlink()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]


# -- discovery: one bad run never hides the others -------------------------------------------------------------
def test_discover_runs_lists_broken_runs_beside_healthy_ones(tmp_path):
    base = tmp_path / "base"
    training_run(base, "good")
    training_run(base, "good2")
    set_manifest(training_run(base, "badtype").path, device="x")
    _raw_manifest(training_run(base, "deep").path, '{"schema_version": 1, "o": ' + "[" * 3000 + "]" * 3000 + "}")
    _raw_manifest(training_run(base, "huge").path, '{"schema_version": 1' + "0" * 5000 + "}")
    outside = training_run(tmp_path / "elsewhere", "secret")
    os.symlink(outside.path, base / "linked")
    entries = {e.id: e for e in discover_runs(base)}
    assert set(entries) == {"good", "good2", "badtype", "deep", "huge", "linked"}
    assert entries["good"].ok and entries["good2"].ok
    for bad, phrase in (("badtype", "device"), ("deep", "nested"), ("huge", "digits"),
                        ("linked", "symbolic link leaving the base directory")):
        assert not entries[bad].ok and phrase in entries[bad].error and "\n" not in entries[bad].error, bad


def test_odd_files_and_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a FIFO where a table should be: refused, never opened (opening it would block)
    r = training_run(tmp_path, "fifo")
    p = r.path / "rank_0" / "tasks.parquet"
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(TraceError, match="tasks.parquet is not a regular file"):
        A.op_stats(r.path)
    # unsigned and small integer columns read as int64; a table announced twice has one row per op
    r2 = training_run(tmp_path, "types")
    p = r2.path / "rank_0" / "device_queue.parquet"
    t = pq.read_table(p)
    t = t.set_column(t.column_names.index("wait_ns"), "wait_ns", pa.array(t.column("wait_ns").to_numpy().astype(np.uint64)))
    pq.write_table(t, p)
    p = r2.path / "rank_0" / "dataset_pipeline.parquet"
    pd.concat([pd.read_parquet(p)] * 2).to_parquet(p)
    rep = A.data_pipeline(r2.path)
    assert list(rep.ops["op_id"]) == [0, 1, 2] and rep.device_queue_pops == 4
    # a column a later part file added is read, with its missing value in the earlier parts
    r3 = training_run(tmp_path, "added", parts=2)
    p = r3.path / "rank_0" / "tasks" / "part-00000.parquet"
    pd.read_parquet(p).drop(columns=["fused_ops"]).to_parquet(p)
    run = open_run(r3.path)
    assert "fused_ops" in run.schema_names("tasks") and A.op_stats(run)["total_ns"].sum() == r3.task_total_ns


def test_reading_a_run_while_the_profiler_records_and_compacts_it(tmp_path, digits):
    """Readers polling a run while insight.Profiler flushes parts and stop() compacts them: every read is a
    complete answer (never a vanished part file)."""
    from insight import Profiler
    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.models import LeNetDigits

    xtr, ytr, _, _ = digits
    context.set_context(mode=context.GRAPH_MODE, seed=0)
    net = LeNetDigits(channels=(4, 8), hidden=16)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    ds = NumpySlicesDataset((xtr[:640], ytr[:640]), ["image", "label"], shuffle=True, seed=0).batch(32)
    run_dir = tmp_path / "live"
    stop = threading.Event()
    errors, reads = [], []

    def poll():
        while not stop.is_set():
            if not (run_dir / "manifest.json").exists():
                continue
            try:
                r = open_run(run_dir)
                reads.append((A.step_summary(r).steps, int(A.op_stats(r)["calls"].sum()) if r.has_table("tasks") else 0))
                A.load_timeline(r)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t = threading.Thread(target=poll)
    t.start()
    try:
        with Profiler(run_dir, flush_interval=0.05):
            model.train(2, ds, dataset_sink_mode=True)
        for _ in range(20):  # and right after stop(): the compacted files
            poll_once = open_run(run_dir)
            A.op_stats(poll_once)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert len(reads) > 3 and reads[-1][0] > 0
    final = open_run(run_dir)  # read from its part files as they are: stop() rewrites nothing
    assert {f.parent for f in final.table_files("tasks")} == {run_dir / "rank_0" / "tasks"}
