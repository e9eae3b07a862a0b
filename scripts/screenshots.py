"""Screenshots of every dashboard page at 1600x1000 and the time each page takes to render, cold and warm.

    python scripts/screenshots.py --base RUNS_DIR [--run RUN] [--other RUN2] [--out docs/screenshots]
                                  [--no-shots] [--repeat 3]

Starts the real server (``insight start``) on RUNS_DIR, opens each page of RUN in headless Chromium and
times it in the page, frame by frame (``FRAME_MARKER``), twice: until Dash has no callback pending, nothing is
marked loading and every visible figure is drawn ("view": all the page but the tables, which pages with figures
draw after them), and until the tables are drawn too ("all"). "cold" is the first load of the page after the server
started (nothing read yet), "warm" the median of the next ``--repeat`` loads (each a full page load: every
JavaScript bundle parsed again), "nav" the time to open a run page from the run navigation (a client-side link, as
pages are opened after the first; the median of ``--nav-rounds`` rounds after the first). The compare page
compares RUN with OTHER (default: another run of the base dir); the cluster page is included for a multi-rank
RUN. Prints a table of the times (seconds, view/all) and saves ``<out>/<page>.png``.

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
# Dash's callback state does not show (checking only that state ended some loads before plotly.js had even run).
# Whether a graph is hidden is asked only of one not drawn: offsetParent forces a layout, which run in every frame
# was 36 ms of a 0.7 s page (Chrome's CPU profile)
FIGURES_DRAWN = """
var gs = document.querySelectorAll('.dash-graph');
for (var i = 0; i < gs.length; i++) {
    var g = gs[i];
    if ((g.classList.contains('dash-graph--pending') || !g.querySelector('.main-svg')) && g.offsetParent !== null) {
        return false;
    }
}
return true;
"""


# on pages with figures the tables are rendered after them (dashboard/assets/lazy_grid.js): until then each is
# a placeholder
TABLES_DRAWN = "return !document.querySelector('.insight-grid-loading');"

# Times are taken in the page, frame by frame (requestAnimationFrame: a frame whose callback finds the page drawn is
# the frame that shows it), not by polling from Selenium: a poll waits for the page's main thread, so work that
# starts right after the content is drawn (the tables) would delay the look that sees the content.
# "view": the page's content is there, Dash is idle (no callback pending, nothing marked loading) and every
# visible figure is drawn (dcc.Graph adds ``.main-svg`` only once plotly.js has loaded and drawn it); "all": the
# tables are drawn too. Each is the first frame of a stretch of frames over >= 50 ms that all found
# it so (Dash is briefly idle between the content arriving and its callbacks being dispatched), in ms since
# ``__insightMark.t0`` (0: the navigation start of a full load; the click, for a navigation in the app). A "view"
# stretch that a table ends by being rendered (a callback on a prop the grid sets when drawn) counts however short.
FRAME_MARKER = """
(function () {
    var m = {t0: 0, want: null, view: null, all: null, since: {view: null, all: null}, deferred: 0};
    window.__insightMark = m;
    function idle() { %s }
    function figures() { %s }
    function tables() { %s }
    function frame(now) {
        var c = document.querySelector('#_pages_content');
        var view = !!c && c.children.length > 0 && (!m.want || m.want()) && idle() && figures();
        var deferred = document.querySelectorAll('.insight-grid-loading').length;
        var done = {view: view, all: view && tables()};
        for (var k in done) {
            if (m[k] !== null) { continue; }
            if (!done[k]) {
                if (k === 'view' && m.since.view !== null && deferred < m.deferred) { m.view = m.since.view - m.t0; }
                m.since[k] = null;
                continue;
            }
            if (m.since[k] === null) { m.since[k] = now; if (k === 'view') { m.deferred = deferred; } }
            else if (now - m.since[k] >= 50) { m[k] = m.since[k] - m.t0; }
        }
        requestAnimationFrame(frame);
    }
    requestAnimationFrame(frame);
})();
""" % (DASH_IDLE, FIGURES_DRAWN, TABLES_DRAWN)


def _marker_driver():
    """Headless Chromium at 1600x1000 with ``FRAME_MARKER`` in every page."""
    drv = chrome_driver(1600, 1000, log=False)
    drv.set_window_size(1600, 1000)
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FRAME_MARKER})
    return drv


def _until_drawn(drv, what: str, timeout: float) -> tuple[float, float]:
    """(view, all) seconds, from the page's ``__insightMark`` (``FRAME_MARKER``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = drv.execute_script("var m = window.__insightMark; return m ? [m.view, m.all] : null;")
        if got and got[0] is not None and got[1] is not None:
            return round(got[0] / 1e3, 4), round(got[1] / 1e3, 4)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
        time.sleep(0.05)


