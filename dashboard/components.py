"""Shared pieces of every page: the run navigation, error and not-found panels, figure config."""
from __future__ import annotations

import traceback
from urllib.parse import quote, unquote

from dash import dcc, html

from dashboard.data import RunNotFound, store
from insight.analysis.pipeline import VERDICT_TEXT
from insight.trace import TraceError

RUN_PAGES = [("overview", "Overview"), ("operators", "Operators"), ("pipeline", "Data pipeline"),
             ("timeline", "Timeline"), ("memory", "Memory")]

# how every view words insight.analysis.data_pipeline's one verdict
PIPELINE_VERDICTS = VERDICT_TEXT

# every figure can be saved as PNG from its mode bar
GRAPH_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def graph(id_, figure=None, **kw):
    return dcc.Graph(id=id_, figure=figure or {}, config=GRAPH_CONFIG, **kw)


def run_nav(run_id: str, active: str):
    links = [dcc.Link(label, href=f"/run/{quote(run_id)}/{page}", id=f"nav-{page}",
                      className="nav-link active" if page == active else "nav-link")
             for page, label in RUN_PAGES]
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


def stat_card(label: str, value: str, id_: str | None = None, hint: str = ""):
    return html.Div([html.Div(label, className="stat-label"),
                     html.Div(value, className="stat-value", id=id_ or f"stat-{label.lower().replace(' ', '-')}"),
                     html.Div(hint, className="stat-hint") if hint else None], className="stat-card")


def run_href(run_id: str, page: str = "overview") -> str:
    return f"/run/{quote(run_id)}/{page}"
