"""The headless-Chromium set-up every browser test (and scripts/screenshots.py) shares: one place that knows
where chromedriver is and which flags a container needs."""
from __future__ import annotations

import shutil
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"


def chromedriver_path() -> str | None:
    return CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")


def chrome_driver(width: int = 1400, height: int = 1200, downloads: Path | None = None, log: bool = True):
    """A headless Chromium webdriver (console log captured when ``log``; downloads saved to ``downloads``).
    Raises RuntimeError when chromedriver is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path = chromedriver_path()
    if path is None:
        raise RuntimeError("chromedriver is not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", f"--window-size={width},{height}"):
        opts.add_argument(a)
    if log:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                               "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(path), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


# Dash is idle: no callback requested, pending or executing, and nothing marked as loading
DASH_IDLE = """
var s = window.store && window.store.getState && window.store.getState();
if (!s || !s.callbacks) { return false; }
for (var k in s.callbacks) {
    if (k === 'stored' || k === 'completed') { continue; }
    var v = s.callbacks[k];
    if (v && v.length) { return false; }
}
return !document.querySelector('[data-dash-is-loading="true"]');
"""


def stop_server(server, port: int, env: dict, root) -> None:
    """``insight stop --port`` and wait for the server to exit (killed after 30 s)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "insight.cli", "stop", "--port", str(port)], cwd=root, env=env,
                   capture_output=True, timeout=60)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
