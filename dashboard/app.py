"""The Insight dashboard: a Dash multi-page app, one module per page under ``dashboard/pages``.

``create_app(base_dir)`` builds the app for one ``--summary-base-dir``; ``dashboard.server`` serves it
with waitress. Pages are registered with path templates (``/run/<run_id>/overview`` ...) and read
everything through ``dashboard.data.RunStore`` -> ``insight.analysis``.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import dash
from dash import dcc, html

from dashboard.data import RunStore, set_store

ASSETS = Path(__file__).parent / "assets"


def create_app(base_dir, reload_interval: float = 3.0) -> dash.Dash:
    set_store(RunStore(base_dir, reload_interval))
    app = dash.Dash(__name__, use_pages=True, pages_folder="", assets_folder=str(ASSETS), title="Insight",
                    suppress_callback_exceptions=True, update_title=None)
    import dashboard.pages as pages

    for name in sorted(m.name for m in pkgutil.iter_modules(pages.__path__)):
        mod = importlib.import_module(f"dashboard.pages.{name}")
        if name not in _registered:
            mod.register()
            _registered.add(name)
    app.layout = html.Div([
        html.Header([dcc.Link("Insight", href="/", className="brand"),
                     dcc.Link("Runs", href="/", className="top-link", id="top-runs"),
                     dcc.Link("Compare", href="/compare", className="top-link", id="top-compare")],
                    className="top-bar"),
        html.Main(dash.page_container, className="content"),
    ])
    return app


_registered: set[str] = set()
