"""Benchmark of ``insight import`` on a synthetic Kineto-shaped trace, against HTA's default loading path.

    python benchmarks/bench_import.py                 # 2,000,000 events (~500 MB of JSON), in a temp dir
    python benchmarks/bench_import.py --events 200000 # quick mode
    python benchmarks/bench_import.py --summary out.json  # also the goal rows (benchmarks/_summary.py)

The trace is written the way Kineto writes it (one event over several indented lines, ``ts``/``dur`` in
microseconds with 3 decimals, ``baseTimeNanoseconds``, ``deviceProperties``): per step a ``ProfilerStep#N``,
a DataLoader range, cpu ops with input shapes, ``cudaLaunchKernel`` launches with correlation ids, their
kernels on two streams, ac2g flows and ``[memory]`` events. Two measurements, each in its own process (peak
RSS from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``insight import`` (``insight.importer.import_traces``): streaming parse, mapping, Parquet run written;
* ``json.load`` + ``pandas.DataFrame(traceEvents)`` -- how HTA loads a trace by default (its parser then
  does more work on that frame; this is a lower bound of its cost).

Goals (issue 14): >= 300k events/s and peak RSS <= 1 GB for the import. Times start after the module imports
(Python start-up, numpy / pandas / pyarrow: a fixed ~0.5 s that would dominate the quick mode), in both
processes; the rate counting them is reported too. ``--summary PATH`` writes them as rows of
benchmarks/_summary.py (events/s and peak RSS with their goals; the ratio to json.load + pandas, the rate with
the module imports and the CPU-time rate are reported without a goal).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import _summary  # noqa: E402

# each prints: seconds of module imports, then wall and CPU seconds of the work after them, peak RSS, counts
IMPORT = """
import resource, sys, time
t0 = time.perf_counter()
from insight.importer import import_traces
t, c = time.perf_counter(), time.process_time()
r = import_traces([sys.argv[1]], sys.argv[2])
dt, cpu = time.perf_counter() - t, time.process_time() - c
print(t - t0, dt, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, r.count("events"),
      r.count("tasks"))
"""
HTA_PATH = """
import json, resource, sys, time
t0 = time.perf_counter()
import pandas as pd
t, c = time.perf_counter(), time.process_time()
with open(sys.argv[1]) as f:
    doc = json.load(f)
