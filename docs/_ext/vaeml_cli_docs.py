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


def _row(action: argparse.Action) -> nodes.row:
    meaning: list[nodes.Node] = [nodes.Text(_help(action))]
    if action.choices is not None:
        meaning += [nodes.Text(" (one of "), *_literals(list(map(str, action.choices)))]
        meaning.append(nodes.Text(")"))
    default = _default(action)
    return nodes.row(
        "",
        _cell(*_literals(_flags(action))),
        _cell(*([nodes.literal(default, default)] if default else [])),
        _cell(*meaning),
    )


def _table(actions: list[argparse.Action]) -> nodes.table:
    tgroup = nodes.tgroup(cols=3)
    for width in (30, 12, 58):
        tgroup += nodes.colspec(colwidth=width)
    head = nodes.row("", *(_cell(nodes.Text(h)) for h in ("option", "default", "meaning")))
    tgroup += nodes.thead("", head)
    tgroup += nodes.tbody("", *(_row(a) for a in actions))
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
