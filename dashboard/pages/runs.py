"""Runs: every run under --summary-base-dir, searchable; picks up new runs while the server runs.

A run that cannot be read is a row with its error (``RunStore.entries``): one broken run never blanks the
listing. The Run column links each run's overview; the link is raw HTML in the table's markdown, because the
table's markdown renderer re-encodes the percent escapes of a markdown link (a run named ``lr=0.1`` or
``a#b`` would be linked as ``lr%253D0.1``).
"""
from __future__ import annotations

import html
import re

import dash
from dash import Input, Output, dash_table, dcc, html as H

from dashboard.components import run_href
from dashboard.data import Entry, store
from insight import analysis
from insight.trace import TraceError

_MD_SPECIAL = re.compile(r"([\\`*_\[\]~!])")  # inline markdown inside the link text


def register():
    dash.register_page(__name__, path="/", name="Runs", title="Insight — runs", layout=layout)


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


def layout(**_):
    return H.Div([
        H.H2("Runs"),
        H.P(f"Runs under {store().base_dir}", className="muted", id="base-dir"),
        dcc.Interval(id="runs-refresh", interval=max(1000, int(store().reload_interval * 1000))),
        dash_table.DataTable(
            id="runs-table",
            columns=[{"name": "Run", "id": "run", "presentation": "markdown"},
                     {"name": "Created (UTC)", "id": "created"}, {"name": "Steps", "id": "steps"},
                     {"name": "Avg step (ms)", "id": "avg_step_ms"}, {"name": "Device", "id": "device"},
                     {"name": "Status", "id": "status"}],
            data=rows(), filter_action="native", sort_action="native", page_size=20,
            style_cell={"textAlign": "left", "fontFamily": "inherit", "whiteSpace": "normal", "height": "auto",
                        "maxWidth": 520},
            markdown_options={"link_target": "_self", "html": True}),
    ])


def refresh(_):
    return rows()


def register_callbacks(app) -> None:
    app.callback(Output("runs-table", "data"), Input("runs-refresh", "n_intervals"),
                 prevent_initial_call=True)(refresh)