def _load(drv, url: str, timeout: float = 120.0) -> tuple[float, float]:
    """(view, all) seconds from the navigation start of a full load of ``url`` (``FRAME_MARKER``)."""
    drv.get(url)
    return _until_drawn(drv, f"rendering {url}", timeout)


def _navigate(drv, page: str, timeout: float = 120.0) -> tuple[float, float]:
    """(view, all) seconds from a click on the run navigation's ``page`` link (client-side, no page reload: how
    pages are opened after the first) until the new page is drawn (``FRAME_MARKER``)."""
    drv.execute_script("""
        var old = document.querySelector('#_pages_content > *'), page = arguments[0], m = window.__insightMark;
        m.want = function () {
            var c = document.querySelector('#_pages_content > *');
            return !!c && c !== old && !!document.querySelector('#nav-' + page + '.active');
        };
        m.view = m.all = m.since.view = m.since.all = null;
        m.deferred = 0;
        m.t0 = performance.now();
        document.getElementById('nav-' + page).click();""", page)
    return _until_drawn(drv, f"navigating to {page}", timeout)


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


def _median_pair(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return tuple(round(statistics.median(x), 3) for x in zip(*samples))


def _time_pages(drvs: dict, servers: dict, pages, run: str, repeat: int, shots: Path | None,
                nav_rounds: int = 2) -> dict:
    """{server: {page: {kind: (view, all)}}} for kind in cold, warm, nav (see ``_until_drawn``), every load
    interleaved over the servers, each server's pages in its own browser (``drvs[server]``)."""
    times = {k: {} for k in servers}
    for name, path in pages:
        for k, (_, _, url) in servers.items():
            times[k][name] = {"cold": _load(drvs[k], url + path)}
        warm = {k: [] for k in servers}
        for _ in range(max(1, repeat)):
            for k, (_, _, url) in servers.items():
                warm[k].append(_load(drvs[k], url + path))
        for k in servers:
            times[k][name]["warm"] = _median_pair(warm[k])
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
            times[k][name]["nav"] = _median_pair(v)
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
            drvs[k] = _marker_driver()
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
        times = _time_pages(drvs, servers, pages, run, a.repeat, shots, max(2, a.nav_rounds))
        colds = {k: {name: [v["cold"]] for name, v in t.items()} for k, t in times.items()}
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
                times[k][name]["cold"] = _median_pair(colds[k][name])
    finally:
        for drv in drvs.values():
            drv.quit()
        for k, (server, port, _) in servers.items():
            stop_server(server, port, env, cwds[k])
    print(f"run {run}; compare with {other}; cold: the first load after the server started (median of "
          f"{a.cold_repeat} server starts); warm: median of "
          f"{a.repeat} more full page loads; nav: a click in the run navigation, median of "
          f"{max(2, a.nav_rounds) - 1} rounds (seconds). Each as view / all: all the page but the tables drawn "
          f"(view), everything drawn (all)")
    keys = list(times)
    head = "".join(f" {f'{c} {k}':>13}" for c in ("cold", "warm", "nav") for k in keys)
    print(f"{'page':<10}{head}" + (f"   (old: {a.against}, new: {a.server_cwd})" if a.against else ""))
    for name, _ in pages:
        cells = ""
        for c in ("cold", "warm", "nav"):
            for k in keys:
                v = times[k][name].get(c)
                cells += f" {v[0]:6.3f}/{v[1]:6.3f}" if v is not None else f" {'':>13}"
        print(f"{name:<10}{cells}")
    if a.json:
        a.json.write_text(json.dumps(times if a.against else times["new"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
