"""The streaming run writer (collectors/writer.py) and the reader of its part directories (insight/trace.py):
parts merged in the background, tiered; every batch read exactly once whatever instant a reader (or a crash)
meets; ``stop()`` writes the last flush and rewrites nothing; a damaged part directory is one clear error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import collectors.writer as w
from collectors.base import Collector
from collectors.buffers import to_arrow
from collectors.writer import RunWriter, part_name
from insight import trace
from insight.trace import TraceError, live_parts, open_run
from test_profiler import CRASH_SCRIPT

ROOT = Path(__file__).resolve().parents[1]


class Seq(Collector):
    """Each drain: ``sizes[k]`` task rows for step k (task_id = the row's position in the table) and the
    step's row -- the tasks first, as the real collectors' rows reach the writer."""
    tables = ("tasks", "steps")

    def __init__(self, sizes):
        self.sizes = iter(sizes)
        self.rows = 0
        self.step = 0

    def drain(self, t0, final=False):
        n = next(self.sizes, 0)
        if not n:
            return {}
        ids = np.arange(self.rows, self.rows + n)
        self.rows += n
        tasks = to_arrow("tasks", {"step": np.full(n, self.step), "task_id": ids, "op": [f"Op{i % 7}" for i in ids],
                                   "name": [f"net/Op{i % 7}-op{i % 50}" for i in ids], "start_ns": ids * 10,
                                   "end_ns": ids * 10 + 5, "dur_ns": np.full(n, 5)}, 0)
        steps = to_arrow("steps", {"step": np.array([self.step]), "epoch": np.array([1]),
                                   "begin_ns": np.array([self.step])}, 0)
        self.step += 1
        return {"tasks": tasks, "steps": steps}


def writer(path: Path, sizes, tables=("tasks", "steps", "memory")) -> RunWriter:
    return RunWriter(path, {"schema_version": 1, "status": "running", "ranks": [0]}, [Seq(sizes)], 0, list(tables))


def names(w_: RunWriter, table: str = "tasks") -> list[str]:
    return sorted(p.name for p in (w_.rank_dir / table).iterdir())


def ranges(w_: RunWriter, table: str = "tasks") -> list[tuple[int, int]]:
    return [(p.first, p.last) for p in w_.live[table]]


def counter(n: int, fanin: int) -> list[tuple[int, int, int]]:
    """(first, last, level) of the parts n batches should end as: the digits of n in base ``fanin``."""
    out, start, level = [], 0, 0
    while fanin ** (level + 1) <= n:
        level += 1
    for lv in range(level, -1, -1):
        size = fanin ** lv
        while n - start >= size:
            out.append((start, start + size - 1, lv))
            start += size
    return out


def assert_exactly_once(run_dir: Path, n_rows: int | None = None) -> np.ndarray:
    ids = open_run(run_dir).table("tasks", columns=["task_id"])["task_id"].to_numpy()
    assert (ids == np.arange(len(ids))).all(), "a row read twice, missed, or out of order"
    if n_rows is not None:
        assert len(ids) == n_rows
    return ids


# -- tiered merging -------------------------------------------------------------------------------------------
def test_merges_are_tiered_and_keep_every_row_once_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(w, "ROW_GROUP", 1000)
    wr = writer(tmp_path / "run", [100] * 100)
    for _ in range(100):
        wr.flush()
        wr.merge_pending()
    # 100 batches as a base-FANIN counter (base 4: 1 x 64 + 2 x 16 + 1 x 4)
    want = counter(100, w.FANIN)
    assert len(want) < 10 and [(p.first, p.last, p.level) for p in wr.live["tasks"]] == want
    wr.finish()
    assert names(wr) == sorted(p.name for p in wr.live["tasks"])  # the replaced parts are gone
    assert_exactly_once(tmp_path / "run", 100 * 100)
    run = open_run(tmp_path / "run")
    assert run.table("steps")["step"].tolist() == list(range(100))
    assert run.manifest["tables"] == {"tasks": "rank_0/tasks/", "steps": "rank_0/steps/", "memory": "rank_0/memory/"}
    assert len(run.table("memory")) == 0 and "t_ns" in run.table("memory").columns  # empty, with its columns
    # the merged part: row groups of ROW_GROUP rows, strings still dictionary-encoded, read back as strings
    first = wr.live["tasks"][0]
    big = pq.ParquetFile(tmp_path / "run" / "rank_0" / "tasks" / first.name)
    full, rest = divmod(first.rows, 1000)
    assert [big.metadata.row_group(g).num_rows for g in range(big.metadata.num_row_groups)] == \
        [1000] * full + ([rest] if rest else [])
    name = big.schema_arrow.names.index("name")
    assert all(big.metadata.row_group(g).column(name).has_dictionary_page for g in range(big.metadata.num_row_groups))
    assert big.schema_arrow.field("name").type == pa.string()
    assert sorted(run.table("tasks", columns=["op"])["op"].unique()) == [f"Op{k}" for k in range(7)]


def test_a_merger_that_fell_behind_ends_at_the_same_parts(tmp_path):
    wr = writer(tmp_path / "run", [10] * 37)
    for _ in range(37):
        wr.flush()
    wr.merge_pending()  # FANIN at a time, oldest first: the same parts as merging after every flush
    assert [(p.first, p.last, p.level) for p in wr.live["tasks"]] == counter(37, w.FANIN)
    assert ranges(wr, "steps") == ranges(wr)


def test_a_sealed_part_takes_the_small_parts_before_it_and_is_never_merged_again(tmp_path, monkeypatch):
    monkeypatch.setattr(w, "SEAL_ROWS", 1000)
    monkeypatch.setattr(w, "FANIN", 8)
    wr = writer(tmp_path / "run", [10] * 8 + [200] * 8 + [10] * 64)
    for _ in range(16):
        wr.flush()
        wr.merge_pending()
    # 8 x 10 rows -> one level-1 part; 8 x 200 rows reach SEAL_ROWS: sealed, with the level-1 part before it
    assert ranges(wr) == [(0, 15)] and wr.live["tasks"][0].sealed and wr.live["tasks"][0].rows == 1680
    for _ in range(64):
        wr.flush()
        wr.merge_pending()
    assert ranges(wr) == [(0, 15), (16, 79)] and not wr.live["tasks"][1].sealed
    wr.finish()
    assert_exactly_once(tmp_path / "run", 1680 + 640)


def test_writer_threads_merge_in_the_background(tmp_path):
    wr = writer(tmp_path / "run", [50] * 40)
    wr.start_thread(0.005)
    deadline = time.time() + 30
    while wr.parts["tasks"] < 40 and time.time() < deadline:
        time.sleep(0.01)
    assert wr.wait_merged(30)
    wr.stop_thread()
    wr.flush(final=True)
    wr.finish()
    assert wr.parts["tasks"] == 40 and wr.merges >= 5
    assert [(p.first, p.last, p.level) for p in wr.live["tasks"]] == counter(40, w.FANIN)
    assert wr.background_cpu_s > 0
    assert_exactly_once(tmp_path / "run", 2000)


# -- stop(): the last flush only ------------------------------------------------------------------------------
def test_stop_reads_and_rewrites_nothing_written_before(tmp_path, monkeypatch):
    wr = writer(tmp_path / "run", [100] * 30)
    wr.start_thread(3600)
    for _ in range(29):
        wr.flush()
        assert wr.wait_merged(30)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns)
              for p in (wr.rank_dir / t / part.name for t in wr.tables for part in wr.live[t])}
    assert len(before) == 2 * len(counter(29, w.FANIN))  # tasks and steps

    def no_reading(*a, **k):
        raise AssertionError("stop() opened a part file to read it")
    monkeypatch.setattr(w.pq, "ParquetFile", no_reading)
    wr.stop_thread()
    wr.flush(final=True)
    wr.finish()
    monkeypatch.undo()
    assert wr.merge_error is None
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "run" / "rank_0").rglob("*.parquet")}
    assert {p: after[p] for p in before} == before  # every earlier part untouched
    new = sorted(str(p.relative_to(tmp_path / "run")) for p in set(after) - set(before))
    assert new == ["rank_0/memory/part-000000-000000.parquet", "rank_0/steps/part-000029-000029.parquet",
                   "rank_0/tasks/part-000029-000029.parquet"]
    assert_exactly_once(tmp_path / "run", 3000)


def test_stop_cancels_a_merge_in_progress(tmp_path, monkeypatch):
    started = threading.Event()
    real = w.merge_files

    def slow_merge(paths, schema, dest, cancelled=lambda: False, **k):
        started.set()
        deadline = time.time() + 30
        while not cancelled() and time.time() < deadline:  # a long merge: until stop() cancels it
            time.sleep(0.005)
        return real(paths, schema, dest, cancelled, **k)
    monkeypatch.setattr(w, "merge_files", slow_merge)
    wr = writer(tmp_path / "run", [100] * (w.FANIN + 1))
    wr.start_thread(3600)
    for _ in range(w.FANIN):  # the last of these calls for a merge
        wr.flush()
    assert started.wait(30)
    t = time.perf_counter()
    wr.stop_thread()
    wr.flush(final=True)
    wr.finish()
    assert time.perf_counter() - t < 5
    assert wr.merges == 0 and len(wr.live["tasks"]) == w.FANIN + 1
    assert not list((tmp_path / "run").rglob("*.tmp"))  # the cancelled merge's temporary file removed
    assert_exactly_once(tmp_path / "run", 100 * (w.FANIN + 1))


# -- the crash windows ----------------------------------------------------------------------------------------
def test_a_crash_between_a_merges_rename_and_its_removals_loses_and_doubles_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(w, "FANIN", 8)
    wr = writer(tmp_path / "run", [100] * 20)
    for _ in range(8):
        wr.flush()
    listed = open_run(tmp_path / "run")
    assert len(listed.table_files("tasks")) == 8 and listed.schema_names("tasks")  # listed before the merge
    wr.merge_pending()  # the merged part renamed in; the parts it replaces stay GRACE_S longer
    for _ in range(3):
        wr.flush()
    d = tmp_path / "run" / "rank_0" / "tasks"
    assert part_name(0, 7) in names(wr) and part_name(3, 3) in names(wr) and len(names(wr)) == 12
    with monkeypatch.context() as m:  # the reader that listed the replaced parts reads them, no listing again
        m.setattr(trace.time, "sleep", lambda s: pytest.fail("the reader had to list the parts again"))
        ids = listed.table("tasks", columns=["task_id"])["task_id"].to_numpy()
        assert (ids == np.arange(800)).all()
    (d / part_name(3, 3)).unlink()  # "killed" in the middle of removing them
    (d / f".{part_name(11, 18)}.tmp").write_bytes(b"PAR1 half a merge")  # and a merge killed mid-write
    assert_exactly_once(tmp_path / "run", 1100)
    run = open_run(tmp_path / "run")
    assert [f.name for f in run.table_files("tasks")] == [part_name(0, 7)] + [part_name(k, k) for k in (8, 9, 10)]
    assert run.table("steps")["step"].tolist() == list(range(11))


def test_live_parts():
    assert live_parts([]) == ([], None)
    # earlier versions' names, new names, and leftovers of a merge, in any order
    got = live_parts(["part-00002.parquet", "part-000000-000001.parquet", "part-00000.parquet",
                      "part-000003-000009.parquet", "part-000004-000005.parquet", "part-000009-000009.parquet"])
    assert got == (["part-000000-000001.parquet", "part-00002.parquet", "part-000003-000009.parquet"], None)
    assert live_parts(["part-00000.parquet", "part-000000-000000.parquet"])[0] in (
        ["part-00000.parquet"], ["part-000000-000000.parquet"])
    assert "batches 2..3 are missing" in live_parts(["part-000000-000001.parquet", "part-000004-000004.parquet"])[1]
    assert "batches 0..0 are missing" in live_parts(["part-000001-000001.parquet"])[1]
    assert "overlaps batches 4..7" in live_parts(["part-000000-000007.parquet", "part-000004-000009.parquet"])[1]
    assert "reversed" in live_parts(["part-000005-000003.parquet"])[1]
    assert "not a part file name" in live_parts(["part-x.parquet"])[1]


# -- a damaged part directory: one TraceError naming it ------------------------------------------------------
@pytest.fixture
def parted(tmp_path, monkeypatch):
    """A finished run whose tasks are the parts 0..63 (merged), 64..71, 72 and 73."""
    monkeypatch.setattr(w, "FANIN", 8)
    wr = writer(tmp_path / "run", [20] * 74)
    for _ in range(74):
        wr.flush()
        wr.merge_pending()
    wr.finish()
    assert [f"{a}-{b}" for a, b in ranges(wr)] == ["0-63", "64-71", "72-72", "73-73"]
    return tmp_path / "run"


DAMAGE = {
    "a part removed": (lambda d: (d / part_name(64, 71)).unlink(), "rank_0/tasks: the part files of batches 64..71 are missing"),
    "overlapping parts": (lambda d: (d / part_name(72, 72)).rename(d / part_name(70, 72)), "overlaps batches 70..71"),
    "a foreign name": (lambda d: (d / "part-final.parquet").write_bytes(b"x"), "part-final.parquet is not a part file name"),
    "a directory as a part": (lambda d: (d / part_name(74, 74)).mkdir(), "part-000074-000074.parquet is not a regular file"),
    "a part linking out": (lambda d: os.symlink(d.parents[2] / "outside.parquet", d / part_name(74, 74)),
                           "part-000074-000074.parquet is a symbolic link leaving the run directory"),
    "a truncated part": (lambda d: (d / part_name(73, 73)).write_bytes(b"PAR1"), "cannot read rank_0/tasks/part-000073-000073.parquet"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_part_directory_is_one_clear_error(parted, damage, monkeypatch):
    monkeypatch.setattr(trace.time, "sleep", lambda s: None)  # the retries of a listing that raced a merge
    (parted.parent / "outside.parquet").write_bytes(b"PAR1")
    change, phrase = DAMAGE[damage]
    change(parted / "rank_0" / "tasks")
    with pytest.raises(TraceError) as e:
        open_run(parted).table("tasks")
    msg = str(e.value)
    assert phrase in msg and msg.startswith("run 'run'") and "\n" not in msg, msg
    # the other tables still read
    assert open_run(parted).table("steps")["step"].tolist() == list(range(74))


def test_too_many_part_files(parted, monkeypatch):
    monkeypatch.setattr(trace, "MAX_PART_FILES", 3)
    with pytest.raises(TraceError, match="rank_0/tasks: more than 3 part files"):
        open_run(parted).table("tasks")


# -- readers while the writer flushes and merges --------------------------------------------------------------
def test_readers_during_flushes_and_merges_see_every_row_once_and_every_steps_tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(w, "FANIN", 2)  # a merge after nearly every flush
    sizes = [int(x) for x in np.random.default_rng(0).integers(1, 400, 300)]
    wr = writer(tmp_path / "run", sizes)
    wr.write_manifest("running")
    wr.start_thread(0.002)
    errors, seen = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                run = open_run(tmp_path / "run")
                tasks = trace.read(run, "tasks", {"step": -1, "task_id": -1})  # tasks first: the harder order
                steps = trace.read(run, "steps", {"step": -1})["step"].to_numpy()
                ids = tasks["task_id"].to_numpy()
                assert (ids == np.arange(len(ids))).all(), "a row twice or missing"
                assert (steps == np.arange(len(steps))).all()
                assert set(steps) <= set(tasks["step"]), "a step read without its tasks"
                seen.append(len(ids))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while wr.parts["tasks"] < 300 and time.time() < deadline and not errors:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    wr.stop_thread()
    wr.flush(final=True)
    wr.finish()
    assert not errors, errors[:1]
    assert wr.merges >= 10 and len(seen) > 10 and max(seen) > 0
    assert_exactly_once(tmp_path / "run", sum(sizes))


# -- SIGKILL in the middle of a run ---------------------------------------------------------------------------
def kill_when(argv: list[str], ready, timeout: float = 90.0) -> None:
    """Run ``argv`` and SIGKILL it as soon as ``ready()`` holds (the test fails if it never does)."""
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, f"not ready within {timeout:.0f} s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigkill_during_flushes_and_merges_keeps_every_flushed_row_exactly_once(tmp_path):
    # test_profiler's crash script (LeNet on digits, dataset sink), flushing every 20 ms with merges all the time
    assert "flush_interval=0.1" in CRASH_SCRIPT
    script = tmp_path / "train.py"
    script.write_text("import collectors.writer\ncollectors.writer.FANIN = 2\n"
                      + textwrap.dedent(CRASH_SCRIPT).replace("flush_interval=0.1", "flush_interval=0.02"))
    run_dir = tmp_path / "run"
    tasks_dir = run_dir / "rank_0" / "tasks"

    def merged_parts() -> int:  # parts covering more than one batch
        try:
            return sum(1 for p in tasks_dir.iterdir() if p.name.startswith("part-") and p.name[5:11] != p.name[12:18])
        except FileNotFoundError:
            return 0
    kill_when([sys.executable, str(script), str(run_dir), "sink"], lambda: merged_parts() >= 3)
    run = open_run(run_dir)
    assert run.manifest["status"] == "running"
    steps = run.table("steps")
    assert len(steps) >= 2 and steps["step"].tolist() == list(range(len(steps)))  # each step once
    assert run.manifest["step_count"] <= len(steps)
    tasks = run.table("tasks")
    kernels = tasks[tasks["task_id"] >= 0]
    assert not kernels.duplicated(["step", "task_id"]).any(), "a task read twice"
    per_step = kernels.groupby("step").size()
    assert per_step.nunique() == 1  # every step's tasks once and complete
    assert set(steps["step"]) <= set(per_step.index)  # every step on disk has its tasks
    mem = run.table("memory")
    assert set(steps["step"]) <= set(mem["step"])
