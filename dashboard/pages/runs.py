"""Runs: every run under --summary-base-dir, searchable; picks up new runs while the server runs.

A run that cannot be read is a row with its error (``RunStore.entries``): one broken run never blanks the
listing. The Run column links each run's overview; the link is raw HTML in the table's markdown, because the
markdown renderer re-encodes the percent escapes of a markdown link (a run named ``lr=0.1`` or ``a#b`` would
be linked as ``lr%253D0.1``); the column filters and sorts on the plain name. Ticking two runs links their
comparison (``/compare?a=..&b=..``, the older one as A).
"""
from __future__ import annotations

import html
import re

import dash
from urllib.parse import urlencode

from dash import Input, Output, dcc, html as H

from dashboard.components import data_grid, grid_tools, link_col, num_col, register_grid, run_href, text_col
from dashboard.data import Entry, store
from insight import analysis
from insight.trace import TraceError

_MD_SPECIAL = re.compile(r"([\\`*_\[\]~!])")  # inline markdown inside the link text


def register():
    dash.register_page(__name__, path="/", name="Runs", title="Insight · runs", layout=layout)


def run_link(run_id: str) -> str:
    """The Run cell: an HTML link to the run's overview, the name escaped for HTML and markdown."""
    text = _MD_SPECIAL.sub(r"\\\1", html.escape(run_id, quote=False))
    return f'<a href="{html.escape(run_href(run_id), quote=True)}">{text}</a>'


def row(entry: Entry) -> dict:
    """One row of the table for a run, readable or not."""
    link = run_link(entry.id)
    if entry.error is not None:
        return {"run": link, "name": entry.id, "created": "", "steps": None, "avg_step_ms": None, "device": "",
                "status": f"error: {entry.error}"}
    m = entry.manifest
    row = {"run": link, "name": entry.id, "created": str(m.get("created", ""))[:19].replace("T", " "),
           "steps": m.get("step_count"), "avg_step_ms": None, "device": (m.get("device") or {}).get("target", ""),
           "status": m.get("status", "")}
    try:
        s = store().get(entry.id, "step_summary", analysis.step_summary)
        row["avg_step_ms"] = round(s.step_time_ms, 3) if s.steps else None
        row["steps"] = s.steps
    except (TraceError, LookupError) as e:
        row["status"] = f"error: {e}"
    return row


def rows() -> list[dict]:
    out = []
    for e in store().entries():
        try:
            out.append(row(e))
        except Exception as exc:  # noqa: BLE001 - one run never blanks the listing
            out.append({"run": run_link(e.id), "name": e.id, "created": "", "steps": None, "avg_step_ms": None,
                        "device": "", "status": f"error: {type(exc).__name__}: {str(exc)[:200]}"})
    return out


COLUMNS = [link_col("run", "Run", "name", minWidth=220),
           text_col("created", "Created (UTC)", minWidth=150), num_col("steps", "Steps", "count"),
           num_col("avg_step_ms", "Avg step (ms)", missing=""), text_col("device", "Device", minWidth=90),
           text_col("status", "Status", minWidth=160)]


def layout(**_):
    data = rows()
    return H.Div([
        H.H2("Runs"),
        H.P(f"Runs under {store().base_dir}", className="muted", id="base-dir"),
        dcc.Interval(id="runs-refresh", interval=max(1000, int(store().reload_interval * 1000))),
        H.Div([H.Span("Tick two runs to compare them:", className="muted"),
               dcc.Link("Compare the two selected runs", href="/compare", id="runs-compare",
                        className="button-link disabled"),
               H.Span("", id="runs-compare-hint", className="muted"), *grid_tools("runs-table", data)],
              className="toolbar"),
        data_grid("runs-table", COLUMNS, data, page_size=20, csv="runs", row_id="name",
                  dashGridOptions={"rowSelection": {"mode": "multiRow", "checkboxes": True, "headerCheckbox": False,
                                                    "enableClickSelection": False}}),
    ])


def refresh(_):
    return rows()


def compare_link(selected):
    """Two ticked runs -> the link comparing them (the older as A); otherwise a hint."""
    names = [r.get("name") for r in (selected or []) if isinstance(r, dict) and isinstance(r.get("name"), str)]
    if len(names) != 2:
        return "/compare", "button-link disabled", f"{len(names)} selected" if names else ""
    by_created = sorted(selected, key=lambda r: str(r.get("created") or ""))
    a, b = by_created[0]["name"], by_created[1]["name"]
    return "/compare?" + urlencode({"a": a, "b": b}), "button-link", f"{a} (A) vs {b} (B)"


def register_callbacks(app) -> None:
    app.callback(Output("runs-table", "rowData"), Input("runs-refresh", "n_intervals"),
                 prevent_initial_call=True)(refresh)
    app.callback(Output("runs-compare", "href"), Output("runs-compare", "className"),
                 Output("runs-compare-hint", "children"), Input("runs-table", "selectedRows"),
                 prevent_initial_call=True)(compare_link)  # the layout's link is compare_link(nothing ticked)
    register_grid(app, "runs-table")
