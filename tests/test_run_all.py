"""benchmarks/run_all.py against tiny fake benchmark scripts (no real benchmark runs here): the table, met /
MISSED, the FAILED rows, the JSON and the exit status."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"

# a well-behaved benchmark: its rows through benchmarks/_summary.py, as the real ones write them
GOOD = textwrap.dedent('''\
    import argparse
    from benchmarks._summary import row, write
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--summary")
    a = ap.parse_args()
    print("a benchmark's own output")
    write(a.summary, "bench_executor", [
        row("step / plain loop", 2.0, 2.5, unit="ms/step", goal="<= 1.1"),
        row("cache hit ratio", 0.4, unit="%", goal=">= 0.9"),
        row("rounds x steps", a.rounds * a.steps),
        row("step / max(host, device)", 11.538, 10.0, unit="ms", goal="<= 1.15"),
    ])
''')

FAILING = textwrap.dedent('''\
    import sys
    print("started fine")
    print("a warning on the way", file=sys.stderr)
    raise RuntimeError("shared data set missing: ../shared/data/planetoid/cora")  # --summary is accepted
''')

NO_SUMMARY = 'print("an old benchmark that knows no summary option")\n'

SILENT = 'import sys\nprint(sys.argv)  # accepts --summary but writes none\n'


def run_all(tmp_path, *args):
    res = subprocess.run([sys.executable, str(RUN_ALL), "--bench-dir", str(tmp_path), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    return res


def write_fakes(tmp_path):
    (tmp_path / "bench_executor.py").write_text(GOOD)
    (tmp_path / "bench_gnn.py").write_text(FAILING)
    (tmp_path / "bench_wide_deep.py").write_text(NO_SUMMARY)
    (tmp_path / "bench_timeline.py").write_text(SILENT)


def test_table_json_and_exit_status_with_a_failing_benchmark(tmp_path):
    write_fakes(tmp_path)
    out = tmp_path / "run.json"
    res = run_all(tmp_path, "--only", "bench_executor,bench_gnn,bench_wide_deep,bench_timeline,bench_writer",
                  "--json", str(out))
    assert res.returncode == 1, res.stderr  # benchmarks failed
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["benchmark", "time"] and "ratio" in lines[0] and "result" in lines[0]

    def line_of(text):
        hits = [ln for ln in lines[2:-2] if text in ln]  # the table, not its footer
        assert len(hits) == 1, (text, res.stdout)
        return hits[0]

    good = line_of("step / plain loop")
    assert good.startswith("bench_executor") and "2.00 ms/step" in good and "2.50 ms/step" in good
    assert "0.8" in good.split() and good.rstrip().endswith("met")
    missed = line_of("cache hit ratio")
    assert missed.rstrip().endswith("MISSED") and ">= 0.9" in missed and not missed.startswith("bench_")
    reported = line_of("rounds x steps")  # the quick args reached the script: 15 rounds x 20 steps
    assert "300" in reported.split() and not reported.rstrip().endswith(("met", "MISSED"))
    close = line_of("step / max(host, device)")  # not "1.15 <= 1.15 MISSED": enough digits to see why
    assert "1.154" in close.split() and close.rstrip().endswith("MISSED")
    failed = line_of("bench_gnn")
    assert "FAILED: exit 1: RuntimeError: shared data set missing: ../shared/data/planetoid/cora" in failed
    assert failed.rstrip().endswith("FAILED")
    assert "has no --summary support" in line_of("bench_wide_deep")
    assert "wrote no summary" in line_of("bench_timeline")
    assert "not found" in line_of("bench_writer")
    assert "5 benchmarks" in res.stdout and "1 goals met, 2 missed" in res.stdout
    assert "4 failed (bench_writer, bench_gnn, bench_wide_deep, bench_timeline)" in res.stdout  # run order
    assert "[ 1/5] bench_writer" in res.stderr  # progress on stderr, in the list's order

    doc = json.loads(out.read_text())
    by = {b["benchmark"]: b for b in doc["benchmarks"]}
    assert list(by) == ["bench_writer", "bench_gnn", "bench_wide_deep", "bench_timeline", "bench_executor"]
    ex = by["bench_executor"]
    assert ex["status"] == "ok" and ex["returncode"] == 0 and "--rounds 15 --steps 20" in ex["command"]
    assert [r["met"] for r in ex["rows"]] == [True, False, None, False]
    assert ex["rows"][0]["ratio"] == 0.8 and ex["seconds"] > 0 and ex["load_after"] >= 0
    assert 0 <= ex["others_cpu"] <= 1
    gnn = by["bench_gnn"]
    assert gnn["status"] == "failed" and gnn["returncode"] == 1 and "a warning on the way" in gnn["stderr_tail"]
    assert doc["counts"] == {"benchmarks": 5, "failed": ["bench_writer", "bench_gnn", "bench_wide_deep",
                                                         "bench_timeline"], "met": 1, "missed": 2, "reported": 1}

    # the same run again as Markdown, from the JSON, without running anything
    md = subprocess.run([sys.executable, str(RUN_ALL), "--from-json", str(out), "--markdown"], capture_output=True,
                        text=True, cwd=ROOT, timeout=60)
    assert md.returncode == 1 and md.stderr == ""
    rows = [ln for ln in md.stdout.splitlines() if ln.startswith("|")]
    assert rows[0].startswith("| benchmark | time |") and set(rows[1].replace(" ", "")) == {"|", "-"}
    assert len(rows) == 2 + 4 + 4 and all(r.count(" | ") == 8 for r in rows)
    assert any("| cache hit ratio | 0.4 % |" in r and r.endswith("| >= 0.9 | MISSED |") for r in rows)


def test_a_missed_goal_is_not_a_failure(tmp_path):
    write_fakes(tmp_path)
    res = run_all(tmp_path, "--only", "bench_executor")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MISSED" in res.stdout and "none failed" in res.stdout


def test_skip_and_unknown_names(tmp_path):
    write_fakes(tmp_path)
    res = run_all(tmp_path, "--only", "bench_executor,bench_gnn", "--skip", "bench_gnn")
    assert res.returncode == 0 and "bench_gnn" not in res.stdout
    bad = run_all(tmp_path, "--only", "bench_nope")
    assert bad.returncode == 2 and "unknown benchmark(s) bench_nope; known: bench_vs_torch" in bad.stderr
    listed = subprocess.run([sys.executable, str(RUN_ALL), "--list"], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 11
    assert all(ln.startswith("python benchmarks/bench_") and ln.endswith("--summary PATH")
               for ln in listed.stdout.splitlines())
