"""Memory: device memory in use over time (MindInsight's memory page, XProf's memory profile).

* stat cards: peak (and when), capacity, peak share of capacity, fragmentation at the peak (when the
  offsets are known), allocation and free counts;
* memory in use stacked by kind (``memory_usage``: parameters, activation reserve, workspace, data-queue
  batches, kernel buffer pool -- the MemoryPool's real blocks), the in-use curve (``memory_timeline``,
  downsampled keeping every bucket's extremes), alloc / free markers, step boundaries as vertical lines, the
  peak marked with its time, and the capacity line (the y axis fits the data or spans the whole capacity);
  the static plan's activation liveness is drawn beside the pool's blocks and labelled *planned*; a run with
  only planned rows (recorded before the pool reported its blocks) is labelled planned throughout;
* the entry view: the peak in use of every step (``memory.step_peaks``) as bars; clicking a bar drills the
  timeline into that step ("whole run" zooms back out); the zoom is kept when the y axis changes;
* the tensors alive at the peak (``memory_peak(...).live``);
* click-to-inspect: a click on the timeline lists the blocks alive at the memory event at or before the
  cursor (the step-shaped curve's value there; ``memory.event_at_or_before``, ``live_at``). The cursor's time
  comes from ``assets/memory_click.js`` (Plotly's click only names the nearest point, which may be after it).

Everything shown comes from ``insight.analysis``; this module only lays it out.
"""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, Patch, State, ctx, dcc, html

from dashboard.components import (data_grid, graph, grid_records, grid_tools, num_col, page_rank, rank_selector,
                                  register_grid, run_page, stat_card, store_where, text_col)
from dashboard.data import RunNotFound, store
from insight import analysis
from insight.trace import TraceError

MB = 2 ** 20
NS_PER_MS = 1e6
MAX_MARKERS = 4000  # alloc/free markers drawn; above this, markers are left to the curve's hover

LIVE_COLUMNS = [
    text_col("name", "Tensor", minWidth=160), text_col("op", "Op"), num_col("size_mb", "Size (MB)", ",.4f"),
    num_col("size", "Bytes", "bytes"), text_col("shape", "Shape"), text_col("dtype", "Dtype", minWidth=80),
    text_col("scope", "Scope"), text_col("kind", "Kind"), num_col("allocated_ms", "Allocated (ms)"),
    num_col("freed_ms", "Freed (ms)", missing="never"), num_col("step", "Step", "count"),
]


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/memory", name="Memory", layout=layout)


def layout(run_id=None, rank=None, **_):
    return run_page(run_id, "memory", lambda rid: _body(rid, page_rank(rid, rank)))


# -- data ---------------------------------------------------------------------------------------------------
KIND_LABELS = {"parameter": "parameters", "activation": "activations", "activation_reserve": "activation reserve",
               "workspace": "workspace", "queue": "data-queue batches", "kernel_pool": "kernel buffer pool",
               "untracked": "untracked (alignment, blocks from before recording)", "other": "other"}
KIND_COLORS = {"parameter": "#457b9d", "activation": "#f4a261", "activation_reserve": "#a8dadc",
               "workspace": "#e9c46a", "queue": "#2a9d8f", "kernel_pool": "#8338ec", "untracked": "#ced4da",
               "other": "#adb5bd"}


def live_rows(df: pd.DataFrame) -> list[dict]:
    out = pd.DataFrame({
        "name": df["name"], "op": df["op"], "size_mb": df["size"] / MB, "size": df["size"], "shape": df["shape"],
        "dtype": df["dtype"], "scope": df["scope"], "kind": df.get("kind", ""),
        "allocated_ms": (df["alloc_ns"] if "alloc_ns" in df else df["allocated_ns"]) / NS_PER_MS,
        "freed_ms": (df["free_ns"].where(df["free_ns"] >= 0) / NS_PER_MS) if "free_ns" in df else np.nan,
        "step": df["step"]})
    return grid_records(out)


