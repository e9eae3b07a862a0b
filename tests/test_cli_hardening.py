"""Issue 17, write side and arguments: exports write only where the user said, every CLI argument is
checked (one line on stderr, exit code 2), ``insight stop`` signals only the server it started, the
server bounds request bodies, and the Profiler reports bad output paths and a failed recording."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from insight.cli import main
from insight.export import export_chrome, safe_filename
from synthetic_runs import set_manifest, training_run

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys, argv, *expect, code=2):
    """Run ``insight argv`` in-process: exit ``code``, exactly one line on stderr holding every ``expect``."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == code, (rc, cap.out, cap.err)
    assert cap.err.count("\n") == 1 and cap.err.startswith("insight"), cap.err
    assert "Traceback" not in cap.err
    for e in expect:
        assert e in cap.err, (e, cap.err)
    return cap.err


def tree(root: Path) -> dict:
    """Every file under ``root`` with its size and mtime: a write anywhere shows as a difference."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


# -- export: names from the manifest ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escape", "/tmp/insight-abs-escape", "a/b/../../../c", "..", ".", "",
                                  "x" * 10_000, "\x00nul", "-rf", "..\\..\\win", "ü" * 300])
@pytest.mark.parametrize("fmt", ["chrome", "csv"])
def test_export_default_name_from_the_manifest_stays_in_cwd(tmp_path, cwd, capsys, name, fmt):
    r = training_run(tmp_path / "runs", "r", pipeline=None)
    set_manifest(r.path, name=name)
    before_outside = tree(tmp_path / "runs")
    assert main(["export", str(r.path), "--format", fmt]) == 0, capsys.readouterr().err
    made = list(cwd.iterdir())
    assert len(made) == 1, made  # one file (chrome) or one directory (csv), directly in the cwd
    out = made[0]
    assert out.parent == cwd and "/" not in out.name and not out.name.startswith((".", "-"))
    assert len(out.name.encode()) <= 140
    assert tree(tmp_path / "runs") == before_outside
    assert not Path("/tmp/insight-abs-escape.trace.json").exists() and not (tmp_path / "escape.trace.json").exists()
    if fmt == "csv":
        assert (out / "op_stats.csv").exists()
    else:
        assert json.loads(out.read_text())["metadata"]["run"] == (name[:1000] or "r")  # Run.name: the directory's


def test_safe_filename():
    assert safe_filename("lr=0.1,bs=32") == "lr=0.1,bs=32"
    assert safe_filename("../../x", ".json") == "x.json"
    assert safe_filename("/etc/passwd") == "etc_passwd"
    assert safe_filename("..") == safe_filename("") == safe_filename("./") == "run"
    assert safe_filename(12) == "12" and safe_filename(None) == "None"
    long = safe_filename("€" * 1000, ".trace.json")
    assert len(long.encode()) <= 120 + len(".trace.json") and long.endswith(".trace.json")
    long.encode("utf-8")  # never a split multi-byte character


# -- export: destinations -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["rank_0/tasks.parquet", "manifest.json", "rank_0/new.json", ".", "rank_0"])
@pytest.mark.parametrize("fmt", ["chrome", "csv"])
def test_export_refuses_outputs_inside_the_run(tmp_path, cwd, capsys, target, fmt):
    r = training_run(tmp_path, "r", pipeline=None)
    before = tree(r.path)
    one_line(capsys, ["export", r.path, "--format", fmt, "-o", r.path / target, "--force"],
             "inside the run directory")
    assert tree(r.path) == before


def test_export_refuses_a_symlink_into_the_run(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    (cwd / "link.json").symlink_to(r.path / "rank_0" / "tasks.parquet")
    before = tree(r.path)
    one_line(capsys, ["export", r.path, "-o", "link.json", "--force"], "inside the run directory")
    assert tree(r.path) == before


def test_export_never_overwrites_without_force(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    (cwd / "t.json").write_text("mine")
    one_line(capsys, ["export", r.path, "-o", "t.json"], "t.json", "exists", "--force")
    assert (cwd / "t.json").read_text() == "mine"
    # the default name too
    (cwd / "r.trace.json").write_text("mine")
    one_line(capsys, ["export", r.path], "r.trace.json", "--force")
    assert (cwd / "r.trace.json").read_text() == "mine"
    assert main(["export", str(r.path), "-o", "t.json", "--force"]) == 0
    assert json.loads((cwd / "t.json").read_text())["traceEvents"]
    assert sorted(p.name for p in cwd.iterdir()) == ["r.trace.json", "t.json"]  # no temporary files left


def test_csv_export_never_overwrites_without_force(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    assert main(["export", str(r.path), "--format", "csv", "-o", "out"]) == 0
    (cwd / "out" / "op_stats.csv").write_text("mine")
    one_line(capsys, ["export", r.path, "--format", "csv", "-o", "out"], "holds step_breakdown.csv", "--force")
    assert (cwd / "out" / "op_stats.csv").read_text() == "mine"
    assert main(["export", str(r.path), "--format", "csv", "-o", "out", "--force"]) == 0
    assert pd.read_csv(cwd / "out" / "op_stats.csv")["calls"].sum() > 0
    # a directory with other files is fine: only the CSV names matter
    (cwd / "other").mkdir()
    (cwd / "other" / "notes.txt").write_text("keep")
    assert main(["export", str(r.path), "--format", "csv", "-o", "other"]) == 0
    assert (cwd / "other" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt", ["chrome", "csv"])
def test_export_to_a_missing_directory_is_not_created(tmp_path, cwd, capsys, fmt):
    r = training_run(tmp_path, "r", pipeline=None)
    one_line(capsys, ["export", r.path, "--format", fmt, "-o", cwd / "no" / "such" / "out"],
             "does not exist", str(Path("no") / "such"))
    assert not (cwd / "no").exists()


def test_export_to_a_directory_or_under_a_file(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    (cwd / "d").mkdir()
    one_line(capsys, ["export", r.path, "-o", "d"], "'d'", "is a directory")
    (cwd / "f").write_text("x")
    one_line(capsys, ["export", r.path, "-o", "f/t.json"], "not a directory")
    one_line(capsys, ["export", r.path, "--format", "csv", "-o", "f"], "not a directory")
    assert (cwd / "f").read_text() == "x" and list((cwd / "d").iterdir()) == []


@pytest.mark.parametrize("fmt", ["chrome", "csv"])
def test_export_to_an_unwritable_place(tmp_path, cwd, capsys, fmt):
    r = training_run(tmp_path, "r", pipeline=None)
    one_line(capsys, ["export", r.path, "--format", fmt, "-o", "/proc/insight-out"], "/proc/insight-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_export_to_a_read_only_directory(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    ro = cwd / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line(capsys, ["export", r.path, "-o", ro / "t.json"], "t.json", "Permission denied")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("column", ["dur_ns", "start_ns", "end_ns"])
def test_chrome_export_of_string_times_is_one_line(tmp_path, cwd, capsys, column):
    r = training_run(tmp_path, "r", pipeline=None)
    p = r.path / "rank_0" / "tasks.parquet"
    df = pd.read_parquet(p)
    df[column] = df[column].astype(str) + "x"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    for fmt in ("chrome", "csv"):
        rc = main(["export", str(r.path), "--format", fmt, "-o", f"o-{fmt}"])
        err = capsys.readouterr().err
        if rc == 0:  # the Chrome trace takes durations from start_ns/end_ns: a bad dur_ns may go unread
            assert column == "dur_ns" and fmt == "chrome" and err == ""
            assert json.loads((cwd / "o-chrome").read_text())["traceEvents"]
            (cwd / "o-chrome").unlink()
        else:
            assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
            assert "tasks.parquet" in err and column in err, err
    assert list(cwd.iterdir()) == []


def test_chrome_export_of_extreme_times_is_valid_json(tmp_path, cwd):
    r = training_run(tmp_path, "r", pipeline=None)
    p = r.path / "rank_0" / "tasks.parquet"
    df = pd.read_parquet(p)
    lo, hi = -2**63, 2**63 - 1
    df.loc[0, "start_ns"], df.loc[0, "end_ns"] = lo, hi
    df.loc[1, "start_ns"], df.loc[1, "end_ns"] = hi, lo
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    export_chrome(r.path, cwd / "t.json")
    ev = [e for e in json.loads((cwd / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert ev[0]["ts"] == lo / 1000 and ev[0]["dur"] == pytest.approx(hi / 1000)
    assert ev[1]["dur"] == 0


def test_gzip_with_csv_is_one_line(tmp_path, cwd, capsys):
    r = training_run(tmp_path, "r", pipeline=None)
    one_line(capsys, ["export", r.path, "--format", "csv", "--gzip"], "--gzip")


# -- argument validation ------------------------------------------------------------------------------
BAD_ARGS = [
    (["start", "--summary-base-dir", "{base}", "--port", "99999"], "65535"),
    (["start", "--summary-base-dir", "{base}", "--port", "-1"], "65535"),
    (["start", "--summary-base-dir", "{base}", "--port", "0"], "65535"),
    (["start", "--summary-base-dir", "{base}", "--port", "80.5"], "65535"),
    (["start", "--summary-base-dir", "{base}", "--host", "no-such-host.invalid"], "no-such-host.invalid"),
    (["start", "--summary-base-dir", "{base}", "--host", ""], "--host"),
    (["start", "--summary-base-dir", "{base}", "--host", "a b"], "--host"),
    (["start", "--summary-base-dir", "{base}", "--reload-interval", "nan"], "finite positive"),
    (["start", "--summary-base-dir", "{base}", "--reload-interval", "inf"], "finite positive"),
    (["start", "--summary-base-dir", "{base}", "--reload-interval", "0"], "finite positive"),
    (["start", "--summary-base-dir", "{base}", "--reload-interval", "-1"], "finite positive"),
    (["start", "--summary-base-dir", "{base}/missing"], "no such directory"),
    (["start"], "--summary-base-dir"),
    (["stop", "--port", "70000"], "65535"),
    (["stop", "--port", "-5"], "65535"),
    (["report", "{run}", "--top", "0"], "--top"),
    (["report", "{run}", "--top", "x"], "--top"),
    (["report", "{run}", "--rank", "-1"], "--rank"),
    (["report", "{run}", "--rank", "3"], "has ranks 0"),
    (["export", "{run}", "--format", "csv", "--rank", "3", "-o", "out"], "has ranks 0"),
    (["export", "{run}", "--format", "pdf"], "--format"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--output", "{file}"], "not a directory"),
    (["demo", "--output", "/proc"], "/proc"),
    (["demo", "--output", "/proc/insight-demo"], "/proc/insight-demo"),
    (["demo", "--output", "{file}/sub"], "{file}"),
    (["demo", "--output", "{base}", "--name", "../escape"], "--name"),
    (["demo", "--output", "{base}", "--name", "a/b"], "--name"),
    ([], "command"),
    (["nosuchcommand"], "nosuchcommand"),
]


@pytest.mark.parametrize("argv,expect", BAD_ARGS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGS])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, cwd, capsys, monkeypatch, argv, expect):
    import dashboard.server
    monkeypatch.setattr(dashboard.server, "serve", lambda *a, **k: pytest.fail("serve() must not be reached"))
    r = training_run(tmp_path, "r", pipeline=None)
    (tmp_path / "afile").write_text("x")
    sub = {"{base}": str(tmp_path), "{run}": str(r.path), "{file}": str(tmp_path / "afile")}
    args = []
    for a in argv:
        for k, v in sub.items():
            a = a.replace(k, v)
        args.append(a)
    exp = expect
    for k, v in sub.items():
        exp = exp.replace(k, v)
    one_line(capsys, args, exp)
    assert not (tmp_path / "escape").exists() and (tmp_path / "afile").read_text() == "x"


def test_host_beyond_loopback_warns(tmp_path, capsys, monkeypatch):
    import dashboard.server
    calls = []
    monkeypatch.setattr(dashboard.server, "serve", lambda *a, **k: calls.append(k) or 0)
    assert main(["start", "--summary-base-dir", str(tmp_path), "--host", "0.0.0.0", "--port", "8123"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "0.0.0.0" in err and "127.0.0.1" in err
    for host in ("127.0.0.1", "localhost", "::1"):
        try:
            socket.getaddrinfo(host, 80)
        except OSError:
            continue
        assert main(["start", "--summary-base-dir", str(tmp_path), "--host", host]) == 0
        assert capsys.readouterr().err == ""
    assert [c["port"] for c in calls][0] == 8123


# -- insight stop -----------------------------------------------------------------------------------------
@pytest.fixture
def state(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    return d / "insight"


@pytest.fixture
def bystander():
    """A process that must survive: ``insight stop`` may never signal it."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("content", ["", "garbage", "[]", "null", '{"pid": "123"}', '{"pid": 0}', '{"pid": -1}',
                                     "{{\"pid\": {pid}}}", "{{\"pid\": {pid}, \"start_time\": \"x\"}}",
                                     "[" * 100_000, '{"pid": 1e999}'])
