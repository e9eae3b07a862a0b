"""Screenshots of every dashboard page at 1600x1000 and the time each page takes to render, cold and warm.

    python scripts/screenshots.py --base RUNS_DIR [--run RUN] [--other RUN2] [--out docs/screenshots]
                                  [--no-shots] [--repeat 3]

Starts the real server (``insight start``) on RUNS_DIR, opens each page of RUN in headless Chromium and
waits until Dash has no callback pending, nothing is marked loading and every visible figure is drawn. "cold" is the first load of the page
after the server started (nothing read yet), "warm" the median of the next ``--repeat`` loads (each a full
page load: every JavaScript bundle parsed again), "nav" the time to open a run page from the run navigation
(a client-side link, as pages are opened after the first; the median of ``--nav-rounds`` rounds after the first). The compare
page compares RUN with OTHER (default: another run of the base dir); the cluster page is included for a
multi-rank RUN. Prints a table of the times (seconds) and saves ``<out>/<page>.png``.

``--against OLD_CHECKOUT`` (implies ``--no-shots``) times a second server run from another checkout (e.g. a
``git worktree`` of an older commit) in the same run, interleaved load by load -- old, new, old, new -- so both
see the same machine load, and prints both columns side by side. Each server gets its own browser: in one
browser the second server's first page with Plotly took ~1 s longer than the first's, whichever server was
second (Chrome compiling the 4.8 MB plotly.min.js again, for its code cache, on its second load). ``--cold-repeat N`` restarts the servers N-1
more times for N cold samples (median reported); ``--pages runs,operators`` times only those pages.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from browser_util import DASH_IDLE, chrome_driver, stop_server  # noqa: E402

RUN_PAGES = ("overview", "operators", "pipeline", "timeline", "memory")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# every visible figure drawn: dcc.Graph adds its plot (``.main-svg``) only once plotly.js has loaded and run, which
# Dash's callback state does not show (checking only that state ended some loads before plotly.js had even run)
FIGURES_DRAWN = """
var gs = document.querySelectorAll('.dash-graph');
for (var i = 0; i < gs.length; i++) {
    var g = gs[i];
    if (g.offsetParent === null) { continue; }
    if (g.classList.contains('dash-graph--pending') || !g.querySelector('.main-svg')) { return false; }
}
return true;
"""


def _until_drawn(drv, t0: float, content_js: str, what: str, timeout: float, *args) -> float:
    """Seconds since ``t0`` until ``content_js`` holds, Dash is idle and every visible figure is drawn, twice in a
    row 50 ms apart (the second look's wait not counted)."""
    deadline = t0 + timeout
    idle = 0
    while idle < 2:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
        ok = drv.execute_script(content_js, *args) and drv.execute_script(DASH_IDLE) \
            and drv.execute_script(FIGURES_DRAWN)
        idle = idle + 1 if ok else 0
        time.sleep(0.05)
    return time.perf_counter() - t0 - 0.05


def _load(drv, url: str, timeout: float = 120.0) -> float:
    """Seconds from navigation until the page is drawn (every visible figure too) and Dash is idle."""
    t0 = time.perf_counter()
    drv.get(url)
    return _until_drawn(drv, t0, "return !!document.querySelector('#_pages_content') && "
                                 "document.querySelector('#_pages_content').children.length > 0",
                        f"rendering {url}", timeout)


def _navigate(drv, page: str, timeout: float = 120.0) -> float:
    """Seconds from a click on the run navigation's ``page`` link (client-side, no page reload: how pages
    are opened after the first) until the page is drawn and Dash is idle."""
    t0 = time.perf_counter()
    drv.execute_script("window.__insightOld = document.querySelector('#_pages_content > *');"
                       "document.getElementById('nav-' + arguments[0]).click();", page)
    return _until_drawn(drv, t0, "var c = document.querySelector('#_pages_content > *');"
                                 "return !!c && c !== window.__insightOld && "
                                 "!!document.querySelector('#nav-' + arguments[0] + '.active');",
                        f"navigating to {page}", timeout, page)


def _runs(base: Path) -> list[str]:
    return sorted(p.parent.name for p in base.glob("*/manifest.json"))


def _ranks(run: Path) -> int:
    return len(list(run.glob("rank_*"))) or 1


def _start(base: Path, cwd: Path, env: dict):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "insight.cli", "start", "--summary-base-dir", str(base),
                               "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while not _up(url + "/_dash-layout"):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the dashboard server (from {cwd}) did not start")
        time.sleep(0.2)
    return server, port, url