def _intervals(run_id: str, rank: int = 0) -> analysis.Lifetimes:
    return store().get(run_id, "memory_intervals", analysis.memory_intervals, "device", rank)


# -- formatting ---------------------------------------------------------------------------------------------
def fmt_mb(n) -> str:
    return f"{n / MB:.3f} MB" if n is not None else "—"


def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and n != n):
        return "—"
    n = float(n)
    for unit, size in (("GB", 2 ** 30), ("MB", MB), ("KB", 2 ** 10)):
        if abs(n) >= 0.995 * size:  # 1019 KB reads 1.00 MB
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# -- figure -------------------------------------------------------------------------------------------------
def timeline_figure(tl: pd.DataFrame, peak, bd: pd.DataFrame, scale: str = "fit", usage: pd.DataFrame | None = None,
                    planned: pd.DataFrame | None = None) -> go.Figure:
    """``tl``: ``memory_timeline`` of ``peak.source``; ``usage``: ``memory_usage`` of the same source (stacked by
    kind); ``planned``: the planned rows' timeline when ``tl`` is the pool's (drawn as the plan's liveness)."""
    fig = go.Figure()
    is_plan = peak.source == "planned"
    if tl.empty:
        fig.add_annotation(text="No device memory events in this run (profile_memory off?)", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=240)
        return fig
    ymax = float(tl["in_use_mb"].max())
    if planned is not None and len(planned):
        ymax = max(ymax, float(planned["in_use_mb"].max()))
    cap_mb = peak.capacity / MB if peak.capacity else 0.0
    top = max(ymax, cap_mb) if scale == "capacity" and cap_mb else ymax
    top = top * 1.08 or 1.0
    # step boundaries: one trace of vertical segments (toggle from the legend)
    if len(bd):
        xs, ys = [], []
        for t in pd.concat([bd["start_ns"].iloc[:1], bd["end_ns"]]).to_numpy() / NS_PER_MS:
            xs += [t, t, None]
            ys += [0, top, None]
        fig.add_scatter(x=xs, y=ys, mode="lines", name="step boundary", line=dict(color="#bbb", width=1, dash="dot"),
                        hoverinfo="skip")
        mids = ((bd["start_ns"] + bd["end_ns"]) / 2 / NS_PER_MS).to_numpy()
        fig.add_scatter(x=mids, y=[top * 0.985] * len(bd), mode="text", text=[f"{s}" for s in bd["step"]],
                        textfont=dict(size=9, color="#999"), name="step number", hoverinfo="skip",
                        showlegend=False, visible=True if len(bd) <= 40 else "legendonly")
    # in use, stacked by kind: what the bytes were (the untracked rest makes the stack reach the curve)
    if usage is not None and len(usage):
        kinds = [c for c in usage.columns if c not in ("t_ns", "t_ms", "in_use")]
        for k in kinds:
            if not (usage[k] > 0).any():
                continue
            label = ("planned " if is_plan else "") + KIND_LABELS.get(k, k)
            fig.add_scatter(x=usage["t_ms"], y=usage[k] / MB, mode="lines", line_shape="hv", stackgroup="kinds",
                            name=label, line=dict(width=0.5, color=KIND_COLORS.get(k, "#adb5bd")),
                            hovertemplate=f"{label}: %{{y:.4f}} MB<extra></extra>")
    curve = "planned in use" if is_plan else "in use"
    custom = np.stack([tl["t_ns"].to_numpy(), tl["step"].to_numpy()], axis=-1)
    fig.add_scatter(x=tl["t_ms"], y=tl["in_use_mb"], mode="lines", line_shape="hv", name=curve,
                    line=dict(color="#3a86ff", width=1.5), customdata=custom,
                    hovertemplate=f"%{{x:.3f}} ms<br>%{{y:.4f}} MB {curve}<br>step %{{customdata[1]}}<extra></extra>")
    if planned is not None and len(planned):
        fig.add_scatter(x=planned["t_ms"], y=planned["in_use_mb"], mode="lines", line_shape="hv",
                        name="planned liveness (parameters + live activations, inside the reserve)",
                        line=dict(color="#e76f51", width=1.2, dash="dot"),
                        hovertemplate="%{x:.3f} ms<br>%{y:.4f} MB planned (static plan at measured times)"
                                      "<extra></extra>")
    if len(tl) <= MAX_MARKERS:
        for action, symbol, color in (("alloc", "triangle-up", "#2a9d8f"), ("free", "triangle-down", "#e76f51")):
            sel = tl[tl["action"] == action]
            fig.add_scatter(x=sel["t_ms"], y=sel["in_use_mb"], mode="markers", name=action,
                            marker=dict(symbol=symbol, size=5, color=color), visible="legendonly" if len(sel) > 600
                            else True,
                            customdata=np.stack([sel["t_ns"].to_numpy(), sel["step"].to_numpy()], axis=-1),
                            hovertemplate=f"{action} at %{{x:.3f}} ms<br>%{{y:.4f}} MB in use<extra></extra>")
    if peak.t_ns is not None:
        px, py = peak.t_ns / NS_PER_MS, peak.peak_bytes / MB
        fig.add_scatter(x=[px], y=[py], mode="markers", name="peak", customdata=[[peak.t_ns, peak.step]],
                        marker=dict(symbol="star", size=14, color="#d00000", line=dict(color="#fff", width=1)),
                        hovertemplate="peak %{y:.2f} MB at %{x:.3f} ms<extra></extra>")
        fig.add_annotation(x=px, y=py, text=f"peak {peak.peak_bytes / MB:.2f} MB at {px:.3f} ms (step {peak.step})",
                           showarrow=True, arrowhead=2, ax=40, ay=-30, bgcolor="rgba(255,255,255,0.85)")
    title = ("Planned device memory: the static plan's liveness at measured task times" if is_plan
             else "Device memory in use (MemoryPool blocks, stacked by kind)")
    if cap_mb:
        if cap_mb <= top:
            fig.add_hline(y=cap_mb, line_color="#d00000", line_dash="dash",
                          annotation_text=f"capacity {fmt_bytes(peak.capacity)}", annotation_position="top left")
        else:
            title += f" — capacity {fmt_bytes(peak.capacity)} is off the scale (show it with 'whole capacity')"
    fig.update_layout(title=title, xaxis_title="time since run start (ms)", yaxis_title="MB",
                      yaxis=dict(range=[0, top]), height=420, hovermode="x", hoverdistance=-1, clickmode="event",
                      uirevision="memory",  # a zoom survives the y-axis control and a step drill
                      legend=dict(orientation="h", y=-0.18), margin=dict(l=60, r=20, t=50, b=40))
    return fig


