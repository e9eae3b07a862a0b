"""Operators: MindInsight's operator-performance page / torch.profiler's operator view.

* a top-N bar chart of op types or ops (N selectable; the rest folded into one "(other)" bar, so the bars add
  up to the whole), the cards following the "count" choice (all tasks / kernels only; for imported runs
  CPU ops / kernels / all),
* FLOPs come from each primitive's cost model (shapes, not counters): the columns say "Est. FLOPs" and
  "Est. FLOP/s";
* the per-op-type table and the per-op table (native sort and per-column filter, a fuzzy search box,
  page sizes 10/20/50), numbers kept numeric so they sort as numbers and shown in human units,
* the time (and calls) per step of the op or op type selected by clicking a table row or a bar.

Everything comes from ``insight.analysis`` (``op_stats``, ``op_type_stats``, ``top_n``,
``op_time_per_step``) through the RunStore cache.
"""
from __future__ import annotations

import re

import dash
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, Patch, State, ctx, dcc, html

from dashboard.components import (data_grid, fmt_ms, graph, grid_records, grid_tools, num_col, page_rank, rank_selector,
                                  register_grid, run_page, share_ticks, stat_card, store_where, text_col)
from dashboard.data import RunNotFound, store
from insight import analysis
from insight.trace import TraceError

PAGE_SIZES = (10, 20, 50)
TOP_N_CHOICES = (5, 10, 20, 50)
KINDS = {"all": None, "kernel": ("kernel",), "cpu": ("cpu_op",)}
IMPORTED = ("kineto", "chrome")  # manifest "source" of runs made by `insight import`
ROW_SEP = "\x1f"  # between graph and op name in an op row's id (split at the first: graph names are plain)

# -- columns (the data stays numeric: typed numeric filters such as "> 100" and native sort work) -------------
STAT_COLUMNS = [num_col("calls", "Calls", "count"), num_col("total_ms", "Total (ms)"), num_col("avg_ms", "Avg (ms)"),
                num_col("min_ms", "Min (ms)"), num_col("max_ms", "Max (ms)"), num_col("share", "Share", "pct"),
                num_col("flops", "Est. FLOPs", "si"), num_col("flop_per_s", "Est. FLOP/s", "si"),
                text_col("shapes", "Shapes"), text_col("dtypes", "Dtype", minWidth=80),
                text_col("stream", "Stream", minWidth=90), text_col("scope", "Scope"),
                text_col("fused_ops", "Fused ops")]
TYPE_COLUMNS = [text_col("op", "Op type", pinned="left", minWidth=150), num_col("ops", "Ops", "count")] + STAT_COLUMNS
OP_COLUMNS = [text_col("name", "Op name", pinned="left", minWidth=180), text_col("op", "Type"),
              text_col("graph", "Graph", minWidth=90)] + STAT_COLUMNS
SEARCHED_NAMES = ("name", "op")  # fuzzy (subsequence) matched
SEARCHED = ("scope", "shapes", "dtypes", "stream", "fused_ops", "graph")  # substring matched


HALF = {"flex": "1 1 0", "minWidth": 0}


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/operators", name="Operators", layout=layout)


def layout(run_id=None, rank=None, **_):
    return run_page(run_id, "operators", lambda rid: _body(rid, page_rank(rid, rank)))


# -- data ---------------------------------------------------------------------------------------------------
def _kinds(choice) -> tuple | None:
    return KINDS.get(choice if isinstance(choice, str) and choice in KINDS else "all")


def _choice(value, allowed, default):
    """A callback input from the browser (which a client can forge): one of ``allowed``, else ``default``."""
    try:
        return value if value in allowed else default
    except TypeError:  # unhashable
        return default


def _count(value, default: int, most: int) -> int:
    """A positive count from the browser, at most ``most``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value:
        return default
    return int(min(most, max(1, value)))


MAX_QUERY = 200  # characters of a search query


def type_table(run_id: str, kinds=None, rank: int = 0) -> pd.DataFrame:
    return store().get(run_id, "op_type_stats", analysis.op_type_stats, kinds, None, rank)


def op_table(run_id: str, kinds=None, rank: int = 0) -> pd.DataFrame:
    return store().get(run_id, "op_stats", analysis.op_stats, kinds, None, rank)


def _at(where, kinds) -> tuple:
    """(run id, kinds, rank): the arguments of type_table / op_table for the page store's value."""
    run_id, rank = store_where(where)
    return run_id, kinds, rank