def _time_pages(drvs: dict, servers: dict, pages, run: str, repeat: int, shots: Path | None,
                nav_rounds: int = 2) -> dict:
    """{server: {page: {cold_s, warm_s, nav_s}}}, every load interleaved over the servers, each server's
    pages in its own browser (``drvs[server]``)."""
    times = {k: {} for k in servers}
    for name, path in pages:
        for k, (_, _, url) in servers.items():
            times[k][name] = {"cold_s": _load(drvs[k], url + path)}
        warm = {k: [] for k in servers}
        for _ in range(max(1, repeat)):
            for k, (_, _, url) in servers.items():
                warm[k].append(_load(drvs[k], url + path))
        for k in servers:
            times[k][name]["warm_s"] = round(statistics.median(warm[k]), 3)
        if shots is not None:
            k, (_, _, url) = next(iter(servers.items()))
            drv = drvs[k]
            _load(drv, url + path)
            time.sleep(0.5)  # plotly's transitions
            drv.save_screenshot(str(shots / f"{name}.png"))
    # in-app navigation (dcc.Link, no reload): the run pages in turn, ``nav_rounds`` times; the first round (the
    # browser compiling each page's code for the first time) is left out, the median of the others reported
    navs = {k: {} for k in servers}
    for round_ in range(nav_rounds if any(name in RUN_PAGES for name, _ in pages) else 0):
        for k, (_, _, url) in servers.items():
            _load(drvs[k], url + f"/run/{quote(run)}/overview")
            for name in RUN_PAGES[1:] + RUN_PAGES[:1]:
                dt = _navigate(drvs[k], name)
                if round_ and name in times[k]:
                    navs[k].setdefault(name, []).append(dt)
    for k in servers:
        for name, v in navs[k].items():
            times[k][name]["nav_s"] = round(statistics.median(v), 3)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--run")
    ap.add_argument("--other")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--no-shots", action="store_true", help="only measure the render times")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold-repeat", type=int, default=1,
                    help="restart the servers this many times in all and report the median cold load (one cold "
                         "load is one sample: on a busy machine it alone can be off by a second)")
    ap.add_argument("--nav-rounds", type=int, default=2,
                    help="rounds of clicks through the run navigation; the first is left out, the median of the "
                         "others reported (one round of samples moves by a few hundred ms on a busy machine)")
    ap.add_argument("--pages", help="only these pages (comma-separated names, e.g. runs,operators)")
    ap.add_argument("--json", type=Path, help="also write the times here")
    ap.add_argument("--server-cwd", type=Path, default=ROOT,
                    help="run the server from this directory (e.g. an older checkout, to compare render times)")
    ap.add_argument("--against", type=Path,
                    help="also time a server run from this checkout, interleaved with --server-cwd's (no shots)")
    a = ap.parse_args(argv)
    runs = _runs(a.base)
    if not runs:
        ap.error(f"{a.base}: no runs (no */manifest.json)")
    run = a.run or runs[0]
    other = a.other or next((r for r in runs if r != run), run)
    pages = [("runs", "/")] + [(p, f"/run/{quote(run)}/{p}") for p in RUN_PAGES]
    if _ranks(a.base / run) > 1:
        pages.append(("cluster", f"/run/{quote(run)}/cluster"))
    pages.append(("compare", f"/compare?a={quote(run)}&b={quote(other)}"))
    if a.pages:
        keep = set(a.pages.split(","))
        pages = [p for p in pages if p[0] in keep]

    state = Path(tempfile.mkdtemp(prefix="insight-shots-"))
    env = dict(os.environ, XDG_RUNTIME_DIR=str(state))
    cwds = {"new": a.server_cwd} if a.against is None else {"old": a.against, "new": a.server_cwd}
    shots = None if a.no_shots or a.against is not None else a.out
    servers, drvs = {}, {}
    try:
        for k, cwd in cwds.items():
            servers[k] = _start(a.base, cwd, env)
        for k in cwds:  # a browser per server: one's HTTP and code caches never speed up or slow down the other's
            drvs[k] = chrome_driver(1600, 1000, log=False)
            drvs[k].set_window_size(1600, 1000)
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
        times = _time_pages(drvs, servers, pages, run, a.repeat, shots, max(2, a.nav_rounds))
        colds = {k: {name: [v["cold_s"]] for name, v in t.items()} for k, t in times.items()}
        for _ in range(a.cold_repeat - 1):  # the servers again from scratch, one cold load of every page
            for k, (server, port, _) in list(servers.items()):
                stop_server(server, port, env, cwds[k])
                del servers[k]
            for k, cwd in cwds.items():
                servers[k] = _start(a.base, cwd, env)
            for name, path in pages:
                for k, (_, _, url) in servers.items():
                    colds[k][name].append(_load(drvs[k], url + path))
        for k in times:
            for name in times[k]:
                times[k][name]["cold_s"] = round(statistics.median(colds[k][name]), 3)
    finally:
        for drv in drvs.values():
            drv.quit()
        for k, (server, port, _) in servers.items():
            stop_server(server, port, env, cwds[k])
    print(f"run {run}; compare with {other}; cold: the first load after the server started (median of "
          f"{a.cold_repeat} server starts); warm: median of "
          f"{a.repeat} more full page loads; nav: a click in the run navigation, median of "
          f"{max(2, a.nav_rounds) - 1} rounds (seconds)")
    keys = list(times)
    head = "".join(f" {f'{c} {k}':>10}" for c in ("cold", "warm", "nav") for k in keys)
    print(f"{'page':<10}{head}" + (f"   (old: {a.against}, new: {a.server_cwd})" if a.against else ""))
    for name, _ in pages:
        cells = ""
        for c in ("cold_s", "warm_s", "nav_s"):
            for k in keys:
                v = times[k][name].get(c)
                cells += f" {v:10.3f}" if v is not None else f" {'':>10}"
        print(f"{name:<10}{cells}")
    if a.json:
        a.json.write_text(json.dumps(times if a.against else times["new"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
