"""The ``insight`` command line.

    insight report RUN                 terminal summary of a profiled run
    insight runs DIR                   the runs under DIR
    insight export RUN --format chrome|csv [--gzip] [--output PATH] [--force]
    insight demo [--output DIR]        train the digits CNN (profiled into DIR/<name> when --output is given)
    insight start --summary-base-dir DIR [--host H] [--port P]    serve the dashboard
    insight stop [--port P]            stop the dashboard started on that port

A run that cannot be read (missing manifest, newer schema, truncated Parquet, ...), a bad argument
(a port outside 1-65535, an unresolvable host, an output path that cannot be written) or an export
that would overwrite something prints one line to stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import ipaddress
import math
import os
import socket
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from insight.trace import TraceError

EXIT_BAD_RUN = 2
EXIT_USAGE = 2

# Subcommands that live in their own module: each module has ``add_parser(subparsers)`` (adding one or
# more sub-parsers) and ``run(args) -> int``. Wiring a new one is one line here.
SUBCOMMAND_MODULES: tuple[str, ...] = ("insight.importer.cli",)


class UsageError(Exception):
    """A bad command-line argument or destination: printed as one line, exit code 2."""


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
    from insight.analysis.advice import IMPORTED_SOURCES, has_device

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
        advice = A.advise(s, pipe, peak, types, device=has_device(run, rank))
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
    if (run.manifest or {}).get("source") in IMPORTED_SOURCES:  # a torch.profiler / Chrome trace: the plugin's view
        L += A.gpu.report_lines(run, rank, top) + [""]

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
                    ["op", "type", "calls", "total ms", "avg ms", "share", "est.GFLOP/s", "scope"], right={2, 3, 4, 5, 6})
        L.append("")
    else:
        L += ["Ops: no tasks recorded", ""]

    # data pipeline
    L.append("Data pipeline")
    L.append(f"  input-bound: {pipe.input_bound} (input share {_pct(pipe.input_share)}; <5% not, 5-20% moderately, "
             f">=20% highly)")
    L.append(f"  verdict: {pipe.verdict_text[0].lower() + pipe.verdict_text[1:]}"  # the analysis' one verdict
             + (f"; {'bottleneck op' if pipe.verdict == 'data_processing' else 'slowest stage'}: "
                f"{pipe.bottleneck_label}" if pipe.bottleneck_label else ""))
    if pipe.verdict_reason:
        L.append(f"    because {pipe.verdict_reason}")
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

    # cluster: every rank of a multi-process run (the sections above are --rank's)
    from insight.analysis.cluster import cluster_lines, cluster_report, is_cluster_run
    if is_cluster_run(run):
        L += cluster_lines(cluster_report(run)) + [""]

    # advice
    L.append("Advice" if advice else "Advice: nothing stands out")
    for r in advice:
        L.append(f"  [{r.severity}] {r.title}: {r.detail}")
    return L


def _gflops(v) -> str:
    return f"{v / 1e9:.2f}" if v and math.isfinite(v) else "-"


def _report(args) -> int:
    from insight.analysis._io import as_run

    run = as_run(args.run)
    m = run.manifest if isinstance(run.manifest, dict) else {}
    notes = []
    present = [r for r in run.ranks if (run.path / f"rank_{r}").is_dir()] or run.ranks
    failed = _failed_ranks(m)
    healthy = [r for r in present if r not in failed]
    if m.get("status") == "failed" and not (failed and healthy):  # the profiler could not write the run
        err = m.get("error")
        raise TraceError(f"run {_cut(run.name, 80)!r}: recording failed"
                         + (f": {_cut(err, 300)}" if isinstance(err, str) and err else "")
                         + "; its tables are incomplete")
    if failed:  # one rank of a multi-rank run failed: the others are still worth reading
        notes.append(f"Note: rank {', '.join(map(str, failed))} of {len(run.ranks)} failed while recording; "
                     f"reporting the healthy rank(s) {', '.join(map(str, healthy))}")
    size = m.get("group_size")
    expected = list(range(size)) if isinstance(size, int) and not isinstance(size, bool) and size > 1 else run.ranks
    missing = [r for r in expected if r not in present]
    if missing:
        notes.append(f"Note: rank {', '.join(map(str, missing))} missing (no rank_N/ directory); "
                     f"reporting rank(s) {', '.join(map(str, healthy))}")
    rank = args.rank if args.rank is not None else (healthy[0] if healthy else run.ranks[0])
    if rank not in run.ranks or (healthy and rank not in healthy):
        raise UsageError(f"--rank {rank}: run {_cut(run.name, 80)!r} has ranks "
                         f"{', '.join(map(str, healthy or present))}")
    lines = report_lines(run, top=args.top, rank=rank)
    print("\n".join(notes + ([""] if notes else []) + lines))
    return 0


def _failed_ranks(m: dict) -> list[int]:
    """Ranks whose own status in the merged manifest is "failed" (``rank_status``)."""
    rs = m.get("rank_status")
    if not isinstance(rs, dict):
        return []
    out = []
    for r, v in rs.items():
        if isinstance(v, dict) and v.get("status") == "failed":
            try:
                out.append(int(r))
            except (TypeError, ValueError):
                continue
    return sorted(out)


# -- runs ---------------------------------------------------------------------------------------------------
def _runs(args) -> int:
    from insight import analysis as A
    from insight.analysis.steps import step_times
    from insight.trace import discover_runs

    rows = []
    for entry in discover_runs(args.dir):  # a broken run (bad manifest, a link out of the dir) is one row
        p = entry.path
        try:
            if entry.run is None:
                raise TraceError(entry.error)
            run = entry.run
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
    from insight.export import ExportError, export_chrome, export_csv, safe_filename

    if args.gzip and args.format != "chrome":
        raise UsageError("--gzip applies to --format chrome only")
    run = as_run(args.run)
    if args.rank not in run.ranks:
        raise UsageError(f"--rank {args.rank}: run {_cut(run.name, 80)!r} has ranks {', '.join(map(str, run.ranks))}")
    try:
        if args.format == "chrome":
            # no -o: a file in the current directory named after the run, whatever its manifest says
            out = Path(args.output) if args.output else Path(safe_filename(run.name, ".trace.json"
                                                                           + (".gz" if args.gzip else "")))
            res = export_chrome(run, out, gzip=args.gzip, progress=sys.stderr.isatty(), overwrite=args.force)
            print(f"wrote {res.path} ({res.events} events, {res.task_events} tasks, {res.bytes / 2**20:.1f} MiB); "
                  f"open it in https://ui.perfetto.dev or chrome://tracing")
        else:
            out = Path(args.output) if args.output else Path(safe_filename(run.name, "_csv"))
            paths = export_csv(run, out, rank=args.rank, overwrite=args.force)
            print(f"wrote {len(paths)} CSV files to {out}")
    except (ExportError, ValueError) as e:
        raise UsageError(_one_line(e)) from None
    except OSError as e:
        raise UsageError(_os_error(e)) from None
    return 0


# -- demo ---------------------------------------------------------------------------------------------------
def _demo(args) -> int:
    import numpy as np

    from runtime import Model, context, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.dataset.digits import load_digits_split
    from runtime.examples.qat import LeNetBN
    from runtime.models import LeNetDigits
    from runtime.models.demo import LabelSmoothingCrossEntropy
    from runtime.train import LossMonitor, TimeMonitor
    from runtime.train.quant import convert_quant_network

    from insight.profiler import Profiler, ProfilerError

    run_dir = None
    if args.output:  # checked before the (slow) training starts
        name = args.name or "demo-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        _writable_dir(args.output, "--output")
        run_dir = Path(args.output) / name
        try:
            prof = Profiler(output_path=str(run_dir), start_profile=False)
        except ProfilerError as e:  # e.g. the directory already holds a run
            raise UsageError(_one_line(e)) from None

    # two compute streams (weight gradients and updates on aicore1), the label smoothing's one-hot on the AI
    # CPU stream and the data sink: every lane of the timeline and every page has something to show
    context.set_context(mode=context.GRAPH_MODE, seed=args.seed, compute_streams=2)
    xtr, ytr, xte, yte = load_digits_split(seed=args.seed)
    train = (NumpySlicesDataset((xtr, ytr), ["image", "label"], shuffle=True, seed=args.seed)
             .map(_normalize, input_columns="image", num_parallel_workers=2)
             .batch(32, drop_remainder=True))
    test = NumpySlicesDataset((xte, yte), ["image", "label"]).map(_normalize, input_columns="image").batch(128)
    model_name = getattr(args, "model", "lenet")
    if model_name == "qat":  # quantization-aware training from the start: fake-quant weights and activations
        net = convert_quant_network(LeNetBN(), bn_fold=True, quant_delay=(0, 0))
    else:
        net = LeNetDigits()
    model = Model(net, LabelSmoothingCrossEntropy(10, smoothing=0.1),
                  nn.Momentum(net.trainable_params(), learning_rate=0.05, momentum=0.9),
                  metrics=["accuracy"])
    sink = run_dir is not None or args.sink
    print(f"training {'LeNet (quantization-aware)' if model_name == 'qat' else 'LeNet'} on the scikit-learn digits "
          f"({len(xtr)} train / {len(xte)} test images), {args.epochs} epochs, graph mode, two compute streams"
          + (", data sink mode" if sink else ""))
    cbs = [TimeMonitor()] + ([LossMonitor(per_print_times=45)] if args.verbose else [])
    if run_dir is not None:
        try:
            prof.start()
            with prof:
                model.train(args.epochs, train, callbacks=cbs, dataset_sink_mode=True)
        except ProfilerError as e:  # e.g. the disk filled up while recording
            raise UsageError(_one_line(e)) from None
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

    addrs = _resolve_host(args.host, args.port)
    if not all(a.is_loopback for a in addrs):
        print(f"insight start: warning: binding {args.host} serves the dashboard -- and every run under "
              f"{args.summary_base_dir} -- to other machines that can reach this one; use --host 127.0.0.1 to keep "
              f"it on this machine", file=sys.stderr, flush=True)
    base = Path(args.summary_base_dir)
    if not base.is_dir():
        raise UsageError(f"--summary-base-dir {args.summary_base_dir}: no such directory")
    try:
        return serve(args.summary_base_dir, host=args.host, port=args.port, reload_interval=args.reload_interval)
    except OSError as e:  # e.g. the port is taken
        raise UsageError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None


def _stop(args) -> int:
    from dashboard.server import PidFileError, stop

    try:
        return stop(args.port)
    except PidFileError as e:
        raise UsageError(_one_line(e)) from None


# -- argument checks ----------------------------------------------------------------------------------------
def _port(text: str) -> int:
    try:
        v = int(text, 10)
    except (TypeError, ValueError):
        v = None
    if v is None or not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is an integer from 1 to 65535, got {text!r}")
    return v


def _int_at_least(lo: int):
    def check(text: str) -> int:
        try:
            v = int(text, 10)
        except (TypeError, ValueError):
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v
    check.__name__ = f"integer >= {lo}"
    return check


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number of seconds, got {text!r}")
    return v


def _host(text: str) -> str:
    if not text or len(text) > 253 or any(c.isspace() or c == "\x00" for c in text):
        raise argparse.ArgumentTypeError(f"not a host name or address: {text!r}")
    return text


def _run_name(text: str) -> str:
    """A run's name is one directory name: no separators, not . or .., no control characters."""
    if (not text or text in (".", "..") or "/" in text or "\\" in text or len(text.encode()) > 200
            or any(not c.isprintable() for c in text)):
        raise argparse.ArgumentTypeError(f"a run name is one directory name (no '/', not '..'), got {text!r}")
    return text


