"""Overview: the step breakdown per step (stacked bars; a click opens that step's timeline), the step-time
distribution (p50 / p90 / p99 / max) and the slowest steps with their dominant phase, per-step averages with
their shares of the step, the data pipeline's one verdict (``dashboard.components.verdict_panel``), advice,
top op types per step and the memory peak. For runs imported from torch.profiler / Chrome traces the step
breakdown is the TensorBoard plugin's (``insight.analysis.gpu``): Kernel / Memcpy / ... / Other per step, GPU
utilisation, kernel time by stream, top kernels and top CPU ops. ``?rank=N`` shows one rank of a multi-rank run.
"""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, dcc, html

from dashboard.components import (data_grid, fmt_ms, graph, grid_records, num_col, page_rank, rank_selector, run_href,
                                  run_page, share_ticks, stat_card, text_col, verdict_panel)
from dashboard.data import store
from insight import analysis
from insight.analysis import gpu

IMPORTED = ("kineto", "chrome")
GPU_COLORS = {"kernel": "#3a86ff", "memcpy": "#2a9d8f", "memset": "#8ecae6", "communication": "#ff006e",
              "runtime": "#f2a541", "dataloader": "#e76f51", "cpu_exec": "#8338ec", "other": "#adb5bd"}
SLOWEST = 8
PHASES = {"iteration_interval_ms": "iteration interval (data wait)", "fp_bp_ms": "forward + backward",
          "tail_ms": "tail (update)"}
PARTS = [("iteration_interval_ms", "Iteration interval (data wait)", "#f2a541"),
         ("fp_bp_ms", "Forward + backward", "#3a86ff"), ("tail_ms", "Tail (update)", "#8338ec"),
         ("allreduce_ms", "AllReduce", "#ff006e")]


def register():
    dash.register_page(__name__, path_template="/run/<run_id>/overview", name="Overview", layout=layout)


def layout(run_id=None, rank=None, **_):
    return run_page(run_id, "overview", lambda rid: _body(rid, page_rank(rid, rank)))


