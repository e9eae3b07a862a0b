"""``insight import TRACE.json[.gz] [TRACE2 ...] --output runs/NAME [--name NAME]``.

Wired into ``insight.cli`` by ``add_parser(subparsers)``; ``run(args)`` returns the exit status: 0, or 2 with
one line on stderr naming the file (and the byte offset) for a malformed trace or an unusable output.
"""
from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import", help="import PyTorch (Kineto) or other Chrome trace JSON as an Insight run",
        description="Read Chrome trace-event JSON (torch.profiler / Kineto traces, Perfetto-style traces, "
                    "Insight's own export), .json or .json.gz, streaming, and write an Insight run. Several "
                    "files are the ranks of one run (rank from distributedInfo, else their order).")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (.json or .json.gz)")
    p.add_argument("--output", "-o", required=True, help="the run directory to create (e.g. runs/NAME)")
    p.add_argument("--name", help="the run's name (default: the output directory's name)")
    p.set_defaults(fn=run)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run(args) -> int:
    from insight.importer import MalformedTrace, TraceImportError, import_traces

    try:
        res = import_traces(args.traces, args.output, name=args.name, progress=sys.stderr.isatty())
    except (MalformedTrace, TraceImportError) as e:
        print(f"insight import: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. the output's parent cannot be written
        print(f"insight import: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    flavors = ", ".join(sorted({f["flavor"] for f in res.files}))
    print(f"imported {len(res.files)} trace{'s' if len(res.files) > 1 else ''} ({flavors}) into {res.path}: "
          f"ranks {res.ranks}, {res.count('events')} events -> {res.count('tasks')} tasks "
          f"({res.count('kernels')} kernels), {res.count('steps')} steps, {res.count('memory')} memory events, "
          f"{res.count('flows')} flows, {res.count('counters')} counter values")
    skipped = res.skipped
    if skipped:
        print("not imported: " + "; ".join(f"{v} {k}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])))
    print(f"summarise it with: insight report {res.path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="insight")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