def steps_figure(peaks: pd.DataFrame, peak) -> go.Figure:
    """The entry view: each step's peak in use (MB, the card's rounding); a click drills into the step."""
    fig = go.Figure()
    title = "Peak memory in use per step (MB) — click a step to see its timeline below"
    subtitle = ""
    if len(peaks):
        # red: the step of the run's peak (the card's); light red: other steps that reach the same bytes
        ties = (peaks["peak_bytes"] == peaks["peak_bytes"].max()).to_numpy()
        own = ties & (peaks["step"] == peak.step).to_numpy()   # no step on the card (None): none match
        if not own.any():
            own = ties & (np.cumsum(ties) == 1)
        fig.add_bar(x=peaks["step"], y=peaks["peak_mb"],
                    marker_color=np.where(own, "#d00000", np.where(ties, "#f4a0a0", "#3a86ff")),
                    customdata=np.stack([peaks["start_ns"] / NS_PER_MS, peaks["end_ns"] / NS_PER_MS], axis=-1),
                    hovertemplate="step %{x}: peak %{y:.2f} MB<br>%{customdata[0]:.3f}–%{customdata[1]:.3f} ms"
                                  "<extra>click: this step's timeline</extra>", name="peak per step")
        more = int(ties.sum()) - 1
        if more:
            subtitle = (f"red: the run's peak (step {peaks['step'].to_numpy()[own][0]}); light red: "
                        f"{more} more step{'s' if more > 1 else ''} reaching the same bytes")
    fig.update_layout(title=f"{title}<br><sup>{subtitle}</sup>" if subtitle else title,
                      xaxis_title="step", yaxis_title="MB", height=260,
                      margin=dict(l=60, r=20, t=66 if subtitle else 50, b=40),
                      bargap=0.1 if len(peaks) < 100 else 0, clickmode="event")
    return fig


