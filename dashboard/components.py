"""Shared pieces of every page: the run navigation, error and not-found panels, figure config."""
from __future__ import annotations

import json
import traceback
from urllib.parse import quote, unquote

import dash_ag_grid as dag
import numpy as np
import pandas as pd
from dash import Input, Output, dcc, html

from dashboard.data import RunNotFound, store
from insight.analysis.pipeline import VERDICT_TEXT
from insight.trace import TraceError

RUN_PAGES = [("overview", "Overview"), ("operators", "Operators"), ("pipeline", "Data pipeline"),
             ("timeline", "Timeline"), ("memory", "Memory")]
CLUSTER_PAGE = ("cluster", "Cluster")  # in the navigation of runs with several ranks

# how every view words insight.analysis.data_pipeline's one verdict
PIPELINE_VERDICTS = VERDICT_TEXT

# every figure can be saved as PNG from its mode bar
GRAPH_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def graph(id_, figure=None, **kw):
    return dcc.Graph(id=id_, figure=figure or {}, config=GRAPH_CONFIG, **kw)


def run_pages(run_id: str) -> list[tuple[str, str]]:
    """The pages of a run's navigation: the Cluster page too when the run has several ranks."""
    try:
        ranks = store().run(run_id).ranks
    except Exception:  # noqa: BLE001 - an unreadable run still gets its (error) pages
        ranks = [0]
    return RUN_PAGES + [CLUSTER_PAGE] if len(ranks) > 1 else list(RUN_PAGES)


def run_nav(run_id: str, active: str):
    links = [dcc.Link(label, href=f"/run/{quote(run_id)}/{page}", id=f"nav-{page}",
                      className="nav-link active" if page == active else "nav-link")
             for page, label in run_pages(run_id)]
    return html.Div([html.Span(run_id, className="run-name", id="current-run"), *links], className="run-nav")


def error_panel(message: str, title: str = "This run cannot be shown"):
    return html.Div([html.H3(title), html.P(message, id="error-message", className="error-message"),
                     dcc.Link("Back to all runs", href="/")], className="error-panel", id="error-panel")


def not_found(what: str):
    return html.Div([html.H2("Not found", id="not-found"), html.P(what, className="error-message"),
                     dcc.Link("Back to all runs", href="/")], className="error-panel")


def run_page(run_id: str | None, active: str, build):
    """Wrap a run page's body: unknown runs become a not-found page, unreadable ones an error panel,
    so one broken run never breaks the others (or the server)."""
    if not run_id:
        return not_found("No run was given.")
    run_id = unquote(run_id)  # Dash passes the raw URL segment
    try:
        store().path(run_id)
    except RunNotFound:
        if any(c in run_id for c in "/\\\x00") or run_id.startswith("."):
            return not_found("Run names are plain directory names inside --summary-base-dir; this one is not.")
        shown = run_id if len(run_id) <= 80 else run_id[:77] + "..."
        return not_found(f"There is no run named {shown!r} in {store().base_dir}.")
    try:
        body = build(run_id)
    except TraceError as e:
        body = error_panel(str(e))
    except Exception as e:  # noqa: BLE001 - a page must render something, never a 500
        body = error_panel(f"{type(e).__name__}: {e}", "Insight failed to analyse this run")
        traceback.print_exc()
    return html.Div([run_nav(run_id, active), body], className="run-page")


def fmt_ms(v) -> str:
    try:
        return f"{float(v):.3f} ms"
    except (TypeError, ValueError):
        return "—"


def share_ticks(labels: list, shares: list) -> dict:
    """A category axis whose labels carry each category's share ("conv2d  18.6%"), the categories themselves
    unchanged (a click still reports the label). Used instead of text on the bars: plotly measures and places
    every bar's text on each draw (15-35 ms of the Overview in the browser)."""
    return dict(tickmode="array", tickvals=list(labels), ticktext=[f"{lab}  {s:.1%}" for lab, s in zip(labels, shares)])


def stat_card(label: str, value: str, id_: str | None = None, hint: str = ""):
    return html.Div([html.Div(label, className="stat-label"),
                     html.Div(value, className="stat-value", id=id_ or f"stat-{label.lower().replace(' ', '-')}"),
                     html.Div(hint, className="stat-hint") if hint else None], className="stat-card")


def run_href(run_id: str, page: str = "overview") -> str:
    return f"/run/{quote(run_id)}/{page}"


# -- tables: one dash-ag-grid style for every page --------------------------------------------------------
# d3-format specs of numeric columns (dash-ag-grid evaluates these ``function`` strings with d3 in scope)
FORMATS = {"ms": ",.3f", "ms4": ",.4f", "count": ",d", "pct": ".2%", "pct1": ".1%", "num1": ",.1f", "si": ".3~s",
           "bytes": ",d", "signed_ms": "+,.3f", "ratio": ",.3f", "signed_pct": "+.1%"}
