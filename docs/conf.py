"""Sphinx configuration for the aiida-emlip documentation (Markdown pages via MyST)."""

from __future__ import annotations

import importlib.metadata

project = "aiida-emlip"
author = "aiida-emlip developers"
copyright = "aiida-emlip developers"
try:
    release = importlib.metadata.version("aiida-emlip")
except importlib.metadata.PackageNotFoundError:
    release = "0.0.0"
version = release

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

html_theme = "sphinx_rtd_theme"
html_title = f"aiida-emlip {release}"
