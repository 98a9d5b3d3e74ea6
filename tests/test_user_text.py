"""What a user reads names no issue numbers or work sessions.

README, changelog, docs, the benchmarks' README, scripts (their docstrings are their ``--help``),
the package (docstrings, CLI help) and the notebooks. The lab book ``benchmarks/RESULTS.md``
records its own history and is not scanned.
"""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"\b(issues?\s*#?\s*\d+|sessions?\s+\d+)", re.IGNORECASE)


def _user_files():
    globs = [
        "README.md",
        "CHANGELOG.md",
        "docs/**/*.md",
        "docs/**/*.rst",
        "benchmarks/README.md",
        "benchmarks/*.py",
        "benchmarks/*.sh",
        "vaeml_jax/**/*.py",
        "notebooks/*.ipynb",
        "docs/**/*.ipynb",
    ]
    for g in globs:
        yield from sorted(REPO.glob(g))


def test_user_text_names_no_issue_or_session():
    files = list(_user_files())
    assert len(files) > 30  # the globs still find the tree
    hits = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()[:80]}"
        for p in files
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if PATTERN.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_pattern_catches_what_it_guards():
    for planted in ("(issue 4)", "Issue 10 part 3", "issues 23", "in session 4", "issue #12"):
        assert PATTERN.search(planted), planted
    for fine in ("a known issue", "sessions of training", "tissue 4"):
        assert not PATTERN.search(fine), fine


def _text(p: Path) -> str:
    """The text as written (bytes: read_text would turn a lone carriage return into a newline);
    a notebook's cell sources, decoded from their JSON escapes."""
    raw = p.read_bytes().decode("utf-8")
    if p.suffix != ".ipynb":
        return raw
    return "\n".join("".join(c["source"]) for c in json.loads(raw)["cells"])


def test_user_text_has_no_control_characters():
    """A LaTeX command written through a non-raw string (\\rVert, \\frac, \\theta) leaves a control
    character in the text instead of the command: the rendered maths breaks silently."""
    control = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
    hits = [
        f"{p.relative_to(REPO)}:{n}: {line!r:.80}"
        for p in _user_files()
        for n, line in enumerate(_text(p).split("\n"), 1)
        if control.search(line)
    ]
    assert not hits, "\n".join(hits)
    assert control.search("E\\lVert\\Delta_l\rVert")  # the planted bug this guards against
