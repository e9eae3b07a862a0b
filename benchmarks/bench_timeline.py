#!/usr/bin/env python
"""Timeline page at scale: first render and zoomed views of a run of 1,000,000 tasks.

    cd /work/main && python benchmarks/bench_timeline.py [--tasks 1000000] [--width 1190] [--keep DIR] [--summary PATH]

A synthetic run (``synthetic_run`` below, written with pyarrow as docs/trace-format.md says) of ``--tasks``
tasks over five streams -- aicore0 (70 %), aicore1 (15 %), aicpu, comm (AllReduce in the tail) and host --
plus the sink feeder's TransferData, one GetNext per step and the steps table; rows are written step by
step and stream by stream (not in time order), as the collectors write them.

Measured through Flask's test client on ``dashboard.app.create_app`` (the real Dash request path:
JSON in, callback, JSON out), wall time and response bytes of

* **first render** = the page-layout request (Dash pages' routing callback for ``/run/<id>/timeline``)
  + the initial figure callback. Goal: <= 2 s and <= 5 MB at 1M tasks. Two cases: a *fresh process*
  (a subprocess: Python imports, pyarrow's lazy modules and Dash's first-request setup included) and
  the usual one, a *warm server* (it has served another page before) with nothing of this run cached;
* **zoomed views** (the figure callback for a new x range, as plotly's relayoutData sends it): 100 ms,
  10 ms, 1 ms and 100 us windows, a pan, a step picked in the dropdown, back to the whole run. At 1 ms every
  lane must hold exact tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._summary import row as summary_row, write as write_summary  # noqa: E402

US = 1000
STREAMS = ("aicore0", "aicore1", "aicpu", "comm", "host")
OPS = ("conv2d", "matmul", "relu", "add", "mul", "reduce_mean", "fused", "transpose")


def _dict(values, idx) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, np.int32)), pa.array(list(values))).cast(pa.string())


def synthetic_run(base, name: str = "tl1m", n_tasks: int = 1_000_000, tasks_per_step: int = 1000, seed: int = 0,
                  row_group: int = 65_536) -> Path:
    """A complete single-device sink run of exactly ``n_tasks`` task rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    run = Path(base) / name
    (run / "rank_0").mkdir(parents=True, exist_ok=True)
    per = tasks_per_step - 2                       # + GetNext + TransferData per step
    n_steps = max(1, -(-n_tasks // tasks_per_step))  # rounded up; the table is cut to n_tasks rows
    k = np.arange(per)
    slot = k % 20                                   # 14/20 aicore0, 3/20 aicore1, aicpu, comm, host
    stream = np.select([slot < 14, slot < 17, slot == 17, slot == 18], [0, 1, 2, 3], 4)
    pos = np.zeros(per, np.int64)                   # position of the task on its stream
    for s in range(5):
        m = stream == s
        pos[m] = np.arange(m.sum())
    n0 = int((stream == 0).sum())
    gap = {0: 2 * US, 1: 9 * US, 2: 28 * US, 3: 12 * US, 4: 28 * US}
    dur = {0: 1500, 1: 6 * US, 2: 5 * US, 3: 10 * US, 4: 3 * US}
    compute = n0 * gap[0]
    tail = int((stream == 3).sum()) * gap[3]
    interval = 100 * US
    step_len = interval + compute + tail
    off = np.array([gap[s] for s in stream]) * pos
    off = np.where(stream == 3, compute + off, off)  # AllReduce after the backward
    d = np.array([dur[s] for s in stream])
    phase = np.where(stream == 3, 2, np.where(pos < np.where(stream == 0, n0 // 2, 10**9), 0, 1))
    phase = np.where(stream == 4, 3, phase)

    steps = np.arange(n_steps)
    base_t = 2_000 * US + steps * step_len
    fp = base_t + interval
    # the step's device/host tasks, step-major then stream-major (not time order), written a block of steps
    # at a time (bounded memory for runs of tens of millions of tasks)
    order = np.lexsort((pos, stream))
    names = np.array([f"{OPS[(j * 7) % len(OPS)]}_{j}" for j in range(per)], dtype=object)
    names[3] = 'weird "quoted" \\ <b>name</b>\x01'
    scopes = ["Net/backbone/block1", "Net/backbone/block2", "Net/head", "Gradients/Net/backbone", "Momentum"]
    writer = _CutWriter(run / "rank_0" / "tasks.parquet", n_tasks, row_group)
    block = max(1, 1_000_000 // tasks_per_step)
    for b0 in range(0, n_steps, block):
        writer.write(_body(steps[b0:b0 + block], fp[b0:b0 + block], per, order, off, d, stream, phase, names,
                           scopes, rng))
    # GetNext (aicore0, before fp_start) and the feeder's TransferData (host thread, graph data_sink)
    gn0 = fp - 60 * US
    gn = pa.table({
        "step": steps.astype(np.int32), "graph": _dict(["train_step"], np.zeros(n_steps)),
        "task_id": np.full(n_steps, -1, np.int32), "name": _dict(["GetNext"], np.zeros(n_steps)),
        "op": _dict(["get_next"], np.zeros(n_steps)), "kind": _dict(["get_next"], np.zeros(n_steps)),
        "stream": _dict(["aicore0"], np.zeros(n_steps)), "stream_id": np.zeros(n_steps, np.int8),
        "scope": _dict([""], np.zeros(n_steps)), "phase": _dict(["input"], np.zeros(n_steps)),
        "start_ns": gn0, "end_ns": fp - 1, "dur_ns": fp - 1 - gn0, "flops": np.zeros(n_steps, np.int64),
        "bytes": np.zeros(n_steps, np.int64), "shape": _dict([""], np.zeros(n_steps)),
        "dtype": _dict(["float32"], np.zeros(n_steps)), "fused_ops": _dict([""], np.zeros(n_steps))})
    td0 = base_t - 300 * US
    td = gn.set_column(0, "step", pa.array(np.full(n_steps, -1, np.int32)))
    z = np.zeros(n_steps)
    for col, val in (("graph", _dict(["data_sink"], z)), ("task_id", pa.array(np.full(n_steps, -2, np.int32))),
                     ("name", _dict(["TransferData"], z)), ("op", _dict(["copy_h2d"], z)),
                     ("kind", _dict(["memcpy_h2d"], np.zeros(n_steps))), ("stream", _dict(["host"], np.zeros(n_steps))),
                     ("stream_id", pa.array(np.full(n_steps, 4, np.int8))), ("start_ns", pa.array(td0)),
                     ("end_ns", pa.array(td0 + 80 * US)), ("dur_ns", pa.array(np.full(n_steps, 80 * US, np.int64))),
                     ("shape", _dict(["32x3x224x224"], np.zeros(n_steps)))):
        td = td.set_column(td.schema.get_field_index(col), col, val)
    writer.write(gn)
    writer.write(td)
    writer.close()
    end_t = fp + compute + tail
    st = pd.DataFrame({"step": steps.astype(np.int32), "epoch": (1 + steps // 100).astype(np.int32),
                       "begin_ns": base_t, "get_next_start_ns": gn0, "get_next_end_ns": fp - 1, "fp_start_ns": fp,
                       "bp_end_ns": fp + compute, "end_ns": end_t, "fp_start_op": names[0], "bp_end_op": names[n0 - 1],
                       "loss": np.linspace(2.3, 0.1, n_steps), "sink": True})
    pq.write_table(pa.Table.from_pandas(st, preserve_index=False), run / "rank_0" / "steps.parquet")
    manifest = {"schema_version": 1, "run_id": f"bench{name}", "name": name, "created": "2025-01-01T00:00:00+00:00",
                "start_perf_ns": 1_000_000_000, "status": "complete",
                "device": {"target": "Ascend", "capacity_bytes": 8 << 30},
                "streams": [{"stream_id": i, "name": s} for i, s in enumerate(STREAMS)], "ranks": [0],
                "step_count": n_steps, "tables": {"tasks": "rank_0/tasks.parquet", "steps": "rank_0/steps.parquet"},
                "options": {"profile_memory": False, "data_process": False}, "runtime": {"version": "0.1.0"}}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return run


class _CutWriter:
    """A Parquet writer that keeps the first ``limit`` rows written."""

    def __init__(self, path, limit: int, row_group: int):
        self.path, self.left, self.row_group, self.w = path, int(limit), row_group, None

    def write(self, t: pa.Table) -> None:
        t = t.slice(0, max(0, self.left))
        if not t.num_rows:
            return
        if self.w is None:
            self.w = pq.ParquetWriter(self.path, t.schema)
        self.w.write_table(t.cast(self.w.schema), row_group_size=self.row_group)
        self.left -= t.num_rows

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def _body(steps, fp, per, order, off, d, stream, phase, names, scopes, rng) -> pa.Table:
    """The device and host tasks of ``steps`` (``fp``: their forward starts)."""
    S = np.repeat(steps, per)
    K = np.tile(order, len(steps))
    jitter = rng.integers(0, 200, size=len(S))
    start = np.repeat(fp, per) + off[K] + jitter
    end = start + d[K] + rng.integers(0, 200, size=len(S))
    op = (K * 7) % len(OPS)
    rows = {
        "step": S.astype(np.int32), "graph": _dict(["train_step"], np.zeros(len(S))),
        "task_id": K.astype(np.int32), "name": _dict(names, K), "op": _dict(OPS, op),
        "kind": _dict(["kernel", "memcpy_h2d"], (stream[K] == 4).astype(int)),
        "stream": _dict(STREAMS, stream[K]), "stream_id": stream[K].astype(np.int8),
        "scope": _dict(scopes, K % len(scopes)), "phase": _dict(["forward", "backward", "update", "input"], phase[K]),
        "start_ns": start.astype(np.int64), "end_ns": end.astype(np.int64), "dur_ns": (end - start).astype(np.int64),
        "flops": (K.astype(np.int64) % 13) * 1_000_000, "bytes": (K.astype(np.int64) % 7 + 1) * 65_536,
        "shape": _dict(["32x64x28x28", "32x128", "1024x1024", "32"], K % 4),
        "dtype": _dict(["float32"], np.zeros(len(S))),
        "fused_ops": _dict(["", "mul,add,tanh"], (op == OPS.index("fused")).astype(int)),
    }
    return pa.table(rows)


# -- driving the Dash app through Flask's test client ---------------------------------------------------
class Client:
    def __init__(self, app):
        self.c = app.server.test_client()

    def _post(self, output, outputs, inputs, state=(), changed=()):
        body = {"output": output, "outputs": outputs, "inputs": inputs, "state": list(state),
                "changedPropIds": list(changed)}
        t = time.perf_counter()
        r = self.c.post("/_dash-update-component", json=body)
        dt = time.perf_counter() - t
        if r.status_code not in (200, 204):
            raise RuntimeError(f"callback {output}: HTTP {r.status_code}: {r.data[:400]!r}")
        return (r.get_json() if r.status_code == 200 else None), len(r.data), dt

    def page(self, path: str, search: str = ""):
        """The page layout (Dash pages' routing callback): (response, bytes, seconds)."""
        return self._post(
            ".._pages_content.children..._pages_store.data..",
            [{"id": "_pages_content", "property": "children"}, {"id": "_pages_store", "property": "data"}],
            [{"id": "_pages_location", "property": "pathname", "value": path},
             {"id": "_pages_location", "property": "search", "value": search}], changed=["_pages_location.pathname"])

    def figure(self, run_id, width=1190, relayout=None, step=None, reset=0, trigger=None, rank=0, selected=None):
        """The timeline's figure callback; ``trigger``: the input that fired (None: the initial call).
        ``relayout``: plotly's relayoutData for an x-axis change (the browser passes just those on)."""
        changed = {"relayout": ["tl-xrange.data"], "step": ["tl-step.value"],
                   "reset": ["tl-reset.n_clicks"], None: []}[trigger]
        res, n, dt = self._post(
            "..tl-graph.figure...tl-info.children..",
            [{"id": "tl-graph", "property": "figure"}, {"id": "tl-info", "property": "children"}],
            [{"id": "tl-xrange", "property": "data", "value": relayout},
             {"id": "tl-step", "property": "value", "value": step},
             {"id": "tl-reset", "property": "n_clicks", "value": reset},
             {"id": "tl-width", "property": "data", "value": width}],
            state=[{"id": "tl-run", "property": "data", "value": run_id},
                   {"id": "tl-rank", "property": "data", "value": rank},
                   {"id": "tl-selected", "property": "data", "value": selected}], changed=changed)
        return res["response"]["tl-graph"]["figure"], res["response"]["tl-info"]["children"], n, dt


def lanes_summary(fig) -> str:
    out = []
    for t in fig["data"]:
        if t["type"] == "bar":
            n = len(t["hovertext"])
            out.append(f"{t['name']}={n} tasks")  # sent: the view and the padding around it
        else:
            out.append(f"{t['name']}=busy")
    return ", ".join(out)


def first_render(base: Path, run_id: str, width: int) -> dict:
    from dashboard.app import create_app

    app = create_app(base)
    cl = Client(app)
    layout, n1, t1 = cl.page(f"/run/{run_id}/timeline")
    fig, info, n2, t2 = cl.figure(run_id, width)
    return {"layout_s": t1, "layout_bytes": n1, "figure_s": t2, "figure_bytes": n2, "total_s": t1 + t2,
            "total_bytes": n1 + n2, "lanes": lanes_summary(fig), "info": info, "app": app, "client": cl}


def _rss_mb() -> float:
    """Peak resident set size of this process (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000, help="tasks of the run (issue 16: 10000000)")
    ap.add_argument("--width", type=int, default=1190, help="plot-area width in pixels (1400 px window)")
    ap.add_argument("--keep", help="write the runs here and keep them (default: a temporary directory)")
    ap.add_argument("--summary", metavar="PATH",
                    help="also write the summary rows for benchmarks/run_all.py; a missed goal is then reported "
                         "there and the exit status is 0 (without --summary: 1 when a goal is missed)")
    ap.add_argument("--_fresh", help=argparse.SUPPRESS)  # internal: measure the fresh-process first render
    a = ap.parse_args(argv)
    if a._fresh:
        r = first_render(Path(a._fresh), "tl", a.width)
        r["rss_first_mb"] = _rss_mb()
        # the server's memory over a session: zoom to 1 ms, click a task (details and flows), back to the run
        from dashboard.data import store
        from insight import analysis

        cl = r["client"]
        data = store().get("tl", "timeline_data", analysis.load_timeline)
        mid = data.step_range(data.step_numbers[len(data.step_numbers) // 2])[0] / 1e6 + 0.3
        t = time.perf_counter()
        fig, _, _, _ = cl.figure("tl", a.width, relayout={"xaxis.range[0]": mid, "xaxis.range[1]": mid + 1},
                                 trigger="relayout")
        r["zoom_1ms_s"] = time.perf_counter() - t
        row = next(c for tr in fig["data"] if tr["name"] == "host · feeder (TransferData)" or tr["name"] == "aicore0"
                   for c in tr["customdata"])
        t = time.perf_counter()
        cl._post("..tl-details.children...tl-selected.data..",
                 [{"id": "tl-details", "property": "children"}, {"id": "tl-selected", "property": "data"}],
                 [{"id": "tl-graph", "property": "clickData", "value": {"points": [{"customdata": row}]}}],
                 state=[{"id": "tl-run", "property": "data", "value": "tl"}, {"id": "tl-rank", "property": "data",
                                                                            "value": 0}],
                 changed=["tl-graph.clickData"])
        r["click_s"] = time.perf_counter() - t
        cl.figure("tl", a.width, relayout={"xaxis.autorange": True}, trigger="relayout")
        r["rss_session_mb"] = _rss_mb()
        print(json.dumps({k: v for k, v in r.items() if k not in ("app", "client")}))
        return 0
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        synthetic_run(base, "tl", a.tasks)
        synthetic_run(base, "warmup", 20_000)
        print(f"wrote a run of {a.tasks:,} tasks in {time.perf_counter() - t:.1f} s "
              f"({(base / 'tl' / 'rank_0' / 'tasks.parquet').stat().st_size / 2**20:.1f} MB of Parquet)")
        goal = "  (goal <= 2 s, <= 5 MB)"
        # 1. fresh server processes: the first one ever to open the run (it builds the lane index, written to
        # the cache dir -- here a temporary one), then another one (it memory-maps that index)
        os.environ["XDG_CACHE_HOME"] = str(base / "cache")
        ok_rss = True
        fresh = {}
        for case in ("fresh process, no index", "fresh process, index"):
            out = subprocess.run([sys.executable, __file__, "--_fresh", str(base), "--width", str(a.width)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(out.stderr)
                return 1
            fr = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"first render, {case:24s}: {fr['total_s']:.3f} s, {fr['total_bytes'] / 1e6:.3f} MB "
                  f"(layout {fr['layout_s']:.3f} s / {fr['layout_bytes'] / 1e3:.1f} kB + figure {fr['figure_s']:.3f} s"
                  f" / {fr['figure_bytes'] / 1e3:.1f} kB){goal}")
            print(f"    server peak RSS: {fr['rss_first_mb']:.0f} MB after the first render, "
                  f"{fr['rss_session_mb']:.0f} MB after a 1 ms zoom ({fr['zoom_1ms_s'] * 1e3:.0f} ms), a click "
                  f"({fr['click_s'] * 1e3:.0f} ms) and the whole run again (goal <= 1500 MB)")
            ok_rss &= fr["rss_session_mb"] <= 1500
            fresh[case] = fr
        # 2. a warm server (it has served another run's timeline), nothing of this run cached
        from dashboard.app import create_app

        app = create_app(base)
        cl = Client(app)
        cl.page("/run/warmup/timeline")
        cl.figure("warmup")
        _, n1, t1 = cl.page("/run/tl/timeline")
        fig, info, n2, t2 = cl.figure("tl", a.width)
        print(f"first render, warm server (index)  : {t1 + t2:.3f} s, {(n1 + n2) / 1e6:.3f} MB "
              f"(layout {t1:.3f} s / {n1 / 1e3:.1f} kB + figure {t2:.3f} s / {n2 / 1e3:.1f} kB){goal}")
        print(f"    lanes: {lanes_summary(fig)}")
        print(f"    {info}")
        ok = (t1 + t2) <= 2.0 and (n1 + n2) <= 5e6 and fr["total_s"] <= 2.0 and fr["total_bytes"] <= 5e6 and ok_rss
        # 3. zoomed views
        from dashboard.data import store
        from insight import analysis

        data = store().get("tl", "timeline_data", analysis.load_timeline)
        # windows from 0.3 ms into the middle step (its forward pass)
        mid = data.step_range(data.step_numbers[len(data.step_numbers) // 2])[0] / 1e6 + 0.3
        print("zoomed views (figure callback):")
        views = [("100 ms window", {"xaxis.range[0]": mid, "xaxis.range[1]": mid + 100}),
                 ("10 ms window", {"xaxis.range[0]": mid, "xaxis.range[1]": mid + 10}),
                 ("1 ms window", {"xaxis.range[0]": mid, "xaxis.range[1]": mid + 1}),
                 ("pan 1 ms window by 0.5 ms", {"xaxis.range": [mid + 0.5, mid + 1.5]}),
                 ("100 us window", {"xaxis.range[0]": mid, "xaxis.range[1]": mid + 0.1})]
        for label, rl in views:
            fig, info, n, dt = cl.figure("tl", a.width, relayout=rl, trigger="relayout")
            exact = all(t["type"] == "bar" for t in fig["data"])
            print(f"  {label:28s}: {dt * 1e3:7.1f} ms, {n / 1e3:8.1f} kB, "
                  f"{'exact tasks in every lane' if exact else 'busy bins in some lanes'}: {lanes_summary(fig)}")
            if label == "1 ms window":
                ok &= exact
                exact_1ms = exact
        step = data.step_numbers[len(data.step_numbers) // 2]
        fig, info, n, dt = cl.figure("tl", a.width, step=step, trigger="step")
        label = f"step {step} (dropdown)"
        print(f"  {label:28s}: {dt * 1e3:7.1f} ms, {n / 1e3:8.1f} kB: {lanes_summary(fig)}")
        fig, info, n, dt = cl.figure("tl", a.width, relayout={"xaxis.autorange": True}, trigger="relayout")
        print(f"  {'whole run (double-click)':28s}: {dt * 1e3:7.1f} ms, {n / 1e3:8.1f} kB: {lanes_summary(fig)}")
        # 4. the analysis alone
        t = time.perf_counter()
        analysis.load_timeline(base / "tl")
        t_load = time.perf_counter() - t
        reps = 50
        t = time.perf_counter()
        for _ in range(reps):
            analysis.timeline_window(data, data.t_min, data.t_max, a.width)
        t_full = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            analysis.timeline_window(data, int(mid * 1e6), int(mid * 1e6) + 1_000_000, a.width)
        t_ms = (time.perf_counter() - t) / reps
        print(f"analysis: load_timeline {t_load:.3f} s; timeline_window whole run {t_full * 1e3:.2f} ms, "
              f"1 ms window {t_ms * 1e3:.2f} ms")
        print("PASS" if ok else "FAIL")
        n = f"{a.tasks:,} tasks"
        nx, ix = fresh["fresh process, no index"], fresh["fresh process, index"]
        write_summary(a.summary, "bench_timeline", [
            summary_row(f"first render, fresh server, lane index ({n})", ix["total_s"], unit="s", goal="<= 2"),
            summary_row(f"first render, fresh server, bytes to the browser ({n})", ix["total_bytes"] / 1e6,
                        unit="MB", goal="<= 5"),
            summary_row(f"first render, fresh server, no index yet ({n})", nx["total_s"], unit="s"),
            summary_row(f"first render, warm server ({n})", t1 + t2, unit="s", goal="<= 2"),
            summary_row(f"server peak RSS after a session ({n})", max(nx["rss_session_mb"], ix["rss_session_mb"]),
                        unit="MB", goal="<= 1500"),
            summary_row(f"1 ms window: exact tasks in every lane, 1 = yes ({n})", float(exact_1ms), goal=">= 1")])
        return 0 if ok or a.summary else 1
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
