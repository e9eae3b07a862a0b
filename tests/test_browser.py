"""End-to-end acceptance test of the dashboard, in headless Chromium against the real server.

One module-scoped fixture (``e2e``) builds everything the tests share:

* two real profiled runs, trained by ``insight demo --output BASE --name run-a --epochs 2`` and
  ``... --name run-b --epochs 1`` (subprocesses, in parallel), plus ``run-broken``: a copy of run-b whose
  tasks table (``rank_0/tasks.parquet`` or the first part file of ``rank_0/tasks/``) is cut in half;
* the real server, ``python -m insight.cli start --summary-base-dir BASE --port P --reload-interval 1``
  (a subprocess with its own pid-file directory), polled until it answers;
* one Chromium webdriver with the browser console log enabled.

Teardown stops the server with ``insight stop --port P`` and checks that it exited cleanly (exit status 0,
its goodbye line, pid file gone, no traceback on stderr).

Every expected number comes from ``insight.analysis`` run in this process on the same run directories. No
test sleeps for a fixed time: everything waits (generously: the machine may be busy) for ids, texts, the
figure's state or Dash's callback queue to drain.
"""
from __future__ import annotations

import base64
import html
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from browser_util import DASH_IDLE, chrome_driver, chromedriver_path
from insight import analysis

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
RUN_PAGES = ("overview", "operators", "pipeline", "timeline", "memory")
TIMEOUT = 45.0            # a single wait; generous, the machine may be loaded by other work
MB = 2 ** 20
GD = "var gd = document.querySelector('#%s .js-plotly-plot'); "


# -- the shared fixture --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "insight.cli", *map(str, args)]


