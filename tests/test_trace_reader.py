"""insight.trace, the one reader: a run loaded once (each column read once, analyses memoised on the run),
and every read of an untrusted run directory ending in one TraceError line naming the run and the file."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import insight.analysis as A
from insight import trace
from insight.trace import TraceError, discover_runs, open_run
from synthetic_runs import set_manifest, training_run, write_manifest, write_table


@pytest.fixture
def run(tmp_path):
    return training_run(tmp_path, "r", allreduce_us=300, empty_steps=(3,))


# -- one loaded run ---------------------------------------------------------------------------------------
def test_overview_computes_the_breakdown_once_and_reads_each_column_once(run, monkeypatch):
    from insight.analysis import steps

    calls = []
    real = steps._breakdown
    monkeypatch.setattr(steps, "_breakdown", lambda *a: calls.append(1) or real(*a))
    reads = []
    real_read = trace.Run._read_columns
    monkeypatch.setattr(trace.Run, "_read_columns",
                        lambda self, e, names: reads.extend((str(e.files[0]), c) for c in names) or
                        real_read(self, e, names))
    r = open_run(run.path)
    ov = A.overview(r)
    assert len(calls) == 1
    assert ov.summary == A.summarize(ov.breakdown) and ov.pipeline is A.data_pipeline(r)
    assert ov.advice == A.recommendations(r) and len(calls) == 1
    A.op_stats(r), A.memory_peak(r), A.step_summary(r)
    assert len(calls) == 1
    assert len(reads) == len(set(reads)) > 0  # every column of every table read once
    # the public functions still take a path: a fresh load each time
    assert A.step_summary(run.path).steps == ov.summary.steps and len(calls) == 2


def test_a_table_read_from_parts_equals_the_compacted_one(tmp_path):
    parts = training_run(tmp_path, "parts", parts=4)
    one = training_run(tmp_path, "one")
    a = A.op_stats(parts.path).drop(columns=["graph"])
    b = A.op_stats(one.path).drop(columns=["graph"])
    pd.testing.assert_frame_equal(a, b)
