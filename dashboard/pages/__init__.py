"""One module per dashboard page. Each defines ``register()`` (called once by dashboard.app) and its
callbacks; layouts go through ``dashboard.components.run_page`` so errors stay inside the page."""
