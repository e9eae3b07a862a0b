"""The insight command line: report, runs, export, demo, and one-line errors with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from insight.cli import main
from synthetic_runs import set_manifest, training_run, truncate

ROOT = Path(__file__).resolve().parents[1]
SLOW_MAP = (
    {"op_id": 0, "op_type": "batch", "parent_id": -1, "num_workers": 1, "queue_capacity": 16, "depths": [0, 0, 1]},
    {"op_id": 1, "op_type": "map", "parent_id": 0, "num_workers": 1, "queue_capacity": 16, "depths": [0, 1]},
    {"op_id": 2, "op_type": "numpy_slices", "parent_id": 1, "num_workers": 1, "queue_capacity": 16, "depths": [16]},
)


def test_report(tmp_path, capsys):
    r = training_run(tmp_path, "rep", allreduce_us=300, pipeline=SLOW_MAP)
    assert main(["report", str(r.path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Run rep" in out and "5 steps (1..5); averages over 4, step 1 excluded" in out
    assert "iteration interval    1.000 ms" in out and "fp+bp                 2.100 ms" in out
    assert "conv2d_1 -> conv2d_grad_5" in out
    assert "Top op types (of 8" in out and "Top ops (of 10)" in out
    top_types = out.split("Top op types")[1].split("Top ops")[0]
    assert "get_next" in top_types and "relu" not in top_types  # only the top 3
    assert "verdict: data processing is the bottleneck; bottleneck op: map op #1" in out
    assert "input-bound: highly" in out
    assert "Memory: peak 17.0 MiB of 64.0 MiB (26.6%) at step 3" in out and "big_tensor" in out
    assert "[critical] Data processing is the bottleneck: map op #1" in out and "num_parallel_workers" in out


def test_runs_lists_runs_and_survives_a_bad_one(tmp_path, capsys):
    training_run(tmp_path, "alpha")
    training_run(tmp_path, "beta", n_steps=3, interval_us=2000)
    bad = training_run(tmp_path, "gamma")
    truncate(bad.path / "rank_0" / "steps.parquet")
    (tmp_path / "not_a_run").mkdir()
    assert main(["runs", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert lines[0].split() == ["name", "created", "steps", "avg", "step", "device", "status"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"alpha", "beta", "gamma"}
    # interval + fp+bp (2.1 ms) + tail (two 0.1 ms updates), first step excluded
    assert "3.300 ms" in rows["alpha"] and "complete" in rows["alpha"] and "Ascend" in rows["alpha"]
    assert "4.300 ms" in rows["beta"] and " 3 " in rows["beta"]
    assert "unreadable" in rows["gamma"]
    assert cap.err.count("\n") == 1 and "gamma" in cap.err and "steps.parquet" in cap.err


def test_export_chrome_and_csv(tmp_path, capsys):
    r = training_run(tmp_path, "ex")
    out = tmp_path / "trace.json.gz"
    assert main(["export", str(r.path), "--format", "chrome", "--gzip", "--output", str(out)]) == 0
    import gzip
    doc = json.load(gzip.open(out))
    assert sum(e["ph"] == "X" and e["cat"] not in ("step", "step_phase") for e in doc["traceEvents"]) == r.n_tasks
    assert main(["export", str(r.path), "--format", "csv", "--output", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "op_stats.csv").exists() and "CSV files" in capsys.readouterr().out


def _damage(kind, run):
    if kind == "truncated":
        truncate(run / "rank_0" / "tasks.parquet")
        return "rank_0/tasks.parquet"
    if kind == "no-manifest":
        (run / "manifest.json").unlink()
        return "no manifest.json"
    if kind == "newer-schema":
        set_manifest(run, schema_version=2)
        return "schema version 2 is newer"
    if kind == "bad-manifest":
        (run / "manifest.json").write_text("{not json")
        return "not valid JSON"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "no-manifest", "newer-schema", "bad-manifest"])
@pytest.mark.parametrize("command", [["report"], ["export", "--format", "chrome"], ["export", "--format", "csv"]])
def test_bad_runs_give_one_line_and_exit_2(tmp_path, capsys, kind, command):
    r = training_run(tmp_path, "dmg")
    expect = _damage(kind, r.path)
    args = [command[0], str(r.path), *command[1:], "--output", str(tmp_path / "out")] if command[0] == "export" \
        else [command[0], str(r.path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err


def test_errors_through_the_real_entry_point(tmp_path):
    """As a user runs it: a subprocess, exit code 2, one line on stderr, no traceback."""
    r = training_run(tmp_path, "sub")
    truncate(r.path / "rank_0" / "steps.parquet")
    cases = [["report", str(r.path)], ["report", str(tmp_path / "missing")], ["runs", str(tmp_path / "nowhere")],
             ["export", str(r.path), "--output", str(tmp_path / "x.json")]]
    code = "import sys; from insight.cli import main; sys.exit(main(sys.argv[1:]))"
    for args in cases:
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and p.stderr.startswith("insight "), p.stderr
    assert not (tmp_path / "x.json").exists()


def test_demo_profiles_a_run_and_reports_it(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--output", str(tmp_path), "--name", "d"]) == 0
    out = capsys.readouterr().out
    assert "data sink mode" in out and "test accuracy" in out and str(tmp_path / "d") in out
    assert main(["report", str(tmp_path / "d")]) == 0
    rep = capsys.readouterr().out
    assert "Step trace:" in rep and "map" in rep and "numpy_slices" in rep and "GetNext" in rep
    assert main(["demo", "--epochs", "1", "--output", str(tmp_path), "--name", "d"]) == 2  # the run exists
    assert capsys.readouterr().err.count("\n") == 1