df = pd.DataFrame(doc["traceEvents"])
dt, cpu = time.perf_counter() - t, time.process_time() - c
print(t - t0, dt, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(df), 0)
"""

KERNELS = ["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
           "at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<float>, at::detail::Array<char*, 3>)",
           "ampere_sgemm_128x64_tn", "void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>()",
           "void at::native::(anonymous namespace)::max_pool_forward_nchw<float, float>(int, float const*)"]
OPS = [("aten::addmm", [[256, 1024], [256, 512], [512, 1024]]), ("aten::add", [[256, 1024], [256, 1024]]),
       ("aten::relu", [[256, 1024]]), ("aten::max_pool2d", [[32, 64, 56, 56]])]


def _x(out, cat, name, pid, tid, ts, dur, args: str) -> int:
    out.append(f'  {{\n    "ph": "X", "cat": "{cat}", "name": {json.dumps(name)}, "pid": {pid}, "tid": {tid},\n'
               f'    "ts": {ts:.3f}, "dur": {dur:.3f},\n    "args": {{\n      {args}\n    }}\n  }}')
    return 1


def write_trace(path: Path, n_events: int, seed: int = 0) -> int:
    """Write about ``n_events`` events; returns the exact count."""
    rnd = random.Random(seed)
    pid, tid = 4242, 4242
    n, step, ts, corr, ext = 0, 0, 1_000.0, 1, 1
    with open(path, "w") as f:
        f.write('{\n  "schemaVersion": 1,\n  "deviceProperties": [{"id": 0, "name": "Synthetic GPU", '
                '"totalGlobalMem": 85899345920}],\n  "distributedInfo": {"backend": "nccl", "rank": 0, '
                '"world_size": 1},\n  "traceEvents": [\n')
        meta = [f'  {{"name": "process_name", "ph": "M", "ts": 0, "pid": {pid}, "tid": 0, '
                f'"args": {{"name": "python"}}}}',
                f'  {{"name": "thread_name", "ph": "M", "ts": 0, "pid": {pid}, "tid": {tid}, '
                f'"args": {{"name": "main"}}}}',
                '  {"name": "thread_name", "ph": "M", "ts": 0, "pid": 0, "tid": 7, "args": {"name": "stream 7 "}}',
                '  {"name": "thread_name", "ph": "M", "ts": 0, "pid": 0, "tid": 20, "args": {"name": "stream 20 "}}']
        f.write(",\n".join(meta))
        n += len(meta)
        while n < n_events:
            out = []
            t0 = ts
            body = []
            ts += 2.0
            n += _x(body, "user_annotation", "enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", pid, tid,
                    ts, 150.0, f'"External id": {ext}')
            ext += 1
            ts += 160.0
            for _ in range(200):
                name, dims = OPS[rnd.randrange(len(OPS))]
                d = rnd.uniform(8, 30)
                n += _x(body, "cpu_op", name, pid, tid, ts, d,
                        f'"External id": {ext}, "Sequence number": {ext}, "Fwd thread id": 0, "Record function id": 0, '
                        f'"Input Dims": {json.dumps(dims)}, "Input type": ["float", "float"], "Ev Idx": {ext}')
                lt = ts + 2.0
                n += _x(body, "cuda_runtime", "cudaLaunchKernel", pid, tid, lt, 4.5,
                        f'"External id": {ext}, "cbid": 211, "correlation": {corr}')
                kt = lt + rnd.uniform(5, 50)
                stream = 7 if rnd.random() < 0.8 else 20
                n += _x(body, "kernel", KERNELS[rnd.randrange(len(KERNELS))], 0, stream, kt, rnd.uniform(3, 40),
                        f'"External id": {ext}, "queued": 0, "device": 0, "context": 1, "stream": {stream}, '
                        f'"correlation": {corr}, "registers per thread": 32, "shared memory": 0, "blocks per SM": 1.2, '
                        f'"warps per SM": 4.5, "grid": [80, 1, 1], "block": [128, 1, 1], '
                        f'"est. achieved occupancy %": 6')
                body.append(f'  {{\n    "ph": "s", "id": {corr}, "pid": {pid}, "tid": {tid}, "ts": {lt:.3f},\n'
                            f'    "cat": "ac2g", "name": "ac2g"\n  }}')
                body.append(f'  {{\n    "ph": "f", "id": {corr}, "pid": 0, "tid": {stream}, "ts": {kt:.3f},\n'
                            f'    "cat": "ac2g", "name": "ac2g", "bp": "e"\n  }}')
                n += 2
                if rnd.random() < 0.25:
                    size = rnd.choice([1024, 4096, 1 << 20])
                    body.append(f'  {{\n    "ph": "i", "cat": "cpu_instant_event", "s": "t", "name": "[memory]",\n'
                                f'    "pid": {pid}, "tid": {tid}, "ts": {ts + 1:.3f},\n    "args": {{\n      '
                                f'"Total Reserved": 2097152, "Total Allocated": {size}, "Bytes": {size}, '
                                f'"Addr": {140000000000 + ext * 4096}, "Device Id": 0, "Device Type": 1\n    }}\n  }}')
                    n += 1
                corr += 1
                ext += 1
                ts += d + 1.0
            n += _x(out, "user_annotation", f"ProfilerStep#{step}", pid, tid, t0, ts - t0, f'"External id": {ext}')
            ext += 1
            out.extend(body)
            f.write(",\n" + ",\n".join(out))
            step += 1
        f.write('\n  ],\n  "traceName": "synthetic.pt.trace.json",\n  "displayTimeUnit": "ms",\n'
                '  "baseTimeNanoseconds": 1700000000000000000\n}\n')
    return n


def measure(script: str, *args) -> tuple[float, float, float, int, int, int]:
    """(module imports s, wall s, CPU s after them, peak RSS bytes, events, tasks) of ``script`` run in a fresh
    interpreter."""
    p = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{p.stderr[-3000:]}")
    imports, dt, cpu, rss, events, tasks = p.stdout.split()
    return float(imports), float(dt), float(cpu), int(rss), int(events), int(tasks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000, help="events in the synthetic trace (default 2,000,000)")
    ap.add_argument("--skip-json-load", action="store_true", help="measure only insight import")
    ap.add_argument("--summary", metavar="PATH", help="write the goal rows here (benchmarks/_summary.py format)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        trace = Path(tmp) / "synthetic.pt.trace.json"
        t = time.perf_counter()
        n = write_trace(trace, args.events)
        size = trace.stat().st_size
        print(f"synthetic Kineto trace: {n:,} events, {size / 2**20:.0f} MiB of JSON "
              f"(written in {time.perf_counter() - t:.1f} s); load {os.getloadavg()[0]:.2f}")
        imp, dt, cpu, rss, events, tasks = measure(IMPORT, trace, Path(tmp) / "run")
        assert events == n, (events, n)
        print(f"insight import      : {dt:7.2f} s  {n / dt / 1e3:6.0f}k events/s "
              f"({n / cpu / 1e3:4.0f}k per CPU second; {n / (imp + dt) / 1e3:.0f}k/s counting the "
              f"{imp:.2f} s of module imports)  peak RSS {rss / 2**20:5.0f} MiB  ({tasks:,} tasks)  "
              f"goals: >= 300k events/s, <= 1024 MiB")
        rows += [_summary.row(f"insight import, events/s ({n:,} events, {size / 2**20:.0f} MiB of JSON; after the "
                              f"module imports)", n / dt, unit="events/s", goal=">= 300000"),
                 _summary.row("insight import, events/s counting Python's module imports", n / (imp + dt),
                              unit="events/s"),
                 _summary.row("insight import, events per CPU second", n / cpu, unit="events/s"),
                 _summary.row("insight import, peak RSS (whole process)", rss / 2**20, unit="MiB", goal="<= 1024")]
        if not args.skip_json_load:
            _, dt2, cpu2, rss2, n_rows, _ = measure(HTA_PATH, trace)
            assert n_rows == n, (n_rows, n)
            print(f"json.load + pandas  : {dt2:7.2f} s  {n / dt2 / 1e3:6.0f}k events/s ({n / cpu2 / 1e3:4.0f}k per CPU "
                  f"second)  peak RSS {rss2 / 2**20:5.0f} MiB"
                  f"  (HTA's default path, before its own parsing)")
            print(f"insight import is {dt2 / dt:.2f}x the speed ({cpu2 / cpu:.2f}x in CPU time) with "
                  f"{rss2 / max(rss, 1):.1f}x less peak memory")
            rows += [_summary.row("events/s: insight import / json.load + pandas (HTA's default path)", n / dt,
                                  n / dt2, unit="events/s"),
                     _summary.row("peak RSS: insight import / json.load + pandas", rss / 2**20, rss2 / 2**20,
                                  unit="MiB")]
        print(f"load after: {os.getloadavg()[0]:.2f}")
    _summary.write(args.summary, "bench_import", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
