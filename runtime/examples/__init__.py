"""Runnable examples: ``python -m runtime.examples.NAME`` (see each module's docstring)."""