MAX_TABLE_WIDTH = 1600  # px: no table is wider than the window the pages are designed for


def num_col(field: str, name: str, fmt: str = "ms", suffix: str = "", missing: str = "\u2014", **kw) -> dict:
    """A numeric column: kept numeric (sorts and filters as numbers; the filter's default is "greater
    than", so typing 100 keeps the rows above 100), shown with a d3 format; missing values are ``missing``."""
    spec = FORMATS.get(fmt, fmt)
    return {"field": field, "headerName": name, "headerTooltip": name, "type": "rightAligned",
            "filter": "agNumberColumnFilter",
            "filterParams": {"defaultOption": "greaterThan", "buttons": ["reset"]},
            "valueFormatter": {"function": f"params.value == null ? '{missing}' : d3.format('{spec}')(params.value)"
                                           + (f" + '{suffix}'" if suffix else "")},
            "minWidth": 96, **kw}


def text_col(field: str, name: str, **kw) -> dict:
    """A text column: a case-insensitive "contains" filter, long values in a tooltip."""
    return {"field": field, "headerName": name, "headerTooltip": name, "filter": "agTextColumnFilter",
            "filterParams": {"defaultOption": "contains", "buttons": ["reset"]}, "tooltipField": field,
            "minWidth": 110, **kw}


def link_col(field: str, name: str, text_field: str, **kw) -> dict:
    """A column of HTML links (``<a href=...>``) filtered and sorted on ``text_field``'s plain text."""
    return text_col(field, name, cellRenderer="markdown", tooltipField=text_field,
                    filterValueGetter={"function": f"params.data.{text_field}"},
                    comparator={"function": "(a, b, na, nb) => String(na.data." + text_field + ").localeCompare("
                                            "String(nb.data." + text_field + "))"}, **kw)


def data_grid(id_: str, columns: list[dict], rows: list[dict], page_size: int | None = 10, csv: str | None = None,
              row_id: str | None = "id", **kw):
    """A dash-ag-grid table in the dashboard's one style: sortable, filterable columns (floating filters),
    columns sized to the window, pagination (``page_size`` rows; None: all rows), a row count that follows
    the filters (``#<id>-count``, set by assets/grid_count.js) and CSV export (``#<id>-csv``, see
    ``register_grid``). Headers are one line (the full name in a tooltip): wrapped headers with automatic
    heights made AG Grid measure every header cell's computed style, 0.45 s of the operators page's 1 s of grid
    script (Chrome's CPU profile)."""
    opts = {"tooltipShowDelay": 400, "enableCellTextSelection": True, "ensureDomOrder": True,
            "suppressColumnVirtualisation": True, "animateRows": False, "domLayout": "autoHeight",
            "suppressCellFocus": False, "rowSelection": {"mode": "singleRow", "checkboxes": False,
                                                          "enableClickSelection": True}}
    if page_size:
        opts.update(pagination=True, paginationPageSize=page_size, paginationPageSizeSelector=False)
    opts.update(kw.pop("dashGridOptions", {}))
    grid = dag.AgGrid(
        id=id_, columnDefs=columns, rowData=rows, columnSize="responsiveSizeToFit",
        defaultColDef={"sortable": True, "filter": True, "floatingFilter": True, "resizable": True,
                       "suppressHeaderMenuButton": False},
        dashGridOptions=opts, getRowId=f"params.data.{row_id}" if row_id else None,
        eventListeners={"modelUpdated": [f"insightRowCount(params, {json.dumps(id_)})"]},  # assets/grid_count.js
        csvExportParams={"fileName": f"{csv or id_}.csv"}, className="insight-grid",
        dangerously_allow_code=True, style={"width": "100%", "maxWidth": MAX_TABLE_WIDTH}, **kw)
    return grid


