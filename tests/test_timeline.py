"""Timeline (insight.analysis.timeline + dashboard/pages/timeline.py) and the data-pipeline page.

The level of detail is checked against brute force; the pages through Flask's test client (the real Dash
request path) on a synthetic run of 200,000 tasks; and, marked ``browser``, in headless Chromium with no
console errors.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insight import analysis
from insight.analysis import timeline as tl
from insight.trace import TraceError, open_run
from synthetic_runs import set_manifest, training_run, truncate, write_table

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_timeline", ROOT / "benchmarks" / "bench_timeline.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

N_BIG = 200_000
MS = 1_000_000


# -- runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tl-runs")
    r = {"base": base}
    r["big"] = bench.synthetic_run(base, "big", N_BIG)
    r["sink"] = training_run(base, "sink", n_steps=6, allreduce_us=300, empty_steps=(3,)).path
    r["nonsink"] = training_run(base, "nonsink", sink=False, pipeline=None).path
    r["loop"] = training_run(base, "loop", sink=False).path  # a MindData pipeline read by the training loop
    r["nodp"] = training_run(base, "nodp", sink=False, pipeline=None).path
    set_manifest(r["nodp"], options={"profile_memory": True, "data_process": False})
    # only step markers: no tasks table
    r["notasks"] = training_run(base, "notasks", sink=False, pipeline=None).path
    (r["notasks"] / "rank_0" / "tasks.parquet").unlink()
    # a damaged tasks table
    r["corrupt"] = training_run(base, "corrupt").path
    truncate(r["corrupt"] / "rank_0" / "tasks.parquet")
    # PyNative host ops beside the tasks
    r["pynative"] = training_run(base, "pynative", sink=False, pipeline=None).path
    write_table(r["pynative"], "host_ops", pd.DataFrame({
        "op": ["matmul", "relu"], "name": ["", "relu_1"], "scope": ["Net/fc", "Net"],
        "start_ns": [100_000, 300_000], "end_ns": [250_000, 320_000]}))
    return r


@pytest.fixture(scope="module")
def app(runs):
    """One app for this module's page tests and its browser test (its callbacks are its own)."""
    from dashboard.app import create_app

    a = create_app(runs["base"])
    a.server.test_client().get("/")  # the first request: the router is set up
    return a


@pytest.fixture
def client(app, runs):
    from dashboard.data import RunStore, set_store

    # the RunStore is global and other tests create apps too: point it back at these runs, cold
    set_store(RunStore(runs["base"]))
    return bench.Client(app)


def _brute_busy(start, end, code, edges):
    """Busy fraction per bin by marking every nanosecond."""
    t_end = int(edges[-1])
    mark = np.zeros(t_end + 1, bool)
    for s, e, c in zip(start, end, code):
        if c != tl.CODE_WAIT:
            mark[s:e] = True
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        out.append(mark[a:b].mean() if b > a else 0.0)
    return np.array(out)


def _data_of(lanes):
    t_min = min(int(ln.start.min()) for ln in lanes)
    t_max = max(int(ln.end.max()) for ln in lanes)
    return tl.TimelineData(run=None, rank=0, lanes=lanes, steps=pd.DataFrame({"step": []}), t_min=t_min,
                           t_max=t_max, n_tasks=sum(len(ln) for ln in lanes))


# -- the analysis ---------------------------------------------------------------------------------------
def test_merge_intervals_is_the_union(rng):
    s = np.sort(rng.integers(0, 5000, 400))
    e = s + rng.integers(0, 300, 400)
    ms, ml = tl.merge_intervals(s, e)
    assert np.all(ms[1:] > ms[:-1] + ml[:-1])  # disjoint, not touching-overlapping
    mark = np.zeros(6000, bool)
    for a, b in zip(s, e):
        mark[a:b] = True
    mark2 = np.zeros(6000, bool)
    for a, n in zip(ms, ml):
        mark2[a:a + n] = True
    assert np.array_equal(mark, mark2)


@pytest.mark.parametrize("width", [7, 64, 500])
def test_busy_bins_match_brute_force(rng, width):
    """Overlapping tasks and waits on one lane: busy share per pixel equals the marked-nanosecond share."""
    n = 3000
    s = np.sort(rng.integers(0, 20_000, n)).astype(np.int64)
    e = s + rng.integers(0, 40, n)
    code = np.where(rng.random(n) < 0.1, tl.CODE_WAIT, 0).astype(np.int8)
    lane = tl.Lane("x", "x", "tasks", s, e, np.arange(n), code)
    data = _data_of([lane])
    for t0, t1 in ((0, 20_100), (3_000, 3_900), (15_123, 19_877)):
        win = tl.timeline_window(data, t0, t1, width, per_px=0.01, details=False)
        lv = win.lanes[0]
        assert lv.mode == "busy"
        np.testing.assert_allclose(lv.busy, _brute_busy(s, e, code, lv.edges_ns), atol=1e-12)
        starts = ((s >= lv.edges_ns[0]) & (s < lv.edges_ns[-1])).sum()
        assert lv.starts.sum() == starts


