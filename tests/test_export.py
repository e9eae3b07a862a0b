"""Chrome trace-event and CSV exports (insight.export)."""
import gzip
import json
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest

from insight.export import export_chrome, export_csv
from insight.trace import TraceError
from synthetic_runs import big_run, training_run, truncate

NON_TASK_X = {"step", "step_phase", "host_op"}


def check_trace(doc: dict, n_tasks: int) -> list:
    """The structural checks every export must pass; returns the events."""
    assert doc["displayTimeUnit"] == "ms" and isinstance(doc["baseTimeNanoseconds"], int)
    ev = doc["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X" and e["cat"] not in NON_TASK_X]
    assert len(xs) == n_tasks
    named_threads = {(e["pid"], e["tid"]) for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    named_procs = {e["pid"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    used = {(e["pid"], e["tid"]) for e in ev if e["ph"] in ("X", "s", "f", "B", "E", "i")}
    assert used <= named_threads
    assert {e["pid"] for e in ev} <= named_procs
    flows = defaultdict(list)
    for e in ev:
        if e["ph"] in ("s", "f"):
            flows[e["id"]].append(e)
    for fid, pair in flows.items():
        assert sorted(p["ph"] for p in pair) == ["f", "s"], fid
        s, f = sorted(pair, key=lambda p: p["ph"] != "s")
        assert f["bp"] == "e" and s["ts"] <= f["ts"]
        # each end binds to a slice on its thread that encloses its timestamp
        for p in (s, f):
            assert any(x["pid"] == p["pid"] and x["tid"] == p["tid"] and x["ts"] <= p["ts"] <= x["ts"] + x["dur"]
                       for x in xs), p
    for e in xs:
        assert e["dur"] >= 0 and isinstance(e["ts"], float)
    return ev


def test_chrome_trace_of_a_sink_run(tmp_path):
    r = training_run(tmp_path, "sink", allreduce_us=300)
    res = export_chrome(r.path, tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text()
    ev = check_trace(json.loads(text), r.n_tasks)
    assert res.task_events == r.n_tasks and res.events == len(ev) and res.bytes == len(text.encode())
    ph = Counter(e["ph"] for e in ev)
    assert ph["s"] == ph["f"] == 5  # TransferData -> GetNext for every step
    for s in [e for e in ev if e["ph"] == "s"]:
        assert s["pid"] == 1000 and s["tid"] == 4
    f_targets = {(e["pid"], e["tid"], e["ts"]) for e in ev if e["ph"] == "f"}
    gets = {(e["pid"], e["tid"], e["ts"]) for e in ev if e["ph"] == "X" and e["name"] == "GetNext"}
    assert f_targets == gets
    procs = {e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert procs == {"Ascend 0 (device)", "host (rank 0)"}
    threads = {e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert {"aicore0", "comm", "host", "Steps"} <= threads
    steps = [e for e in ev if e.get("cat") == "step"]
    assert [e["name"] for e in steps] == [f"step {s}" for s in r.steps]
    assert [round(e["dur"] * 1000) for e in steps] == r.step_time_ns
    counters = Counter(e["name"] for e in ev if e["ph"] == "C")
    assert counters["device memory"] == 1 + 5 * 4 + 2 and counters["device queue"] == 10 and counters["host queue"] == 100
    conv = next(e for e in ev if e["ph"] == "X" and e["name"] == "conv2d_1")
    assert conv["args"]["op"] == "conv2d" and conv["args"]["scope"] == "LeNet/conv1" and conv["args"]["flops"] == 2_000_000
    assert conv["dur"] == 400.0
    # microseconds with exactly three decimals in the text
    assert '"ts":7000.000,"dur":400.000' in text or '"dur":400.000' in text


def test_chrome_trace_non_sink_flows_gzip_and_parts(tmp_path):
    r = training_run(tmp_path, "feed", sink=False, parts=3, pipeline=None)
    res = export_chrome(r.path, tmp_path / "t.json.gz", gzip=True)
    with gzip.open(tmp_path / "t.json.gz", "rt") as f:
        ev = check_trace(json.load(f), r.n_tasks)
    assert res.path.name == "t.json.gz"
    flows = [e for e in ev if e["ph"] == "f"]
    first_fwd = {e["ts"] for e in ev if e["ph"] == "X" and e["name"] == "conv2d_1"}
    assert len(flows) == 5 and {e["ts"] for e in flows} == first_fwd  # feed copy -> the step's first task


def test_names_with_control_characters_stay_valid_json(tmp_path):
    nasty = 'a"b\\c\x00\x01\x1f\n\r\t\u2028ü😀</script>'
    fwd = ((nasty, "conv2d", 100, "Net/" + nasty),)
    r = training_run(tmp_path, "nasty", fwd=fwd, pipeline=None)
    export_chrome(r.path, tmp_path / "t.json")
    ev = check_trace(json.loads((tmp_path / "t.json").read_text(encoding="utf-8")), r.n_tasks)
    x = [e for e in ev if e["ph"] == "X" and e["name"] == nasty]
    assert len(x) == 5 and x[0]["args"]["scope"] == "Net/" + nasty


def test_failed_export_leaves_no_file(tmp_path):
    r = training_run(tmp_path, "bad", pipeline=None)
    truncate(r.path / "rank_0" / "tasks.parquet")
    with pytest.raises(TraceError, match="rank_0/tasks.parquet"):
        export_chrome(r.path, tmp_path / "t.json")
    assert list(tmp_path.glob("t.json*")) == []


def test_csv_export(tmp_path):
    r = training_run(tmp_path, "csv", allreduce_us=300, empty_steps=(3,))
    paths = export_csv(r.path, tmp_path / "out")
    names = {p.stem for p in paths}
    assert {"step_breakdown", "step_summary", "op_stats", "op_type_stats", "data_pipeline_ops", "device_queue_per_step",
            "memory_timeline", "memory_peak_tensors", "recommendations"} <= names
    ops = pd.read_csv(tmp_path / "out" / "op_stats.csv")
    assert ops["total_ns"].sum() == r.task_total_ns
    bd = pd.read_csv(tmp_path / "out" / "step_breakdown.csv")
    assert list(bd["step_time_ns"]) == r.step_time_ns
    rec = pd.read_csv(tmp_path / "out" / "recommendations.csv")
    assert {"id", "severity", "metric", "value", "threshold"} <= set(rec.columns) and len(rec) >= 2


def test_million_task_export_streams_in_bounded_memory(tmp_path):
    run = big_run(tmp_path, n_tasks=1_000_000, parts=4)
    out = tmp_path / "big.json"
    code = textwrap.dedent(f"""
        import json, resource, sys, tracemalloc
        import pyarrow as pa
        from insight.export import export_chrome
        tracemalloc.start()
        res = export_chrome({str(run)!r}, {str(out)!r})
        cur, peak = tracemalloc.get_traced_memory()
        print(json.dumps({{"py_peak": peak, "arrow_peak": pa.default_memory_pool().max_memory(),
                          "events": res.events, "tasks": res.task_events, "bytes": res.bytes}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    size = out.stat().st_size
    assert stats["tasks"] == 1_000_000 and stats["bytes"] == size > 150 * 2**20
    # the document never sits in memory: Python's peak is under 5% of the JSON, Arrow's (one record batch
    # read and formatted at a time) under 10%; both are independent of the number of tasks
    assert stats["py_peak"] < size / 20, stats
    assert stats["arrow_peak"] < size / 10, stats
    # one X event per task: every event is on its own line, so count lines instead of parsing 200+ MB
    n_x = n_lines = 0
    with open(out, "rb") as f:
        head = f.readline()
        assert head.startswith(b'{"displayTimeUnit":"ms","baseTimeNanoseconds":') and head.endswith(b'"traceEvents":[\n')
        for line in f:
            n_lines += 1
            if line.startswith(b'{"ph":"X","cat":"kernel"'):
                n_x += 1
                if n_x in (1, 2, 3, 500_000, 1_000_000):  # spot-check lines, including the nasty names
                    e = json.loads(line.rstrip(b",\n"))
                    assert e["dur"] == 1.5
            elif line.strip() == b"]}":
                break
    assert n_x == 1_000_000 and n_lines == stats["events"] + 1
