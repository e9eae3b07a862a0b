"""Data pipeline: MindInsight's MindData page.

* the verdict (``analysis.data_pipeline``): which stage is the bottleneck, input-bound class, advice;
* tab "Data processing": the pipeline as a graph -- ops left to right from the source to the device queue,
  edges the connector queues coloured by their average usage (red: empty, the stage after it waits; green:
  full) -- the per-op table (workers, rows, busy and wait times, queue usage, flag and reason) and every
  queue's depth over time;
* tab "Step interval": host queue and device queue depth per step, empty / full counts per step.

A run without pipeline data (non-sink training without a MindData dataset, or ``data_process=False``)
gets a message saying why instead of empty charts.
"""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import dcc, html
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from dashboard.components import (data_grid, graph, num_col, page_rank, plain_table, rank_selector, run_page, stat_card,
                                  verdict_panel)
from dashboard.data import store
from insight import analysis

USAGE_SCALE = "RdYlGn"


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/pipeline", name="Data pipeline", layout=layout)


def layout(run_id=None, rank=None, **_):
    return run_page(run_id, "pipeline", lambda rid: _body(rid, page_rank(rid, rank)))


def _body(run_id: str, rank: int = 0):
    st = store()
    rep = st.get(run_id, "data_pipeline", analysis.data_pipeline, rank)
    manifest = st.manifest(run_id)
    has_ops = len(rep.ops) > 0
    has_dq = len(rep.device_queue) > 0
    if not has_ops and not has_dq:
        return html.Div([rank_selector(run_id, "pipeline", rank), html.H2("Data pipeline"), _no_data(manifest)])
    queues = st.get(run_id, "queue_depths", analysis.queue_depths, rank, tuple(rep.pipeline_ids) or None)
    per_step = st.get(run_id, "pipeline_per_step", lambda run, r: analysis.pipeline_per_step(run, r, report=rep),
                      rank)
    tabs = dcc.Tabs(id="pipe-tabs", value="processing", children=[
        dcc.Tab(label="Data processing", value="processing", children=_processing_tab(rep, queues, has_dq)),
        dcc.Tab(label="Step interval", value="steps", children=_steps_tab(rep, per_step, has_ops, has_dq)),
    ])
    return html.Div([rank_selector(run_id, "pipeline", rank), html.H2("Data pipeline"), _verdict(rep), tabs])


def _no_data(manifest: dict):
    opts = manifest.get("options") or {}
    if opts.get("data_process") is False:
        why = ("This run was profiled with data_process=False, so the MindData pipeline and the device queue were "
               "not recorded. Profile with insight.Profiler(data_process=True) to see them.")
    else:
        why = ("This run recorded no data-pipeline data: it did not read a MindData dataset (runtime.dataset) and "
               "did not train in dataset sink mode, so there are no pipeline ops, connector queues or device queue "
               "to show.")
    return html.Div([html.H4("No data-pipeline data"), html.P(why, id="pipeline-no-data")], className="panel")


def _verdict(rep):
    share = rep.input_share
    cards = html.Div([
        stat_card("Verdict", rep.verdict_text, "stat-pipe-verdict"),
        stat_card("Input-bound", rep.input_bound, "stat-pipe-input",
                  f"{share * 100:.1f} % of the step waits for input" if share == share else ""),
        stat_card("Host queue empty", "—" if rep.host_queue_empty_ratio is None else
                  f"{rep.host_queue_empty_ratio * 100:.1f} %", "stat-pipe-host-empty",
                  f"of {rep.host_queue_samples} samples (> 30 %: data processing is slow)"),
        stat_card("Device queue empty", f"{rep.device_queue_empty_pops} / {rep.device_queue_pops}"
                  if len(rep.device_queue) else "—", "stat-pipe-dq-empty",
                  (f"GetNext calls that waited (after the first step): {rep.empty_pops_host_empty} with the host "
                   f"queue empty too, {rep.empty_pops_host_ready} with batches on the host; under "
                   f"{analysis.pipeline.NOISE_FLOOR:.0%} of the steps is noise")
                  if len(rep.device_queue) else "no device queue: not trained in sink mode"),
        stat_card("Bottleneck op" if rep.verdict == "data_processing" else "Slowest stage",
                  rep.bottleneck_label or ("the consumer (training step)" if rep.consumer_bottleneck else "—"),
                  "stat-pipe-bottleneck"),
    ], className="cards")
    return html.Div([cards, verdict_panel(rep, title="")])


