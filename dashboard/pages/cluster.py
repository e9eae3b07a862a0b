"""Cluster: every rank of a multi-process (data-parallel) run side by side.

Per rank: the averaged step trace as stacked bars (iteration interval, fp+bp, tail), communication alone and
the communication/computation overlap (HTA), the straggler flags with the numbers behind them, the AllReduce
buckets, and what is wrong with any rank (missing, failed, steps that disagree) -- the other ranks still show.
Clicking a rank's bar (or its link) opens that rank's pages (``?rank=<r>``).
"""
from __future__ import annotations

from urllib.parse import quote

import dash
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html

from dashboard.components import data_grid, fmt_ms, graph, grid_records, num_col, run_page, stat_card, text_col
from dashboard.data import store
from insight.analysis.cluster import cluster_report

PARTS = [("iteration_interval_ms", "Iteration interval (data wait)", "#f2a541"),
         ("fp_bp_ms", "Forward + backward", "#3a86ff"), ("tail_ms", "Tail (AllReduce wait + update)", "#8338ec")]
COLUMNS = [("rank", "rank"), ("status", "status"), ("steps", "steps"), ("step_time_ms", "step ms"),
           ("iteration_interval_ms", "interval ms"), ("fp_bp_ms", "fp+bp ms"), ("tail_ms", "tail ms"),
           ("comm_ms", "comm ms"), ("comm_alone_ms", "comm alone ms"), ("overlap_pct", "overlap %"),
           ("allreduce_per_step", "AllReduce / step"), ("reason", "straggler because"), ("open", "pages")]


TEXT_COLUMNS = ("status", "reason", "open")


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/cluster", name="Cluster", layout=layout)


def layout(run_id=None, **_):
    return run_page(run_id, "cluster", _body)


def _rank_label(r) -> str:
    return f"rank {int(r)}"


