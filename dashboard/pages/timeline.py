"""Timeline: a lane per stream (aicore0, aicore1, aicpu, comm, host), the sink feeder's host thread, PyNative
host ops and a Steps lane, with zoom and pan.

The browser never gets the whole trace. ``insight.analysis.timeline.timeline_window`` decides the level of
detail per lane on the server: exact tasks while a lane holds about two per pixel of the visible window,
otherwise per-pixel busy bins (a lane's utilisation, drawn as a filled step curve inside its band). Every
zoom or pan (plotly's ``relayoutData``, filtered in the browser to x-axis changes), a step picked in the
dropdown or "Whole run" asks the server for the new window; the run's task times are read once and cached
by the RunStore.

Drawing: one trace per lane -- a horizontal ``Bar`` (``base`` = start, ``x`` = duration, colour by phase)
for exact tasks, or one filled ``Scatter`` polygon for busy bins -- never a shape per task; numeric arrays
go to the browser as typed (base64) arrays.

Perfetto is the model: slices have borders and carry their names when wide enough (plotly's inside text,
hidden below 8 px by ``uniformtext``); the Steps lane shows each step over its phases (data wait, forward,
backward, update, tail -- ``tl.step_phases``) once a median step is ``PHASE_PX`` wide; a clicked task is
outlined and its flows drawn as arrows
(``tl.task_flows``: launch -> device work, TransferData -> GetNext, input copy -> first device task) by a
callback that patches only the figure's shapes and annotations; times in the details panel are ms from the
run's start and from the step's start. W / S zoom in / out around the centre, A / D pan
(``assets/timeline_keys.js``: a keydown listener calling ``Plotly.relayout``, which the server sees as any
other zoom). Multi-rank runs: one rank at a time, chosen by ``?rank=N`` (links above the timeline).

Hover shows a task's name, op, lane, scope and duration; a click shows every field (op, stream, scope,
duration, shape, dtype, estimated FLOPs and bytes, fused ops ...). The Chrome trace (``insight.export.export_chrome``,
gzip) is served by the Flask route of ``dashboard.routes``, ``/download/<run_id>/trace.json.gz``.

Callback inputs come from the browser and may be forged: the width is clamped to ``MAX_WIDTH`` pixels, the
view to the run's span (and at least 1 us), a step must be one of the run's; anything else is an error
message in the page (``tl-info``), never a 500.
"""
from __future__ import annotations

import base64
import html as _html
import re

import dash
import numpy as np
from dash import Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from dashboard.components import GRAPH_CONFIG, run_page, stat_card
from dashboard.data import RunNotFound, store
from insight import analysis
from insight.analysis import timeline as tl
from insight.trace import TraceError

DEFAULT_WIDTH = 1200      # plot-area pixels when the browser has not told us yet
PAD = 0.25                # the server also sends this share of the window on each side: small pans need no wait
LANE_HEIGHT = 46
SOURCES = tl.SOURCES
# colour per code of insight.analysis.timeline (0..10)
COLORS = ("#3a86ff", "#8338ec", "#ff006e", "#f2a541", "#6c757d", "#c9ced6", "#457b9d", "#a8dadc", "#2a9d8f",
          "#e9c46a", "#b8bec9")
LEGEND = ((0, "forward"), (1, "backward"), (2, "update"), (3, "input / copies"), (4, "other"),
          (5, "wait (GetNext, events)"), (8, "PyNative host op"))
STEP_LEGEND = ((6, "step (alternating)"), (7, None), (9, "data wait"), (0, "forward"), (1, "backward"),
               (2, "update"), (10, "tail"))
SELECT_COLOR = "#111"
FLOW_COLOR = "#e63946"
LIGHT_CODES = (3, 5, 7, 9, 10)  # codes whose colour is light: names on them are drawn dark
LABEL_PX = 36             # a slice at least this many pixels wide carries its name
PHASE_PX = 24             # the Steps lane shows the phases under the steps while a median step is this wide:
                          # a phase of a fifth of the step is then about 5 px (narrower, the 4-5 phases are a
                          # blur, yet their bars cost the browser 85 ms a whole-run view of 88 steps)
MAX_LABEL = 48            # characters of a name drawn inside a slice
BUSY_COLOR = "rgba(58, 134, 255, 0.55)"
# a discrete colour scale: code k (0..8) -> COLORS[k] with cmin=-0.5, cmax=8.5
COLORSCALE = [p for k, c in enumerate(COLORS) for p in ((k / len(COLORS), c), ((k + 1) / len(COLORS), c))]
KEYS_HELP = "W / S zoom in / out, A / D pan, drag a box or scroll to zoom, double-click for the whole run"
BUTTON = {"padding": "6px 12px", "border": "1px solid #bbb", "borderRadius": "4px", "background": "#fff",
          "cursor": "pointer", "fontSize": "14px"}
