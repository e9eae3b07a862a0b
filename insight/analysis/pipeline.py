"""Data pipeline: MindInsight's MindData rules, XProf's input-bound classes, the device queue per step.

Queue usage of an op is the mean sampled depth / capacity of its *output* queue (``dataset_queues``).
The host queue is the root op's output queue (the one the consumer -- the sink feeder or the training
loop -- reads). Rules (profilers.md):

* one verdict (``PipelineReport.verdict``; every view words it with ``VERDICT_TEXT`` and explains it with
  ``verdict_reason``), with a noise floor: a queue found empty in under 1% of the steps is not a
  bottleneck. In order:

  1. no pipeline samples and no device-queue pops -> ``unknown``;
  2. the step does not wait for data -- input share under 5% (not input-bound) and GetNext found the
     device queue empty in under 1% of the steps after the first -> ``none``;
  3. the host queue (the root op's output) empty in more than 30% of its samples, taken while the
     pipeline delivered batches (from its first batch to its last) -> ``data_processing`` (MindInsight);
  4. each GetNext that found the device queue empty is attributed by the host queue during its wait
     (its samples inside the wait, else the nearest one within ``ATTRIBUTION_NS``): empty there too -> the
     pipeline had no batch (processing); holding batches -> they had not reached the device (transfer);
     processing waits in at least 1% of the steps and at least as many as transfer waits ->
     ``data_processing``; else transfer waits in at least 1% of the steps -> ``data_transfer``;
  5. otherwise ``none``: steps wait before their first op, but not for the data pipeline;
* an op whose child's queue usage exceeds its own by more than 0.1 is flagged (it drains its input
  slower than it fills it); a leaf (source) op with usage under 0.6 is flagged;
* every queue at 0.8 or more -> the consumer (the training step) is the bottleneck, not the data;
* input share = (iteration interval + input copies after fp_start) / step time: under 5% not
  input-bound, 5-20% moderately, 20% or more highly.

Also here, for the data-pipeline page: ``queue_depths`` (sampled connector-queue depth over time, plus the
device queue) and ``pipeline_per_step`` (host and device queue per step: depth, empty and full counts).

When a run holds several pipelines (one per epoch, eval datasets), the ones with the structure that
was sampled most are analysed together (their op ids line up); ``pipeline_ids`` says which.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from insight.analysis.steps import step_breakdown, step_times, summarize
from insight.trace import NS_PER_MS, Run, as_run, read

HOST_EMPTY_RATIO = 0.30
CHILD_GAP = 0.1
LEAF_USAGE = 0.6
ALL_FULL = 0.8
INPUT_MODERATE = 0.05
INPUT_HIGH = 0.20
NOISE_FLOOR = 0.01          # a queue empty in under 1% of the steps is not a bottleneck
ATTRIBUTION_NS = 25_000_000  # a host-queue sample this close to a GetNext wait tells what the host held
VERDICT_TEXT = {"data_processing": "Data processing is the bottleneck",
                "data_transfer": "Host-to-device transfer is the bottleneck",
                "none": "The data pipeline keeps up", "unknown": "Not enough data-pipeline data for a verdict"}

PIPE_COLUMNS = {"pipeline_id": -1, "op_id": -1, "op_type": "", "parent_id": -1, "num_workers": 1,
                "queue_capacity": -1}
QUEUE_COLUMNS = {"pipeline_id": -1, "op_id": -1, "t_ns": -1, "depth": 0, "capacity": -1}
OPS_COLUMNS = {"pipeline_id": -1, "op_id": -1, "op_type": "", "t_ns": -1, "rows": 0, "batches": 0, "busy_ns": 0,
               "wait_in_ns": 0, "wait_out_ns": 0, "num_workers": 1}
DQ_COLUMNS = {"t_ns": -1, "action": "", "depth": 0, "capacity": -1, "wait_ns": 0, "step": -1}
SOURCE_TYPES = ("numpy_slices", "generator", "mindrecord", "tfrecord", "image_folder", "csv")


def input_bound_class(share: float) -> str:
    """XProf: under 5% not input-bound, 5-20% moderately, 20% or more highly."""
    if share is None or not np.isfinite(share):
        return "unknown"
    if share >= INPUT_HIGH:
        return "highly"
    if share >= INPUT_MODERATE:
        return "moderately"
    return "not"


@dataclass
class PipelineReport:
    ops: pd.DataFrame                 # one row per pipeline op with queue usage, flags and reasons
    device_queue: pd.DataFrame        # per step: pushes, pops, empty, full, mean depth, GetNext wait
    pipeline_ids: list = field(default_factory=list)
    host_queue_empty_ratio: float | None = None
    host_queue_samples: int = 0
    device_queue_pops: int = 0
    device_queue_empty_pops: int = 0  # after the first step
    empty_pops_host_empty: int = 0    # ... of which the host queue was empty too (the pipeline had no batch)
    empty_pops_host_ready: int = 0    # ... of which the host queue held batches (they had not reached the device)
    verdict: str = "unknown"          # data_processing | data_transfer | none | unknown
    verdict_reason: str = ""          # the rule and the numbers that gave the verdict
    consumer_bottleneck: bool = False
    bottleneck_op_id: int | None = None
    bottleneck_op_type: str = ""
    input_share: float = float("nan")
    input_bound: str = "unknown"      # not | moderately | highly | unknown
    advice: list = field(default_factory=list)

    @property
    def verdict_text(self) -> str:
        return VERDICT_TEXT.get(self.verdict, self.verdict)

    @property
    def device_queue_empty_ratio(self) -> float | None:
        return self.device_queue_empty_pops / self.device_queue_pops if self.device_queue_pops else None

    @property
    def bottleneck_label(self) -> str:
        return "" if self.bottleneck_op_id is None else f"{self.bottleneck_op_type} op #{self.bottleneck_op_id}"


def data_pipeline(run: Run | str | os.PathLike, rank: int = 0, breakdown: pd.DataFrame | None = None) -> PipelineReport:
    run = as_run(run)
    if breakdown is None:
        return run.memo(("data_pipeline", rank), lambda: _data_pipeline(run, rank, step_breakdown(run, rank)))
    return _data_pipeline(run, rank, breakdown)


def _data_pipeline(run: Run, rank: int, breakdown: pd.DataFrame) -> PipelineReport:
    pipes = read(run, "dataset_pipeline", PIPE_COLUMNS, required=("pipeline_id", "op_id", "parent_id"), rank=rank)
    samples = read(run, "dataset_queues", QUEUE_COLUMNS, required=("pipeline_id", "op_id", "depth"), rank=rank)
    stats = read(run, "dataset_ops", OPS_COLUMNS, required=("pipeline_id", "op_id"), rank=rank)
    dq = read(run, "device_queue", DQ_COLUMNS, required=("action", "depth", "step"), rank=rank)
    bd = breakdown
    # a pipeline announced again (to a listener that subscribed later) repeats its rows: one row per op
    pipes = pipes.drop_duplicates(["pipeline_id", "op_id"], keep="last").reset_index(drop=True)

    rep = PipelineReport(ops=_ops_table(pipes, samples, stats), device_queue=_device_queue_per_step(dq))
    ops = rep.ops
    if len(bd) > 1:
        first = int(bd["step"].iloc[0])
        later = dq[(dq["action"] == "pop") & (dq["step"] != first)]
    else:
        later = dq[dq["action"] == "pop"]
    rep.device_queue_pops = int(len(later))
    waited = later[later["wait_ns"] > 0]
    rep.device_queue_empty_pops = int(len(waited))
    host = samples.iloc[:0]
    if len(ops):
        rep.pipeline_ids = sorted(int(p) for p in ops.attrs.get("pipeline_ids", []))
        host = samples[samples["pipeline_id"].isin(rep.pipeline_ids) & samples["op_id"].isin(
            ops.loc[ops["parent_id"] == -1, "op_id"])]
        rs = _while_running(host, waited)
        rep.host_queue_samples = len(rs)
        if len(rs):
            rep.host_queue_empty_ratio = float((rs["depth"] <= 0).mean())
    if len(waited):
        rep.empty_pops_host_empty, rep.empty_pops_host_ready = _attribute_waits(waited, host)

    usage = ops["queue_usage"].dropna() if len(ops) else pd.Series(dtype=float)
    rep.consumer_bottleneck = bool(len(usage) and len(usage) == len(ops) and (usage >= ALL_FULL).all())
    s = summarize(bd)
    rep.input_share = s.input_share
    rep.input_bound = input_bound_class(s.input_share)
    rep.verdict, rep.verdict_reason = _verdict(rep)
    _pick_bottleneck(rep)
    rep.advice = _advice(rep, ops)
    return rep


def _attribute_waits(waited: pd.DataFrame, host: pd.DataFrame) -> tuple[int, int]:
    """Of the GetNext calls that waited, how many found the host queue empty too, and how many found it
    holding batches (the others have no host-queue sample near them)."""
    if host.empty:
        return 0, 0
    h = host.sort_values("t_ns", kind="stable")
    t = h["t_ns"].to_numpy(np.int64)
    d = h["depth"].to_numpy()
    empty = ready = 0
    for end, wait in zip(waited["t_ns"].to_numpy(np.int64), waited["wait_ns"].to_numpy(np.int64)):
        start = end - max(int(wait), 0)
        lo, hi = np.searchsorted(t, start, "left"), np.searchsorted(t, end, "right")
        if hi > lo:
            inside = d[lo:hi]
        else:  # no sample during the wait: the nearest one, if close
            k = np.clip([lo - 1, lo], 0, len(t) - 1)
            gap = np.minimum(np.abs(t[k] - start), np.abs(t[k] - end))
            j = k[int(gap.argmin())]
            if min(abs(t[j] - start), abs(t[j] - end)) > ATTRIBUTION_NS:
                continue
            inside = d[j:j + 1]
        if (inside <= 0).any():
            empty += 1
        else:
            ready += 1
    return empty, ready


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _verdict(rep: PipelineReport) -> tuple[str, str]:
    """The one verdict and its reason (the rules in the module docstring)."""
    host, pops = rep.host_queue_empty_ratio, rep.device_queue_pops
    if host is None and not pops:
        return "unknown", "no data-pipeline samples and no device-queue pops were recorded"
    share = rep.input_share
    dq = rep.device_queue_empty_ratio or 0.0
    share_known = share == share
    waits = (f"GetNext found the device queue empty in {rep.device_queue_empty_pops} of {pops} steps "
             f"({_pct(dq)})") if pops else "no device queue (not sink mode)"
    if (not share_known or share < INPUT_MODERATE) and dq < NOISE_FLOOR:
        return "none", (f"the step does not wait for data: input share "
                        f"{_pct(share) if share_known else 'unknown'} (< {INPUT_MODERATE:.0%}) and {waits}; "
                        f"a queue empty in under {NOISE_FLOOR:.0%} of the steps is not a bottleneck")
    if host is not None and host > HOST_EMPTY_RATIO:
        return "data_processing", (f"the host queue was empty in {_pct(host)} of {rep.host_queue_samples} samples "
                                   f"(> {HOST_EMPTY_RATIO:.0%}): the pipeline does not produce batches fast enough")
    floor = NOISE_FLOOR * max(pops, 1)
    if pops and rep.empty_pops_host_empty >= floor and rep.empty_pops_host_empty >= rep.empty_pops_host_ready:
        return "data_processing", (f"{rep.empty_pops_host_empty} of {pops} GetNext calls "
                                   f"({_pct(rep.empty_pops_host_empty / pops)}) waited while the host queue was "
                                   f"empty too: the pipeline had no batch ready")
    if pops and rep.empty_pops_host_ready >= floor:
        return "data_transfer", (f"{rep.empty_pops_host_ready} of {pops} GetNext calls "
                                 f"({_pct(rep.empty_pops_host_ready / pops)}) found the device queue empty while "
                                 f"the host queue held batches: they had not reached the device")
    return "none", (f"steps spend {_pct(share) if share_known else '?'} of their time before the first op, but "
                    f"the queues had data ({waits}; host queue empty in "
                    f"{_pct(host) if host is not None else '?'} of samples): host work between steps, not the "
                    f"data pipeline")


def _while_running(rs: pd.DataFrame, waited: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each pipeline's host-queue samples while the consumer fetched batches: from its first batch to its
    last (MindInsight counts empty queues per batch fetched, so neither the start-up before the first batch
    exists nor the drain after the source is exhausted should count as "empty") -- widened to every GetNext
    that waited for data while the pipeline ran (``waited``: device-queue pops with ``wait_ns``), since the
    consumer was asking for a batch then. Without that, a starved queue seen holding a batch once shrinks
    to that one sample and reads as never empty."""
    keep = []
    w0 = w1 = np.zeros(0, np.int64)
    if waited is not None and len(waited):
        w1 = waited["t_ns"].to_numpy(np.int64)
        w0 = w1 - waited["wait_ns"].to_numpy(np.int64).clip(min=0)
    for _, g in rs.sort_values("t_ns", kind="stable").groupby("pipeline_id", sort=False):
        full = np.flatnonzero(g["depth"].to_numpy() > 0)
        if not len(full):
            keep.append(g)
            continue
        t = g["t_ns"].to_numpy(np.int64)
        lo, hi = t[full[0]], t[full[-1]]
        during = (w1 >= t[0]) & (w0 <= t[-1])  # waits inside this pipeline's sampled time
        if during.any():
            lo, hi = min(lo, int(w0[during].min())), max(hi, int(w1[during].max()))
        keep.append(g[(t >= lo) & (t <= hi)])
    return pd.concat(keep) if keep else rs