def _body(run_id: str):
    rep = store().get(run_id, "cluster", cluster_report)
    s = rep.ranks
    shown = s[s["steps_compared"] > 0]
    labels = [_rank_label(r) for r in shown["rank"]]

    bars = go.Figure()
    for col, label, color in PARTS:
        bars.add_bar(x=labels, y=shown[col], name=label, marker_color=color)
    bars.update_layout(barmode="stack", yaxis_title="ms per step (average)", height=360, clickmode="event",
                       margin=dict(l=50, r=20, t=30, b=40), legend=dict(orientation="h"))
    flagged = shown[shown["straggler"]]
    for r in flagged["rank"]:
        bars.add_annotation(x=_rank_label(r), y=float(shown.loc[shown["rank"] == r, "step_time_ms"].iloc[0]),
                            text="straggler", showarrow=True, arrowhead=2, font=dict(color="#d00000"))

    comm = go.Figure()
    comm.add_bar(x=labels, y=shown["comm_ms"] - shown["comm_alone_ms"], name="Communication overlapped with compute",
                 marker_color="#2a9d8f")
    comm.add_bar(x=labels, y=shown["comm_alone_ms"], name="Communication alone", marker_color="#ff006e",
                 text=[f"{v:.1f}% overlap" if v == v else "" for v in shown["overlap_pct"]], textposition="outside")
    comm.update_layout(barmode="stack", yaxis_title="ms per step (average)", height=320,
                       margin=dict(l=50, r=20, t=30, b=40), legend=dict(orientation="h"))

    rows = []
    for rec in s.to_dict("records"):
        row = {k: rec.get(k) for k, _ in COLUMNS if k != "open"}
        for k in ("step_time_ms", "iteration_interval_ms", "fp_bp_ms", "tail_ms", "comm_ms", "comm_alone_ms",
                  "overlap_pct", "allreduce_per_step"):
            v = row[k]
            row[k] = None if v != v else round(float(v), 3)
        row["open"] = f'<a href="/run/{quote(run_id)}/overview?rank={int(rec["rank"])}">overview</a> · ' \
                      f'<a href="/run/{quote(run_id)}/timeline?rank={int(rec["rank"])}">timeline</a>'
        row["id"] = str(int(rec["rank"]))
        row["reason"] = row.get("reason") or ""
        rows.append(row)
    red = {"styleConditions": [{"condition": "params.value && params.value !== 'ok'",
                                "style": {"color": "#d00000", "fontWeight": 600}}]}
    columns = [num_col(k, n, "count" if k in ("rank", "steps") else "ms") if k not in TEXT_COLUMNS else
               text_col(k, n, **({"cellStyle": red} if k in ("reason", "status") else {}),
                        **({"cellRenderer": "markdown", "filter": False, "sortable": False} if k == "open" else {}))
               for k, n in COLUMNS]
    table = data_grid("cluster-ranks", columns, rows, page_size=None, csv="cluster-ranks")

    stragglers = html.Ul([html.Li([html.B(f"rank {int(r.rank)}"), f" — {r.reason}"], className="advice-warning")
                          for r in rep.stragglers.itertuples()]
                         or [html.Li("No straggler: every rank is within "
                                     f"{rep.margin * 100:.0f}% (or {rep.min_excess_ms:g} ms) of the median.")],
                         id="cluster-stragglers")
    problems = html.Div([html.H4("Ranks with problems"), html.Ul([html.Li(p) for p in rep.problems])],
                        className="panel error-message", id="cluster-problems") if rep.problems else None
    b = rep.buckets
    brows = grid_records(b.assign(mean_ms=b["mean_ms"].round(4))) if len(b) else []
    buckets = data_grid("cluster-buckets", [num_col("rank", "Rank", "count"), text_col("name", "Task"),
                                            text_col("bucket", "Bucket"), num_col("count", "Calls", "count"),
                                            num_col("bytes", "Bytes", "bytes"), num_col("mean_ms", "Mean (ms)", "ms4")],
                        brows, page_size=20, csv="allreduce-buckets")
    ok = s[s["status"] == "ok"]
    cards = html.Div([
        stat_card("Ranks", f"{len(ok)} of {len(s)} ok", "stat-ranks", f"group size {rep.group_size}"),
        stat_card("Slowest step", fmt_ms(shown["step_time_ms"].max()) if len(shown) else "—", "stat-slowest-step"),
        stat_card("Stragglers", str(int(s["straggler"].sum())), "stat-stragglers",
                  f"> median + {rep.margin * 100:.0f}%"),
        stat_card("Overlap", f"{shown['overlap_pct'].mean():.1f} %" if shown["overlap_pct"].notna().any() else "—",
                  "stat-overlap", "mean over ranks (HTA: compute during comm / comm)"),
    ], className="cards")
    return html.Div([
        dcc.Location(id="cluster-nav", refresh=True), dcc.Store(id="cluster-run", data=run_id),
        html.H2(f"Cluster: {len(s)} ranks"), cards, problems,
        html.H4("Step trace per rank (click a rank to open its pages)"), graph("cluster-steps", bars),
        html.H4("Stragglers"), stragglers,
        html.H4("Communication per rank"), graph("cluster-comm", comm),
        html.H4("Ranks"), table,
        html.H4("AllReduce buckets"), buckets,
        html.P(f"Averages exclude each rank's first step; ranks are compared over the {rep.common_steps} steps "
               "they all recorded.", className="muted"),
    ])


def register_callbacks(app):
    @app.callback(Output("cluster-nav", "href"), Input("cluster-steps", "clickData"),
                  Input("cluster-comm", "clickData"), State("cluster-run", "data"), prevent_initial_call=True)
    def _open_rank(click_steps, click_comm, run_id):
        click = dash.ctx.triggered[0]["value"] if dash.ctx.triggered else None
        try:  # the bars' x labels are "rank <r>"
            rank = int(str(click["points"][0]["x"]).rsplit(" ", 1)[-1])
        except (TypeError, KeyError, IndexError, ValueError):
            return dash.no_update
        return f"/run/{quote(run_id)}/overview?rank={rank}"