# -- the page -----------------------------------------------------------------------------------------------
def _source_note(peak, planned) -> str:
    if peak.source == "planned":
        return ("Planned liveness: the static memory plan's activations replayed at the measured task times "
                "(this run has no MemoryPool events), not measured usage.")
    return ("Measured: the MemoryPool's blocks (parameters, the step's activation reserve, workspace, data-queue "
            "batches, the kernel buffer pool)." + (" The dotted line is the plan's activation liveness inside the "
                                                   "reserve (planned, not measured)." if planned is not None else ""))


def _planned_timeline(run, rank=0):
    return analysis.memory_timeline(run, rank=rank, source="planned")


def _step_peaks(run_id: str, rank: int = 0) -> pd.DataFrame:
    return analysis.memory.step_peaks(_intervals(run_id, rank), store().get(run_id, "step_breakdown",
                                                                               analysis.step_breakdown, rank))


def _data(run_id: str, rank: int = 0):
    """(peak, timeline, breakdown, usage by kind, planned timeline or None) of the run's main memory source."""
    st = store()
    peak = st.get(run_id, "memory_peak", analysis.memory_peak, "device", rank)
    tl = st.get(run_id, "memory_timeline", analysis.memory_timeline, analysis.memory.DISPLAY_POINTS, "device", rank)
    bd = st.get(run_id, "step_breakdown", analysis.step_breakdown, rank)
    usage = st.get(run_id, "memory_usage", analysis.memory_usage, None, "device", rank)
    sources = st.get(run_id, "memory_sources", analysis.memory_sources, "device", rank)
    planned = (st.get(run_id, "memory_timeline:planned", _planned_timeline, rank)
               if peak.source != "planned" and "planned" in sources else None)
    return peak, tl, bd, usage, planned