MIN_WIDTH, MAX_WIDTH = 100, 4096  # plot-area pixels a client may ask for
MAX_ABS_MS = 1e12                 # times beyond this (about 30 years) are not a view of a run
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/timeline", name="Timeline", layout=layout)


def layout(run_id=None, step=None, rank=None, **_):
    return run_page(run_id, "timeline", lambda rid: _body(rid, step, rank))


def _data(run_id: str, rank=0) -> tl.TimelineData:
    rank = int(rank or 0)
    if rank == 0:
        return store().get(run_id, "timeline_data", analysis.load_timeline)
    return store().get(run_id, "timeline_data", analysis.load_timeline, rank)


def _rank(run_id: str, rank) -> int:
    """``?rank=N`` when the run has that rank, else its first rank."""
    ranks = store().run(run_id).ranks
    try:
        r = int(rank)
    except (TypeError, ValueError):
        return ranks[0]
    return r if r in ranks else ranks[0]


def download_href(run_id: str) -> str:
    return dash.get_relative_path(f"/download/{run_id}/trace.json.gz")


def _body(run_id: str, step=None, rank=None):
    rank = _rank(run_id, rank)
    ranks = store().run(run_id).ranks
    data = _data(run_id, rank)  # read here, so an unreadable tasks table becomes run_page's error panel
    steps = data.steps
    options = [{"label": f"step {int(r.step)} · {r.step_time_ms:.3f} ms", "value": int(r.step)}
               for r in steps.itertuples()]
    try:
        step = int(step) if step not in (None, "") else None
    except ValueError:
        step = None
    task_lanes = [ln for ln in data.lanes if ln.source not in ("steps", "phases")]
    cards = html.Div([
        stat_card("Tasks", f"{data.n_tasks:,}", "stat-tl-tasks"),
        stat_card("Lanes", str(len(task_lanes)), "stat-tl-lanes", ", ".join(ln.label for ln in task_lanes)),
        stat_card("Steps", str(len(steps)), "stat-tl-steps"),
        stat_card("Span", f"{(data.t_max - data.t_min) / 1e6:,.3f} ms", "stat-tl-span"),
    ], className="cards")
    style = {"display": "flex", "flexWrap": "wrap", "gap": "14px", "fontSize": "12px", "margin": "4px 0",
             "alignItems": "center"}
    legend = html.Div([
        html.Div([html.B("Tasks:")] + [html.Span([_swatch(COLORS[k]), label]) for k, label in LEGEND]
                 + [html.Span([_swatch(BUSY_COLOR), "busy share of each pixel (zoom in for tasks)"])], style=style),
        html.Div([html.B("Steps lane:")]
                 + [html.Span([_swatch(COLORS[6]), _swatch(COLORS[7]), "step (alternating), its phases below:"])]
                 + [html.Span([_swatch(COLORS[k]), label]) for k, label in STEP_LEGEND[2:]]
                 + [html.Span([_swatch("#fff", SELECT_COLOR), "selected task"]),
                    html.Span([html.Span("→", style={"color": FLOW_COLOR, "fontWeight": "bold", "marginRight": "5px"}),
                               "its flows (launch → device work)"])], style=style),
    ], className="tl-legend", id="tl-legend")
    rank_bar = None
    if len(ranks) > 1:
        rank_bar = html.Div([html.B("Rank:")] + [
            dcc.Link(f"rank {r}", href=dash.get_relative_path(f"/run/{run_id}/timeline") + f"?rank={r}",
                     id=f"tl-rank-{r}",
                     className="nav-link active" if r == rank else "nav-link") for r in ranks]
            + [html.Span(f"each rank on its own clock, from its own start (of {len(ranks)} ranks)",
                         className="muted")],
            id="tl-ranks", style={"display": "flex", "gap": "10px", "alignItems": "center", "margin": "4px 0"})
    controls = html.Div([
        html.Div(dcc.Dropdown(id="tl-step", options=options, value=step if step in data.step_numbers else None,
                              placeholder="Jump to a step…" if options else "No steps recorded",
                              disabled=not options, clearable=True), style={"width": "260px"}),
        html.Button("Whole run", id="tl-reset", n_clicks=0, style=BUTTON),
        html.A("Download Chrome trace (.json.gz)", id="tl-download", href=download_href(run_id),
               download=f"{run_id}.trace.json.gz", style=dict(BUTTON, textDecoration="none", color="#1d3557"),
               title="Chrome trace-event JSON, gzip: open it in Perfetto (ui.perfetto.dev) or chrome://tracing"),
        html.Span(id="tl-info", className="muted", style={"flex": "1"}),
    ], style={"display": "flex", "gap": "12px", "alignItems": "center", "flexWrap": "wrap"})
    empty = None
    rows = _rows(data)
    if not data.lanes:
        empty = html.P("This run recorded no tasks and no steps: there is nothing to draw on a timeline.",
                       id="tl-empty", className="panel")
    height = _height(rows)
    return html.Div([
        html.H2("Timeline"), cards, rank_bar, controls, legend, empty,
        # the overlay keeps the graph visible (and its size unchanged) while a new window loads
        dcc.Loading(dcc.Graph(id="tl-graph", figure=_placeholder(height), config=dict(GRAPH_CONFIG, scrollZoom=True),
                              style={"height": f"{height}px", "display": "none" if empty else "block"}),
                    type="dot", delay_show=400, overlay_style={"visibility": "visible", "opacity": 0.6}),
        html.Div(html.P(f"Click a task for its details and flows. {KEYS_HELP}.", className="muted"),
                 id="tl-details", className="panel"),
        dcc.Store(id="tl-run", data=run_id), dcc.Store(id="tl-width"), dcc.Store(id="tl-xrange"),
        dcc.Store(id="tl-rank", data=rank), dcc.Store(id="tl-selected"),
    ])


