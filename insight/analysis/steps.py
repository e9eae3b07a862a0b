"""Step trace (MindInsight's definition): where each step's time went.

A step runs from the previous step's ``end_ns`` (for the first recorded step: its ``begin_ns``) to its
own ``end_ns`` and splits, without gaps or overlap, into

* ``iteration_interval``: until ``fp_start_ns`` (waiting for data: GetNext / the input copy, and host
  overhead between steps),
* ``fp_bp``: ``fp_start_ns`` -> ``bp_end_ns`` (forward and backward),
* ``tail``: ``bp_end_ns`` -> ``end_ns`` (AllReduce and the parameter update),

so ``iteration_interval + fp_bp + tail == step_time`` exactly (integer nanoseconds). ``allreduce`` -- the
summed duration of ``kernel`` tasks on the ``comm`` stream in the step -- is reported beside them, as the
trace format says: it runs on its own stream and overlaps the other phases. ``device_busy`` is the union
of the step's device-stream kernel and copy intervals (several streams may overlap; GetNext, a wait for
data, does not count), so
``device_utilization = device_busy / step_time``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insight.trace import NS_PER_MS, Run, as_run, empty_frame, read, task_columns

STEP_COLUMNS = {"step": -1, "epoch": -1, "begin_ns": -1, "get_next_start_ns": -1, "get_next_end_ns": -1,
                "fp_start_ns": -1, "bp_end_ns": -1, "end_ns": -1, "fp_start_op": "", "bp_end_op": "",
                "loss": float("nan"), "sink": False}
TASK_TIME_COLUMNS = task_columns("step", "kind", "stream", "phase", "start_ns", "end_ns")
PARTS = ("iteration_interval", "fp_bp", "tail")
DEVICE_KINDS = ("kernel", "memcpy_h2d", "memcpy_d2h")  # work; GetNext is a wait for data


def step_breakdown(run: Run | str | os.PathLike, rank: int = 0) -> pd.DataFrame:
    """One row per recorded step, in time order: ``*_ns`` integer columns and the same in ``*_ms``."""
    run = as_run(run)
    return run.memo(("step_breakdown", rank), lambda: _breakdown(
        _steps(run, rank), read(run, "tasks", TASK_TIME_COLUMNS, required=("start_ns", "end_ns"), rank=rank)))


def step_times(run: Run | str | os.PathLike, rank: int = 0) -> pd.DataFrame:
    """The breakdown from the step markers alone (no task data is read, so it is cheap for run
    listings); ``allreduce`` and ``device_busy`` are 0 here."""
    run = as_run(run)
    return run.memo(("step_times", rank), lambda: _breakdown(_steps(run, rank), empty_frame(TASK_TIME_COLUMNS)))


def _steps(run: Run, rank: int) -> pd.DataFrame:
    return read(run, "steps", STEP_COLUMNS, required=("step", "fp_start_ns", "bp_end_ns", "end_ns"), rank=rank)


def _breakdown(st: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    st = st[st["end_ns"] >= 0].sort_values(["end_ns", "step"], kind="stable").reset_index(drop=True)
    prev_end = st["end_ns"].shift(1)
    if len(st):
        b = st["begin_ns"].iloc[0]
        prev_end.iloc[0] = b if b >= 0 else st["fp_start_ns"].iloc[0]
    start = prev_end.astype(np.int64)
    fp = st["fp_start_ns"].where(st["fp_start_ns"] >= 0, start)
    bp = st["bp_end_ns"].where(st["bp_end_ns"] >= 0, fp)
    end = st["end_ns"]
    out = pd.DataFrame({
        "step": st["step"], "epoch": st["epoch"], "start_ns": start, "fp_start_ns": fp, "bp_end_ns": bp,
        "end_ns": end,
        "iteration_interval_ns": fp - start, "fp_bp_ns": bp - fp, "tail_ns": end - bp,
        "step_time_ns": end - start,
    })
    comm = tasks[(tasks["stream"] == "comm") & (tasks["kind"] == "kernel")]
    comm_ns = (comm["end_ns"] - comm["start_ns"]).groupby(comm["step"]).sum()
    out["allreduce_ns"] = out["step"].map(comm_ns).fillna(0).astype(np.int64)
    h2d = _input_copy_after_fp(tasks, out)
    out["input_copy_ns"] = h2d
    busy = _device_busy(tasks)
    out["device_busy_ns"] = out["step"].map(busy).fillna(0).astype(np.int64)
    for c in ("iteration_interval", "fp_bp", "tail", "allreduce", "step_time", "device_busy"):
        out[f"{c}_ms"] = out[f"{c}_ns"] / NS_PER_MS
    out["device_utilization"] = np.where(out["step_time_ns"] > 0,
                                         out["device_busy_ns"] / out["step_time_ns"].clip(lower=1), np.nan)
    out["fp_start_op"] = st["fp_start_op"]
    out["bp_end_op"] = st["bp_end_op"]
    out["loss"] = st["loss"]
    out["sink"] = st["sink"]
    return out


def _input_copy_after_fp(tasks: pd.DataFrame, bd: pd.DataFrame) -> np.ndarray:
    """Host-to-device input copies of each step that fall after its fp_start (copies before it are
    already inside the iteration interval), for XProf's input share."""
    cp = tasks[(tasks["kind"] == "memcpy_h2d") & (tasks["phase"] == "input") & (tasks["step"] >= 0)]
    if cp.empty or bd.empty:
        return np.zeros(len(bd), np.int64)
    fp = cp["step"].map(pd.Series(bd["fp_start_ns"].to_numpy(), index=bd["step"].to_numpy()))
    cp = cp[cp["start_ns"] >= fp]
    per = (cp["end_ns"] - cp["start_ns"]).groupby(cp["step"]).sum()
    return bd["step"].map(per).fillna(0).astype(np.int64).to_numpy()


