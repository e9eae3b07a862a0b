"""Serving the dashboard: waitress (a real WSGI server), a pid file per port, clean stop.

``insight start`` -> ``serve()``; ``insight stop --port`` -> ``stop()`` sends SIGTERM to the server
recorded for that port, which shuts down cleanly (as Ctrl-C does).

The pid file (``<state dir>/dashboard-<port>.json``, mode 0600) records the server's pid, its start time
(field 22 of ``/proc/<pid>/stat``: unique for the life of the machine together with the pid), its command
line and a random token. ``stop()`` signals the pid only when the process holding it now has that start
time and command line -- a pid reused by another program after the server died is never signalled -- and
a pid file that is not what ``serve()`` writes is a ``PidFileError`` (nothing is signalled). The server
removes the pid file on exit only while it still holds its own token.

Requests are bounded (``MAX_REQUEST_BODY`` bytes of body: a Dash callback sends a few KB), and an error
answers with a one-line text naming the problem, never a stack trace (which goes to the server's log).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

MAX_REQUEST_BODY = 1 << 20  # bytes, unless create_app sets Flask's MAX_CONTENT_LENGTH
_PID_FIELDS = ("pid", "start_time", "cmdline", "token", "port")


class PidFileError(Exception):
    """The pid file of a port is not one ``serve()`` wrote (corrupt, edited, from another program)."""


def state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    d = Path(base) / "insight"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pid_file(port: int) -> Path:
    return state_dir() / f"dashboard-{port}.json"


# -- process identity --------------------------------------------------------------------------------------
def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); None when
    there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) is in parentheses and may itself hold spaces or ')'
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def process_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


def _write_pid_file(path: Path, info: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def read_pid_file(path: Path) -> dict:
    """The pid file's fields, checked; ``PidFileError`` when it is not what ``serve()`` writes."""
    try:
        if path.stat().st_size > 64 * 1024:
            raise PidFileError(f"the pid file {path} is not an Insight pid file (too large); nothing was stopped")
        info = json.loads(path.read_text())
    except PidFileError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PidFileError(f"the pid file {path} is corrupt ({type(e).__name__}); nothing was stopped -- remove it if "
                           f"no dashboard runs on that port") from None
    ok = (isinstance(info, dict) and all(k in info for k in _PID_FIELDS)
          and isinstance(info["pid"], int) and not isinstance(info["pid"], bool) and 1 < info["pid"] < 2**22
          and isinstance(info["start_time"], int) and not isinstance(info["start_time"], bool)
          and isinstance(info["cmdline"], list) and all(isinstance(a, str) for a in info["cmdline"])
          and isinstance(info["token"], str) and len(info["token"]) == 32)
    if not ok:
        raise PidFileError(f"the pid file {path} is corrupt (not what `insight start` writes); nothing was stopped "
                           f"-- remove it if no dashboard runs on that port")
    return info


def _is_our_server(info: dict) -> bool:
    if info["start_time"] == 0 and process_start_time(os.getpid()) is None:
        # no /proc on this system (the server could not record its start time either): the pid alone
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True
    return (process_start_time(info["pid"]) == info["start_time"]
            and process_cmdline(info["pid"]) == info["cmdline"])


# -- serving -----------------------------------------------------------------------------------------------
def _plain(text: str, status: int):
    return text, status, {"Content-Type": "text/plain; charset=utf-8"}


def _install_error_pages(flask_app) -> None:
    """Answers that name the problem in one line, without a stack trace (kept where the page modules
    already registered their own)."""
    from insight.trace import TraceError

    flask_app.config.setdefault("MAX_CONTENT_LENGTH", MAX_REQUEST_BODY)
    limit = flask_app.config["MAX_CONTENT_LENGTH"]
    spec = flask_app.error_handler_spec.setdefault(None, {})

    def have(code, exc) -> bool:
        return exc in spec.get(code, {})

    if not have(None, TraceError):
        flask_app.register_error_handler(
            TraceError, lambda e: _plain(" ".join(str(e).split())[:2000] or "this run cannot be read", 422))
    if not have(413, _http_exc(413)):
        flask_app.register_error_handler(
            413, lambda e: _plain(f"request body larger than {limit} bytes", 413))
    if not have(500, _http_exc(500)):
        def internal(e):
            orig = getattr(e, "original_exception", None)
            what = type(orig).__name__ if orig is not None else "internal error"
            return _plain(f"the dashboard could not answer this request ({what}); the server log has the details",
                          500)
        flask_app.register_error_handler(500, internal)


