"""The Cluster page in headless Chromium against the real server, on a real 2-rank mpirun run whose rank 1
has a 20 ms delay in its data pipeline (the straggler), plus a copy of it that misses a third rank.

Expected numbers come from ``insight.analysis.cluster`` run in this process on the same directories.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from insight.analysis.cluster import cluster_report
from browser_util import chrome_driver, chromedriver_path
from test_browser import TIMEOUT, _cells, _cli, _free_port, _http, _js, _settle, _severe, _stop_cleanly, _wait
from test_data_parallel import FUSION, _profiled

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_e2e(tmp_path_factory):
    if chromedriver_path() is None:
        pytest.fail("chromedriver is not installed (apt-get install chromium chromium-driver, as scripts/test.sh does)")

    tmp = tmp_path_factory.mktemp("cluster")
    run, _ = _profiled(tmp, "straggler", "--steps", "30", "--fusion", FUSION, "--delay-rank", "1", "--delay-ms",
                       "20", "--prefetch", "2")
    base, state = tmp / "runs", tmp / "state"
    state.mkdir()
    missing = base / "missing-rank"
    shutil.copytree(run, missing)
    m = json.loads((missing / "manifest.json").read_text())
    m["group_size"] = 3
    (missing / "manifest.json").write_text(json.dumps(m))

    env = dict(os.environ, XDG_RUNTIME_DIR=str(state), PYTHONUNBUFFERED="1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out_f, err_f = open(tmp / "server.out", "w+"), open(tmp / "server.err", "w+")
    server = subprocess.Popen(_cli("start", "--summary-base-dir", base, "--port", port, "--reload-interval", 1),
                              cwd=ROOT, env=env, stdout=out_f, stderr=err_f)
    driver = None
    try:
        _wait(None, lambda: server.poll() is not None or _up(url), "the server to answer", 90)
        assert server.poll() is None, f"the server exited with {server.returncode}"
        driver = chrome_driver(1400, 1200)
        yield SimpleNamespace(url=url, driver=driver, run=run, missing=missing)
    finally:
        if driver is not None:
            driver.quit()
        out_f.close(), err_f.close()
        _stop_cleanly(server, port, env, state, out_f.name, err_f.name)


def _up(url: str) -> bool:
    try:
        return _http(url + "/", timeout=2)[0] == 200
    except OSError:
        return False


def _open(e, path: str) -> None:
    _severe(e.driver)
    e.driver.get(e.url + path)
    _js(e.driver, "return document.querySelector('#cluster-ranks') !== null || "
                  "document.querySelector('#error-panel') !== null;", "the cluster page")
    _settle(e.driver)


def _column(drv, col: str) -> list[str]:
    return _cells(drv, "cluster-ranks", col)


def test_cluster_page_flags_the_slow_rank_with_its_reason(cluster_e2e):
    e, drv = cluster_e2e, cluster_e2e.driver
    rep = cluster_report(e.run)
    _open(e, "/run/straggler/cluster")
    flags = drv.find_element("id", "cluster-stragglers").text
    assert "rank 1 — iteration interval" in flags and "rank 0" not in flags
    assert _column(drv, "rank") == ["0", "1"]
    reasons = _column(drv, "reason")
    assert reasons[0] == "" and "iteration interval" in reasons[1]
    want = rep.ranks.set_index("rank")
    assert [float(v) for v in _column(drv, "iteration_interval_ms")] == \
        [round(float(want.loc[r, "iteration_interval_ms"]), 3) for r in (0, 1)]
    x = _js(drv, "var gd = document.querySelector('#cluster-steps .js-plotly-plot'); "
                 "return gd && gd.data && gd.data.length ? gd.data[0].x : null;", "the per-rank bars")
    assert list(x) == ["rank 0", "rank 1"]
    assert drv.find_element("id", "stat-stragglers").text == "1"
    assert not _severe(drv)


def test_clicking_a_rank_opens_its_pages(cluster_e2e):
    e, drv = cluster_e2e, cluster_e2e.driver
    _open(e, "/run/straggler/cluster")
    bars = _wait(drv, lambda: drv.find_elements("css selector", "#cluster-steps .trace.bars .point path"),
                 "the bars of the cluster figure")
    from selenium.webdriver.common.action_chains import ActionChains
    # plotly's drag layer takes the click at the bar's position and reports the point under it
    ActionChains(drv).move_to_element(bars[1]).pause(0.3).click().perform()  # the first trace's bar of rank 1
    _wait(drv, lambda: "/run/straggler/overview?rank=1" in drv.current_url, "the overview of rank 1", TIMEOUT)


def test_a_missing_rank_is_reported_and_the_others_still_show(cluster_e2e):
    e, drv = cluster_e2e, cluster_e2e.driver
    _open(e, "/run/missing-rank/cluster")
    assert "rank 2: no rank_2/ directory" in drv.find_element("id", "cluster-problems").text
    assert _column(drv, "rank") == ["0", "1", "2"]
    assert _column(drv, "status") == ["ok", "ok", "missing"]
    assert all(float(v) > 0 for v in _column(drv, "step_time_ms")[:2])
    assert not _severe(drv)