def _body(run_id: str, rank: int = 0):
    peak, tl, bd, usage, planned = _data(run_id, rank)
    iv = _intervals(run_id, rank)
    if tl.empty and not len(iv.intervals):
        return html.Div([html.H2("Memory"), html.P(
            "This run has no device memory events: profile it with Profiler(profile_memory=True).",
            className="muted", id="mem-empty")])
    frag = "—" if peak.fragmentation is None else f"{peak.fragmentation * 100:.2f} %"
    share = f"{peak.share_of_capacity * 100:.2f} %" if peak.share_of_capacity == peak.share_of_capacity else "—"
    peak_ms = peak.t_ns / NS_PER_MS if peak.t_ns is not None else None
    cards = html.Div([
        stat_card("Peak", f"{peak.peak_bytes / MB:.2f} MB", "mem-peak",
                  f"at {peak_ms:.3f} ms, step {peak.step}" if peak_ms is not None else ""),
        stat_card("Capacity", fmt_bytes(peak.capacity) if peak.capacity else "—", "mem-capacity"),
        stat_card("Peak share of capacity", share, "mem-share"),
        stat_card("Fragmentation at peak", frag, "mem-frag",
                  "1 − largest free block / free memory" if peak.fragmentation is not None
                  else "unknown: some bytes in use have no recorded block"),
        stat_card("Allocations", f"{peak.allocations:,}", "mem-allocs"),
        stat_card("Frees", f"{peak.frees:,}", "mem-frees"),
    ], className="cards")
    untracked = max(0, peak.peak_bytes - peak.live_bytes)
    # the axis spans the capacity when that still leaves the curve readable
    scale = "capacity" if 0 < peak.capacity <= 4 * peak.peak_bytes else "fit"
    peak_note = (f"{len(peak.live)} tensors, {fmt_mb(peak.live_bytes)} recorded"
                 + (f"; the other {fmt_mb(untracked)} in use are blocks without events (parameters reserved "
                    f"before profiling, the step's plan)" if untracked > 0 else ""))
    return html.Div([
        dcc.Store(id="mem-run", data=run_id if not rank else {"run": run_id, "rank": rank}),
        rank_selector(run_id, "memory", rank),
        html.H2("Memory"),
        cards,
        html.Div([html.Span("Y axis", className="muted"),
                  dcc.RadioItems(id="mem-scale", options=[{"label": " fit the data", "value": "fit"},
                                                          {"label": " whole capacity", "value": "capacity"}],
                                 value=scale, inline=True, inputStyle={"marginLeft": 10})],
                 style={"display": "flex", "gap": 6, "alignItems": "center"}),
        dcc.Store(id="mem-cursor"),
        graph("mem-steps", steps_figure(_step_peaks(run_id, rank), peak)),
        html.Div([html.Button("Whole run", id="mem-whole", n_clicks=0, className="grid-csv"),
                  html.Span("", id="mem-drill", className="muted")], className="toolbar"),
        graph("mem-timeline", timeline_figure(tl, peak, bd, scale, usage, planned)),
        html.P(_source_note(peak, planned), className="muted", id="mem-source"),
        html.P("Click the timeline to list the tensors alive at the memory event at or before the cursor. "
               "Alloc/free markers and step boundaries can be toggled from the legend.", className="muted"),
        html.Div([html.H3("Tensors alive at the clicked time", id="mem-at-title"),
                  html.P("Nothing selected yet.", id="mem-at-summary", className="muted"),
                  html.Div(id="mem-at-box")],  # the table is built on the first click (at_table)
                 className="panel", style={"marginTop": 8}),
        html.Div([html.H3(f"Tensors alive at the peak ({peak_ms:.3f} ms, step {peak.step})" if peak_ms is not None
                          else "Tensors alive at the peak", id="mem-peak-title"),
                  html.P(peak_note, className="muted", id="mem-peak-summary"),
                  html.Div(grid_tools("mem-peak-table", live_rows(peak.live)), className="toolbar"),
                  data_grid("mem-peak-table", [c for c in LIVE_COLUMNS if c["field"] != "freed_ms"],
                            live_rows(peak.live), page_size=15, csv="tensors-at-peak")],
                 className="panel", style={"marginTop": 12}),
    ])


# -- callbacks ----------------------------------------------------------------------------------------------
def rescale(scale, where):
    try:
        peak, tl, bd, usage, planned = _data(*store_where(where))
        return timeline_figure(tl, peak, bd, scale if scale in ("fit", "capacity") else "fit", usage, planned)
    except (RunNotFound, TraceError):
        return dash.no_update


def clicked_time_ns(click: dict | None) -> int | None:
    """The time of a clicked point: the event's exact ``t_ns`` when the point carries it, else its x (ms).
    None for anything else (clicks come from the browser and may be forged)."""
    try:
        p = click["points"][0] if isinstance(click, dict) and click.get("points") else None
        if not isinstance(p, dict):
            return None
        cd = p.get("customdata")
        if isinstance(cd, (list, tuple)) and cd and isinstance(cd[0], (int, float)) and not isinstance(cd[0], bool):
            if abs(cd[0]) < 2 ** 62:
                return int(cd[0])
        x = p.get("x")
        if isinstance(x, (int, float, str)) and not isinstance(x, bool):
            v = float(x) * NS_PER_MS
            return int(round(v)) if np.isfinite(v) and abs(v) < 2 ** 62 else None
    except (TypeError, ValueError, KeyError, IndexError, OverflowError):
        pass
    return None


