"""Serving the dashboard: waitress (a real WSGI server), a pid file per port, clean stop.

``insight start`` -> ``serve()``; ``insight stop --port`` -> ``stop()`` sends SIGTERM to the server
recorded for that port, which shuts down cleanly (as Ctrl-C does).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    d = Path(base) / "insight"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pid_file(port: int) -> Path:
    return state_dir() / f"dashboard-{port}.json"


def serve(base_dir, host: str = "127.0.0.1", port: int = 8080, reload_interval: float = 3.0, threads: int = 8,
          quiet: bool = False) -> int:
    from waitress import create_server

    from dashboard.app import create_app

    app = create_app(base_dir, reload_interval)
    server = create_server(app.server, host=host, port=port, threads=threads, ident="insight")
    real_port = server.effective_port
    pid_file(real_port).write_text(json.dumps({"pid": os.getpid(), "host": host, "port": real_port,
                                               "base_dir": str(Path(base_dir).resolve())}))

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    url = f"http://{host}:{real_port}/"
    if not quiet:
        print(f"Insight dashboard for {Path(base_dir).resolve()} at {url}  (Ctrl-C or `insight stop --port "
              f"{real_port}` to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        try:
            pid_file(real_port).unlink()
        except FileNotFoundError:
            pass
        if not quiet:
            print("Insight dashboard stopped.", flush=True)
    return 0


def stop(port: int, timeout: float = 10.0) -> int:
    f = pid_file(port)
    if not f.exists():
        print(f"insight stop: no dashboard is recorded on port {port}", file=sys.stderr)
        return 1
    info = json.loads(f.read_text())
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        f.unlink(missing_ok=True)
        print(f"insight stop: the dashboard on port {port} (pid {pid}) was no longer running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # the server removes its pid file as it exits; a process that exited but was not yet reaped by its
        # parent still answers kill(pid, 0), so the file is the signal to trust
        gone = not f.exists()
        if not gone:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone = True
        if gone:
            print(f"stopped the dashboard on port {port} (pid {pid})")
            return 0
        time.sleep(0.1)
    print(f"insight stop: the dashboard on port {port} (pid {pid}) did not stop within {timeout:.0f}s",
          file=sys.stderr)
    return 1
