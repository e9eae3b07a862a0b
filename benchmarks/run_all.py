#!/usr/bin/env python
"""Run every benchmark in its quick mode, one after the other, and print ONE table of their goals.

    cd /work/main && python benchmarks/run_all.py [--only a,b] [--skip a,b] [--json PATH] [--markdown]
                                                 [--timeout 900] [--log-dir DIR] [--list]
    python benchmarks/run_all.py --from-json PATH [--markdown]      # the table of an earlier run, nothing run

Each benchmark runs as a subprocess (``python benchmarks/<name>.py <quick args> --summary TMPFILE``, from the
project root) and writes its rows in the format of ``benchmarks/_summary.py``. The table has one line per
row -- metric, ours, reference, ratio, goal, met / MISSED (or blank for figures that are only reported) --
and, per benchmark, its wall time, the 1-minute load average before and after it and the share of the CPUs
that OTHER processes used while it ran (``/proc/stat`` minus the benchmark's own CPU time): the benchmarks
interleave what they compare, but on a shared 2-core machine their figures are still only indicative.

A benchmark that fails (non-zero exit, timeout, no or unreadable summary, a script without ``--summary``)
is one FAILED row with the last line of its stderr, and the run goes on. The exit status is 1 when any
benchmark failed and 0 otherwise: a missed goal is a result, reported in the table, not a failure.
``--json PATH`` writes the whole run (commands, times, loads, rows, errors); ``--markdown`` prints the
table as Markdown (for benchmarks/README.md). Progress goes to stderr, the table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Every benchmark and its quick mode, run in this order. Each command gets `--summary PATH` appended; the goals
# are stated by each benchmark (see benchmarks/README.md). About 10 minutes in all at load 8 on the 2-core
# machine (the budget is 15): bench_fusion and bench_profiler (~140 s each, BERT-small), bench_gnn (~70 s) and
# bench_timeline at the 10M tasks (~45 s) take most of it.
QUICK = [
    ("bench_vs_torch", "--rounds 10 --steps-per-round 10"),
    ("bench_fusion", "--quick"),
    ("bench_profiler", "--rounds 8 --repeats 2 --epochs 2 --steps 5000"),
    ("bench_quant", "--quick"),
    ("bench_import", "--events 200000"),
    ("bench_writer", "--quick"),
    ("bench_gnn", "--rounds 3 --epochs 5 --wall-epochs 20"),
    ("bench_wide_deep", "--quick"),
    ("bench_data_parallel", "--quick"),
    ("bench_timeline", "--tasks 10000000"),
    ("bench_executor", "--rounds 15 --steps 20"),
]

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
COLUMNS = ("benchmark", "time", "load before -> after (others' CPU)", "metric", "ours", "reference", "ratio",
           "goal", "result")


# -- running ------------------------------------------------------------------------------------------------
def _cpu_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return "(no output)"


def _read_summary(path: Path, name: str) -> list[dict]:
    """The rows of a benchmark's summary file; ValueError naming the problem when it is unusable."""
    if not path.exists() or path.stat().st_size == 0:
        raise ValueError("exited 0 but wrote no summary")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"summary is not JSON: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError("summary has no rows")
    for k, r in enumerate(rows):
        missing = [f for f in ("metric", "ours", "goal", "met") if not isinstance(r, dict) or f not in r]
        if missing:
            raise ValueError(f"summary row {k} lacks {', '.join(missing)}")
    if doc.get("benchmark") not in (None, name):
        raise ValueError(f"summary names benchmark {doc.get('benchmark')!r}, expected {name!r}")
    return rows


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the benchmark and everything it started (its own process group, e.g. mpirun's ranks)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(name: str, args: str, bench_dir: Path, timeout: float, log_dir: Path | None) -> dict:
    """Run one benchmark's quick mode; a dict with its command, time, loads, status and rows (or error)."""
    script = bench_dir / f"{name}.py"
    rec = {"benchmark": name, "command": f"python {_display(script)} {args}".strip(), "status": "failed",
           "returncode": None, "seconds": 0.0, "load_before": round(os.getloadavg()[0], 2), "load_after": None,
           "others_cpu": None, "rows": [], "error": ""}
    if not script.exists():
        rec["error"] = f"{_display(script)} not found"
        return rec
    if "--summary" not in script.read_text(errors="replace"):
        rec["error"] = f"{script.name} has no --summary support yet (not run)"
        return rec
    with tempfile.TemporaryDirectory(prefix=f"run-all-{name}-") as tmp:
        summary = Path(tmp) / "summary.json"
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        cmd = [sys.executable, str(script), *shlex.split(args), "--summary", str(summary)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                           if p)}
        busy0, cpu0, t0 = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rec["error"] = f"timed out after {timeout:.0f} s"
            except BaseException:  # Ctrl-C: do not leave a benchmark running
                _kill_group(proc)
                raise
        wall = time.perf_counter() - t0
        busy1, cpu1 = _cpu_busy_s(), _children_cpu_s()
        rec["seconds"] = round(wall, 1)
        rec["load_after"] = round(os.getloadavg()[0], 2)
        rec["returncode"] = proc.returncode
        if busy0 is not None and busy1 is not None and wall > 0:
            others = ((busy1 - busy0) - (cpu1 - cpu0)) / ((os.cpu_count() or 1) * wall)
            rec["others_cpu"] = round(min(max(others, 0.0), 1.0), 3)
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{name}.log").write_text(f"$ {shlex.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
        if rec["error"]:
            pass
        elif proc.returncode != 0:
            rec["error"] = f"exit {proc.returncode}: {_last_line(stderr, stdout)}"
        else:
            try:
                rec["rows"] = _read_summary(summary, name)
                rec["status"] = "ok"
            except ValueError as e:
                rec["error"] = str(e)
        if rec["status"] != "ok":
            rec["stderr_tail"] = stderr.splitlines()[-30:]
    return rec


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def select(only: str, skip: str, names: list[str]) -> list[str]:
    """The benchmarks to run, in the list's order; ValueError naming any unknown benchmark."""
    def parse(text):
        chosen = [n.strip().removesuffix(".py") for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return chosen

    keep = parse(only) if only else names
    drop = set(parse(skip)) if skip else set()
    return [n for n in names if n in keep and n not in drop]


# -- the table -------------------------------------------------------------------------------------------
def fmt(x) -> str:
    """A figure at a readable precision: 30,422 / 457 / 12.3 / 1.50 / 0.558 / 0.0079 / 2.4e-07."""
    if x is None:
        return ""
    x = float(x)
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2g}"


def _with_unit(x, unit: str) -> str:
    s = fmt(x)
    return f"{s} {unit}" if s and unit else s


def _judged(x, goal: str) -> str:
    """``fmt(x)``, with more digits when the rounded figure would read as the goal's bound (1.1538 vs
    "<= 1.15" shows 1.154, not 1.15 MISSED)."""
    s = fmt(x)
    bound = goal.strip().partition(" ")[2]
    try:
        if s and bound and float(s.replace(",", "")) == float(bound) and float(x) != float(bound):
            return f"{float(x):.4g}"
    except ValueError:
        pass
    return s


def _result(r: dict) -> str:
    return {True: "met", False: "MISSED", None: ""}[r.get("met")]


def table(report: dict) -> list[list[str]]:
    """The cells of the table, one list per line (COLUMNS); a benchmark's own cells on its first line."""
    lines = []
    for b in report["benchmarks"]:
        load = f"{b['load_before']:.2f} -> {b['load_after']:.2f}" if b.get("load_after") is not None else ""
        if b.get("others_cpu") is not None:
            load += f" ({b['others_cpu'] * 100:.0f} %)"
        head = [b["benchmark"], f"{fmt(b['seconds'])} s" if b.get("returncode") is not None else "", load]
        if b["status"] != "ok":
            lines.append(head + [f"FAILED: {b['error']}", "", "", "", "", "FAILED"])
            continue
        for k, r in enumerate(b["rows"]):
            unit, goal = r.get("unit", ""), r.get("goal", "")
            judged_ours = r.get("ratio") is None  # the goal is on ours when there is no ratio
            ours = _judged(r["ours"], goal) if judged_ours else fmt(r["ours"])
            lines.append((head if k == 0 else ["", "", ""])
                         + [r["metric"], f"{ours} {unit}".strip() if ours else "",
                            _with_unit(r.get("reference"), unit),
                            "" if judged_ours else _judged(r["ratio"], goal), goal, _result(r)])
    return lines


def counts(report: dict) -> dict:
    rows = [r for b in report["benchmarks"] for r in b["rows"]]
    return {"benchmarks": len(report["benchmarks"]),
            "failed": [b["benchmark"] for b in report["benchmarks"] if b["status"] != "ok"],
            "met": sum(r.get("met") is True for r in rows), "missed": sum(r.get("met") is False for r in rows),
            "reported": sum(r.get("met") is None for r in rows)}


def footer(report: dict) -> str:
    c = counts(report)
    failed = f"{len(c['failed'])} failed ({', '.join(c['failed'])})" if c["failed"] else "none failed"
    return (f"{c['benchmarks']} benchmarks in {report['total_s']:.0f} s: {c['met']} goals met, {c['missed']} missed, "
            f"{c['reported']} figures reported without a goal; {failed}. Load (1 min) {report['load_start']:.2f} "
            f"at the start, {report['load_end']:.2f} at the end, {report['cpus']} CPUs; commit "
            f"{report.get('commit') or '?'}.")


def format_text(report: dict, width: int = 110) -> str:
    lines = [[c if len(c) <= width else c[:width - 3] + "..." for c in line] for line in table(report)]
    widths = [max([len(h)] + [len(ln[i]) for ln in lines]) for i, h in enumerate(COLUMNS)]
    right = {4, 5, 6}  # figures

    def fmt_line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt_line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [fmt_line(ln).rstrip() for ln in lines]
    return "\n".join(out + ["", footer(report)])


def format_markdown(report: dict) -> str:
    def cell(c):
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(cell(c) for c in ln) + " |" for ln in table(report)]
    return "\n".join(out + ["", footer(report)])