def _records(df: pd.DataFrame, columns: list[dict], ids: list[str]) -> list[dict]:
    out = df.reindex(columns=[c["field"] for c in columns]).astype(object)
    out = out.where(out.notna() & ~out.isin([np.inf, -np.inf]), None)
    for c in ("flops", "flop_per_s"):  # ops without a cost estimate (copies, GetNext): unknown, not 0
        if c in out:
            out[c] = out[c].where(df[c].fillna(0).to_numpy() > 0, None)
    return grid_records(out, list(ids))


def type_rows(types: pd.DataFrame) -> list[dict]:
    return _records(types, TYPE_COLUMNS, [str(v) for v in types["op"]])


def op_rows(ops: pd.DataFrame) -> list[dict]:
    return _records(ops, OP_COLUMNS, [f"{g}{ROW_SEP}{n}" for g, n in zip(ops["graph"], ops["name"])])


# -- fuzzy search -------------------------------------------------------------------------------------------
def fuzzy_match(query: str, names, others=()) -> bool:
    """Every whitespace-separated term of ``query`` (case-insensitive) is a substring of one of the fields
    or a subsequence of one of the ``names`` (``cgi`` finds ``conv2d_grad_input``)."""
    terms = [t for t in re.split(r"\s+", str(query or "")[:MAX_QUERY].lower()) if t]
    short = [str(f or "").lower() for f in names]
    texts = short + [str(f or "").lower() for f in others]
    for t in terms:
        if any(t in s for s in texts):
            continue
        if not any(_subsequence(t, s) for s in short):
            return False
    return True


def _subsequence(term: str, text: str) -> bool:
    it = iter(text)
    return all(ch in it for ch in term)


def search_rows(rows: list[dict], query: str | None) -> list[dict]:
    if not (query or "").strip():
        return rows
    return [r for r in rows if fuzzy_match(query, [r.get(k) for k in SEARCHED_NAMES], [r.get(k) for k in SEARCHED])]


