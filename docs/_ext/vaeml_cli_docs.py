"""A Sphinx directive that renders the ``vaeml`` command's options from its argparse parser.

``{vaeml-cli} train`` (MyST) or ``.. vaeml-cli:: train`` (reST) writes one table per argument
group of that subcommand, from :func:`vaeml_jax.cli.build_parser`: the flags, their default and
their help text. The page therefore cannot drift from ``vaeml train --help``.
"""

from __future__ import annotations

import argparse

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _subparser(name: str) -> argparse.ArgumentParser:
    from vaeml_jax.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subcommands in a private action
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"``{action.metavar or action.dest}``"
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (action.metavar or action.dest.upper())
    return ", ".join(f"``{opt}{metavar}``" for opt in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    return f"``{action.default}``"


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if "%(" in text:
        params = {**vars(action), "prog": "vaeml"}
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    if action.choices is not None and "choices" not in (action.help or ""):
        text += " (one of " + ", ".join(f"``{c}``" for c in action.choices) + ")"
    return " ".join(text.split()).replace("*", r"\*").replace("|", r"\|")


def _rst(parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"``{parser.prog.replace(' ', ' ', 1)} --help`` prints the same options.", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        lines += [f"**{group.title}**", ""]
        if group.description:
            lines += [" ".join(group.description.split()), ""]
        lines += [".. list-table::", "   :header-rows: 1", "   :widths: 30 15 55", ""]
        lines += ["   * - option", "     - default", "     - meaning"]
        for a in actions:
            lines += [f"   * - {_flags(a)}", f"     - {_default(a)}", f"     - {_help(a)}"]
        lines.append("")
    return lines


class VaemlCli(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        parser = _subparser(self.arguments[0])
        container = nodes.container()
        self.state.nested_parse(StringList(_rst(parser), source="vaeml_jax.cli"), 0, container)
        return container.children


def setup(app):
    app.add_directive("vaeml-cli", VaemlCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
