"""Cluster analysis of a multi-process (data-parallel) run: MindInsight's cluster step trace, stragglers and
HTA's communication/computation overlap, over every ``rank_<r>/`` of the run.

* Per rank and step (``steps``): the step trace of each rank (iteration interval, fp+bp, tail; from the
  step markers, as ``steps.step_times``), and from the task table: ``comm_ns`` (the union of the
  communication kernels' intervals -- tasks of kind ``kernel`` on the ``comm`` stream), ``overlap_ns`` (time
  computing while communicating: the intersection of that union with the union of every other stream's
  ``kernel`` intervals) and ``comm_alone_ns = comm_ns - overlap_ns``
  (communicating with no compute running), plus the AllReduce count and bytes of the step.
* Per rank (``ranks``): the averages over the rank's steps (the first step excluded when there are more,
  as in ``steps.summarize``), ``overlap_pct = 100 * sum(overlap_ns) / sum(comm_ns)`` over those steps (HTA),
  and the rank's status: ``ok``, or what is wrong with it (missing, failed, still running, unreadable, no
  steps, steps that disagree with the other ranks) -- a broken rank is reported and the others still show.
* Stragglers: a rank whose mean step time or iteration interval exceeds the median over the ranks
  by more than ``margin`` (default 20%, MindInsight's cluster rule) *and* by at least ``min_excess_ms``
  (default 0.5 ms, so microsecond jitter is not a straggler), with the numbers as the reason. When the
  ranks recorded different steps, they are compared over the steps they all recorded.

The task tables of all ranks are read as ONE pyarrow dataset (each file's ``rank_<r>`` directory is a
partition column), and every per-step quantity is computed with numpy over whole columns (an event sweep
for the unions) -- no Python loop over rows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from insight.analysis.steps import averaged_steps, step_times
from insight.trace import NS_PER_MS, Run, TraceError, as_run

MARGIN = 0.2          # a rank more than 20% above the median over ranks is a straggler (MindInsight)
MIN_EXCESS_MS = 0.5   # ... and at least this much above it
METRICS = (("step_time", "step time"), ("iteration_interval", "iteration interval"))
COMM_OPS = ("all_reduce", "all_gather")
_BUCKET = re.compile(r"^AllReduce_bucket(\d+)$")
STEP_COLUMNS = ["rank", "step", "iteration_interval_ns", "fp_bp_ns", "tail_ns", "step_time_ns", "comm_ns",
                "overlap_ns", "comm_alone_ns", "allreduce_count", "allreduce_bytes"]


@dataclass
class ClusterReport:
    """``ranks``: one row per expected rank (summary, status, straggler flag and reason); ``steps``: one row per
    (rank, step); ``stragglers``: one row per (rank, metric) over the margin; ``buckets``: AllReduce buckets per
    rank (mean time, bytes); ``problems``: one message per rank that is not ok."""
    ranks: pd.DataFrame
    steps: pd.DataFrame
    stragglers: pd.DataFrame
    buckets: pd.DataFrame
    problems: list = field(default_factory=list)
    group_size: int = 1
    margin: float = MARGIN
    min_excess_ms: float = MIN_EXCESS_MS
    common_steps: int = 0


def expected_ranks(run: Run) -> list[int]:
    """Ranks the run should have: 0..group_size-1, the manifest's ranks and any rank_<r>/ on disk."""
    group = int(run.manifest.get("group_size") or 1)
    found = set(run.ranks) | set(range(group))
    try:
        found |= {int(p.name[5:]) for p in run.path.glob("rank_*") if p.name[5:].isdigit()}
    except OSError:
        pass
    return sorted(found)


def is_cluster_run(run: Run | str | os.PathLike) -> bool:
    run = as_run(run)
    return len(expected_ranks(run)) > 1


