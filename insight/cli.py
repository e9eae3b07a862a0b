"""The ``insight`` command line.

    insight report RUN                 terminal summary of a profiled run
    insight runs DIR                   the runs under DIR
    insight export RUN --format chrome|csv [--gzip] [--output PATH]
    insight demo [--output DIR]        train the digits CNN (profiled into DIR/<name> when --output is given)

A run that cannot be read (missing manifest, newer schema, truncated Parquet, ...) prints one line to
stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from insight.trace import TraceError

EXIT_BAD_RUN = 2


# -- formatting helpers -----------------------------------------------------------------------------------
def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f} ms"


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * 100:.1f}%"


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cut(s, n: int) -> str:
    s = "".join(ch if ch.isprintable() else "?" for ch in str(s))
    return s if len(s) <= n else s[: n - 1] + "…"


def _table(rows: list[list], header: list[str], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        out.append(indent + "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                                      for i, c in enumerate(r)).rstrip())
    return out


def _stages(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not sys.stderr.isatty(), file=sys.stderr, leave=False, unit="stage")


# -- report -------------------------------------------------------------------------------------------------
def report_lines(run_path, top: int = 10, rank: int = 0) -> list[str]:
    """The text ``insight report`` prints (a function so tests and the dashboard can reuse it)."""
    from insight import analysis as A
    from insight.analysis._io import as_run, capacity_bytes

    with _stages(5) as bar:
        run = as_run(run_path)
        bar.set_description("steps")
        bd = A.step_breakdown(run, rank)
        s = A.summarize(bd)
        bar.update()
        bar.set_description("ops")
        ops = A.op_stats(run, rank=rank)
        types = A.op_type_stats(run, rank=rank)
        bar.update()
        bar.set_description("data pipeline")
        pipe = A.data_pipeline(run, rank, breakdown=bd)
        bar.update()
        bar.set_description("memory")
        peak = A.memory_peak(run, rank=rank)
        bar.update()
        advice = A.advise(s, pipe, peak, types)
        bar.update()

    m = run.manifest
    dev = m.get("device") or {}
    cap = capacity_bytes(run)
    L = [f"Run {run.name}  ({run.path})",
         f"  created {m.get('created', '?')}, status {m.get('status', '?')}, device {dev.get('target', '?')}"
         + (f" ({_mib(cap)})" if cap else "") + f", ranks {run.ranks}", ""]

    # step trace
    if s.steps == 0:
        L += ["Step trace: no steps recorded", ""]
    else:
        excl = f", step {s.excluded_steps[0]} excluded" if s.excluded_steps else ""
        L.append(f"Step trace: {s.steps} steps ({s.first_step}..{s.last_step}); averages over {s.steps_averaged}{excl}")
        st = s.step_time_ms
        share = (lambda v: f"({v / st * 100:5.1f}%)" if st and math.isfinite(st) and st > 0 else "")
        L += _table([
            ["step time", _ms(st), ""],
            ["iteration interval", _ms(s.iteration_interval_ms), share(s.iteration_interval_ms)],
            ["fp+bp", _ms(s.fp_bp_ms), share(s.fp_bp_ms) + (f"  {s.fp_start_op} -> {s.bp_end_op}" if s.fp_start_op else "")],
            ["tail", _ms(s.tail_ms), share(s.tail_ms)],
            ["allreduce (overlaps)", _ms(s.allreduce_ms), share(s.allreduce_ms)],
            ["device utilisation", _pct(s.device_utilization), ""],
        ], ["", "", ""], right={1})[1:]
        L.append("")

    # ops
    if len(types):
        total = types["total_ms"].sum()
        L.append(f"Top op types (of {len(types)}; {total:.3f} ms in {int(types['calls'].sum())} tasks, "
                 f"{len(ops)} ops)")
        L += _table([[_cut(r.op, 24), r.calls, f"{r.total_ms:.3f}", f"{r.avg_ms:.4f}", _pct(r.share)]
                     for r in A.top_n(types, top).itertuples()],
                    ["op type", "calls", "total ms", "avg ms", "share"], right={1, 2, 3, 4})
        L.append("")
        L.append(f"Top ops (of {len(ops)})")
        L += _table([[_cut(r.name, 32), _cut(r.op, 16), r.calls, f"{r.total_ms:.3f}", f"{r.avg_ms:.4f}", _pct(r.share),
                      _gflops(r.flop_per_s), _cut(r.scope, 28)]
                     for r in A.top_n(ops, top).itertuples()],
                    ["op", "type", "calls", "total ms", "avg ms", "share", "GFLOP/s", "scope"], right={2, 3, 4, 5, 6})
        L.append("")
    else:
        L += ["Ops: no tasks recorded", ""]

    # data pipeline
    L.append("Data pipeline")
    verdicts = {"data_processing": "data processing is the bottleneck", "data_transfer": "data transfer is the bottleneck",
                "none": "data is not the bottleneck", "unknown": "no data-pipeline data recorded"}
    L.append(f"  input-bound: {pipe.input_bound} (input share {_pct(pipe.input_share)}; <5% not, 5-20% moderately, "
             f">=20% highly)")
    L.append(f"  verdict: {verdicts.get(pipe.verdict, pipe.verdict)}"
             + (f"; bottleneck op: {pipe.bottleneck_label}" if pipe.bottleneck_label else ""))
    if pipe.host_queue_empty_ratio is not None:
        L.append(f"  host queue empty in {_pct(pipe.host_queue_empty_ratio)} of {pipe.host_queue_samples} samples; "
                 f"device queue empty at {pipe.device_queue_empty_pops} of {pipe.device_queue_pops} GetNext")
    elif pipe.device_queue_pops:
        L.append(f"  device queue empty at {pipe.device_queue_empty_pops} of {pipe.device_queue_pops} GetNext")
    if len(pipe.ops):
        L += _table([[r.op_id, r.op_type, r.parent_id, r.num_workers, "-" if not math.isfinite(r.queue_usage)
                      else f"{r.queue_usage:.2f}", "yes" if r.flagged else "", _cut(r.reason, 60)]
                     for r in pipe.ops.itertuples()],
                    ["id", "op", "parent", "workers", "queue usage", "flagged", "why"], right={0, 2, 3, 4})
    L.append("")

    # memory
    if peak.peak_bytes:
        frag = "" if peak.fragmentation is None else f", fragmentation {peak.fragmentation:.2f}"
        of = f" of {_mib(peak.capacity)} ({_pct(peak.share_of_capacity)})" if peak.capacity else ""
        L.append(f"Memory: peak {_mib(peak.peak_bytes)}{of} at step {peak.step}{frag}; "
                 f"{peak.allocations} allocations, {peak.frees} frees")
        if peak.untracked_bytes:
            L.append(f"  {peak.untracked_bytes / 2**10:.1f} KiB of the peak is in blocks no recorded allocation "
                     f"describes (e.g. parameters placed before recording); {len(peak.live)} recorded tensors live")
        L += _table([[_cut(r.name, 32), _cut(r.op, 20), _mib(r.size), _cut(r.shape, 16), r.dtype, _cut(r.scope, 24)]
                     for r in peak.live.head(5).itertuples()],
                    ["live tensor", "op", "size", "shape", "dtype", "scope"], right={2})
    else:
        L.append("Memory: no memory events recorded")
    L.append("")

    # advice
    L.append("Advice" if advice else "Advice: nothing stands out")
    for r in advice:
        L.append(f"  [{r.severity}] {r.title}: {r.detail}")
    return L


def _gflops(v) -> str:
    return f"{v / 1e9:.2f}" if v and math.isfinite(v) else "-"


def _report(args) -> int:
    lines = report_lines(args.run, top=args.top, rank=args.rank)
    print("\n".join(lines))
    return 0


# -- runs ---------------------------------------------------------------------------------------------------
def _runs(args) -> int:
    from insight import analysis as A
    from insight.analysis.steps import step_times
    from insight.trace import find_runs, open_run

    rows = []
    for p in find_runs(args.dir):
        try:
            run = open_run(p)
            m = run.manifest
            s = A.summarize(step_times(run))  # markers only: listing never reads task tables
            rows.append([_cut(run.name, 40), _cut(m.get("created", ""), 25), s.steps, _ms(s.step_time_ms),
                         _cut((m.get("device") or {}).get("target", ""), 12), _cut(m.get("status", ""), 10)])
        except TraceError as e:
            print(f"insight runs: skipping {p.name}: {_one_line(e)}", file=sys.stderr)
            rows.append([_cut(p.name, 40), "", "", "", "", "unreadable"])
    if not rows:
        print(f"no runs in {args.dir}")
        return 0
    print("\n".join(_table(rows, ["name", "created", "steps", "avg step", "device", "status"], right={2, 3}, indent="")))
    return 0


# -- export -------------------------------------------------------------------------------------------------
def _export(args) -> int:
    from insight.analysis._io import as_run
    from insight.export import export_chrome, export_csv

    run = as_run(args.run)
    if args.format == "chrome":
        out = Path(args.output) if args.output else Path(f"{run.name}.trace.json" + (".gz" if args.gzip else ""))
        res = export_chrome(run, out, gzip=args.gzip, progress=sys.stderr.isatty())
        print(f"wrote {res.path} ({res.events} events, {res.task_events} tasks, {res.bytes / 2**20:.1f} MiB); "
              f"open it in https://ui.perfetto.dev or chrome://tracing")
    else:
        if args.gzip:
            print("insight export: --gzip applies to --format chrome only", file=sys.stderr)
            return EXIT_BAD_RUN
        out = Path(args.output) if args.output else Path(f"{run.name}_csv")
        paths = export_csv(run, out)
        print(f"wrote {len(paths)} CSV files to {out}")
    return 0


# -- demo ---------------------------------------------------------------------------------------------------
def _demo(args) -> int:
    import numpy as np

    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.dataset.digits import load_digits_split
    from runtime.models import LeNetDigits
    from runtime.train import LossMonitor, TimeMonitor

    Profiler = None
    if args.output:
        try:
            from insight import Profiler  # noqa: F811 - written by the profiler work
        except ImportError:
            print("insight demo: insight.Profiler is not available in this version; training without profiling "
                  "(no run written)", file=sys.stderr)

    context.set_context(mode=context.GRAPH_MODE, seed=args.seed)
    xtr, ytr, xte, yte = load_digits_split(seed=args.seed)
    train = (NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=args.seed)
             .map(_normalize, input_columns="image", num_parallel_workers=2)
             .batch(32, drop_remainder=True))
    test = NumpySlicesDataset((xte, yte), ["image", "label"]).map(_normalize, input_columns="image").batch(128)
    net = LeNetDigits()
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), learning_rate=0.05, momentum=0.9),
                  metrics=["accuracy"])
    sink = Profiler is not None or args.sink
    print(f"training LeNet on the scikit-learn digits ({len(xtr)} train / {len(xte)} test images), "
          f"{args.epochs} epochs, graph mode" + (", data sink mode" if sink else ""))
    cbs = [TimeMonitor()] + ([LossMonitor(per_print_times=45)] if args.verbose else [])
    run_dir = None
    if Profiler is not None:
        name = args.name or "demo-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.output) / name
        Path(args.output).mkdir(parents=True, exist_ok=True)
        from insight import ProfilerError
        try:
            prof = Profiler(output_path=str(run_dir))
        except ProfilerError as e:  # e.g. the directory already holds a run
            print(f"insight demo: {_one_line(e)}", file=sys.stderr)
            return EXIT_BAD_RUN
        with prof:
            model.train(args.epochs, train, callbacks=cbs, dataset_sink_mode=True)
    else:
        model.train(args.epochs, train, callbacks=cbs, dataset_sink_mode=sink)
    acc = model.eval(test)["accuracy"]
    print(f"test accuracy: {acc * 100:.2f}%")
    if run_dir is not None:
        print(f"profile written to {run_dir}; summarise it with: insight report {run_dir}")
    return 0 if np.isfinite(acc) else 1


def _normalize(image):
    """The demo's map operation: centre the [0, 1] pixels."""
    return (image - 0.5) * 2.0


