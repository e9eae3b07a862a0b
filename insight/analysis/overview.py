"""The overview of a run: every analysis its summary shows, each computed once over one loaded run."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from insight.analysis.advice import Recommendation, advise, has_device
from insight.analysis.memory import MemoryPeak, memory_peak
from insight.analysis.ops import op_type_stats
from insight.analysis.pipeline import PipelineReport, data_pipeline
from insight.analysis.steps import StepSummary, step_breakdown, summarize
from insight.trace import Run, as_run


@dataclass
class Overview:
    breakdown: pd.DataFrame        # step_breakdown
    summary: StepSummary
    op_types: pd.DataFrame         # op_type_stats
    pipeline: PipelineReport       # data_pipeline (its verdict is the one every view shows)
    memory_peak: MemoryPeak
    advice: list[Recommendation]


def overview(run: Run | str | os.PathLike, rank: int = 0) -> Overview:
    """The step breakdown is computed once and shared by the summary, the pipeline verdict and the advice."""
    run = as_run(run)

    def build() -> Overview:
        bd = step_breakdown(run, rank)
        s = summarize(bd)
        types = op_type_stats(run, rank=rank)
        pipe = data_pipeline(run, rank)
        peak = memory_peak(run, rank=rank)
        return Overview(bd, s, types, pipe, peak, advise(s, pipe, peak, types, device=has_device(run, rank)))

    return run.memo(("overview", rank), build)
