"""Compare two runs (``/compare?a=<run>&b=<run>``), HTA's trace diff / torch.profiler's diff view.

* step-breakdown averages of both runs as grouped bars, and the table of every summary metric
  (a, b, b − a, b / a);
* per op type, the time per averaged step in each run (warm-up step 0 excluded, as the step averages) and the
  difference (ms and %), with its run-to-run noise (``insight.analysis.compare``'s rule, stated on the page:
  Mann-Whitney p < 0.01, the bootstrap 95 % interval of the lower-quartile change beyond 1.4x -- or the pair's
  wider noise threshold -- and at least 1 % of the step); classified ``added`` (only in b), ``removed`` (only in a), ``faster`` / ``slower``
  (significant) or ``same`` ("within noise"), as a table and a diverging bar chart. Fractions (utilisation,
  input share) are shown as percentages.

The two dropdowns rewrite the URL (``?a=..&b=..``), which re-renders the page: a comparison is a link.
Everything comes from ``insight.analysis.compare_runs``.
"""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from dashboard.components import (data_grid, error_panel, fmt_ms, graph, grid_tools, num_col, plain_table,
                                  register_grid, stat_card, text_col)
from dashboard.data import RunNotFound, store
from insight import analysis
from insight.analysis.compare import ALPHA, MIN_RATIO, MIN_STEP_SHARE, SPREAD_K
from insight.trace import TraceError

PAGES_LOCATION = "_pages_location"  # dash.page_container's dcc.Location (refresh="callback-nav")
STATUS_COLORS = {"faster": "#2a9d8f", "slower": "#e63946", "added": "#3a86ff", "removed": "#8d99ae", "same": "#adb5bd"}
STATUS_ORDER = ("slower", "faster", "added", "removed", "same")
CHART_ROWS = 25
STEP_PARTS = [("iteration_interval_ms", "Iteration interval"), ("fp_bp_ms", "Forward + backward"),
              ("tail_ms", "Tail"), ("allreduce_ms", "AllReduce"), ("step_time_ms", "Step time")]
METRIC_LABELS = {"step_time_ms": "Step time (ms)", "iteration_interval_ms": "Iteration interval (ms)",
                 "fp_bp_ms": "Forward + backward (ms)", "tail_ms": "Tail (ms)", "allreduce_ms": "AllReduce (ms)",
                 "device_utilization": "Device utilisation", "input_share": "Input share"}
PERCENT_METRICS = ("device_utilization", "input_share")  # fractions, shown as percentages

STATUS_STYLE = {"styleConditions": [{"condition": f"params.value == '{st}'",
                                        "style": {"color": c, "fontWeight": 600}} for st, c in STATUS_COLORS.items()]}
OP_COLUMNS = [
    text_col("op", "Op type", pinned="left", minWidth=170), text_col("status", "Status", cellStyle=STATUS_STYLE),
    num_col("ms_per_step_a", "A ms/step"), num_col("ms_per_step_b", "B ms/step"),
    num_col("diff_ms", "B − A (ms/step)", "signed_ms"), num_col("diff_pct", "B vs A (%)", "+,.1f"),
    text_col("noise", "Noise", minWidth=120), num_col("q_change_pct", "Lower quartile B vs A (%)", "+,.1f"),
    num_col("ci_low_pct", "its 95 % CI low (%)", "+,.1f"), num_col("ci_high_pct", "its 95 % CI high (%)", "+,.1f"),
    num_col("p_value", "p (Mann-Whitney)", ".2g"),
    num_col("calls_per_step_a", "A calls/step", "num1"), num_col("calls_per_step_b", "B calls/step", "num1"),
]
STEP_COLUMNS = [("label", "Metric", None), ("a", "A", "ms"), ("b", "B", "ms"), ("diff", "B − A", "signed_ms"),
                ("ratio", "B / A", "ratio")]  # seven fixed rows: a plain table