# -- dashboard ----------------------------------------------------------------------------------------------
def _start(args) -> int:
    from dashboard.server import serve

    if args.reload_interval <= 0:
        print("insight start: --reload-interval must be positive", file=sys.stderr)
        return 2
    try:
        return serve(args.summary_base_dir, host=args.host, port=args.port, reload_interval=args.reload_interval)
    except OSError as e:  # e.g. the port is taken
        print(f"insight start: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2


def _stop(args) -> int:
    from dashboard.server import stop

    return stop(args.port)


# -- main ---------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insight", description="Insight: a profiler and dashboard for the "
                                     "Insight training runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("report", help="print a summary of a profiled run")
    p.add_argument("run", help="the run directory")
    p.add_argument("--top", type=int, default=10, help="rows in the op tables (default 10)")
    p.add_argument("--rank", type=int, default=0)
    p.set_defaults(fn=_report)

    p = sub.add_parser("runs", help="list the runs in a directory")
    p.add_argument("dir", help="a directory of runs (or a run)")
    p.set_defaults(fn=_runs)

    p = sub.add_parser("export", help="export a run as Chrome trace JSON or CSV tables")
    p.add_argument("run", help="the run directory")
    p.add_argument("--format", choices=("chrome", "csv"), default="chrome")
    p.add_argument("--gzip", action="store_true", help="gzip the Chrome trace (.json.gz; Perfetto opens it)")
    p.add_argument("--output", "-o", help="output file (chrome) or directory (csv); default: in the current "
                                          "directory, named after the run")
    p.set_defaults(fn=_export)

    p = sub.add_parser("start", help="serve the dashboard for the runs under a directory")
    p.add_argument("--summary-base-dir", required=True, help="a directory whose sub-directories are runs")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--reload-interval", type=float, default=3.0, help="seconds between scans for new runs")
    p.set_defaults(fn=_start)

    p = sub.add_parser("stop", help="stop a dashboard started with `insight start`")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(fn=_stop)

    p = sub.add_parser("demo", help="train the digits CNN (LeNet) in graph mode")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="print the loss during training")
    p.add_argument("--output", help="profile the training with insight.Profiler into OUTPUT/<name>")
    p.add_argument("--name", help="the run's name (default demo-<UTC time>)")
    p.add_argument("--sink", action="store_true", help="data sink mode without profiling too")
    p.set_defaults(fn=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TraceError as e:
        print(f"insight {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_RUN
    except BrokenPipeError:  # e.g. `insight report RUN | head`
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