def _commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


# -- main -----------------------------------------------------------------------------------------------
def run(names: list[str], bench_dir: Path, timeout: float, log_dir: Path | None) -> dict:
    quick = dict(QUICK)
    report = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "cpus": os.cpu_count(), "python": sys.executable, "commit": _commit(),
              "load_start": round(os.getloadavg()[0], 2), "benchmarks": []}
    t0 = time.perf_counter()
    for k, name in enumerate(names, 1):
        print(f"[{k:2d}/{len(names)}] {name} {quick[name]} ...", file=sys.stderr, flush=True)
        rec = run_one(name, quick[name], bench_dir, timeout, log_dir)
        report["benchmarks"].append(rec)
        what = f"ok, {len(rec['rows'])} rows" if rec["status"] == "ok" else f"FAILED: {rec['error']}"
        ran = f" ({rec['seconds']:.0f} s, load {rec['load_before']:.2f} -> {rec['load_after']:.2f})" \
            if rec["load_after"] is not None else ""
        print(f"        {what}{ran}", file=sys.stderr, flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["load_end"] = round(os.getloadavg()[0], 2)
    report["counts"] = counts(report)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", metavar="A,B", help="run just these benchmarks (names as in --list)")
    ap.add_argument("--skip", default="", metavar="A,B", help="leave these benchmarks out")
    ap.add_argument("--json", metavar="PATH", help="also write the whole run as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark before it is stopped (900)")
    ap.add_argument("--log-dir", metavar="DIR", help="keep each benchmark's stdout and stderr here as NAME.log")
    ap.add_argument("--bench-dir", default=str(BENCH_DIR), help=argparse.SUPPRESS)  # tests: fake benchmarks
    ap.add_argument("--list", action="store_true", help="print the quick commands and exit")
    ap.add_argument("--from-json", metavar="PATH", help="print the table of an earlier --json run; run nothing")
    a = ap.parse_args(argv)
    names = [n for n, _ in QUICK]
    if a.list:
        for n, args in QUICK:
            print(f"python benchmarks/{n}.py {args} --summary PATH")
        return 0
    if a.from_json:
        try:
            report = json.loads(Path(a.from_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--from-json {a.from_json}: {e}")
    else:
        try:
            chosen = select(a.only, a.skip, names)
        except ValueError as e:
            ap.error(str(e))
        if not chosen:
            ap.error("--only / --skip left no benchmark to run")
        report = run(chosen, Path(a.bench_dir), a.timeout, Path(a.log_dir) if a.log_dir else None)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
    print(format_markdown(report) if a.markdown else format_text(report))
    if a.json and not a.from_json:
        print(f"wrote {a.json}", file=sys.stderr)
    return 1 if counts(report)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