def test_exact_tasks_are_those_overlapping_the_window(rng):
    n = 2000
    s = np.sort(rng.integers(0, 100_000, n)).astype(np.int64)
    e = s + rng.integers(0, 5_000, n)  # long tasks: some start well before the window
    lane = tl.Lane("x", "x", "tasks", s, e, np.arange(n), np.zeros(n, np.int8))
    data = _data_of([lane])
    for t0, t1 in ((40_000, 41_000), (0, 500), (99_000, 120_000)):
        win = tl.timeline_window(data, t0, t1, 1000, details=False)
        got = set(win.lanes[0].tasks["row"])
        want = set(np.flatnonzero((s < t1) & ((e > t0) | (s >= t0))))
        assert got == want and win.exact


def test_lod_on_200k_tasks(runs):
    """Zoomed out: busy bins on the crowded lanes; a 1 ms window: exact tasks on every lane, exactly the
    tasks of the table that overlap it."""
    data = analysis.load_timeline(runs["big"])
    assert data.n_tasks == N_BIG
    keys = [ln.key for ln in data.lanes]
    assert keys == ["steps", "steps/phases", "aicore0", "aicore1", "aicpu", "comm", "host", "host/feeder"]
    win = analysis.timeline_window(data, data.t_min, data.t_max, 1200)
    modes = {lv.key: lv.mode for lv in win.lanes}
    assert modes["aicore0"] == "busy" and modes["steps"] == "tasks" and modes["host/feeder"] == "tasks"
    # busy time is conserved: the bins add up to the lane's busy time
    for lv, ln in zip(win.lanes, data.lanes):
        if lv.mode == "busy":
            total = (lv.busy * np.diff(lv.edges_ns)).sum()
            assert abs(total - ln.busy_ns) <= len(lv.busy)  # rounding of bin edges only
    tasks = pd.read_parquet(runs["big"] / "rank_0" / "tasks.parquet", columns=["stream", "graph", "start_ns", "end_ns",
                                                                                "name"])
    step = data.step_range(data.step_numbers[len(data.step_numbers) // 2])
    t0 = step[0] + 300_000
    t1 = t0 + MS
    win = analysis.timeline_window(data, t0, t1, 1200)
    assert win.exact and win.n_exact > 300
    for lv in win.lanes:
        if lv.source != "tasks":
            continue
        lane_rows = tasks[(tasks["stream"] == lv.key.split("/")[0])
                          & ((tasks["graph"] == "data_sink") == (lv.key == "host/feeder"))]
        want = lane_rows[(lane_rows["start_ns"] < t1) & (lane_rows["end_ns"] > t0)]
        assert sorted(lv.tasks["row"]) == sorted(want.index), lv.key
        assert list(lv.tasks["name"]) == list(tasks["name"].to_numpy()[lv.tasks["row"].to_numpy()])


def test_lanes_of_a_sink_run(runs):
    data = analysis.load_timeline(runs["sink"])
    assert [ln.key for ln in data.lanes] == ["steps", "steps/phases", "aicore0", "comm", "host/feeder"]
    feeder = data.lane("host/feeder")
    assert set(data.details("tasks", feeder.row)["name"]) == {"TransferData"}
    core = data.lane("aicore0")
    d = data.details("tasks", core.row)
    gn = (d["kind"] == "get_next").to_numpy()
    assert gn.sum() == 6 and np.all(core.code[gn] == tl.CODE_WAIT)
    # GetNext waits are drawn but are not busy time
    assert core.busy_ns == int(d.loc[~gn, "dur_ns"].sum())
    # steps lane = the step trace
    bd = analysis.step_breakdown(runs["sink"])
    assert list(data.lane("steps").start) == list(bd["start_ns"]) and list(data.lane("steps").end) == list(bd["end_ns"])


def test_max_tasks_sends_the_fullest_lane_to_busy_bins(runs):
    data = analysis.load_timeline(runs["big"])
    step = data.step_range(data.step_numbers[3])
    win = analysis.timeline_window(data, step[0], step[1], 1200, max_tasks=400)
    modes = {lv.key: lv.mode for lv in win.lanes}
    assert modes["aicore0"] == "busy" and win.n_exact <= 400 and modes["steps"] == "tasks"


def test_host_ops_lane_and_details(runs):
    data = analysis.load_timeline(runs["pynative"])
    lane = data.lane("host/pynative")
    assert list(lane.start) == [100_000, 300_000]
    win = analysis.timeline_window(data, 0, 400_000, 800)
    lv = next(v for v in win.lanes if v.key == "host/pynative")
    assert list(lv.tasks["name"]) == ["matmul", "relu_1"]  # an empty name shows the op
    assert analysis.task_details(data, "host_ops", 1)["scope"] == "Net"


def test_task_details_have_every_field(runs):
    data = analysis.load_timeline(runs["big"])
    d = analysis.task_details(data, "tasks", 3)
    for k in ("name", "op", "stream", "scope", "dur_ns", "shape", "flops", "fused_ops", "bytes", "dtype"):
        assert k in d
    assert d["name"].startswith('weird "quoted"')
    table = pd.read_parquet(runs["big"] / "rank_0" / "tasks.parquet")
    for row in (0, 70_000, N_BIG - 1):  # across row groups
        d = analysis.task_details(data, "tasks", row)
        assert d["name"] == table["name"].iat[row] and d["start_ns"] == table["start_ns"].iat[row]
    assert analysis.task_details(data, "steps", 0)["step"] == 0


def test_step_phases_tile_each_step(runs):
    """Data wait -> forward -> backward -> update -> tail: in order, without gaps or overlap, from the step's
    start to its end; forward ends where the step's first backward task starts."""
    data = analysis.load_timeline(runs["big"])
    ph, st = data.phases, data.steps
    assert set(ph["phase"]) <= {p for p, _ in tl.STEP_PHASES} and {"data wait", "forward", "backward"} <= set(ph["phase"])
    order = [p for p, _ in tl.STEP_PHASES]
    tasks = pd.read_parquet(runs["big"] / "rank_0" / "tasks.parquet", columns=["phase", "start_ns"])
    bwd = np.sort(tasks.loc[tasks["phase"] == "backward", "start_ns"].to_numpy())
    for k in (0, 7, len(st) - 1):
        seg = ph[ph["step_row"] == k]
        assert seg["start_ns"].iloc[0] == st["start_ns"].iat[k] and seg["end_ns"].iloc[-1] == st["end_ns"].iat[k]
        assert (seg["start_ns"].to_numpy()[1:] == seg["end_ns"].to_numpy()[:-1]).all()
        assert [order.index(p) for p in seg["phase"]] == sorted(order.index(p) for p in seg["phase"])
        fwd = seg[seg["phase"] == "forward"].iloc[0]
        assert fwd["start_ns"] == st["fp_start_ns"].iat[k]
        assert fwd["end_ns"] == bwd[np.searchsorted(bwd, st["fp_start_ns"].iat[k])]
    # the phases lane shares the Steps row of the figure and its clicks name the phase
    d = analysis.task_details(data, "phases", 1)
    assert d["phase"] == "forward" and d["dur_ns"] == d["end_ns"] - d["start_ns"]


def test_flows_of_our_runs(runs):
    """TransferData -> the GetNext that dequeued its batch (k-th to k-th), both ways."""
    data = analysis.load_timeline(runs["sink"])
    feeder = data.lane("host/feeder")
    det = data.details("tasks", data.get_next)
    assert set(det["kind"]) == {"get_next"} and (np.diff(det["start_ns"]) > 0).all()
    for k in range(len(feeder)):
        (f,) = tl.task_flows(data, "tasks", int(feeder.row[k]))
        assert (f.src, f.dst) == (int(feeder.row[k]), int(data.get_next[k]))
        assert tl.task_flows(data, "tasks", int(data.get_next[k])) == [f]
    core = data.lane("aicore0")
    kernel = int(core.row[core.code != tl.CODE_WAIT][0])
    assert tl.task_flows(data, "tasks", kernel) == [] and tl.task_flows(data, "steps", 0) == []
    assert data.lane_index("tasks", kernel) == [ln.key for ln in data.lanes].index("aicore0")


KINETO = ROOT.parent / "shared" / "data" / "kineto" / "alexnet_gpu.pt.trace.json.gz"


def test_flows_of_an_imported_kineto_run(tmp_path):
    """A kernel's flow is its ac2g arrow from the runtime call that launched it (the flows table)."""
    assert KINETO.exists(), f"the shared Kineto trace is not at {KINETO} (shared/ belongs beside the project root)"
    from insight.cli import main as cli_main

    out = tmp_path / "alexnet"
    assert cli_main(["import", str(KINETO), "--output", str(out)]) == 0
    data = analysis.load_timeline(out)
    t = pd.read_parquet(out / "rank_0" / "tasks.parquet", columns=["kind", "launch_task"])
    k = int(np.flatnonzero(t["kind"] == "kernel")[5])
    flows = tl.task_flows(data, "tasks", k)
    assert [(f.cat, f.dst) for f in flows] == [("ac2g", k)] and flows[0].src == t["launch_task"].iat[k]
    assert data.lane_index("tasks", flows[0].src) != data.lane_index("tasks", k)  # host lane -> device lane
    # the page draws it: an arrow from the launch to the kernel and both outlined
    from dashboard.pages import timeline as page

    shapes, notes = page._selection(data, {"source": "tasks", "row": k}, 1e-6)
    assert [s["name"] for s in shapes] == ["selected", "flow end"] and len(notes) == 1
    src = data.details("tasks", [flows[0].src, k])
    assert notes[0]["ax"] == pytest.approx(src["start_ns"].iat[0] / 1e6)
    assert notes[0]["x"] == pytest.approx(src["start_ns"].iat[1] / 1e6)


def test_the_server_indexes_big_runs_when_it_discovers_them(runs, tmp_path, monkeypatch):
    """The RunStore builds the lane index of each newly found run of INDEX_MIN_TASKS tasks or more in the
    background, so the first timeline view of a big run is already memory-mapped; small runs get none."""
    from dashboard.data import RunStore

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tl, "INDEX_MIN_TASKS", 1000)
    base = tmp_path / "base"
    shutil.copytree(runs["big"], base / "big")
    shutil.copytree(runs["sink"], base / "sink")
    store = RunStore(base)
    assert sorted(store.run_ids()) == ["big", "sink"]
    root = tmp_path / "cache" / "insight" / "timeline"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(root.glob("*/meta.json")):
        time.sleep(0.05)
    (index,) = [p.parent for p in root.glob("*/meta.json")]  # one: the big run's, not the 6-step run's
    assert index == tl._index_dir(open_run(base / "big"), 0)
    assert any(isinstance(ln.start, np.memmap) for ln in analysis.load_timeline(base / "big").lanes)


def test_lane_index_on_disk_is_memory_mapped_and_follows_the_run(runs, tmp_path, monkeypatch):
    """A large run's lanes are written once to the cache dir; the next load memory-maps them and answers every
    view exactly as the built lanes do; a changed tasks file gets a new index (the old one removed)."""
    import threading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tl, "INDEX_MIN_TASKS", 1000)
    run = tmp_path / "big"
    shutil.copytree(runs["big"], run)

    def join():
        for th in threading.enumerate():
            if th.name == "insight-timeline-index":
                th.join(60)

    built = analysis.load_timeline(run)
    join()
    (index,) = list((tmp_path / "cache" / "insight" / "timeline").iterdir())
    mapped = analysis.load_timeline(run)
    assert any(isinstance(ln.start, np.memmap) for ln in mapped.lanes)
    assert [ln.key for ln in mapped.lanes] == [ln.key for ln in built.lanes] and mapped.n_tasks == built.n_tasks
    assert np.array_equal(mapped.row_lane, built.row_lane) and np.array_equal(mapped.get_next, built.get_next)
    assert mapped.phases.equals(built.phases)
    step = built.step_range(built.step_numbers[40])
    for t0, t1 in ((built.t_min, built.t_max), (step[0], step[1]), (step[0] + 300_000, step[0] + 1_300_000)):
        a, b = (analysis.timeline_window(d, t0, t1, 1000) for d in (built, mapped))
        for x, y in zip(a.lanes, b.lanes):
            assert x.mode == y.mode
            if x.mode == "tasks":
                pd.testing.assert_frame_equal(x.tasks, y.tasks)
            else:
                assert np.array_equal(x.busy, y.busy) and np.array_equal(x.starts, y.starts)
    # the run changes: a new index replaces the old
    f = run / "rank_0" / "tasks.parquet"
    t = pd.read_parquet(f).iloc[: N_BIG // 2]
    t.to_parquet(f, index=False)
    fresh = analysis.load_timeline(run)
    assert fresh.n_tasks == N_BIG // 2
    join()
    assert [p.name for p in index.parent.iterdir()] != [index.name] and not index.exists()


def test_runs_missing_tables(runs, tmp_path):
    data = analysis.load_timeline(runs["notasks"])
    assert [ln.key for ln in data.lanes] == ["steps", "steps/phases"] and data.n_tasks == 0
    training_run(tmp_path, "bare", pipeline=None, memory=False)
    bare = tmp_path / "bare"
    for t in ("tasks", "steps", "device_queue"):
        (bare / "rank_0" / f"{t}.parquet").unlink()
    data = analysis.load_timeline(bare)
    assert data.lanes == []
    assert analysis.timeline_window(data, 0, 10, 100).lanes == []
    assert analysis.queue_depths(bare).empty and analysis.pipeline_per_step(bare).empty
    with pytest.raises(TraceError, match="tasks"):
        analysis.load_timeline(runs["corrupt"])


def test_queue_depths_and_per_step(runs):
    q = analysis.queue_depths(runs["sink"])
    assert set(q["queue"]) == {"batch #0 output (host queue)", "map #1 output", "numpy_slices #2 output",
                               "device queue"}
    host = q[q["root"]]
    assert sorted(set(host["depth"])) == [12, 14, 16]
    per = analysis.pipeline_per_step(runs["sink"])
    assert list(per["step"]) == [1, 2, 3, 4, 5, 6]
    assert list(per["device_empty"]) == [0, 0, 1, 0, 0, 0]
    assert list(per["device_pushes"]) == [1] * 6 and list(per["device_pops"]) == [1] * 6
    # host samples are taken every 10 ms from t=2 ms: each falls in the step whose range holds it
    bd = analysis.step_breakdown(runs["sink"])
    t = host["t_ns"].to_numpy()
    for r, b in zip(per.itertuples(), bd.itertuples()):
        assert r.host_samples == int(((t >= b.start_ns) & (t < b.end_ns)).sum())


# -- the pages, through Flask's test client ---------------------------------------------------------------
def _text(layout) -> str:
    return json.dumps(layout, ensure_ascii=False)


def test_first_render_of_200k_tasks_is_small(client):
    client.page("/run/sink/timeline")  # a warm server: it has served a page before
    client.figure("sink")
    layout, n1, t1 = client.page("/run/big/timeline")
    assert '"tl-graph"' in _text(layout) and "error-panel" not in _text(layout)
    fig, info, n2, t2 = client.figure("big", 1190)
    assert n1 + n2 <= 5_000_000, (n1, n2)
    print(f"first render of 200k tasks: {t1 + t2:.3f} s")  # timed in benchmarks/bench_timeline.py, not asserted
    kinds = {t["name"]: t["type"] for t in fig["data"]}
    assert kinds["aicore0"] == "scatter" and kinds["Steps"] == "bar"
    assert "busy per pixel" in info


def test_zoom_to_one_ms_returns_exact_tasks(client):
    client.page("/run/big/timeline")
    data = client_data("big")
    t0 = data.step_range(data.step_numbers[100])[0] / MS + 0.3
    fig, info, n, dt = client.figure("big", 1190, relayout={"xaxis.range[0]": t0, "xaxis.range[1]": t0 + 1},
                                     trigger="relayout")
    assert fig["data"] and all(t["type"] == "bar" for t in fig["data"])
    assert fig["layout"]["xaxis"]["range"] == pytest.approx([t0, t0 + 1])
    assert "busy per pixel" not in info and "exact tasks" in info
    n_tasks = sum(len(t["hovertext"]) for t in fig["data"])
    assert n_tasks > 300
    # a relayout that does not move the x axis (the browser filters those) changes nothing: 204
    r = client.c.post("/_dash-update-component", json={
        "output": "..tl-graph.figure...tl-info.children..",
        "outputs": [{"id": "tl-graph", "property": "figure"}, {"id": "tl-info", "property": "children"}],
        "inputs": [{"id": "tl-xrange", "property": "data", "value": {"autosize": True}},
                   {"id": "tl-step", "property": "value", "value": None},
                   {"id": "tl-reset", "property": "n_clicks", "value": 0},
                   {"id": "tl-width", "property": "data", "value": 1190}],
        "state": [{"id": "tl-run", "property": "data", "value": "big"}, {"id": "tl-rank", "property": "data", "value": 0},
                  {"id": "tl-selected", "property": "data", "value": None}], "changedPropIds": ["tl-xrange.data"]})
    assert r.status_code == 204
    # a window beyond the end of the run: nothing to draw, no error
    end = data.t_max / MS
    fig, info, n, dt = client.figure("big", 1190, relayout={"xaxis.range": [end + 50, end + 51]}, trigger="relayout")
    assert fig["data"] == [] and fig["layout"]["xaxis"]["range"] == pytest.approx([end + 50, end + 51])
    # double-click: the whole run again
    fig, info, n, dt = client.figure("big", 1190, relayout={"xaxis.autorange": True}, trigger="relayout")
    assert "busy per pixel" in info


def client_data(run_id):
    from dashboard.data import store

    return store().get(run_id, "timeline_data", analysis.load_timeline)


def test_step_dropdown_jumps_to_the_step(client):
    layout, _, _ = client.page("/run/sink/timeline")
    assert "step 4 · " in _text(layout)
    fig, info, _, _ = client.figure("sink", 1000, step=4, trigger="step")
    bd = analysis.step_breakdown(client_data("sink").run)
    r = bd[bd["step"] == 4].iloc[0]
    a, b = fig["layout"]["xaxis"]["range"]
    assert a <= r.start_ns / MS < r.end_ns / MS <= b and (b - a) < 1.1 * r.step_time_ms
    # ?step=4 in the URL selects it on load
    layout, _, _ = client.page("/run/sink/timeline", "?step=4")
    assert '"value": 4' in _text(layout)


def test_steps_lane_shows_phases_only_where_steps_are_wide_enough(client):
    """Phases under steps a few pixels wide cannot be told apart: the whole-run view of 200 steps at 1200 px
    draws the steps alone (filling the lane); one step's view draws the step over its phases."""
    from dashboard.pages.timeline import PHASE_PX

    def steps_traces(fig):
        return [t for t in fig["data"] if t["name"] == "Steps"]

    whole, _, _, _ = client.figure("big", 1200)
    (st,) = steps_traces(whole)
    a, b = whole["layout"]["xaxis"]["range"]
    durs = np.asarray(client_data("big").steps["step_time_ms"], float)
    assert np.median(durs) / ((b - a) / 1200) < PHASE_PX and st["width"] == 0.8
    assert not any(" · " in h.split("<br>")[0] for h in st["hovertext"])     # no phase slices in it
    one, _, _, _ = client.figure("big", 1200, step=100, trigger="step")
    top, below = steps_traces(one)
    assert top["width"] == below["width"] == 0.38
    shown = {h.split("</b> · ")[1].split("<br>")[0] for h in below["hovertext"] if "</b> · " in h}
    assert {"forward", "backward"} <= shown, shown


def _click(client, run_id, point, rank=0):
    res, _, _ = client._post("..tl-details.children...tl-selected.data..",
                             [{"id": "tl-details", "property": "children"}, {"id": "tl-selected", "property": "data"}],
                             [{"id": "tl-graph", "property": "clickData", "value": {"points": [point]}}],
                             state=[{"id": "tl-run", "property": "data", "value": run_id},
                                    {"id": "tl-rank", "property": "data", "value": rank}],
                             changed=["tl-graph.clickData"])
    return _text(res)


def test_click_shows_every_field(client):
    client.page("/run/big/timeline")
    text = _click(client, "big", {"customdata": 3 * 4 + 0, "x": 1.0})  # row 3 of tasks
    for k in ("est. flops", "est. bytes", "shape", "fused ops", "scope", "stream", "duration", "Net/backbone",
              "from the run's start", " into step "):
        assert k in text
    # one unit for times: ms (no "dur ns 4.150 ms", no raw nanoseconds)
    assert " ns" not in text.replace("fused_ops", "") and "µs" not in text
    assert "\\\\x01" in text  # the control character in the name is shown escaped
    assert "Busy share" in _click(client, "big", {"x": 3.0, "curveNumber": 1})
    step = _click(client, "big", {"customdata": 5 * 4 + 2, "x": 3.0})  # step row 5
    assert "step time" in step and "into the step" in step


def test_rank_selector_and_slice_names(client, runs, tmp_path):
    """?rank=1 shows rank 1's lanes on its own clock, with links to every rank; slices wide enough carry their
    names, narrow ones none."""
    import shutil as sh

    from dashboard.data import RunStore, set_store

    base = tmp_path / "ranks"
    run = training_run(base, "dp", n_steps=4, sink=False, pipeline=None).path
    sh.copytree(run / "rank_0", run / "rank_1")
    t = pd.read_parquet(run / "rank_1" / "tasks.parquet")
    t["start_ns"] += 7 * MS
    t["end_ns"] += 7 * MS
    t.to_parquet(run / "rank_1" / "tasks.parquet", index=False)
    st = pd.read_parquet(run / "rank_1" / "steps.parquet")
    for c in st.columns:
        if c.endswith("_ns"):
            st[c] = np.where(st[c] >= 0, st[c] + 7 * MS, st[c])
    st.to_parquet(run / "rank_1" / "steps.parquet", index=False)
    set_manifest(run, ranks=[0, 1])
    set_store(RunStore(base))
    layout, _, _ = client.page("/run/dp/timeline", "?rank=1")
    text = _text(layout)
    assert '"tl-rank-0"' in text and '"tl-rank-1"' in text and "?rank=0" in text
    assert '"id": "tl-rank", "data": 1' in text or '"data": 1, "id": "tl-rank"' in text
    r0 = analysis.load_timeline(run, 0)
    r1 = analysis.load_timeline(run, 1)
    fig0, _, _, _ = client.figure("dp", 1000, rank=0)
    fig1, _, _, _ = client.figure("dp", 1000, rank=1)
    assert r1.lane("aicore0").start[0] == r0.lane("aicore0").start[0] + 7 * MS
    core = [tr for tr in fig1["data"] if tr["name"] == "aicore0"][0]
    assert _typed_len(core["base"])[0] == pytest.approx(r1.lane("aicore0").start[0] / MS)
    assert fig0["layout"]["xaxis"]["range"] != fig1["layout"]["xaxis"]["range"]
    # names: the wide slices of the zoomed-in figure carry theirs, the rest ""
    step = r1.step_range(r1.step_numbers[1])
    fig, _, _, _ = client.figure("dp", 1000, rank=1, trigger="relayout",
                                 relayout={"xaxis.range": [step[0] / MS, step[1] / MS]})
    core = [tr for tr in fig["data"] if tr["name"] == "aicore0"][0]
    widths = _typed_len(core["x"])
    px = (step[1] - step[0]) / MS / 1000
    names = [h.split("</b>")[0][3:] for h in core["hovertext"]]
    assert any(core["text"])
    for w, label, name in zip(widths, core["text"], names):
        assert label == (name if w >= 36 * px else "")


def test_download_route_serves_the_gzip_chrome_trace(client, runs):
    r = client.c.get("/download/sink/trace.json.gz")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/gzip"
    assert "attachment" in r.headers["Content-Disposition"]
    doc = json.loads(gzip.decompress(r.data))
    n = len(pd.read_parquet(runs["sink"] / "rank_0" / "tasks.parquet"))
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] not in ("step", "step_phase")) == n
    assert client.c.get("/download/nope/trace.json.gz").status_code == 404
    assert client.c.get("/download/%2E%2E/trace.json.gz").status_code == 404  # never outside the base dir
    bad = client.c.get("/download/corrupt/trace.json.gz")
    assert bad.status_code == 422 and b"cannot read" in bad.data


