"""Any other URL: a not-found page."""
import dash

from dashboard.components import not_found


def register():
    dash.register_page(__name__, path="/404", name="Not found", layout=lambda **_: not_found(
        "This page does not exist."))
