"""Recommendations: structured advice, each item citing the number and the threshold that triggered it.

Thresholds (profilers.md): MindInsight -- average iteration interval above 0.5 ms, host queue empty in
more than 30% of batches (the data pipeline's one verdict, ``data_pipeline(...).verdict``, noise floor 1%
of the steps), communication above 10% of the step; XProf -- input share 5% / 20%;
torch.profiler -- device utilisation under 50%, peak memory above 90% of capacity.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from insight.analysis.gpu import kernel_time_by_stream
from insight.analysis.memory import MemoryPeak, memory_peak
from insight.analysis.ops import op_type_stats
from insight.analysis.pipeline import (ALL_FULL, HOST_EMPTY_RATIO, INPUT_HIGH, INPUT_MODERATE, NOISE_FLOOR,
                                       VERDICT_TEXT, PipelineReport, data_pipeline)
from insight.analysis.steps import StepSummary, step_breakdown, summarize
from insight.trace import Run, as_run

ITERATION_INTERVAL_MS = 0.5
COMM_SHARE = 0.10
LOW_UTILIZATION = 0.50
PEAK_MEMORY_SHARE = 0.90
DOMINANT_OP_TYPE = 0.50
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class Recommendation:
    id: str
    severity: str      # critical | warning | info
    title: str
    detail: str
    metric: str
    value: float
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


IMPORTED_SOURCES = ("kineto", "chrome")  # manifest "source" of runs made by `insight import`


def has_device(run: Run | str | os.PathLike, rank: int = 0) -> bool:
    """Whether the run has a device to utilise: always for runs profiled by Insight (their device streams),
    for imported traces only when kernels ran on a device stream (a CPU-only torch.profiler trace has none)."""
    run = as_run(run)
    if (run.manifest or {}).get("source") not in IMPORTED_SOURCES:
        return True
    return bool(len(kernel_time_by_stream(run, rank)))


def recommendations(run: Run | str | os.PathLike, rank: int = 0) -> list[Recommendation]:
    """Most severe first."""
    run = as_run(run)
    return run.memo(("recommendations", rank), lambda: advise(
        summarize(step_breakdown(run, rank)), data_pipeline(run, rank), memory_peak(run, rank=rank),
        op_type_stats(run, rank=rank), device=has_device(run, rank)))


def advise(s: StepSummary, pipe: PipelineReport, peak: MemoryPeak, types: pd.DataFrame,
           device: bool = True) -> list[Recommendation]:
    """The rules over analyses already computed (the CLI and the exports have them at hand). ``device``:
    the run has a device (``has_device``); without one the device-utilisation rule does not apply."""
    out: list[Recommendation] = []
    add = out.append

    if s.steps_averaged and s.iteration_interval_ms > ITERATION_INTERVAL_MS:
        add(Recommendation(
            "iteration_interval", "warning", "Long iteration interval",
            f"steps wait {s.iteration_interval_ms:.3f} ms on average between the previous step's end and the first "
            f"forward op (threshold {ITERATION_INTERVAL_MS} ms): the data queue or host work between steps "
            f"holds the device back", "iteration_interval_ms", s.iteration_interval_ms, ITERATION_INTERVAL_MS))
    if pipe.input_bound in ("moderately", "highly"):
        high = pipe.input_bound == "highly"
        where = f"; the slowest pipeline stage is {pipe.bottleneck_label}" if pipe.bottleneck_op_id is not None else ""
        add(Recommendation(
            "input_bound", "critical" if high else "warning", f"{pipe.input_bound.capitalize()} input-bound",
            f"input takes {pipe.input_share:.1%} of the step time (iteration interval + input copies; "
            f"{'>= ' + format(INPUT_HIGH, '.0%') if high else format(INPUT_MODERATE, '.0%') + '-' + format(INPUT_HIGH, '.0%')}"
            f" is {pipe.input_bound} input-bound){where}", "input_share", pipe.input_share,
            INPUT_HIGH if high else INPUT_MODERATE))
    if pipe.verdict == "data_processing":  # the pipeline's one verdict, cited with the numbers behind it
        tip = next((a for a in pipe.advice[1:] if pipe.bottleneck_label and pipe.bottleneck_label in a), "")
        by_host = pipe.host_queue_empty_ratio is not None and pipe.host_queue_empty_ratio > HOST_EMPTY_RATIO
        add(Recommendation(
            "data_processing", "critical", VERDICT_TEXT["data_processing"]
            + (f": {pipe.bottleneck_label}" if pipe.bottleneck_label else ""),
            (f"the host queue was empty in {pipe.host_queue_empty_ratio:.0%} of samples (threshold "
             f"{HOST_EMPTY_RATIO:.0%})" if by_host else pipe.verdict_reason) + (f"; {tip}" if tip else ""),
            "host_queue_empty_ratio" if by_host else "getnext_wait_host_empty_ratio",
            float(pipe.host_queue_empty_ratio) if by_host else pipe.empty_pops_host_empty / max(pipe.device_queue_pops, 1),
            HOST_EMPTY_RATIO if by_host else NOISE_FLOOR))
    elif pipe.verdict == "data_transfer":
        add(Recommendation(
            "data_transfer", "warning", VERDICT_TEXT["data_transfer"],
            f"{pipe.verdict_reason} (noise floor {NOISE_FLOOR:.0%} of the steps): raise the prefetch size "
            f"(config.set_prefetch_size) and Model.train(sink_queue_size=...)", "getnext_wait_host_ready_ratio",
            pipe.empty_pops_host_ready / max(pipe.device_queue_pops, 1), NOISE_FLOOR))
    if pipe.verdict != "data_processing" and pipe.bottleneck_op_id is not None:
        row = pipe.ops[pipe.ops["op_id"] == pipe.bottleneck_op_id].iloc[0]
        add(Recommendation(
            "pipeline_op", "info", f"Slow pipeline stage: {pipe.bottleneck_label}",
            f"{row['reason']}; " + (pipe.advice[-1] if pipe.advice else ""),
            "queue_usage", float(row["queue_usage"]), 0.0))
    if pipe.consumer_bottleneck:
        add(Recommendation(
            "consumer_bound", "info", "The data pipeline keeps up",
            f"every pipeline queue is at least {ALL_FULL:.0%} full: the training step, not the data, sets the pace",
            "min_queue_usage", float(pipe.ops["queue_usage"].min()), ALL_FULL))
    if s.steps_averaged and s.step_time_ms > 0:
        comm = s.allreduce_ms / s.step_time_ms
        if comm > COMM_SHARE:
            add(Recommendation(
                "communication", "warning", "Communication takes a large share of the step",
                f"AllReduce takes {comm:.1%} of the step ({s.allreduce_ms:.3f} of {s.step_time_ms:.3f} ms; threshold "
                f"{COMM_SHARE:.0%}): overlap it with backward, compress gradients or accumulate them over steps",
                "communication_share", comm, COMM_SHARE))
        if device and np.isfinite(s.device_utilization) and s.device_utilization < LOW_UTILIZATION:
            add(Recommendation(
                "low_utilization", "warning", "Low device utilisation",
                f"the device is busy {s.device_utilization:.1%} of the step (threshold {LOW_UTILIZATION:.0%}): "
                f"raise the batch size, or remove host work between steps", "device_utilization",
                s.device_utilization, LOW_UTILIZATION))
    if np.isfinite(peak.share_of_capacity) and peak.share_of_capacity > PEAK_MEMORY_SHARE:
        acts = peak.live[peak.live["kind"] != "parameter"]  # what checkpointing or a smaller batch shrinks
        big = acts.iloc[0] if len(acts) else (peak.live.iloc[0] if len(peak.live) else None)
        add(Recommendation(
            "peak_memory", "critical" if peak.share_of_capacity > 0.98 else "warning", "Peak memory near capacity",
            f"peak device memory {peak.peak_bytes / 2**20:.1f} MiB is {peak.share_of_capacity:.1%} of "
            f"{peak.capacity / 2**20:.1f} MiB (threshold {PEAK_MEMORY_SHARE:.0%})"
            + (f"; largest live {'activation' if big['kind'] != 'parameter' else 'tensor'} {big['name']!s} ({big['size'] / 2**20:.1f} MiB, {big['op']})" if big is not None else "")
            + ": use gradient checkpointing, mixed precision or a smaller batch",
            "peak_memory_share", peak.share_of_capacity, PEAK_MEMORY_SHARE))
    if len(types) > 1 and types["share"].iloc[0] > DOMINANT_OP_TYPE:
        top = types.iloc[0]
        add(Recommendation(
            "dominant_op_type", "info", f"One op type dominates: {top['op']}",
            f"{top['op']} takes {top['share']:.1%} of task time ({top['total_ms']:.3f} ms in {int(top['calls'])} calls): "
            f"optimise or fuse it first", "op_type_share", float(top["share"]), DOMINANT_OP_TYPE))
    out.sort(key=lambda r: SEVERITY_ORDER.get(r.severity, 9))
    return out