# -- data processing -------------------------------------------------------------------------------------
def _processing_tab(rep, queues: pd.DataFrame, sink: bool):
    if rep.ops.empty:
        return html.P("No pipeline ops were recorded (the device queue was: see the Step interval tab).",
                      className="panel", id="pipeline-no-ops")
    ids = ", ".join(map(str, rep.pipeline_ids))
    return html.Div([
        graph("pipe-graph", _graph_figure(rep, queues, sink)),
        html.P(f"Pipelines analysed: {ids} (the ones with the structure that was sampled most). Queue usage = mean "
               "sampled depth / capacity of an op's output queue; an op whose input queue is fuller than its output "
               "queue by more than 0.1 is flagged, so is a source with usage under 0.6.", className="muted"),
        html.H4("Ops"), _ops_table(rep.ops),
        html.H4("Queue depth over time"), graph("pipe-queues", _queue_figure(queues)),
    ])


def _layout_positions(ops: pd.DataFrame) -> dict:
    """op_id -> (x, y): the root rightmost, each child one column left; leaves stacked, parents centred."""
    kids = {int(r.op_id): [int(k) for k in r.children] for r in ops.itertuples()}
    roots = [int(r.op_id) for r in ops.itertuples() if r.parent_id == -1 or r.parent_id not in kids]
    depth, pos = {}, {}
    leaf = [0]

    def walk(o, d, seen):
        if o in seen:
            return
        seen.add(o)
        depth[o] = d
        ch = [k for k in kids.get(o, []) if k in kids]
        for k in ch:
            walk(k, d + 1, seen)
        ys = [pos[k] for k in ch if k in pos]
        pos[o] = float(np.mean(ys)) if ys else float(leaf[0])
        if not ys:
            leaf[0] += 1

    seen: set = set()
    for r in roots:
        walk(r, 0, seen)
    for o in kids:  # anything not reachable from a root (a cycle, a dangling parent)
        walk(o, 0, seen)
    dmax = max(depth.values(), default=0)
    return {o: (dmax - depth[o], pos[o]) for o in kids}


NODE_COLORS = {"bottleneck": "#e63946", "flagged": "#f4a261", "op": "#1d3557", "consumer": "#6c757d",
               "slowest": "#e9c46a"}


def _usage_color(u) -> str:
    if u is None or not np.isfinite(u):
        return "#adb5bd"
    return sample_colorscale(USAGE_SCALE, [float(np.clip(u, 0, 1))])[0]