def test_stop_with_a_corrupt_pid_file_kills_nothing(state, capsys, bystander, content):
    from dashboard.server import pid_file
    f = pid_file(8111)
    f.write_text(content.format(pid=bystander.pid) if "{pid}" in content else content)
    one_line(capsys, ["stop", "--port", "8111"], str(f), "nothing was stopped")
    time.sleep(0.2)
    assert bystander.poll() is None and f.exists()


def test_stop_never_signals_a_reused_pid(state, capsys, bystander):
    from dashboard.server import pid_file, process_cmdline, process_start_time
    f = pid_file(8112)
    # a server that died, whose pid now belongs to another program (another start time / command line)
    f.write_text(json.dumps({"pid": bystander.pid, "start_time": process_start_time(bystander.pid) - 1,
                             "cmdline": process_cmdline(bystander.pid), "token": "0" * 32, "port": 8112}))
    assert main(["stop", "--port", "8112"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another process" in err and "left alone" in err
    time.sleep(0.2)
    assert bystander.poll() is None and not f.exists()
    f.write_text(json.dumps({"pid": bystander.pid, "start_time": process_start_time(bystander.pid),
                             "cmdline": ["insight", "start"], "token": "0" * 32, "port": 8112}))
    assert main(["stop", "--port", "8112"]) == 1
    time.sleep(0.2)
    assert bystander.poll() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, timeout=10):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def test_real_server_pid_file_body_limit_errors_and_stop(tmp_path, state):
    """As a user runs it: ``insight start --host 0.0.0.0`` warns, records pid + start time + token, answers
    an oversized body with 413 and a broken callback with one line, and ``insight stop`` stops it."""
    from dashboard.server import MAX_REQUEST_BODY, process_start_time, read_pid_file
    training_run(tmp_path / "base", "r", pipeline=None)
    port = _free_port()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(state.parent), XDG_CACHE_HOME=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "insight.cli"]
    err_f = open(tmp_path / "err.txt", "w+")
    server = subprocess.Popen(cli + ["start", "--summary-base-dir", str(tmp_path / "base"), "--host", "0.0.0.0",
                                     "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_f)
    try:
        deadline = time.monotonic() + 60
        while not (state / f"dashboard-{port}.json").exists():
            assert server.poll() is None, Path(err_f.name).read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        info = read_pid_file(state / f"dashboard-{port}.json")
        assert info["pid"] == server.pid and info["start_time"] == process_start_time(server.pid)
        assert info["port"] == port and len(info["token"]) == 32 and "start" in info["cmdline"]
        assert oct((state / f"dashboard-{port}.json").stat().st_mode & 0o777) == "0o600"
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if _request(url + "/")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        # announce a body over the limit: the server answers 413 without reading it
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST /_dash-update-component HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {MAX_REQUEST_BODY + 1}\r\n\r\n[1,".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"Traceback" not in answer, answer[:500]
        status, body = _request(url + "/_dash-update-component",
                                json.dumps({"output": "nope.children", "outputs": {"id": "nope", "property": "children"},
                                            "inputs": [], "changedPropIds": []}).encode())
        assert status >= 400 and "Traceback" not in body and "File \"" not in body and len(body) < 2000
        status, body = _request(url + "/download/r/trace.json.gz")  # exported into the server's trace cache
        assert status == 200
        cached = list((tmp_path / "cache" / "insight" / "traces").glob("*/*.trace.json.gz"))
        assert len(cached) == 1
        reaper_rc = []
        stop = subprocess.run(cli + ["stop", "--port", str(port)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        reaper_rc.append(server.wait(30))
        assert stop.returncode == 0 and f"stopped the dashboard on port {port}" in stop.stdout, stop.stderr
        assert reaper_rc == [0] and not (state / f"dashboard-{port}.json").exists()
        assert not cached[0].parent.exists()  # the trace cache is removed when the server stops
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        err_f.close()
    err = Path(err_f.name).read_text()  # (the forged callback's stack trace is in the server's log, by design)
    assert err.startswith("insight start: warning: binding 0.0.0.0") and err.count("warning") == 1


# -- Profiler output_path -------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "under_file", "deep_under_file", "proc", "proc_deep"])
def test_profiler_output_path_errors_name_the_path(tmp_path, where):
    from insight import Profiler, ProfilerError
    (tmp_path / "f").write_text("x")
    path = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run", "deep_under_file": tmp_path / "f" / "a" / "b",
            "proc": Path("/proc/insight-run"), "proc_deep": Path("/proc/insight/run")}[where]
    for start in (True, False):
        with pytest.raises(ProfilerError) as ei:
            p = Profiler(path, start_profile=start)
            p.start()
        assert str(path) in str(ei.value)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_profiler_permission_denied(tmp_path):
    from insight import Profiler, ProfilerError
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ProfilerError, match="permission denied"):
            Profiler(ro / "run")
    finally:
        ro.chmod(0o700)


# -- a recording that cannot be finished (disk full) ------------------------------------------------------
def _train(digits, steps_per_epoch=3):
    from runtime import Model, nn
    from runtime.dataset import NumpySlicesDataset
    from runtime.models import LeNetDigits
    net = LeNetDigits(channels=(8, 16), hidden=32)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                  nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
    xtr, ytr, _, _ = digits
    n = 32 * steps_per_epoch
    model.train(1, NumpySlicesDataset((xtr[:n], ytr[:n]), ["image", "label"]).batch(32, drop_remainder=True),
                dataset_sink_mode=True)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_at_stop_marks_the_run_failed(tmp_path, digits, monkeypatch, capsys):
    import collectors.writer as w
    from insight import Profiler, ProfilerError
    prof = Profiler(tmp_path / "run", flush_interval=3600)
    _train(digits)
    monkeypatch.setattr(w.pq, "write_table", _enospc)
    with pytest.raises(ProfilerError, match="No space left on device.*marked failed"):
        prof.stop()
    monkeypatch.undo()
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and "No space left on device" in m["error"]
    assert not list((tmp_path / "run").rglob("*.tmp"))  # temporary files removed: the space is given back
    one_line(capsys, ["report", tmp_path / "run"], "recording failed", "No space left on device")
    assert main(["runs", str(tmp_path)]) == 0
    assert "failed" in capsys.readouterr().out


def test_disk_full_during_a_merge_keeps_the_parts(tmp_path, digits, monkeypatch):
    """The background merge of part files needs room for the merged copy: without it the parts stay as they
    are (nothing lost, no temporary file left) and the run still completes."""
    import collectors.writer as w
    from insight import Profiler
    from insight.trace import open_run

    class Full:
        def __init__(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(w, "FANIN", 2)  # two parts of a table already call for a merge
    monkeypatch.setattr(w.pq, "ParquetWriter", Full)  # merges write with ParquetWriter, flushes with write_table
    prof = Profiler(tmp_path / "run", flush_interval=3600)
    with pytest.warns(RuntimeWarning, match="merging the parts .* failed .*No space left on device"):
        for _ in range(2):
            _train(digits)
            prof._writer.flush()
        assert prof._writer.wait_merged(30)
    assert prof._writer.merges == 0 and isinstance(prof._writer.merge_error, OSError)
    prof.stop()
    run = open_run(tmp_path / "run")
    assert run.manifest["status"] == "complete" and len(run.table("steps")) == 6
    assert len(run.table_files("tasks")) == 2
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_a_failed_flush_loses_no_rows(tmp_path, digits, monkeypatch):
    """A passing write error (the next flush succeeds) keeps the rows for the next flush."""
    import collectors.writer as w
    from insight import Profiler
    from insight.trace import open_run
    real = w.pq.write_table
    fails = {"n": 0}

    def flaky(*a, **k):
        if fails["n"] < 2:
            fails["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    prof = Profiler(tmp_path / "run", flush_interval=3600)
    _train(digits, steps_per_epoch=4)
    monkeypatch.setattr(w.pq, "write_table", flaky)
    for _ in range(2):
        with pytest.raises(OSError):
            prof._writer.flush()
    prof.stop()
    run = open_run(tmp_path / "run")
    assert run.manifest["status"] == "complete" and len(run.table("steps")) == 4
    assert set(run.table("tasks")["step"][lambda s: s >= 0]) == set(run.table("steps")["step"])


def test_file_size_limit_during_profiling(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow a file past 16 KB, as a full disk
    would): the run ends marked failed and ``insight report`` exits 2 saying so."""
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from runtime import Model, nn
from runtime.dataset import NumpySlicesDataset
from runtime.dataset.digits import load_digits_split
from runtime.models import LeNetDigits
from insight import Profiler, ProfilerError
xtr, ytr, _, _ = load_digits_split(seed=0)
net = LeNetDigits(channels=(8, 16), hidden=32)
model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
              nn.Momentum(net.trainable_params(), 0.05, 0.9), progress=False)
ds = NumpySlicesDataset((xtr[:320], ytr[:320]), ["image", "label"]).batch(32, drop_remainder=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.RLIM_INFINITY))
try:
    with Profiler({str(tmp_path / 'run')!r}, flush_interval=3600):
        model.train(1, ds, dataset_sink_mode=True)
except ProfilerError as e:
    print("ProfilerError:", e)
    sys.exit(3)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "File too large" in p.stdout, (p.stdout, p.stderr[-3000:])
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and "File too large" in m["error"]
    rep = subprocess.run([sys.executable, "-m", "insight.cli", "report", str(tmp_path / "run")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 2 and rep.stderr.count("\n") == 1 and "recording failed" in rep.stderr

