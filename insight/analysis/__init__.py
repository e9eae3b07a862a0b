"""Analyses of a profiled run: pure functions from a run (a path or an ``insight.trace.Run``) to pandas
DataFrames and small dataclasses. No printing, no global state: the dashboard, the CLI and the exports
all call these. A run that cannot be read raises ``insight.trace.TraceError`` naming the run and file.

One module per analyzer: ``steps`` (step trace), ``ops`` (operator tables), ``pipeline`` (data
pipeline and input-bound classes), ``memory`` (timeline and peak), ``advice`` (recommendations),
``compare`` (two runs).
"""
from insight.analysis.advice import Recommendation, advise, recommendations
from insight.analysis.compare import RunComparison, compare_runs
from insight.analysis.memory import (Lifetimes, MemoryPeak, in_use_at, live_at, memory_intervals, memory_peak,
                                     memory_sources, memory_timeline, memory_usage)
from insight.analysis.overview import Overview, overview
from insight.analysis.ops import op_stats, op_time_per_step, op_type_stats, top_n
from insight.analysis.pipeline import (PipelineReport, data_pipeline, input_bound_class, pipeline_per_step,
                                       queue_depths)
from insight.analysis.steps import StepSummary, step_breakdown, step_summary, step_times, summarize

__all__ = ["step_breakdown", "step_summary", "step_times", "StepSummary", "op_stats", "op_type_stats", "op_time_per_step", "top_n",
           "data_pipeline", "PipelineReport", "input_bound_class", "memory_timeline", "memory_peak", "MemoryPeak",
           "memory_usage", "memory_sources", "memory_intervals", "Lifetimes", "live_at", "in_use_at",
           "recommendations", "advise", "Recommendation", "summarize", "compare_runs", "RunComparison", "overview", "Overview"]
from insight.analysis.timeline import (LaneView, TimelineData, TimelineWindow, load_timeline, task_details,
                                       timeline_window)
__all__ += ["load_timeline", "timeline_window", "task_details", "TimelineData", "TimelineWindow", "LaneView",
            "queue_depths", "pipeline_per_step"]
from insight.analysis import gpu  # noqa: E402  (the GPU-trace analyses of imported runs)
__all__ += ["gpu"]