def test_forged_timeline_inputs_are_bounded(client):
    """A forged callback asking for a window 1e7 pixels wide is clamped: fast and small; values that are not
    numbers give a message in the page, not a 500."""
    client.page("/run/big/timeline")
    t = time.perf_counter()
    fig, info, n, _ = client.figure("big", 1e7)
    assert time.perf_counter() - t < 10 and n < 2_000_000, n
    busy = [tr for tr in fig["data"] if tr["type"] == "scatter"]
    assert busy and all(len(_typed_len(tr["x"])) <= 2 * 4096 + 10 for tr in busy)
    for width in (-5, "abc", None, True, float("nan"), [1, 2], {"a": 1}):
        fig, info, _, _ = client.figure("big", width)  # the default width: no error
        assert fig["data"]
    for relayout in ({"xaxis.range[0]": "x", "xaxis.range[1]": 2}, {"xaxis.range": [1, float("inf")]},
                     {"xaxis.range": [0, 1e300]}, {"xaxis.range[0]": [1], "xaxis.range[1]": {}}):
        fig, info, _, _ = client.figure("big", 1000, relayout=relayout, trigger="relayout")
        assert "invalid view" in info
    for step in ("abc", 10 ** 30, -1, 1.5, [3]):
        fig, info, _, _ = client.figure("sink", 1000, step=step, trigger="step")
        assert "no step" in info
    res, _, _ = client._post("..tl-graph.figure...tl-info.children..",
                             [{"id": "tl-graph", "property": "figure"}, {"id": "tl-info", "property": "children"}],
                             [{"id": "tl-xrange", "property": "data", "value": None},
                              {"id": "tl-step", "property": "value", "value": None},
                              {"id": "tl-reset", "property": "n_clicks", "value": 0},
                              {"id": "tl-width", "property": "data", "value": 800}],
                             state=[{"id": "tl-run", "property": "data", "value": "x" * 10_000},
                                    {"id": "tl-rank", "property": "data", "value": 0},
                                    {"id": "tl-selected", "property": "data", "value": None}])
    assert res["response"]["tl-info"]["children"] == "no such run"
    # a forged rank is the run's first rank; a forged selection outlines nothing
    for rank, sel in (("abc", {"source": "tasks", "row": -3}), (10 ** 30, {"source": "nope", "row": 1}),
                      ([1], {"source": "tasks", "row": 10 ** 30}), (None, "x"), (7, {"source": "tasks", "row": True})):
        fig, info, _, _ = client.figure("sink", 1000, rank=rank, selected=sel)
        assert fig["data"] and not [sh for sh in fig["layout"]["shapes"] if sh.get("name") == "selected"]
    for cd in (float("inf"), -8, 10 ** 18, "x"):
        assert "no details" in _click(client, "sink", {"customdata": cd, "x": 1.0}) or \
            "Busy share" in _click(client, "sink", {"customdata": cd, "x": 1.0})


