"""The dashboard's RunStore: new runs appear while the server runs; analyses refresh when a run changes."""
import time

import pytest

from dashboard.data import RunNotFound, RunStore
from synthetic_runs import set_manifest, training_run


def test_new_runs_are_picked_up_after_the_reload_interval(tmp_path):
    training_run(tmp_path, "first")
    store = RunStore(tmp_path, reload_interval=0.3)
    assert store.run_ids() == ["first"]
    training_run(tmp_path, "second")
    assert store.run_ids() == ["first"]  # within the interval the listing is cached
    time.sleep(0.35)
    assert store.run_ids() == ["first", "second"]


def test_cached_analysis_is_recomputed_when_the_manifest_changes(tmp_path):
    run = training_run(tmp_path, "live")
    store = RunStore(tmp_path, reload_interval=0)
    calls = []

    def analysis(r):
        calls.append(r.manifest["step_count"])
        return r.manifest["step_count"]

    first = store.get("live", "steps", analysis)
    assert store.get("live", "steps", analysis) == first and len(calls) == 1  # cached
    time.sleep(0.01)
    set_manifest(run.path, step_count=first + 7)  # the profiler flushed more steps
    assert store.get("live", "steps", analysis) == first + 7 and len(calls) == 2


@pytest.mark.parametrize("bad", ["../x", "..", ".", "/etc", "a/b", "a\\b", "missing", "\x00"])
def test_run_ids_never_leave_the_base_dir(tmp_path, bad):
    (tmp_path / "base").mkdir()
    training_run(tmp_path, "x")  # a real run just outside the base dir
    store = RunStore(tmp_path / "base", reload_interval=0)
    with pytest.raises(RunNotFound):
        store.path(bad)
