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
    importlib.import_module("dashboard.pages.timeline").register_routes(app.server)
    _share_callbacks()
    app.layout = html.Div([
        html.Header([dcc.Link("Insight", href="/", className="brand"),
                     dcc.Link("Runs", href="/", className="top-link", id="top-runs"),
                     dcc.Link("Compare", href="/compare", className="top-link", id="top-compare")],
                    className="top-bar"),
        html.Main(dash.page_container, className="content"),
    ])
    return app


_registered: set[str] = set()
_callbacks: tuple | None = None


def _share_callbacks() -> None:
    """``dash.callback`` registrations live in a global list that the first app to serve a request takes
    for itself. Keep a copy from the first app and give it back to every later one (tests build several
    apps in one process)."""
    global _callbacks
    from dash import _callback

    if _callbacks is None:
        _callbacks = (dict(_callback.GLOBAL_CALLBACK_MAP), list(_callback.GLOBAL_CALLBACK_LIST))
        return
    for k, v in _callbacks[0].items():
        _callback.GLOBAL_CALLBACK_MAP.setdefault(k, v)
    _callback.GLOBAL_CALLBACK_LIST.extend(c for c in _callbacks[1] if c not in _callback.GLOBAL_CALLBACK_LIST)