def register():
    dash.register_page(__name__, path="/compare", name="Compare", title="Insight · compare", layout=layout)


def _arg(v) -> str | None:
    """A query argument: ``?a=x&a=y`` gives a list (take the first); blank means not given."""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    v = None if v is None else str(v).strip()
    return v or None


def layout(a=None, b=None, **_):
    a, b = _arg(a), _arg(b)
    runs = store().run_ids()
    if a is None and b is None and runs:  # /compare alone: the two newest runs, older as A
        recent = _newest_first(runs)
        a, b = (recent[1], recent[0]) if len(recent) > 1 else (recent[0], recent[0])
    options = [{"label": r, "value": r} for r in runs]
    pickers = html.Div([
        html.Span("A", className="muted"),
        dcc.Dropdown(id="compare-a", options=options, value=a if a in runs else None, placeholder="run A",
                     clearable=False, style={"width": 320}),
        html.Span("vs B", className="muted", style={"marginLeft": 12}),
        dcc.Dropdown(id="compare-b", options=options, value=b if b in runs else None, placeholder="run B",
                     clearable=False, style={"width": 320}),
    ], style={"display": "flex", "alignItems": "center", "gap": 8, "flexWrap": "wrap"}, id="compare-pickers")
    return html.Div([html.H2("Compare runs"), pickers, html.Div(body(a, b), id="compare-body")],
                    className="compare-page")


def _newest_first(runs: list[str]) -> list[str]:
    def created(r):
        try:
            return str(store().manifest(r).get("created", ""))
        except (RunNotFound, TraceError):
            return ""
    return sorted(runs, key=created, reverse=True)


# -- the comparison -----------------------------------------------------------------------------------------
def comparison(a: str, b: str) -> analysis.RunComparison:
    """``compare_runs`` for two run ids, cached until either run changes (RunNotFound / TraceError)."""
    return store().get_pair(a, b, "compare_runs", analysis.compare_runs)


def body(a: str | None, b: str | None):
    if a is None or b is None:
        return html.P("Pick two runs to compare (the same run on both sides works too).", className="muted",
                      id="compare-hint")
    missing = []
    for side, r in (("A", a), ("B", b)):
        try:
            store().path(r)
        except RunNotFound:
            missing.append(f"{side}: there is no run named {r!r} in {store().base_dir}.")
    if missing:
        return html.Div([html.H3("Unknown run", id="not-found"),
                         *[html.P(m, className="error-message") for m in missing],
                         html.P("Pick runs from the lists above.", className="muted")],
                        className="error-panel", id="compare-unknown")
    try:
        cmp = comparison(a, b)
    except TraceError as e:
        return error_panel(str(e), "These runs cannot be compared")
    return _view(a, b, cmp)


def step_rows(cmp) -> list[dict]:
    s = cmp.steps
    out = []
    for r in s.itertuples():
        row = {"id": r.metric, "metric": r.metric, "label": METRIC_LABELS.get(r.metric, r.metric),
               "a": _f(r.a), "b": _f(r.b), "diff": _f(r.diff), "ratio": _f(r.ratio)}
        if r.metric in PERCENT_METRICS:  # fractions: "84.8 %" and the change in percentage points
            row.update(a=_pct(r.a), b=_pct(r.b), diff="—" if _f(r.diff) is None else f"{r.diff * 100:+.1f} points")
        out.append(row)
    return out


def _pct(v) -> str:
    v = _f(v)
    return "—" if v is None else f"{v * 100:.1f} %"


def op_rows(cmp) -> list[dict]:
    cols = [c["field"] for c in OP_COLUMNS]
    df = cmp.ops.reindex(columns=cols + ["significant"])
    rows = []
    for rec in df.to_dict("records"):
        sig = bool(rec.pop("significant")) if rec.get("significant") == rec.get("significant") else False
        row = {k: (_f(v) if k not in ("op", "status", "noise") else str(v)) for k, v in rec.items()}
        row["noise"] = noise_label(rec["status"], sig, rec.get("p_value"))
        rows.append(row | {"id": str(rec["op"])})
    return rows


