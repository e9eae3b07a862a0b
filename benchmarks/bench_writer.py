"""Benchmark of the run writer: what ``Profiler.stop()`` costs, and what reading the run costs, as a run grows.

    python benchmarks/bench_writer.py                      # 1x, 10x, 100x flushes of 20,000 task rows, 3 repeats
    python benchmarks/bench_writer.py --quick              # 5,000 task rows per flush, 1 repeat
    python benchmarks/bench_writer.py --summary out.json   # also the rows of benchmarks/_summary.py

Each run is written by ``collectors.writer.RunWriter`` from a synthetic collector whose every flush gives the
same amounts (``--rows`` tasks, half as many memory rows, one step per 100 tasks, two device-queue rows per
step, the tasks' strings dictionary-encoded as the real collectors build them). ``N`` flushes are written
(one step per 100 tasks, so 100x is ``100 * rows`` task rows); then ``stop()`` is timed as the Profiler does
it: ``stop_thread()``, the final flush (same size again), and the end of the run. Two writers:

* **new** -- the streaming writer: part files merged in the background (tiered; after each periodic flush the
  benchmark waits for the merger, as the second of training between flushes would let it), ``finish()``;
* **old** -- parts only, then the compaction the writer used to do at stop: every table's parts merged into
  ``rank_0/<table>.parquet`` and the parts removed (with today's faster merge, so the old column is if
  anything flattering).

The benchmark runs a run's flushes back to back, so the parts a merge replaced are removed at the merger's
next pass (``grace_s = 0``) instead of five seconds later: in a real run (a flush a second) ``stop()`` removes
the parts replaced in the last five seconds, a few dozen files at most whatever the run's length; here, those
replaced since the last flush.

``read`` is ``open_run`` + every column of every table as Arrow (``Run.arrow``), on a fresh ``Run``, page cache
warm for both (the best of 5, old and new interleaved; wall time, and the process's CPU time, which a busy
machine disturbs less). ``flush cpu`` / ``merge cpu``: CPU seconds of the periodic flushes and of the
background merges (what merging costs while training runs, at the lowest priority). ``stop, merge running`` is the new writer stopped right after the flush that completes 64
batches (64 is a power of the fan-in: a merge cascade through every level is then running and gets
cancelled). Medians over ``--repeats``.

Goals (issue 16): stop() does not grow with the run (100x within 2x of 1x); reading a long run is not slower
than reading the compacted one (new / old <= 1.2).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _summary  # noqa: E402
from collectors.base import Collector  # noqa: E402
from collectors.buffers import to_arrow  # noqa: E402
from collectors.schema import SCHEMAS  # noqa: E402
from collectors.writer import MANIFEST, RunWriter, merge_files, write_json_atomic  # noqa: E402
from insight.trace import TABLES, open_run  # noqa: E402

TABLES_WRITTEN = ["tasks", "steps", "memory", "device_queue", "graphs"]
TASKS_PER_STEP = 100


class Synthetic(Collector):
    """Every drain: the next flush's rows, from templates built once (only the step and time columns change)."""
    tables = tuple(TABLES_WRITTEN)

    def __init__(self, rows: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = rows
        ops = [f"{k}" for k in ("Conv2D", "MatMul", "BiasAdd", "ReLU", "MaxPool", "BatchNorm", "Add", "Mul",
                               "Softmax", "ReduceSum", "Cast", "Transpose")]
        tid = np.arange(n) % TASKS_PER_STEP
        op = np.array(ops)[tid % len(ops)]
        self.steps_per_flush = max(1, n // TASKS_PER_STEP)
        self.n = n
        self.tasks = to_arrow("tasks", {
            "step": tid * 0, "graph": "train_step", "task_id": tid, "op": list(op),
            "name": [f"Default/network/layer{t // 8}/{o}-op{t}" for t, o in zip(tid, op)],
            "kind": "kernel", "stream": "aicore0", "stream_id": 0,
            "scope": [f"Default/network/layer{t // 8}" for t in tid], "phase": np.where(tid < 50, "fp", "bp").tolist(),
            "start_ns": np.arange(n) * 1000, "end_ns": np.arange(n) * 1000 + 700, "dur_ns": np.full(n, 700),
            "flops": rng.integers(0, 1 << 30, n), "bytes": rng.integers(0, 1 << 24, n),
            "shape": [f"32x{16 << (t % 3)}x8x8" for t in tid], "dtype": "float32", "fused_ops": ""}, 0)
        m = n // 2
        self.memory = to_arrow("memory", {
            "t_ns": np.arange(m) * 2000, "action": np.where(np.arange(m) % 2 == 0, "alloc", "free").tolist(),
            "device": "Ascend", "kind": "activation", "tensor": [f"t{k % 500}" for k in range(m)],
            "op": [ops[k % len(ops)] for k in range(m)], "scope": "Default/network", "size": rng.integers(1, 1 << 20, m),
            "offset": rng.integers(0, 1 << 30, m), "in_use": rng.integers(0, 1 << 30, m), "capacity": 1 << 31,
            "step": np.zeros(m, np.int32), "shape": "32x16x8x8", "dtype": "float32", "source": "pool"}, 0)
        s = self.steps_per_flush
        self.steps = to_arrow("steps", {
            "step": np.arange(s), "epoch": np.ones(s, np.int32), "begin_ns": np.arange(s) * 10**6,
            "get_next_start_ns": np.arange(s) * 10**6, "get_next_end_ns": np.arange(s) * 10**6 + 10,
            "fp_start_ns": np.arange(s) * 10**6 + 20, "bp_end_ns": np.arange(s) * 10**6 + 900,
            "end_ns": np.arange(s) * 10**6 + 990, "fp_start_op": "Conv2D-op0", "bp_end_op": "MatMul-op99",
            "loss": rng.random(s), "sink": np.zeros(s, bool)}, 0)
        self.queue = to_arrow("device_queue", {
            "t_ns": np.arange(2 * s) * 500, "action": ["push", "pop"] * s, "depth": np.arange(2 * s) % 3,
            "capacity": 8, "wait_ns": np.zeros(2 * s, np.int64), "step": np.repeat(np.arange(s), 2)}, 0)
        self.graph = to_arrow("graphs", {"graph": "train_step", "nodes": np.array([TASKS_PER_STEP]),
                                         "compile_start_ns": 0, "compile_end_ns": 1000, "dump": "x" * 20000,
                                         "planned_peak": 1 << 24, "parameter_bytes": 1 << 20}, 0)
        self.k = 0

    def drain(self, t0: int, final: bool = False) -> dict[str, pa.Table]:
        k, self.k = self.k, self.k + 1
        s0 = k * self.steps_per_flush
        out = {"tasks": _shift(self.tasks, s0, "step", TASKS_PER_STEP),
               "memory": _shift(self.memory, s0, "step", None),
               "steps": _shift(self.steps, s0, "step", 1),
               "device_queue": _shift(self.queue, s0, "step", 1)}
        if k == 0:
            out["graphs"] = self.graph
        return out


def _shift(t: pa.Table, s0: int, col: str, per: int | None) -> pa.Table:
    """``t`` with its step column moved on to start at step ``s0`` (``per`` rows per step)."""
    i = t.column_names.index(col)
    n = t.num_rows
    steps = np.full(n, s0) if per is None else s0 + np.arange(n) // per if per > 1 else s0 + t.column(i).to_numpy()
    return t.set_column(i, t.schema.field(i), pa.array(np.asarray(steps, np.int32)))


def _writer(run: Path, rows: int) -> RunWriter:
    manifest = {"schema_version": 1, "name": run.name, "status": "running", "ranks": [0], "tables": {}}
    return RunWriter(run, manifest, [Synthetic(rows)], 0, TABLES_WRITTEN)


def old_compact(w: RunWriter) -> None:
    """What stop() used to do: every table's parts into one ``<table>.parquet``, then the parts removed."""
    for t in w.tables:
        d = w.rank_dir / t
        parts = [d / p.name for p in w.live[t]]
        tmp = w.rank_dir / f".{t}.parquet.tmp"
        merge_files(parts, SCHEMAS[t], tmp)
        tmp.replace(w.rank_dir / f"{t}.parquet")
        for p in parts:
            p.unlink()
        if d.is_dir():
            d.rmdir()
    w.manifest["tables"] = {t: f"rank_0/{t}.parquet" for t in w.tables}
    w.manifest["status"] = "complete"
    write_json_atomic(w.run_dir / MANIFEST, w.manifest)


def one_run(base: Path, kind: str, flushes: int, rows: int, wait_last: bool = True) -> dict:
    run = base / f"{kind}-{flushes}"
    shutil.rmtree(run, ignore_errors=True)
    w = _writer(run, rows)
    if kind == "new":
        w.grace_s = 0.0  # seconds of a run pass here in milliseconds: see the module docstring
        w.start_thread(3600)  # flushes are driven here; the merger runs in its thread
    flush_cpu = 0.0
    for k in range(flushes):
        c = time.thread_time()
        w.flush()
        flush_cpu += time.thread_time() - c
        if kind == "new" and (wait_last or k < flushes - 1):
            w.wait_merged(600)
    t = time.perf_counter()
    w.stop_thread()
    w.flush(final=True)
    if kind == "new":
        w.finish("complete")
    else:
        old_compact(w)
    stop_s = time.perf_counter() - t
    files = sum(1 for _ in (run / "rank_0").rglob("*.parquet"))
    task_rows = open_run(run).num_rows("tasks")
    assert task_rows == (flushes + 1) * rows, (task_rows, flushes, rows)
    return {"run": run, "stop_s": stop_s, "files": files, "merges": w.merges, "merge_cpu_s": w.merge_cpu_s,
            "flush_cpu_s": flush_cpu}


def read_all(run: Path) -> tuple[float, float]:
    """Seconds (wall, CPU of the process) to open the run and read every column of every table."""
    t, c = time.perf_counter(), time.process_time()
    r = open_run(run)
    for tb in TABLES:
        if r.has_table(tb):
            r.arrow(tb)
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000, help="task rows per flush (default 20000)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100], help="flushes per run (1 10 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="5000 task rows per flush, 1 repeat")
    ap.add_argument("--dir", help="where to write the runs (default: a temporary directory)")
    ap.add_argument("--summary", help="write the benchmarks/_summary.py rows to this JSON file")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.repeats = 5000, 1
    scales = sorted(set(a.scales))
    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_writer-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"# {a.rows} task rows per flush, scales {scales} flushes, {a.repeats} repeat(s); load "
          f"{_summary.load_1min():.2f}", flush=True)
    res: dict = {}
    try:
        for rep in range(a.repeats):
            for n in scales:
                pair = {kind: one_run(tmp, kind, n, a.rows) for kind in ("old", "new")}
                for kind in pair:
                    pair[kind]["read_s"] = pair[kind]["read_cpu_s"] = float("inf")
                for _ in range(5):  # reads interleaved, so both see the same machine; the best of 5
                    for kind in pair:
                        wall, cpu = read_all(pair[kind]["run"])
                        pair[kind]["read_s"] = min(pair[kind]["read_s"], wall)
                        pair[kind]["read_cpu_s"] = min(pair[kind]["read_cpu_s"], cpu)
                for kind in pair:
                    res.setdefault((kind, n), []).append(pair[kind])
                    shutil.rmtree(pair[kind]["run"], ignore_errors=True)
            inflight = one_run(tmp, "new", 64, a.rows, wait_last=False)
            res.setdefault(("inflight", 64), []).append(inflight)
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)

    def med(kind, n, key):
        return statistics.median(r[key] for r in res[(kind, n)])

    print(f"{'flushes':>8} {'task rows':>10} | {'stop old ms':>11} {'stop new ms':>11} | {'read old ms':>11} "
          f"{'read new ms':>11} {'new/old':>7} {'cpu new/old':>11} | {'files old':>9} {'files new':>9} {'merges':>6} {'flush cpu s':>11} {'merge cpu s':>11}")
    for n in scales:
        so, sn = med("old", n, "stop_s") * 1e3, med("new", n, "stop_s") * 1e3
        ro, rn = med("old", n, "read_s") * 1e3, med("new", n, "read_s") * 1e3
        print(f"{n:>8} {(n + 1) * a.rows:>10} | {so:>11.1f} {sn:>11.1f} | {ro:>11.1f} {rn:>11.1f} {rn / ro:>7.2f} "
              f"{med('new', n, 'read_cpu_s') / med('old', n, 'read_cpu_s'):>11.2f} | "
              f"{res[('old', n)][0]['files']:>9} {res[('new', n)][0]['files']:>9} {res[('new', n)][0]['merges']:>6} "
              f"{med('new', n, 'flush_cpu_s'):>11.2f} {med('new', n, 'merge_cpu_s'):>11.2f}")
    inflight_ms = med("inflight", 64, "stop_s") * 1e3
    print(f"stop() right after the 64th flush, a merge cascade running (cancelled): {inflight_ms:.1f} ms")
    lo, hi = scales[0], scales[-1]
    s_lo, s_hi = med("new", lo, "stop_s") * 1e3, med("new", hi, "stop_s") * 1e3
    o_hi = med("old", hi, "stop_s") * 1e3
    r_new, r_old = med("new", hi, "read_s") * 1e3, med("old", hi, "read_s") * 1e3
    rows = [
        _summary.row(f"writer stop() at {hi}x flushes / at {lo}x (new writer)", s_hi, s_lo, unit="ms",
                     goal="<= 2.0"),
        _summary.row(f"writer stop() at {hi}x flushes, new / old (compaction)", s_hi, o_hi, unit="ms"),
        _summary.row(f"writer stop() with a merge cascade running (64x) / at {lo}x", inflight_ms, s_lo, unit="ms"),
        _summary.row(f"read every table at {hi}x flushes, new (parts) / old (one file)", r_new, r_old, unit="ms",
                     goal="<= 1.2"),
        _summary.row(f"read every table at {hi}x flushes, CPU time, new / old", med("new", hi, "read_cpu_s") * 1e3,
                     med("old", hi, "read_cpu_s") * 1e3, unit="ms"),
    ]
    _summary.write(a.summary, "bench_writer", rows)
    for r in rows:
        print(f"{r['metric']}: {r['ours']:.1f} vs {r['reference']:.1f} -> {r['ratio']:.2f}"
              if r["reference"] is not None else f"{r['metric']}: {r['ours']:.1f}",
              f"(goal {r['goal']}: {'met' if r['met'] else 'MISSED'})" if r["goal"] else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
