"""Deprecated alias: the reader is ``insight.trace`` (one reading module). Kept so code written against the
old private module keeps importing; new code imports these names from ``insight.trace``."""
from insight.trace import (NS_PER_MS, TASK_DEFAULTS, as_run, bad_file, capacity_bytes, empty_frame,  # noqa: F401
                           ms, read, rel, schema_names, table_files, task_columns)