def _resolve_host(host: str, port: int) -> list:
    """The addresses ``host`` resolves to (UsageError when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise UsageError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for *_, sockaddr in infos:
        try:
            out.append(ipaddress.ip_address(sockaddr[0].split("%")[0]))
        except ValueError:
            continue
    if not out:
        raise UsageError(f"--host {host}: resolves to no IP address")
    return out


def _writable_dir(path: str, flag: str) -> Path:
    """``path`` as a directory this process can create files in (created, with its parents, if missing)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    return p


def _os_error(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return f"cannot access{where}: {e.strerror or _one_line(e)}"


# -- main ---------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``insight start: error: ...``), exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="insight", description="Insight: a profiler and dashboard for the "
                     "Insight training runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("report", help="print a summary of a profiled run")
    p.add_argument("run", help="the run directory")
    p.add_argument("--top", type=_int_at_least(1), default=10, help="rows in the op tables (default 10)")
    p.add_argument("--rank", type=_int_at_least(0), default=None,
                   help="the rank to report (default: the first readable rank)")
    p.set_defaults(fn=_report)

    p = sub.add_parser("runs", help="list the runs in a directory")
    p.add_argument("dir", help="a directory of runs (or a run)")
    p.set_defaults(fn=_runs)

    p = sub.add_parser("export", help="export a run as Chrome trace JSON or CSV tables")
    p.add_argument("run", help="the run directory")
    p.add_argument("--format", choices=("chrome", "csv"), default="chrome")
    p.add_argument("--gzip", action="store_true", help="gzip the Chrome trace (.json.gz; Perfetto opens it)")
    p.add_argument("--output", "-o", help="output file (chrome) or directory (csv); its parent directory must exist "
                                          "and it must be outside the run; default: in the current directory, named "
                                          "after the run")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file (CSV files)")
    p.add_argument("--rank", type=_int_at_least(0), default=0, help="the rank the CSV tables describe")
    p.set_defaults(fn=_export)

    p = sub.add_parser("start", help="serve the dashboard for the runs under a directory")
    p.add_argument("--summary-base-dir", required=True, help="a directory whose sub-directories are runs")
    p.add_argument("--port", type=_port, default=8080, help="1-65535 (default 8080)")
    p.add_argument("--host", type=_host, default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else prints a warning)")
    p.add_argument("--reload-interval", type=_seconds, default=3.0, help="seconds between scans for new runs")
    p.set_defaults(fn=_start)

    p = sub.add_parser("stop", help="stop a dashboard started with `insight start`")
    p.add_argument("--port", type=_port, default=8080)
    p.set_defaults(fn=_stop)

    p = sub.add_parser("demo", help="train the digits CNN (LeNet) in graph mode")
    p.add_argument("--epochs", type=_int_at_least(1), default=10)
    p.add_argument("--seed", type=_int_at_least(0), default=1)
    p.add_argument("--verbose", action="store_true", help="print the loss during training")
    p.add_argument("--output", help="profile the training with insight.Profiler into OUTPUT/<name>")
    p.add_argument("--name", type=_run_name, help="the run's name (default demo-<UTC time>)")
    p.add_argument("--sink", action="store_true", help="data sink mode without profiling too")
    p.add_argument("--model", choices=("lenet", "qat"), default="lenet",
                   help="lenet: the digits CNN; qat: its quantization-aware version (fake-quant int8)")
    p.set_defaults(fn=_demo)

    for module in SUBCOMMAND_MODULES:
        mod = importlib.import_module(module)
        before = set(sub.choices)
        mod.add_parser(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(fn=mod.run)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, printed) or --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.fn(args)
    except (TraceError, UsageError) as e:
        print(f"insight {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_RUN
    except OSError as e:  # a file that cannot be read or written: the environment, not a bug
        if isinstance(e, BrokenPipeError):  # e.g. `insight report RUN | head`
            return 0
        print(f"insight {args.command}: {_os_error(e)}", file=sys.stderr)
        return EXIT_BAD_RUN
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