def test_request_bodies_and_page_ids_are_bounded(client):
    big = {"output": "x", "outputs": [], "inputs": [{"id": "a", "property": "b", "value": "x" * (2 << 20)}],
           "state": [], "changedPropIds": []}
    assert client.c.post("/_dash-update-component", json=big).status_code == 413
    layout, _, _ = client.page("/run/" + "a" * 10_000 + "/timeline")
    text = _text(layout)
    assert '"not-found"' in text and len(text) < 5_000


def _typed_len(spec):
    import base64
    if isinstance(spec, dict) and "bdata" in spec:
        return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]))
    return spec


def test_download_ids_are_bounded_and_traces_live_in_the_cache_dir(client, runs, tmp_path, monkeypatch):
    from dashboard import routes

    routes.cleanup_trace_cache()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert client.c.get("/download/" + "a" * 10_000 + "/trace.json.gz").status_code == 404
    assert client.c.get("/download/" + "%2E" * 3000 + "/trace.json.gz").status_code == 404
    r = client.c.get("/download/sink/trace.json.gz")
    assert r.status_code == 200
    d = routes.trace_cache_dir()
    assert d.parent == tmp_path / "cache" / "insight" / "traces" and list(d.glob("*.trace.json.gz"))
    # a directory left by a server that died is removed by the next one
    stale = d.parent / "999999999-dead"
    stale.mkdir()
    routes.cleanup_trace_cache()
    assert not d.exists()
    assert client.c.get("/download/sink/trace.json.gz").status_code == 200
    assert not stale.exists()
    routes.cleanup_trace_cache()
    assert list((tmp_path / "cache" / "insight" / "traces").iterdir()) == []