def _rows(data: tl.TimelineData) -> list[int]:
    """The figure row of each lane: the step phases share the Steps lane's row."""
    out, n = [], -1
    for ln in data.lanes:
        if ln.source != "phases":
            n += 1
        out.append(max(n, 0))
    return out


def _height(rows) -> int:
    return 110 + LANE_HEIGHT * max(1, (max(rows) + 1) if rows else 1)


def _swatch(color: str, border: str | None = None):
    return html.Span(style={"display": "inline-block", "width": "12px", "height": "12px", "background": color,
                            "marginRight": "5px", "verticalAlign": "middle", "borderRadius": "2px",
                            "border": f"2px solid {border}" if border else "1px solid #fff",
                            "boxSizing": "border-box"})


def _placeholder(height: int) -> dict:
    return {"data": [], "layout": {"height": height, "xaxis": {"visible": False}, "yaxis": {"visible": False},
                                   "margin": {"l": 10, "r": 10, "t": 10, "b": 10}}}


# -- the figure ---------------------------------------------------------------------------------------
def _clean(s) -> str:
    """A name for hover text: HTML-escaped, control characters shown as escapes."""
    return _html.escape(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(s)))


def _dur(ns: float) -> str:
    ns = float(ns)
    if ns >= 1e6:
        return f"{ns / 1e6:,.3f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:,.3f} µs"
    return f"{ns:.0f} ns"


def typed(a: np.ndarray) -> dict:
    """A numpy array as plotly.js's typed-array spec (base64): a third of the JSON and no float printing."""
    a = np.ascontiguousarray(a)
    spec = {"dtype": a.dtype.str.lstrip("<|=").replace("float", "f"), "bdata": base64.b64encode(a.tobytes()).decode()}
    if a.ndim > 1:
        spec["shape"] = ", ".join(map(str, a.shape))
    return spec