def _rank_status(run: Run, rank: int) -> tuple[str, str]:
    per = (run.manifest.get("rank_status") or {}).get(str(rank))
    if not (run.path / f"rank_{rank}").is_dir():
        return "missing", f"rank {rank}: no rank_{rank}/ directory in the run (the process never wrote its trace)"
    if per is None and rank not in run.ranks:
        return "missing", f"rank {rank}: not listed in the manifest (its process did not finish writing)"
    status = (per or {}).get("status") or run.manifest.get("status") or ""
    if status == "failed":
        return "failed", f"rank {rank}: its recording failed"
    if status == "running":
        return "running", f"rank {rank}: still recording, or its process died before the end of the run"
    return "ok", ""


# -- the task tables of every rank as one dataset -------------------------------------------------------------
@dataclass
class _Tasks:
    """The kernel tasks of every rank (numpy columns) and the communication tasks with their names."""
    rank: np.ndarray
    step: np.ndarray
    start: np.ndarray
    end: np.ndarray
    is_comm: np.ndarray
    is_allreduce: np.ndarray
    nbytes: np.ndarray
    comm: pd.DataFrame


_STRINGS = ["stream", "op", "kind", "name"]


def _dict_mask(col: pa.ChunkedArray, values) -> np.ndarray:
    """``col in values`` for a dictionary-encoded column, by comparing indices chunk by chunk (no decoding)."""
    out = []
    for ch in col.chunks:
        if pa.types.is_dictionary(ch.type):
            hit = np.isin(np.asarray(ch.dictionary.to_pylist(), dtype=object), list(values))
            idx = ch.indices.to_numpy(zero_copy_only=False)
            out.append(hit[idx] if len(hit) else np.zeros(len(ch), bool))
        else:
            out.append(pc.is_in(ch, pa.array(list(values))).to_numpy(zero_copy_only=False).astype(bool))
    return np.concatenate(out) if out else np.zeros(0, bool)


