"""The Operators, Memory and Compare pages: what they show equals what insight.analysis computes; broken,
unknown and hostile run ids stay inside their panel and inside the base dir.

One base dir for the module: a real run (a tiny LeNet trained under insight.Profiler), synthetic runs with
known numbers (tests/synthetic_runs.py), a run whose tasks.parquet is truncated, one without memory data,
and -- outside the base dir -- a run the traversal tests try to reach.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dashboard.components import fmt_ms
from insight import analysis
from synthetic_runs import MB, truncate, training_run

SECRET_OP = "secretop"
# synth2 against synth: conv2d faster, relu removed, gelu added, conv2d_grad slower, the rest unchanged
FWD2 = (("conv2d_1", "conv2d", 200, "LeNet/conv1"), ("matmul_3", "matmul", 300, "LeNet/fc1"),
        ("gelu_9", "gelu", 150, "LeNet/act"))
BWD2 = (("matmul_grad_4", "matmul", 500, "Gradients/LeNet/fc1"),
        ("conv2d_grad_5", "conv2d_grad", 1200, "Gradients/LeNet/conv1"))
EXPECTED_STATUS = {"conv2d": "faster", "relu": "removed", "gelu": "added", "conv2d_grad": "slower",
                   "matmul": "same", "assign": "same", "get_next": "same"}


# -- fixtures -----------------------------------------------------------------------------------------------
def _real_run(path: Path) -> None:
    from insight import Profiler
    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.dataset.digits import load_digits_split
    from runtime.models import LeNetDigits

    context.reset_context()
    context.set_context(mode=context.GRAPH_MODE, seed=0)
    xtr, ytr, _, _ = load_digits_split(seed=0)
    net = LeNetDigits(channels=(8, 16), hidden=32)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    ds = NumpySlicesDataset((xtr[:160], ytr[:160]), ["image", "label"], shuffle=True, seed=0).batch(
        32, drop_remainder=True)
    with Profiler(path, flush_interval=0.1):
        model.train(1, ds, dataset_sink_mode=True)
    context.reset_context()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash_pages")
    b = root / "base"
    b.mkdir()
    synth = training_run(b, "synth")
    training_run(b, "synth2", fwd=FWD2, bwd=BWD2)
    broken = training_run(b, "broken")
    truncate(broken.path / "rank_0" / "tasks.parquet", 0.4)
    training_run(b, "nomem", memory=False)
    training_run(b, "pooled", pool=True)
    _real_run(b / "real")
    secret = training_run(root / "outside", "secret", fwd=((f"{SECRET_OP}_1", SECRET_OP, 400, "S"),))
    return {"base": b, "synth": synth, "secret": secret.path, "root": root}


@pytest.fixture(scope="module")
def app(base):
    from dashboard.app import create_app
    from dashboard.data import store

    a = create_app(base["base"], reload_interval=0)  # its callbacks are its own (app.callback)
    a.run_store = store()
    a.server.test_client().get("/")  # first request: the router is set up
    return a


@pytest.fixture(autouse=True)
def _this_store(app):
    from dashboard.data import set_store
    set_store(app.run_store)


@pytest.fixture
def client(app):
    return app.server.test_client()


def P(name):
    return importlib.import_module(f"dashboard.pages.{name}")


# -- helpers ------------------------------------------------------------------------------------------------
def find(c, id_):
    """The component with ``id_`` in a layout tree, or None."""
    if getattr(c, "id", None) == id_:
        return c
    kids = getattr(c, "children", None)
    if kids is None or isinstance(kids, str):
        return None
    for k in kids if isinstance(kids, (list, tuple)) else [kids]:
        hit = find(k, id_)
        if hit is not None:
            return hit
    return None


def text(c) -> str:
    if c is None:
        return ""
    if isinstance(c, (str, int, float)):
        return str(c)
    if isinstance(c, (list, tuple)):
        return " ".join(text(k) for k in c)
    return text(getattr(c, "children", None))


def route(client, path, search=""):
    """What the page router renders for a URL (the browser's first callback after loading a page)."""
    r = client.post("/_dash-update-component", json={
        "output": ".._pages_content.children..._pages_store.data..",
        "outputs": [{"id": "_pages_content", "property": "children"}, {"id": "_pages_store", "property": "data"}],
        "inputs": [{"id": "_pages_location", "property": "pathname", "value": path},
                   {"id": "_pages_location", "property": "search", "value": search}],
        "changedPropIds": ["_pages_location.pathname"], "state": []})
    assert r.status_code == 200, r.data[:500]
    return r.get_data(as_text=True)


# -- operators ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["synth", "real"])
def test_operators_tables_equal_the_analysis(app, base, run_id):
    ops_page = P("operators")
    path = base["base"] / run_id
    types = analysis.op_type_stats(path)
    ops = analysis.op_stats(path)
    lay = ops_page.layout(run_id=run_id)
    assert find(lay, "error-panel") is None
    trows = find(lay, "op-type-table").rowData
    orows = find(lay, "op-table").rowData
    assert [r["op"] for r in trows] == list(types["op"])
    assert trows[0]["total_ms"] == pytest.approx(types["total_ms"].iloc[0], rel=1e-12)
    assert text(find(lay, "ops-top-type")) == types["op"].iloc[0]
    assert text(find(lay, "ops-top-type-ms")) == fmt_ms(types["total_ms"].iloc[0])
    assert len(orows) == len(ops) and sum(r["calls"] for r in orows) == int(ops["calls"].sum())
    assert sum(r["share"] for r in trows) == pytest.approx(1.0)
    by_name = {r["name"]: r for r in orows}
    for r in ops.head(5).itertuples():
        row = by_name[r.name]
        assert (row["op"], row["calls"], row["stream"]) == (r.op, r.calls, r.stream)
        assert row["avg_ms"] == pytest.approx(r.avg_ms) and row["max_ms"] == pytest.approx(r.max_ms)
        if r.flops > 0:
            assert row["flop_per_s"] == pytest.approx(r.flop_per_s)
    # the tables sort, filter and page natively, 10/20/50 rows a page
    for tid in ("op-type-table", "op-table"):
        t = find(lay, tid)
        assert (t.defaultColDef["sortable"], t.defaultColDef["filter"], t.dashGridOptions["pagination"],
                t.dashGridOptions["paginationPageSize"]) == (True, True, True, 10)
        cols = {c["field"]: c for c in t.columnDefs}  # numbers filter as numbers, text case-insensitively
        assert cols["total_ms"]["filter"] == "agNumberColumnFilter" and cols["op"]["filter"] == "agTextColumnFilter"
    assert [o["value"] for o in find(lay, "op-page-size").options] == [10, 20, 50]
    ids = {c["field"] for c in find(lay, "op-table").columnDefs}
    assert {"name", "op", "calls", "total_ms", "avg_ms", "min_ms", "max_ms", "share", "flops", "flop_per_s",
            "shapes", "dtypes", "stream", "scope", "fused_ops"} <= ids
    names = {c["field"]: c["headerName"] for c in find(lay, "op-table").columnDefs}
    assert (names["flops"], names["flop_per_s"]) == ("Est. FLOPs", "Est. FLOP/s")  # estimates, labelled so
    # the per-step chart starts on the top op
    fig = find(lay, "op-per-step").figure
    per = analysis.op_time_per_step(path, ops["name"].iloc[0])
    assert list(fig.data[0].y) == pytest.approx(list(per["total_ms"]))


def test_operators_known_numbers(app):
    lay = P("operators").layout(run_id="synth")
    rows = {r["op"]: r for r in find(lay, "op-type-table").rowData}
    # 5 steps: conv2d_grad 800 us, matmul 300 + 500 us, conv2d 400 us per step
    assert rows["conv2d_grad"]["total_ms"] == pytest.approx(4.0)
    assert rows["matmul"]["total_ms"] == pytest.approx(4.0) and rows["matmul"]["calls"] == 10
    assert rows["conv2d"]["flops"] == 5 * 2_000_000
    assert rows["conv2d"]["flop_per_s"] == pytest.approx(5 * 2_000_000 / 2e-3)
    assert rows["get_next"]["flops"] is None  # no cost estimate: unknown, shown as a dash


def test_operator_callbacks(app, base):
    ops_page = P("operators")
    path = base["base"] / "synth"
    rows = ops_page.filter_ops("cgrad", "all", "synth")  # fuzzy: a subsequence of conv2d_grad
    assert [r["name"] for r in rows] == ["conv2d_grad_5"]
    rows = ops_page.filter_types("grad", "all", "synth")  # matmul: its backward op's scope is Gradients/...
    assert {r["op"] for r in rows} == {"conv2d_grad", "matmul"}
    rows = ops_page.filter_types("grad conv", "all", "synth")  # every term must match
    assert {r["op"] for r in rows} == {"conv2d_grad"}
    kernels = ops_page.filter_types("", "kernel", "synth")
    assert "get_next" not in {r["op"] for r in kernels}
    assert {r["op"] for r in kernels} == set(analysis.op_type_stats(path, kinds=("kernel",))["op"])
    assert ops_page.op_page_size(50) == (50, 0) and ops_page.type_page_size(20) == (20, 0)

    types = analysis.op_type_stats(path)
    top3 = ops_page.update_top_chart(3, "op", "all", "synth")  # the top 3 and the rest as one "(other)" bar
    assert top3.data[0].type == "bar" and list(top3.data[0].y)[0] == "(other)"
    assert sum(top3.data[0].x) == pytest.approx(types["total_ms"].sum())
    # each bar's axis label carries its share of op time; the category (what a click reports) is the op alone
    labels = dict(zip(top3.layout.yaxis.tickvals, top3.layout.yaxis.ticktext))
    top_op = types.iloc[0]
    assert labels[top_op["op"]] == f"{top_op['op']}  {top_op['share']:.1%}"
    bar = ops_page.update_top_chart(3, "name", "all", "synth")
    assert bar.data[0].type == "bar" and len(bar.data[0].y) == 4
    assert list(bar.data[0].y)[::-1][:3] == list(analysis.top_n(analysis.op_stats(path), 3)["name"])

    sel = ops_page.selection_from("op-table", None, {"rowIndex": 0, "colId": "name", "rowId": "train_step\x1fconv2d_1"},
                                  None, "op")
    assert sel == {"by": "name", "name": "conv2d_1"}
    fig = ops_page.show_selection(sel, "synth")
    assert list(fig.data[0].y) == pytest.approx([0.4] * 5)
    sel = ops_page.selection_from("op-type-table", {"rowIndex": 1, "colId": "op", "rowId": "matmul"}, None, None, "op")
    fig = ops_page.show_selection(sel, "synth")
    assert list(fig.data[0].y) == pytest.approx(list(analysis.op_time_per_step(path, "matmul", by="op")["total_ms"]))
    assert ops_page.selection_from("ops-top-chart", None, None, {"points": [{"y": "relu"}]}, "op") == \
        {"by": "op", "name": "relu"}


# -- memory -------------------------------------------------------------------------------------------------
def test_memory_page_equals_the_analysis(app, base):
    mem = P("memory")
    exp = base["synth"]
    peak = analysis.memory_peak(exp.path)
    assert peak.peak_bytes == exp.peak_bytes
    lay = mem.layout(run_id="synth")
    assert text(find(lay, "mem-peak")) == f"{exp.peak_bytes / MB:.2f} MB"
    assert text(find(lay, "mem-capacity")) == "64.00 MB"
    assert text(find(lay, "mem-allocs")) == f"{peak.allocations:,}"
    assert text(find(lay, "mem-frees")) == f"{peak.frees:,}"
    assert sorted(r["name"] for r in find(lay, "mem-peak-table").rowData) == sorted(exp.peak_tensors)
    fig = find(lay, "mem-timeline").figure
    star = next(t for t in fig.data if t.name == "peak")
    assert star.x[0] == pytest.approx(peak.t_ns / 1e6) and star.y[0] == pytest.approx(exp.peak_bytes / MB)
    curve = next(t for t in fig.data if t.name == "planned in use")  # a run without pool events: all planned
    assert max(curve.y) == pytest.approx(exp.peak_bytes / MB)
    bounds = next(t for t in fig.data if t.name == "step boundary")
    assert len([x for x in bounds.x if x is not None]) == 2 * (len(exp.steps) + 1)
    # capacity (64 MB) is off the fitted scale; the 'whole capacity' axis shows it
    full = mem.rescale("capacity", "synth")
    assert full.layout.yaxis.range[1] >= 64 and any(s.y0 == 64 for s in full.layout.shapes)

    real = base["base"] / "real"
    rpeak = analysis.memory_peak(real)
    lay = mem.layout(run_id="real")
    assert rpeak.peak_bytes > 0 and text(find(lay, "mem-peak")) == f"{rpeak.peak_bytes / MB:.2f} MB"
    assert len(find(lay, "mem-peak-table").rowData) == len(rpeak.live)


def test_memory_steps_chart_marks_the_peaks_step_apart_from_steps_that_tie_it(app):
    """The card names one step for the peak; when other steps reach the same bytes they are marked too, but
    differently, and the title says how many, so the chart and the card do not disagree."""
    import pandas as pd
    mem = P("memory")
    peaks = pd.DataFrame({"step": [0, 1, 2, 3, 4], "peak_bytes": [5 * MB, 9 * MB, 7 * MB, 9 * MB, 9 * MB],
                          "start_ns": [0, 10, 20, 30, 40], "end_ns": [10, 20, 30, 40, 50]})
    peaks["peak_mb"] = peaks["peak_bytes"] / MB
    fig = mem.steps_figure(peaks, analysis.MemoryPeak(peak_bytes=9 * MB, step=3))
    assert list(fig.data[0].marker.color) == ["#3a86ff", "#f4a0a0", "#3a86ff", "#d00000", "#f4a0a0"]
    assert "the run's peak (step 3)" in fig.layout.title.text and "2 more steps" in fig.layout.title.text
    one = mem.steps_figure(peaks.assign(peak_bytes=[5 * MB, 6 * MB, 7 * MB, 9 * MB, 8 * MB]),
                           analysis.MemoryPeak(peak_bytes=9 * MB, step=3))
    assert list(one.data[0].marker.color).count("#d00000") == 1 and "<br>" not in one.layout.title.text


def test_memory_click_lists_the_tensors_alive_then(app, base):
    mem = P("memory")
    exp = base["synth"]
    peak = analysis.memory_peak(exp.path)
    title, summary, rows = mem.inspect({"points": [{"x": peak.t_ns / 1e6, "customdata": [peak.t_ns, peak.step]}]},
                                       "synth")
    assert sorted(r["name"] for r in rows) == sorted(exp.peak_tensors)
    assert sum(r["size"] for r in rows) == exp.peak_bytes and f"{exp.peak_bytes / MB:.3f} MB in use" in summary
    assert f"step {exp.peak_step}" in title
    # a click on the line itself only carries x (ms)
    _, _, rows_x = mem.inspect({"points": [{"x": peak.t_ns / 1e6}]}, "synth")
    assert rows_x == rows
    # between two steps only the parameters are alive; before anything, nothing
    bd = analysis.step_breakdown(exp.path)
    t_gap = int(bd["start_ns"].iloc[2]) + 1
    assert [r["name"] for r in mem.inspect({"points": [{"x": t_gap / 1e6}]}, "synth")[2]] == ["params"]
    assert mem.inspect({"points": [{"x": -1.0}]}, "synth")[2] == []
    assert mem.inspect(None, "synth")[0] is __import__("dash").no_update
    # a click between two memory events reports the earlier one (the curve's value there), never the next
    lt = analysis.memory_intervals(exp.path)
    t0, t1 = int(lt.t_ns[3]), int(lt.t_ns[4])
    if t1 > t0 + 2:
        title, summary, _ = mem.inspect({"x_ms": (t0 + (t1 - t0) * 0.9) / 1e6}, "synth")
        assert title.startswith(f"Tensors alive at {t0 / 1e6:.3f} ms") and "at or before the click" in summary
    # the real run: at its peak, the tensors listed are the analysis' live set
    real = base["base"] / "real"
    rpeak = analysis.memory_peak(real)
    _, _, rrows = mem.inspect({"points": [{"x": 0, "customdata": [rpeak.t_ns, rpeak.step]}]}, "real")
    assert sum(r["size"] for r in rrows) == rpeak.live_bytes


def test_memory_page_shows_the_pool_by_kind_and_labels_the_plan(app, base):
    mem = P("memory")
    path = base["base"] / "pooled"
    peak = analysis.memory_peak(path)
    lay = mem.layout(run_id="pooled")
    assert peak.source == "pool" and text(find(lay, "mem-peak")) == f"{peak.peak_bytes / MB:.2f} MB"
    fig = find(lay, "mem-timeline").figure
    names = [t.name for t in fig.data]
    stacked = {t.name: t for t in fig.data if getattr(t, "stackgroup", None) == "kinds"}
    assert set(stacked) == {"parameters", "activation reserve", "workspace", "data-queue batches",
                            "kernel buffer pool"}
    usage = analysis.memory_usage(path)
    assert list(stacked["kernel buffer pool"].y) == pytest.approx(list(usage["kernel_pool"] / MB))
    assert "in use" in names and any(n.startswith("planned liveness") for n in names)
    assert "MemoryPool" in fig.layout.title.text
    assert "planned" in text(find(lay, "mem-source")) and "Measured" in text(find(lay, "mem-source"))
    # a run with only planned rows is labelled planned: its curve, its stack, its title
    fig = find(mem.layout(run_id="synth"), "mem-timeline").figure
    names = [t.name for t in fig.data]
    assert "in use" not in names and "planned in use" in names and "planned activations" in names
    assert fig.layout.title.text.startswith("Planned")


def test_pages_use_only_public_analysis_and_dash_api():
    """Pages lay out what insight.analysis returns: no private module, no reading of tables, no Dash
    internals anywhere in the dashboard."""
    import ast

    root = Path(__file__).resolve().parents[1] / "dashboard"
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                mods, names = [a.name for a in node.names], []
            else:
                continue
            for m in mods:
                assert m == "__future__" or not any(p.startswith("_") for p in m.split(".")), (f.name, m)
                assert not m.startswith(("pyarrow", "runtime")), (f.name, m)
            if (getattr(node, "module", None) or "").startswith(("insight", "dash")):
                assert not any(n.startswith("_") for n in names), (f.name, names)
        src = f.read_text()
        assert "dash._" not in src and "GLOBAL_CALLBACK" not in src, f.name
        if f.parent.name == "pages":
            assert "read_parquet" not in src and ".groupby(" not in src, f.name


def test_memory_page_without_memory_data(app):
    lay = P("memory").layout(run_id="nomem")
    assert find(lay, "mem-empty") is not None and find(lay, "error-panel") is None


# -- data pipeline ------------------------------------------------------------------------------------------
def test_pipeline_map_colours_follow_the_verdict(app, base):
    """The map's slowest op is red only when the verdict says data processing is the bottleneck; while the
    pipeline keeps up it is outlined, never red (red beside "keeps up" contradicted the verdict)."""
    import copy

    pipe = P("pipeline")
    rep = analysis.data_pipeline(base["base"] / "real")
    assert len(rep.ops)
    if rep.bottleneck_op_id is None:
        # the real run's timing named no op (no queue rule fired: a busy machine); the colouring rule below is
        # about an op that is named, so name the source op as the analysis would
        rep = copy.copy(rep)
        rep.bottleneck_op_id, rep.bottleneck_op_type = int(rep.ops["op_id"].iloc[-1]), str(rep.ops["op_type"].iloc[-1])
    queues = analysis.queue_depths(base["base"] / "real")

    def node_colours(r):
        fig = pipe._graph_figure(r, queues, True)
        ops = [t for t in fig.data if t.name == "ops"][0]
        return list(ops.marker.color), list(ops.marker.line.color), fig.layout.title.text

    keeps_up = copy.copy(rep)
    keeps_up.verdict = "none"
    colours, outline, title = node_colours(keeps_up)
    assert pipe.NODE_COLORS["bottleneck"] not in colours and pipe.NODE_COLORS["flagged"] not in colours
    assert outline.count(pipe.NODE_COLORS["slowest"]) == 1 and "no op is a bottleneck" in title
    bound = copy.copy(rep)
    bound.verdict = "data_processing"
    colours, outline, title = node_colours(bound)
    assert colours.count(pipe.NODE_COLORS["bottleneck"]) == 1 and "red = bottleneck" in title
    assert pipe.NODE_COLORS["slowest"] not in outline
    # the page itself: the verdict shown and the map agree
    lay = pipe.layout(run_id="real")
    fig = find(lay, "pipe-graph").figure
    red = pipe.NODE_COLORS["bottleneck"] in list([t for t in fig.data if t.name == "ops"][0].marker.color)
    assert red == (rep.verdict == "data_processing"), (rep.verdict, text(find(lay, "pipeline-verdict")))


# -- compare ------------------------------------------------------------------------------------------------
def test_compare_equals_the_analysis(app, base):
    cmp_page = P("compare")
    b = base["base"]
    cmp = analysis.compare_runs(b / "synth", b / "synth2")
    lay = cmp_page.layout(a="synth", b="synth2")
    rows = find(lay, "compare-ops-table").rowData
    shown = {r["op"]: r["status"] for r in rows}
    for op, status in EXPECTED_STATUS.items():
        assert shown[op] == status, op
    assert shown == dict(zip(cmp.ops["op"], cmp.ops["status"]))
    by_op = {r["op"]: r for r in rows}
    assert by_op["conv2d_grad"]["diff_ms"] == pytest.approx(0.4) and by_op["conv2d"]["diff_ms"] == pytest.approx(-0.2)
    assert by_op["gelu"]["ms_per_step_a"] == 0 and by_op["gelu"]["ms_per_step_b"] == pytest.approx(0.15)
    s = cmp.steps.set_index("metric")
    assert text(find(lay, "compare-a-step")) == fmt_ms(s.loc["step_time_ms", "a"])
    assert text(find(lay, "compare-b-step")) == fmt_ms(s.loc["step_time_ms", "b"])
    bars = find(lay, "compare-steps").figure
    assert [t.type for t in bars.data] == ["bar", "bar"]
    assert bars.data[0].y[-1] == pytest.approx(s.loc["step_time_ms", "a"])
    assert bars.data[1].y[-1] == pytest.approx(s.loc["step_time_ms", "b"])
    diverging = find(lay, "compare-ops-chart").figure
    plotted = {(y, round(x, 6)) for t in diverging.data for x, y in zip(t.x, t.y)}
    changed = cmp.ops[cmp.ops["status"] != "same"]
    assert plotted == {(o, round(d, 6)) for o, d in zip(changed["op"], changed["diff_ms"])}
    assert "1 slower" in text(find(lay, "compare-status-counts"))


def test_compare_same_run_unknown_and_broken(app, client):
    cmp_page = P("compare")
    lay = cmp_page.layout(a="synth", b="synth")
    assert find(lay, "compare-same") is not None
    assert {r["status"] for r in find(lay, "compare-ops-table").rowData} == {"same"}
    assert all(r["diff_ms"] == 0 for r in find(lay, "compare-ops-table").rowData)

    lay = cmp_page.layout(a="synth", b="nope")
    assert "no run named 'nope'" in text(find(lay, "compare-unknown"))
    assert find(lay, "compare-b").value is None and find(lay, "compare-a").value == "synth"

    lay = cmp_page.layout(a="broken", b="synth")
    assert "tasks.parquet" in text(find(lay, "error-message"))

    lay = cmp_page.layout()  # /compare alone: two runs are picked
    assert find(lay, "compare-a").value and find(lay, "compare-b").value
    html_ = route(client, "/compare", "?a=synth&b=synth2")
    assert "compare-ops-table" in html_ and "conv2d_grad" in html_


# -- errors, unknown runs, the base dir is the boundary -----------------------------------------------------
@pytest.mark.parametrize("page", ["operators", "memory"])
def test_corrupt_run_is_an_error_panel_and_others_still_render(app, client, page):
    lay = P(page).layout(run_id="broken")
    msg = text(find(lay, "error-message"))
    assert "tasks.parquet" in msg and "broken" in msg
    assert find(lay, "current-run").children == "broken"  # the run navigation still renders
    good = P(page).layout(run_id="synth")
    assert find(good, "error-panel") is None
    # the same over HTTP, as a browser gets it
    assert "tasks.parquet" in route(client, f"/run/broken/{page}")
    assert "error-panel" not in route(client, f"/run/synth/{page}")


@pytest.mark.parametrize("page", ["operators", "memory"])
def test_unknown_run_is_not_found(app, client, page):
    assert find(P(page).layout(run_id="nope"), "not-found") is not None
    assert find(P(page).layout(), "not-found") is not None
    assert "Not found" in route(client, f"/run/nope/{page}")


HOSTILE = ["../../etc", "/etc", "%2e%2e", "..", ".", "../outside/secret", "..%2foutside%2fsecret", "synth/../synth2"]


@pytest.mark.parametrize("run_id", HOSTILE)
def test_run_ids_cannot_leave_the_base_dir(app, base, client, run_id):
    for page in ("operators", "memory"):
        assert find(P(page).layout(run_id=run_id), "not-found") is not None
    assert find(P("operators").layout(run_id=str(base["secret"])), "not-found") is not None
    # callbacks take the run id from the page's store, which a client can forge
    assert P("operators").filter_ops("", "all", run_id) == []
    assert P("operators").filter_ops("", "all", str(base["secret"])) == []
    assert "no run named" in P("memory").inspect({"points": [{"x": 1.0}]}, run_id)[1]
    lay = P("compare").layout(a=run_id, b="synth")
    assert find(lay, "compare-unknown") is not None and find(lay, "compare-ops-table") is None


def test_the_grid_bundle_is_loaded_on_demand_and_assets_are_cached(client):
    """The index page carries dash-ag-grid's bundle URL for the on-demand loader instead of its <script> tag;
    that URL, its chunk's, plotly.js's (for assets/plotly_early.js), Dash's bundles and the assets (URLs with the
    file's mtime) are cacheable for a year."""
    import re

    page = client.get("/").get_data(as_text=True)
    assert not re.search(r'<script src="[^"]*dash_ag_grid[^"]*"', page)
    lazy = json.loads(re.search(r"window.__insightLazyScripts = (\{.*?\});", page).group(1))
    r = client.get(lazy["dash_ag_grid"])
    assert r.status_code == 200 and len(r.data) > 500_000 and b"window.dash_ag_grid" in r.data
    assert "max-age=31536000" in r.headers["Cache-Control"]
    for chunk in json.loads(re.search(r"window.__insightLazyChunks = (\{.*?\});", page).group(1))["dash_ag_grid"]:
        r = client.get(chunk)  # fingerprinted (Dash revalidates a plain URL, reading and hashing the whole file)
        assert r.status_code == 200 and len(r.data) > 100_000 and "max-age=31536000" in r.headers["Cache-Control"]
    plotly_url = json.loads(re.search(r"window.__insightPlotlyURL = (\"[^\"]+\");", page).group(1))
    r = client.get(plotly_url)  # plotly.js for assets/plotly_early.js, as cacheable
    assert r.status_code == 200 and b"Plotly" in r.data[:200_000] and len(r.data) > 1_000_000
    assert "max-age=31536000" in r.headers["Cache-Control"]
    # a page with figures has the browser fetch plotly.js with its own scripts; the runs page (none) does not
    preload = f'<link rel="preload" href="{plotly_url}" as="script">'
    assert preload in client.get("/run/synth/overview").get_data(as_text=True) and preload not in page
    assets = re.findall(r'<script src="(/assets/[^"]+\?m=[^"]+)"', page)
    assert all(any(f in a for a in assets) for f in ("lazy_grid.js", "plotly_early.js", "grid_count.js"))
    for a in assets:
        assert "max-age=31536000" in client.get(a).headers["Cache-Control"], a


def test_http_requests_cannot_reach_outside_runs(app, base, client):
    for path in ("/run/../outside/secret/operators", "/run/..%2foutside%2fsecret/operators",
                 "/run/%2e%2e/operators", f"/run/{base['secret']}/memory", "/run//etc/operators",
                 "/run/../../etc/memory"):
        body = route(client, path)
        assert SECRET_OP not in body and "passwd" not in body and "root:" not in body, path
    r = client.get("/run/..%2f..%2fetc%2fpasswd/operators")
    assert r.status_code in (200, 404) and b"root:" not in r.data
    body = route(client, "/compare", "?a=..%2Foutside%2Fsecret&b=synth")
    assert SECRET_OP not in body and "compare-unknown" in body
    # a forged callback request naming a run outside the base dir gets nothing
    for forged in ("../outside/secret", str(base["secret"])):
        r = client.post("/_dash-update-component", json={
            "output": "op-table.rowData",
            "outputs": {"id": "op-table", "property": "rowData"},
            "inputs": [{"id": "op-search", "property": "value", "value": ""},
                       {"id": "ops-kinds", "property": "value", "value": "all"}],
            "state": [{"id": "ops-run", "property": "data", "value": forged}],
            "changedPropIds": ["op-search.value"]})
        assert r.status_code == 200
        out = json.loads(r.data)["response"]
        assert out["op-table"]["rowData"] == [] and SECRET_OP not in r.get_data(as_text=True)
        r = client.post("/_dash-update-component", json={
            "output": "..mem-at-title.children...mem-at-summary.children...mem-at-box.children..",
            "outputs": [{"id": "mem-at-title", "property": "children"},
                        {"id": "mem-at-summary", "property": "children"},
                        {"id": "mem-at-box", "property": "children"}],
            "inputs": [{"id": "mem-cursor", "property": "data", "value": {"x_ms": 3.0}}],
            "state": [{"id": "mem-run", "property": "data", "value": forged}],
            "changedPropIds": ["mem-cursor.data"]})
        assert r.status_code == 200 and SECRET_OP not in r.get_data(as_text=True)
        [grid] = [c for c in json.loads(r.data)["response"]["mem-at-box"]["children"] if c["props"].get("id") == "mem-at-table"]
        assert grid["props"]["rowData"] == []


def test_pages_do_not_import_the_runtime():
    code = ("import sys; import dashboard.app, dashboard.pages.operators, dashboard.pages.memory, "
            "dashboard.pages.compare; bad = [m for m in sys.modules if m == 'runtime' or m.startswith('runtime.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr


# -- in a browser: the clicks and the URL round trip --------------------------------------------------------
@pytest.fixture(scope="module")
def served(app):
    import shutil
    import threading

    if not shutil.which("chromedriver"):
        pytest.fail("chromedriver is not installed: install chromium and chromium-driver (bash scripts/test.sh does)")
    from waitress import create_server
    srv = create_server(app.server, host="127.0.0.1", port=0, threads=4)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()


@pytest.fixture(scope="module")
def browser(served):
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield d
    d.quit()


def _wait(cond, timeout=10.0):
    import time
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            r = cond()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - the DOM is still being rendered
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting ({last!r})")


@pytest.mark.browser
def test_clicks_in_a_browser(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    d = browser
    # operators: clicking an op-type row charts that type per step
    d.get(served + "/run/synth/operators")
    cell = _wait(lambda: [c for c in d.find_elements(By.CSS_SELECTOR, "#op-type-table .ag-cell[col-id=op]")
                          if c.text == "conv2d_grad"][0])
    cell.click()
    _wait(lambda: "op type conv2d_grad" in d.find_element(By.CSS_SELECTOR, "#op-per-step .gtitle").text)
    # memory: clicking the curve lists the tensors alive at that time
    d.get(served + "/run/synth/memory")
    plot = _wait(lambda: d.find_element(By.CSS_SELECTOR, "#mem-timeline .nsewdrag"))
    ActionChains(d).move_to_element(plot).click().perform()
    _wait(lambda: d.find_element(By.ID, "mem-at-title").text.startswith("Tensors alive at ")
          and "clicked" not in d.find_element(By.ID, "mem-at-title").text)
    assert "tensors" in d.find_element(By.ID, "mem-at-summary").text
    # compare: picking run B rewrites the URL and the view
    d.get(served + "/compare?a=synth&b=synth2")
    _wait(lambda: d.find_element(By.ID, "compare-b-name").text == "synth2")
    d.find_element(By.ID, "compare-b").click()
    _wait(lambda: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.strip() == "synth"][0]).click()
    _wait(lambda: d.current_url.endswith("/compare?a=synth&b=synth"))
    _wait(lambda: d.find_element(By.ID, "compare-b-name").text == "synth")
    assert d.find_element(By.ID, "compare-same").is_displayed()