def _task_trace(y: float, lv: analysis.LaneView, data: tl.TimelineData, px_ms: float, width: float = 0.8) -> dict:
    d = lv.tasks
    n = len(d)
    start_ms = d["start_ns"].to_numpy(np.int64) / 1e6
    dur_ms = d["dur_ns"].to_numpy(np.int64) / 1e6
    rows = d["row"].to_numpy(np.int64)
    if lv.source == "phases":
        ph = data.phases
        st = data.steps
        srow = ph["step_row"].to_numpy()[rows]
        step_start = st["start_ns"].to_numpy()[srow]
        text = [f"<b>step {int(s)}</b> · {p}<br>{_ms(du)} · from {_ms(a - b)} into the step"
                for s, p, du, a, b in zip(ph["step"].to_numpy()[rows], ph["phase"].to_numpy()[rows],
                                          d["dur_ns"].to_numpy(), d["start_ns"].to_numpy(), step_start)]
    elif lv.source == "steps":
        st = data.steps
        cols = {c: st[c].to_numpy()[rows] for c in ("step", "step_time_ms", "iteration_interval_ms", "fp_bp_ms",
                                                     "tail_ms")}
        text = [f"<b>step {s}</b><br>step time {t:.3f} ms<br>iteration interval {a:.3f} ms · fp+bp {b:.3f} ms"
                f" · tail {c:.3f} ms" for s, t, a, b, c in zip(cols["step"], cols["step_time_ms"],
                                                               cols["iteration_interval_ms"], cols["fp_bp_ms"],
                                                               cols["tail_ms"])]
    else:
        label = _clean(lv.label)
        clean = {}  # names repeat: escape each once

        def c(v):
            r = clean.get(v)
            if r is None:
                r = clean[v] = _clean(v)
            return r

        text = [f"<b>{c(nm)}</b> ({c(op)})<br>{label}{' · ' + c(sc) if sc else ''}<br>{_dur(du)}"
                for nm, op, sc, du in zip(d["name"], d["op"], d["scope"], d["dur_ns"].to_numpy())]
    # one integer per task: row * 4 + source. A plain list: dcc.Graph's clickData reads customdata from the
    # figure as sent, where a typed array is still its base64 spec
    custom = (rows * 4 + SOURCES.index(lv.source)).tolist()
    # names inside the slices wide enough to hold a few characters (plotly shrinks or hides the rest)
    wide = dur_ms >= LABEL_PX * px_ms
    names = d["name"].to_numpy() if "name" in d else np.array([""] * n, dtype=object)
    labels = [_clean(str(nm)[:MAX_LABEL]) if w else "" for nm, w in zip(names, wide)]
    trace = {
        "type": "bar", "orientation": "h", "name": lv.label, "showlegend": False,
        "y": typed(np.full(n, y, np.float32)), "base": typed(start_ms),
        # narrower than a pixel: drawn one pixel wide (the hover gives the real duration)
        "x": typed(np.maximum(dur_ms, px_ms)), "width": width,
        # thin white borders keep adjacent slices apart (not on slices a few pixels wide: they would vanish)
        "marker": {"color": typed(d["code"].to_numpy(np.int8)), "colorscale": COLORSCALE, "cmin": -0.5,
                   "cmax": len(COLORS) - 0.5,
                   "line": {"width": 0.6 if n and float(np.median(dur_ms)) >= 4 * px_ms else 0,
                            "color": "rgba(255,255,255,0.95)"}},
        "customdata": custom, "hovertext": text, "hoverinfo": "text",
    }
    if any(labels):  # dark names on the light colours, white on the others
        ink = np.where(np.isin(d["code"].to_numpy(), LIGHT_CODES), "#1d2433", "#ffffff").tolist()
        trace.update(text=labels, textposition="inside", insidetextanchor="start", textangle=0,
                     textfont={"size": 10, "color": ink}, constraintext="inside", cliponaxis=True)
    return trace


def _busy_trace(i: int, lv: analysis.LaneView) -> dict:
    e = lv.edges_ns.astype(np.float64) / 1e6
    frac = lv.busy
    top = i + 0.4 - 0.8 * frac  # the y axis runs downwards: a lane's band is [i - 0.4, i + 0.4]
    x = np.concatenate([e, [e[-1], e[0]]])
    y = np.concatenate([top, [top[-1], i + 0.4, i + 0.4]]).astype(np.float32)
    custom = np.column_stack([np.r_[frac, np.nan, np.nan, np.nan], np.r_[lv.starts, 0, 0, 0]]).astype(np.float32)
    return {
        "type": "scatter", "mode": "lines", "name": lv.label, "showlegend": False,
        "x": typed(x), "y": typed(y), "line": {"width": 0.6, "color": "#3a86ff", "shape": "hv"}, "fill": "toself",
        "fillcolor": BUSY_COLOR, "customdata": typed(custom), "hoveron": "points",
        "hovertemplate": f"<b>{_clean(lv.label)}</b><br>%{{x:,.3f}} ms<br>busy %{{customdata[0]:.0%}}<br>"
                         f"%{{customdata[1]}} task(s) start in this pixel<extra></extra>",
    }


def _in_view(lv: analysis.LaneView, view) -> int:
    """Tasks of the lane in the visible view (the window also holds the padding around it)."""
    if lv.mode == "tasks":
        d = lv.tasks
        return int(((d["start_ns"] < view[1]) & ((d["end_ns"] > view[0]) | (d["start_ns"] >= view[0]))).sum())
    e = lv.edges_ns
    inside = (e[:-1] >= view[0]) & (e[1:] <= view[1])
    return int(lv.starts[inside].sum())


