"""The timeline in headless Chromium on a real profiled run (`insight demo`: two compute streams, the AI CPU
stream, the data sink): the Steps lane shows phases, a clicked task is outlined and its flow drawn, the details
panel speaks one unit, W/A/S/D move the view, the mode bar stays off the lanes. Fixture patterns as in
tests/test_browser.py (a real run, a real server, browser_util's driver)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from browser_util import DASH_IDLE, chrome_driver, chromedriver_path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
GD = "var gd = document.querySelector('#tl-graph .js-plotly-plot'); "

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A run profiled by `insight demo` (one epoch, about 5 s) and a dashboard serving it."""
    if chromedriver_path() is None:
        pytest.skip("chromedriver is not installed")
    base = tmp_path_factory.mktemp("tl-browser")
    out = subprocess.run([sys.executable, "-m", "insight.cli", "demo", "--output", str(base), "--name", "demo",
                          "--epochs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    from werkzeug.serving import make_server

    from dashboard.app import create_app
    from dashboard.data import RunStore, set_store

    app = create_app(base)
    set_store(RunStore(base))
    srv = make_server("127.0.0.1", _free_port(), app.server, threaded=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    drv = chrome_driver(1600, 1000)
    try:
        yield {"url": f"http://127.0.0.1:{srv.server_port}", "run": base / "demo", "driver": drv}
    finally:
        drv.quit()
        srv.shutdown()
        th.join(10)


def _wait(drv, js, what, *args, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = drv.execute_script(js, *args)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _idle(drv):
    _wait(drv, DASH_IDLE, "Dash to be idle")


def _range(drv):
    return drv.execute_script(GD + "return gd.layout.xaxis.range.map(Number);")


def test_demo_lanes_phases_selection_flows_and_keys(demo):
    drv, run = demo["driver"], demo["run"]
    tasks = pd.read_parquet(run / "rank_0" / "tasks")  # a finished run: one directory of parts per table
    # the richer demo: both compute streams, the AI CPU stream and the sink feeder all have work
    assert {"aicore0", "aicore1", "aicpu", "host"} <= set(tasks["stream"])
    assert (tasks["graph"] == "data_sink").any()
    from insight.analysis import step_breakdown

    bd = step_breakdown(run)
    # a step with one of the feeder's TransferData copies well inside it (the feeder runs ahead of the steps by
    # however much the queue holds, so on a loaded machine the copy of a given step can straddle its edges)
    feeds = tasks[(tasks["graph"] == "data_sink") & (tasks["name"] == "TransferData")]
    order = sorted(range(len(bd)), key=lambda i: abs(i - len(bd) // 2))
    step = None
    for i in order:
        r = bd.iloc[i]
        margin = 0.05 * (r.end_ns - r.start_ns)
        if ((feeds["start_ns"] > r.start_ns + margin) & (feeds["end_ns"] < r.end_ns - margin)).any():
            step = int(r.step)
            break
    assert step is not None, "no step holds a whole TransferData copy"
    drv.get(demo["url"] + f"/run/demo/timeline?step={step}")
    _wait(drv, GD + "return gd && gd.data && gd.data.length > 1;", "the step's figure")
    _idle(drv)
    lanes = drv.execute_script(GD + "return gd.layout.yaxis.ticktext.map(function(t) { return t.split('<br>')[0]; });")
    assert lanes[0] == "Steps" and {"aicore0", "aicore1", "aicpu", "host · feeder (TransferData)"} <= set(lanes)

    # the Steps lane: the step and, below it, its phases (their colours in the legend)
    phases = drv.execute_script(GD + "return gd.data.filter(function(t) { return t.name === 'Steps'; })"
                                     ".map(function(t) { return t.hovertext; });")
    shown = {h.split("</b> · ")[1].split("<br>")[0] for hs in phases for h in hs if "</b> · " in h}
    assert {"data wait", "forward", "backward", "update"} <= shown, shown
    legend = drv.find_element("id", "tl-legend").text
    for word in ("data wait", "forward", "backward", "update", "tail", "step (alternating)", "selected task"):
        assert word in legend, word

    # the mode bar sits above the plot area, not on the Steps lane
    top = drv.execute_script("return document.querySelector('#tl-graph .nsewdrag').getBoundingClientRect().top;")
    bar = drv.execute_script("var m = document.querySelector('#tl-graph .modebar');"
                             "return m ? m.getBoundingClientRect().bottom : null;")
    assert bar is None or bar <= top + 1, (bar, top)

    # click the step's TransferData on the feeder lane (a real mouse click on its bar)
    k = drv.execute_script(GD + "var bars = gd.data.filter(function(t) { return t.type === 'bar'; });"
                                "return bars.findIndex(function(t) { return t.name.indexOf('feeder') >= 0; });")
    assert k >= 0
    box = drv.execute_script("var r = document.querySelector('#tl-graph .nsewdrag').getBoundingClientRect();"
                             "return [r.left, r.right];")
    paths = drv.execute_script("return Array.from(document.querySelectorAll('#tl-graph .barlayer .trace')[arguments[0]]"
                               ".querySelectorAll('.point path'));", k)
    paths = [p for p in paths if box[0] + 2 < p.rect["x"] and p.rect["x"] + p.rect["width"] < box[1] - 2]
    assert paths, "no TransferData bar inside the view"
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(drv).move_to_element(max(paths, key=lambda p: p.rect["width"])).click().perform()
    _wait(drv, "var t = document.getElementById('tl-details-title'); return t && t.innerText === 'TransferData';",
          "the TransferData details")
    _wait(drv, GD + "return (gd.layout.shapes || []).some(function(s) { return s.name === 'selected'; });",
          "the selected task's outline")
    _idle(drv)
    sel = drv.execute_script(GD + "return gd.layout.shapes.filter(function(s) { return s.name === 'selected'; })[0];")
    notes = drv.execute_script(GD + "return (gd.layout.annotations || []).filter(function(a) {"
                                    " return a.name === 'flow'; });")
    # the outline is exactly the clicked task: its start, its lane
    feeder = tasks[tasks["graph"] == "data_sink"].sort_values("start_ns")
    starts = feeder["start_ns"].to_numpy() / 1e6
    i = int(np.argmin(np.abs(starts - sel["x0"])))
    assert abs(starts[i] - sel["x0"]) < 1e-6
    assert lanes.index("host · feeder (TransferData)") == pytest.approx((sel["y0"] + sel["y1"]) / 2)
    assert drv.find_elements("css selector", "#tl-graph .shapelayer path")  # drawn, not just in the layout
    # its flow: TransferData -> the GetNext that dequeued its batch (FIFO: the i-th one)
    gn = tasks[tasks["kind"] == "get_next"].sort_values("start_ns")
    assert len(notes) == 1
    assert notes[0]["ax"] == pytest.approx(starts[i], abs=1e-6)
    assert notes[0]["x"] == pytest.approx(gn["start_ns"].iloc[i] / 1e6, abs=1e-6)
    assert lanes[round(notes[0]["y"])] == gn["stream"].iloc[i]
    # one unit in the details panel, times relative to the run and the step
    text = drv.find_element("id", "tl-details").text
    assert "from the run's start" in text and " ms" in text and " ns" not in text and "µs" not in text
    assert "TransferData -> GetNext" in text

    # keyboard: W zooms in around the centre, D pans right; the server answers each like a drag
    drv.execute_script("if (document.activeElement) { document.activeElement.blur(); }")
    assert drv.execute_script("return document.activeElement === document.body;")
    a, b = _range(drv)
    # the server answers with the view widened to whole nanoseconds (floor, ceil): its ends may move by
    # up to 1 ns (1e-6 ms) from what the key asked for, its centre by half of that
    ActionChains(drv).send_keys("w").perform()
    _wait(drv, GD + "var r = gd.layout.xaxis.range; return Math.abs((r[1] - r[0]) - arguments[0]) <= 2.001e-6;",
          "the W zoom", 0.75 * (b - a))
    _idle(drv)
    a2, b2 = _range(drv)
    assert (b2 - a2) == pytest.approx(0.75 * (b - a), abs=2.001e-6)
    assert (a2 + b2) / 2 == pytest.approx((a + b) / 2, abs=1.001e-6)
    assert drv.find_element("id", "tl-info").text.startswith(f"{a2:,.3f} – {b2:,.3f} ms")
    ActionChains(drv).send_keys("d").perform()
    _wait(drv, GD + "var r = gd.layout.xaxis.range; return Math.abs(r[0] - arguments[0]) <= 1.001e-6;", "the D pan",
          a2 + 0.2 * (b2 - a2))
    _idle(drv)
    # the selection survives the re-render of the figure
    assert drv.execute_script(GD + "return gd.layout.shapes.some(function(s) { return s.name === 'selected'; });")
    errors = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