def inspect(click, where):
    """The tensors alive at the memory event at or before the clicked time (``click``: the cursor from
    assets/memory_click.js, ``{"x_ms": ...}``, or a Plotly click)."""
    if isinstance(click, dict) and "x_ms" in click:
        click = {"points": [{"x": click.get("x_ms")}]}
    t = clicked_time_ns(click)
    if t is None:
        return dash.no_update, dash.no_update, dash.no_update
    try:
        iv = _intervals(*store_where(where))
    except RunNotFound:
        return "Tensors alive at the clicked time", f"There is no run named {str(where)[:80]!r}.", []
    except TraceError as e:
        return "Tensors alive at the clicked time", str(e), []
    ev = analysis.memory.event_at_or_before(iv, t)
    if ev is None:
        return (f"Nothing allocated yet at {t / NS_PER_MS:.3f} ms", "The click is before the first memory event.",
                [])
    live = analysis.live_at(iv, ev)
    used = analysis.in_use_at(iv, ev)
    step = live["step"].max() if len(live) else None
    summary = (f"{len(live)} tensors, {fmt_mb(int(live['size'].sum()))} recorded"
               + (f"; {fmt_mb(used)} in use (parameters included)" if used is not None else "")
               + f"; the event at or before the click at {t / NS_PER_MS:.3f} ms")
    return (f"Tensors alive at {ev / NS_PER_MS:.3f} ms" + (f" (step {step})" if step is not None else ""),
            summary, live_rows(live))


def at_table(rows: list[dict]):
    """The table of the tensors alive at the clicked time, with its row count and CSV button. Built on a
    click, not with the page: an empty grid made every Memory page load pay for a second grid."""
    return [html.Div(grid_tools("mem-at-table", rows), className="toolbar"),
            data_grid("mem-at-table", LIVE_COLUMNS, rows, page_size=15, csv="tensors-at-click")]


def inspect_table(click, where):
    """``inspect`` for the page: the title, the summary and the table of the tensors."""
    title, summary, rows = inspect(click, where)
    return title, summary, rows if rows is dash.no_update else at_table(rows)


def drill(click, _whole, run_id):
    """A step bar's click zooms the timeline to that step; "Whole run" zooms back out."""
    patch = Patch()
    if ctx.triggered_id == "mem-whole":
        patch["layout"]["xaxis"]["autorange"] = True
        return patch, ""
    try:
        p = click["points"][0]
        a, b = float(p["customdata"][0]), float(p["customdata"][1])
        step = int(p["x"])
    except (TypeError, KeyError, IndexError, ValueError):
        return dash.no_update, dash.no_update
    pad = (b - a) * 0.02
    patch["layout"]["xaxis"]["range"] = [a - pad, b + pad]
    patch["layout"]["xaxis"]["autorange"] = False
    return patch, f"showing step {step} ({a:.3f}–{b:.3f} ms)"


def register_callbacks(app) -> None:
    app.callback(Output("mem-timeline", "figure"), Input("mem-scale", "value"), State("mem-run", "data"),
                 prevent_initial_call=True)(rescale)
    app.callback(Output("mem-at-title", "children"), Output("mem-at-summary", "children"),
                 Output("mem-at-box", "children"), Input("mem-cursor", "data"), State("mem-run", "data"),
                 prevent_initial_call=True)(inspect_table)
    app.callback(Output("mem-timeline", "figure", allow_duplicate=True), Output("mem-drill", "children"),
                 Input("mem-steps", "clickData"), Input("mem-whole", "n_clicks"), State("mem-run", "data"),
                 prevent_initial_call=True)(drill)
    for grid in ("mem-at-table", "mem-peak-table"):
        register_grid(app, grid)