def build_figure(data: tl.TimelineData, win: analysis.TimelineWindow, view: tuple[int, int], width_px: int,
                 uirevision=None, selected=None) -> dict:
    """The figure (a plain dict: no per-property validation) for ``win`` -- computed for a padded window --
    showing ``view`` = (t0_ns, t1_ns); ``selected``: the clicked task ({source, row}), outlined with its flows."""
    px_ms = (view[1] - view[0]) / max(1, width_px) / 1e6
    rows = _rows(data)
    traces = []
    # the phases of steps a few pixels wide could not be told apart: then the steps fill their lane (their hover
    # still gives the phase times), which also halves what the browser draws for a whole-run view
    steps = next((lv for lv in win.lanes if lv.source == "steps" and lv.mode == "tasks" and len(lv.tasks)), None)
    phases = steps is not None and float(np.median(steps.tasks["dur_ns"].to_numpy())) / 1e6 >= PHASE_PX * px_ms
    for i, lv in enumerate(win.lanes):
        y = rows[i]
        if lv.mode == "tasks":
            if len(lv.tasks):
                if lv.source == "steps" and phases:  # the Steps row: the step above, its phases below
                    traces.append(_task_trace(y - 0.2, lv, data, px_ms, 0.38))
                elif lv.source == "phases":
                    if phases:
                        traces.append(_task_trace(y + 0.2, lv, data, px_ms, 0.38))
                else:
                    traces.append(_task_trace(y, lv, data, px_ms))
        elif lv.source != "phases":  # a busy Steps row says it all
            traces.append(_busy_trace(y, lv))
    labels = [f"{_clean(lv.label)}<br><span style='font-size:10px;color:#888'>"
              f"{'tasks' if lv.mode == 'tasks' else 'busy / pixel'} · {_in_view(lv, view):,}</span>"
              for lv in win.lanes if lv.source != "phases"]
    n = len(labels)
    shapes, notes = _selection(data, selected, px_ms)
    layout = {
        "template": {"layout": {"plot_bgcolor": "white", "paper_bgcolor": "white", "font": {"color": "#2a3f5f"}}},
        "barmode": "overlay", "bargap": 0, "height": _height(rows),
        "uniformtext": {"mode": "hide", "minsize": 8},
        # the top margin holds the mode bar, so it never covers the Steps lane
        "margin": {"l": 190, "r": 20, "t": 40, "b": 50}, "hovermode": "closest", "dragmode": "zoom",
        "modebar": {"orientation": "h", "bgcolor": "rgba(255,255,255,0.9)"},
        "uirevision": uirevision,
        "xaxis": {"range": [view[0] / 1e6, view[1] / 1e6], "autorange": False,
                  "title": {"text": "time since the run started (ms)"}, "showgrid": True, "gridcolor": "#eef0f4",
                  "zeroline": False, "showspikes": True, "spikemode": "across", "spikethickness": 1,
                  "spikecolor": "#999", "spikedash": "dot"},
        "yaxis": {"range": [n - 0.5, -0.5], "autorange": False, "tickvals": list(range(n)), "ticktext": labels,
                  "fixedrange": True, "showgrid": False, "zeroline": False},
        "shapes": _separators(n) + shapes, "annotations": notes,
    }
    return {"data": traces, "layout": layout}


def _separators(n: int) -> list:
    return [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": i + 0.5, "y1": i + 0.5,
             "line": {"color": "#e6e6e6", "width": 1}} for i in range(n - 1)]


def _valid_selection(sel):
    """(source, row) of a selection from the browser, or None."""
    if not isinstance(sel, dict):
        return None
    src, row = sel.get("source"), sel.get("row")
    if src not in SOURCES or isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < 2**62:
        return None
    return src, row


def _span_of(data: tl.TimelineData, source: str, rows: list) -> list:
    """(start_ns, end_ns) of ``rows`` of ``source``."""
    if source == "tasks":
        t = data.task_rows(rows, {"start_ns": -1, "end_ns": -1})
        return list(zip(t.column("start_ns").to_pylist(), t.column("end_ns").to_pylist()))
    d = data.details(source, rows)
    return list(zip(d["start_ns"].tolist(), d["end_ns"].tolist()))


def _lane_y(data: tl.TimelineData, source: str, row: int) -> float | None:
    i = data.lane_index(source, row)
    if i < 0:
        return None
    y = _rows(data)[i]
    return y - 0.2 if source == "steps" else y + 0.2 if source == "phases" else y


