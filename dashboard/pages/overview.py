"""Overview: the step breakdown per step (stacked), averages, advice, top op types, data-pipeline
verdict and memory peak."""
from __future__ import annotations

import dash
import plotly.graph_objects as go
from dash import html

from dashboard.components import fmt_ms, graph, run_page, stat_card
from dashboard.data import store
from insight import analysis

PARTS = [("iteration_interval_ms", "Iteration interval (data wait)", "#f2a541"),
         ("fp_bp_ms", "Forward + backward", "#3a86ff"), ("tail_ms", "Tail (update)", "#8338ec"),
         ("allreduce_ms", "AllReduce", "#ff006e")]


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/overview", name="Overview", layout=layout)


def layout(run_id=None, **_):
    return run_page(run_id, "overview", _body)


def _body(run_id: str):
    ov = store().get(run_id, "overview", analysis.overview)
    bd, s, types, pipe, peak, advice = ov.breakdown, ov.summary, ov.op_types, ov.pipeline, ov.memory_peak, ov.advice

    fig = go.Figure()
    for col, label, color in PARTS:
        if col in bd and (col != "allreduce_ms" or bd[col].sum() > 0):
            fig.add_bar(x=bd["step"], y=bd[col], name=label, marker_color=color)
    if s.steps:
        fig.add_hline(y=s.step_time_ms, line_dash="dot", annotation_text=f"average {s.step_time_ms:.3f} ms")
    fig.update_layout(barmode="stack", xaxis_title="step", yaxis_title="ms", height=360,
                      margin=dict(l=50, r=20, t=30, b=40), legend=dict(orientation="h"))

    top = types.head(10) if len(types) else types
    fig_ops = go.Figure()
    if len(top):
        fig_ops.add_bar(y=top["op"][::-1], x=top["total_ms"][::-1], orientation="h")
    fig_ops.update_layout(height=320, margin=dict(l=140, r=20, t=30, b=40), xaxis_title="total ms",
                          title="Top op types")

    cards = html.Div([
        stat_card("Average step", fmt_ms(s.step_time_ms), "stat-avg-step",
                  f"over {s.steps_averaged} steps" + (", step 1 excluded" if s.excluded_steps else "")),
        stat_card("Iteration interval", fmt_ms(s.iteration_interval_ms), "stat-interval"),
        stat_card("Forward + backward", fmt_ms(s.fp_bp_ms), "stat-fpbp"),
        stat_card("Tail", fmt_ms(s.tail_ms), "stat-tail"),
        stat_card("Device utilisation", f"{s.device_utilization * 100:.1f} %", "stat-util"),
        stat_card("Memory peak", f"{peak.peak_bytes / 2**20:.2f} MB", "stat-mem-peak",
                  f"{peak.share_of_capacity * 100:.2f} % of capacity" if peak.capacity else ""),
    ], className="cards")

    pipe_box = html.Div([html.H4("Data pipeline"),
                         html.P([html.B(pipe.verdict_text, id="pipeline-verdict"),
                                 f" — input-bound: {pipe.input_bound} "
                                 f"({pipe.input_share * 100:.1f} % of the step)" if pipe.input_share == pipe.input_share
                                 else ""]),
                         html.P(pipe.verdict_reason, className="muted", id="pipeline-verdict-reason"),
                         html.Ul([html.Li(a) for a in pipe.advice])], className="panel")
    advice_box = html.Div([html.H4("Advice"), html.Ul(
        [html.Li([html.B(r.title), f" — {r.detail}"], className=f"advice-{r.severity}") for r in advice]
        or [html.Li("Nothing to flag.")], id="advice-list")], className="panel")
    markers = html.P(f"Forward starts at {s.fp_start_op or '—'}; backward ends at {s.bp_end_op or '—'}.",
                     className="muted", id="markers")
    return html.Div([html.H2("Step breakdown"), cards, graph("step-breakdown", fig), markers,
                     html.Div([advice_box, pipe_box], className="two-col"), graph("top-op-types", fig_ops)])
