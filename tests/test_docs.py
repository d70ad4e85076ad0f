"""The README and docs/ stay true to the code without running anything heavy.

- Every `flashinfer ...` command they show parses with the real parser. Commands are
  taken from fenced code blocks (a line ending in `\\`, or an indented line, continues
  the one before; `# comments`, redirections and pipes are cut off) and from inline
  code spans. A concrete command (placeholders such as DIR or MODEL are just words to
  argparse) must parse exactly; a synopsis line, one with `[...]`, `a|b` or `...`,
  cannot, so it is checked word by word instead: its command exists, every option it
  names is an option of that command, and every value it lists for an option with
  choices is one of them.
- The README's synopsis names every command of the parser.
- Every `python benchmarks/X.py` or `python tools/X.py` they show exists, its `--help`
  exits 0, and every `--option` the docs give it appears in that help.
- Every relative link points at a file (and a `#section` of a Markdown page at one of
  its headings), and every repository path in inline code (`benchmarks/...`,
  `mlx_flashinfer/...`, `{a,b}` and `*` allowed) names files that exist, and so
  does a module named by itself (`reader.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_flashinfer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Written on another branch at the same time as these pages; a link to it may dangle
# until that branch is merged, and is checked like any other once the file exists.
NOT_YET_MERGED = {ROOT / "ARCHITECTURE.md"}

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SCRIPT = re.compile(r"\bpython3? ((?:benchmarks|tools)/[\w-]+\.py)\b")
REPO_PATH = re.compile(
    r"^(?:benchmarks|tools|tests|docs|mlx_flashinfer|fallback_numpy)/[\w./{},*-]*$"
)
SHELL_OPERATORS = {"<", ">", ">>", "|", "||", "&&", ";", "&", "2>", "2>&1"}
SYNOPSIS_MARKS = ("[", "]", "|", "...")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def code_lines(text: str) -> list[str]:
    """The lines of every shell code block (```bash, ```sh or a bare ```; ```text
    blocks show output), continuation lines joined."""
    commands: list[str] = []
    for _, language, body in FENCE.findall(text):
        if language not in ("bash", "sh", "shell", ""):
            continue
        joining = False
        for line in body.splitlines():
            continues = joining or (line[:1].isspace() and commands)
            if continues and commands:
                commands[-1] += " " + line.strip().rstrip("\\")
            else:
                commands.append(line.strip().rstrip("\\"))
            joining = line.rstrip().endswith("\\")
    return commands


def inline_spans(text: str) -> list[str]:
    """Inline code spans of the prose, a span broken across lines joined."""
    return [" ".join(span.split()) for span in INLINE.findall(prose(text))]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command string) for every code line and inline span of every page."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for command in code_lines(text) + inline_spans(text):
            found.append((page_id(page), command))
    return found


def words(command: str) -> list[str]:
    """The command's words, comments dropped, cut at the first shell operator."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    cut = next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), len(tokens))
    return tokens[:cut]


def flashinfer_commands() -> list[tuple[str, list[str]]]:
    """(page, argv after `flashinfer`) for each command that starts with `flashinfer`
    (after `time` or `/usr/bin/time -v`, as the docs time some)."""
    found = []
    for page, command in documented_commands():
        tokens = words(command)
        if "flashinfer" not in tokens:
            continue
        start = tokens.index("flashinfer")
        if any(t not in ("time", "/usr/bin/time", "-v") for t in tokens[:start]):
            continue
        argv = tokens[start + 1 :]
        # `flashinfer serve: stopped` is output, quoted in prose
        if argv and not argv[0].endswith(":"):
            found.append((page, argv))
    return found


def is_synopsis(argv: list[str]) -> bool:
    """A line that shows a command's form rather than a command to run: optional
    parts, alternatives, repetition, a placeholder for the command itself, or the
    command's bare name (`flashinfer perplexity` in a sentence)."""
    marked = any(mark in token for token in argv for mark in SYNOPSIS_MARKS)
    return marked or argv[0].isupper() or len(argv) == 1


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("flashinfer's parser has no subcommands")


def check_synopsis(argv: list[str]) -> list[str]:
    """What in a synopsis line the parser does not know (empty: all of it is known)."""
    commands = subparsers(build_parser())
    if argv[0].isupper():  # `flashinfer COMMAND --help`: any command
        return []
    if argv[0] not in commands:
        return [f"no command {argv[0]!r}"]
    options = {
        option: action
        for action in commands[argv[0]]._actions
        for option in action.option_strings
    }
    problems = []
    for i, token in enumerate(argv[1:], start=1):
        name = token.strip("[]").split("=")[0]
        if not name.startswith("-") or name == "-":
            continue
        if name not in options:
            problems.append(f"no option {name}")
            continue
        action = options[name]
        if not action.choices:
            continue
        for value_token in argv[i + 1 :]:
            if value_token.lstrip("[").startswith("-") or value_token in ("|", "..."):
                break
            for value in value_token.strip("[]").split("|"):
                placeholder = value.isupper() or value in ("", "...")
                if not placeholder and value not in map(str, action.choices):
                    problems.append(f"{name} {value}: not one of its choices")
            if action.nargs not in ("+", "*") or value_token.endswith("]"):
                break
    return problems