def _selection(data: tl.TimelineData, selected, px_ms: float) -> tuple[list, list]:
    """Layout shapes outlining the selected task and annotations drawing its flows as arrows (start of the
    source slice -> start of the target slice, Perfetto's convention)."""
    sel = _valid_selection(selected)
    if sel is None or data.run is None:
        return [], []
    source, row = sel
    try:
        y = _lane_y(data, source, row)
        if y is None:
            return [], []
        (s, e), = _span_of(data, source, [row])
        half = 0.19 if source in ("steps", "phases") else 0.42
        shapes = [{"type": "rect", "xref": "x", "yref": "y", "x0": s / 1e6, "x1": max(e / 1e6, s / 1e6 + px_ms),
                   "y0": y - half, "y1": y + half, "line": {"color": SELECT_COLOR, "width": 2.5},
                   "fillcolor": "rgba(0,0,0,0)", "name": "selected", "layer": "above"}]
        notes = []
        flows = tl.task_flows(data, source, row)
        ends = sorted({r for f in flows for r in (f.src, f.dst)})
        spans = dict(zip(ends, _span_of(data, "tasks", ends))) if ends else {}
        for f in flows:
            ys, yd = _lane_y(data, "tasks", f.src), _lane_y(data, "tasks", f.dst)
            if ys is None or yd is None:
                continue
            other = f.dst if f.src == row else f.src
            os_, oe = spans[other]
            shapes.append({"type": "rect", "xref": "x", "yref": "y", "x0": os_ / 1e6,
                           "x1": max(oe / 1e6, os_ / 1e6 + px_ms), "y0": (yd if other == f.dst else ys) - 0.42,
                           "y1": (yd if other == f.dst else ys) + 0.42, "line": {"color": FLOW_COLOR, "width": 1.5},
                           "fillcolor": "rgba(0,0,0,0)", "name": "flow end", "layer": "above"})
            notes.append({"x": spans[f.dst][0] / 1e6, "y": yd, "ax": spans[f.src][0] / 1e6, "ay": ys,
                          "xref": "x", "yref": "y", "axref": "x", "ayref": "y", "showarrow": True, "arrowhead": 2,
                          "arrowsize": 1.2, "arrowwidth": 1.6, "arrowcolor": FLOW_COLOR, "text": "",
                          "hovertext": _clean(f.cat), "name": "flow"})
        return shapes, notes
    except (TraceError, IndexError, ValueError, KeyError):
        return [], []


def _window(data: tl.TimelineData, t0: float, t1: float, width_px: int):
    """The view [t0, t1] (ns, at least 1 us wide) and the window computed for it: the view padded by PAD on
    each side (small pans need no round trip), clipped to the run. Returns (window, view)."""
    t0, t1 = float(t0), float(t1)
    if t1 - t0 < 1000:
        mid = (t0 + t1) / 2
        t0, t1 = mid - 500, mid + 500
    span = t1 - t0
    margin = (data.t_max - data.t_min) * 0.01
    w0 = max(t0 - PAD * span, data.t_min - margin)
    w1 = min(t1 + PAD * span, data.t_max + margin)
    if w1 <= w0:  # the view lies outside the run: nothing to draw there
        w0, w1 = t0, t1
    bins = int(round(width_px * (w1 - w0) / span))
    win = analysis.timeline_window(data, int(np.floor(w0)), int(np.ceil(w1)), max(1, bins))
    return win, (int(np.floor(t0)), int(np.ceil(t1)))