def noise_label(status: str, significant: bool, p) -> str:
    """Beyond noise (significant) or within it; "—" for op types only one run has."""
    if status in ("added", "removed") or not isinstance(p, float) or p != p:
        return "—"
    return "significant" if significant else "within noise"


def _f(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def status_counts(cmp) -> dict:
    vc = cmp.ops["status"].value_counts() if len(cmp.ops) else pd.Series(dtype=int)
    return {s: int(vc.get(s, 0)) for s in STATUS_ORDER}


def steps_figure(cmp) -> go.Figure:
    s = cmp.steps.set_index("metric")
    parts = [(c, label) for c, label in STEP_PARTS if c in s.index and (c != "allreduce_ms" or
                                                                        (s.loc[c, ["a", "b"]].abs().sum() > 0))]
    labels = [label for _, label in parts]
    fig = go.Figure()
    for side, name, color in (("a", f"A: {cmp.a}", "#457b9d"), ("b", f"B: {cmp.b}", "#f4a261")):
        vals = [float(s.loc[c, side]) for c, _ in parts]
        fig.add_bar(x=labels, y=vals, name=name, marker_color=color, text=[f"{v:.3f}" for v in vals],
                    textposition="outside", hovertemplate="%{x}: %{y:.3f} ms<extra>" + name + "</extra>")
    fig.update_layout(barmode="group", title="Average step breakdown (ms; first step excluded)",
                      yaxis_title="ms", height=380, legend=dict(orientation="h", y=-0.15),
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def ops_figure(cmp) -> go.Figure:
    ops = cmp.ops[cmp.ops["status"] != "same"] if len(cmp.ops) else cmp.ops
    fig = go.Figure()
    if not len(ops):
        fig.add_annotation(text="No op type changed beyond the tolerance and run-to-run noise", showarrow=False,
                           x=0.5, y=0.5,
                           xref="paper", yref="paper")
        fig.update_layout(height=220, title="Per-op-type time difference (B − A, ms per step)",
                          xaxis_visible=False, yaxis_visible=False)
        return fig
    top = ops.head(CHART_ROWS).iloc[::-1]  # ops come ordered by |diff|; largest at the top
    for status in STATUS_ORDER:
        sel = top[top["status"] == status]
        if not len(sel):
            continue
        fig.add_bar(y=sel["op"], x=sel["diff_ms"], orientation="h", name=status, marker_color=STATUS_COLORS[status],
                    customdata=np.stack([sel["ms_per_step_a"], sel["ms_per_step_b"]], axis=-1),
                    hovertemplate="%{y}: %{x:+.3f} ms/step<br>A %{customdata[0]:.3f} → B %{customdata[1]:.3f}"
                                  "<extra>" + status + "</extra>")
    fig.add_vline(x=0, line_color="#333", line_width=1)
    fig.update_layout(title=f"Per-op-type time difference (B − A, ms per step; top {min(CHART_ROWS, len(ops))} "
                            "changes)", barmode="relative", xaxis_title="ms per step (negative: B is faster)",
                      yaxis=dict(categoryorder="array", categoryarray=list(top["op"]), automargin=True),
                      height=max(260, 22 * len(top) + 120), legend=dict(orientation="h", y=-0.12),
                      margin=dict(l=20, r=20, t=50, b=40))
    return fig


def _view(a: str, b: str, cmp):
    sa = cmp.steps.set_index("metric")
    ta, tb = float(sa.loc["step_time_ms", "a"]), float(sa.loc["step_time_ms", "b"])
    change = f"{(tb / ta - 1) * 100:+.1f} %" if ta > 0 and np.isfinite(tb) else "—"
    counts = status_counts(cmp)
    same_run = store().path(a) == store().path(b)
    cards = html.Div([
        stat_card("A: average step", fmt_ms(ta), "compare-a-step", cmp.a),
        stat_card("B: average step", fmt_ms(tb), "compare-b-step", cmp.b),
        stat_card("B vs A", change, "compare-change", "step time; negative is faster"),
        stat_card("Op types", " · ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s]) or "—",
                  "compare-status-counts", "faster / slower: beyond run-to-run noise (the rule below)"),
        stat_card("Run-wide speed B / A", f"{(cmp.run_factor - 1) * 100:+.1f} %", "compare-run-factor",
                  "median lower-quartile change over op types: the machine's share, taken out of the noise test"),
        stat_card("Noise threshold", f"{cmp.noise_ratio:.2f}x", "compare-noise-ratio",
                  f"{MIN_RATIO:g}x, or more when all op types scatter"),
    ], className="cards")
    note = html.P("Both sides are the same run: every difference is zero.", className="muted",
                  id="compare-same") if same_run else None
    steps, ops = step_rows(cmp), op_rows(cmp)
    return html.Div([
        html.H3([html.Span(a, id="compare-a-name"), " vs ", html.Span(b, id="compare-b-name")]),
        note, cards,
        html.Div([html.Div(graph("compare-steps", steps_figure(cmp)), style={"flex": "1 1 0", "minWidth": 0}),
                  html.Div(plain_table("compare-steps-table", STEP_COLUMNS, steps, csv="compare-steps"),
                           style={"flex": "1 1 0", "minWidth": 0}, className="panel")], className="two-col"),
        graph("compare-ops-chart", ops_figure(cmp)),
        html.Div([html.Div([html.H3("Per-op-type difference", style={"margin": "4px 12px 4px 0"}),
                            *grid_tools("compare-ops-table", ops)], className="toolbar"),
                  html.P(f"Time and calls per step over the averaged steps (warm-up step 0 excluded, as in the "
                         f"step averages). Other processes on the machine only ever add time, and unequally per op "
                         f"type, so a rerun of the same seed is not a copy. A change counts as significant -- "
                         f"faster / slower -- only when all three hold: the Mann-Whitney U test of the per-step "
                         f"samples (B's divided by the run-wide speed change) gives p < {ALPHA:g}; the bootstrap "
                         f"95 % interval of the change of the lower quartile (the op's time when nothing "
                         f"interferes) lies beyond the noise threshold, {cmp.noise_ratio:.2f}x slower or faster "
                         f"here ({MIN_RATIO:g}x, more than same-seed reruns differ, widened to {SPREAD_K:g} robust "
                         f"standard deviations of how all op types moved when the two runs scatter); and the op's "
                         f"mean time per step moves by at least {MIN_STEP_SHARE:.0%} of A's step. Otherwise it is "
                         f"within noise (status same). Added: only in B; removed: only in A.",
                         className="muted", id="compare-noise-rule"),
                  data_grid("compare-ops-table", OP_COLUMNS, ops, page_size=20, csv="compare-op-types")],
                 className="panel", style={"marginTop": 12}),
    ])


# -- the pickers rewrite the URL; the page router re-renders with the new query ----------------------------
# The dropdowns write the URL the router renders (in the browser: no request, and none when the URL already
# says so -- the dropdowns set their values when drawn, which cost a server round trip on every page load).
PICK_JS = """function(a, b) {
    var q = new URLSearchParams();
    if (a) { q.set('a', a); }
    if (b) { q.set('b', b); }
    var s = q.toString() ? '?' + q.toString() : '';
    return s === window.location.search ? window.dash_clientside.no_update : s;
}"""


def register_callbacks(app) -> None:
    app.clientside_callback(PICK_JS, Output(PAGES_LOCATION, "search"), Input("compare-a", "value"),
                            Input("compare-b", "value"), prevent_initial_call=True)
    register_grid(app, "compare-ops-table")
