"""``insight import``: PyTorch (Kineto) and other Chrome trace-event JSON into Insight runs (docs/import.md).

``import_traces(paths, output)`` streams each file (``reader``), keeps compact columns of its events
(``events``), maps them to the tables of docs/trace-format.md (``mapping``) and writes the run (``core``).
"""
from insight.importer.core import ImportResult, TraceImportError, import_traces, read_trace
from insight.importer.reader import MalformedTrace

__all__ = ["import_traces", "read_trace", "ImportResult", "TraceImportError", "MalformedTrace"]
