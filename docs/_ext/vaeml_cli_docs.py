"""A Sphinx directive that renders the ``vaeml`` command's options from its argparse parser.

``{vaeml-cli} train`` (MyST) or ``.. vaeml-cli:: train`` (reST) writes the subcommand's
description and one table per argument group, from :func:`vaeml_jax.cli.build_parser`: the flags,
their default and their help text. The page therefore cannot drift from ``vaeml train --help``.
The tables are built as docutils nodes, so they render the same from Markdown and reST pages.
"""

from __future__ import annotations

import argparse

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _subparser(name: str) -> argparse.ArgumentParser:
    from vaeml_jax.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subcommands in a private action
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _flags(action: argparse.Action) -> list[str]:
    if not action.option_strings:
        return [action.metavar or action.dest]
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (action.metavar or action.dest.upper())
    return [f"{opt}{metavar}" for opt in action.option_strings]


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    return str(action.default)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {**vars(action), "prog": "vaeml"}
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return " ".join(text.replace("%%", "%").split())


def _cell(*children: nodes.Node) -> nodes.entry:
    return nodes.entry("", nodes.paragraph("", "", *children))


def _literals(items: list[str], sep: str = ", ") -> list[nodes.Node]:
    out: list[nodes.Node] = []
    for i, item in enumerate(items):
        if i:
            out.append(nodes.Text(sep))
        out.append(nodes.literal(item, item))
    return out


def _row(action: argparse.Action, with_default: bool) -> nodes.row:
    meaning: list[nodes.Node] = [nodes.Text(_help(action))]
    if action.choices is not None:
        meaning += [nodes.Text(" (one of "), *_literals(list(map(str, action.choices)))]
        meaning.append(nodes.Text(")"))
    cells = [_cell(*_literals(_flags(action)))]
    if with_default:
        default = _default(action)
        cells.append(_cell(*([nodes.literal(default, default)] if default else [])))
    return nodes.row("", *cells, _cell(*meaning))


def _table(actions: list[argparse.Action]) -> nodes.table:
    """Option, default and meaning; the default column only where some option has a default
    (``vaeml train`` states its defaults in the help text, as its options fall back to a config)."""
    with_default = any(_default(a) for a in actions)
    headers = ("option", "default", "meaning") if with_default else ("option", "meaning")
    widths = (30, 12, 58) if with_default else (30, 70)
    tgroup = nodes.tgroup(cols=len(headers))
    for width in widths:
        tgroup += nodes.colspec(colwidth=width)
    tgroup += nodes.thead("", nodes.row("", *(_cell(nodes.Text(h)) for h in headers)))
    tgroup += nodes.tbody("", *(_row(a, with_default) for a in actions))
    return nodes.table("", tgroup)


def _nodes(parser: argparse.ArgumentParser) -> list[nodes.Node]:
    out: list[nodes.Node] = []
    if parser.description:
        out.append(nodes.paragraph("", " ".join(parser.description.split())))
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        out.append(nodes.rubric("", group.title))
        if group.description:
            out.append(nodes.paragraph("", " ".join(group.description.split())))
        out.append(_table(actions))
    return out


class VaemlCli(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        return _nodes(_subparser(self.arguments[0]))


def setup(app):
    app.add_directive("vaeml-cli", VaemlCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