def _task_dataset(run: Run, ranks: list[int]) -> _Tasks:
    files = []
    for r in ranks:
        files += [str(f) for f in run.table_files("tasks", r)]
    if not files:
        z = np.zeros(0, np.int64)
        return _Tasks(z, z, z, z, z.astype(bool), z.astype(bool), z,
                      pd.DataFrame(columns=["rank", "name", "op", "start_ns", "end_ns", "bytes"]))
    part = ds.DirectoryPartitioning(pa.schema([("rank_dir", pa.string())]))
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=_STRINGS))
    try:
        d = ds.dataset(files, format=fmt, partitioning=part, partition_base_dir=str(run.path))
        t = d.to_table(columns=["rank_dir", "step", "stream", "op", "name", "start_ns", "end_ns", "bytes"],
                       filter=(ds.field("step") >= 0) & (ds.field("kind") == "kernel")
                       & (ds.field("end_ns") >= ds.field("start_ns")))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as e:
        raise TraceError(f"run {run.name!r}: cannot read the task tables of ranks {ranks} as one dataset "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    rd = t.column("rank_dir")
    rank = np.zeros(t.num_rows, np.int64)
    for r in ranks:  # one mask per rank directory (a handful), not per row
        rank[_dict_mask(rd, [f"rank_{r}"])] = r
    is_comm = _dict_mask(t.column("stream"), ["comm"])

    def num(c):
        return pc.cast(t.column(c), pa.int64()).to_numpy()
    start, end, nbytes = num("start_ns"), num("end_ns"), num("bytes")
    sel = np.flatnonzero(is_comm)  # the communication tasks: a few per step
    comm = pd.DataFrame({"rank": rank[sel], "name": t.column("name").take(sel).cast(pa.string()).to_numpy(
                             zero_copy_only=False).astype(str),
                         "op": t.column("op").take(sel).cast(pa.string()).to_numpy(zero_copy_only=False).astype(str),
                         "start_ns": start[sel], "end_ns": end[sel], "bytes": nbytes[sel]})
    return _Tasks(rank, num("step"), start, end, is_comm, _dict_mask(t.column("op"), ["all_reduce"]), nbytes, comm)


def _concat_tasks(parts: list[_Tasks]) -> _Tasks:
    cat = [np.concatenate([getattr(p, f) for p in parts]) for f in ("rank", "step", "start", "end", "is_comm",
                                                                    "is_allreduce", "nbytes")]
    return _Tasks(*cat, pd.concat([p.comm for p in parts], ignore_index=True))


def _sweep(group: np.ndarray, start: np.ndarray, end: np.ndarray, is_comm: np.ndarray, n_groups: int):
    """Per group: (comm union, compute union, overlap) lengths, by one sweep over sorted interval ends."""
    k = len(start)
    if k == 0:
        z = np.zeros(n_groups, np.int64)
        return z, z.copy(), z.copy()
    t = np.concatenate([start, end])
    g = np.concatenate([group, group]).astype(np.int64)
    is_start = np.zeros(2 * k, np.int64)
    is_start[:k] = 1
    t_rel = t - t.min()
    if int(t_rel.max()) < (1 << 40) and n_groups < (1 << 21):  # one int64 sort key: group | time | start bit
        order = np.argsort((g << 42) | (t_rel << 1) | is_start, kind="stable")
    else:
        order = np.lexsort((is_start, t, g))  # ends before starts at equal times: touching intervals do not overlap
    t, g = t[order], g[order]
    comm = np.concatenate([is_comm, is_comm])[order]
    delta = (is_start[order] * 2 - 1).astype(np.int32)
    d_comm = delta * comm
    n_comm = np.cumsum(d_comm, dtype=np.int32)   # every group's intervals close before the next group
    n_comp = np.cumsum(delta - d_comm, dtype=np.int32)
    seg = np.empty(len(t), np.int64)
    seg[:-1] = t[1:] - t[:-1]
    seg[-1] = 0
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # each group's first event (events sorted by group)
    seg[first[1:] - 1] = 0  # no segment across two groups
    in_comm, in_comp = n_comm > 0, n_comp > 0
    ids = g[first]
    out = []
    for m in (in_comm, in_comp, in_comm & in_comp):
        v = np.zeros(n_groups, np.int64)
        v[ids] = np.add.reduceat(np.where(m, seg, 0), first)
        out.append(v)
    return tuple(out)


def _comm_per_step(tasks: _Tasks, keys: pd.DataFrame) -> pd.DataFrame:
    """comm / compute / overlap / comm-alone ns and AllReduce count / bytes for each (rank, step) of ``keys``."""
    n = len(keys)
    out = keys[["rank", "step"]].copy()
    if n == 0:
        for c in STEP_COLUMNS[6:]:
            out[c] = pd.Series([], dtype=np.int64)
        return out
    steps_max = int(max(keys["step"].max(), tasks.step.max() if len(tasks.step) else 0)) + 1
    lookup = np.full((int(keys["rank"].max()) + 1) * steps_max, -1, np.int64)  # (rank, step) -> row of keys
    lookup[keys["rank"].to_numpy() * steps_max + keys["step"].to_numpy()] = np.arange(n)
    flat = tasks.rank * steps_max + tasks.step
    ok = (tasks.rank <= keys["rank"].max()) & (tasks.step < steps_max)
    gid = np.full(len(flat), -1, np.int64)
    gid[ok] = lookup[flat[ok]]
    keep = gid >= 0
    # only compute tasks inside their step's communication window [first comm start, last comm end] can overlap
    c = keep & tasks.is_comm
    lo = np.full(n, np.iinfo(np.int64).max, np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, np.int64)
    np.minimum.at(lo, gid[c], tasks.start[c])
    np.maximum.at(hi, gid[c], tasks.end[c])
    g = np.where(keep, gid, 0)
    keep &= tasks.is_comm | ((tasks.end > lo[g]) & (tasks.start < hi[g]))
    comm_u, _, over = _sweep(gid[keep], tasks.start[keep], tasks.end[keep], tasks.is_comm[keep], n)
    is_ar = tasks.is_allreduce & (gid >= 0)
    out["comm_ns"] = comm_u
    out["overlap_ns"] = over
    out["comm_alone_ns"] = comm_u - over
    out["allreduce_count"] = np.bincount(gid[is_ar], minlength=n).astype(np.int64)
    out["allreduce_bytes"] = np.bincount(gid[is_ar], weights=tasks.nbytes[is_ar], minlength=n).astype(np.int64)
    return out


def _buckets(tasks: _Tasks) -> pd.DataFrame:
    cols = ["rank", "bucket", "name", "op", "count", "bytes", "mean_ms"]
    t = tasks.comm[tasks.comm["op"].isin(COMM_OPS)]
    if t.empty:
        return pd.DataFrame(columns=cols)
    t = t.assign(dur=t["end_ns"] - t["start_ns"])
    g = t.groupby(["rank", "name", "op"], sort=True).agg(count=("dur", "size"), bytes=("bytes", "max"),
                                                         mean_ns=("dur", "mean")).reset_index()
    g["bucket"] = pd.to_numeric(g["name"].str.extract(_BUCKET, expand=False), errors="coerce").fillna(-1).astype(int)
    g["mean_ms"] = g["mean_ns"] / NS_PER_MS
    return g.sort_values(["rank", "bucket", "name"]).reset_index(drop=True)[cols]


# -- the report -------------------------------------------------------------------------------------------------
def cluster_report(run: Run | str | os.PathLike, margin: float = MARGIN,
                   min_excess_ms: float = MIN_EXCESS_MS) -> ClusterReport:
    run = as_run(run)
    ranks = expected_ranks(run)
    status, problems, frames = {}, [], []
    for r in ranks:  # one small steps table per rank (markers only)
        st, msg = _rank_status(run, r)
        if st != "missing":
            try:
                bd = step_times(run, r)
            except TraceError as e:
                st, msg = "unreadable", f"rank {r}: {e}"
            else:
                if bd.empty:
                    st, msg = ("no steps" if st == "ok" else st), (msg or f"rank {r}: no steps recorded")
                bd = bd.assign(rank=r)
                frames.append(bd[["rank", "step", "iteration_interval_ns", "fp_bp_ns", "tail_ns", "step_time_ns"]])
        status[r] = [st, msg]
    readable = [r for r in ranks if status[r][0] not in ("missing", "unreadable")]
    steps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STEP_COLUMNS[:6])
    steps = steps.astype({c: np.int64 for c in steps.columns})
    try:
        tasks = _task_dataset(run, readable)
    except TraceError as e:  # one bad file: fall back to rank by rank, so the other ranks still show
        parts = []
        for r in readable:
            try:
                parts.append(_task_dataset(run, [r]))
            except TraceError as e_r:
                status[r] = ["unreadable", f"rank {r}: {e_r}"]
        tasks = _concat_tasks(parts) if parts else _task_dataset(run, [])
        del e
    comm = _comm_per_step(tasks, steps)
    steps = steps.merge(comm, on=["rank", "step"], how="left")[STEP_COLUMNS] if len(steps) else \
        pd.DataFrame(columns=STEP_COLUMNS)
    buckets = _buckets(tasks)

    # ranks that disagree on the steps recorded: compare everyone over the common steps
    have = {r: set(steps.loc[steps["rank"] == r, "step"].tolist()) for r in readable if status[r][0] != "no steps"}
    common = set.intersection(*have.values()) if have else set()
    if have and any(s != common for s in have.values()) and len(have) > 1:
        for r, s in have.items():
            if s != common:
                extra = sorted(s - common)
                lo, hi = (min(s), max(s)) if s else (-1, -1)
                msg = (f"rank {r}: recorded {len(s)} steps ({lo}-{hi}) but only {len(common)} are common to every "
                       f"rank; {len(extra)} step(s) beyond them (e.g. {extra[:3]}) are left out of the comparison")
                status[r] = ["steps differ" if status[r][0] == "ok" else status[r][0],
                             "; ".join(m for m in (status[r][1], msg) if m)]
    # per-rank summary
    rows = []
    for r in ranks:
        sr = steps[steps["rank"] == r]
        used = averaged_steps(sr[sr["step"].isin(common)] if len(common) and len(have) > 1 else sr)
        row = {"rank": r, "status": status[r][0], "message": status[r][1], "steps": len(sr),
               "steps_compared": len(used)}
        for c in ("step_time", "iteration_interval", "fp_bp", "tail", "comm", "comm_alone"):
            row[f"{c}_ms"] = float(used[f"{c}_ns"].mean() / NS_PER_MS) if len(used) else float("nan")
        comm_total = float(used["comm_ns"].sum()) if len(used) else 0.0
        row["overlap_pct"] = 100.0 * float(used["overlap_ns"].sum()) / comm_total if comm_total > 0 else float("nan")
        row["allreduce_per_step"] = float(used["allreduce_count"].mean()) if len(used) else float("nan")
        row["allreduce_bytes_per_step"] = float(used["allreduce_bytes"].mean()) if len(used) else float("nan")
        rows.append(row)
    summary = pd.DataFrame(rows)
    stragglers = _stragglers(summary, margin, min_excess_ms)
    flagged = stragglers.groupby("rank")["reason"].agg("; ".join).to_dict() if len(stragglers) else {}
    summary["straggler"] = summary["rank"].isin(list(flagged))
    summary["reason"] = [flagged.get(r, "") for r in summary["rank"]]
    problems = [status[r][1] for r in ranks if status[r][1]]
    return ClusterReport(summary, steps, stragglers, buckets, problems,
                         group_size=int(run.manifest.get("group_size") or len(ranks)), margin=margin,
                         min_excess_ms=min_excess_ms, common_steps=len(common))