def _cell(v, fmt: str | None) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "\u2014"
    if fmt is None:
        return str(v)
    spec = FORMATS.get(fmt, fmt)
    try:
        return format(int(v) if spec.endswith("d") else float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def plain_table(id_: str, columns: list[tuple], rows: list[dict], csv: str | None = None, row_class=None):
    """A small fixed table as plain HTML in the grids' style (no grid bundle, nothing to filter): ``columns``
    are (field, header, format) with a ``FORMATS`` key or d3/Python spec for numbers (None: text); ``csv`` adds an
    "Export CSV" link of the same rows (``#<id>-csv``); ``row_class(row)`` names a row's CSS class."""
    head = html.Thead(html.Tr([html.Th(h, className="num" if f else None) for _, h, f in columns]))
    body = html.Tbody([html.Tr([html.Td(_cell(r.get(c), f), className="num" if f else None) for c, _, f in columns],
                               className=row_class(r) if row_class else None) for r in rows])
    table = html.Table([head, body], id=id_, className="simple-table")
    if not csv:
        return table
    frame = pd.DataFrame([{h: r.get(c) for c, h, _ in columns} for r in rows], columns=[h for _, h, _ in columns])
    href = "data:text/csv;charset=utf-8," + quote(frame.to_csv(index=False))
    return html.Div([table, html.A("Export CSV", href=href, download=f"{csv}.csv", id=f"{id_}-csv",
                                   className="grid-csv button-link")], className="toolbar-table")


def grid_records(df: pd.DataFrame, ids=None) -> list[dict]:
    """A frame's rows as a grid's ``rowData``: missing values as None, numpy scalars as Python values, and
    a row ``id`` (``ids``, or the row number)."""
    out = df.astype(object).where(df.notna(), None)
    rows = out.to_dict("records")
    for i, rec in enumerate(rows):
        for k, v in rec.items():
            if isinstance(v, np.generic):
                rec[k] = v.item()
        rec["id"] = str(i) if ids is None else ids[i]
    return rows


def grid_tools(id_: str, rows: list[dict]):
    """The row count (following search and column filters) and the CSV button of grid ``id_``."""
    return [html.Span(f"{len(rows)} rows", id=f"{id_}-count", className="muted grid-count"),
            html.Button("Export CSV", id=f"{id_}-csv", className="grid-csv", n_clicks=0)]


def register_grid(app, id_: str) -> None:
    """The browser-side callback of ``data_grid(id_)``'s CSV button: it exports the grid's filtered rows. (The
    row count follows the filters without a callback: assets/grid_count.js.)"""
    app.clientside_callback("function(n) { return n > 0; }", Output(id_, "exportDataAsCsv"),
                            Input(f"{id_}-csv", "n_clicks"), prevent_initial_call=True)


# -- the data pipeline's one verdict, worded and coloured the same on every page -------------------------------
VERDICT_CLASS = {"none": "verdict-ok", "unknown": "verdict-warn", "data_transfer": "verdict-warn",
                 "data_processing": "verdict-bad"}


def verdict_panel(rep, title: str = "Data pipeline", advice: bool = True):
    """``insight.analysis.data_pipeline``'s verdict with the input-bound class and share beside it (one
    component for Overview, Advice and Data pipeline: the same words and colours everywhere)."""
    share = rep.input_share
    bound = (f"input-bound: {rep.input_bound}" + (f" ({share * 100:.1f} % of the step waits for input)"
                                                   if share == share else ""))
    cls = VERDICT_CLASS.get(rep.verdict, "verdict-warn")
    if rep.verdict == "none" and rep.input_bound in ("moderately", "highly"):
        cls = "verdict-warn"  # the pipeline keeps up, yet the step still waits on input (host work, copies)
    return html.Div([
        html.H4(title) if title else None,
        html.P([html.Span(rep.verdict_text, id="pipeline-verdict", className=f"verdict {cls}"),
                html.Span(" — " + bound, id="pipeline-input-bound")]),
        html.P(rep.verdict_reason, className="muted", id="pipeline-verdict-reason"),
        html.Ul([html.Li(a) for a in rep.advice] or [html.Li("Nothing to flag.")], id="pipeline-advice")
        if advice else None,
    ], className="panel verdict-panel")


def page_rank(run_id: str, rank) -> int:
    """``?rank=`` of a per-run page: one of the run's ranks (a forged or stale value falls back to the first)."""
    ranks = store().run(run_id).ranks
    try:
        r = int(str(rank[0] if isinstance(rank, (list, tuple)) and rank else rank))
    except (TypeError, ValueError):
        return ranks[0] if ranks else 0
    return r if r in ranks else (ranks[0] if ranks else 0)


def rank_selector(run_id: str, page: str, rank: int):
    """Links to the same page of the run's other ranks (``?rank=N``); nothing for a single-rank run."""
    ranks = store().run(run_id).ranks
    if len(ranks) < 2:
        return None
    return html.Div([html.Span("Rank", className="muted")] + [
        dcc.Link(str(r), href=f"{run_href(run_id, page)}?rank={r}", id=f"rank-{r}",
                 className="nav-link active" if r == rank else "nav-link") for r in ranks],
        className="toolbar", id="rank-selector")


def store_where(value) -> tuple:
    """A page store's (run id, rank): a run id (rank 0) or ``{"run": id, "rank": r}``. It comes from the
    browser, so the rank is checked against the run's ranks (RunNotFound / TraceError for a bad run)."""
    if isinstance(value, dict):
        run_id = value.get("run")
        return run_id, page_rank(run_id, value.get("rank")) if isinstance(run_id, str) else 0
    return value, 0