def _table_files(run: Path, table: str) -> list[Path]:
    """The Parquet files of one table of rank 0: ``<table>.parquet`` (and ``<table>-*.parquet`` parts) or the
    part files of a ``<table>/`` directory."""
    rank = run / "rank_0"
    files = sorted((rank / table).glob("*.parquet")) if (rank / table).is_dir() else sorted(rank.glob(f"{table}*.parquet"))
    assert files, f"{rank}: no {table} table"
    return files


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    if chromedriver_path() is None:
        pytest.fail("chromedriver is not installed: install chromium and chromium-driver (bash scripts/test.sh does)")

    tmp = tmp_path_factory.mktemp("e2e")
    base, state, downloads = tmp / "runs", tmp / "state", tmp / "downloads"
    for d in (base, state, downloads):
        d.mkdir()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(state), PYTHONUNBUFFERED="1")  # our own pid file, nobody else's

    # two real runs of the same seed, one after the other (about 4 s each): trained at the same time they would
    # share the two cores for only part of run-a, so their op times would differ for real, not by noise
    for name, epochs in (("run-a", 2), ("run-b", 1)):
        log = open(tmp / f"demo-{name}.log", "w+")
        p = subprocess.Popen(_cli("demo", "--output", base, "--name", name, "--epochs", epochs),
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        rc = p.wait(timeout=300)
        log.seek(0)
        out = log.read()
        log.close()
        assert rc == 0, f"insight demo --name {name} failed ({rc}):\n{out[-3000:]}"
        assert (base / name / "manifest.json").exists(), out[-3000:]
    # a broken run: run-b with half of its tasks table
    shutil.copytree(base / "run-b", base / "run-broken")
    tasks = _table_files(base / "run-broken", "tasks")[0]
    data = tasks.read_bytes()
    tasks.write_bytes(data[: len(data) // 2])

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out_f, err_f = open(tmp / "server.out", "w+"), open(tmp / "server.err", "w+")
    server = subprocess.Popen(_cli("start", "--summary-base-dir", base, "--port", port, "--reload-interval", 1),
                              cwd=ROOT, env=env, stdout=out_f, stderr=err_f)
    driver, yielded = None, False
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                err_f.seek(0)
                pytest.fail(f"the server exited with {server.returncode}:\n{err_f.read()[-3000:]}")
            try:
                if _http(url + "/", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer within 90 s")
            time.sleep(0.2)

        driver = chrome_driver(1400, 1200, downloads=downloads)
        yielded = True
        yield SimpleNamespace(base=base, url=url, port=port, driver=driver, downloads=downloads,
                              run=lambda name: base / name)
    finally:
        if driver is not None:
            driver.quit()
        if not yielded:  # the set-up failed (and says why): just end the server
            if server.poll() is None:
                server.kill()
                server.wait()
            out_f.close(), err_f.close()
    out_f.close(), err_f.close()  # the server keeps its own copies of the descriptors
    _stop_cleanly(server, port, env, state, out_f.name, err_f.name)


def _stop_cleanly(server, port: int, env: dict, state: Path, out_path: str, err_path: str) -> None:
    """``insight stop --port``, then: status 0, the goodbye line, pid file gone, no traceback on stderr."""
    # reap the server as soon as it exits, as the shell that started it would: `insight stop` watches the
    # pid with kill(pid, 0), which keeps succeeding for an exited child that nobody has waited for yet
    reaper = threading.Thread(target=server.wait, daemon=True)
    reaper.start()
    t_stop = time.monotonic()
    stop = subprocess.run(_cli("stop", "--port", port), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    reaper.join(30)
    rc = server.returncode
    if rc is None:
        server.kill()
        server.wait()
    stop_s = time.monotonic() - t_stop
    out, err = Path(out_path).read_text(), Path(err_path).read_text()
    assert stop.returncode == 0 and f"stopped the dashboard on port {port}" in stop.stdout, (stop.stdout, stop.stderr)
    assert stop_s < 20, f"insight stop took {stop_s:.1f} s"
    assert rc == 0, f"server exit status {rc}\n{err[-3000:]}"
    assert "Insight dashboard stopped." in out, out
    assert not (state / "insight" / f"dashboard-{port}.json").exists()
    assert "Traceback" not in err, err[-5000:]


# -- helpers -------------------------------------------------------------------------------------------------
def _wait(drv, cond, what: str, timeout: float = TIMEOUT):
    """``cond()``'s first truthy value; DOM churn (stale or not-yet-rendered elements) just means: not yet."""
    from selenium.common.exceptions import (JavascriptException, NoSuchElementException,
                                            StaleElementReferenceException)
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                             JavascriptException)).until(lambda _: cond(), message=f"waiting for {what}")


def _js(drv, script: str, what: str, timeout: float = TIMEOUT, *args):
    return _wait(drv, lambda: drv.execute_script(script, *args), what, timeout)


def _text(drv, id_: str) -> str:
    return drv.find_element("id", id_).text


def _wait_text(drv, id_: str, expected: str | None = None, timeout: float = TIMEOUT) -> str:
    """The text of element ``id_`` once it is non-empty (and equal to ``expected`` when given)."""
    def ok():
        t = _text(drv, id_).strip()
        return t if t and (expected is None or t == expected) else None
    try:
        return _wait(drv, ok, f"#{id_}" + (f" to read {expected!r}" if expected else ""), timeout)
    except Exception:
        got = drv.find_elements("id", id_)
        raise AssertionError(f"#{id_}: expected {expected!r}, got {got[0].text if got else 'no such element'!r}")


IDLE = DASH_IDLE


def _settle(drv, timeout: float = TIMEOUT) -> None:
    """Wait until Dash has no callback requested, pending or executing (twice in a row)."""
    _js(drv, IDLE, "Dash's callbacks to finish", timeout)
    _js(drv, IDLE, "Dash's callbacks to finish", timeout)


def _severe(drv) -> list[dict]:
    """The browser console's SEVERE entries since the last call (reading the log empties it)."""
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def _open(e2e, path: str) -> None:
    _severe(e2e.driver)  # forget what earlier pages logged
    e2e.driver.get(e2e.url + path)


def _figure_ready(drv, graph_id: str, what: str = ""):
    return _js(drv, GD % graph_id + "return gd && gd.data && gd.data.length > 0 && gd._fullLayout ? "
                                    "gd.data.length : 0;", what or f"the {graph_id} figure")


def _ms(v: float) -> str:
    return f"{v:.3f} ms"


GRID_CELLS = """
var out = [];
document.querySelectorAll('#' + CSS.escape(arguments[0]) + ' .ag-row .ag-cell[col-id="' + arguments[1] + '"]')
    .forEach(function(c) { out.push([parseInt(c.closest('.ag-row').getAttribute('row-index')), c.innerText.trim()]); });
out.sort(function(a, b) { return a[0] - b[0]; });
return out.map(function(x) { return x[1]; });
"""


def _cells(drv, table: str, col: str) -> list[str]:
    """The texts of column ``col`` of grid ``table`` on its current page, in display order."""
    return drv.execute_script(GRID_CELLS, table, col)


def _filter_box(drv, table: str, col: str):
    """The floating-filter input of column ``col`` of grid ``table``."""
    idx = drv.find_element("css selector", f"#{table} .ag-header-cell[col-id='{col}']").get_attribute("aria-colindex")
    return drv.find_element("css selector", f"#{table} .ag-floating-filter[aria-colindex='{idx}'] input")


def _type_filter(drv, table: str, col: str, text: str, replace: bool = False) -> None:
    """Type ``text`` (and Enter) into the floating filter of column ``col``, then wait until the box holds it.
    Under the full suite's load a box once held nothing after the keys were sent (it was rendered again between
    the lookup and the typing): the box is then looked up and typed into once more. Rows are the caller's check."""
    from selenium.webdriver.common.keys import Keys

    for attempt in range(2):
        box = _filter_box(drv, table, col)
        box.click()
        if replace:
            box.send_keys(Keys.CONTROL, "a")
        box.send_keys(text, Keys.ENTER)
        try:
            _wait(drv, lambda: _filter_box(drv, table, col).get_attribute("value") == text,
                  f"the {col} filter of {table} to hold {text!r}", timeout=5)
            return
        except Exception:
            if attempt:
                raise AssertionError(f"the {col} filter of {table} holds "
                                     f"{_filter_box(drv, table, col).get_attribute('value')!r}, not {text!r}")


def _headers(drv, table: str) -> list[str]:
    cells = drv.find_elements("css selector", f"#{table} .ag-header-row-column .ag-header-cell")
    cells = sorted(cells, key=lambda c: int(c.get_attribute("aria-colindex")))
    return [c.find_element("css selector", ".ag-header-cell-text").text for c in cells]


def _num(s: str) -> float:
    return float(s.replace("\u2212", "-").replace(",", ""))  # d3 prints a real minus sign


def _typed(spec) -> np.ndarray:
    """A trace array as the page sent it: plotly's base64 typed-array spec, or a plain list."""
    if isinstance(spec, dict) and "bdata" in spec:
        return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
    return np.asarray(spec)


# -- 1. the runs page ----------------------------------------------------------------------------------------
def test_runs_page_lists_the_runs_and_the_filter_narrows_it(e2e):
    drv = e2e.driver
    _open(e2e, "/")
    all_runs = ["run-a", "run-b", "run-broken"]
    _wait(drv, lambda: sorted(_cells(drv, "runs-table", "run")) == all_runs, f"the runs table to list {all_runs}")
    rows = {r: i for i, r in enumerate(_cells(drv, "runs-table", "run"))}
    status = _cells(drv, "runs-table", "status")
    avg = _cells(drv, "runs-table", "avg_step_ms")
    assert status[rows["run-a"]] == status[rows["run-b"]] == "complete"
    assert status[rows["run-broken"]].startswith("error:") and "tasks" in status[rows["run-broken"]]
    for r in ("run-a", "run-b"):
        assert _num(avg[rows[r]]) == round(analysis.step_summary(e2e.run(r)).step_time_ms, 3)
    assert avg[rows["run-broken"]] == ""
    # the Run column's filter: "run-a" leaves one row ...
    _type_filter(drv, "runs-table", "run", "run-a")
    _wait(drv, lambda: _cells(drv, "runs-table", "run") == ["run-a"], "the filter to leave only run-a")
    # ... and stays applied while the table refreshes itself (every --reload-interval second)
    drv.execute_script("performance.clearResourceTimings();")
    _js(drv, "return performance.getEntriesByType('resource').filter(function(e) {"
             "return e.name.indexOf('_dash-update-component') >= 0 && e.responseEnd > 0; }).length >= 2;",
        "two refreshes of the runs table")
    _settle(drv)
    assert _cells(drv, "runs-table", "run") == ["run-a"]
    # a new filter text replaces the old one
    _type_filter(drv, "runs-table", "run", "broken", replace=True)
    _wait(drv, lambda: _cells(drv, "runs-table", "run") == ["run-broken"], "the filter to leave only run-broken")
    assert _severe(drv) == []


# -- 2. every page of run-a opens without console errors -----------------------------------------------------
READY = {
    # page -> (the element whose text says the body rendered, the page's figure)
    "overview": ("stat-avg-step", "step-breakdown"),
    "operators": ("ops-top-type", "ops-top-chart"),
    "pipeline": ("pipeline-verdict", "pipe-graph"),
    "timeline": ("tl-info", "tl-graph"),
    "memory": ("mem-peak", "mem-timeline"),
}


@pytest.mark.parametrize("page", RUN_PAGES)
def test_run_page_opens_without_console_errors(e2e, page):
    drv = e2e.driver
    _open(e2e, f"/run/run-a/{page}")
    text_id, graph_id = READY[page]
    _wait_text(drv, text_id)
    _figure_ready(drv, graph_id)
    _settle(drv)
    assert _text(drv, "current-run") == "run-a"
    assert "active" in drv.find_element("id", f"nav-{page}").get_attribute("class").split()
    assert not drv.find_elements("id", "error-panel") and not drv.find_elements("id", "not-found")
    assert _severe(drv) == [], f"console errors on the {page} page"
    # dash-ag-grid's 1.3 MB bundle is executed only by pages that show a grid (Overview and Timeline have none;
    # the pipeline's per-step grid is on its second tab, its op table plain HTML); the others may run it once
    # they have been idle a while ('idle'), for the next page
    grid = drv.execute_script("return !!(window.dash_ag_grid && window.dash_ag_grid.getApi) && "
                              "window.__insightGridLoad !== 'idle';")
    assert grid == (page in ("operators", "memory")), (page, grid)
    # plotly.js was started with the request for the page's content (assets/plotly_early.js), added once
    plotly = drv.execute_script("return [window.__insightPlotlyLoad, typeof window.Plotly.react, Array.from("
                                "document.scripts).filter(function (s) { return /plotly[^/]*min[.]js/.test(s.src); })"
                                ".length];")
    assert plotly == ["page", "function", 1], (page, plotly)


# the order a page is drawn in, seen from inside it: when every figure was first drawn, when the first grid appeared
# and whether the figures were drawn by then, and the height of the first grid's placeholder
DRAW_ORDER = """
window.__drawOrder = {figures: null, grid: null, gridAfterFigures: null, placeholder: null};
new MutationObserver(function () {
    var o = window.__drawOrder, gs = document.querySelectorAll('.dash-graph'), drawn = gs.length > 0;
    var wait = document.querySelector('.insight-grid-loading');
    if (wait && o.placeholder === null) { o.placeholder = wait.getBoundingClientRect().height; }
    for (var i = 0; i < gs.length; i++) {
        if (gs[i].classList.contains('dash-graph--pending') || !gs[i].querySelector('.main-svg')) { drawn = false; }
    }
    if (drawn && o.figures === null) { o.figures = performance.now(); }
    if (o.grid === null && document.querySelector('.ag-root-wrapper')) {
        o.grid = performance.now();
        o.gridAfterFigures = drawn;
    }
}).observe(document, {childList: true, subtree: true, attributes: true, attributeFilter: ['class']});
"""


@pytest.mark.parametrize("page,graph_id,grid_id", [("operators", "ops-top-chart", "op-type-table"),
                                                   ("memory", "mem-timeline", "mem-peak-table")])
def test_tables_are_drawn_after_the_figures(e2e, page, graph_id, grid_id):
    """On a page with figures the grids (all below them) wait until the figures are drawn (assets/lazy_grid.js),
    in a placeholder of their height, then appear as working grids, their API reachable as dash-ag-grid
    documents it."""
    drv = e2e.driver
    script = drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DRAW_ORDER})["identifier"]
    try:
        _open(e2e, f"/run/run-a/{page}")
        _figure_ready(drv, graph_id)
        _js(drv, "return !!document.querySelector('#%s .ag-row') && !document.querySelector('.insight-grid-loading');"
            % grid_id, f"the {grid_id} grid's rows")
        _settle(drv)
        order = drv.execute_script("return window.__drawOrder;")
    finally:
        drv.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
    assert order["figures"] is not None and order["grid"] is not None, order
    assert order["gridAfterFigures"] and order["figures"] <= order["grid"], order
    # the placeholder held about the grid's height: the page does not jump when the grid appears
    height = drv.execute_script("return document.getElementById(arguments[0]).getBoundingClientRect().height;", grid_id)
    assert abs(order["placeholder"] - height) <= 0.05 * height, (order["placeholder"], height)
    rows, page_size = drv.execute_script("var api = dash_ag_grid.getApi(arguments[0]); "
                                         "return [api.getDisplayedRowCount(), api.paginationGetPageSize()];", grid_id)
    shown = drv.find_elements("css selector", f"#{grid_id} .ag-center-cols-container .ag-row")
    assert len(shown) == min(rows, page_size) > 0, (rows, page_size, len(shown))
    assert _severe(drv) == []


def test_nav_links_move_between_the_pages_of_a_run(e2e):
    """The run navigation is client-side (dcc.Link): each click renders the next page, no console errors."""
    drv = e2e.driver
    _open(e2e, "/run/run-a/overview")
    _wait_text(drv, "stat-avg-step")
    for page in RUN_PAGES[1:] + RUN_PAGES[:1]:
        drv.find_element("id", f"nav-{page}").click()
        _wait(drv, lambda: drv.current_url.endswith(f"/run/run-a/{page}"), f"the URL of {page}")
        _wait_text(drv, READY[page][0])
        _figure_ready(drv, READY[page][1])
        if page == "operators":  # the grid bundle, loaded on demand after a client-side move, draws the table
            _wait(drv, lambda: drv.find_elements("css selector", "#op-type-table .ag-row"), "the op-type table")
    _settle(drv)
    assert _severe(drv) == []


# -- 3. the numbers are insight.analysis's ------------------------------------------------------------------
def test_overview_average_step_equals_the_analysis(e2e):
    drv = e2e.driver
    s = analysis.step_summary(e2e.run("run-a"))
    peak = analysis.memory_peak(e2e.run("run-a"))
    _open(e2e, "/run/run-a/overview")
    _wait_text(drv, "stat-avg-step", _ms(s.step_time_ms))
    assert _text(drv, "stat-interval") == _ms(s.iteration_interval_ms)
    assert _text(drv, "stat-fpbp") == _ms(s.fp_bp_ms)
    assert _text(drv, "stat-tail") == _ms(s.tail_ms)
    assert _text(drv, "stat-mem-peak") == f"{peak.peak_bytes / MB:.2f} MB"
    # the chart has one bar per step and the average line
    _figure_ready(drv, "step-breakdown")
    steps = drv.execute_script(GD % "step-breakdown" + "return gd._fullData[0].x.length;")
    assert steps == s.steps == len(analysis.step_breakdown(e2e.run("run-a")))


def test_memory_peak_equals_the_analysis(e2e):
    drv = e2e.driver
    peak = analysis.memory_peak(e2e.run("run-a"))
    _open(e2e, "/run/run-a/memory")
    _wait_text(drv, "mem-peak", f"{peak.peak_bytes / MB:.2f} MB")
    hint = drv.find_element("css selector", "#mem-peak + .stat-hint").text
    assert hint == f"at {peak.t_ns / 1e6:.3f} ms, step {peak.step}"
    assert _text(drv, "mem-allocs") == f"{peak.allocations:,}" and _text(drv, "mem-frees") == f"{peak.frees:,}"
    # the exact value: the figure's peak marker
    _figure_ready(drv, "mem-timeline")
    xy = drv.execute_script(GD % "mem-timeline" + "var t = gd._fullData.filter(function(t) { return t.name === 'peak'; });"
                                                  "return t.length ? [t[0].x[0], t[0].y[0]] : null;")
    assert xy is not None, "no peak marker on the memory figure"
    assert xy[0] == pytest.approx(peak.t_ns / 1e6, abs=1e-9) and xy[1] == pytest.approx(peak.peak_bytes / MB, rel=1e-12)


def test_operators_top_type_equals_the_analysis(e2e):
    drv = e2e.driver
    types = analysis.op_type_stats(e2e.run("run-a"))
    top = types.iloc[0]
    _open(e2e, "/run/run-a/operators")
    _wait_text(drv, "ops-top-type", str(top["op"]))
    assert _text(drv, "ops-top-type-ms") == _ms(top["total_ms"])
    assert _text(drv, "ops-total-ms") == _ms(types["total_ms"].sum())
    assert _text(drv, "ops-n-types") == str(len(types))
    # the op-type table's first row is the same op type with the same total
    _wait(drv, lambda: _cells(drv, "op-type-table", "op")[:1] == [top["op"]], "the op-type table's first row")
    assert _num(_cells(drv, "op-type-table", "total_ms")[0]) == round(float(top["total_ms"]), 3)
    assert _num(_cells(drv, "op-type-table", "calls")[0]) == int(top["calls"])


# -- 4. sorting a table --------------------------------------------------------------------------------------
def test_operators_table_sorts_on_a_column(e2e):
    drv = e2e.driver
    types = analysis.op_type_stats(e2e.run("run-a"))
    calls = sorted(int(c) for c in types["calls"])
    _open(e2e, "/run/run-a/operators")
    _wait(drv, lambda: len(_cells(drv, "op-type-table", "calls")) == 10, "the first page of the op-type table")
    before = [int(_num(c)) for c in _cells(drv, "op-type-table", "calls")]
    assert before == [int(c) for c in types["calls"][:10]]  # by total time, as the analysis orders it
    sort = "#op-type-table .ag-header-cell[col-id=calls] .ag-header-cell-label"
    drv.find_element("css selector", sort).click()  # ascending
    _wait(drv, lambda: [int(_num(c)) for c in _cells(drv, "op-type-table", "calls")] == calls[:10],
          f"calls ascending {calls[:10]}")
    fewest = set(types.loc[types["calls"] == calls[0], "op"])
    assert _cells(drv, "op-type-table", "op")[0] in fewest
    drv.find_element("css selector", sort).click()  # descending
    _wait(drv, lambda: [int(_num(c)) for c in _cells(drv, "op-type-table", "calls")] == calls[::-1][:10],
          f"calls descending {calls[::-1][:10]}")
    assert _cells(drv, "op-type-table", "op")[0] == types.loc[types["calls"].idxmax(), "op"]
    drv.find_element("css selector", sort).click()  # and back to the analysis' order
    _wait(drv, lambda: [int(_num(c)) for c in _cells(drv, "op-type-table", "calls")] == before, "the original order")
    assert _severe(drv) == []


# -- 5. the timeline: step selector, zoom to exact tasks, small requests ----------------------------------------
def _dash_responses(drv) -> list[int]:
    return drv.execute_script("return performance.getEntriesByType('resource').filter(function(e) {"
                              "return e.name.indexOf('_dash-update-component') >= 0 && e.responseEnd > 0; })"
                              ".map(function(e) { return e.decodedBodySize; });")


def test_timeline_step_selector_and_zoom_to_exact_tasks(e2e):
    drv = e2e.driver
    run = e2e.run("run-a")
    data = analysis.load_timeline(run)
    step = data.step_numbers[len(data.step_numbers) // 2]
    r0, r1 = data.step_range(step)
    _open(e2e, "/run/run-a/timeline")
    _figure_ready(drv, "tl-graph", "the whole-run timeline")
    _wait(drv, lambda: "busy per pixel" in _text(drv, "tl-info"), "the whole run drawn as busy bins")
    _settle(drv)
    whole_run_bytes = max(_dash_responses(drv))

    # the step selector: search, pick, and the x axis spans that step (plus 2 % each side)
    drv.find_element("id", "tl-step").click()
    search = _wait(drv, lambda: drv.find_element("css selector", "input.dash-dropdown-search"), "the step search box")
    search.send_keys(f"step {step} ")
    option = _wait(drv, lambda: [o for o in drv.find_elements("css selector", "[role=option]")
                                 if o.text.startswith(f"step {step} \u00b7")][0], f"the option of step {step}")
    option.click()
    pad = max(1, (r1 - r0) // 50)
    want = [(r0 - pad) / 1e6, (r1 + pad) / 1e6]
    gd = GD % "tl-graph"
    _js(drv, gd + "var r = gd.layout.xaxis.range; return Math.abs(r[0] - arguments[0]) < 1e-6 && "
                  "Math.abs(r[1] - arguments[1]) < 1e-6;", f"the x axis to span step {step} {want}", TIMEOUT, *want)
    _wait(drv, lambda: _text(drv, "tl-info").startswith(f"{want[0]:,.3f} \u2013 {want[1]:,.3f} ms"), "tl-info")
    steps_lane = drv.execute_script(gd + "var t = gd.data.filter(function(t) { return t.name === 'Steps'; })[0];"
                                         "return t ? t.hovertext : [];")
    assert any(h.startswith(f"<b>step {step}</b>") for h in steps_lane)

    # zoom to a 1 ms window inside that step, as a drag or scroll does (plotly's relayout): around the step's
    # middle task, so that the window holds tasks even when the step waited long for its data
    tasks = pd.concat([pd.read_parquet(f, columns=["name", "op", "stream", "graph", "start_ns", "end_ns"])
                       for f in _table_files(run, "tasks")], ignore_index=True)
    mid = tasks["start_ns"][(tasks["start_ns"] >= r0) & (tasks["start_ns"] < r1)].sort_values()
    assert len(mid), f"step {step} has no tasks"
    x0 = round(float(mid.iloc[len(mid) // 2]) / 1e6 - 0.5, 2)
    x1 = x0 + 1.0
    t0, t1 = x0 * 1e6, x1 * 1e6
    assert data.t_min + (t1 - t0) < t0 and t1 + (t1 - t0) < data.t_max  # well inside the run
    drv.execute_script("performance.clearResourceTimings();")
    drv.execute_script(gd + "Plotly.relayout(gd, {'xaxis.range': [arguments[0], arguments[1]]});", x0, x1)
    _wait(drv, lambda: _text(drv, "tl-info").startswith(f"{x0:,.3f} \u2013 {x1:,.3f} ms (1.000 ms)"),
          "the 1 ms window's figure")
    _settle(drv)
    info = _text(drv, "tl-info")
    assert "exact tasks" in info and "busy per pixel" not in info, info
    fig = json.loads(drv.execute_script(gd + "return JSON.stringify({range: gd.layout.xaxis.range, data: gd.data.map("
                                             "function(t) { return {type: t.type, name: t.name, base: t.base, x: t.x,"
                                             " customdata: t.customdata, hovertext: t.hovertext}; })});"))
    assert fig["range"] == pytest.approx([x0, x1], abs=1e-6)
    assert fig["data"] and all(t["type"] == "bar" for t in fig["data"]), [t["type"] for t in fig["data"]]

    # the bars are exactly the tasks of the table: every task in view is there, none far outside, each
    # at its own start, on its stream's lane, with its own name
    shown, n_bars = {}, 0
    for t in fig["data"]:
        if t["name"] == "Steps":
            continue
        rows = np.asarray(t["customdata"], np.int64)
        assert np.all(rows % 4 == 0), t["name"]  # source 0: the tasks table
        rows //= 4
        n_bars += len(rows)
        sel = tasks.iloc[rows]
        lane = "host/feeder" if t["name"].startswith("host \u00b7 feeder") else t["name"]
        assert set(np.where(sel["graph"] == "data_sink", sel["stream"] + "/feeder", sel["stream"])) == {lane}
        np.testing.assert_allclose(_typed(t["base"]), sel["start_ns"].to_numpy() / 1e6, rtol=0, atol=1e-9)
        assert np.all(_typed(t["x"]) >= (sel["end_ns"] - sel["start_ns"]).to_numpy() / 1e6 - 1e-9)
        names = [h.split("</b>")[0].removeprefix("<b>") for h in t["hovertext"]]
        assert names == [html.escape(n) for n in sel["name"]]
        shown.update(dict.fromkeys(rows.tolist()))
    s, e = tasks["start_ns"].to_numpy(), tasks["end_ns"].to_numpy()
    in_view = set(np.flatnonzero((s < t1) & (e > t0)).tolist())
    near = set(np.flatnonzero((s < t1 + (t1 - t0)) & (e > t0 - (t1 - t0))).tolist())
    assert in_view and in_view <= set(shown), f"{len(in_view - set(shown))} tasks in view are not drawn"
    assert set(shown) <= near, "tasks far outside the window were sent"
    assert len(shown) == n_bars  # no task twice

    # one small request: a few hundred bytes per task drawn, nothing like the run's tasks
    sizes = _dash_responses(drv)
    assert len(sizes) == 1, sizes
    assert sizes[0] < 64 * 1024 and sizes[0] < 16 * 1024 + 600 * n_bars, (sizes, n_bars)
    assert sizes[0] < whole_run_bytes, (sizes, whole_run_bytes)
    assert n_bars < data.n_tasks / 20
    assert _severe(drv) == []


# -- 6. compare --------------------------------------------------------------------------------------------
def test_compare_shows_both_runs_and_the_op_type_diff(e2e):
    drv = e2e.driver
    cmp = analysis.compare_runs(e2e.run("run-a"), e2e.run("run-b"))
    sa = analysis.step_summary(e2e.run("run-a"))
    sb = analysis.step_summary(e2e.run("run-b"))
    _open(e2e, "/compare?a=run-a&b=run-b")
    _wait_text(drv, "compare-a-name", "run-a")
    _wait_text(drv, "compare-b-name", "run-b")
    assert _text(drv, "compare-a-step") == _ms(sa.step_time_ms)
    assert _text(drv, "compare-b-step") == _ms(sb.step_time_ms)
    headers = _headers(drv, "compare-ops-table")
    assert headers[:5] == ["Op type", "Status", "A ms/step", "B ms/step", "B \u2212 A (ms/step)"]
    want = cmp.ops.head(20)
    _wait(drv, lambda: _cells(drv, "compare-ops-table", "op") == list(want["op"]), "the per-op-type diff table")
    assert _cells(drv, "compare-ops-table", "status") == list(want["status"])
    assert [_num(v) for v in _cells(drv, "compare-ops-table", "diff_ms")] == [round(float(v), 3)
                                                                              for v in want["diff_ms"]]
    assert set(cmp.ops["status"]) <= {"faster", "slower", "added", "removed", "same"}
    _figure_ready(drv, "compare-steps")
    names = drv.execute_script(GD % "compare-steps" + "return gd.data.map(function(t) { return t.name; });")
    assert names == ["A: run-a", "B: run-b"]
    _settle(drv)
    assert _severe(drv) == []


# -- 7. a broken run, unknown runs, paths outside the base dir --------------------------------------------------
def test_broken_run_shows_the_error_panel_and_the_others_still_render(e2e):
    drv = e2e.driver
    for page in RUN_PAGES:
        _open(e2e, f"/run/run-broken/{page}")
        msg = _wait_text(drv, "error-message")
        assert "tasks" in msg, (page, msg)
        assert _text(drv, "current-run") == "run-broken"  # the run's navigation is still there
        assert _severe(drv) == [], page
    # in the same session: back to the runs, then run-a's overview renders
    drv.find_element("css selector", "#error-panel a").click()
    _wait(drv, lambda: "run-a" in _cells(drv, "runs-table", "run"), "the runs page")
    [link] = [a for a in drv.find_elements("css selector", "#runs-table .ag-cell[col-id=run] a") if a.text == "run-a"]
    link.click()
    _wait_text(drv, "stat-avg-step", _ms(analysis.step_summary(e2e.run("run-a")).step_time_ms))
    _figure_ready(drv, "step-breakdown")
    assert not drv.find_elements("id", "error-panel")
    # the broken run's Chrome trace download says why, over plain HTTP too
    status, body = _http(e2e.url + "/download/run-broken/trace.json.gz")
    assert status == 422 and b"tasks" in body
    _settle(drv)
    assert _severe(drv) == []


LEAKS = ("root:x:0:0", "Traceback", "daemon:x:", "/etc/passwd")


@pytest.mark.parametrize("path", [
    "/run/..%2F..%2Fetc/overview",
    "/run/..%2F..%2F..%2F..%2Fetc%2Fpasswd/operators",
    "/run/%2Fetc%2Fpasswd/memory",
    "/run/..%5C..%5Cetc/timeline",
    "/run/run-a%2F..%2F..%2Fetc/pipeline",
    "/run/.../overview",
])
def test_paths_outside_the_base_dir_are_not_found(e2e, path):
    drv = e2e.driver
    _open(e2e, path)
    _wait_text(drv, "not-found", "Not found")
    _settle(drv)
    page = drv.find_element("tag name", "main").text
    assert not drv.find_elements("id", "current-run") and not drv.find_elements("id", "stat-avg-step")
    assert not any(s in page for s in LEAKS), page
    assert _severe(drv) == []


def test_unknown_run_is_not_found(e2e):
    drv = e2e.driver
    _open(e2e, "/run/does-not-exist/overview")
    _wait_text(drv, "not-found", "Not found")
    assert "does-not-exist" in drv.find_element("css selector", ".error-panel .error-message").text
    assert not drv.find_elements("id", "current-run")
    # compare with an unknown or outside run: a message, nothing read
    _open(e2e, "/compare?a=..%2F..%2Fetc&b=run-a")
    _wait_text(drv, "not-found", "Unknown run")
    assert not any(s in _text(drv, "compare-unknown") for s in LEAKS[:4])
    _settle(drv)
    assert _severe(drv) == []


def test_downloads_cannot_reach_outside_the_base_dir(e2e):
    """The Chrome-trace route and the static files: 404, or (a decoded %2F no longer matches the route) the
    dashboard's page shell -- never a file from outside the runs, never a trace."""
    for path in ("/download/..%2F..%2Fetc%2Fpasswd/trace.json.gz", "/download/%2Fetc%2Fpasswd/trace.json.gz",
                 "/download/..%5C..%5Cetc/trace.json.gz", "/download/../../etc/trace.json.gz",
                 "/download/does-not-exist/trace.json.gz", "/download/.../trace.json.gz",
                 "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/assets/../../../../etc/passwd"):
        status, body = _http(e2e.url + path)
        assert status == 404 or (status == 200 and b'id="react-entry-point"' in body), (path, status, body[:200])
        assert not body.startswith(b"\x1f\x8b") and not any(s.encode() in body for s in LEAKS[:3]), path


def test_unknown_url_shows_the_apps_not_found_page(e2e):
    drv = e2e.driver
    _open(e2e, "/no/such/page")
    _wait(drv, lambda: drv.find_element("tag name", "main").text.strip(), "the page")
    _settle(drv)
    assert drv.find_elements("id", "not-found") and _text(drv, "not-found") == "Not found"


# -- 8. saving a figure as PNG -------------------------------------------------------------------------------
def test_step_breakdown_figure_downloads_as_png(e2e):
    from selenium.webdriver.common.action_chains import ActionChains

    drv = e2e.driver
    _open(e2e, "/run/run-a/overview")
    _figure_ready(drv, "step-breakdown")
    gd = GD % "step-breakdown"
    btn_css = "#step-breakdown .modebar-btn[data-title]"
    titles = [b.get_attribute("data-title") for b in drv.find_elements("css selector", btn_css)]
    png = [t for t in titles if t.lower().startswith("download plot as") and "png" in t.lower()]
    assert png, f"no 'Download plot as png' button in the mode bar: {titles}"
    assert drv.execute_script(gd + "return gd._context.toImageButtonOptions;") == {"format": "png", "scale": 2}
    # hover the figure (the mode bar shows), click the button: a PNG lands in the download directory
    before = set(e2e.downloads.iterdir())
    ActionChains(drv).move_to_element(drv.find_element("id", "step-breakdown")).perform()
    button = drv.find_element("css selector", f'#step-breakdown .modebar-btn[data-title="{png[0]}"]')
    _wait(drv, button.is_displayed, "the mode bar")
    button.click()
    new = _wait(drv, lambda: [p for p in set(e2e.downloads.iterdir()) - before
                              if p.suffix == ".png" and p.stat().st_size > 0], "the PNG download", 60)
    data = new[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    size = drv.execute_script(gd + "return [gd._fullLayout.width, gd._fullLayout.height];")
    assert (w, h) == (2 * size[0], 2 * size[1])  # scale 2
    assert _severe(drv) == []


# -- 9. typed filters, click-through, noise-aware compare -----------------------------------------------------
def test_numeric_filter_keeps_exactly_the_rows_above_the_value(e2e):
    """Typing X in the "Total (ms)" filter keeps exactly the op types above X (compared as numbers, not as
    text), and the row count follows the filter."""
    drv = e2e.driver
    types = analysis.op_type_stats(e2e.run("run-a"))
    x = float(np.round(types["total_ms"].median(), 1))
    above = types[types["total_ms"] > x]
    assert 0 < len(above) < len(types)
    _open(e2e, "/run/run-a/operators")
    _wait(drv, lambda: len(_cells(drv, "op-type-table", "op")) == min(10, len(types)), "the op-type table")
    _wait_text(drv, "op-type-table-count", f"{len(types)} rows")
    box = _filter_box(drv, "op-type-table", "total_ms")
    box.click()
    box.send_keys(str(x))
    _wait_text(drv, "op-type-table-count", f"{len(above)} rows")
    shown = _cells(drv, "op-type-table", "op")
    assert shown == list(above["op"].head(10)), (x, shown)
    assert all(_num(v) > x for v in _cells(drv, "op-type-table", "total_ms"))
    assert drv.execute_script("return document.querySelector('#op-type-table').getBoundingClientRect().width") <= 1600
    # the count follows new rows from the server too: the ops table's search narrows its rowData
    ops = analysis.op_stats(e2e.run("run-a"))
    _wait_text(drv, "op-table-count", f"{len(ops)} rows")
    from selenium.webdriver.common.keys import Keys
    drv.find_element("id", "op-search").send_keys("conv" + Keys.ENTER)
    _wait(drv, lambda: _text(drv, "op-table-count") != f"{len(ops)} rows", "the ops table's count after a search")
    shown = drv.execute_script("return dash_ag_grid.getApi('op-table').getDisplayedRowCount();")
    assert 0 < shown < len(ops) and _text(drv, "op-table-count") == f"{shown} rows"
    assert all("conv" in n for n in _cells(drv, "op-table", "op")), _cells(drv, "op-table", "op")
    assert _severe(drv) == []


def test_clicking_an_overview_bar_opens_that_steps_timeline(e2e):
    drv = e2e.driver
    bd = analysis.step_breakdown(e2e.run("run-a"))
    i = int(np.argmax(bd["fp_bp_ms"].to_numpy()[1:])) + 1  # the step with the tallest forward+backward bar
    step = int(bd["step"].iloc[i])
    _open(e2e, "/run/run-a/overview")
    _figure_ready(drv, "step-breakdown")
    _settle(drv)
    trace = drv.execute_script(GD % "step-breakdown" + "return gd._fullData.findIndex(function(t) {"
                                                       "return t.name === 'Forward + backward'; });")
    # with hundreds of steps a bar is a few pixels wide: zoom in around it first, as a user would
    x = drv.execute_script(GD % "step-breakdown" + f"return gd._fullData[{trace}].x[{i}];")
    drv.execute_script(GD % "step-breakdown" + f"Plotly.relayout(gd, {{'xaxis.range': [{x} - 6, {x} + 6]}});")
    _settle(drv)
    _wait(drv, lambda: drv.execute_script(GD % "step-breakdown" + "return gd.layout.xaxis.range[0];") is not None,
          "the zoomed overview")
    from selenium.webdriver.common.action_chains import ActionChains
    bar = drv.execute_script(
        f"var t = document.querySelectorAll('#step-breakdown .barlayer .trace')[{trace}];"
        f"var p = Array.from(t.querySelectorAll('.point')).find(function(e) {{ return e.__data__ && e.__data__.i === {i}; }});"
        "return p && p.querySelector('path');")
    assert bar is not None and bar.size["width"] >= 20, "the zoomed bar of that step"
    ActionChains(drv).move_to_element(bar).click().perform()
    _wait(drv, lambda: drv.current_url.endswith(f"/run/run-a/timeline?step={step}"), f"the timeline of step {step}")
    _wait_text(drv, "tl-info")
    assert _severe(drv) == []


def test_memory_click_reports_the_event_at_or_before_the_cursor(e2e):
    import re

    from selenium.webdriver.common.action_chains import ActionChains

    drv = e2e.driver
    lt = analysis.memory_intervals(e2e.run("run-a"))
    _open(e2e, "/run/run-a/memory")
    _figure_ready(drv, "mem-timeline")
    _figure_ready(drv, "mem-steps")
    _settle(drv)
    plot = drv.find_element("css selector", "#mem-timeline .nsewdrag")
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", plot)
    for dx in (-0.3, 0.1, 0.37):  # three places across the run
        before = _text(drv, "mem-at-title")
        ActionChains(drv).move_to_element(plot).move_by_offset(int(plot.size["width"] * dx), 0).click().perform()
        _wait(drv, lambda: _text(drv, "mem-at-title") != before and "clicked" not in _text(drv, "mem-at-title"),
              "the tensors at the click")
        at = float(re.search(r"at ([0-9.]+) ms", _text(drv, "mem-at-title")).group(1))
        cursor = float(re.search(r"click at ([0-9.]+) ms", _text(drv, "mem-at-summary")).group(1))
        i = int(np.searchsorted(lt.t_ns, cursor * 1e6 + 500, side="right")) - 1  # the printed cursor is rounded
        assert at <= cursor + 0.0005 and at == pytest.approx(lt.t_ns[i] / 1e6, abs=0.0006), (at, cursor)
        # the table (built on the first click) lists as many tensors as the summary counts
        n = int(re.match(r"(\d+) tensors", _text(drv, "mem-at-summary")).group(1))
        _wait(drv, lambda: _text(drv, "mem-at-table-count") == f"{n} rows", "the table of the tensors at the click")
    assert _severe(drv) == []


def _slowed_copy(src: Path, dst: Path, op: str, factor: float) -> None:
    """``src`` with every task of op type ``op`` made ``factor`` times longer (a deliberately slowed op)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    for f in _table_files(dst, "tasks"):
        t = pq.read_table(f).to_pandas()
        sel = t["op"] == op
        t.loc[sel, "dur_ns"] = (t.loc[sel, "dur_ns"] * factor).astype("int64")
        t.loc[sel, "end_ns"] = t.loc[sel, "start_ns"] + t.loc[sel, "dur_ns"]
        pq.write_table(pa.Table.from_pandas(t, preserve_index=False), f)


def _train_demo(e2e, name: str) -> Path:
    """``insight demo --name NAME --epochs 1`` (the fixture's seed) into the base dir."""
    p = subprocess.run(_cli("demo", "--output", e2e.base, "--name", name, "--epochs", 1), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"insight demo --name {name} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}"
    return e2e.run(name)


def test_compare_marks_noise_and_finds_a_deliberately_slowed_op(e2e):
    """Two runs of the same seed trained one after the other (separate processes: their op times really differ,
    the machine is shared): no op type is significantly different, the page says "within noise" for every op
    type both ran. An exact copy: nothing differs at all. A copy with its top kernel op type made 3x slower:
    exactly that op type is significantly slower, on the page too. (3x, not 2x: with the 44 steps of a one-epoch
    demo a doubled conv2d's lower-quartile interval reached down to +21-37 % on a noisy VM, inside the rule's
    1.4x; with two-epoch runs the doubling was found but two same-seed runs of 88 steps were now and then
    called different -- both measured in this test's history.)"""
    drv = e2e.driver
    made = []
    try:
        for name in ("rerun-1", "rerun-2"):
            made.append(_train_demo(e2e, name))
        cmp = analysis.compare_runs(made[0], made[1])
        both = cmp.ops[(cmp.ops["samples_a"] > 0) & (cmp.ops["samples_b"] > 0)]
        assert len(both) >= 10 and not cmp.ops["significant"].any() and (both["status"] == "same").all(), \
            cmp.ops.head(5)[["op", "diff_pct", "p_value", "q_change_pct", "ci_low_pct", "ci_high_pct"]]
        _open(e2e, "/compare?a=rerun-1&b=rerun-2")
        _wait_text(drv, "compare-b-name", "rerun-2")
        _wait(drv, lambda: len(_cells(drv, "compare-ops-table", "noise")) > 0, "the noise column")
        shown = set(_cells(drv, "compare-ops-table", "noise"))
        assert "within noise" in shown and "significant" not in shown, shown
        counts = _text(drv, "compare-status-counts")
        assert "slower" not in counts and "faster" not in counts, counts
        assert "lower quartile" in _text(drv, "compare-noise-rule")

        twin = e2e.run("rerun-1-twin")
        shutil.copytree(made[0], twin)
        made.append(twin)
        same = analysis.compare_runs(made[0], twin)
        assert not same.ops["significant"].any() and (same.ops["status"] == "same").all(), same.ops.head()
        assert (same.ops["diff_ms"] == 0).all()

        # the top compute op type (GetNext is a wait the data pipeline sets, mostly near zero: slowing it proves
        # little), made 3x slower in a copy of rerun-1
        types = analysis.op_type_stats(made[0], kinds=("kernel",))
        op = str(types["op"].iloc[0])
        slow = e2e.run("rerun-1-slow")
        made.append(slow)
        _slowed_copy(made[0], slow, op, 3.0)
        cmp = analysis.compare_runs(made[0], slow)
        flagged = cmp.ops[cmp.ops["significant"]]
        assert list(flagged["op"]) == [op] and list(flagged["status"]) == ["slower"], \
            cmp.ops.head(5)[["op", "diff_pct", "p_value", "q_change_pct", "ci_low_pct", "ci_high_pct"]]
        _open(e2e, "/compare?a=rerun-1&b=rerun-1-slow")
        _wait_text(drv, "compare-b-name", "rerun-1-slow")
        _wait(drv, lambda: _cells(drv, "compare-ops-table", "op")[:1] == [op], f"{op} first")
        assert _cells(drv, "compare-ops-table", "status")[0] == "slower"
        assert _cells(drv, "compare-ops-table", "noise")[0] == "significant"
        assert _num(_cells(drv, "compare-ops-table", "diff_pct")[0]) == pytest.approx(200.0, abs=0.3)
        assert "1 slower" in _text(drv, "compare-status-counts")
        assert _severe(drv) == []
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def test_runs_page_links_the_comparison_of_two_ticked_runs(e2e):
    drv = e2e.driver
    _open(e2e, "/")
    _wait(drv, lambda: "run-b" in _cells(drv, "runs-table", "run"), "the runs table")
    for name in ("run-a", "run-b"):
        idx = _cells(drv, "runs-table", "run").index(name)
        drv.find_elements("css selector", f"#runs-table .ag-row[row-index='{idx}'] input[type=checkbox]")[0].click()
    _wait(drv, lambda: "/compare?a=" in (drv.find_element("id", "runs-compare").get_attribute("href") or ""),
          "the compare link")
    drv.find_element("id", "runs-compare").click()
    _wait_text(drv, "compare-a-name")
    assert {_text(drv, "compare-a-name"), _text(drv, "compare-b-name")} == {"run-a", "run-b"}
    assert drv.title == "Insight · compare"
    _open(e2e, "/run/run-a/operators")
    _wait_text(drv, "ops-top-type")
    assert drv.title == "run-a · Operators"


# -- near the end (they add runs to the base dir, and take them away again) -------------------------------------
def test_runs_page_lists_healthy_runs_beside_broken_ones(e2e):
    """Runs with bad manifests, a deeply nested one, a 5000-digit schema_version and a run directory that is a
    symbolic link out of the base dir are rows with their error; the healthy runs are listed beside them, and
    a run named with = : # ? opens from its link."""
    drv = e2e.driver
    base = e2e.run("run-a").parent
    odd = "lr=0.1:b#c?d"
    added = {"bad-device": '"device": "x"', "bad-ranks": '"ranks": 5', "bad-version": '"schema_version": "1"'}
    outside = base.parent / "outside-run"
    try:
        shutil.copytree(e2e.run("run-b"), base / odd)
        for name, field in added.items():
            shutil.copytree(e2e.run("run-b"), base / name)
            m = json.loads((base / name / "manifest.json").read_text())
            m.update(json.loads("{" + field + "}"))
            (base / name / "manifest.json").write_text(json.dumps(m))
        for name, text in (("deep", '{"schema_version": 1, "o": ' + "[" * 5000 + "]" * 5000 + "}"),
                           ("huge-version", '{"schema_version": 1' + "0" * 5000 + "}")):
            (base / name).mkdir()
            (base / name / "manifest.json").write_text(text)
        shutil.copytree(e2e.run("run-b"), outside)
        os.symlink(outside, base / "linked")
        broken = sorted(list(added) + ["deep", "huge-version", "linked", "run-broken"])
        everything = sorted(["run-a", "run-b", odd] + broken)
        _open(e2e, "/")
        _wait(drv, lambda: sorted(_cells(drv, "runs-table", "run")) == everything,
              f"the runs table to list {everything} (re-scanned every 1 s)")
        rows = dict(zip(_cells(drv, "runs-table", "run"), _cells(drv, "runs-table", "status")))
        assert rows["run-a"] == rows["run-b"] == rows[odd] == "complete"
        for name in broken:
            assert rows[name].startswith("error:"), (name, rows[name])
        assert "device" in rows["bad-device"] and "nested" in rows["deep"] and "digits" in rows["huge-version"]
        assert "symbolic link" in rows["linked"] and "newer" not in rows["bad-version"]
        assert _severe(drv) == []
        # the oddly named run's link is encoded once: its overview opens
        [link] = [a for a in drv.find_elements("css selector", "#runs-table .ag-cell[col-id=run] a")
                  if a.text == odd]
        link.click()
        _wait(drv, lambda: drv.find_elements("id", "stat-avg-step") or drv.find_elements("id", "not-found"),
              "the run's overview or a not-found page")
        assert not drv.find_elements("id", "not-found"), drv.find_element("tag name", "main").text
        assert _text(drv, "current-run") == odd
    finally:
        for name in [odd, *added, "deep", "huge-version"]:
            shutil.rmtree(base / name, ignore_errors=True)
        if (base / "linked").is_symlink():
            (base / "linked").unlink()
        shutil.rmtree(outside, ignore_errors=True)


def test_run_with_a_non_ascii_name_opens_from_the_runs_table(e2e):
    drv = e2e.driver
    name = "run-\u00fc"
    shutil.copytree(e2e.run("run-b"), e2e.run(name))
    try:
        _open(e2e, "/")
        _wait(drv, lambda: name in _cells(drv, "runs-table", "run"), f"{name} in the runs table (re-scanned every 1 s)")
        [link] = [a for a in drv.find_elements("css selector", "#runs-table .ag-cell[col-id=run] a")
                  if a.text == name]
        link.click()
        _wait(drv, lambda: drv.find_elements("id", "stat-avg-step") or drv.find_elements("id", "not-found"),
              "the run's overview or a not-found page")
        assert not drv.find_elements("id", "not-found"), drv.find_element("tag name", "main").text
        assert _text(drv, "current-run") == name
    finally:
        shutil.rmtree(e2e.run(name))