def _stragglers(summary: pd.DataFrame, margin: float, min_excess_ms: float) -> pd.DataFrame:
    cols = ["rank", "metric", "value_ms", "median_ms", "excess_pct", "reason"]
    ok = summary[summary["steps_compared"] > 0]
    if len(ok) < 2:
        return pd.DataFrame(columns=cols)
    out = []
    for key, label in METRICS:  # each metric a vector over the ranks
        v = ok[f"{key}_ms"]
        med = float(v.median())
        hit = ok[(v > med * (1 + margin)) & (v - med >= min_excess_ms)]
        for r, x in zip(hit["rank"], hit[f"{key}_ms"]):
            pct = 100.0 * (x - med) / med if med > 0 else float("inf")
            out.append({"rank": int(r), "metric": label, "value_ms": float(x), "median_ms": med, "excess_pct": pct,
                        "reason": f"{label} {x:.2f} ms vs median {med:.2f} ms over ranks (+{pct:.0f}%, margin "
                                  f"{margin * 100:.0f}%)"})
    return pd.DataFrame(out, columns=cols)


def cluster_lines(report: ClusterReport) -> list[str]:
    """The cluster section of ``insight report`` (plain text lines)."""
    s = report.ranks
    lines = [f"Cluster: {len(s)} ranks (group size {report.group_size}); straggler rule: above the median over ranks "
             f"by more than {report.margin * 100:.0f}% and {report.min_excess_ms:g} ms", ""]
    head = (f"{'rank':>4}  {'status':<12} {'steps':>5} {'step ms':>8} {'interval':>8} {'fp+bp':>8} {'tail':>8} "
            f"{'comm':>8} {'alone':>8} {'overlap':>8} {'AllReduce/step':>14}")
    lines.append("  " + head)

    def f(v, fmt="{:8.2f}"):
        return fmt.format(v) if pd.notna(v) else f"{'-':>8}"
    for row in s.itertuples():
        lines.append(f"  {row.rank:>4}  {row.status:<12} {row.steps:>5} {f(row.step_time_ms)} {f(row.iteration_interval_ms)}"
                     f" {f(row.fp_bp_ms)} {f(row.tail_ms)} {f(row.comm_ms)} {f(row.comm_alone_ms)} "
                     f"{f(row.overlap_pct, '{:7.1f}%')} {f(row.allreduce_per_step, '{:14.1f}')}")
    lines.append("")
    if report.stragglers.empty:
        lines.append("  stragglers: none")
    else:
        for row in report.stragglers.itertuples():
            lines.append(f"  straggler: rank {row.rank} -- {row.reason}")
    for p in report.problems:
        lines.append(f"  problem: {p}")
    return lines


__all__ = ["ClusterReport", "cluster_report", "cluster_lines", "is_cluster_run", "expected_ranks"]
