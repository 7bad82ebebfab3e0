"""Sphinx configuration for the aiida-emlip documentation (Markdown pages via MyST)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

# Document the package of this checkout (the API pages import it; no AiiDA profile is loaded).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

project = "aiida-emlip"
author = "aiida-emlip developers"
copyright = "aiida-emlip developers"
try:
    release = importlib.metadata.version("aiida-emlip")
except importlib.metadata.PackageNotFoundError:
    release = "0.0.0"
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# API reference (api.md): the real dependencies are installed and imported, nothing is mocked.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
# Only this package's docstrings: methods that override torch, ASE or AiiDA ones without a docstring
# of their own are left out rather than shown with the upstream text (its references do not resolve).
autodoc_inherit_docstrings = False

html_theme = "sphinx_rtd_theme"
html_title = f"aiida-emlip {release}"