def _http_exc(code: int):
    from werkzeug.exceptions import default_exceptions
    return default_exceptions[code]


def _cleanup_trace_cache() -> None:
    """Remove the Chrome-trace files this server exported for downloads (``dashboard.routes`` owns them)."""
    from dashboard.routes import cleanup_trace_cache

    try:
        cleanup_trace_cache()
    except OSError as e:  # a cache that cannot be removed must not turn a clean stop into a traceback
        print(f"insight: could not remove the trace cache: {e}", file=sys.stderr)


def serve(base_dir, host: str = "127.0.0.1", port: int = 8080, reload_interval: float = 3.0, threads: int = 8,
          quiet: bool = False) -> int:
    from waitress import create_server

    from dashboard.app import create_app

    app = create_app(base_dir, reload_interval)
    _install_error_pages(app.server)
    # the same bound in waitress (refused before the body is read) as in Flask (create_app's MAX_CONTENT_LENGTH)
    limit = int(app.server.config.get("MAX_CONTENT_LENGTH") or MAX_REQUEST_BODY)
    server = create_server(app.server, host=host, port=port, threads=threads, ident="insight",
                           max_request_body_size=limit, expose_tracebacks=False)
    real_port = int(server.effective_port)
    me = os.getpid()
    token = secrets.token_hex(16)
    pf = pid_file(real_port)
    _write_pid_file(pf, {"pid": me, "start_time": process_start_time(me) or 0, "cmdline": process_cmdline(me) or [],
                         "token": token, "host": host, "port": real_port, "base_dir": str(Path(base_dir).resolve())})

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{real_port}/"
    if not quiet:
        print(f"Insight dashboard for {Path(base_dir).resolve()} at {url}  (Ctrl-C or `insight stop --port "
              f"{real_port}` to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        try:  # only our own pid file: another server may have taken the port (and the file) since
            if json.loads(pf.read_text()).get("token") == token:
                pf.unlink()
        except (OSError, ValueError, AttributeError):
            pass
        _cleanup_trace_cache()
        if not quiet:
            print("Insight dashboard stopped.", flush=True)
    return 0


def stop(port: int, timeout: float = 10.0) -> int:
    """SIGTERM to the dashboard ``insight start`` recorded for ``port``, after checking the pid still
    belongs to it; waits until it exits. 0: stopped; 1: nothing (left) to stop. Raises PidFileError for a
    pid file ``serve()`` did not write."""
    f = pid_file(port)
    if not f.exists():
        print(f"insight stop: no dashboard is recorded on port {port}", file=sys.stderr)
        return 1
    info = read_pid_file(f)
    pid = info["pid"]
    if info["port"] != port:
        raise PidFileError(f"the pid file {f} names port {info['port']!r}, not {port}; nothing was stopped")
    if not _is_our_server(info):
        f.unlink(missing_ok=True)
        print(f"insight stop: the dashboard on port {port} (pid {pid}) is no longer running; pid {pid} now belongs "
              f"to another process, which was left alone (removed the stale pid file)"
              if process_start_time(pid) is not None else
              f"insight stop: the dashboard on port {port} (pid {pid}) was no longer running (removed the stale "
              f"pid file)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        f.unlink(missing_ok=True)
        print(f"insight stop: the dashboard on port {port} (pid {pid}) was no longer running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # the server removes its pid file as it exits; a process that exited but was not yet reaped by its
        # parent still has its /proc entry (a zombie), so the file is the signal to trust
        gone = not f.exists() or (info["start_time"] != 0 and process_start_time(pid) != info["start_time"])
        if gone:
            print(f"stopped the dashboard on port {port} (pid {pid})")
            return 0
        time.sleep(0.1)
    print(f"insight stop: the dashboard on port {port} (pid {pid}) did not stop within {timeout:.0f}s",
          file=sys.stderr)
    return 1