# -- figures ------------------------------------------------------------------------------------------------
def top_figure(types: pd.DataFrame, ops: pd.DataFrame, by: str = "op", n: int = 10) -> go.Figure:
    """The top ``n`` op types (or ops) by total time as horizontal bars, the rest as one "(other)" bar."""
    table, label = (types, "op") if by == "op" else (ops, "name")
    fig = go.Figure()
    what = "op types" if by == "op" else "ops"
    if len(table):
        top = analysis.top_n(table, n=n, by="total_ms", other=True, label_column=label)
        labels = top[label].astype(str).tolist()
        share = top["share"].astype(float).fillna(0.0).tolist()
        calls = top["calls"].fillna(0).astype(int).tolist()
        custom = list(zip(share, calls))
        colors = ["#adb5bd" if lab == "(other)" else "#3a86ff" for lab in labels]
        fig.add_bar(y=labels[::-1], x=top["total_ms"][::-1], orientation="h", customdata=custom[::-1],
                    marker_color=colors[::-1],
                    hovertemplate="%{y}<br>%{x:.3f} ms (%{customdata[0]:.1%})<br>%{customdata[1]} calls"
                                  "<extra></extra>")
        fig.update_layout(xaxis_title="total ms", yaxis=dict(automargin=True, **share_ticks(labels[::-1], share[::-1])))
    else:
        fig.add_annotation(text="No operator data in this run", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper")
    rows = min(n + 1, len(table) or 1)
    fig.update_layout(title=f"Top {n} {what} by total time", height=max(320, 24 * rows + 120),
                      margin=dict(l=20, r=20, t=50, b=40))
    return fig


def per_step_figure(per: pd.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    if len(per):
        custom = np.stack([per["calls"], per["avg_ms"]], axis=-1)
        hover = "step %{x}<br>%{y:.3f} ms in %{customdata[0]} calls (avg %{customdata[1]:.3f} ms)<extra></extra>"
        if len(per) <= MANY_STEPS:
            fig.add_bar(x=per["step"], y=per["total_ms"], name="time (ms)", marker_color="#3a86ff",
                        customdata=custom, hovertemplate=hover)
        else:  # hundreds of steps: a line with markers, the y axis fitted to the bulk (p99), outliers pinned on top
            y = per["total_ms"].to_numpy(float)
            top = float(np.percentile(y, 99)) * 1.25 or float(y.max()) or 1.0
            fig.add_scatter(x=per["step"], y=y, name="time (ms)", mode="lines+markers", line=dict(color="#3a86ff",
                            width=1), marker=dict(size=3), customdata=custom, hovertemplate=hover)
            out = y > top
            if out.any():
                fig.add_scatter(x=per["step"][out], y=np.full(int(out.sum()), top * 0.98), mode="markers",
                                name="above the axis", marker=dict(symbol="triangle-up", size=9, color="#e63946"),
                                customdata=np.stack([y[out], per["calls"][out]], axis=-1),
                                hovertemplate="step %{x}<br>%{customdata[0]:.3f} ms (off the axis)<extra></extra>")
            fig.update_yaxes(range=[0, top])
        if per["calls"].nunique() > 1:  # dynamic shapes / control flow: calls per step vary
            fig.add_scatter(x=per["step"], y=per["calls"], name="calls", yaxis="y2", mode="lines+markers",
                            line=dict(color="#8338ec", dash="dot"), marker=dict(size=4))
            fig.update_layout(yaxis2=dict(title="calls", overlaying="y", side="right", rangemode="tozero",
                                          showgrid=False, tickformat="d"))
        else:
            title += f"<br><sup>{int(per['calls'].iloc[0])} call(s) in each of {len(per)} steps</sup>"
        mean = float(per["total_ms"].mean())
        fig.add_hline(y=mean, line_dash="dot", line_color="#666", annotation_text=f"mean {mean:.3f} ms")
    else:
        fig.add_annotation(text="No calls of this op in any step", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="ms", height=340, legend=dict(orientation="h"),
                      margin=dict(l=50, r=50, t=50, b=40))
    return fig


MANY_STEPS = 120  # more steps than this: a line instead of bars


def selection_figure(run_id: str, sel: dict | None, rank: int = 0) -> go.Figure:
    if not isinstance(sel, dict) or sel.get("by") not in ("op", "name") or not isinstance(sel.get("name"), str):
        return per_step_figure(pd.DataFrame(), "Select an op or op type to see its time per step")
    by, name = sel["by"], sel["name"][:1000]
    per = store().get(run_id, f"op_time_per_step:{by}", analysis.op_time_per_step, name, by, rank)
    what = f"op type {name}" if by == "op" else f"op {name}" + (f" ({sel['op']})" if sel.get("op") else "")
    return per_step_figure(per, f"Time per step of {what}")


def _default_selection(ops: pd.DataFrame) -> dict | None:
    if not len(ops):
        return None
    r = ops.iloc[0]
    return {"by": "name", "name": str(r["name"]), "op": str(r["op"])}


# -- the page -----------------------------------------------------------------------------------------------
def _table_block(prefix: str, title: str, table_id: str, columns, rows, hint: str):
    return html.Div([
        html.Div([
            html.H3(title, style={"margin": "4px 12px 4px 0"}),
            dcc.Input(id=f"{prefix}-search", type="search", debounce=True, placeholder="Fuzzy search: name, type, "
                      "scope, shape…", style={"width": 300}),
            html.Span("Rows per page", className="muted", style={"marginLeft": 16}),
            dcc.Dropdown(id=f"{prefix}-page-size", options=[{"label": str(p), "value": p} for p in PAGE_SIZES],
                         value=PAGE_SIZES[0], clearable=False, searchable=False, style={"width": 80}),
            *grid_tools(table_id, rows),
        ], style={"display": "flex", "alignItems": "center", "gap": 8, "flexWrap": "wrap"}),
        html.P(hint, className="muted", style={"margin": "2px 0 6px"}),
        data_grid(table_id, columns, rows, page_size=PAGE_SIZES[0], csv=table_id),
    ], className="panel", style={"marginTop": 12})


def kind_options(run_id: str) -> list[dict]:
    """What the "count" choice offers: imported GPU traces have CPU ops and kernels, our runs tasks and kernels."""
    if store().manifest(run_id).get("source") in IMPORTED:
        return [{"label": " all", "value": "all"}, {"label": " CPU ops", "value": "cpu"},
                {"label": " kernels", "value": "kernel"}]
    return [{"label": " all tasks", "value": "all"}, {"label": " kernels only", "value": "kernel"}]


def cards(types: pd.DataFrame, ops: pd.DataFrame, kinds: str = "all") -> list:
    """The summary cards over what the "count" choice selects (the same rows as the tables)."""
    total_ms = float(types["total_ms"].sum()) if len(types) else 0.0
    top = types.iloc[0] if len(types) else None
    what = {"all": "all tasks except event record/wait", "kernel": "kernels only", "cpu": "CPU ops only"}[kinds]
    return [
        stat_card("Total op time", fmt_ms(total_ms), "ops-total-ms", what),
        stat_card("Top op type", str(top["op"]) if top is not None else "—", "ops-top-type",
                  f"{fmt_ms(top['total_ms'])}, {top['share'] * 100:.1f} % of op time" if top is not None else ""),
        stat_card("Top op type total", fmt_ms(top["total_ms"]) if top is not None else "—", "ops-top-type-ms"),
        stat_card("Op types", str(len(types)), "ops-n-types"),
        stat_card("Ops", str(len(ops)), "ops-n-ops", f"{int(ops['calls'].sum()) if len(ops) else 0} calls"),
    ]


def _body(run_id: str, rank: int = 0):
    options = kind_options(run_id)
    kinds = options[0]["value"]
    types = type_table(run_id, _kinds(kinds), rank)
    ops = op_table(run_id, _kinds(kinds), rank)
    sel = _default_selection(ops)
    controls = html.Div([
        html.Span("Count", className="muted"),
        dcc.RadioItems(id="ops-kinds", options=options, value=kinds, inline=True, inputStyle={"marginLeft": 10}),
        html.Span("Chart of", className="muted", style={"marginLeft": 24}),
        dcc.RadioItems(id="ops-top-by", options=[{"label": " op types", "value": "op"},
                                                 {"label": " ops", "value": "name"}],
                       value="op", inline=True, inputStyle={"marginLeft": 10}),
        html.Span("N", className="muted", style={"marginLeft": 16}),
        dcc.Dropdown(id="ops-top-n", options=[{"label": str(n), "value": n} for n in TOP_N_CHOICES], value=20,
                     clearable=False, searchable=False, style={"width": 80}),
    ], style={"display": "flex", "alignItems": "center", "gap": 6, "flexWrap": "wrap"})
    return html.Div([
        dcc.Store(id="ops-run", data=run_id if not rank else {"run": run_id, "rank": rank}),
        rank_selector(run_id, "operators", rank),
        dcc.Store(id="op-selection", data=sel),
        html.H2("Operators"),
        html.Div(cards(types, ops, kinds), className="cards", id="ops-cards"),
        controls,
        html.Div([html.Div(graph("ops-top-chart", top_figure(types, ops, "op", 20)), style=HALF),
                  html.Div(graph("op-per-step", selection_figure(run_id, sel, rank)), style=HALF, className="panel",
                           id="op-per-step-panel")], className="two-col", style={"alignItems": "flex-start"}),
        _table_block("op-type", "Op types", "op-type-table", TYPE_COLUMNS, type_rows(types),
                     "Click a row to see that op type's time per step. Column filters: numbers keep the rows "
                     "greater than the value typed (other comparisons in the column menu); text matches "
                     "case-insensitively."),
        _table_block("op", "Ops", "op-table", OP_COLUMNS, op_rows(ops),
                     "One row per op (graph node); click a row to see its time per step."),
    ])


# -- callbacks (module level; the run id comes from the page's store) ---------------------------------------
def _safe(run_id, fn, fallback):
    try:
        return fn()
    except (RunNotFound, TraceError):
        return fallback


def filter_types(query, kinds, where):
    rows = _safe(where, lambda: type_rows(type_table(*_at(where, _kinds(kinds)))), [])
    return search_rows(rows, query if isinstance(query, str) else "")


def filter_ops(query, kinds, where):
    rows = _safe(where, lambda: op_rows(op_table(*_at(where, _kinds(kinds)))), [])
    return search_rows(rows, query if isinstance(query, str) else "")


def update_cards(kinds, where):
    k = _choice(kinds, tuple(KINDS), "all")
    return _safe(where, lambda: cards(type_table(*_at(where, _kinds(k))), op_table(*_at(where, _kinds(k))), k), [])


def type_page_size(size):
    return _choice(size, PAGE_SIZES, PAGE_SIZES[0]), 0


def op_page_size(size):
    return _choice(size, PAGE_SIZES, PAGE_SIZES[0]), 0


def _grid_page_size(fn):
    """A page-size choice as a patch of the grid's options (and back to its first page)."""
    def cb(size):
        n, _ = fn(size)
        patch = Patch()
        patch["paginationPageSize"] = n
        return patch, "first"
    return cb


def update_top_chart(n, by, kinds, where):
    k = _kinds(kinds)
    try:
        return top_figure(type_table(*_at(where, k)), op_table(*_at(where, k)), _choice(by, ("op", "name"), "op"),
                          _count(n, 20, max(TOP_N_CHOICES)))
    except (RunNotFound, TraceError) as e:
        return _message_figure(str(e) if isinstance(e, TraceError) else "no such run")


def _message_figure(text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(height=200, xaxis_visible=False, yaxis_visible=False)
    return fig


def select(type_cell, op_cell, click, top_by):
    return selection_from(ctx.triggered_id, type_cell, op_cell, click, top_by)


def selection_from(trigger, type_cell, op_cell, click, top_by) -> dict:
    """What a click selected: ``{"by": "op" | "name", "name": ...}`` (or no_update). A table click is the
    grid's ``cellClicked`` (``rowId``: an op type, or graph + ROW_SEP + op name)."""
    if trigger == "op-type-table" and isinstance(type_cell, dict) and type_cell.get("rowId") is not None:
        return {"by": "op", "name": str(type_cell["rowId"])}
    if trigger == "op-table" and isinstance(op_cell, dict) and op_cell.get("rowId") is not None:
        graph_, _, name = str(op_cell["rowId"]).partition(ROW_SEP)
        return {"by": "name", "name": name or graph_}
    if trigger == "ops-top-chart" and click and click.get("points"):
        p = click["points"][0]
        label = p.get("label", p.get("y"))
        if label is not None and label != "(other)":
            return {"by": "op" if (top_by or "op") == "op" else "name", "name": str(label)}
    return dash.no_update


def show_selection(sel, where):
    try:
        run_id, rank = store_where(where)
        return selection_figure(run_id, sel, rank)
    except (RunNotFound, TraceError) as e:
        return _message_figure(str(e) if isinstance(e, TraceError) else "no such run")


def register_callbacks(app) -> None:
    app.callback(Output("op-type-table", "rowData"), Input("op-type-search", "value"), Input("ops-kinds", "value"), State("ops-run", "data"),
                 prevent_initial_call=True)(filter_types)
    app.callback(Output("op-table", "rowData"), Input("op-search", "value"), Input("ops-kinds", "value"), State("ops-run", "data"),
                 prevent_initial_call=True)(filter_ops)
    app.callback(Output("ops-cards", "children"), Input("ops-kinds", "value"), State("ops-run", "data"),
                 prevent_initial_call=True)(update_cards)
    app.callback(Output("op-type-table", "dashGridOptions"), Output("op-type-table", "paginationGoTo"),
                 Input("op-type-page-size", "value"), prevent_initial_call=True)(_grid_page_size(type_page_size))
    app.callback(Output("op-table", "dashGridOptions"), Output("op-table", "paginationGoTo"),
                 Input("op-page-size", "value"), prevent_initial_call=True)(_grid_page_size(op_page_size))
    app.callback(Output("ops-top-chart", "figure"), Input("ops-top-n", "value"), Input("ops-top-by", "value"),
                 Input("ops-kinds", "value"), State("ops-run", "data"), prevent_initial_call=True)(update_top_chart)
    app.callback(Output("op-selection", "data"), Input("op-type-table", "cellClicked"),
                 Input("op-table", "cellClicked"), Input("ops-top-chart", "clickData"), State("ops-top-by", "value"),
                 prevent_initial_call=True)(select)
    app.callback(Output("op-per-step", "figure"), Input("op-selection", "data"), State("ops-run", "data"),
                 prevent_initial_call=True)(show_selection)
    for grid in ("op-type-table", "op-table"):
        register_grid(app, grid)
