"""Runs: every run under --summary-base-dir, searchable; picks up new runs while the server runs."""
from __future__ import annotations

import dash
from dash import Input, Output, callback, dash_table, dcc, html

from dashboard.components import run_href
from dashboard.data import store
from insight import analysis
from insight.trace import TraceError


def register():
    dash.register_page(__name__, path="/", name="Runs", title="Insight — runs", layout=layout)


def _row(run_id: str) -> dict:
    st = store()
    try:
        m = st.manifest(run_id)
    except TraceError as e:
        return {"run": f"[{run_id}](<{run_href(run_id)}>)", "created": "", "steps": None, "avg_step_ms": None,
                "device": "", "status": f"error: {e}"}
    row = {"run": f"[{run_id}](<{run_href(run_id)}>)", "created": str(m.get("created", ""))[:19].replace("T", " "),
           "steps": m.get("step_count"), "avg_step_ms": None,
           "device": (m.get("device") or {}).get("target", ""), "status": m.get("status", "")}
    try:
        s = st.get(run_id, "step_summary", analysis.step_summary)
        row["avg_step_ms"] = round(s.step_time_ms, 3) if s.steps else None
        row["steps"] = s.steps
    except TraceError as e:
        row["status"] = f"error: {e}"
    return row


def layout(**_):
    return html.Div([
        html.H2("Runs"),
        html.P(f"Runs under {store().base_dir}", className="muted", id="base-dir"),
        dcc.Interval(id="runs-refresh", interval=max(1000, int(store().reload_interval * 1000))),
        dash_table.DataTable(
            id="runs-table",
            columns=[{"name": "Run", "id": "run", "presentation": "markdown"},
                     {"name": "Created (UTC)", "id": "created"}, {"name": "Steps", "id": "steps"},
                     {"name": "Avg step (ms)", "id": "avg_step_ms"}, {"name": "Device", "id": "device"},
                     {"name": "Status", "id": "status"}],
            data=[_row(r) for r in store().run_ids()],
            filter_action="native", sort_action="native", page_size=20,
            style_cell={"textAlign": "left", "fontFamily": "inherit"}, markdown_options={"link_target": "_self"}),
    ])


@callback(Output("runs-table", "data"), Input("runs-refresh", "n_intervals"), prevent_initial_call=True)
def _refresh(_):
    return [_row(r) for r in store().run_ids()]
