"""Sphinx configuration for the vaeml-jax documentation.

Build (offline; warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the package for autodoc needs no device

from vaeml_jax import __version__  # noqa: E402

project = "vaeml-jax"
author = "vaeml-jax contributors"
copyright = "vaeml-jax contributors"  # noqa: A001
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_nb",  # MyST Markdown pages and the notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "vaeml_cli_docs",
    "vaeml_refs",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
# The notebooks (docs/notebooks links to the repository's notebooks/) are shown with the outputs
# stored in them; the test suite executes them, the docs build does not.
nb_execution_mode = "off"
exclude_patterns = ["_build", "README.md", "**/.ipynb_checkpoints"]
root_doc = "index"
# Quotes only: "--flag" must not become an en dash, nor "..." an ellipsis, in the CLI tables.
smartquotes_action = "q"

# MyST: $...$ math, ::: fences, heading anchors for [text](page.md#heading) links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: Google-style docstrings (napoleon), signatures as written, members in source order.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple fields are documented once
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}

# A reference that does not resolve is a build error (-W). Types from other libraries have no
# inventory offline (no intersphinx fetch in CI), so those, and only those, are listed here.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:(class|obj|data|func)",
        r"(jax|jaxlib|jnp|np|numpy|optax|flax|nnx|chex|orbax|matplotlib)\..*",
    ),
    (
        r"py:(class|obj|data)",
        r"(Array|ArrayLike|PRNGKeyArray|PyTree|Mesh|Device|Axes|Figure|NDArray)",
    ),
    (r"py:(class|obj|data)", r"(argparse|collections\.abc|typing|pathlib|os|enum)\..*"),
]

html_theme = "furo"
html_title = f"vaeml-jax {release}"
html_static_path: list[str] = []