def _graph_figure(rep, queues: pd.DataFrame, sink: bool) -> go.Figure:
    ops = rep.ops
    xy = _layout_positions(ops)
    byid = {int(r.op_id): r for r in ops.itertuples()}
    xmax = max((x for x, _ in xy.values()), default=0)
    roots = [o for o, r in byid.items() if r.parent_id == -1]
    ymid = float(np.mean([xy[o][1] for o in roots])) if roots else 0.0
    consumer = "device queue" if sink else "training step"
    cx = xmax + 1
    dq_usage = None
    if sink and len(rep.device_queue):
        dqd = rep.device_queue
        cap = dqd["capacity"].where(dqd["capacity"] > 0)
        dq_usage = float((dqd["mean_depth"] / cap).mean()) if cap.notna().any() else None
    fig = go.Figure()
    edges = []  # (x0, y0, x1, y1, usage, label)
    for o, r in byid.items():
        x0, y0 = xy[o]
        if r.parent_id in byid:
            x1, y1 = xy[int(r.parent_id)]
            to = f"{byid[int(r.parent_id)].op_type} #{int(r.parent_id)}"
        else:
            x1, y1 = cx, ymid
            to = consumer + (" (host queue)" if sink else " (host queue: what the training loop reads)")
        edges.append((x0, y0, x1, y1, r.queue_usage,
                      f"queue {r.op_type} #{o} → {to}<br>usage {_pct(r.queue_usage)} · capacity "
                      f"{int(r.queue_capacity) if r.queue_capacity > 0 else '?'} · {int(r.queue_samples)} samples"))
    if sink:
        edges.append((cx, ymid, cx + 1, ymid, dq_usage, f"device queue → GetNext (training step)<br>"
                                                        f"mean fill {_pct(dq_usage)} per step"))
    for x0, y0, x1, y1, u, label in edges:
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line=dict(color=_usage_color(u), width=7),
                                 hoverinfo="skip", showlegend=False))
    # a marker at each queue's midpoint: hover and the usage figure
    fig.add_trace(go.Scatter(
        x=[(a + c) / 2 for a, _, c, _, _, _ in edges], y=[(b + d) / 2 for _, b, _, d, _, _ in edges],
        mode="markers+text", text=[_pct(u) for *_, u, _ in edges], textposition="top center",
        marker=dict(size=16, symbol="square", color=[u if u is not None and np.isfinite(u) else np.nan
                                                      for *_, u, _ in edges],
                    colorscale=USAGE_SCALE, cmin=0, cmax=1, line=dict(color="#333", width=1),
                    colorbar=dict(title="queue usage", tickformat=".0%", len=0.8)),
        hovertext=[lab for *_, lab in edges], hoverinfo="text", showlegend=False, name="queues"))
    # the ops
    # colours follow the verdict: red (the bottleneck) and orange (flagged) only when data processing IS the
    # bottleneck; while the pipeline keeps up, its slowest stage is only outlined
    processing = rep.verdict == "data_processing"
    names, xs, ys, colors, hover, outline = [], [], [], [], [], []
    for o, r in byid.items():
        x, y = xy[o]
        xs.append(x)
        ys.append(y)
        slowest = rep.bottleneck_op_id == o
        names.append(f"<b>{r.op_type}</b> #{o}<br>{int(r.num_workers)} worker{'s' if r.num_workers != 1 else ''}")
        colors.append(NODE_COLORS["bottleneck"] if processing and slowest else
                      NODE_COLORS["flagged"] if processing and r.flagged else NODE_COLORS["op"])
        outline.append(NODE_COLORS["slowest"] if slowest and not processing else "white")
        hover.append(f"<b>{r.op_type} op #{o}</b><br>workers {int(r.num_workers)} · rows {int(r.rows):,}<br>"
                     f"busy {r.busy_ms:.3f} ms · wait in {r.wait_in_ms:.3f} ms · wait out {r.wait_out_ms:.3f} ms"
                     + (f"<br><b>flagged</b>: {r.reason}" if r.flagged else "")
                     + (("<br><b>bottleneck</b>" if processing else
                         "<br><b>slowest stage</b> (not a bottleneck: the pipeline keeps up)") if slowest else ""))
    xs.append(cx)
    ys.append(ymid)
    names.append(f"<b>{consumer}</b>")
    colors.append(NODE_COLORS["consumer"])
    outline.append("white")
    hover.append(f"the consumer: {consumer}")
    if sink:
        xs.append(cx + 1)
        ys.append(ymid)
        names.append("<b>training step</b><br>(GetNext)")
        colors.append(NODE_COLORS["consumer"])
        outline.append("white")
        hover.append("the training step pops one batch per step (GetNext)")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=names, textposition="bottom center",
                             marker=dict(size=34, symbol="circle", color=colors, line=dict(color=outline, width=4)),
                             hovertext=hover, hoverinfo="text", showlegend=False, name="ops"))
    n_rows = max((y for _, y in xy.values()), default=0) + 1
    fig.update_layout(height=max(260, 120 + 110 * n_rows), margin=dict(l=30, r=30, t=40, b=30),
                      title="Pipeline: source → … → consumer (ops: red = bottleneck, orange = flagged)" if processing
                      else "Pipeline: source → … → consumer (no op is a bottleneck; outlined: the slowest stage)",
                      xaxis=dict(visible=False, range=[-0.6, (cx + (1 if sink else 0)) + 0.6]),
                      yaxis=dict(visible=False, range=[n_rows - 0.3, -0.7]), plot_bgcolor="white")
    return fig


def _pct(u) -> str:
    return "—" if u is None or not np.isfinite(u) else f"{u * 100:.0f}%"


def _ops_table(ops: pd.DataFrame):
    t = ops.copy()
    t["queue_usage_pct"] = (t["queue_usage"] * 100).round(1)
    t["child_usage_pct"] = (t["child_usage"].astype(float) * 100).round(1)
    t["children"] = t["children"].apply(lambda v: ", ".join(map(str, v)))
    t["flag"] = np.where(t["flagged"], "⚑ " + t["reason"], "")
    for c in ("busy_ms", "wait_in_ms", "wait_out_ms"):
        t[c] = t[c].astype(float).round(3)
    cols = [("op_id", "Op", "numeric"), ("op_type", "Type", "text"), ("parent_id", "Parent", "numeric"),
            ("children", "Children", "text"), ("num_workers", "Workers", "numeric"), ("rows", "Rows", "numeric"),
            ("batches", "Batches", "numeric"), ("busy_ms", "Busy (ms)", "numeric"),
            ("wait_in_ms", "Wait in (ms)", "numeric"), ("wait_out_ms", "Wait out (ms)", "numeric"),
            ("queue_usage_pct", "Output queue usage (%)", "numeric"),
            ("child_usage_pct", "Input queue usage (%)", "numeric"), ("queue_capacity", "Capacity", "numeric"),
            ("queue_samples", "Samples", "numeric"), ("flag", "Flag / reason", "text")]
    records = t[[c for c, _, _ in cols]].replace({np.nan: None}).to_dict("records")
    for i, r in enumerate(records):
        r["id"] = str(i)
    fmt = {"busy_ms": "ms", "wait_in_ms": "ms", "wait_out_ms": "ms", "queue_usage_pct": "num1",
           "child_usage_pct": "num1"}
    # a handful of rows, all on screen: a plain table (no grid to load), flagged ops shaded
    columns = [(c, n, fmt.get(c, "count") if ty == "numeric" else None) for c, n, ty in cols]
    return plain_table("pipe-ops-table", columns, records, csv="pipeline-ops",
                       row_class=lambda r: "flagged" if r.get("flag") else None)


