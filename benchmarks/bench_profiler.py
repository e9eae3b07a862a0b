#!/usr/bin/env python
"""Profiler cost: (a) the step time it adds to a real training (the digits LeNet, BERT-small), (b) the writer's
throughput.

    cd /work/main && python benchmarks/bench_profiler.py [--rounds 9] [--repeats 4] [--epochs 3]
        [--model lenet|bert|both] [--bert-steps 2] [--bert-quick] [--steps 20000] [--profile]
        [--json out.json] [--summary out.json]

(a) Overhead. Each model trains with ``Model.train`` over a MindData pipeline in graph mode, the same warmed-up
Model in every run:
  * LeNet: ``runtime.models.LeNetDigits`` on the 8x8 digits, batch 32, non-sink, ``--epochs`` epochs per run;
  * BERT-small (``--model bert`` or ``both``): ``runtime.nn.transformer.BertSmall`` as in bench_fusion.py (4 layers,
    hidden 256, 4 heads, sequence 128, batch 16, Adam, graph-kernel fusion on), ``--bert-steps`` steps per run
    on a synthetic token data set (``--bert-quick``: 2 layers, hidden 128, sequence 64, batch 4).
Each round runs, ``--repeats`` times over in an order that rotates from run to run, three variants:
  * ``off``      -- nothing subscribed to ``runtime.hooks`` (the runtime's untraced fast path);
  * ``tracing``  -- a no-op hook subscriber: what the runtime's tracing path alone costs
                    (per-task clocks, ``step_tasks`` arrays, markers, the data pipeline's queue sampler);
  * ``profiler`` -- ``insight.Profiler`` (all collectors, memory and dataset tables, the background
                    writer flushing every ``--flush-interval`` = 1 s, the Profiler's default: inside the
                    BERT-small runs, not inside the 0.2 s LeNet runs), started before and stopped after
                    ``Model.train``; only ``Model.train`` is timed, ``stop()`` is reported separately.
A round's figure per variant is the median of its repeats (one run disturbed by the machine does not move
it); we report the median ms/step of each variant
and the overhead vs ``off`` as the median over rounds of the paired (same round) ratios, which is robust
against load drifting on a shared machine, and also the ratio of the medians and the paired ratio of each
round's fastest runs (the run the machine disturbed least: the profiler's own cost, when the others scatter). Goal: <= 2 %.
Every run also records each step's duration (a step_end callback, the same in every variant); the lower
quartile of all steps of all runs of a variant is printed beside the run-level figures: load bursts only ever
lengthen steps, so it is the figure they move least. Two in-situ costs come from one more profiled run with
timers around the profiler's listener (every event) and the executor's event building (``CompiledGraph._emit``:
the static task table once per run, then each step's input-copy task, ``step_tasks`` and markers), in us per
step of the run. The attribution line gives the profiler's hook callback alone (one
real step's events replayed through it) and the writer thread's CPU time while training; how many flushes fell
inside the timed runs is printed too.

(b) Writer throughput. A synthetic stream of ``step_tasks`` events (``--steps`` steps of a graph with
``--tasks`` tasks; one task = one event = one ``tasks`` row) is emitted through ``runtime.hooks`` into a
running Profiler, which is then stopped: the time from the first append to every row being in Parquet
on disk (flushes and the final flush included). Reported with and without the memory table
(which adds two rows per task buffer). Goal: >= 1M events/s.

``--profile`` runs cProfile over profiled training and prints where the extra time goes.
``--summary PATH`` writes the goal rows (benchmarks/_summary.py): the profiled / off step-time ratio of each
model (goal <= 1.02), the tracing-only ratio (reported), the writer's events/s (goal >= 1M).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _summary  # noqa: E402
from insight import Profiler  # noqa: E402
from insight.trace import open_run  # noqa: E402
from runtime import Model, context, hooks, nn  # noqa: E402
from runtime.executor import CompiledGraph  # noqa: E402
from runtime.train.callback import Callback  # noqa: E402
from runtime.dataset import NumpySlicesDataset  # noqa: E402
from runtime.dataset.digits import load_digits_split  # noqa: E402
from runtime.models import LeNetDigits  # noqa: E402
from runtime.nn.transformer import BertSmall, bert_batch  # noqa: E402

VARIANTS = ("off", "tracing", "profiler")
SKIP_STEPS = 5  # the first steps of a run (the pipeline filling, a listener's first events) are left out per step


# -- (a) overhead --------------------------------------------------------------------------------------------
class StepStamps(Callback):
    """The end time of every step (and the start of training): per-step durations, the same callback in every
    variant."""

    def __init__(self):
        self.t: list[int] = []

    def begin(self, run_context):
        self.t.append(time.perf_counter_ns())

    def step_end(self, run_context):
        self.t.append(time.perf_counter_ns())

    def durations_us(self, skip: int = SKIP_STEPS) -> np.ndarray:
        d = np.diff(np.asarray(self.t, np.int64)) / 1e3
        return d[skip:] if len(d) > 2 * skip else d  # a short run (BERT-small's 2 steps) keeps every step


class Training:
    """One model's timed training run: ``run()`` trains ``epochs`` epochs of ``steps`` steps in all and
    returns ms/step (the run's step durations, microseconds, in ``last_steps_us``); ``bench_batch`` is one
    (data, label) batch for the hook-cost replay."""

    def __init__(self, name: str, model: Model, dataset, epochs: int, steps: int, bench_batch):
        self.name, self.model, self.dataset, self.epochs, self.steps = name, model, dataset, epochs, steps
        self.bench_batch = bench_batch
        self.last_steps_us = np.empty(0)

    def run(self) -> float:
        stamps = StepStamps()
        t = time.perf_counter()
        self.model.train(self.epochs, self.dataset, callbacks=[stamps])
        ms = (time.perf_counter() - t) / self.steps * 1e3
        self.last_steps_us = stamps.durations_us()
        return ms


def make_lenet(epochs: int) -> Training:
    context.set_context(mode=context.GRAPH_MODE, seed=0, enable_graph_kernel=False)
    xtr, ytr, _, _ = load_digits_split(seed=0)
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    ds = NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=0).batch(32, drop_remainder=True)
    return Training(f"LeNet (digits, batch 32, {epochs} epochs/run)", model, ds, epochs,
                    epochs * (len(xtr) // 32), (xtr[:32], ytr[:32]))


def make_bert(steps: int, quick: bool) -> Training:
    cfg = dict(batch=4, seq=64, layers=2, hidden=128, heads=4) if quick else \
        dict(batch=16, seq=128, layers=4, hidden=256, heads=4)
    context.set_context(mode=context.GRAPH_MODE, seed=0, enable_graph_kernel=True)
    net = BertSmall(vocab_size=1000, hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_heads=cfg["heads"],
                    max_position=cfg["seq"])
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Adam(net.trainable_params(), 1e-4), progress=False)
    ids, labels = bert_batch(cfg["batch"] * steps, cfg["seq"])
    ds = NumpySlicesDataset((ids, labels), ["ids", "label"], shuffle=True, seed=0).batch(cfg["batch"],
                                                                                       drop_remainder=True)
    desc = ", ".join(f"{k} {v}" for k, v in cfg.items())
    return Training(f"BERT-small ({desc}, fusion on, {steps} steps/run)", model, ds, 1, steps,
                    (ids[:cfg["batch"]], labels[:cfg["batch"]]))


def run_overhead(tr: Training, rounds: int, repeats: int, tmp: Path, flush_interval: float) -> dict:
    tr.run()  # warm-up: compile, caches
    ms = {v: [] for v in VARIANTS}  # per round: the median ms/step of its repeats
    steps_us = {v: [] for v in VARIANTS}  # every run's step durations (after its first SKIP_STEPS)
    fastest = {v: [] for v in VARIANTS}  # per round: the fastest of its repeats
    finish, writer_cpu, flushes_inside, cpu_per_flush = [], [], [], []
    n = 0

    def run(v):
        nonlocal n
        if v == "off":
            return tr.run()
        if v == "tracing":
            fn = hooks.subscribe(lambda kind, ev: None)
            try:
                return tr.run()
            finally:
                hooks.unsubscribe(fn)
        n += 1
        prof = Profiler(tmp / f"run{n}", flush_interval=flush_interval)
        try:
            ms_step = tr.run()
            w = prof._writer
            cpu_s, flushes = w.background_cpu_s, w.flushes
            writer_cpu.append(cpu_s / (ms_step * tr.steps / 1e3))
            flushes_inside.append(flushes)
            if flushes:
                cpu_per_flush.append(cpu_s / flushes)
            return ms_step
        finally:
            t = time.perf_counter()
            prof.stop()
            finish.append(time.perf_counter() - t)

    k = 0
    for _ in range(rounds):
        acc = {v: [] for v in VARIANTS}
        for _ in range(repeats):
            order = VARIANTS[k % 3:] + VARIANTS[:k % 3]
            k += 1
            for v in order:
                acc[v].append(run(v))
                steps_us[v].append(tr.last_steps_us)
        for v in VARIANTS:
            ms[v].append(statistics.median(acc[v]))
            fastest[v].append(min(acc[v]))
    run_dir = tmp / f"run{n}"
    rows = len(open_run(run_dir).table("tasks"))
    res = {"model": tr.name, "steps_per_run": tr.steps, "rounds": rounds, "repeats": repeats,
           "tasks_rows_per_run": rows, "stop_s_median": statistics.median(finish),
           "writer_cpu_share": statistics.median(writer_cpu), "flushes_inside_median": statistics.median(flushes_inside),
           "writer_cpu_ms_per_flush": 1e3 * statistics.median(cpu_per_flush) if cpu_per_flush else None,
           "hook_us_per_step": hook_cost(tr), **in_situ_costs(tr, tmp, flush_interval)}
    every = {v: np.concatenate(steps_us[v]) if steps_us[v] else np.empty(0) for v in VARIANTS}
    q25 = {v: float(np.percentile(every[v], 25)) if len(every[v]) else float("nan") for v in VARIANTS}
    for v in VARIANTS:
        res[f"{v}_step_q25_us"] = q25[v]
        res[f"{v}_ms_per_step"] = statistics.median(ms[v])
    for v in ("tracing", "profiler"):
        paired = [a / b - 1 for a, b in zip(ms[v], ms["off"])]
        res[f"{v}_overhead_pct"] = 100 * statistics.median(paired)
        res[f"{v}_overhead_pct_of_medians"] = 100 * (res[f"{v}_ms_per_step"] / res["off_ms_per_step"] - 1)
        res[f"{v}_overhead_pct_fastest"] = 100 * statistics.median(a / b - 1 for a, b in zip(fastest[v], fastest["off"]))
        res[f"{v}_overhead_pct_step_q25"] = 100 * (q25[v] / q25["off"] - 1)
    res["raw_ms"] = ms
    res["fastest_ms"] = fastest
    return res


def in_situ_costs(tr: Training, tmp: Path, flush_interval: float) -> dict:
    """What the profiler's per-step work costs inside real training (cold caches included), from one profiled
    run with two pieces wrapped by timers: the profiler's listener (every event it receives) and the executor's
    event building (``CompiledGraph._emit``: the static task table once, then each step's input-copy task,
    ``step_tasks`` and markers); microseconds per step of the run. A wrapper's own two clock reads per call are
    included (~0.1 us)."""
    spent = {"listener": 0, "emit": 0}
    emit0 = CompiledGraph._emit

    def emit(self, *a, **kw):
        t = time.perf_counter_ns()
        try:
            return emit0(self, *a, **kw)
        finally:
            spent["emit"] += time.perf_counter_ns() - t

    prof = Profiler(tmp / "in_situ", flush_interval=flush_interval)
    listener = prof._listener
    hooks.unsubscribe(listener)

    def timed(kind, ev):
        t = time.perf_counter_ns()
        try:
            listener(kind, ev)
        finally:
            spent["listener"] += time.perf_counter_ns() - t

    hooks.subscribe(timed)
    CompiledGraph._emit = emit
    try:
        tr.run()
    finally:
        CompiledGraph._emit = emit0
        hooks.unsubscribe(timed)
        prof.stop()
    return {"listener_us_per_step_in_situ": spent["listener"] / tr.steps / 1e3,
            "executor_emit_us_per_step_in_situ": spent["emit"] / tr.steps / 1e3}


def hook_cost(tr: Training, reps: int = 1000) -> float:
    """The profiler's hot path alone: one real step's events (step begin/end, the input-copy task,
    step_tasks) replayed through a recording Profiler's hook callback; microseconds per step."""
    events = []
    fn = hooks.subscribe(lambda kind, ev: events.append((kind, ev)))
    try:
        tr.model.train(1, [tr.bench_batch])
    finally:
        hooks.unsubscribe(fn)
    events = [(k, e) for k, e in events if k in ("step", "task", "step_tasks")]
    prof = Profiler(Path(tempfile.mkdtemp(prefix="insight-hook-")) / "run", flush_interval=3600)
    listener = prof._listener
    try:
        t = time.perf_counter_ns()
        for _ in range(reps):
            for k, e in events:
                listener(k, e)
        return (time.perf_counter_ns() - t) / reps / 1e3
    finally:
        prof.stop()
        shutil.rmtree(prof.path.parent, ignore_errors=True)


def profile_training(tr: Training, tmp: Path) -> str:
    tr.run()
    out = []
    for label in ("off", "profiler"):
        prof = Profiler(tmp / "cprofile", overwrite=True) if label == "profiler" else None
        pr = cProfile.Profile()
        pr.enable()
        tr.run()
        pr.disable()
        if prof is not None:
            prof.stop()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        out.append(f"---- cProfile, {tr.name}, {label} (tottime) ----\n" + s.getvalue())
    return "\n".join(out)


def print_overhead(o: dict, flush_interval: float) -> None:
    print(f"(a) profiler overhead: {o['model']} = {o['steps_per_run']} steps/run, graph mode, {o['rounds']} "
          f"interleaved rounds x {o['repeats']} runs per variant; load average {os.getloadavg()[0]:.1f}")
    print(f"    off        {o['off_ms_per_step']:.3f} ms/step")
    print(f"    tracing    {o['tracing_ms_per_step']:.3f} ms/step   "
          f"{o['tracing_overhead_pct']:+.2f} % (paired), {o['tracing_overhead_pct_of_medians']:+.2f} % (medians), "
          f"{o['tracing_overhead_pct_fastest']:+.2f} % (paired fastest runs)"
          "   [no-op hook subscriber: the runtime's tracing path alone]")
    print(f"    profiler   {o['profiler_ms_per_step']:.3f} ms/step   "
          f"{o['profiler_overhead_pct']:+.2f} % (paired), {o['profiler_overhead_pct_of_medians']:+.2f} % (medians), "
          f"{o['profiler_overhead_pct_fastest']:+.2f} % (paired fastest runs)"
          f"   [goal <= 2 %]")
    print(f"    per step (lower quartile of every step of every run, the first {SKIP_STEPS} of each longer run left out: "
          f"bursts of load only lengthen steps): off {o['off_step_q25_us']:.1f} us, tracing "
          f"{o['tracing_step_q25_us']:.1f} us ({o['tracing_overhead_pct_step_q25']:+.2f} %), profiler "
          f"{o['profiler_step_q25_us']:.1f} us ({o['profiler_overhead_pct_step_q25']:+.2f} %)")
    step_us = o["off_ms_per_step"] * 1e3
    print(f"    in real training: the profiler's listener {o['listener_us_per_step_in_situ']:.1f} us/step "
          f"({100 * o['listener_us_per_step_in_situ'] / step_us:.2f} %), the executor's events (its task table "
          f"once a run, divided over the run's steps) "
          f"{o['executor_emit_us_per_step_in_situ']:.1f} us/step "
          f"({100 * o['executor_emit_us_per_step_in_situ'] / step_us:.2f} %)")
    print(f"    attribution: profiler hook callback {o['hook_us_per_step']:.1f} us/step "
          f"({100 * o['hook_us_per_step'] / 1e3 / o['off_ms_per_step']:.2f} % of a step); writer thread "
          f"{100 * o['writer_cpu_share']:.1f} % of one core while training (CPU time; flushing every "
          f"{flush_interval} s, {o['flushes_inside_median']:g} flushes inside a timed run"
          + (f", {o['writer_cpu_ms_per_flush']:.1f} ms CPU per flush" if o["writer_cpu_ms_per_flush"] else "")
          + "); the rest of "
          f"'tracing' is the runtime's traced path (runtime/executor.py, the data pipeline's queue sampler)")
    print(f"    stop() (last flush of {o['tasks_rows_per_run']} task rows in all): "
          f"{o['stop_s_median'] * 1e3:.1f} ms median, not counted above")


# -- (b) writer throughput -------------------------------------------------------------------------------------
def synthetic_table(n_tasks: int) -> dict:
    rng = np.random.default_rng(0)
    ids = list(range(n_tasks))
    ops = ["conv2d", "matmul", "add", "relu", "reduce_sum", "mul", "sub", "reshape"]
    sizes = rng.choice([0, 512, 4096, 131072], n_tasks).tolist()
    free = [min(n_tasks - 1, i + int(k)) if s else -1 for i, (s, k) in enumerate(zip(sizes, rng.integers(1, 20, n_tasks)))]
    return {"graph": "train_step", "graph_id": 12345, "planned_peak": 1 << 24, "parameter_bytes": 1 << 20,
            "capacity": 1 << 30, "columns": {
                "task_id": ids, "name": [f"{ops[i % 8]}_{i}" for i in ids], "op": [ops[i % 8] for i in ids],
                "kind": ["kernel"] * n_tasks, "stream": ["aicore0"] * n_tasks, "stream_id": [0] * n_tasks,
                "scope": [f"Net/layer{i // 10}" for i in ids], "shape": ["32x16x8x8"] * n_tasks,
                "dtype": ["float32"] * n_tasks, "flops": rng.integers(0, 1 << 20, n_tasks).tolist(),
                "bytes": rng.integers(0, 1 << 18, n_tasks).tolist(),
                "phase": (["forward"] * (n_tasks // 3) + ["backward"] * (n_tasks // 3)
                          + ["update"] * (n_tasks - 2 * (n_tasks // 3))),
                "fused_ops": [""] * n_tasks, "out_size": sizes, "out_offset": [0] * n_tasks, "free_task_id": free}}


def run_throughput(n_steps: int, n_tasks: int, tmp: Path, profile_memory: bool, steps_per_flush: int = 1000) -> dict:
    """Emit the synthetic stream through runtime.hooks into a Profiler; every ``steps_per_flush`` steps the
    writer flushes (what its background thread does every ``flush_interval``, here driven explicitly so
    the run has several parts and the numbers do not depend on the timer); then ``stop()`` (the final flush)."""
    table = synthetic_table(n_tasks)
    base = time.perf_counter_ns()
    durs = np.random.default_rng(1).integers(1_000, 50_000, (n_steps, n_tasks), dtype=np.int64)
    ends = base + np.cumsum(durs, axis=None).reshape(n_steps, n_tasks)
    starts = ends - durs + 200
    ids = np.arange(n_tasks, dtype=np.int32)
    events = [{"graph": "train_step", "graph_id": 12345, "step": s, "task_id": ids, "start_ns": starts[s],
               "end_ns": ends[s]} for s in range(n_steps)]
    out = tmp / f"throughput_{int(profile_memory)}"
    prof = Profiler(out, profile_memory=profile_memory, data_process=False, overwrite=True, flush_interval=3600)
    writer = prof._writer
    emit = hooks.emit
    c0, t0 = time.process_time(), time.perf_counter()
    t_emit = 0.0
    emit("task_table", table)
    for k in range(0, n_steps, steps_per_flush):
        te = time.perf_counter()
        for ev in events[k:k + steps_per_flush]:
            emit("step_tasks", ev)
        t_emit += time.perf_counter() - te
        writer.flush()
    t_parts, c_parts = time.perf_counter() - t0, time.process_time() - c0
    prof.stop()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    run = open_run(out)
    rows = len(run.table("tasks", columns=["step"]))
    assert rows == n_steps * n_tasks, (rows, n_steps * n_tasks)
    mem_rows = len(run.table("memory", columns=["t_ns"])) if profile_memory else 0
    size = sum(f.stat().st_size for f in (out / "rank_0").rglob("*.parquet"))
    return {"events": rows, "memory_rows": mem_rows, "parts": writer.parts["tasks"],
            "parts_seconds": t_parts, "parts_events_per_s": rows / t_parts, "parts_cpu_s": c_parts,
            "seconds": total, "events_per_s": rows / total, "cpu_s": cpu,
            "append_us_per_step_event": t_emit / n_steps * 1e6, "bytes_on_disk": size}


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for key, label in (("lenet", "LeNet"), ("bert", "BERT-small")):
        o = results.get(f"overhead_{key}")
        if o is None:
            continue
        rows.append(_summary.row(f"profiler overhead, {label}: step time profiled / off (paired median)",
                                 o["profiler_ms_per_step"], o["off_ms_per_step"],
                                 ratio=1 + o["profiler_overhead_pct"] / 100, unit="ms/step", goal="<= 1.02"))
        rows.append(_summary.row(f"tracing overhead, {label}: step time no-op subscriber / off (paired median)",
                                 o["tracing_ms_per_step"], o["off_ms_per_step"],
                                 ratio=1 + o["tracing_overhead_pct"] / 100, unit="ms/step"))
    for mem in (False, True):
        t = results.get(f"throughput_memory_{mem}")
        if t is not None:
            rows.append(_summary.row(f"writer throughput, tasks{' + memory' if mem else ''} (to Parquet, stop included)",
                                     t["events_per_s"], unit="events/s", goal=">= 1000000"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=4, help="runs of each variant per round (LeNet)")
    ap.add_argument("--epochs", type=int, default=3, help="LeNet epochs per run")
    ap.add_argument("--model", choices=("lenet", "bert", "both"), default="both")
    ap.add_argument("--bert-steps", type=int, default=2, help="BERT-small steps per run")
    ap.add_argument("--bert-repeats", type=int, default=1, help="runs of each variant per round (BERT-small)")
    ap.add_argument("--bert-quick", action="store_true", help="a smaller BERT (2 layers, hidden 128, seq 64, batch 4)")
    ap.add_argument("--flush-interval", type=float, default=1.0,
                    help="the profiler's flush interval in (a): the Profiler's default, so the writer works as often "
                         "as in a real run (a LeNet run is shorter than one interval; a BERT-small run is not)")
    ap.add_argument("--steps", type=int, default=20000, help="synthetic steps for the throughput test")
    ap.add_argument("--tasks", type=int, default=200, help="tasks per synthetic step")
    ap.add_argument("--profile", action="store_true", help="cProfile a profiled training (LeNet)")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--summary", help="write the goal rows here (benchmarks/_summary.py format)")
    args = ap.parse_args(argv)
    if min(args.rounds, args.repeats, args.epochs, args.bert_steps, args.bert_repeats) < 1:
        ap.error("--rounds, --repeats, --epochs, --bert-steps and --bert-repeats must be >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="insight-bench-"))
    results: dict = {}
    try:
        if not args.skip_overhead:
            if args.model in ("lenet", "both"):
                o = run_overhead(make_lenet(args.epochs), args.rounds, args.repeats, tmp / "lenet",
                                 args.flush_interval)
                results["overhead_lenet"] = o
                print_overhead(o, args.flush_interval)
            if args.model in ("bert", "both"):
                o = run_overhead(make_bert(args.bert_steps, args.bert_quick), args.rounds, args.bert_repeats,
                                 tmp / "bert", args.flush_interval)
                results["overhead_bert"] = o
                print_overhead(o, args.flush_interval)
        print(f"(b) writer throughput: {args.steps} synthetic step_tasks events x {args.tasks} tasks = "
              f"{args.steps * args.tasks:,} task events, a flush every 1000 steps; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (cpu = this process's CPU seconds)")
        for mem in (False, True):
            t = run_throughput(args.steps, args.tasks, tmp, mem)
            results[f"throughput_memory_{mem}"] = t
            label = "tasks + memory" if mem else "tasks only    "
            extra = f" (+{t['memory_rows']:,} memory rows)" if mem else ""
            print(f"    {label}  append -> {t['parts']} part files: {t['parts_events_per_s'] / 1e6:.2f} M events/s "
                  f"({t['parts_seconds']:.2f} s, cpu {t['parts_cpu_s']:.2f} s);  + stop: "
                  f"{t['events_per_s'] / 1e6:.2f} M events/s ({t['seconds']:.2f} s, cpu {t['cpu_s']:.2f} s){extra}; "
                  f"hot-path append {t['append_us_per_step_event']:.2f} us/step_tasks event; "
                  f"{t['bytes_on_disk'] / 1e6:.1f} MB   [goal >= 1 M/s]")
        if args.profile:
            print(profile_training(make_lenet(args.epochs), tmp))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        _summary.write(args.summary, "bench_profiler", summary_rows(results))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
