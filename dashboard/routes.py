"""Plain Flask routes of the dashboard: the Chrome-trace download, ``/download/<run_id>/trace.json.gz``.

The gzip Chrome trace (``insight.export.export_chrome``) of a run is exported once per version of the run
(the RunStore's cache, keyed by the manifest) into this server's own directory under the user's cache dir
(``$XDG_CACHE_HOME/insight/traces/<pid>-...``, else ``~/.cache/insight/traces``). ``cleanup_trace_cache()``
removes it; ``dashboard.server`` calls it when the server stops (directories of servers that died without
cleaning up are removed the next time a server exports).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from pathlib import Path

from dashboard.data import RunNotFound, store
from insight.trace import TraceError

DOWNLOAD_PATH = "/download/<run_id>/trace.json.gz"
MAX_ID = 255  # a directory name is at most 255 bytes: longer ids name no run

_export_lock = threading.Lock()
_export_dir: Path | None = None
_seq = itertools.count()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "insight" / "traces"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Trace directories of servers that are gone (killed before they could clean up)."""
    for d in root.glob("*-*"):
        pid = d.name.split("-", 1)[0]
        if d.is_dir() and not d.is_symlink() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def trace_cache_dir() -> Path:
    """This server's directory of exported traces (created on first use)."""
    global _export_dir
    if _export_dir is None or not _export_dir.is_dir():
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        _export_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    return _export_dir


def cleanup_trace_cache() -> None:
    """Remove this server's exported traces (call when the server stops)."""
    global _export_dir
    with _export_lock:
        if _export_dir is not None:
            shutil.rmtree(_export_dir, ignore_errors=True)
            _export_dir = None


def _export(run, out_dir: str) -> Path:
    from insight.export import export_chrome

    key = hashlib.sha1(f"{run.path}\x00{run.manifest.get('run_id', '')}\x00{next(_seq)}".encode()).hexdigest()[:20]
    out = Path(out_dir) / f"{key}.trace.json.gz"
    export_chrome(run, out, gzip=True)
    return out


def chrome_trace_file(run_id: str) -> Path:
    """The run's gzip Chrome trace, exported once per version of the run (RunStore cache)."""
    with _export_lock:  # one export at a time: a million tasks take a few seconds and much CPU
        d = trace_cache_dir()
        path = Path(store().get(run_id, "chrome_trace", _export, str(d)))
        if not path.exists():  # the cache was cleaned away: export again
            path = _export(store().run(run_id), str(d))
        return path


def register_routes(server) -> None:
    """Add the Chrome-trace download route to the app's Flask server (once per server)."""
    from flask import abort, send_file

    if "insight_chrome_trace" in server.view_functions:
        return

    def download(run_id: str):
        if len(run_id) > MAX_ID:
            abort(404, "no such run")
        try:
            path = chrome_trace_file(run_id)
        except RunNotFound:
            abort(404, f"no run named {run_id!r}")
        except TraceError as e:
            return str(e), 422, {"Content-Type": "text/plain; charset=utf-8"}
        return send_file(path, mimetype="application/gzip", as_attachment=True,
                         download_name=f"{run_id}.trace.json.gz", max_age=0)

    server.add_url_rule(DOWNLOAD_PATH, endpoint="insight_chrome_trace", view_func=download)
