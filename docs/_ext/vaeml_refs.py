"""Resolve short Python references to the one documented object they can mean.

The package's docstrings name objects as a reader of the source does: ``LatentVariableModel`` from
inside :mod:`vaeml_jax.estimators`, ``vaeml_jax.make_unbiased_grad`` through the top-level
re-export. Sphinx looks such names up only in the current module, so this handler retries a
reference that did not resolve with ever shorter dotted suffixes of its target (dropping leading
components) and links it when exactly ONE documented object of a matching type ends with that
suffix. A name that matches nothing, or several objects, is left unresolved and still fails the
build under ``-W``. A type variable of the package (``T`` in a signature) is shown as plain text.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from sphinx.util.nodes import make_refnode


def _is_type_variable(target: str) -> bool:
    """Whether ``target`` names a ``typing.TypeVar`` of the package (nothing to link to)."""
    module, _, name = target.rpartition(".")
    if not module.startswith("vaeml_jax"):
        return False
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, TypeVar)


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    if _is_type_variable(node["reftarget"]):
        return contnode  # a signature's type variable: shown as text, as Sphinx shows ``~T``
    domain = env.get_domain("py")
    target = node["reftarget"].lstrip(".~")
    objtypes = set(domain.objtypes_for_role(node["reftype"]) or ())
    parts = target.split(".")
    for start in range(len(parts)):
        suffix = ".".join(parts[start:])
        matches = [
            (name, entry)
            for name, entry in domain.objects.items()
            if (name == suffix or name.endswith("." + suffix))
            and entry.objtype in objtypes
            and not entry.aliased
        ]
        if len(matches) == 1:
            name, entry = matches[0]
            return make_refnode(
                app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
            )
        if matches:
            return None  # ambiguous: let the warning stand
    return None


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