def test_pipeline_page(client):
    layout, n, _ = client.page("/run/sink/pipeline")
    text = _text(layout)
    for id_ in ("pipe-graph", "pipe-ops-table", "pipe-queues", "pipe-steps", "pipe-steps-table", "pipeline-verdict",
                "pipeline-advice"):
        assert f'"{id_}"' in text, id_
    assert "data_transfer" not in text and "Host-to-device transfer is the bottleneck" in text
    assert "numpy_slices" in text
    # a pipeline without sink mode: no device queue, the training step reads the host queue
    text = _text(client.page("/run/loop/pipeline")[0])
    assert '"pipe-graph"' in text and "training step" in text and "there is no device queue" in text
    for run_id, phrase in (("nonsink", "did not read a MindData dataset"), ("nodp", "data_process=False")):
        text = _text(client.page(f"/run/{run_id}/pipeline")[0])
        assert '"pipeline-no-data"' in text and phrase in text and '"pipe-graph"' not in text


def test_pages_survive_missing_and_corrupt_tables(client):
    for page in ("timeline", "pipeline"):
        text = _text(client.page(f"/run/notasks/{page}")[0])
        assert "error-panel" not in text, page
        text = _text(client.page(f"/run/corrupt/{page}")[0])
        assert '"error-panel"' in text and "cannot read rank_0/tasks.parquet" in text, page
        text = _text(client.page(f"/run/missing/{page}")[0])
        assert '"not-found"' in text
    fig, info, _, _ = client.figure("notasks", 800)
    assert [t["name"] for t in fig["data"]] == ["Steps", "Steps"]  # the steps and their phases, one lane
    assert len(fig["layout"]["yaxis"]["tickvals"]) == 1