def _queue_figure(q: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if len(q):
        for name in q["queue"].unique():  # one line per queue
            g = q[q["queue"] == name]
            fig.add_trace(go.Scatter(x=g["t_ms"].to_numpy(float), y=g["depth"].to_numpy(float), mode="lines",
                                     line=dict(shape="hv", width=1.5), name=str(name),
                                     hovertemplate=f"{name}<br>%{{x:,.3f}} ms · depth %{{y}}<extra></extra>"))
    else:
        fig.add_annotation(text="no queue samples", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(height=340, margin=dict(l=50, r=20, t=20, b=40), xaxis_title="time since the run started (ms)",
                      yaxis_title="depth (batches)", legend=dict(orientation="h", y=-0.25), template="plotly_white")
    return fig


# -- step interval ------------------------------------------------------------------------------------
def _steps_tab(rep, per: pd.DataFrame, has_ops: bool, has_dq: bool):
    if per.empty:
        return html.P("No steps were recorded, so the queues cannot be shown per step.", className="panel",
                      id="pipeline-no-steps")
    notes = []
    if not has_dq:
        notes.append("This run did not train in dataset sink mode: there is no device queue, only the host queue.")
    if not has_ops:
        notes.append("No MindData pipeline was recorded: only the device queue is shown.")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("Queue depth per step (mean)", "Empty / full per step"))
    x = per["step"].to_numpy()
    if has_ops:
        fig.add_trace(go.Scatter(x=x, y=per["host_depth"], name="host queue depth", mode="lines+markers",
                                 line_color="#2a9d8f"), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=per["host_empty"], name="host queue empty (samples)", marker_color="#e9c46a"),
                      row=2, col=1)
    if has_dq:
        fig.add_trace(go.Scatter(x=x, y=per["device_depth"], name="device queue depth", mode="lines+markers",
                                 line_color="#3a86ff"), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=per["device_empty"], name="device queue empty (GetNext waited)",
                             marker_color="#e63946"), row=2, col=1)
        fig.add_trace(go.Bar(x=x, y=per["device_full"], name="device queue full (after a push)",
                             marker_color="#8338ec"), row=2, col=1)
    fig.update_layout(height=520, margin=dict(l=50, r=20, t=40, b=40), barmode="group", template="plotly_white",
                      legend=dict(orientation="h", y=-0.12))
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_yaxes(title_text="batches", row=1, col=1)
    fig.update_yaxes(title_text="count", row=2, col=1)
    t = per.copy()
    for c in ("host_depth", "device_depth", "get_wait_ms"):
        t[c] = t[c].astype(float).round(3)
    cols = [("step", "Step"), ("host_depth", "Host queue depth"), ("host_samples", "Host samples"),
            ("host_empty", "Host empty"), ("device_depth", "Device queue depth"), ("device_pushes", "Pushes"),
            ("device_pops", "Pops"), ("device_empty", "Device empty"), ("device_full", "Device full"),
            ("get_wait_ms", "GetNext wait (ms)")]
    records = t[[c for c, _ in cols]].replace({np.nan: None}).to_dict("records")
    for r in records:
        r["id"] = str(r["step"])
    hot = {"device_empty": "#ffe3e3", "host_empty": "#fff3bf"}
    columns = [num_col(c, n, "ms" if c.endswith("_ms") or c.endswith("_depth") else "count",
                       **({"cellStyle": {"styleConditions": [{"condition": "params.value > 0",
                                                              "style": {"backgroundColor": hot[c]}}]}}
                          if c in hot else {})) for c, n in cols]
    table = data_grid("pipe-steps-table", columns, records, page_size=20, csv="pipeline-steps")
    totals = html.Div([
        stat_card("Host queue empty samples", f"{int(per['host_empty'].sum())} / {int(per['host_samples'].sum())}",
                  "stat-pipe-host-empty-steps"),
        stat_card("Device queue empty", f"{int(per['device_empty'].sum())}", "stat-pipe-dq-empty-steps",
                  "GetNext found it empty (all steps)"),
        stat_card("Device queue full", f"{int(per['device_full'].sum())}", "stat-pipe-dq-full-steps",
                  "a push filled it: the host is ahead"),
        stat_card("GetNext wait", f"{per['get_wait_ms'].fillna(0).sum():.3f} ms", "stat-pipe-get-wait"),
    ], className="cards")
    return html.Div([*(html.P(n, className="muted") for n in notes), totals, graph("pipe-steps", fig),
                     html.H4("Per step"), table])