def _finite(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if np.isfinite(f) and abs(f) < MAX_ABS_MS else None


def _x_range(relayout: dict | None):
    """(t0_ns, t1_ns) from plotly's relayoutData, "auto" for a reset, None if the x axis did not move.
    ValueError for a range that is not two finite numbers (a forged request)."""
    if not relayout or not isinstance(relayout, dict):
        return None
    if relayout.get("xaxis.autorange"):
        return "auto"
    if "xaxis.range[0]" in relayout and "xaxis.range[1]" in relayout:
        a, b = relayout["xaxis.range[0]"], relayout["xaxis.range[1]"]
    elif isinstance(relayout.get("xaxis.range"), (list, tuple)) and len(relayout["xaxis.range"]) == 2:
        a, b = relayout["xaxis.range"]
    else:
        return None
    a, b = _finite(a), _finite(b)
    if a is None or b is None:
        raise ValueError("the x range must be two finite numbers of milliseconds")
    a, b = a * 1e6, b * 1e6
    return (min(a, b), max(a, b))


def clamp_width(width) -> int:
    """The plot width a client sent, as pixels in [MIN_WIDTH, MAX_WIDTH] (DEFAULT_WIDTH when not a number)."""
    w = _finite(width) if not isinstance(width, str) else None
    if w is None:
        return DEFAULT_WIDTH
    return int(min(MAX_WIDTH, max(MIN_WIDTH, w)))


def _info(win: analysis.TimelineWindow, view) -> str:
    parts = [f"{view[0] / 1e6:,.3f} – {view[1] / 1e6:,.3f} ms ({(view[1] - view[0]) / 1e6:,.3f} ms)"]
    exact = [lv.label for lv in win.lanes if lv.mode == "tasks"]
    busy = [lv.label for lv in win.lanes if lv.mode == "busy" and lv.source != "phases"]
    if busy:
        parts.append(f"busy per pixel: {', '.join(busy)} — zoom in for exact tasks")
    if exact:
        parts.append(f"exact tasks: {sum(_in_view(lv, view) for lv in win.lanes if lv.mode == 'tasks'):,}")
    return " · ".join(parts)


def update_figure(relayout, step, _reset, width, run_id, rank=0, selected=None):
    if not run_id:
        raise PreventUpdate
    if not isinstance(run_id, str) or len(run_id) > 255:
        return _placeholder(90 + LANE_HEIGHT), "no such run"
    trig = ctx.triggered_id if ctx else None
    width_px = clamp_width(width)
    try:
        data = _data(run_id, _rank(run_id, rank))
        if not data.lanes:
            return _placeholder(90 + LANE_HEIGHT), "no tasks"
        view = (data.t_min, data.t_max)
        if trig == "tl-xrange":
            rng = _x_range(relayout)
            if rng is None:
                raise PreventUpdate
            if rng != "auto":
                view = rng
        elif trig in ("tl-step", None, "tl-width") and step is not None:
            s = _finite(step)
            r = data.step_range(int(s)) if s is not None and s == int(s) else None
            if r is None:
                return _placeholder(90 + LANE_HEIGHT * len(data.lanes)), f"this run has no step {str(step)[:40]}"
            pad = max(1, (r[1] - r[0]) // 50)
            view = (r[0] - pad, r[1] + pad)
        win, view = _window(data, view[0], view[1], width_px)
        return build_figure(data, win, view, width_px, uirevision=run_id, selected=selected), _info(win, view)
    except (TraceError, RunNotFound) as e:
        return _placeholder(90 + LANE_HEIGHT), f"cannot read this run: {e}"
    except ValueError as e:
        return _placeholder(90 + LANE_HEIGHT), f"invalid view: {e}"


# plotly's relayoutData -> tl-xrange, only when the x axis moved (zoom, pan, double-click): resizes and
# autosize events never reach the server -- nor supersede a window being fetched
XRANGE_JS = """function(rl) {
        if (!rl || !(rl['xaxis.autorange'] || 'xaxis.range[0]' in rl || Array.isArray(rl['xaxis.range']))) {
            return window.dash_clientside.no_update;
        }
        return Object.assign({}, rl, {n: Date.now()});
    }"""
# the plot area's width in pixels: what one busy bin per pixel means
WIDTH_JS = """function(run) {
        var el = document.getElementById('tl-graph');
        var w = (el && el.clientWidth) ? el.clientWidth : window.innerWidth - 60;
        return Math.max(200, Math.round(w - 210));
    }"""


def show_details(click, run_id, rank=0):
    """The details panel of the clicked task and the selection ({source, row}; None for a busy bin)."""
    try:
        pt = (click or {}).get("points", [{}])[0]
        cd = pt.get("customdata")
        if not run_id or not pt:
            raise PreventUpdate
        if not isinstance(cd, (int, float)) or isinstance(cd, bool):  # a busy bin (its customdata is for hover)
            x = _finite(pt.get("x")) or 0.0
            return html.Div([html.H4("Busy share"), html.P(
                f"At {x:,.3f} ms this lane shows the share of each pixel it was busy, not single "
                f"tasks: zoom in (drag a box or scroll) until it shows exact tasks, then click one.")]), None
        source, row = SOURCES[int(cd) % 4], int(cd) // 4
        data = _data(run_id, _rank(run_id, rank))
        rec = analysis.task_details(data, source, row)
        flows = tl.task_flows(data, source, row) if rec else []
    except PreventUpdate:
        raise
    except (TraceError, RunNotFound, IndexError, ValueError, OverflowError, TypeError, AttributeError) as e:
        return html.P(f"no details: {str(e)[:200]}", className="muted"), None
    return _details_panel(source, rec, data, flows), ({"source": source, "row": row} if rec else None)


def highlight(selected, run_id, rank=0):
    """Outline the selected task and draw its flows: a Patch of the figure's shapes and annotations only."""
    if not run_id or not isinstance(run_id, str):
        raise PreventUpdate
    try:
        data = _data(run_id, _rank(run_id, rank))
    except (TraceError, RunNotFound):
        raise PreventUpdate from None
    n = max(_rows(data), default=0) + 1
    # px_ms only sets the least width of the outline: one pixel of a 1 ms wide view is plenty
    shapes, notes = _selection(data, selected, 1e-3 / DEFAULT_WIDTH)
    patch = dash.Patch()
    patch["layout"]["shapes"] = _separators(n) + shapes
    patch["layout"]["annotations"] = notes
    return patch


def register_callbacks(app) -> None:
    app.callback(Output("tl-graph", "figure"), Output("tl-info", "children"),
                 Input("tl-xrange", "data"), Input("tl-step", "value"), Input("tl-reset", "n_clicks"),
                 Input("tl-width", "data"), State("tl-run", "data"), State("tl-rank", "data"),
                 State("tl-selected", "data"))(update_figure)
    app.clientside_callback(XRANGE_JS, Output("tl-xrange", "data"), Input("tl-graph", "relayoutData"),
                            prevent_initial_call=True)
    app.clientside_callback(WIDTH_JS, Output("tl-width", "data"), Input("tl-run", "data"))
    app.callback(Output("tl-details", "children"), Output("tl-selected", "data"), Input("tl-graph", "clickData"),
                 State("tl-run", "data"), State("tl-rank", "data"), prevent_initial_call=True)(show_details)
    app.callback(Output("tl-graph", "figure", allow_duplicate=True), Input("tl-selected", "data"),
                 State("tl-run", "data"), State("tl-rank", "data"), prevent_initial_call=True)(highlight)


def _ms(ns) -> str:
    """Nanoseconds as milliseconds -- the one unit of the details panel -- to the nanosecond below 0.1 ms."""
    ns = float(ns)
    return f"{ns / 1e6:,.3f} ms" if abs(ns) >= 1e5 or ns == 0 else f"{ns / 1e6:,.6f} ms"


def _fmt(k: str, v) -> str:
    if k.endswith("_ns") and isinstance(v, (int, float)):
        return "—" if v < 0 and not k.startswith("dur") else _ms(v)
    if k.endswith("_ms") and isinstance(v, (int, float)):
        return _ms(float(v) * 1e6)
    if k in ("flops", "bytes", "step", "task_id") and isinstance(v, (int, float)):  # -1: none recorded
        return "—" if v < 0 else f"{v:,}" if k in ("flops", "bytes") else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s) if s else "—"


DETAIL_ORDER = ("name", "op", "kind", "stream", "scope", "phase", "step", "graph", "task_id", "dur_ns", "start_ns",
                "end_ns", "shape", "dtype", "flops", "bytes", "fused_ops")


# the cost model's estimates from shapes; times are ms from the run's start (the x axis's zero)
DETAIL_LABELS = {"flops": "est. flops", "bytes": "est. bytes", "dur_ns": "duration", "start_ns": "start",
                 "end_ns": "end", "fp_start_ns": "forward starts", "bp_end_ns": "backward ends",
                 "step_time_ms": "step time", "iteration_interval_ms": "iteration interval (data wait)",
                 "fp_bp_ms": "forward + backward", "tail_ms": "tail"}


def _step_of(data, t_ns) -> tuple | None:
    """(step, start_ns) of the step whose range holds ``t_ns``."""
    if data is None or not len(data.steps) or not isinstance(t_ns, (int, float)) or t_ns < 0:
        return None
    st = data.steps
    k = int(np.searchsorted(st["start_ns"].to_numpy(), t_ns, side="right")) - 1
    if k < 0 or t_ns >= st["end_ns"].iat[k]:
        return None
    return int(st["step"].iat[k]), int(st["start_ns"].iat[k])


def _details_panel(source: str, rec: dict, data=None, flows=()):
    if not rec:
        return html.P("no details", className="muted")
    if source == "steps":
        keys = [k for k in ("step", "epoch", "step_time_ms", "iteration_interval_ms", "fp_bp_ms", "tail_ms",
                            "start_ns", "fp_start_ns", "bp_end_ns", "end_ns", "fp_start_op", "bp_end_op", "loss")
                if k in rec]
        title = f"Step {rec.get('step')}"
    elif source == "phases":
        keys = [k for k in ("step", "phase", "dur_ns", "start_ns", "end_ns") if k in rec]
        title = f"Step {rec.get('step')} · {rec.get('phase')}"
    else:
        keys = [k for k in DETAIL_ORDER if k in rec] + [k for k in rec if k not in DETAIL_ORDER]
        title = _fmt("name", rec.get("name") or rec.get("op") or "task")
    th = {"textAlign": "left", "paddingRight": "16px"}
    rows = []
    for k in keys:
        v = _fmt(k, rec[k])
        if k in ("start_ns", "fp_start_ns", "bp_end_ns", "end_ns") and isinstance(rec[k], (int, float)) and rec[k] >= 0:
            v += " from the run's start"
            at = _step_of(data, rec["start_ns"]) if source != "steps" and "start_ns" in rec else None
            if source == "steps" and k != "start_ns":
                v += f" · {_ms(rec[k] - rec['start_ns'])} into the step"
            elif at is not None:
                v += f" · {_ms(rec[k] - at[1])} into step {at[0]}"
        rows.append(html.Tr([html.Th(DETAIL_LABELS.get(k, k.replace("_", " ")), style=th), html.Td(v)]))
    out = [html.H4(title, id="tl-details-title"), html.Table(html.Tbody(rows), id="tl-details-table")]
    if flows:
        out.append(html.P([html.B("Flows: "), "; ".join(
            f"{f.cat}: task row {f.src} → row {f.dst}" for f in flows[:8])], id="tl-details-flows",
            style={"color": FLOW_COLOR}))
    return html.Div(out)