def _ops_table(pipes: pd.DataFrame, samples: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    cols = ["op_id", "op_type", "parent_id", "children", "num_workers", "queue_capacity", "queue_usage",
            "queue_samples", "child_usage", "rows", "batches", "busy_ms", "wait_in_ms", "wait_out_ms", "flagged",
            "reason"]
    if pipes.empty:
        out = pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
        out.attrs["pipeline_ids"] = []
        return out
    # group pipelines by structure; analyse the structure sampled most
    sig = (pipes.sort_values(["pipeline_id", "op_id"]).groupby("pipeline_id")
           .apply(lambda g: tuple(zip(g["op_id"], g["op_type"], g["parent_id"])), include_groups=False))
    n_samples = samples.groupby("pipeline_id").size()
    weight = sig.index.to_series().map(n_samples).fillna(0)
    by_sig = weight.groupby(sig).sum()
    best = by_sig.idxmax() if by_sig.max() > 0 else sig.iloc[0]
    ids = [int(p) for p in sig.index[sig.map(lambda s: s == best)]]
    p = pipes[pipes["pipeline_id"] == ids[0]].sort_values("op_id").reset_index(drop=True)
    sm = samples[samples["pipeline_id"].isin(ids)].copy()
    cap = sm["capacity"].where(sm["capacity"] > 0, sm["op_id"].map(p.set_index("op_id")["queue_capacity"]))
    sm["usage"] = (sm["depth"] / cap.where(cap > 0)).clip(0, 1)
    usage = sm.groupby("op_id")["usage"].mean()
    count = sm.groupby("op_id").size()
    # dataset_ops rows are cumulative reports: the last one of each pipeline is its total
    st = stats[stats["pipeline_id"].isin(ids)].sort_values("t_ns", kind="stable")
    st = st.groupby(["pipeline_id", "op_id"]).tail(1).groupby("op_id")[
        ["rows", "batches", "busy_ns", "wait_in_ns", "wait_out_ns"]].sum()
    out = p[["op_id", "op_type", "parent_id", "num_workers", "queue_capacity"]].copy()
    kids = out.groupby("parent_id")["op_id"].apply(list)
    out["children"] = out["op_id"].map(kids).apply(lambda v: v if isinstance(v, list) else [])
    out["queue_usage"] = out["op_id"].map(usage)
    out["queue_samples"] = out["op_id"].map(count).fillna(0).astype(np.int64)
    out["child_usage"] = out["children"].apply(lambda ks: max((usage.get(k, np.nan) for k in ks), default=np.nan))
    for c in ("rows", "batches"):
        out[c] = out["op_id"].map(st[c]).fillna(0).astype(np.int64) if len(st) else 0
    for c in ("busy", "wait_in", "wait_out"):
        out[f"{c}_ms"] = out["op_id"].map(st[f"{c}_ns"]).fillna(0) / NS_PER_MS if len(st) else 0.0
    flagged, reasons = [], []
    for r in out.itertuples():
        u, cu = r.queue_usage, r.child_usage
        if r.children and np.isfinite(cu) and np.isfinite(u) and cu - u > CHILD_GAP:
            flagged.append(True)
            reasons.append(f"its input queue usage {cu:.2f} exceeds its own {u:.2f} by more than {CHILD_GAP}")
        elif not r.children and np.isfinite(u) and u < LEAF_USAGE:
            flagged.append(True)
            reasons.append(f"source op with queue usage {u:.2f} < {LEAF_USAGE}")
        else:
            flagged.append(False)
            reasons.append("")
    out["flagged"] = flagged
    out["reason"] = reasons
    out = out[cols]
    out.attrs["pipeline_ids"] = ids
    return out


def _device_queue_per_step(dq: pd.DataFrame) -> pd.DataFrame:
    cols = ["step", "pushes", "pops", "empty", "full", "mean_depth", "capacity", "get_wait_ms", "push_wait_ms"]
    if dq.empty:
        return pd.DataFrame({c: pd.Series([], dtype=np.int64 if c not in ("mean_depth", "get_wait_ms",
                                                                          "push_wait_ms") else float) for c in cols})
    push = dq["action"] == "push"
    pop = dq["action"] == "pop"
    g = dq.assign(push=push, pop=pop, empty=pop & (dq["wait_ns"] > 0),
                  full=push & (dq["capacity"] > 0) & (dq["depth"] >= dq["capacity"]),
                  pop_wait=np.where(pop, dq["wait_ns"], 0), push_wait=np.where(push, dq["wait_ns"], 0)
                  ).groupby("step")
    out = pd.DataFrame({"pushes": g["push"].sum(), "pops": g["pop"].sum(), "empty": g["empty"].sum(),
                        "full": g["full"].sum(), "mean_depth": g["depth"].mean(), "capacity": g["capacity"].max(),
                        "get_wait_ms": g["pop_wait"].sum() / NS_PER_MS,
                        "push_wait_ms": g["push_wait"].sum() / NS_PER_MS}).reset_index()
    return out[cols]


def _pick_bottleneck(rep: PipelineReport) -> None:
    ops = rep.ops
    if ops.empty or rep.consumer_bottleneck:
        return
    f = ops[ops["flagged"]]
    inner = f[f["children"].apply(len) > 0]
    if len(inner):
        row = inner.loc[(inner["child_usage"] - inner["queue_usage"]).idxmax()]
    elif len(f):
        row = f.loc[f["queue_usage"].idxmin()]
    elif rep.verdict == "data_processing":
        # nothing flagged by the queue rules: the op that worked longest per worker
        per = ops["busy_ms"] / ops["num_workers"].clip(lower=1)
        if not (per > 0).any():
            return
        row = ops.loc[per.idxmax()]
    else:
        return
    rep.bottleneck_op_id = int(row["op_id"])
    rep.bottleneck_op_type = str(row["op_type"])


def _knob(row) -> str:
    t, w = row["op_type"], int(row["num_workers"])
    label = f"{t} op #{int(row['op_id'])}"
    if not row["children"] or t in SOURCE_TYPES:
        return (f"{label} (the source) cannot keep up: use a faster source format (pre-decoded NumPy arrays / "
                f"MindRecord) or raise its num_parallel_workers (now {w})")
    if t == "shuffle":
        return f"{label} is slow: lower its buffer_size or raise the prefetch size (config.set_prefetch_size)"
    return f"{label} is the slowest stage: raise its num_parallel_workers (now {w}) or make its work cheaper"


def _advice(rep: PipelineReport, ops: pd.DataFrame) -> list[str]:
    out = []
    if rep.verdict == "data_processing":
        out.append(f"{rep.verdict_reason}: data processing is the bottleneck")
    elif rep.verdict == "data_transfer":
        out.append(f"{rep.verdict_reason}: data transfer is the bottleneck; raise the prefetch size "
                   f"(runtime.dataset.config.set_prefetch_size) and Model.train(sink_queue_size=...)")
    if rep.bottleneck_op_id is not None:
        row = ops[ops["op_id"] == rep.bottleneck_op_id].iloc[0]
        out.append(_knob(row))
    if rep.consumer_bottleneck:
        out.append(f"every pipeline queue is at least {ALL_FULL:.0%} full: the data pipeline keeps up and the "
                   f"consumer (the training step) is the bottleneck")
    return out


# -- the data pipeline's queues over time ---------------------------------------------------------------
def queue_depths(run: Run | str | os.PathLike, rank: int = 0, pipeline_ids=None) -> pd.DataFrame:
    """Sampled depth of every pipeline op's output queue (``pipeline_ids``: only these pipelines), plus the
    device queue's depth after each push / pop: ``queue`` (label), ``op_id`` (-1: device queue), ``root``
    (the host queue: the root op's output), ``t_ns``, ``t_ms``, ``depth``, ``capacity``."""
    run = as_run(run)
    cols = ["queue", "op_id", "root", "pipeline_id", "t_ns", "t_ms", "depth", "capacity"]
    q = read(run, "dataset_queues", QUEUE_COLUMNS, required=("pipeline_id", "op_id", "depth"), rank=rank)
    p = read(run, "dataset_pipeline", PIPE_COLUMNS, required=("pipeline_id", "op_id", "parent_id"), rank=rank)
    if pipeline_ids is not None:
        q = q[q["pipeline_id"].isin(list(pipeline_ids))]
    info = p.drop_duplicates(["op_id"]).set_index("op_id")
    frames = []
    if len(q):
        q = q.copy()
        q["op_type"] = q["op_id"].map(info["op_type"]).fillna("op") if len(info) else "op"
        q["root"] = q["op_id"].map(info["parent_id"] == -1).fillna(False).astype(bool) if len(info) else False
        q["queue"] = [f"{t} #{o} output" + (" (host queue)" if r else "") for t, o, r in
                      zip(q["op_type"], q["op_id"], q["root"])]
        frames.append(q)
    dq = read(run, "device_queue", DQ_COLUMNS, required=("action", "depth"), rank=rank)
    if len(dq):
        frames.append(dq.assign(queue="device queue", op_id=-1, root=False, pipeline_id=-1))
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
    out = pd.concat([f[[c for c in cols if c != "t_ms"]] for f in frames], ignore_index=True)
    out = out[out["t_ns"] >= 0].sort_values(["op_id", "t_ns"], kind="stable").reset_index(drop=True)
    out["t_ms"] = out["t_ns"] / NS_PER_MS
    return out[cols]


def pipeline_per_step(run: Run | str | os.PathLike, rank: int = 0, report=None,
                      breakdown: pd.DataFrame | None = None) -> pd.DataFrame:
    """MindInsight's step-interval view, per step: the host queue (root op's output, sampled) -- mean
    depth, samples, empty samples -- and the device queue -- ``device_depth`` (mean after push/pop),
    pushes, pops, ``device_empty`` (GetNext found it empty and waited), ``device_full`` (a push filled it),
    GetNext wait. Host samples belong to the step whose time range (step trace) holds them."""
    run = as_run(run)
    bd = step_times(run, rank) if breakdown is None else breakdown
    rep = data_pipeline(run, rank) if report is None else report
    cols = ["step", "start_ns", "end_ns", "host_depth", "host_samples", "host_empty", "host_capacity", "device_depth",
            "device_pushes", "device_pops", "device_empty", "device_full", "device_capacity", "get_wait_ms"]
    if bd.empty:
        return pd.DataFrame({c: pd.Series([], dtype=float) for c in cols})
    out = bd[["step", "start_ns", "end_ns"]].sort_values("start_ns", kind="stable").reset_index(drop=True)
    q = queue_depths(run, rank, rep.pipeline_ids or None)
    host = q[q["root"].astype(bool)] if len(q) else q
    if len(host):
        t = host["t_ns"].to_numpy(np.int64)
        k = np.searchsorted(out["start_ns"].to_numpy(np.int64), t, side="right") - 1
        ok = (k >= 0) & (t < out["end_ns"].to_numpy(np.int64)[np.clip(k, 0, None)])
        h = pd.DataFrame({"k": k[ok], "depth": host["depth"].to_numpy()[ok], "cap": host["capacity"].to_numpy()[ok]})
        g = h.groupby("k")
        out["host_depth"] = g["depth"].mean()
        out["host_samples"] = g.size()
        out["host_empty"] = g["depth"].apply(lambda d: int((d <= 0).sum()))
        out["host_capacity"] = g["cap"].max()
    for c in ("host_depth", "host_samples", "host_empty", "host_capacity"):
        if c not in out:
            out[c] = np.nan
    out[["host_samples", "host_empty"]] = out[["host_samples", "host_empty"]].fillna(0).astype(np.int64)
    dq = rep.device_queue.set_index("step") if len(rep.device_queue) else None
    for c, src in (("device_depth", "mean_depth"), ("device_pushes", "pushes"), ("device_pops", "pops"),
                   ("device_empty", "empty"), ("device_full", "full"), ("device_capacity", "capacity"),
                   ("get_wait_ms", "get_wait_ms")):
        out[c] = out["step"].map(dq[src]) if dq is not None else np.nan
    for c in ("device_pushes", "device_pops", "device_empty", "device_full"):
        out[c] = out[c].fillna(0).astype(np.int64)
    return out[cols]
