"""Render the book's equations without a network connection, when possible.

Sphinx loads MathJax from a CDN by default, so a reader offline (or the headless browser of
tests/test_book.py) sees raw LaTeX. The PyPI package ``sphinx-mathjax-offline`` ships MathJax 3
and copies it into ``_static/``; this wrapper uses it when it is installed and otherwise leaves
Sphinx's default (the CDN) in place, so the build never depends on it.
"""
from __future__ import annotations

import importlib.util

OFFLINE = "sphinx-mathjax-offline"  # the package's module name really has hyphens


def setup(app):
    if importlib.util.find_spec(OFFLINE) is not None:
        app.setup_extension(OFFLINE)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