def _device_busy(tasks: pd.DataFrame) -> pd.Series:
    """Per step: the length of the union of device-stream task intervals."""
    t = tasks[(tasks["stream"] != "host") & tasks["kind"].isin(DEVICE_KINDS) & (tasks["step"] >= 0)
              & (tasks["end_ns"] >= tasks["start_ns"])]
    if t.empty:
        return pd.Series(dtype=np.int64)
    t = t.sort_values(["step", "start_ns"], kind="stable")
    step = t["step"].to_numpy()
    s = t["start_ns"].to_numpy()
    e = t["end_ns"].to_numpy()
    reach = pd.Series(e).groupby(step).cummax().to_numpy()  # furthest end so far within the step
    prev = np.empty_like(reach)
    prev[1:] = reach[:-1]
    first = np.ones(len(step), bool)
    first[1:] = step[1:] != step[:-1]
    prev[first] = np.iinfo(np.int64).min
    gain = e - np.maximum(s, prev)
    return pd.Series(np.clip(gain, 0, None)).groupby(step).sum()


@dataclass
class StepSummary:
    """Averages over the recorded steps, the first one excluded when there is more than one."""
    steps: int                  # steps recorded
    steps_averaged: int
    excluded_steps: list
    iteration_interval_ms: float
    fp_bp_ms: float
    tail_ms: float
    allreduce_ms: float
    step_time_ms: float
    device_utilization: float
    input_share: float          # (iteration interval + input copies after fp_start) / step time
    fp_start_op: str
    bp_end_op: str
    first_step: int | None = None
    last_step: int | None = None


def averaged_steps(bd: pd.DataFrame) -> pd.DataFrame:
    return bd.iloc[1:] if len(bd) > 1 else bd


def step_summary(run: Run | str | os.PathLike, rank: int = 0, breakdown: pd.DataFrame | None = None) -> StepSummary:
    bd = step_breakdown(run, rank) if breakdown is None else breakdown
    return summarize(bd)


def summarize(bd: pd.DataFrame) -> StepSummary:
    avg = averaged_steps(bd)
    n = len(avg)

    def mean(c):
        return float(avg[c].mean()) if n else float("nan")

    total = float(avg["step_time_ns"].sum()) if n else 0.0
    inp = float((avg["iteration_interval_ns"] + avg["input_copy_ns"]).sum()) if n else 0.0
    busy = float(avg["device_busy_ns"].sum()) if n else 0.0

    def mode(c):
        v = avg[c][avg[c] != ""] if n else pd.Series([], dtype=str)
        return str(v.mode().iloc[0]) if len(v) else ""

    return StepSummary(
        steps=len(bd), steps_averaged=n,
        excluded_steps=[int(bd["step"].iloc[0])] if len(bd) > 1 else [],
        iteration_interval_ms=mean("iteration_interval_ms"), fp_bp_ms=mean("fp_bp_ms"), tail_ms=mean("tail_ms"),
        allreduce_ms=mean("allreduce_ms"), step_time_ms=mean("step_time_ms"),
        device_utilization=busy / total if total > 0 else float("nan"),
        input_share=inp / total if total > 0 else float("nan"),
        fp_start_op=mode("fp_start_op"), bp_end_op=mode("bp_end_op"),
        first_step=int(bd["step"].iloc[0]) if len(bd) else None,
        last_step=int(bd["step"].iloc[-1]) if len(bd) else None)
