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


def _broken_base(tmp_path):
    """Healthy runs beside broken ones: every way a run dir can be bad in a base dir."""
    import os

    base = tmp_path / "base"
    training_run(base, "good")
    training_run(base, "lr=0.1:b#c?d")  # a name needing escapes in a URL
    set_manifest(training_run(base, "badtype").path, device="x")
    (training_run(base, "deep").path / "manifest.json").write_text(
        '{"schema_version": 1, "o": ' + "[" * 3000 + "]" * 3000 + "}")
    (training_run(base, "huge").path / "manifest.json").write_text('{"schema_version": 1' + "0" * 5000 + "}")
    for field, value in (("ranks", 5), ("streams", "abc"), ("start_perf_ns", "abc"), ("schema_version", "1")):
        set_manifest(training_run(base, f"bad_{field}").path, **{field: value})
    outside = training_run(tmp_path / "elsewhere", "secret")
    os.symlink(outside.path, base / "linked")
    return base


def test_broken_runs_are_entries_beside_the_healthy_ones(tmp_path):
    base = _broken_base(tmp_path)
    store = RunStore(base, reload_interval=0)
    entries = {e.id: e for e in store.entries()}
    assert {k for k, e in entries.items() if e.error is None} == {"good", "lr=0.1:b#c?d"}
    assert len(entries) == 10
    for k, e in entries.items():
        if e.error is not None:
            assert "\n" not in e.error and len(e.error) < 600, k
    assert "symbolic link" in entries["linked"].error or "no run" in entries["linked"].error


def test_failed_analyses_are_cached_until_the_manifest_changes(tmp_path):
    from insight.trace import TraceError

    run = training_run(tmp_path, "flaky")
    store = RunStore(tmp_path, reload_interval=0)
    calls = []

    def analysis(r):
        calls.append(1)
        raise TraceError(f"run {r.name!r}: broken table")

    for _ in range(3):
        with pytest.raises(TraceError, match="broken table"):
            store.get("flaky", "x", analysis)
    assert len(calls) == 1
    time.sleep(0.01)
    set_manifest(run.path, step_count=99)
    with pytest.raises(TraceError):
        store.get("flaky", "x", analysis)
    assert len(calls) == 2
    # a run that cannot be opened is remembered too, and reopened once fixed
    set_manifest(run.path, device="x")
    with pytest.raises(TraceError, match="device"):
        store.run("flaky")
    time.sleep(0.01)
    set_manifest(run.path, device={"target": "Ascend", "capacity_bytes": 1})
    assert store.run("flaky").manifest["device"]["capacity_bytes"] == 1


def test_runs_page_rows_and_links(tmp_path):
    from urllib.parse import unquote

    from dashboard.data import set_store
    from dashboard.pages import runs

    base = _broken_base(tmp_path)
    set_store(RunStore(base, reload_interval=0))
    rows = {r["name"]: r for r in runs.rows()}
    assert len(rows) == 10
    assert rows["good"]["status"] == "complete" and rows["good"]["avg_step_ms"] == 3.3
    assert rows["badtype"]["status"].startswith("error:") and "device" in rows["badtype"]["status"]
    # the link is raw HTML (the table's markdown re-encodes percent escapes of markdown links): encoded once
    link = rows["lr=0.1:b#c?d"]["run"]
    href = link.split('href="')[1].split('"')[0]
    assert href == "/run/lr%3D0.1%3Ab%23c%3Fd/overview" and unquote(href.split("/")[2]) == "lr=0.1:b#c?d"
    evil = runs.run_link('<img src=x onerror=alert(1)>"_*')
    assert "<img" not in evil and "&lt;img" in evil and '\\_\\*' in evil


def test_a_pair_analysis_is_recomputed_when_either_run_changes(tmp_path):
    a, b = training_run(tmp_path, "a"), training_run(tmp_path, "b")
    store = RunStore(tmp_path, reload_interval=0)
    calls = []

    def pair(ra, rb):
        calls.append((ra.name, rb.manifest["step_count"]))
        return len(calls)

    assert store.get_pair("a", "b", "pair", pair) == store.get_pair("a", "b", "pair", pair) == 1
    time.sleep(0.01)
    set_manifest(b.path, step_count=42)
    assert store.get_pair("a", "b", "pair", pair) == 2 and calls[-1] == ("a", 42)
    time.sleep(0.01)
    set_manifest(a.path, step_count=7)
    assert store.get_pair("a", "b", "pair", pair) == 3