COMMANDS = flashinfer_commands()


def test_the_docs_show_flashinfer_commands():
    assert len(COMMANDS) > 30, "the command extraction found too few commands"
    assert any(is_synopsis(argv) for _, argv in COMMANDS)


@pytest.mark.parametrize(
    "page, argv",
    [c for c in COMMANDS if not is_synopsis(c[1])],
    ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60],
)
def test_a_documented_command_parses(page, argv):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(
            f"{page}: `flashinfer {shlex.join(argv)}` does not parse "
            f"(exit {exit.code}): {stderr.getvalue().strip()}"
        )


@pytest.mark.parametrize(
    "page, argv",
    [c for c in COMMANDS if is_synopsis(c[1])],
    ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60],
)
def test_a_synopsis_names_only_real_options(page, argv):
    problems = check_synopsis(argv)
    assert not problems, f"{page}: `flashinfer {' '.join(argv)}`: {problems}"


def test_the_readme_synopsis_names_every_command():
    readme = page_id(PAGES[0])
    shown = {argv[0] for page, argv in COMMANDS if page == readme}
    missing = set(subparsers(build_parser())) - shown
    assert not missing, f"README.md shows no `flashinfer` line for {sorted(missing)}"


def script_uses() -> dict[str, list[tuple[str, list[str]]]]:
    """script path -> [(page, the --options given to it there)]"""
    uses: dict[str, list[tuple[str, list[str]]]] = {}
    for page, command in documented_commands():
        for match in SCRIPT.finditer(command):
            tokens = words(command[match.end() :])
            if "--" in tokens:  # what follows goes to another program
                tokens = tokens[: tokens.index("--")]
            options = [
                t.strip("[]").split("=")[0]
                for t in tokens
                if t.strip("[]").startswith("--")
            ]
            uses.setdefault(match.group(1), []).append((page, options))
    return uses


SCRIPTS = script_uses()


@functools.cache
def script_help(script: str) -> str:
    result = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"`python {script} --help` exited {result.returncode}: "
        f"{result.stderr.strip()[-500:]}"
    )
    return result.stdout


def test_the_docs_name_scripts():
    assert "tools/synth.py" in SCRIPTS and len(SCRIPTS) > 8


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_documented_script_exists_and_takes_its_options(script):
    pages = sorted({page for page, _ in SCRIPTS[script]})
    assert (ROOT / script).is_file(), f"{pages} name {script}, which does not exist"
    text = script_help(script)
    for page, options in SCRIPTS[script]:
        for option in options:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{page}: `python {script} ... {option}`: not in its --help"
            )


def slugs(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", prose(page.read_text("utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeats = itertools.count(1)
        unique = slug
        while unique in found:  # a repeated heading gets -1, -2, ...
            unique = f"{slug}-{next(repeats)}"
        found.add(unique)
    return found


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        text = re.sub(r"`[^`]*`", "", prose(page.read_text(encoding="utf-8")))
        found += [(page, target) for target in LINK.findall(text)]
    return found


@pytest.mark.parametrize(
    "page, target", links(), ids=lambda v: v if isinstance(v, str) else v.name
)
def test_a_relative_link_points_at_a_file(page, target):
    if re.match(r"^[a-z]+:", target):  # https:, mailto:
        return
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if file in NOT_YET_MERGED and not file.exists():
        pytest.skip(f"{file.name}: written on another branch, not merged yet")
    assert file.exists(), f"{page_id(page)}: link to {target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in slugs(file), (
            f"{page_id(page)}: link to {target}: {file.name} has no such heading"
        )


def expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        expanded
        for choice in match.group(1).split(",")
        for expanded in expand_braces(head + choice + tail)
    ]


def repository_paths() -> list[tuple[str, str]]:
    """(page, path) for inline code that is a repository path, and for the repository
    paths a documented command reads (what follows --out is written, not read)."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for span in inline_spans(text):
            if REPO_PATH.match(span):
                found.append((page_id(page), span))
        for command in code_lines(text) + inline_spans(text):
            tokens = words(command)
            for before, token in zip(["", *tokens], tokens, strict=False):
                if REPO_PATH.match(token) and before != "--out":
                    found.append((page_id(page), token))
    return sorted(set(found))


@pytest.mark.parametrize("page, path", repository_paths())
def test_a_repository_path_exists(page, path):
    for expanded in expand_braces(path):
        matches = list(ROOT.glob(expanded)) if "*" in expanded else [ROOT / expanded]
        assert any(m.exists() for m in matches), f"{page} names {expanded}: missing"


def module_names() -> list[tuple[str, str]]:
    """(page, name) for inline code that is a bare module name (`reader.py`), as the
    pages name the files of a folder they have just named."""
    return sorted(
        {
            (page_id(page), span)
            for page in PAGES
            for span in inline_spans(page.read_text(encoding="utf-8"))
            if re.fullmatch(r"[\w-]+\.py", span)
        }
    )


@pytest.mark.parametrize("page, name", module_names())
def test_a_module_named_by_itself_exists(page, name):
    folders = ("mlx_flashinfer", "fallback_numpy", "benchmarks", "tools", "tests")
    found = [path for folder in folders for path in (ROOT / folder).rglob(name)]
    assert found, f"{page} names {name}: no such file in {folders}"