def distribution(times_ms: pd.Series) -> dict:
    """p50 / p90 / p99 / max of the step times (ms)."""
    v = np.asarray(times_ms, float)
    if not len(v):
        return {k: float("nan") for k in ("p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(v.max())}


def slowest_steps(bd: pd.DataFrame, n: int = SLOWEST) -> pd.DataFrame:
    """The ``n`` slowest steps with the phase that took most of each (and its share of the step)."""
    if not len(bd):
        return pd.DataFrame(columns=["step", "step_time_ms", "phase", "phase_ms", "phase_share"])
    top = bd.nlargest(n, "step_time_ms")
    parts = top[list(PHASES)]
    col = parts.idxmax(axis=1)
    phase_ms = parts.max(axis=1)
    return pd.DataFrame({"step": top["step"].astype(int), "step_time_ms": top["step_time_ms"],
                         "phase": col.map(PHASES), "phase_ms": phase_ms,
                         "phase_share": phase_ms / top["step_time_ms"].where(top["step_time_ms"] > 0)})


def _excluded(s) -> str:
    return f", step {s.excluded_steps[0]} excluded" if s.excluded_steps else ""


def _dist_cards(dist: dict, what: str):
    return [stat_card(f"Step {k}", fmt_ms(v), f"stat-step-{k}", what) for k, v in dist.items()]


def _breakdown_figure(bd: pd.DataFrame, parts, avg_ms: float | None, title: str) -> go.Figure:
    fig = go.Figure()
    for col, label, color in parts:
        if col in bd and (col != "allreduce_ms" or bd[col].sum() > 0):
            fig.add_bar(x=bd["step"], y=bd[col], name=label, marker_color=color,
                        hovertemplate=f"step %{{x}}<br>{label}: %{{y:.3f}} ms<extra>click: open the step's "
                                      f"timeline</extra>")
    if avg_ms is not None and avg_ms == avg_ms:
        fig.add_hline(y=avg_ms, line_dash="dot", annotation_text=f"average {avg_ms:.3f} ms")
    fig.update_layout(barmode="stack", xaxis_title="step (click a bar to open its timeline)", yaxis_title="ms",
                      height=380, margin=dict(l=50, r=20, t=70, b=40),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      title=title, bargap=0.1 if len(bd) < 100 else 0)
    return fig


def _slow_table(slow: pd.DataFrame, run_id: str, rank: int):
    """The slowest steps as a small plain table (a handful of rows: no grid to load), each linking its timeline."""
    head = html.Tr([html.Th(h) for h in ("Step", "Step (ms)", "Dominant phase", "Phase (ms)", "Share", "")])
    body = [html.Tr([html.Td(str(int(r.step)), className="num"), html.Td(f"{r.step_time_ms:.3f}", className="num"),
                     html.Td(r.phase), html.Td(f"{r.phase_ms:.3f}", className="num"),
                     html.Td(f"{r.phase_share * 100:.1f} %" if r.phase_share == r.phase_share else "—",
                             className="num"),
                     html.Td(dcc.Link("timeline", href=f"{run_href(run_id, 'timeline')}?step={int(r.step)}"
                                      + (f"&rank={rank}" if rank else "")))])
            for r in slow.itertuples()]
    return html.Table([html.Thead(head), html.Tbody(body)], className="simple-table", id="slowest-steps")


def _top_types_figure(types: pd.DataFrame, steps: int) -> go.Figure:
    """Top op types in ms per step (the cards' unit), with their share of op time."""
    top = types.head(10) if len(types) else types
    fig = go.Figure()
    n = max(int(steps), 1)
    if len(top):
        per = top["total_ms"] / n
        ops, shares = top["op"].astype(str).tolist()[::-1], top["share"].astype(float).tolist()[::-1]
        fig.add_bar(y=ops, x=per[::-1], orientation="h", marker_color="#3a86ff", customdata=shares,
                    hovertemplate="%{y}: %{x:.3f} ms per step (%{customdata:.1%} of op time)<extra></extra>")
        fig.update_yaxes(**share_ticks(ops, shares))
    fig.update_layout(height=320, margin=dict(l=170, r=20, t=40, b=40), xaxis_title="ms per step",
                      title="Top op types (ms per step, share of op time)")
    return fig


def _body(run_id: str, rank: int = 0):
    if store().manifest(run_id).get("source") in IMPORTED:
        return _imported_body(run_id, rank)
    ov = store().get(run_id, "overview", analysis.overview, rank)
    bd, s, types, pipe, peak, advice = ov.breakdown, ov.summary, ov.op_types, ov.pipeline, ov.memory_peak, ov.advice
    avg = analysis.steps.averaged_steps(bd)
    fig = _breakdown_figure(bd, PARTS, s.step_time_ms if s.steps else None, "Step breakdown per step")
    st = s.step_time_ms

    def share(v):
        return f"{v / st * 100:.1f} % of the step" if st and st == st and st > 0 and v == v else ""

    cards = html.Div([
        stat_card("Average step", fmt_ms(s.step_time_ms), "stat-avg-step",
                  f"over {s.steps_averaged} steps{_excluded(s)}"),
        stat_card("Iteration interval", fmt_ms(s.iteration_interval_ms), "stat-interval",
                  share(s.iteration_interval_ms) + " (per step)"),
        stat_card("Forward + backward", fmt_ms(s.fp_bp_ms), "stat-fpbp", share(s.fp_bp_ms) + " (per step)"),
        stat_card("Tail", fmt_ms(s.tail_ms), "stat-tail", share(s.tail_ms) + " (per step)"),
        stat_card("Device utilisation", f"{s.device_utilization * 100:.1f} %", "stat-util", "busy share of the step"),
        stat_card("Memory peak", f"{peak.peak_bytes / 2**20:.2f} MB", "stat-mem-peak",
                  f"{peak.share_of_capacity * 100:.2f} % of capacity" if peak.capacity else ""),
    ], className="cards")
    dist = html.Div(_dist_cards(distribution(avg["step_time_ms"]), f"of {len(avg)} steps{_excluded(s)}"),
                    className="cards", id="step-distribution")
    advice_box = html.Div([html.H4("Advice"), html.Ul(
        [html.Li([html.B(r.title), f" — {r.detail}"], className=f"advice-{r.severity}") for r in advice]
        or [html.Li("Nothing to flag.")], id="advice-list")], className="panel")
    markers = html.P(f"Forward starts at {s.fp_start_op or '—'}; backward ends at {s.bp_end_op or '—'}.",
                     className="muted", id="markers")
    slow = html.Div([html.H4("Slowest steps"), _slow_table(slowest_steps(avg), run_id, rank)], className="panel")
    return html.Div([dcc.Store(id="ov-run", data={"run": run_id, "rank": rank}),
                     rank_selector(run_id, "overview", rank), html.H2("Step breakdown"), cards, dist,
                     graph("step-breakdown", fig), markers,
                     html.Div([slow, graph("top-op-types", _top_types_figure(types, s.steps))], className="two-col"),
                     html.Div([advice_box, verdict_panel(pipe)], className="two-col")])


def _imported_body(run_id: str, rank: int):
    """The TensorBoard profiler plugin's overview for an imported GPU / host trace."""
    bd = store().get(run_id, "gpu_step_breakdown", gpu.gpu_step_breakdown, rank)
    s = store().get(run_id, "gpu_summary", gpu.gpu_summary, rank)
    parts = [(f"{c}_ms", gpu.LABELS[c], GPU_COLORS[c]) for c in gpu.CATEGORIES]
    fig = _breakdown_figure(bd, parts, s.step_time_ms if s.steps else None,
                            "Step breakdown per step (TensorBoard profiler categories)")
    shares = s.shares()
    cards = html.Div([
        stat_card("Average step", fmt_ms(s.step_time_ms), "stat-avg-step", f"over {s.steps} steps"),
        stat_card("GPU utilisation", "—" if s.gpu_utilization != s.gpu_utilization
                  else f"{s.gpu_utilization * 100:.1f} %", "stat-gpu-util",
                  "kernel busy time / step time" if s.streams else "no device streams in this trace"),
        *[stat_card(gpu.LABELS[c], fmt_ms(s.categories_ms[c]), f"stat-gpu-{c}",
                    f"{shares[c] * 100:.1f} % of the step (per step)" if shares[c] == shares[c] else "")
          for c in gpu.CATEGORIES if s.categories_ms[c] > 0],
    ], className="cards")
    dist = html.Div(_dist_cards(distribution(bd["step_time_ms"]), f"of {len(bd)} steps"), className="cards",
                    id="step-distribution")
    streams = store().get(run_id, "kernel_time_by_stream", gpu.kernel_time_by_stream, rank)
    kernels = store().get(run_id, "top_kernels", gpu.top_kernels, 20, "op", rank)
    cpu = store().get(run_id, "top_cpu_ops", gpu.top_cpu_ops, 20, rank)
    n = max(s.steps, 1)

    def rows(df, cols):
        return grid_records(df.reindex(columns=cols))

    def per_step(df):
        df = df.copy()
        df["ms_per_step"] = df["total_ms"] / n
        return df

    blocks = [html.Div([html.H4("Kernel time by stream"), data_grid("gpu-streams", [
        text_col("stream", "Stream"), num_col("kernels", "Kernels", "count"), num_col("total_ms", "Total (ms)"),
        num_col("share", "Share", "pct1")], rows(streams, ["stream", "kernels", "total_ms", "share"]),
        page_size=None)], className="panel")] if len(streams) else []
    if len(kernels):
        blocks.append(html.Div([html.H4("Top kernels"), data_grid("gpu-kernels", [
            text_col("op", "Kernel"), num_col("calls", "Calls", "count"), num_col("ms_per_step", "ms per step"),
            num_col("total_ms", "Total (ms)"), num_col("share", "Share", "pct1")],
            rows(per_step(kernels), ["op", "calls", "ms_per_step", "total_ms", "share"]), page_size=10)],
            className="panel"))
    if len(cpu):
        blocks.append(html.Div([html.H4("Top CPU ops"), data_grid("gpu-cpu-ops", [
            text_col("name", "CPU op"), num_col("calls", "Calls", "count"), num_col("ms_per_step", "ms per step"),
            num_col("total_ms", "Total (ms)"), num_col("self_ms", "Self (ms)")],
            rows(per_step(cpu), ["name", "calls", "ms_per_step", "total_ms", "self_ms"]), page_size=10)],
            className="panel"))
    advice = store().get(run_id, "recommendations", analysis.recommendations, rank)
    advice_box = html.Div([html.H4("Advice"), html.Ul(
        [html.Li([html.B(r.title), f" — {r.detail}"], className=f"advice-{r.severity}") for r in advice]
        or [html.Li("Nothing to flag.")], id="advice-list")], className="panel")
    return html.Div([dcc.Store(id="ov-run", data={"run": run_id, "rank": rank}),
                     rank_selector(run_id, "overview", rank), html.H2("Step breakdown"), cards, dist,
                     graph("step-breakdown", fig), html.Div(blocks[:2], className="two-col"),
                     html.Div(blocks[2:] + [advice_box], className="two-col")])


# A click on a step bar -> that step's timeline (``timeline?step=N``, the rank kept). In the browser: a server
# callback cost a request on every page load too (the graph sets its clickData when it is drawn).
STEP_LINK_JS = """function(click, where) {
    var nu = window.dash_clientside.no_update;
    if (!click || !click.points || !click.points.length || !where || typeof where.run !== 'string') { return nu; }
    var step = Number(click.points[0].x);
    if (!Number.isInteger(step)) { return nu; }
    return '/run/' + encodeURIComponent(where.run) + '/timeline?step=' + step
        + (Number.isInteger(where.rank) && where.rank ? '&rank=' + where.rank : '');
}"""


def register_callbacks(app) -> None:
    app.clientside_callback(STEP_LINK_JS, Output("_pages_location", "href", allow_duplicate=True),
                            Input("step-breakdown", "clickData"), dash.State("ov-run", "data"),
                            prevent_initial_call=True)
