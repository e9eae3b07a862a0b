"""The Insight dashboard: a Dash multi-page app, one module per page under ``dashboard/pages``.

``create_app(base_dir)`` builds the app for one ``--summary-base-dir``; ``dashboard.server`` serves it
with waitress. Pages are registered with path templates (``/run/<run_id>/overview`` ...) and read
everything through ``dashboard.data.RunStore`` -> ``insight.analysis``. Each page module's callbacks are
registered on the app it belongs to (``register_callbacks(app)``: ``app.callback``), never in Dash's
process-wide callback list, so several apps in one process (the tests build several) each have their own.
Plain Flask routes (the Chrome-trace download) are in ``dashboard.routes``.

Page weight: dash-ag-grid's 1.3 MB bundle is loaded only by pages that show a table (``LAZY_LIBRARIES``: the
index page carries its URL instead of its ``<script>`` tag, ``assets/lazy_grid.js`` loads it when the first grid
renders), and the assets are served with a one-year max-age (their URLs change with the file: ``?m=<mtime>``),
as Dash serves its component bundles, so a page load revalidates nothing. The bundle starts early where it will
be needed: at once on the index of a page with a table (``GRID_PAGES``), together with its AG Grid chunk
(``LAZY_CHUNKS``, otherwise requested only after the bundle has run), on a click of a link to such a page, and on
other pages after a few seconds of idle time. The Memory page builds its clicked-time grid on the first click.
On a page with figures the grids are rendered after the figures are drawn (every table of those pages is below
them), and each grid's row count follows its filters through AG Grid's own event (``assets/grid_count.js``), not a
Dash callback: a callback on ``virtualRowData`` sent the whole filtered row data through Dash's callback pipeline
whenever a grid was drawn.

plotly.js (4.8 MB, ~0.1 s to run) is started by ``assets/plotly_early.js`` as soon as the browser asks for the
content of a page with figures (``GRAPH_PAGES``), so it runs while the server builds that content instead of after
it (dcc.Graph takes ``window.Plotly`` when it is set); a page without figures starts it after a few idle seconds.
The index of a page with figures preloads it, so that by then it only has to run (0.26 s off the first Overview
load after a start: its download had waited for the content request).
Its URL, and those of the grid's chunks, carry Dash's fingerprint (``_fingerprinted``): cached for a year, where Dash's
plain URLs are revalidated on every page load (for which Dash reads and hashes the whole file: ~0.1 s for plotly).
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from urllib.parse import unquote

import dash
from dash import dcc, html
from dash.fingerprint import build_fingerprint
from flask import has_request_context, request

from dashboard import routes
from dashboard.data import RunStore, set_store

ASSETS = Path(__file__).parent / "assets"
MAX_REQUEST_BYTES = 1 << 20  # a callback request is a few KB; a bigger body is refused (413)

ASSET_MAX_AGE = 365 * 24 * 3600  # seconds: asset URLs carry the file's mtime, a changed file is a new URL
LAZY_LIBRARIES = ("dash_ag_grid",)  # component bundles loaded on the first render of one of their components
# their webpack chunks that every render needs, fetched beside the bundle instead of after it has run
LAZY_CHUNKS = {"dash_ag_grid": ("async-community.js",)}
# pages that show a grid: their index page starts loading the bundle at once, beside the layout requests
# (not the pipeline page: its grid is on its second tab)
GRID_PAGES = re.compile(r"^/(compare)?$|^/run/[^/]+/(operators|memory|cluster)/?$")
# pages with figures: plotly.js is started when their content is requested (assets/plotly_early.js)
GRAPH_PAGES = re.compile(r"^/compare/?$|^/run/[^/]+/[^/]+/?$")
PLOTLY_JS = "package_data/plotly.min.js"  # in the plotly package, as Dash serves it ("_dash-component-suites/plotly/")


def _fingerprinted(package: str, rel: str) -> str:
    """``rel`` inside the imported ``package`` with Dash's fingerprint (its version and the file's mtime): Dash
    serves such a URL with a one-year max-age, and a new file (a new mtime) is a new URL."""
    mod = importlib.import_module(package)
    mtime = int((Path(mod.__file__).parent / rel).stat().st_mtime)
    return build_fingerprint(rel, getattr(mod, "__version__", "0"), mtime)

_registered: set[str] = set()


class InsightDash(dash.Dash):
    """Dash with the bundles of ``LAZY_LIBRARIES`` out of the index page: their URLs go to
    ``window.__insightLazyScripts`` (and a low-priority prefetch), ``assets/lazy_grid.js`` loads them on demand."""

    def interpolate_index(self, **kw):
        scripts = kw.get("scripts", "")
        path = request.path[len(self.config.requests_pathname_prefix) - 1:] if has_request_context() else ""
        suites = self.config.requests_pathname_prefix + "_dash-component-suites/"
        plotly_url = suites + "plotly/" + _fingerprinted("plotly", PLOTLY_JS)
        scripts = (f"<script>window.__insightPlotlyURL = {json.dumps(plotly_url)}; window.__insightGraphPages = "
                   f"{json.dumps(GRAPH_PAGES.pattern)};</script>{scripts}")
        lazy = {}
        for lib in LAZY_LIBRARIES:
            tag = re.search(r'<script src="([^"]*/_dash-component-suites/%s/[^"]*\.js)"></script>\s*' % lib, scripts)
            if tag:
                lazy[lib] = tag.group(1)
                scripts = scripts.replace(tag.group(0), "")
        if lazy:
            chunks = {lib: [suites + f"{lib}/" + _fingerprinted(lib, c) for c in LAZY_CHUNKS.get(lib, ())]
                      for lib in lazy}
            urls = [*lazy.values(), *(c for cs in chunks.values() for c in cs)]
            now = GRID_PAGES.match(path)
            head = "".join(f'<link rel="prefetch" href="{u}" as="script">' for u in urls) if not now else ""
            scripts = (f"<script>window.__insightLazyScripts = {json.dumps(lazy)}; window.__insightLazyChunks = "
                       f"{json.dumps(chunks)}; window.__insightLazyNow = {json.dumps(bool(now))}; window.__insightGridPages = "
                       f"{json.dumps(GRID_PAGES.pattern)};</script>"
                       f"{head}{scripts}")
        kw["scripts"] = scripts
        if GRAPH_PAGES.match(path):
            # fetched with the page's own scripts, so that assets/plotly_early.js finds it downloaded when it
            # starts it (with the request for the page's content): it then only has to run
            kw["css"] = f'<link rel="preload" href="{plotly_url}" as="script">' + kw.get("css", "")
        return super().interpolate_index(**kw)


def page_modules() -> list:
    import dashboard.pages as pages

    return [importlib.import_module(f"dashboard.pages.{name}")
            for name in sorted(m.name for m in pkgutil.iter_modules(pages.__path__))]


def _run_title(page: str):
    def title(run_id=None, **_):
        name = unquote(str(run_id or ""))
        return f"{name[:60]} · {page}" if name else f"Insight · {page}"
    return title


def create_app(base_dir, reload_interval: float = 3.0) -> dash.Dash:
    set_store(RunStore(base_dir, reload_interval))
    app = InsightDash(__name__, use_pages=True, pages_folder="", assets_folder=str(ASSETS), title="Insight",
                      suppress_callback_exceptions=True, update_title=None)
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.server.config["SEND_FILE_MAX_AGE_DEFAULT"] = ASSET_MAX_AGE
    for mod in page_modules():
        name = mod.__name__.rsplit(".", 1)[-1]
        if name not in _registered:  # dash.page_registry is process-wide: one registration per page
            mod.register()
            _registered.add(name)
        if hasattr(mod, "register_callbacks"):
            mod.register_callbacks(app)
    for page in dash.page_registry.values():  # tab titles "run · page"
        if str(page.get("path_template") or "").startswith("/run/<run_id>/"):
            page["title"] = _run_title(page["name"])
    routes.register_routes(app.server)
    app.layout = html.Div([
        html.Header([dcc.Link("Insight", href="/", className="brand"),
                     dcc.Link("Runs", href="/", className="top-link", id="top-runs"),
                     dcc.Link("Compare", href="/compare", className="top-link", id="top-compare")],
                    className="top-bar"),
        html.Main(dash.page_container, className="content"),
    ])
    return app