# -- in a browser -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(app, runs):
    """The dashboard over ``runs`` on a free port, in a background thread."""
    from werkzeug.serving import make_server

    from dashboard.data import RunStore, set_store

    set_store(RunStore(runs["base"]))
    srv = make_server("127.0.0.1", _free_port(), app.server, threaded=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    th.join(10)


@pytest.fixture
def browser():
    if not shutil.which("chromedriver") and not Path("/usr/bin/chromedriver").exists():
        pytest.fail("no chromedriver: install chromium and chromium-driver (bash scripts/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--window-size=1400,1200"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    yield drv
    drv.quit()


def _wait(drv, js, timeout=30.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = drv.execute_script(js)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or js}")


def _errors(drv) -> list:
    return [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


GD = "var gd = document.querySelector('#tl-graph .js-plotly-plot'); "


@pytest.mark.browser
def test_pages_in_chromium_without_console_errors(served, browser):
    drv = browser
    # timeline of 200k tasks: first render, zoom to 1 ms (plotly's relayout -> the server), click a task
    drv.get(served + "/run/big/timeline")
    _wait(drv, GD + "return gd && gd.data && gd.data.length > 0 && document.getElementById('tl-info').innerText;",
          what="the timeline figure")
    assert "busy per pixel" in drv.find_element("id", "tl-info").text
    a, b = drv.execute_script(GD + "return gd.layout.xaxis.range;")
    x0 = (a + b) / 2
    drv.execute_script(GD + "Plotly.relayout(gd, {'xaxis.range': [arguments[0], arguments[0] + 1]});", x0)
    _wait(drv, "return document.getElementById('tl-info').innerText.indexOf('exact tasks') >= 0 && "
               "document.getElementById('tl-info').innerText.indexOf('busy per pixel') < 0;", what="exact tasks")
    assert drv.execute_script(GD + "return gd.data.every(function(t) { return t.type === 'bar'; });")
    rng = drv.execute_script(GD + "return gd.layout.xaxis.range;")
    assert rng == pytest.approx([x0, x0 + 1])
    bars = drv.find_elements("css selector", "#tl-graph .barlayer .point path")
    assert len(bars) > 300
    from selenium.webdriver.common.action_chains import ActionChains

    # click a task whose bar lies wholly inside the plot area
    box = drv.execute_script("var r = document.querySelector('#tl-graph .nsewdrag').getBoundingClientRect();"
                             "return [r.left, r.right];")
    inside = [b for b in bars[:600] if box[0] + 5 < b.rect["x"] and b.rect["x"] + b.rect["width"] < box[1] - 5
              and b.rect["width"] >= 2]
    ActionChains(drv).move_to_element(inside[len(inside) // 2]).click().perform()
    _wait(drv, "return document.getElementById('tl-details-table') !== null;", what="the details panel")
    assert "flops" in drv.find_element("id", "tl-details").text
    # ?step= jumps to the step
    drv.get(served + "/run/sink/timeline?step=3")
    _wait(drv, GD + "return gd && gd.data && gd.data.length > 0;", what="the sink timeline")
    a, b = drv.execute_script(GD + "return gd.layout.xaxis.range;")
    assert b - a < 30  # one step (about 3 ms), not the whole run
    # the data pipeline, both tabs
    drv.get(served + "/run/sink/pipeline")
    _wait(drv, "return document.querySelector('#pipe-graph .js-plotly-plot .scatterlayer') !== null;",
          what="the pipeline graph")
    assert "Host-to-device transfer" in drv.find_element("id", "pipeline-verdict").text
    drv.find_element("xpath", "//*[contains(text(), 'Step interval')]").click()
    _wait(drv, "return document.querySelector('#pipe-steps .js-plotly-plot .barlayer') !== null;",
          what="the step-interval chart")
    drv.get(served + "/run/nonsink/pipeline")
    _wait(drv, "return document.getElementById('pipeline-no-data') !== null;", what="the no-data message")
    drv.get(served + "/run/corrupt/timeline")
    _wait(drv, "return document.getElementById('error-panel') !== null;", what="the error panel")
    time.sleep(0.5)
    assert _errors(drv) == []
